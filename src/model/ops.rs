//! The model's numerical building blocks, written with candle ops that all have a backward.
//!
//! candle's own `softmax_last_dim`, `rms_norm` and `rope` kernels have no backward and silently
//! cut the graph, so training code must not use them. These composites are the reference the
//! fused kernels (training engine) are checked against.

use candle_core::{D, Result, Tensor};

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

/// SwiGLU's gate: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
