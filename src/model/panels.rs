//! An inference weight packed in panels of [`PANEL`] columns, and its product `x Wᵀ` for any
//! number of rows.
//!
//! Decoding multiplies a few rows by every weight, so its speed is how fast the weights stream
//! in. Stored as `Wᵀ` `[K, N]`, a tile of columns walks down the rows with a stride of `N`, and
//! eight rows' tiles (batch-8 decoding) read it at 32–37 GB/s on two cores; the same tile over
//! a panel, whose `K × PANEL` values lie one after another, reads at 50–51 GB/s (bench-tiny's
//! 17 MB of weights, measured here). Prefill's many rows run over the same panels, eight at a
//! time while a panel stays in L2, at about gemm's speed.
//!
//! Each output is one chain of fused multiply-adds in the order of `K`, so a row's result does
//! not depend on how many rows come with it, on the thread count, or on whether it is
//! decoded or prefilled.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd::{self, Level};

/// Columns per panel: three AVX-512 registers, the widest tile eight rows' sums leave
/// registers for.
pub const PANEL: usize = 48;
/// Rows multiplied together: each weight value loaded once serves all of them.
const BLOCK_ROWS: usize = 8;
/// Bytes of rows that one pass over the panels reads: a pass streams
/// the weight once, so prefill streams it once per this many bytes of input, from L2.
const ROWS_PER_PASS_BYTES: usize = 256 << 10;

/// Panel rows fetched into L2 ahead of the one multiplied: the hardware prefetcher follows
/// a panel's sequential reads, this keeps it ahead (AVX-512, bench-tiny's weights at batch 8,
/// two threads: none 46, 4 rows 50, 8 rows 51 GB/s).
const AHEAD: usize = 8;

/// Multiply-adds from which the panels are split between two threads: with the spinning
/// helper a 256 × 256 weight's one row already gains; waking a rayon worker pays from about 2¹⁹.
const PARALLEL_ON_HELPER: usize = 1 << 16;
const PARALLEL_ON_RAYON: usize = 1 << 19;

/// `Wᵀ` `[K, N]` in panels: panel `p` holds columns `p·PANEL ..` for rows `0..K`, row after
/// row; the last panel is padded with zeros.
pub struct Panels {
    values: Vec<f32>,
    k: usize,
    n: usize,
    /// The kernel's instructions: AVX-512 or AVX2 + FMA.
    level: Level,
}

impl Panels {
    /// `weight` `[N, K]` (a linear layer's, out × in) packed; `None` where the kernels do not
    /// run (not CPU f32, or a CPU without AVX2 and FMA), so the caller keeps a plain `Wᵀ`.
    pub fn pack(weight: &Tensor) -> Result<Option<Self>> {
        let level = simd::level();
        if level == Level::Baseline || !weight.device().is_cpu() || weight.dtype() != DType::F32 {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        if n == 0 || k == 0 {
            return Ok(None);
        }
        let rows = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut values = vec![0f32; n.div_ceil(PANEL) * PANEL * k];
        values.par_chunks_mut(PANEL * k).enumerate().for_each(|(p, panel)| {
            // Reads run along the weight's rows; the writes stay within one panel (in L2).
            for c in 0..PANEL.min(n - p * PANEL) {
                let row = &rows[(p * PANEL + c) * k..][..k];
                for (j, &value) in row.iter().enumerate() {
                    panel[j * PANEL + c] = value;
                }
            }
        });
        Ok(Some(Panels { values, k, n, level }))
    }

    /// `N`, the output features.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `x Wᵀ` `[M, N]` for rows `x` `[M, K]` (CPU f32). No gradient flows: for inference
    /// decoders, whose tensors record no graph.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(&Product(self))
    }

