//! Attention for decoding's shape: a few new queries per step against the KV cache, no
//! gradient. One pass per (sequence, KV head) replaces two batched matmuls of one row each
//! (a gemm call per head), the softmax, and the transpose back. Every output sums over the
//! keys in order, whatever the batch and thread count, so a sequence decodes to the same
//! logits alone or in a batch.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::simd;

/// Query rows per KV head (the group's heads × new tokens) up to which [`attention`] runs;
/// a prompt's prefill goes to the batched matmuls.
pub const MAX_QUERY_ROWS: usize = 16;

/// Multiply-adds (queries × keys × head size) below which one thread does all of a step's
/// attention: waking the other costs more.
const SERIAL_ATTENTION: usize = 1 << 17;

/// Whether [`attention`] takes queries `q` `[B, heads, T, D]` and keys `k` `[B, kv_heads, keys, D]`.
pub fn attention_applies(q: &Tensor, k: &Tensor) -> bool {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    let (Ok((_, heads, t, _)), Ok((_, kv_heads, _, _))) = (q.dims4(), k.dims4()) else { return false };
    cpu_f32(q) && cpu_f32(k) && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads * t <= MAX_QUERY_ROWS
}

/// `softmax(scale · q kᵀ + mask) v` for `q` `[B, heads, T, D]`, keys and values
/// `[B, kv_heads, keys, D]` (views of the cache: each key's row contiguous) and an additive
/// `mask` `[1 or B, T, keys]`. Returns `[B, T, heads, D]`, the layout `o_proj` reads.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let mask = match mask {
        Some(mask) if mask.dims() == [1, t, keys] || mask.dims() == [b, t, keys] => Some(mask.flatten_all()?.to_vec1::<f32>()?),
        Some(mask) => bail!("attention mask {:?} does not fit {t} queries over {keys} keys", mask.dims()),
        None => None,
    };
    q.contiguous()?.apply_op3_no_bwd(k, v, &CachedAttention { scale: scale as f32, mask })
}

struct CachedAttention {
    scale: f32,
    /// `[1 or B, T, keys]`.
    mask: Option<Vec<f32>>,
}

/// Where a `[B, H, N, D]` view's rows lie: element `[b, h, j, e]` is at
/// `start + b·batch + h·head + j·row + e`.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl Rows {
    fn of(layout: &Layout) -> Result<Self> {
        match layout.stride() {
            &[batch, head, row, 1] => Ok(Rows { start: layout.start_offset(), batch, head, row }),
            strides => bail!("cached-attention: rows must be contiguous, got strides {strides:?}"),
        }
    }

    fn at(&self, b: usize, h: usize, j: usize) -> usize {
        self.start + b * self.batch + h * self.head + j * self.row
    }

    /// Whether every row of `d` values of a `[b, heads, keys, d]` view lies within `len`.
    fn within(&self, (b, heads, keys, d): (usize, usize, usize, usize), len: usize) -> bool {
        b == 0 || heads == 0 || keys == 0 || self.at(b - 1, heads - 1, keys - 1) + d <= len
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            bail!("cached-attention: expected f32 tensors")
        };
        let ((b, heads, t, d), (_, kv_heads, keys, _)) = (l1.shape().dims4()?, l2.shape().dims4()?);
        if l3.dims() != l2.dims() || l2.dims()[3] != d || l2.dims()[0] != b {
            bail!("cached-attention: q {:?}, k {:?} and v {:?} do not fit", l1.dims(), l2.dims(), l3.dims())
        }
        let (k_rows, v_rows) = (Rows::of(l2)?, Rows::of(l3)?);
        if !k_rows.within((b, kv_heads, keys, d), k.len()) || !v_rows.within((b, kv_heads, keys, d), v.len()) {
            bail!("cached-attention: the keys or values {:?} run past their storage", l2.dims())
        }
        let problem = Problem {
            q: &q[l1.start_offset()..],
            k,
            v,
            k_rows,
            v_rows,
            heads,
            kv_heads,
            t,
            d,
            keys,
            scale: self.scale,
            mask: self.mask.as_deref(),
        };
        let tasks = b * kv_heads;
        let group = |index: usize| simd::widest!({ problem.group(index) });
        let parts: Vec<Vec<f32>> = if tasks > 1 && b * heads * t * keys * d >= SERIAL_ATTENTION {
            if super::team::active() {
                let half = tasks / 2;
                let (mut first, second) = super::team::join(|| (0..half).map(group).collect::<Vec<_>>(), || (half..tasks).map(group).collect::<Vec<_>>());
                first.extend(second);
                first
            } else {
                (0..tasks).into_par_iter().map(group).collect()
            }
        } else {
            (0..tasks).map(group).collect()
        };
        let groups = heads / kv_heads;
        let mut y = vec![0f32; b * t * heads * d];
        for (index, part) in parts.iter().enumerate() {
            let (batch, kv) = (index / kv_heads, index % kv_heads);
            for (row, values) in part.chunks_exact(d).enumerate() {
                let (head, token) = (kv * groups + row / t, row % t);
                y[((batch * t + token) * heads + head) * d..][..d].copy_from_slice(values);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, t, heads, d))))
    }
}

