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
        let problem = Problem {
            q: &q[l1.start_offset()..],
            k,
            v,
            k_rows: Rows::of(l2)?,
            v_rows: Rows::of(l3)?,
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
            for (j, score) in scores.iter_mut().enumerate() {
                *score = simd::dot(query, &self.k[self.k_rows.at(batch, kv, j)..][..d]);
            }
            let mask = self.mask.map(|m| {
                let mask_batch = if m.len() == t * keys { 0 } else { batch };
                &m[(mask_batch * t + token) * keys..][..keys]
            });
            super::fused::softmax_row(&scores, mask, self.scale, &mut probs);
            for (j, &p) in probs.iter().enumerate() {
                let value = &self.v[self.v_rows.at(batch, kv, j)..][..d];
                out.iter_mut().zip(value).for_each(|(o, &x)| *o += p * x);
            }
        }
        out
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
        let device = candle_core::Device::Cpu;
        let (b, heads, kv_heads, t, keys, d, capacity) = (3, 4, 2, 2, 9, 16, 12);
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
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max |Δ| {diff}");
    }
}
