//! Fused CPU kernels with a real backward, each forward and backward side by side (as llm.c
//! writes them) and checked against the composite version in [`super::ops`] by the tests below.
//!
//! A chain of small candle ops walks memory once per op and allocates once per op; these walk
//! it once. Rows are processed in parallel; every reduction runs in a fixed order, so results
//! do not depend on the thread count's scheduling (exact resume needs that).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::family::Activation;
use super::{fastexp, simd};

/// Fused kernels run on CPU f32 tensors; other devices use the composite ops.
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: expected f32") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

fn u32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else { bail!("{op}: expected u32 targets") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected contiguous targets"),
    }
}

/// Run `f` on the f32 contents of a (made contiguous) CPU tensor.
fn with_data<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(slice(cpu, layout, op)?),
        _ => bail!("{op}: expected a CPU tensor"),
    }
}

/// `n` floats from `write`, which must set every one. They are not zero-filled first: on a
/// reused allocation that `memset` was about 3% of the bench-tiny training step.
fn written(n: usize, write: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(n);
    // SAFETY: the capacity is `n` floats, handed to `write` before anything reads them (as
    // candle's own `unary_map` hands out its spare capacity); any bit pattern is an f32.
    write(unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr(), n) });
    // SAFETY: `write` set all `n`.
    unsafe { buffer.set_len(n) };
    buffer
}

fn tensor(values: Vec<f32>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape.clone(), like.device())
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------- softmax (scaled, masked)

/// `softmax(scale·x + mask)` over the last dimension. `mask` rows are `[mask_batches, t, keys]`
/// and broadcast over the `rows_per_batch / t` head rows of each batch.
#[derive(Clone, Copy)]
struct AttentionSoftmax {
    scale: f32,
    t: usize,
    rows_per_batch: usize,
    mask_batches: usize,
}

#[inline(always)]
pub(super) fn softmax_row(x: &[f32], mask: Option<&[f32]>, scale: f32, y: &mut [f32]) {
    match mask {
        Some(mask) => y.iter_mut().zip(x).zip(mask).for_each(|((yj, &xj), &mj)| *yj = scale * xj + mj),
        None => y.iter_mut().zip(x).for_each(|(yj, &xj)| *yj = scale * xj),
    }
    let max = simd::max(y);
    fastexp::exp_shifted_in_place(y, max);
    let inverse = 1.0 / fastexp::sum(y);
    y.iter_mut().for_each(|yj| *yj *= inverse);
}

/// `dx = scale · y ⊙ (dy − Σ dy⊙y)`
#[inline(always)]
fn softmax_row_backward(y: &[f32], dy: &[f32], scale: f32, dx: &mut [f32]) {
    let dot = simd::dot(y, dy);
    for ((dxj, &yj), &dyj) in dx.iter_mut().zip(y).zip(dy) {
        *dxj = scale * yj * (dyj - dot);
    }
}

impl AttentionSoftmax {
    fn forward(&self, x: &[f32], mask: Option<&[f32]>, keys: usize) -> Vec<f32> {
        let per_task = rows_per_task(keys);
        written(x.len(), |y| {
            y.par_chunks_mut(keys * per_task)
                .zip(x.par_chunks(keys * per_task))
                .enumerate()
                .for_each(|(task, (y, x))| simd::widest!({
                    for (i, (y, x)) in y.chunks_mut(keys).zip(x.chunks(keys)).enumerate() {
                        let row = task * per_task + i;
                        let mask_row = mask.map(|m| {
                            let batch = if self.mask_batches == 1 { 0 } else { row / self.rows_per_batch };
                            let at = (batch * self.t + row % self.t) * keys;
                            &m[at..at + keys]
                        });
                        softmax_row(x, mask_row, self.scale, y);
                    }
                }))
        })
    }

    fn backward(&self, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let keys = res.dim(candle_core::D::Minus1)?;
        with_data(res, "softmax backward", |y| {
            with_data(grad, "softmax backward", |dy| {
                let per_task = rows_per_task(keys);
                let dx = written(y.len(), |dx| {
                    dx.par_chunks_mut(keys * per_task)
                        .zip(y.par_chunks(keys * per_task).zip(dy.par_chunks(keys * per_task)))
                        .for_each(|(dx, (y, dy))| simd::widest!({
                            for ((dx, y), dy) in dx.chunks_mut(keys).zip(y.chunks(keys)).zip(dy.chunks(keys)) {
                                softmax_row_backward(y, dy, self.scale, dx);
                            }
                        }))
                });
                tensor(dx, res.shape(), res)
            })
        })
    }
}

struct ScaledSoftmax(AttentionSoftmax);

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let keys = layout.dims().last().copied().unwrap_or(1);
        Ok((CpuStorage::F32(self.0.forward(x, None, keys)), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.0.backward(res, grad).map(Some)
    }
}

struct MaskedSoftmax(AttentionSoftmax);

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-scaled-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let mask = slice(s2, l2, self.name())?;
        let keys = l1.dims().last().copied().unwrap_or(1);
        Ok((CpuStorage::F32(self.0.forward(x, Some(mask), keys)), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _mask: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.backward(res, grad)?), None))
    }
}

/// `softmax(scale·scores + mask)` over the last dimension of `scores` `[B, …, T, keys]`;
/// `mask` is `[1 or B, T, keys]`, shared by every head row of a batch entry.
pub fn attention_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let dims = scores.dims();
    let (b, t) = (dims[0], dims[dims.len() - 2]);
    let rows_per_batch = scores.elem_count() / dims[dims.len() - 1] / b;
    let scores = scores.contiguous()?;
    match mask {
        None => {
            let op = AttentionSoftmax { scale: scale as f32, t, rows_per_batch, mask_batches: 1 };
            scores.apply_op1(ScaledSoftmax(op))
        }
        Some(mask) => {
            let mask_batches = mask.dim(0)?;
            if mask.dims() != [mask_batches, t, dims[dims.len() - 1]] || (mask_batches != 1 && mask_batches != b) {
                bail!("attention mask {:?} does not fit scores {:?}", mask.dims(), dims)
            }
            let op = AttentionSoftmax { scale: scale as f32, t, rows_per_batch, mask_batches };
            scores.apply_op2(&mask.contiguous()?, MaskedSoftmax(op))
        }
    }
}