/// One step's attention: queries `[B, heads, T, D]`, the cache's keys and values, the mask.
struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    k_rows: Rows,
    v_rows: Rows,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
    keys: usize,
    scale: f32,
    /// `[1 or B, T, keys]`.
    mask: Option<&'a [f32]>,
}

impl Problem<'_> {
    /// The outputs `[groups · T, D]` of the query heads that share KV head `index % kv_heads`
    /// of sequence `index / kv_heads`.
    #[inline(always)]
    fn group(&self, index: usize) -> Vec<f32> {
        let (batch, kv) = (index / self.kv_heads, index % self.kv_heads);
        let (t, d, keys) = (self.t, self.d, self.keys);
        let groups = self.heads / self.kv_heads;
        let mut out = vec![0f32; groups * t * d];
        let mut scores = vec![0f32; keys];
        let mut probs = vec![0f32; keys];
        for (row, out) in out.chunks_exact_mut(d).enumerate() {
            let (head, token) = (kv * groups + row / t, row % t);
            let query = &self.q[((batch * self.heads + head) * t + token) * d..][..d];
            let mask = self.mask.map(|m| {
                let mask_batch = if m.len() == t * keys { 0 } else { batch };
                &m[(mask_batch * t + token) * keys..][..keys]
            });
            #[cfg(target_arch = "x86_64")]
            if avx512::fits(d) {
                // SAFETY: `fits` checked AVX-512 and the head size; every key and value row
                // of this (sequence, KV head) lies within the cache (checked by the caller).
                unsafe { avx512::scores(query, self.k, self.k_rows, batch, kv, &mut scores) };
                super::fused::softmax_row(&scores, mask, self.scale, &mut probs);
                unsafe { avx512::weighted_values(&probs, self.v, self.v_rows, batch, kv, out) };
                continue;
            }
            for (j, score) in scores.iter_mut().enumerate() {
                *score = simd::dot(query, &self.k[self.k_rows.at(batch, kv, j)..][..d]);
            }
            super::fused::softmax_row(&scores, mask, self.scale, &mut probs);
            for (j, &p) in probs.iter().enumerate() {
                let value = &self.v[self.v_rows.at(batch, kv, j)..][..d];
                out.iter_mut().zip(value).for_each(|(o, &x)| *o += p * x);
            }
        }
        out
    }
}