    /// `y [M, N] = x [M, K] · Wᵀ`, `x` row-major and contiguous.
    fn multiply(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let blocks = m.div_ceil(BLOCK_ROWS);
        let mut y = vec![0f32; m * n];
        let out = Out(y.as_mut_ptr());
        let panels = n.div_ceil(PANEL);
        let blocks_per_pass = (ROWS_PER_PASS_BYTES / (BLOCK_ROWS * k * 4)).max(1);
        let run = |range: std::ops::Range<usize>| {
            for first in (0..blocks).step_by(blocks_per_pass) {
                let last = (first + blocks_per_pass).min(blocks);
                for p in range.clone() {
                    for b in first..last {
                        let rows = BLOCK_ROWS.min(m - b * BLOCK_ROWS);
                        let at = At { y: out, n, row: b * BLOCK_ROWS, col: p * PANEL };
                        let (x, panel) = (&x[b * BLOCK_ROWS * k..][..rows * k], &self.values[p * PANEL * k..][..PANEL * k]);
                        // The pass's last block fetches the task's next panel meanwhile.
                        let next = (b + 1 == last && p + 1 < range.end).then(|| &self.values[(p + 1) * PANEL * k..][..PANEL * k]);
                        // SAFETY: the CPU has the kernel's instructions (checked by `pack`); the
                        // tasks write disjoint panels' columns of `y`, which outlives them; the
                        // block and the panel lie within `x` and `values` by the sizes above.
                        unsafe {
                            match self.level {
                                Level::Avx512 => avx512::tile(rows, x, panel, k, at),
                                _ => avx2::tile(rows, x, panel, next, k, at),
                            }
                        }
                    }
                }
            }
        };
        let half = panels.div_ceil(2);
        // The spinning helper is for decoding's short products; prefill's long ones go to rayon,
        // whose workers the attention and other ops between them use too (a helper spinning
        // beside them would take their core).
        if m <= BLOCK_ROWS && m * k * n >= PARALLEL_ON_HELPER && super::team::active() {
            super::team::join(|| run(0..half), || run(half..panels));
        } else if m * k * n >= PARALLEL_ON_RAYON {
            [0..half, half..panels].into_par_iter().for_each(run);
        } else {
            run(0..panels);
        }
        y
    }
}

struct Product<'a>(&'a Panels);

impl CustomOp1 for Product<'_> {
    fn name(&self) -> &'static str {
        "panels-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = storage else { bail!("panels-matmul: expected f32 rows") };
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("panels-matmul: expected contiguous rows") };
        let (m, k) = layout.shape().dims2()?;
        if k != self.0.k {
            bail!("panels-matmul: rows of {k} features against a weight of {}", self.0.k)
        }
        Ok((CpuStorage::F32(self.0.multiply(&x[start..end], m)), Shape::from((m, self.0.n))))
    }
}

/// The output's first element, handed to the tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);

