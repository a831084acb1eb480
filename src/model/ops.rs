//! The model's numerical building blocks. On CPU (f32) they run as fused kernels with a real
//! backward ([`super::fused`]); elsewhere as the composite candle ops in [`composite`], which are
//! also the reference the fused kernels are tested against.
//!
//! candle's own `softmax_last_dim`, `rms_norm` and `rope` kernels have no backward and silently
//! cut the graph, so nothing here uses them.

use candle_core::{D, DType, Result, Tensor};

use super::family::Activation;
use super::fused::{self, IGNORE_INDEX};

/// RMSNorm over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::supported(x) { fused::rms_norm(x, weight, eps) } else { composite::rms_norm(x, weight, eps) }
}

/// `softmax(scale·scores + mask)` over the last dimension; `scores` `[B, …, T, keys]`, `mask`
/// `[1 or B, T, keys]` (additive, a constant: no gradient).
pub fn attention_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if fused::supported(scores) {
        return fused::attention_softmax(scores, mask, scale);
    }
    let dims = scores.dims().to_vec();
    let (b, keys) = (dims[0], dims[dims.len() - 1]);
    let t = dims[dims.len() - 2];
    let scaled = (scores * scale)?.reshape((b, (), t, keys))?;
    let masked = match mask {
        Some(mask) => scaled.broadcast_add(&mask.unsqueeze(1)?)?,
        None => scaled,
    };
    composite::softmax_last_dim(&masked)?.reshape(dims)
}

/// Rotary embedding of `x` `[B, T, H, D]` with tables `[1 or B, T, R]`, returned heads-first
/// `[B, H, T, D]`. The first `R ≤ D` dimensions of each head rotate; the rest pass through
/// (Phi-3's partial rotary).
pub fn rope_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused::supported(x) {
        return fused::rope_heads_first(x, cos, sin);
    }
    let heads_first = x.transpose(1, 2)?;
    let (d, r) = (x.dim(D::Minus1)?, cos.dim(D::Minus1)?);
    let rotate = |part: &Tensor| composite::apply_rope(part, &cos.unsqueeze(1)?, &sin.unsqueeze(1)?);
    if r == d {
        return rotate(&heads_first)?.contiguous();
    }
    let rotated = rotate(&heads_first.narrow(D::Minus1, 0, r)?)?;
    Tensor::cat(&[&rotated, &heads_first.narrow(D::Minus1, r, d - r)?], D::Minus1)?.contiguous()
}

/// A gated MLP's activation: `act(gate) ⊙ up` (SwiGLU, GeGLU).
pub fn gated_activation(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    if fused::supported(gate) && activation != Activation::Gelu {
        return fused::gated(gate, up, activation);
    }
    composite::gated(gate, up, activation)
}

/// Inverted dropout with probability `p`: each element kept (and scaled by `1 / (1 - p)`) or
/// zeroed by a counter-based hash of `seed` and its index, so the same seed gives the same mask
/// on any device, in any order (a recomputed forward draws what the first one drew).
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let n = x.elem_count();
    let threshold = (p * u64::MAX as f64) as u64;
    let keep = 1.0 / (1.0 - p) as f32;
    let mask: Vec<f32> = (0..n as u64).map(|i| if splitmix64(seed ^ splitmix64(i)) >= threshold { keep } else { 0.0 }).collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

/// SplitMix64's output function: a fast, well-mixed hash of a counter.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `cap · tanh(x / cap)`: Gemma 2's soft-capping of attention scores and logits.
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Cross-entropy per row of `logits` `[N, V]` against `targets` `[N]`; rows whose target is
/// [`IGNORE_INDEX`] give 0 and no gradient.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?;
    if fused::supported(logits) {
        return fused::cross_entropy_rows(logits, &targets);
    }
    let keep = targets.ne(IGNORE_INDEX)?;
    let safe = keep.where_cond(&targets, &targets.zeros_like()?)?;
    let picked = composite::log_softmax_last_dim(logits)?.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.neg()? * keep.to_dtype(logits.dtype())?
}