/// `softmax(scale·q·kᵀ + mask)` for queries `[B, KV, G·T, D]` (the G query heads of each
/// key/value head stacked along the rows) and keys `[B, KV, keys, D]`: the probabilities
/// `[B, KV, G·T, keys]`. Unlike a matmul followed by [`attention_softmax`], the
/// graph keeps no scores tensor (the softmax's backward needs only its output, and the
/// scores' gradient only q and k): one `[B, H, T, keys]` tensor less per layer held for the
/// backward pass (1.1 GB of the SmolLM2-135M shape's batch 4 × 512).
pub fn attention_probs(q: &Tensor, k: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, kv, rows, d) = q.dims4()?;
    let (kb, kkv, keys, kd) = k.dims4()?;
    if (kb, kkv, kd) != (b, kv, d) {
        bail!("attention probabilities: queries {:?} and keys {:?} do not fit", q.dims(), k.dims())
    }
    let t = mask.map_or(Ok(rows), |m| m.dim(1))?;
    let mask_batches = mask.map_or(Ok(1), |m| m.dim(0))?;
    if let Some(m) = mask
        && (rows % t != 0 || m.dims() != [mask_batches, t, keys] || (mask_batches != 1 && mask_batches != b))
    {
        bail!("attention mask {:?} does not fit queries {:?} and keys {:?}", m.dims(), q.dims(), k.dims())
    }
    let softmax = AttentionSoftmax { scale: scale as f32, t, rows_per_batch: kv * rows, mask_batches };
    // Contiguous for the kernel (a copy only for keys read from a KV cache's larger buffer).
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    q.apply_op2(&k, AttentionProbs { softmax, mask: mask.map(|m| m.contiguous()).transpose()? })
}

struct AttentionProbs {
    softmax: AttentionSoftmax,
    mask: Option<Tensor>,
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probabilities"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (q, k) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let &[b, kv, rows, d] = l1.dims() else { bail!("attention probabilities: expected 4-D queries") };
        let keys = l2.dims()[2];
        let (q_block, k_block, scores_block) = (rows * d, keys * d, rows * keys);
        // One single-threaded product per (sequence, KV head), side by side.
        let scores = written(b * kv * scores_block, |scores| {
            scores.par_chunks_mut(scores_block).enumerate().for_each(|(block, out)| {
                let (q, k) = (&q[block * q_block..(block + 1) * q_block], &k[block * k_block..(block + 1) * k_block]);
                // SAFETY: `out` is rows × keys, `q` rows × d and `k` keys × d, all row-major.
                unsafe {
                    gemm::gemm(
                        rows, keys, d,
                        out.as_mut_ptr(), 1, keys as isize, false,
                        q.as_ptr(), 1, d as isize,
                        k.as_ptr(), d as isize, 1,
                        0f32, 1f32, false, false, false, gemm::Parallelism::None,
                    );
                }
            })
        });
        let probs = match &self.mask {
            Some(mask) => with_data(mask, self.name(), |mask| Ok(self.softmax.forward(&scores, Some(mask), keys)))?,
            None => self.softmax.forward(&scores, None, keys),
        };
        Ok((CpuStorage::F32(probs), Shape::from((b, kv, rows, keys))))
    }

    /// `dscores = softmax′`, then `dq = dscores·k` and `dk = dscoresᵀ·q`.
    fn bwd(&self, q: &Tensor, k: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dscores = self.softmax.backward(res, grad)?;
        Ok((Some(dscores.matmul(k)?), Some(dscores.t()?.matmul(q)?)))
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Targets equal to this are ignored: no loss, no gradient.
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Per-row cross-entropy `logsumexp(logits) − logits[target]` for logits `[N, V]`.
struct CrossEntropy;

#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = simd::max(row);
    max + fastexp::sum_exp_shifted(row, max).ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = slice(s1, l1, self.name())?;
        let targets = u32_slice(s2, l2, self.name())?;
        let vocab = l1.dims()[1];
        let mut losses = vec![0f32; targets.len()];
        losses.par_iter_mut().zip(logits.par_chunks(vocab)).zip(targets.par_iter()).try_for_each(
            |((loss, row), &target)| -> Result<()> {
                if target == IGNORE_INDEX {
                    return Ok(());
                }
                let Some(&picked) = row.get(target as usize) else {
                    bail!("cross-entropy: target {target} outside a vocabulary of {vocab}")
                };
                *loss = simd::widest!({ log_sum_exp(row) }) - picked;
                Ok(())
            },
        )?;
        Ok((CpuStorage::F32(losses), Shape::from(targets.len())))
    }

    /// `dlogits = (softmax(logits) − onehot(target)) · dloss`
    fn bwd(&self, logits: &Tensor, targets: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let vocab = logits.dim(1)?;
        let targets: Vec<u32> = targets.to_vec1()?;
        let dlogits = with_data(logits, "cross-entropy backward", |values| {
            with_data(grad, "cross-entropy backward", |dloss| {
                let dlogits = written(values.len(), |dlogits| {
                    dlogits
                        .par_chunks_mut(vocab)
                        .zip(values.par_chunks(vocab))
                        .zip(targets.par_iter().zip(dloss.par_iter()))
                        .for_each(|((d, row), (&target, &scale))| {
                            if target == IGNORE_INDEX {
                                d.fill(0.0);
                                return;
                            }
                            simd::widest!({
                                let lse = log_sum_exp(row);
                                for (dj, &xj) in d.iter_mut().zip(row) {
                                    *dj = fastexp::exp(xj - lse) * scale;
                                }
                            });
                            d[target as usize] -= scale;
                        })
                });
                tensor(dlogits, logits.shape(), logits)
            })
        })?;
        Ok((Some(dlogits), None))
    }
}

/// Cross-entropy of each row of `logits` `[N, V]` against `targets` `[N]` (u32); rows whose
/// target is [`IGNORE_INDEX`] give 0.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)
}

// ---------------------------------------------------------------- sampled tokens' log-probs

/// Per row of logits `[N, V]` at inverse temperature `scale`: the log-probability of the row's
/// token (with a backward) and the distribution's entropy (a statistic: no gradient flows
/// through it), as `[N, 2]`. One pass for the maximum, one for both sums, where log-softmax,
/// gather and entropy as candle ops walk the logits about ten times and keep four copies.
struct TokenLogprobs {
    scale: f32,
}