/// Where a tile's sums go: row `row` and column `col` of the output `y`, `n` columns wide.
#[derive(Clone, Copy)]
struct At {
    y: Out,
    n: usize,
    row: usize,
    col: usize,
}
// SAFETY: tasks write disjoint elements and the buffer outlives them (see `multiply`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{AHEAD, At, PANEL};

    const LANE: usize = 16;
    const REGISTERS: usize = PANEL / LANE;

    /// A block of `rows ≤ 8` rows of `x` (`k` each) and the panel's `k × PANEL` values. Each step of `k`
    /// reads one value of every row: eight streams whose lines stay in L1 for 16 steps. The sums
    /// go to `at`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(rows: usize, x: &[f32], panel: &[f32], k: usize, at: At) {
        unsafe {
            match rows {
                1 => block::<1>(x, panel, k, at),
                2 => block::<2>(x, panel, k, at),
                3 => block::<3>(x, panel, k, at),
                4 => block::<4>(x, panel, k, at),
                5 => block::<5>(x, panel, k, at),
                6 => block::<6>(x, panel, k, at),
                7 => block::<7>(x, panel, k, at),
                _ => block::<8>(x, panel, k, at),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const M: usize>(x: &[f32], panel: &[f32], k: usize, at: At) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); REGISTERS]; M];
            let (x, w) = (x.as_ptr(), panel.as_ptr());
            for j in 0..k {
                let row = w.add(j * PANEL);
                if j + AHEAD < k {
                    for v in 0..REGISTERS {
                        _mm_prefetch::<_MM_HINT_T1>(row.add(AHEAD * PANEL + v * LANE) as *const i8);
                    }
                }
                let mut weights = [_mm512_setzero_ps(); REGISTERS];
                for (v, weight) in weights.iter_mut().enumerate() {
                    *weight = _mm512_loadu_ps(row.add(v * LANE));
                }
                for (i, sums) in acc.iter_mut().enumerate() {
                    let xi = _mm512_set1_ps(*x.add(i * k + j));
                    for (sum, &weight) in sums.iter_mut().zip(&weights) {
                        *sum = _mm512_fmadd_ps(xi, weight, *sum);
                    }
                }
            }
            // The last panel's padding columns are not stored.
            let masks: [u16; REGISTERS] = std::array::from_fn(|v| {
                let width = at.n.saturating_sub(at.col + v * LANE).min(LANE);
                ((1u32 << width) - 1) as u16
            });
            for (i, sums) in acc.iter().enumerate() {
                let out = at.y.0.add((at.row + i) * at.n + at.col);
                for (v, &sum) in sums.iter().enumerate() {
                    if masks[v] == u16::MAX {
                        _mm512_storeu_ps(out.add(v * LANE), sum);
                    } else {
                        _mm512_mask_storeu_ps(out.add(v * LANE), masks[v], sum);
                    }
                }
            }
        }
    }
}