/// Decoding's attention rows with the head in registers: a block of 16 keys' dot products
/// reduced together by shuffles (one at a time, each key's horizontal sum was most of the
/// step's attention), and the weighted values summed in registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Rows;
    use crate::model::simd::{self, Level};

    const LANE: usize = 16;
    /// Head sizes up to this many registers (256 values).
    const MAX_CHUNKS: usize = 16;

    /// `$kernel::<C>($args)` for a head of `C` registers, `$chunks` of them (1 to 16).
    macro_rules! by_chunks {
        ($chunks:expr, $kernel:ident, $($arg:expr),*) => {
            match $chunks {
                1 => $kernel::<1>($($arg),*),
                2 => $kernel::<2>($($arg),*),
                3 => $kernel::<3>($($arg),*),
                4 => $kernel::<4>($($arg),*),
                5 => $kernel::<5>($($arg),*),
                6 => $kernel::<6>($($arg),*),
                7 => $kernel::<7>($($arg),*),
                8 => $kernel::<8>($($arg),*),
                9 => $kernel::<9>($($arg),*),
                10 => $kernel::<10>($($arg),*),
                11 => $kernel::<11>($($arg),*),
                12 => $kernel::<12>($($arg),*),
                13 => $kernel::<13>($($arg),*),
                14 => $kernel::<14>($($arg),*),
                15 => $kernel::<15>($($arg),*),
                _ => $kernel::<16>($($arg),*),
            }
        };
    }

    /// Whether these kernels take heads of `d` values on this CPU.
    pub(super) fn fits(d: usize) -> bool {
        d > 0 && d.is_multiple_of(LANE) && d / LANE <= MAX_CHUNKS && simd::level() == Level::Avx512
    }

    /// `scores[j] = query · key j` for the keys of (`batch`, `kv`), `scores.len()` of them.
    ///
    /// # Safety
    /// AVX-512 is there ([`fits`]), and every key row is within `k`.
    pub(super) unsafe fn scores(query: &[f32], k: &[f32], rows: Rows, batch: usize, kv: usize, scores: &mut [f32]) {
        unsafe { by_chunks!(query.len() / LANE, scores_of, query, k, rows, batch, kv, scores) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn scores_of<const C: usize>(query: &[f32], k: &[f32], rows: Rows, batch: usize, kv: usize, scores: &mut [f32]) {
        let keys = scores.len();
        unsafe {
            let q: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(query.as_ptr().add(c * LANE)));
            let base = k.as_ptr();
            let mut first = 0;
            while first < keys {
                let count = (keys - first).min(LANE);
                let mut sums = [_mm512_setzero_ps(); LANE];
                for (i, sum) in sums[..count].iter_mut().enumerate() {
                    let key = base.add(rows.at(batch, kv, first + i));
                    let mut acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
                    for (c, &qc) in q.iter().enumerate().skip(1) {
                        acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(key.add(c * LANE)), acc);
                    }
                    *sum = acc;
                }
                let lanes = ((1u32 << count) - 1) as u16;
                _mm512_mask_storeu_ps(scores.as_mut_ptr().add(first), lanes, horizontal_sums(&sums));
                first += count;
            }
        }
    }

    /// Lane `i` of the result is the sum of the lanes of `v[i]`: a transposing tree of adds.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn horizontal_sums(v: &[__m512; LANE]) -> __m512 {
        // Within each 128-bit quarter: [a0+a2, b0+b2, a1+a3, b1+b3] for pairs (a, b).
        let pairs: [__m512; 8] =
            std::array::from_fn(|i| _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1])));
        // Within each quarter: the quarter's sums of four vectors in order.
        let fours: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
        });
        // Quarters paired up: (0 + 1, 2 + 3) of two groups of four.
        let eights: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (fours[2 * i], fours[2 * i + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
        });
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(eights[0], eights[1]), _mm512_shuffle_f32x4::<0xDD>(eights[0], eights[1]))
    }

    /// `out = Σ_j probs[j] · value j` for the values of (`batch`, `kv`).
    ///
    /// # Safety
    /// As [`scores`], for `out` (`d` values) and the value rows in `v`.
    pub(super) unsafe fn weighted_values(probs: &[f32], v: &[f32], rows: Rows, batch: usize, kv: usize, out: &mut [f32]) {
        unsafe { by_chunks!(out.len() / LANE, weighted_values_of, probs, v, rows, batch, kv, out) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values_of<const C: usize>(probs: &[f32], v: &[f32], rows: Rows, batch: usize, kv: usize, out: &mut [f32]) {
        let keys = probs.len();
        unsafe {
            // Even and odd keys in separate sums: twice the independent chains of multiply-adds.
            let (mut even, mut odd) = ([_mm512_setzero_ps(); C], [_mm512_setzero_ps(); C]);
            let base = v.as_ptr();
            let mut j = 0;
            while j + 1 < keys {
                let (p0, p1) = (_mm512_set1_ps(*probs.get_unchecked(j)), _mm512_set1_ps(*probs.get_unchecked(j + 1)));
                let (v0, v1) = (base.add(rows.at(batch, kv, j)), base.add(rows.at(batch, kv, j + 1)));
                for c in 0..C {
                    even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0.add(c * LANE)), even[c]);
                    odd[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1.add(c * LANE)), odd[c]);
                }
                j += 2;
            }
            if j < keys {
                let (p, row) = (_mm512_set1_ps(*probs.get_unchecked(j)), base.add(rows.at(batch, kv, j)));
                for (c, sum) in even.iter_mut().enumerate() {
                    *sum = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(c * LANE)), *sum);
                }
            }
            for c in 0..C {
                _mm512_storeu_ps(out.as_mut_ptr().add(c * LANE), _mm512_add_ps(even[c], odd[c]));
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn horizontal_sums_put_each_vectors_sum_in_its_lane() {
            if simd::level() != Level::Avx512 {
                return;
            }
            let values: Vec<[f32; LANE]> = (0..LANE).map(|i| std::array::from_fn(|l| ((i * 31 + l * 7) % 23) as f32 - 11.0)).collect();
            // SAFETY: AVX-512 checked above.
            let got: [f32; LANE] = unsafe {
                let registers: [__m512; LANE] = std::array::from_fn(|i| _mm512_loadu_ps(values[i].as_ptr()));
                std::mem::transmute(horizontal_sums(&registers))
            };
            let want: Vec<f32> = values.iter().map(|v| v.iter().sum()).collect();
            assert_eq!(got.to_vec(), want);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn cached_attention_matches_matmuls_and_softmax_over_a_grouped_strided_cache() {
        // Head sizes for the AVX-512 kernels (16, 64, 256) and for the portable loop (20); key
        // counts below, at and past a block of 16.
        for (d, keys) in [(16, 9), (64, 16), (64, 37), (256, 5), (20, 9)] {
            let (b, heads, kv_heads, t, capacity) = (3, 4, 2, 2, keys + 3);
            let device = candle_core::Device::Cpu;
            let tensor = |shape: &[usize], seed| Tensor::from_vec(values(shape.iter().product(), seed), shape, &device).unwrap();
            let q = tensor(&[b, heads, t, d], 7);
            // Keys and values are the first `keys` positions of larger buffers, as the cache holds them.
            let k = tensor(&[b, kv_heads, capacity, d], 8).narrow(2, 0, keys).unwrap();
            let v = tensor(&[b, kv_heads, capacity, d], 9).narrow(2, 0, keys).unwrap();
            let mask = (tensor(&[b, t, keys], 10).ge(0.5).unwrap().to_dtype(DType::F32).unwrap() * -1e9).unwrap();
            let scale = 0.25;
            assert!(attention_applies(&q, &k));
            let got = attention(&q, &k, &v, Some(&mask), scale).unwrap();
            let groups = heads / kv_heads;
            let expand = |x: &Tensor| {
                x.unsqueeze(2).unwrap().repeat((1, 1, groups, 1, 1)).unwrap().reshape((b, heads, keys, d)).unwrap()
            };
            let scores = (q.matmul(&expand(&k).t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask.unsqueeze(1).unwrap()).unwrap();
            let probs = super::super::ops::composite::softmax_last_dim(&scores).unwrap();
            let want = probs.matmul(&expand(&v)).unwrap().transpose(1, 2).unwrap();
            let diff = (&got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "d {d}, {keys} keys: max |Δ| {diff}");
            // The last sequence alone gets the same bits as in the batch.
            let last = |x: &Tensor| x.narrow(0, b - 1, 1).unwrap();
            let alone = attention(&last(&q).contiguous().unwrap(), &last(&k), &last(&v), Some(&last(&mask)), scale).unwrap();
            assert_eq!(alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(), last(&got).flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
}