/// `(ln Σ e^y, Σ e^y·y / Σ e^y)` for `y = scale · (row − max)`: the log-partition function
/// after the shift, and the mean of `y` under the distribution (for the entropy).
#[inline(always)]
fn scaled_log_partition(row: &[f32], max: f32, scale: f32) -> (f32, f32) {
    let (mut shifted, mut exps) = ([0f32; 256], [0f32; 256]);
    let (mut total, mut weighted) = (0f32, 0f32);
    for chunk in row.chunks(shifted.len()) {
        let (y, e) = (&mut shifted[..chunk.len()], &mut exps[..chunk.len()]);
        for (yi, &x) in y.iter_mut().zip(chunk) {
            *yi = scale * (x - max);
        }
        fastexp::exp_shifted(y, 0.0, e);
        total += fastexp::sum(e);
        weighted += simd::dot(e, y);
    }
    (total.ln(), weighted / total)
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = slice(s1, l1, self.name())?;
        let targets = u32_slice(s2, l2, self.name())?;
        let (vocab, scale) = (l1.dims()[1], self.scale);
        let mut out = vec![0f32; 2 * targets.len()];
        out.par_chunks_mut(2).zip(logits.par_chunks(vocab)).zip(targets.par_iter()).try_for_each(
            |((pair, row), &target)| -> Result<()> {
                let Some(&picked) = row.get(target as usize) else {
                    bail!("token log-probabilities: token {target} outside a vocabulary of {vocab}")
                };
                let (max, (log_partition, mean)) = simd::widest!({
                    let max = simd::max(row);
                    (max, scaled_log_partition(row, max, scale))
                });
                pair[0] = scale * (picked - max) - log_partition;
                pair[1] = log_partition - mean;
                Ok(())
            },
        )?;
        Ok((CpuStorage::F32(out), Shape::from((targets.len(), 2))))
    }

    /// `dlogits = scale · (onehot(token) − softmax(scale · logits)) · dlogp`; the entropy's
    /// column gets none. The forward's log-probability gives each probability in one pass:
    /// `p_j = e^(scale · (x_j − x_token) + log p_token)`.
    fn bwd(&self, logits: &Tensor, targets: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        const OP: &str = "token log-probabilities backward";
        let (vocab, scale) = (logits.dim(1)?, self.scale);
        let targets: Vec<u32> = targets.to_vec1()?;
        let dlogits = with_data(logits, OP, |values| {
            with_data(res, OP, |out| {
                with_data(grad, OP, |dout| {
                    let dlogits = written(values.len(), |dlogits| {
                        dlogits
                            .par_chunks_mut(vocab)
                            .zip(values.par_chunks(vocab))
                            .zip(targets.par_iter().zip(out.par_chunks(2).zip(dout.par_chunks(2))))
                            .for_each(|((d, row), (&target, (pair, dpair)))| {
                                let (g, picked, logp) = (dpair[0] * scale, row[target as usize], pair[0]);
                                simd::widest!({
                                    for (dj, &xj) in d.iter_mut().zip(row) {
                                        *dj = -fastexp::exp(scale * (xj - picked) + logp) * g;
                                    }
                                });
                                d[target as usize] += g;
                            })
                    });
                    tensor(dlogits, logits.shape(), logits)
                })
            })
        })?;
        Ok((Some(dlogits), None))
    }
}

/// Log-probabilities `[N]` of `tokens` `[N]` (u32) under `softmax(scale · logits)` for logits
/// `[N, V]`, and the entropies `[N]` of those distributions (detached).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let out = logits.contiguous()?.apply_op2(&tokens.contiguous()?, TokenLogprobs { scale: scale as f32 })?;
    Ok((out.narrow(1, 0, 1)?.squeeze(1)?, out.narrow(1, 1, 1)?.squeeze(1)?.detach()))
}

// ---------------------------------------------------------------- RMSNorm

/// `y = x / rms(x) · w` over rows of `[N, D]`.
struct RmsNorm {
    eps: f32,
}