/// The same tiles with AVX2's sixteen 8-float registers: a block's rows go four at a time
/// over each half of the panel (twelve sums, three weights and a broadcast value), a single
/// row over the whole panel at once. Every output is the same chain of fused multiply-adds as
/// on AVX-512, so both give the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{AHEAD, At, PANEL};

    const LANE: usize = 8;

    /// As AVX-512's `tile`; `next`, the panel multiplied after this one, is fetched into L2
    /// a little at each step, so that the passes over this panel from L2 overlap the next
    /// one's reads from memory.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(rows: usize, x: &[f32], panel: &[f32], next: Option<&[f32]>, k: usize, at: At) {
        unsafe {
            if rows == 1 {
                return part::<1, { PANEL / LANE }>(x, panel, k, at, 0, Fetch::new(next, 0, 1));
            }
            let passes = rows.div_ceil(4) * 2;
            for (quad, first) in (0..rows).step_by(4).enumerate() {
                let x = &x[first * k..];
                let at = At { row: at.row + first, ..at };
                for (h, half) in [0, PANEL / 2].into_iter().enumerate() {
                    let fetch = Fetch::new(next, quad * 2 + h, passes);
                    if at.col + half >= at.n {
                        // The last panel's second half is all padding.
                        continue;
                    }
                    match rows - first {
                        1 => part::<1, 3>(x, panel, k, at, half, fetch),
                        2 => part::<2, 3>(x, panel, k, at, half, fetch),
                        3 => part::<3, 3>(x, panel, k, at, half, fetch),
                        _ => part::<4, 3>(x, panel, k, at, half, fetch),
                    }
                }
            }
        }
    }

    /// The share of the next panel that one of a tile's passes fetches: its lines from
    /// `from` on, `per_step` bytes for each step of `k`.
    #[derive(Clone, Copy)]
    struct Fetch {
        from: *const i8,
        per_step: usize,
    }

    impl Fetch {
        fn new(next: Option<&[f32]>, pass: usize, passes: usize) -> Self {
            match next {
                Some(next) => {
                    let per_step = PANEL * 4 / passes;
                    let k = next.len() / PANEL;
                    Fetch { from: next.as_ptr().cast::<i8>().wrapping_add(pass * per_step * k), per_step }
                }
                None => Fetch { from: std::ptr::null(), per_step: 0 },
            }
        }

        /// Fetches step `j`'s lines.
        #[inline(always)]
        unsafe fn step(self, j: usize) {
            if self.from.is_null() {
                return;
            }
            let (lo, hi) = ((j * self.per_step).div_ceil(64), ((j + 1) * self.per_step).div_ceil(64));
            for line in lo..hi {
                unsafe { _mm_prefetch::<_MM_HINT_T1>(self.from.wrapping_add(line * 64)) };
            }
        }
    }

    /// `M` rows times the panel's columns `from .. from + 8·V`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn part<const M: usize, const V: usize>(x: &[f32], panel: &[f32], k: usize, at: At, from: usize, fetch: Fetch) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); V]; M];
            let (x, w) = (x.as_ptr(), panel.as_ptr().add(from));
            for j in 0..k {
                let row = w.add(j * PANEL);
                if j + AHEAD < k {
                    for v in (0..V).step_by(2) {
                        _mm_prefetch::<_MM_HINT_T1>(row.add(AHEAD * PANEL + v * LANE) as *const i8);
                    }
                }
                fetch.step(j);
                let mut weights = [_mm256_setzero_ps(); V];
                for (v, weight) in weights.iter_mut().enumerate() {
                    *weight = _mm256_loadu_ps(row.add(v * LANE));
                }
                for (i, sums) in acc.iter_mut().enumerate() {
                    let xi = _mm256_set1_ps(*x.add(i * k + j));
                    for (sum, &weight) in sums.iter_mut().zip(&weights) {
                        *sum = _mm256_fmadd_ps(xi, weight, *sum);
                    }
                }
            }
            // The last panel's padding columns are not stored.
            let width = at.n.saturating_sub(at.col + from).min(V * LANE);
            for (i, sums) in acc.iter().enumerate() {
                let out = at.y.0.add((at.row + i) * at.n + at.col + from);
                if width == V * LANE {
                    for (v, &sum) in sums.iter().enumerate() {
                        _mm256_storeu_ps(out.add(v * LANE), sum);
                    }
                } else {
                    let mut spill = [0f32; PANEL];
                    for (v, &sum) in sums.iter().enumerate() {
                        _mm256_storeu_ps(spill.as_mut_ptr().add(v * LANE), sum);
                    }
                    std::ptr::copy_nonoverlapping(spill.as_ptr(), out, width);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let values: Vec<f32> = (0..rows * cols).map(|i| (((i as u64 + 1) * (seed * 2 + 1)) % 1009) as f32 / 504.5 - 1.0).collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_gemm_and_each_row_is_the_same_in_any_batch() {
        let Some(_) = Panels::pack(&random(2, 2, 1)).unwrap() else {
            assert_eq!(simd::level(), Level::Baseline, "packs wherever AVX2 is");
            return;
        };
        // Column counts with full and padded last panels; rows in whole and partial blocks,
        // past one pass (k = 256: 16 blocks a pass), on one thread and on two.
        for (k, n) in [(256, 300), (64, 37), (33, 48), (7, 5), (256, 96)] {
            let weight = random(n, k, 3);
            let panels = Panels::pack(&weight).unwrap().unwrap();
            assert_eq!(panels.out_features(), n);
            let x = random(300, k, 5);
            let alone: Vec<f32> = panels.product(&x.narrow(0, 0, 1).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for m in [1, 2, 7, 8, 9, 17, 300] {
                let rows = x.narrow(0, 0, m).unwrap();
                let ours: Vec<f32> = panels.product(&rows).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let gemm: Vec<f32> = rows.matmul(&weight.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let diff = ours.iter().zip(&gemm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "{m}×{k}×{n}: differs from gemm by {diff}");
                assert_eq!(&ours[..n], &alone[..], "{m}×{k}×{n}: the first row changed with the batch");
            }
        }
    }

    #[test]
    fn rejects_rows_of_another_width() {
        let Some(panels) = Panels::pack(&random(16, 32, 1)).unwrap() else { return };
        assert!(panels.product(&random(4, 16, 2)).is_err());
        // A transposed view is made contiguous by nobody: the op says so rather than misread it.
        assert!(panels.product(&random(32, 4, 2).t().unwrap()).is_err());
    }
}
