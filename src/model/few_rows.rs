//! `y = x Wᵀ` for a few rows `x` (decoding: one row per sequence) against a contiguous `Wᵀ`
//! `[K, N]`. gemm packs and tiles for large products; with ≤ 8 rows each weight is read once,
//! straight from memory, with every row's sums kept in registers over all of `K`. Each output
//! is one chain of fused multiply-adds in the order of `K`, so a row's result does not depend
//! on how many rows come with it or on the thread count.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd::{self, Level};

/// Rows from which, and up to which, [`matmul`] applies. One row too: its product streams the
/// weight from memory, which both cores do faster than gemm's one-row product on one (split on
/// the spinning helper of [`super::team`]: bench-tiny's batch-1 decoding went from 1,570–1,690
/// to 2,030–2,270 tokens/s; without the helper, on rayon, it gained nothing).
pub const MIN_ROWS: usize = 1;
pub const MAX_ROWS: usize = 8;

/// Multiply-adds from which the columns are split between two threads: with the spinning
/// helper a 256 × 256 weight's one row already gains; waking a rayon worker pays from about 2¹⁹.
const PARALLEL_ON_HELPER: usize = 1 << 16;
const PARALLEL_ON_RAYON: usize = 1 << 19;

/// Whether [`product`] takes rows `x` `[M, K]` and a weight `w_t` `[K, N]`: CPU f32, no
/// gradient, both contiguous, `MIN_ROWS ≤ M ≤ MAX_ROWS`, and a CPU with AVX-512.
pub fn applies(x: &Tensor, w_t: &Tensor) -> bool {
    let plain = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op() && t.is_contiguous();
    let (Ok((m, k)), Ok((k2, _))) = (x.dims2(), w_t.dims2()) else { return false };
    simd::level() == Level::Avx512 && (MIN_ROWS..=MAX_ROWS).contains(&m) && k == k2 && plain(x) && plain(w_t)
}

/// `x w_t` for the operands [`applies`] takes.
pub fn product(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w_t, &FewRows)
}

struct FewRows;

impl CustomOp2 for FewRows {
    fn name(&self) -> &'static str {
        "few-rows-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else { bail!("few-rows-matmul: expected f32") };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            bail!("few-rows-matmul: expected contiguous operands")
        };
        let ((m, k), (_, n)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        match matmul(&x[x0..x1], &w[w0..w1], m, k, n) {
            Some(y) => Ok((CpuStorage::F32(y), Shape::from((m, n)))),
            None => bail!("few-rows-matmul: {m}×{k} · {k}×{n} is not for this kernel on this CPU"),
        }
    }
}