#[inline(always)]
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = simd::dot(row, row) / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let d = w.len();
        let per_task = rows_per_task(d);
        let y = written(x.len(), |y| {
            y.par_chunks_mut(d * per_task).zip(x.par_chunks(d * per_task)).for_each(|(y, x)| simd::widest!({
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let r = inverse_rms(x, self.eps);
                    for ((yj, &xj), &wj) in y.iter_mut().zip(x).zip(w) {
                        *yj = xj * r * wj;
                    }
                }
            }))
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With `x̂ = x·r` and `g = dy ⊙ w`: `dx = r·(g − x̂·mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂`.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let rows_per_chunk = rows_per_task(d);
        let (dx, dw) = with_data(x, "rms-norm backward", |x| {
            with_data(w, "rms-norm backward", |w| {
                with_data(grad, "rms-norm backward", |dy| {
                    // One partial dw per fixed chunk of rows, summed in chunk order: the same
                    // result whatever the number of threads.
                    let mut partials: Vec<Vec<f32>> = Vec::new();
                    let dx = written(x.len(), |dx| {
                        partials = dx
                            .par_chunks_mut(d * rows_per_chunk)
                            .zip(x.par_chunks(d * rows_per_chunk).zip(dy.par_chunks(d * rows_per_chunk)))
                            .map(|(dx, (x, dy))| simd::widest!({
                                let mut dw = vec![0f32; d];
                                for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                                    let r = inverse_rms(x, self.eps);
                                    let mean = simd::dot3(dy, w, x) * r / d as f32;
                                    for j in 0..d {
                                        let normed = x[j] * r;
                                        dx[j] = r * (dy[j] * w[j] - normed * mean);
                                        dw[j] += dy[j] * normed;
                                    }
                                }
                                dw
                            }))
                            .collect()
                    });
                    let mut dw = vec![0f32; d];
                    for partial in partials {
                        dw.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(tensor(dx, x.shape(), x)?), Some(tensor(dw, w.shape(), w)?)))
    }
}

/// RMSNorm over the last dimension of `x` with weight `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------- RoPE (rotate-half), heads first

/// `x` `[B, T, H, D]` → `[B, H, T, D]` with `y = x·cos + rotate_half(x)·sin` on the first `R`
/// dimensions of each head and `y = x` on the rest; `cos`, `sin` are `[1 or B, T, R]`. Writing
/// heads-first saves the transpose copy attention needs anyway.
struct Rope;

struct RopeShape {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    /// Rotary dimensions per head (`R`).
    r: usize,
    table_batches: usize,
}

impl RopeShape {
    fn new(x: &[usize], table: &[usize]) -> Result<Self> {
        let (&[b, t, h, d], &[tb, tt, r]) = (x, table) else { bail!("rope: expected x [B,T,H,D] and tables [B,T,R]") };
        if tt != t || r > d || (tb != 1 && tb != b) || r % 2 != 0 {
            bail!("rope: tables {table:?} do not fit x {x:?}")
        }
        Ok(RopeShape { b, t, h, d, r, table_batches: tb })
    }

    /// Offset of row (b, t) in the tables.
    fn table_row(&self, b: usize, t: usize) -> usize {
        (if self.table_batches == 1 { t } else { b * self.t + t }) * self.r
    }
}

/// y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2 (halves of the rotary part of one head vector);
/// the dimensions past the tables pass through.
#[inline(always)]
fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let half = cos.len() / 2;
    for j in 0..half {
        y[j] = x[j] * cos[j] - x[j + half] * sin[j];
        y[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
    }
    y[2 * half..].copy_from_slice(&x[2 * half..]);
}

/// The transpose of [`rope_row`]: dx1 = dy1·c1 + dy2·s2, dx2 = dy2·c2 − dy1·s1.
#[inline(always)]
fn rope_row_backward(dy: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let half = cos.len() / 2;
    for j in 0..half {
        dx[j] = dy[j] * cos[j] + dy[j + half] * sin[j + half];
        dx[j + half] = dy[j + half] * cos[j + half] - dy[j] * sin[j];
    }
    dx[2 * half..].copy_from_slice(&dy[2 * half..]);
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-heads-first"
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
        let (x, cos, sin) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let s = RopeShape::new(l1.dims(), l2.dims())?;
        // Output is [B, H, T, D]: each (b, h) block of T rows is written by one task (a
        // decoding step's one-row blocks together: waking a thread costs more).
        let y = written(x.len(), |y| {
            y.par_chunks_mut(s.t * s.d).enumerate().with_min_len(rows_per_task(s.t * s.d)).for_each(|(bh, block)| {
                let (b, h) = (bh / s.h, bh % s.h);
                simd::widest!({
                    for (t, out) in block.chunks_mut(s.d).enumerate() {
                        let at = ((b * s.t + t) * s.h + h) * s.d;
                        let table = s.table_row(b, t);
                        rope_row(&x[at..at + s.d], &cos[table..table + s.r], &sin[table..table + s.r], out);
                    }
                })
            })
        });
        Ok((CpuStorage::F32(y), Shape::from((s.b, s.h, s.t, s.d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = RopeShape::new(x.dims(), cos.dims())?;
        let dx = with_data(grad, "rope backward", |dy| {
            with_data(cos, "rope backward", |cos| {
                with_data(sin, "rope backward", |sin| {
                    // dx is [B, T, H, D]: each (b, t) row of H heads is written by one task.
                    let dx = written(dy.len(), |dx| {
                        dx.par_chunks_mut(s.h * s.d).enumerate().with_min_len(rows_per_task(s.h * s.d)).for_each(|(bt, row)| {
                            let (b, t) = (bt / s.t, bt % s.t);
                            let table = s.table_row(b, t);
                            simd::widest!({
                                for (h, out) in row.chunks_mut(s.d).enumerate() {
                                    let at = ((b * s.h + h) * s.t + t) * s.d;
                                    rope_row_backward(&dy[at..at + s.d], &cos[table..table + s.r], &sin[table..table + s.r], out);
                                }
                            })
                        })
                    });
                    tensor(dx, x.shape(), x)
                })
            })
        })?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding of `x` `[B, T, H, D]`, returned heads-first `[B, H, T, D]`.
pub fn rope_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

// ---------------------------------------------------------------- gated activations

/// `act(gate) ⊙ up` for SwiGLU (`silu`) and GeGLU (tanh-approximated GELU).
struct Gated(Activation);

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fastexp::exp(-x))
}

/// `tanh x = 1 − 2 / (e^{2x} + 1)` on the vectorisable exp (libm's `tanhf` is a call per
/// element); within 2e-7 of it (absolute, tested), and ±1 at the extremes.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (fastexp::exp(2.0 * x) + 1.0)
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// One activation's element functions. Each kernel loop is compiled for one of them, so that
/// it has no branch per element and vectorises.
trait GateActivation {
    /// `act(g)`.
    fn value(g: f32) -> f32;
    /// `(dgate, dup) = (dy·up·act'(g), dy·act(g))`.
    fn backward(g: f32, u: f32, dy: f32) -> (f32, f32);
}

struct Silu;

impl GateActivation for Silu {
    #[inline(always)]
    fn value(g: f32) -> f32 {
        g * sigmoid(g)
    }

    #[inline(always)]
    fn backward(g: f32, u: f32, dy: f32) -> (f32, f32) {
        let s = sigmoid(g);
        (dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s)
    }
}

/// `0.5·g·(1 + tanh(c·(g + 0.044715·g³)))`.
struct GeluTanh;

impl GateActivation for GeluTanh {
    #[inline(always)]
    fn value(g: f32) -> f32 {
        0.5 * g * (1.0 + tanh(SQRT_TWO_OVER_PI * (g + GELU_CUBIC * g * g * g)))
    }

    #[inline(always)]
    fn backward(g: f32, u: f32, dy: f32) -> (f32, f32) {
        let tanh = tanh(SQRT_TWO_OVER_PI * (g + GELU_CUBIC * g * g * g));
        let du = SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * g * g);
        let slope = 0.5 * (1.0 + tanh) + 0.5 * g * (1.0 - tanh * tanh) * du;
        (dy * u * slope, dy * 0.5 * g * (1.0 + tanh))
    }
}

/// `y = act(g) ⊙ u` over one chunk.
#[inline(always)]
fn gated_chunk<A: GateActivation>(y: &mut [f32], g: &[f32], u: &[f32]) {
    simd::widest!({
        for ((yj, &gj), &uj) in y.iter_mut().zip(g).zip(u) {
            *yj = A::value(gj) * uj;
        }
    })
}

/// `(dgate, dup)` over one chunk.
#[inline(always)]
fn gated_backward_chunk<A: GateActivation>(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    simd::widest!({
        for ((dg, du), ((&g, &u), &dy)) in dg.iter_mut().zip(du.iter_mut()).zip(g.iter().zip(u).zip(dy)) {
            (*dg, *du) = A::backward(g, u, dy);
        }
    })
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        if gate.len() != up.len() {
            bail!("gated activation: gate and up differ in size")
        }
        let y = written(gate.len(), |y| {
            y.par_chunks_mut(16_384).zip(gate.par_chunks(16_384).zip(up.par_chunks(16_384))).for_each(|(y, (g, u))| match self.0 {
                Activation::Silu => gated_chunk::<Silu>(y, g, u),
                Activation::GeluTanh | Activation::Gelu => gated_chunk::<GeluTanh>(y, g, u),
            })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `dgate = dy·up·act'(g)`, `dup = dy·act(g)`.
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) = with_data(gate, "gated activation backward", |g| {
            with_data(up, "gated activation backward", |u| {
                with_data(grad, "gated activation backward", |dy| {
                    let mut dup = Vec::new();
                    let dgate = written(g.len(), |dgate| {
                        dup = written(g.len(), |dup| {
                            dgate
                                .par_chunks_mut(16_384)
                                .zip(dup.par_chunks_mut(16_384))
                                .zip(g.par_chunks(16_384).zip(u.par_chunks(16_384)).zip(dy.par_chunks(16_384)))
                                .for_each(|((dg, du), ((g, u), dy))| match self.0 {
                                    Activation::Silu => gated_backward_chunk::<Silu>(dg, du, g, u, dy),
                                    Activation::GeluTanh | Activation::Gelu => gated_backward_chunk::<GeluTanh>(dg, du, g, u, dy),
                                })
                        })
                    });
                    Ok((dgate, dup))
                })
            })
        })?;
        Ok((Some(tensor(dgate, gate.shape(), gate)?), Some(tensor(dup, up.shape(), up)?)))
    }
}

/// `act(gate) ⊙ up`; `activation` is `Silu` or `GeluTanh` (the exact GELU has no fused kernel).
pub fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Gated(activation))
}

// ---------------------------------------------------------------- matmul by a frozen weight

/// `x Wᵀ` for rows `x` `[M, K]` and a frozen `Wᵀ` `[K, N]` (any strides, e.g. a view of `W`).
/// candle's own matmul computes (and stores) the gradient of both sides whether or not one
/// needs it: for a frozen LoRA base that is a full-size gradient per weight, and a third of
/// the backward's arithmetic. This one gives `x` its gradient, `dx = dy W`, and `Wᵀ` none.
struct FrozenMatmul;

/// A CPU f32 matrix as gemm reads it: its data from the first element, and row and column
/// strides (a transposed view is read in place, never copied).
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl Strided {
    fn of(data: &[f32], layout: &Layout, op: &str) -> Result<Self> {
        let &[rows, cols] = layout.dims() else { bail!("{op}: expected a matrix, got {:?}", layout.dims()) };
        let (row_stride, col_stride) = (layout.stride()[0], layout.stride()[1]);
        let last = layout.start_offset() + (rows.max(1) - 1) * row_stride + (cols.max(1) - 1) * col_stride;
        if rows > 0 && cols > 0 && last >= data.len() {
            bail!("{op}: the layout reaches past the storage")
        }
        Ok(Strided { ptr: data[layout.start_offset()..].as_ptr(), rows, cols, row_stride: row_stride as isize, col_stride: col_stride as isize })
    }

    /// Rows `start..start + n`.
    fn rows(self, start: usize, n: usize) -> Self {
        // SAFETY: `start + n <= rows`, so the pointer stays inside the matrix.
        assert!(start + n <= self.rows);
        Strided { ptr: unsafe { self.ptr.offset(start as isize * self.row_stride) }, rows: n, ..self }
    }

    fn t(self) -> Self {
        Strided { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// `dst [M, N] = a [M, K] · b [K, N]` (`accumulate`: `dst +=`), dst row-major.
fn gemm_into(dst: &mut [f32], a: Strided, b: Strided, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() == m * n, "gemm_into: shapes do not fit");
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: `a` and `b` were checked against their storage by `Strided::of` (and `rows`
    // stays within), `dst` holds M×N elements.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, n as isize, accumulate,
            a.ptr, a.col_stride, a.row_stride,
            b.ptr, b.col_stride, b.row_stride,
            1f32, 1f32, false, false, false, parallelism,
        );
    }
}

/// Run `f` on a CPU f32 matrix as it lies in memory (no copy).
fn with_strided<R>(t: &Tensor, op: &str, f: impl FnOnce(Strided) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => f(Strided::of(data, layout, op)?),
        _ => bail!("{op}: expected an f32 CPU tensor"),
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s1 else { bail!("frozen-matmul: expected f32 rows") };
        let CpuStorage::F32(w) = s2 else { bail!("frozen-matmul: expected an f32 weight") };
        let (x, w_t) = (Strided::of(x, l1, self.name())?, Strided::of(w, l2, self.name())?);
        if x.cols != w_t.rows {
            bail!("frozen-matmul: x {:?} and Wᵀ {:?} do not fit", l1.dims(), l2.dims())
        }
        let mut y = vec![0f32; x.rows * w_t.cols];
        gemm_into(&mut y, x, w_t, false);
        Ok((CpuStorage::F32(y), Shape::from((x.rows, w_t.cols))))
    }

    fn bwd(&self, _x: &Tensor, w_t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&w_t.t()?)?), None))
    }
}

