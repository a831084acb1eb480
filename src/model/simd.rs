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

/// Whether `f32::mul_add` is one instruction (elsewhere it is a call into libm).
pub fn has_fma() -> bool {
    level() != Level::Baseline
}

/// Evaluate a block inside a function compiled for [`level`]: `widest!({ loop… })`. Use it
/// inside a parallel task, not around one (a closure rayon runs on another thread is compiled
/// on its own). A macro rather than a function taking a closure: each copy of the block is its
/// own closure, marked to be inlined into the copy that calls it, so that the loops really
/// are compiled with the wider instructions (functions they call must be `#[inline]` too).
macro_rules! widest {
    ($body:block) => {
        match $crate::model::simd::level() {
            // SAFETY: `level` found the features these functions are compiled for.
            #[cfg(target_arch = "x86_64")]
            $crate::model::simd::Level::Avx512 => unsafe { $crate::model::simd::avx512(#[inline(always)] || $body) },
            #[cfg(target_arch = "x86_64")]
            $crate::model::simd::Level::Avx2Fma => unsafe { $crate::model::simd::avx2(#[inline(always)] || $body) },
            _ => $body,
        }
    };
}
pub(crate) use widest;

/// `f()` with AVX-512 enabled: for [`widest!`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f()` with AVX2 and FMA enabled: for [`widest!`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
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
}