/// `y [M, N] = x [M, K] · w_t [K, N]`, all row-major and contiguous, `M ≤ MAX_ROWS`; `None`
/// on a CPU without AVX-512 (the caller's gemm does it there).
pub fn matmul(x: &[f32], w_t: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    if simd::level() != Level::Avx512 || m == 0 || m > MAX_ROWS || x.len() != m * k || w_t.len() != k * n {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Row j of `x_t` holds x[.., j]: one step of K reads one short run of it.
        let mut x_t = vec![0f32; k * m];
        for (i, row) in x.chunks_exact(k).enumerate() {
            for (j, &value) in row.iter().enumerate() {
                x_t[j * m + i] = value;
            }
        }
        let mut y = vec![0f32; m * n];
        let out = Out(y.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            // SAFETY: AVX-512 is there (checked above); the tasks write disjoint columns of
            // `y`, which outlives them, and every index stays within the sizes checked above.
            unsafe { avx512::columns(&x_t, w_t, m, k, n, range, out) }
        };
        // Two halves on whole 64-column tiles.
        let half = ((n / 2).div_ceil(64) * 64).min(n);
        if super::team::active() && m * k * n >= PARALLEL_ON_HELPER {
            super::team::join(|| run(0..half), || run(half..n));
        } else if m * k * n >= PARALLEL_ON_RAYON {
            [0..half, half..n].into_par_iter().for_each(run);
        } else {
            run(0..n);
        }
        Some(y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The output's first element, handed to the tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements and the buffer outlives them (see `matmul`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Out;

    const LANE: usize = 16;

    /// Rows of the weight fetched ahead of the one multiplied. Measured on bench-tiny's batch-8
    /// decoding (one thread, alternating runs): 16 rows into L1, 2,600–2,930 tokens/s; 24–64
    /// rows into L2, 3,390–4,210 (32 and 48 best); none, 2,050–2,380.
    const AHEAD: usize = 32;

    /// Columns `range` of `y`, in tiles of `V` registers' columns (fewer rows, wider tiles:
    /// enough independent sums to keep the multiply-add units busy), then single registers,
    /// then a masked last one.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns(x_t: &[f32], w_t: &[f32], m: usize, k: usize, n: usize, range: std::ops::Range<usize>, y: Out) {
        unsafe {
            match m {
                1 => tiles::<1, 8>(x_t, w_t, k, n, range, y),
                2 => tiles::<2, 6>(x_t, w_t, k, n, range, y),
                3 => tiles::<3, 6>(x_t, w_t, k, n, range, y),
                4 => tiles::<4, 4>(x_t, w_t, k, n, range, y),
                5 => tiles::<5, 4>(x_t, w_t, k, n, range, y),
                6 => tiles::<6, 3>(x_t, w_t, k, n, range, y),
                7 => tiles::<7, 3>(x_t, w_t, k, n, range, y),
                _ => tiles::<8, 3>(x_t, w_t, k, n, range, y),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tiles<const M: usize, const V: usize>(x_t: &[f32], w_t: &[f32], k: usize, n: usize, range: std::ops::Range<usize>, y: Out) {
        let mut col = range.start;
        unsafe {
            while col + V * LANE <= range.end {
                tile::<M, V>(x_t, w_t, k, n, col, 0xFFFF, y);
                col += V * LANE;
            }
            while col < range.end {
                let width = (range.end - col).min(LANE);
                tile::<M, 1>(x_t, w_t, k, n, col, ((1u32 << width) - 1) as u16, y);
                col += width;
            }
        }
    }

    /// `M` rows × `V` registers of columns from `col` (the last register's lanes as `mask`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize, const V: usize>(x_t: &[f32], w_t: &[f32], k: usize, n: usize, col: usize, mask: u16, y: Out) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; M];
            let (x, w) = (x_t.as_ptr(), w_t.as_ptr().add(col));
            for j in 0..k {
                let row = w.add(j * n);
                // The rows ahead, one line per register, into L2: a tile walks down its
                // columns, a stride the hardware prefetcher follows too late.
                if j + AHEAD < k {
                    for v in 0..V {
                        _mm_prefetch::<_MM_HINT_T1>(row.add(AHEAD * n + v * LANE) as *const i8);
                    }
                }
                let mut weights = [_mm512_setzero_ps(); V];
                for (v, weight) in weights.iter_mut().enumerate() {
                    *weight = if v + 1 == V { _mm512_maskz_loadu_ps(mask, row.add(v * LANE)) } else { _mm512_loadu_ps(row.add(v * LANE)) };
                }
                for (i, sums) in acc.iter_mut().enumerate() {
                    let xi = _mm512_set1_ps(*x.add(j * M + i));
                    for (sum, &weight) in sums.iter_mut().zip(&weights) {
                        *sum = _mm512_fmadd_ps(xi, weight, *sum);
                    }
                }
            }
            for (i, sums) in acc.iter().enumerate() {
                let out = y.0.add(i * n + col);
                for (v, &sum) in sums.iter().enumerate() {
                    if v + 1 == V {
                        _mm512_mask_storeu_ps(out.add(v * LANE), mask, sum);
                    } else {
                        _mm512_storeu_ps(out.add(v * LANE), sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        (0..rows * cols).map(|i| (((i as u64 + 1) * (seed * 2 + 1)) % 1009) as f32 / 504.5 - 1.0).collect()
    }

    #[test]
    fn matches_gemm_and_each_row_is_the_same_in_any_batch() {
        if simd::level() != Level::Avx512 {
            assert!(matmul(&[0.0; 4], &[0.0; 4], 2, 2, 2).is_none(), "only with AVX-512");
            return;
        }
        // Column counts with every kind of tile and tail; 8 × 256 × 300 runs on two threads.
        for (k, n) in [(256, 300), (64, 37), (33, 16), (7, 5)] {
            let w_t = random(k, n, 3);
            let x = random(MAX_ROWS, k, 5);
            let alone = matmul(&x[..k], &w_t, 1, k, n).unwrap();
            for m in 1..=MAX_ROWS {
                let ours = matmul(&x[..m * k], &w_t, m, k, n).unwrap();
                let gemm = Tensor::from_slice(&x[..m * k], (m, k), &Device::Cpu).unwrap().matmul(&Tensor::from_slice(&w_t, (k, n), &Device::Cpu).unwrap()).unwrap();
                let gemm: Vec<f32> = gemm.flatten_all().unwrap().to_vec1().unwrap();
                let diff = ours.iter().zip(&gemm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "{m}×{k}×{n}: differs from gemm by {diff}");
                assert_eq!(&ours[..n], &alone[..], "{m}×{k}×{n}: the first row changed with the batch");
            }
        }
    }

    #[test]
    fn applies_only_to_few_plain_rows() {
        let w_t = Tensor::zeros((16, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let rows = |m: usize| Tensor::zeros((m, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let avx512 = simd::level() == Level::Avx512;
        assert_eq!(applies(&rows(4), &w_t), avx512);
        assert_eq!(applies(&rows(1), &w_t), avx512);
        assert!(!applies(&rows(MAX_ROWS + 1), &w_t));
        let view = Tensor::zeros((32, 16), candle_core::DType::F32, &Device::Cpu).unwrap().t().unwrap();
        assert!(!applies(&rows(4), &view), "a transposed view");
        let y = product(&rows(4), &w_t);
        assert_eq!(y.is_ok(), avx512);
    }
}