/// `x Wᵀ` for rows `x` `[M, K]` and a frozen `Wᵀ` `[K, N]`: the gradient reaches `x` only.
pub fn frozen_matmul(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w_t, FrozenMatmul)
}

// ---------------------------------------------------------------- LM head + cross-entropy

/// The LM head and the cross-entropy of each row in one op, over chunks of rows, so the
/// `[N, V]` logits (850 MB for 1,400 answer tokens of a 152k vocabulary) never exist at once.
/// Output `[N, 2]`: the loss and the argmax. A frozen head's input gradient is a per-row
/// multiple of `(softmax − onehot) W`, so that is made in the forward pass with the logits at
/// hand; a head that trains needs each row's upstream gradient, so its backward remakes them.
struct LinearCrossEntropy {
    targets: Vec<u32>,
    /// Gemma 2's final logit soft-cap: logits are `cap · tanh(z / cap)`.
    softcap: Option<f32>,
    /// The head trains too (full fine-tuning), so its gradient is computed.
    head_trains: bool,
    chunk_rows: usize,
    /// `(softmax − onehot) W` `[N, H]`, made in the forward pass (frozen head, training).
    unit_input_grad: Option<std::sync::Mutex<Vec<f32>>>,
}

impl LinearCrossEntropy {
    /// Each chunk's logits, soft-capped, handed to `f(first_row, logits)`.
    fn chunks(&self, x: Strided, w_t: Strided, mut f: impl FnMut(usize, &mut [f32]) -> Result<()>) -> Result<()> {
        let vocab = w_t.cols;
        let mut logits = vec![0f32; self.chunk_rows.min(x.rows) * vocab];
        for start in (0..x.rows).step_by(self.chunk_rows) {
            let n = self.chunk_rows.min(x.rows - start);
            let chunk = &mut logits[..n * vocab];
            gemm_into(chunk, x.rows(start, n), w_t, false);
            if let Some(cap) = self.softcap {
                chunk.par_iter_mut().for_each(|z| *z = cap * (*z / cap).tanh());
            }
            f(start, chunk)?;
        }
        Ok(())
    }

