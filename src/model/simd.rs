//! Loops compiled for the CPU's widest vector instructions. The build targets plain x86-64
//! (SSE2: 4 floats per instruction) so that binaries run on any x86-64 machine. A loop handed
//! to [`widest!`] is compiled again inside a function with AVX-512 (16 floats) or AVX2 + FMA
//! (8) enabled, and the widest the CPU has is chosen at run time.
//!
//! The results are the same bits at every width: a loop's arithmetic and its order stay as
//! written (Rust never fuses `a * b + c` or reorders a float sum on its own), only the number
//! of elements each instruction takes changes.

use std::sync::OnceLock;

/// The vector instructions [`widest!`] compiles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2Fma,
    Baseline,
}

/// What this CPU has, detected once.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("fma") {
                return Level::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Level::Avx2Fma;
            }
        }
        Level::Baseline
    })
}

/// Evaluate a block inside a function compiled for [`level`]: `widest!({ loop… })`. Use it
/// inside a parallel task, not around one (a closure rayon runs on another thread is compiled
/// on its own). A macro rather than a function taking a closure: each copy of the block is its
/// own closure, marked to be inlined into the copy that calls it, so that the loops really
/// are compiled with the wider instructions (functions they call must be `#[inline]` too).
macro_rules! widest {
    ($body:block) => {
        match $crate::model::simd::level() {
            #[cfg(target_arch = "x86_64")]
            $crate::model::simd::Level::Avx512 => $crate::model::simd::on_avx512(#[inline(always)] || $body),
            #[cfg(target_arch = "x86_64")]
            $crate::model::simd::Level::Avx2Fma => $crate::model::simd::on_avx2(#[inline(always)] || $body),
            _ => $body,
        }
    };
}
pub(crate) use widest;

/// `f()` compiled with AVX-512: for [`widest!`]. Checks the CPU has it (one load).
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[inline(always)]
pub fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    assert_eq!(level(), Level::Avx512, "AVX-512 code on a CPU without it");
    // SAFETY: the CPU has the features `avx512` is compiled for (checked above).
    unsafe { avx512(f) }
}

/// `f()` compiled with AVX2 and FMA: for [`widest!`]. Checks the CPU has them.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[inline(always)]
pub fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    assert_ne!(level(), Level::Baseline, "AVX2 code on a CPU without it");
    // SAFETY: the CPU has the features `avx2` is compiled for (checked above).
    unsafe { avx2(f) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Partial results kept side by side by the reductions below: as many as one AVX-512
/// register holds, whatever width the loop is compiled for, so the order of the additions
/// (and so the result) is the same on every machine.
const LANES: usize = 16;

/// `Σ a[i]·b[i]`, in [`LANES`] running sums added up in a fixed order at the end.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a[i]·b[i]·c[i]`, as [`dot`].
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let n = a.len().min(b.len()).min(c.len());
    let whole = n / LANES * LANES;
    for ((x, y), z) in a[..whole].chunks_exact(LANES).zip(b[..whole].chunks_exact(LANES)).zip(c[..whole].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l] * z[l];
        }
    }
    let tail: f32 = (whole..n).map(|i| a[i] * b[i] * c[i]).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The largest value (−∞ for none). Exact whatever the order, so it may run in lanes.
#[inline(always)]
pub fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for l in 0..LANES {
            lanes[l] = if chunk[l] > lanes[l] { chunk[l] } else { lanes[l] };
        }
    }
    lanes.iter().copied().fold(tail, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_gives_the_same_bits_at_every_width() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let body = |x: &[f32]| -> (Vec<f32>, f32) {
            let y: Vec<f32> = x.iter().map(|&v| super::super::fastexp::exp(v) / (1.0 + v * v)).collect();
            let sum = super::super::fastexp::sum(&y);
            (y, sum)
        };
        assert_eq!(widest!({ body(&x) }), body(&x));
    }

    #[test]
    fn reductions_match_plain_sums_and_the_maximum() {
        let a: Vec<f32> = (0..203).map(|i| (i as f32 * 0.11).cos()).collect();
        let b: Vec<f32> = (0..203).map(|i| (i as f32 * 0.07).sin()).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
        assert!((dot(&a, &b) as f64 - plain).abs() < 1e-4);
        let plain3: f64 = a.iter().zip(&b).zip(&a).map(|((x, y), z)| (x * y * z) as f64).sum();
        assert!((dot3(&a, &b, &a) as f64 - plain3).abs() < 1e-4);
        assert_eq!(max(&a), a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(widest!({ dot(&a, &b) }), dot(&a, &b));
    }
}
