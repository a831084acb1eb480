//! `exp` for f32 in a form the compiler vectorises. libm's `expf` is one call per element, and
//! the softmaxes, cross-entropies and sigmoids of the fused kernels spent most of their time
//! there (`make profile`: `__expf_fma` was about 6% of a bench-tiny step).

use std::f32::consts::LOG2_E;

/// 1.5 · 2²³: adding it rounds a float of magnitude < 2²² to an integer held in the low bits.
const ROUNDER: f32 = 12_582_912.0;
const ROUNDER_BITS: u32 = 0x4B40_0000;
/// Below this e^x is under f32's smallest normal, and is returned as 0 (so e^−∞ = 0).
const UNDERFLOW: f32 = -87.336_54;

/// ln 2 split so that `n · LN2_HIGH` is exact for the |n| ≤ 127 used here (Cody and Waite).
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;

/// e^r for |r| ≤ ½ ln 2: Taylor series to degree 7, relative error < 1e-8.
#[inline(always)]
fn exp_reduced(r: f32) -> f32 {
    const C: [f32; 6] = [1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
    1.0 + r * (1.0 + r * (C[0] + r * (C[1] + r * (C[2] + r * (C[3] + r * (C[4] + r * C[5]))))))
}

/// e^x within a few ulp of libm: 0 for x below −87.34 (and −∞), saturating near 2^127 above
/// 88.7, NaN for NaN. e^x = 2^n · e^r with n = round(x / ln 2) and r = x − n ln 2.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let t = (x * LOG2_E).clamp(-126.0, 127.0);
    let shifted = t + ROUNDER;
    let n = shifted - ROUNDER;
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(ROUNDER_BITS).wrapping_add(127) << 23);
    let r = (x - n * LN2_HIGH) - n * LN2_LOW;
    let value = exp_reduced(r) * scale;
    if x < UNDERFLOW { 0.0 } else { value }
}

/// Σ `values`, in eight interleaved partial sums the compiler keeps in one vector register.
#[inline(always)]
pub fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out[i] = e^(x[i] − shift)`.
#[inline(always)]
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - shift);
    }
}

/// `values[i] = e^(values[i] − shift)`.
#[inline(always)]
pub fn exp_shifted_in_place(values: &mut [f32], shift: f32) {
    for v in values.iter_mut() {
        *v = exp(*v - shift);
    }
}

/// Σ e^(x[i] − shift), without a buffer the size of `x`.
#[inline(always)]
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    // A plain loop, not an iterator's `map(…).sum()`: that fold is a function of its own,
    // which is not inlined into the caller's wider instructions (`simd::widest!`).
    let mut buffer = [0f32; 256];
    let mut total = 0f32;
    for chunk in x.chunks(buffer.len()) {
        let out = &mut buffer[..chunk.len()];
        exp_shifted(chunk, shift, out);
        total += sum(out);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_f64_over_the_range_that_matters() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - exact).abs() / exact);
            x += 0.000_37;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_keeps_the_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(100.0) > 1e38);
    }

    #[test]
    fn sums_match_a_plain_sum() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let plain: f64 = x.iter().map(|&v| ((v - 5.0) as f64).exp()).sum();
        assert!((sum_exp_shifted(&x, 5.0) as f64 - plain).abs() / plain < 1e-5);
        assert!((sum(&x) as f64 - x.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-3);
    }
}
