//! A two-way fork-join for decoding's short kernels, on a helper thread that spins between jobs.
//!
//! A decoding step runs dozens of kernels of 5–50 µs each (few-row products, cached attention).
//! Handing half of one to rayon's other worker wakes that worker from sleep first: a futex call
//! and a context switch, about as long as the half itself on the 2-core VMs measured here, where
//! bench-tiny's decoding ran as fast on one thread as on two (batch 1: 1,400–1,430 tokens/s on
//! one, 1,416–1,639 on two). The helper here waits for the next job by spinning on an atomic,
//! yielding its core now and then, and parks only after [`SPIN_BEFORE_PARKING`] without one.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long the helper spins for a next job before it parks (a step's serial work between two
/// kernels is far shorter; the end of a generation run is far longer).
const SPIN_BEFORE_PARKING: Duration = Duration::from_millis(2);
/// Spins between two yields of the helper's core (to rayon's workers, when they have work).
const SPINS_PER_YIELD: u32 = 256;

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const DONE: u8 = 2;

/// The job handed over: a `FnMut` on the poster's stack, which outlives it (the poster waits
/// for `DONE` before returning or unwinding).
type Job = *mut (dyn FnMut() + Send + 'static);

struct Helper {
    state: AtomicU8,
    /// Taken by the one caller whose job the helper runs; others run both halves themselves.
    claimed: AtomicBool,
    sleeping: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    panic: UnsafeCell<Option<Box<dyn Any + Send>>>,
    thread: OnceLock<Thread>,
}

// SAFETY: `job` and `panic` are written by one side and read by the other only across the
// Release/Acquire hand-offs of `state` (POSTED, then DONE), by the one caller holding `claimed`.
unsafe impl Sync for Helper {}

static HELPER: OnceLock<&'static Helper> = OnceLock::new();

fn helper() -> &'static Helper {
    HELPER.get_or_init(|| {
        let helper: &'static Helper = Box::leak(Box::new(Helper {
            state: AtomicU8::new(IDLE),
            claimed: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            panic: UnsafeCell::new(None),
            thread: OnceLock::new(),
        }));
        let handle = thread::Builder::new()
            .name("lathe-decode-helper".into())
            .spawn(move || serve(helper))
            .expect("spawning the decoding helper thread");
        helper.thread.set(handle.thread().clone()).expect("set once");
        helper
    })
}

fn serve(helper: &'static Helper) {
    loop {
        wait_for_job(helper);
        // SAFETY: POSTED (acquired above) published the job; the poster waits for DONE.
        let job = unsafe { (*helper.job.get()).take() }.expect("a posted job");
        // SAFETY: the closure lives on the poster's stack until DONE is stored below.
        let outcome = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() }));
        if let Err(payload) = outcome {
            // SAFETY: the poster reads it only after DONE.
            unsafe { *helper.panic.get() = Some(payload) };
        }
        helper.state.store(DONE, Ordering::Release);
    }
}

fn wait_for_job(helper: &Helper) {
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    while helper.state.load(Ordering::Acquire) != POSTED {
        std::hint::spin_loop();
        spins += 1;
        if spins.is_multiple_of(SPINS_PER_YIELD) {
            thread::yield_now();
            if idle_since.elapsed() > SPIN_BEFORE_PARKING {
                // SeqCst pairs with the poster's: either it sees `sleeping` and unparks, or
                // this load sees its POSTED.
                helper.sleeping.store(true, Ordering::SeqCst);
                if helper.state.load(Ordering::SeqCst) != POSTED {
                    thread::park();
                }
                helper.sleeping.store(false, Ordering::SeqCst);
                idle_since = Instant::now();
            }
        }
    }
}

/// Whether [`join`] hands work to the helper: on exactly two threads (more are rayon's to use).
pub fn active() -> bool {
    rayon::current_num_threads() == 2
}

/// `(a(), b())`, with `b` on the helper thread while this one runs `a`, when [`active`] and the
/// helper is free (one caller at a time; a nested or concurrent call runs both here).
pub fn join<RA, RB>(a: impl FnOnce() -> RA, b: impl FnOnce() -> RB + Send) -> (RA, RB)
where
    RB: Send,
{
    if !active() {
        return (a(), b());
    }
    let helper = helper();
    if helper.claimed.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return (a(), b());
    }
    let mut b = Some(b);
    let mut result_b = None;
    let mut job = || result_b = Some((b.take().expect("run once"))());
    let job: &mut (dyn FnMut() + Send) = &mut job;
    // SAFETY: the lifetime is erased for the hand-over only; `wait` below returns (or the guard
    // drops, on unwinding) after the helper stored DONE, before `job` goes out of scope.
    let job: Job = unsafe { std::mem::transmute::<&mut (dyn FnMut() + Send), Job>(job) };
    // SAFETY: `claimed` is ours and the state is IDLE: the helper does not touch the slot.
    unsafe { *helper.job.get() = Some(job) };
    helper.state.store(POSTED, Ordering::SeqCst);
    if helper.sleeping.load(Ordering::SeqCst) {
        helper.thread.get().expect("set at start").unpark();
    }
    let waiting = Wait { helper };
    let result_a = a();
    if let Some(payload) = waiting.finish() {
        resume_unwind(payload);
    }
    (result_a, result_b.expect("the helper ran it"))
}

/// The wait for the helper's DONE, which also runs when `a` unwinds: the job on this stack
/// cannot go out of scope while the helper runs it.
struct Wait {
    helper: &'static Helper,
}

impl Wait {
    /// Waits, frees the helper, and returns its job's panic, if it had one.
    fn finish(self) -> Option<Box<dyn Any + Send>> {
        let payload = self.release();
        std::mem::forget(self);
        payload
    }

    fn release(&self) -> Option<Box<dyn Any + Send>> {
        while self.helper.state.load(Ordering::Acquire) != DONE {
            std::hint::spin_loop();
        }
        // SAFETY: DONE was acquired just above; the helper is idle until the next POSTED.
        let payload = unsafe { (*self.helper.panic.get()).take() };
        self.helper.state.store(IDLE, Ordering::Relaxed);
        self.helper.claimed.store(false, Ordering::Release);
        payload
    }
}

/// Only on unwinding: [`Wait::finish`] forgets the guard once it has waited.
impl Drop for Wait {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(f)
    }

    #[test]
    fn both_halves_run_and_return_their_values() {
        on_two_threads(|| {
            assert!(active());
            for round in 0..1000u64 {
                let data: Vec<u64> = (0..100).map(|i| i * round).collect();
                let (left, right) = join(|| data[..50].iter().sum::<u64>(), || data[50..].iter().sum::<u64>());
                assert_eq!(left + right, data.iter().sum::<u64>());
            }
        });
    }

    #[test]
    fn a_panic_in_either_half_reaches_the_caller_and_the_helper_goes_on() {
        on_two_threads(|| {
            let helper_side = catch_unwind(|| join(|| 1, || -> i32 { panic!("in b") }));
            assert!(helper_side.is_err());
            let caller_side = catch_unwind(|| join(|| -> i32 { panic!("in a") }, || 2));
            assert!(caller_side.is_err());
            assert_eq!(join(|| 3, || 4), (3, 4));
        });
    }

    #[test]
    fn nested_and_parked_calls_still_run_both() {
        on_two_threads(|| {
            let (outer, (x, y)) = join(|| 1, || join(|| 2, || 3));
            assert_eq!((outer, x, y), (1, 2, 3));
            thread::sleep(SPIN_BEFORE_PARKING * 3);
            assert_eq!(join(|| 5, || 6), (5, 6));
        });
    }
}
