//! The clipped PPO objectives on `[B, T]` tensors, averaged over the tokens `mask` marks.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Mean of `x` over the positions where `mask` (0/1, f32) is 1.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
    Ok(((x * mask)?.sum_all()? / count)?)
}

/// A one-element tensor as f64, outside the graph.
pub fn scalar(x: &Tensor) -> Result<f64> {
    Ok(x.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// A clipped objective and the share of tokens where clipping took effect.
pub struct Clipped {
    pub loss: Tensor,
    pub clipfrac: f64,
}

/// `max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))` with ρ = exp(new − old).
pub fn policy_loss(new_logprobs: &Tensor, old_logprobs: &Tensor, advantages: &Tensor, mask: &Tensor, clip: f64) -> Result<Clipped> {
    let ratio = (new_logprobs - old_logprobs)?.exp()?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let loss = masked_mean(&unclipped.maximum(&clipped)?, mask)?;
    let clipfrac = scalar(&masked_mean(&clipped.gt(&unclipped)?.to_dtype(DType::F32)?, mask)?)?;
    Ok(Clipped { loss, clipfrac })
}

/// `½ · max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²)`.
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, mask: &Tensor, clip: f64) -> Result<Clipped> {
    let moved = (values - old_values)?.clamp(-clip, clip)?;
    let clipped_values = (old_values + moved)?;
    let unclipped = (values - returns)?.sqr()?;
    let clipped = (clipped_values - returns)?.sqr()?;
    let loss = (masked_mean(&unclipped.maximum(&clipped)?, mask)? * 0.5)?;
    let clipfrac = scalar(&masked_mean(&clipped.gt(&unclipped)?.to_dtype(DType::F32)?, mask)?)?;
    Ok(Clipped { loss, clipfrac })
}

/// GRPO's per-token KL penalty to the reference, the k3 estimator on tensors:
/// `exp(ref − new) − (ref − new) − 1`.
pub fn k3_to_reference(new_logprobs: &Tensor, ref_logprobs: &Tensor) -> Result<Tensor> {
    let r = (ref_logprobs - new_logprobs)?;
    Ok(((r.exp()? - &r)? - 1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(values: &[f32]) -> Tensor {
        Tensor::from_vec(values.to_vec(), (1, values.len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn policy_loss_by_hand() {
        // ρ = 1.5 with A = 1: −1.5 vs −1.2 → −1.2 (clipped); ρ = 0.5 with A = −1: 0.5 vs 0.8 →
        // 0.8 (clipped); ρ = 1.1 with A = 2: −2.2 either way; the fourth token is masked out.
        let new = t(&[1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln(), 9.0]);
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        let adv = t(&[1.0, -1.0, 2.0, 5.0]);
        let mask = t(&[1.0, 1.0, 1.0, 0.0]);
        let out = policy_loss(&new, &old, &adv, &mask, 0.2).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert!((loss - (-1.2 + 0.8 - 2.2) / 3.0).abs() < 1e-6, "{loss}");
        assert!((out.clipfrac - 2.0 / 3.0).abs() < 1e-6, "{}", out.clipfrac);
    }

    #[test]
    fn policy_gradient_vanishes_where_clipped() {
        // d/dθ of −A·ρ is −A·ρ where unclipped, 0 where the clipped term wins.
        let new = Var::from_tensor(&t(&[1.5f32.ln(), 1.1f32.ln()])).unwrap();
        let out = policy_loss(new.as_tensor(), &t(&[0.0, 0.0]), &t(&[1.0, 2.0]), &t(&[1.0, 1.0]), 0.2).unwrap();
        let grads = out.loss.backward().unwrap();
        let g: Vec<f32> = grads.get(new.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g[0].abs() < 1e-7 && (g[1] - (-2.0 * 1.1 / 2.0)).abs() < 1e-5, "{g:?}");
    }

    #[test]
    fn value_loss_by_hand() {
        // V_old = 0, ε = 0.2. V = 1, G = 2: (1 − 2)² = 1 vs (0.2 − 2)² = 3.24 → 3.24 (clipped).
        // V = 0.1, G = 0: 0.01 vs 0.01 → 0.01. V = −1, G = −0.5: 0.25 vs (−0.2 + 0.5)² = 0.09 → 0.25.
        let out = value_loss(&t(&[1.0, 0.1, -1.0]), &t(&[0.0, 0.0, 0.0]), &t(&[2.0, 0.0, -0.5]), &t(&[1.0, 1.0, 1.0]), 0.2).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert!((loss - 0.5 * (3.24 + 0.01 + 0.25) / 3.0).abs() < 1e-6, "{loss}");
        assert!((out.clipfrac - 1.0 / 3.0).abs() < 1e-6, "{}", out.clipfrac);
    }

    #[test]
    fn k3_matches_the_vector_estimator() {
        let (lp, rlp) = ([-1.0f32, -2.0, -0.5], [-2.0f32, -1.0, -0.5]);
        let tensor: Vec<f32> = k3_to_reference(&t(&lp), &t(&rlp)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let vector = super::super::advantage::kl_per_token(&lp, &rlp, super::super::advantage::KlEstimator::K3);
        assert!(tensor.iter().zip(&vector).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