    fn check(&self, x: Strided, w_t: Strided) -> Result<()> {
        if x.cols != w_t.rows || x.rows != self.targets.len() {
            bail!("linear-cross-entropy: rows [{}, {}], head [{}, {}] and {} targets do not fit", x.rows, x.cols, w_t.rows, w_t.cols, self.targets.len())
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t != IGNORE_INDEX && t as usize >= w_t.cols) {
            bail!("cross-entropy: target {bad} outside a vocabulary of {}", w_t.cols)
        }
        Ok(())
    }

    /// Turn a chunk of logits into their gradient, `(softmax − onehot) · scale` per row (times
    /// `1 − tanh²` under a soft-cap), and return `dz W` into `dx` (the chunk's rows of `[N, H]`).
    fn logit_gradient(&self, logits: &mut [f32], targets: &[u32], scales: impl Fn(usize) -> f32 + Sync, w_t: Strided, dx: &mut [f32]) -> Strided {
        let vocab = w_t.cols;
        logits.par_chunks_mut(vocab).zip(targets).enumerate().for_each(|(i, (row, &target))| {
            let scale = scales(i);
            if target == IGNORE_INDEX || scale == 0.0 {
                row.fill(0.0);
                return;
            }
            simd::widest!({
                let lse = log_sum_exp(row);
                let target = target as usize;
                for (j, c) in row.iter_mut().enumerate() {
                    let dc = (fastexp::exp(*c - lse) - if j == target { 1.0 } else { 0.0 }) * scale;
                    // Under a soft-cap `c = cap·tanh(z / cap)`: dc/dz = 1 − (c / cap)².
                    *c = match self.softcap {
                        Some(cap) => dc * (1.0 - (*c / cap) * (*c / cap)),
                        None => dc,
                    };
                }
            })
        });
        let dz = Strided { ptr: logits.as_ptr(), rows: targets.len(), cols: vocab, row_stride: vocab as isize, col_stride: 1 };
        gemm_into(dx, dz, w_t.t(), false);
        dz
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else { bail!("linear-cross-entropy: expected f32") };
        let (x, w_t) = (Strided::of(x, l1, self.name())?, Strided::of(w, l2, self.name())?);
        self.check(x, w_t)?;
        let (vocab, hidden) = (w_t.cols, x.cols);
        let mut out = vec![0f32; 2 * x.rows];
        let mut unit_grad = match self.unit_input_grad {
            Some(_) => vec![0f32; x.rows * hidden],
            None => Vec::new(),
        };
        self.chunks(x, w_t, |start, logits| {
            let rows = logits.len() / vocab;
            let targets = &self.targets[start..start + rows];
            out[2 * start..2 * (start + rows)].par_chunks_mut(2).zip(logits.par_chunks(vocab)).zip(targets).for_each(|((o, row), &target)| {
                let (argmax, _) = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (j, &z)| if z > best.1 { (j, z) } else { best });
                o[1] = argmax as f32;
                if target != IGNORE_INDEX {
                    o[0] = simd::widest!({ log_sum_exp(row) }) - row[target as usize];
                }
            });
            if self.unit_input_grad.is_some() {
                self.logit_gradient(logits, targets, |_| 1.0, w_t, &mut unit_grad[start * hidden..(start + rows) * hidden]);
            }
            Ok(())
        })?;
        if let Some(slot) = &self.unit_input_grad {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = unit_grad;
        }
        Ok((CpuStorage::F32(out), Shape::from((x.rows, 2))))
    }

    /// `dx = dloss · (softmax − onehot) W` per row and, when the head trains, `dWᵀ += xᵀ dz`.
    fn bwd(&self, x_t: &Tensor, w_t_t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dloss: Vec<f32> = grad.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        let (rows, hidden) = x_t.dims2()?;
        let vocab = w_t_t.dim(1)?;
        if let Some(slot) = &self.unit_input_grad {
            let mut dx = std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()));
            if dx.len() == rows * hidden {
                dx.par_chunks_mut(hidden).zip(&dloss).for_each(|(row, &scale)| row.iter_mut().for_each(|g| *g *= scale));
                return Ok((Some(Tensor::from_vec(dx, (rows, hidden), x_t.device())?), None));
            }
        }
        let mut dx = vec![0f32; rows * hidden];
        let mut dw_t = if self.head_trains { vec![0f32; hidden * vocab] } else { Vec::new() };
        with_strided(x_t, self.name(), |x| {
            with_strided(w_t_t, self.name(), |w_t| {
                self.chunks(x, w_t, |start, logits| {
                    let n = logits.len() / vocab;
                    let scales = |i: usize| dloss[start + i];
                    let dz = self.logit_gradient(logits, &self.targets[start..start + n], scales, w_t, &mut dx[start * hidden..(start + n) * hidden]);
                    if self.head_trains {
                        gemm_into(&mut dw_t, x.rows(start, n).t(), dz, true);
                    }
                    Ok(())
                })
            })
        })?;
        let dx = Tensor::from_vec(dx, (rows, hidden), x_t.device())?;
        let dw_t = self.head_trains.then(|| Tensor::from_vec(dw_t, (hidden, vocab), x_t.device())).transpose()?;
        Ok((Some(dx), dw_t))
    }
}

/// Cross-entropy `[N]` (in the graph) of the LM head `w_t` `[H, V]` over rows `x` `[N, H]`
/// against `targets` ([`IGNORE_INDEX`] gives 0), and each row's argmax; logits are made
/// (and remade in the backward) 64 MB at a time. `head_trains`: `w_t` gets a gradient.
pub fn linear_cross_entropy(x: &Tensor, w_t: &Tensor, targets: Vec<u32>, softcap: Option<f32>, head_trains: bool) -> Result<(Tensor, Vec<u32>)> {
    let chunk_rows = ((16 << 20) / w_t.dim(1)?.max(1)).clamp(1, 4096);
    linear_cross_entropy_in_chunks(x, w_t, targets, softcap, head_trains, chunk_rows)
}