/// Log-probabilities `[N]` of `tokens` `[N]` under `softmax(logits / temperature)` for logits
/// `[N, V]` (in the graph), and those distributions' entropies `[N]` (detached).
pub fn token_logprobs(logits: &Tensor, tokens: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let tokens = tokens.to_dtype(DType::U32)?;
    if fused::supported(logits) {
        return fused::token_logprobs(logits, &tokens, 1.0 / temperature);
    }
    let logp = composite::log_softmax_last_dim(&(logits / temperature)?)?;
    let picked = logp.gather(&tokens.unsqueeze(1)?, 1)?.squeeze(1)?;
    let logp = logp.detach();
    let entropy = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
    Ok((picked, entropy))
}

/// Log-softmax over the last dimension (inference: sampling log-probabilities).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    composite::log_softmax_last_dim(x)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::supported(x) && x.rank() >= 2 {
        return fused::attention_softmax(x, None, 1.0);
    }
    composite::softmax_last_dim(x)
}

/// Chains of candle ops with a backward: the reference for the fused kernels, and the
/// implementation on devices without them.
pub mod composite {
    use candle_core::{D, Result, Tensor};

    use crate::model::family::Activation;

    /// `x / sqrt(mean(x²) + eps) * weight` over the last dimension, as transformers computes it.
    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inverse_rms = (variance + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inverse_rms)?.broadcast_mul(weight)
    }

    /// Softmax over the last dimension. The max is subtracted for stability and detached: the
    /// result does not depend on it, so no gradient needs to flow through it.
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let exp = x.broadcast_sub(&max)?.exp()?;
        exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
    }

    /// Log-softmax over the last dimension.
    pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&max)?;
        let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        shifted.broadcast_sub(&log_sum)
    }

    /// `[x1, x2] -> [-x2, x1]` over the last dimension (transformers' `rotate_half`).
    pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
    }

    /// Rotary position embedding, rotate-half layout: `x·cos + rotate_half(x)·sin`.
    pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
    }

    /// A gated MLP's activation: `act(gate) * up`.
    pub fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
        let activated = match activation {
            Activation::Silu => gate.silu()?,
            // candle's `gelu` is the tanh approximation, `gelu_erf` the exact one.
            Activation::GeluTanh => gate.gelu()?,
            Activation::Gelu => gate.gelu_erf()?,
        };
        activated * up
    }
}

#[cfg(test)]
mod tests {
    use super::composite::*;
    use candle_core::{Device, Tensor, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff <= tol, "max |Δ| = {diff}");
    }

    #[test]
    fn softmax_matches_candle_kernel() {
        let x = Tensor::randn(0f32, 3.0, (4, 7), &Device::Cpu).unwrap();
        close(&softmax_last_dim(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap(), 1e-6);
        close(&log_softmax_last_dim(&x).unwrap().exp().unwrap(), &softmax_last_dim(&x).unwrap(), 1e-6);
    }

    #[test]
    fn rms_norm_matches_candle_kernel() {
        let x = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &Device::Cpu).unwrap();
        close(&rms_norm(&x, &w, 1e-5).unwrap(), &candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap(), 1e-5);
    }

    #[test]
    fn rope_matches_candle_kernel() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = Tensor::randn(0f32, 1.0, (b, h, t, d), &Device::Cpu).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (t, d / 2), &Device::Cpu).unwrap();
        let (cos_half, sin_half) = (angles.cos().unwrap(), angles.sin().unwrap());
        let cos = Tensor::cat(&[&cos_half, &cos_half], 1).unwrap();
        let sin = Tensor::cat(&[&sin_half, &sin_half], 1).unwrap();
        let ours = apply_rope(&x, &cos, &sin).unwrap();
        let theirs = candle_nn::rotary_emb::rope(&x, &cos_half, &sin_half).unwrap();
        close(&ours, &theirs, 1e-5);
    }

    #[test]
    fn gradients_flow_through_every_op() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 8), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let y = softmax_last_dim(&rotate_half(&y).unwrap()).unwrap();
        let loss = (y.sqr().unwrap().sum_all().unwrap() + log_softmax_last_dim(x.as_tensor()).unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        for var in [&x, &w] {
            let g = grads.get(var.as_tensor()).expect("gradient reaches the input");
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0);
        }
    }
}