fn linear_cross_entropy_in_chunks(x: &Tensor, w_t: &Tensor, targets: Vec<u32>, softcap: Option<f32>, head_trains: bool, chunk_rows: usize) -> Result<(Tensor, Vec<u32>)> {
    let precompute = !head_trains && x.track_op();
    let unit_input_grad = precompute.then(|| std::sync::Mutex::new(Vec::new()));
    let op = LinearCrossEntropy { targets, softcap, head_trains, chunk_rows, unit_input_grad };
    let out = x.contiguous()?.apply_op2(w_t, op)?;
    let predicted = out.narrow(1, 1, 1)?.detach().flatten_all()?.to_vec1::<f32>()?.into_iter().map(|p| p as u32).collect();
    Ok((out.narrow(1, 0, 1)?.squeeze(1)?, predicted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_on_the_vectorised_exp_stays_near_libm() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let (ours, libm) = (tanh(x), (x as f64).tanh());
            assert!((ours as f64 - libm).abs() < 2e-7, "tanh({x}): {ours} vs {libm}");
        }
        assert_eq!((tanh(100.0), tanh(-100.0)), (1.0, -1.0));
    }
    use crate::model::ops::composite;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Value and gradients of `f` (fused) and `g` (composite) agree for a random upstream
    /// gradient: `Σ out ⊙ probe` is differentiated with respect to every input.
    fn same_value_and_gradients(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composite: impl Fn(&[Tensor]) -> Tensor,
        tolerance: f32,
    ) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&tensors), composite(&tensors));
        assert_eq!(a.dims(), b.dims());
        assert!(max_diff(&a, &b) <= tolerance, "values differ by {}", max_diff(&a, &b));
        let probe = random(a.dims(), 99);
        let grads_a = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let grads_b = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, var) in vars.iter().enumerate() {
            match (grads_a.get(var.as_tensor()), grads_b.get(var.as_tensor())) {
                (Some(ga), Some(gb)) => assert!(max_diff(ga, gb) <= tolerance, "input {i}: gradients differ by {}", max_diff(ga, gb)),
                (None, None) => {}
                (ga, gb) => panic!("input {i}: gradient present in fused {} vs composite {}", ga.is_some(), gb.is_some()),
            }
        }
    }

    #[test]
    fn attention_softmax_matches_composite() {
        let scores = random(&[2, 3, 5, 7], 1);
        let mask_values: Vec<f32> =
            (0..2 * 5 * 7).map(|i| if (i % 7) > (i / 7) % 5 + 1 { -1e30 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask_values, (2, 5, 7), &Device::Cpu).unwrap();
        let reference = |t: &[Tensor], mask: Option<&Tensor>| {
            let scaled = (&t[0] * 0.5).unwrap();
            let masked = match mask {
                Some(m) => scaled.broadcast_add(&m.unsqueeze(1).unwrap()).unwrap(),
                None => scaled,
            };
            composite::softmax_last_dim(&masked).unwrap()
        };
        same_value_and_gradients(&[scores.clone()], |t| attention_softmax(&t[0], Some(&mask), 0.5).unwrap(), |t| reference(t, Some(&mask)), 1e-5);
        same_value_and_gradients(&[scores], |t| attention_softmax(&t[0], None, 0.5).unwrap(), |t| reference(t, None), 1e-5);
    }

    /// Grouped queries (2 KV heads of 3 query heads, 5 tokens, 7 keys), a per-sequence mask and
    /// none: the same probabilities and gradients for q and k as a matmul then the softmax.
    #[test]
    fn attention_probs_match_scores_then_softmax() {
        let (b, kv, groups, t, keys, d) = (2, 2, 3, 5, 7, 4);
        let q = random(&[b, kv, groups * t, d], 31);
        let k = random(&[b, kv, keys, d], 32);
        let mask_values: Vec<f32> = (0..b * t * keys).map(|i| if (i % keys) > (i / keys) % t + 2 { -1e30 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask_values, (b, t, keys), &Device::Cpu).unwrap();
        let composite = |t_: &[Tensor], mask: Option<&Tensor>| {
            let scores = t_[0].matmul(&t_[1].t().unwrap()).unwrap().reshape((b, kv * groups, t, keys)).unwrap();
            let scaled = (scores * 0.5).unwrap();
            let masked = match mask {
                Some(m) => scaled.broadcast_add(&m.unsqueeze(1).unwrap()).unwrap(),
                None => scaled,
            };
            composite::softmax_last_dim(&masked).unwrap().reshape((b, kv, groups * t, keys)).unwrap()
        };
        for mask in [Some(&mask), None] {
            same_value_and_gradients(&[q.clone(), k.clone()], |t| attention_probs(&t[0], &t[1], mask, 0.5).unwrap(), |t| composite(t, mask), 1e-5);
        }
    }

    #[test]
    fn cross_entropy_matches_composite_and_ignores() {
        let logits = random(&[6, 11], 2);
        let targets = Tensor::new(&[3u32, 0, IGNORE_INDEX, 10, 5, 5], &Device::Cpu).unwrap();
        let keep = Tensor::new(&[1f32, 1.0, 0.0, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let safe_targets = Tensor::new(&[3u32, 0, 0, 10, 5, 5], &Device::Cpu).unwrap();
        same_value_and_gradients(
            &[logits],
            |t| cross_entropy_rows(&t[0], &targets).unwrap(),
            |t| {
                let logp = composite::log_softmax_last_dim(&t[0]).unwrap();
                let picked = logp.gather(&safe_targets.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
                (picked.neg().unwrap() * &keep).unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn token_logprobs_match_composite_at_a_temperature() {
        // 300 columns: more than one of the kernel's 256-wide chunks.
        let logits = (random(&[5, 300], 7) * 4.0).unwrap();
        let tokens = Tensor::new(&[3u32, 0, 299, 256, 17], &Device::Cpu).unwrap();
        let temperature = 0.7;
        same_value_and_gradients(
            &[logits.clone()],
            |t| token_logprobs(&t[0], &tokens, 1.0 / temperature).unwrap().0,
            |t| {
                let logp = composite::log_softmax_last_dim(&(&t[0] / temperature).unwrap()).unwrap();
                logp.gather(&tokens.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap()
            },
            1e-5,
        );
        let entropy = token_logprobs(&logits, &tokens, 1.0 / temperature).unwrap().1;
        let logp = composite::log_softmax_last_dim(&(&logits / temperature).unwrap()).unwrap();
        let expected = (logp.exp().unwrap() * &logp).unwrap().sum(1).unwrap().neg().unwrap();
        assert!(max_diff(&entropy, &expected) < 1e-5, "entropies differ by {}", max_diff(&entropy, &expected));
        assert!(token_logprobs(&logits, &Tensor::new(&[0u32, 0, 300, 0, 0], &Device::Cpu).unwrap(), 1.0).is_err());
    }

    #[test]
    fn rms_norm_matches_composite() {
        let x = random(&[9, 16], 3);
        let w = random(&[16], 4);
        same_value_and_gradients(&[x, w], |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(), |t| composite::rms_norm(&t[0], &t[1], 1e-5).unwrap(), 1e-4);
    }

    #[test]
    fn rope_matches_composite_for_shared_and_per_row_and_partial_tables() {
        for (table_batches, rotary) in [(1, 8), (2, 8), (1, 4), (2, 6)] {
            let x = random(&[2, 5, 3, 8], 5);
            let angles = random(&[table_batches, 5, rotary / 2], 6);
            let angles = Tensor::cat(&[&angles, &angles], 2).unwrap();
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            same_value_and_gradients(
                &[x],
                |t| rope_heads_first(&t[0], &cos, &sin).unwrap(),
                |t| {
                    let heads_first = t[0].transpose(1, 2).unwrap();
                    let (rotating, passing) = (heads_first.narrow(3, 0, rotary).unwrap(), heads_first.narrow(3, rotary, 8 - rotary).unwrap());
                    let rotated = composite::apply_rope(&rotating, &cos.unsqueeze(1).unwrap(), &sin.unsqueeze(1).unwrap()).unwrap();
                    Tensor::cat(&[&rotated, &passing], 3).unwrap()
                },
                1e-5,
            );
        }
    }

    #[test]
    fn gated_activations_match_composite() {
        for activation in [Activation::Silu, Activation::GeluTanh] {
            let (gate, up) = (random(&[4, 33], 7), random(&[4, 33], 8));
            same_value_and_gradients(
                &[gate, up],
                |t| gated(&t[0], &t[1], activation).unwrap(),
                |t| composite::gated(&t[0], &t[1], activation).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn linear_cross_entropy_in_chunks_matches_logits_then_cross_entropy() {
        let (n, h, v) = (37, 24, 50);
        let x = Var::from_tensor(&random(&[n, h], 21)).unwrap();
        let w = Var::from_tensor(&(random(&[v, h], 22) * 0.5).unwrap()).unwrap();
        let mut targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        targets[3] = IGNORE_INDEX;
        targets[20] = IGNORE_INDEX;
        let probe = random(&[n], 23);
        for softcap in [None, Some(3.0f32)] {
            for head_trains in [true, false] {
                // A frozen head is detached, as the decoder holds it.
                let w_t = if head_trains { w.as_tensor().t().unwrap() } else { w.as_tensor().detach().t().unwrap() };
                let (ours, predicted) = linear_cross_entropy_in_chunks(x.as_tensor(), &w_t, targets.clone(), softcap, head_trains, 8).unwrap();
                let mut logits = x.as_tensor().matmul(&w_t).unwrap();
                if let Some(cap) = softcap {
                    logits = ((logits / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap();
                }
                let theirs = composite_cross_entropy(&logits, &targets);
                assert!(max_diff(&ours, &theirs) <= 1e-5, "losses differ by {}", max_diff(&ours, &theirs));
                let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
                assert_eq!(predicted, argmax);
                let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g_theirs = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = max_diff(g_ours.get(x.as_tensor()).unwrap(), g_theirs.get(x.as_tensor()).unwrap());
                assert!(dx <= 1e-5, "dx differs by {dx}");
                match g_ours.get(w.as_tensor()) {
                    Some(dw) => {
                        assert!(head_trains, "a frozen head got a gradient");
                        let diff = max_diff(dw, g_theirs.get(w.as_tensor()).unwrap());
                        assert!(diff <= 1e-5, "dW differs by {diff}");
                    }
                    None => assert!(!head_trains, "the head got no gradient"),
                }
            }
        }
    }

    /// Log-softmax and gather, the plain candle way.
    fn composite_cross_entropy(logits: &Tensor, targets: &[u32]) -> Tensor {
        let keep: Vec<f32> = targets.iter().map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
        let safe: Vec<u32> = targets.iter().map(|&t| if t == IGNORE_INDEX { 0 } else { t }).collect();
        let n = targets.len();
        let picked = composite::log_softmax_last_dim(logits).unwrap().gather(&Tensor::from_vec(safe, (n, 1), &Device::Cpu).unwrap(), 1).unwrap().squeeze(1).unwrap();
        (picked.neg().unwrap() * Tensor::from_vec(keep, n, &Device::Cpu).unwrap()).unwrap()
    }

    /// The vendored candle copies transposed views tile by tile (`copy_transposed_matrices`):
    /// the same elements as a gather, for single and batched matrices, small and large, from an
    /// offset into the storage.
    #[test]
    fn transposed_views_copy_exactly() {
        for dims in [vec![3, 5], vec![67, 130], vec![300, 257], vec![2, 3, 40, 33], vec![1, 4, 1, 2, 9]] {
            let n: usize = dims.iter().product();
            let storage = random(&[n + 7], 5);
            let source = storage.narrow(0, 7, n).unwrap().reshape(dims.clone()).unwrap();
            let view = source.transpose(dims.len() - 2, dims.len() - 1).unwrap();
            let copied = view.contiguous().unwrap();
            assert!(copied.is_contiguous());
            let expected: Vec<f32> = {
                let values = source.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (r, c) = (dims[dims.len() - 2], dims[dims.len() - 1]);
                (0..n).map(|at| {
                    let (batch, within) = (at / (r * c), at % (r * c));
                    let (i, j) = (within / r, within % r);
                    values[batch * r * c + j * c + i]
                }).collect()
            };
            assert_eq!(copied.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected, "{dims:?}");
        }
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_gives_the_weight_no_gradient() {
        let (x, w) = (random(&[7, 5], 11), random(&[3, 5], 12));
        for w_t in [w.t().unwrap(), w.t().unwrap().contiguous().unwrap()] {
            let xv = Var::from_tensor(&x).unwrap();
            let ours = frozen_matmul(xv.as_tensor(), &w_t).unwrap();
            let theirs = xv.as_tensor().matmul(&w_t).unwrap();
            assert!(max_diff(&ours, &theirs) <= 1e-6);
            let probe = random(&[7, 3], 13);
            let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g_ours.get(xv.as_tensor()).unwrap(), g_theirs.get(xv.as_tensor()).unwrap()) <= 1e-6);
            assert!(g_ours.get(&w_t).is_none(), "no gradient stored for the frozen weight");
            assert!(g_theirs.get(&w_t).is_some(), "candle's matmul stores one");
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let x = random(&[4096, 64], 9);
        let w = random(&[64], 10);
        let grads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
                let y = rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                g.get(wv.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
            })
        };
        let (one, three) = (grads(1), grads(3));
        assert!(one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
