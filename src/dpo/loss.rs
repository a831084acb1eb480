//! The preference losses as TRL defines them, on per-sequence log-probabilities, and the
//! metrics TRL logs for them. With Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)):
//!
//! - `sigmoid` (DPO): −log σ(βΔ); with label smoothing ε, cDPO: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)
//!   (TRL < 1.0 and CPOTrainer; TRL 1.16's DPOTrainer has no smoothing for sigmoid, ε = 0 is it).
//! - `robust`: ((1−ε)·(−log σ(βΔ)) − ε·(−log σ(−βΔ))) / (1 − 2ε).
//! - `hinge`: max(0, 1 − βΔ).
//! - `ipo`: (Δ_c/|c| − Δ_r/|r| − 1/(2β))², the log ratios averaged over answer tokens.
//! - `simpo` (CPOTrainer, reference-free): ρ = avg log π(c) − avg log π(r) − γ/β;
//!   −(1−ε)·log σ(βρ) − ε·log σ(−βρ).
//! - `kto`: desirable w_d·(1 − σ(β(log-ratio − z))), undesirable w_u·(1 − σ(β(z − log-ratio))),
//!   averaged over the batch; z = max(0, mean KL estimate on mismatched pairs), no gradient.
//!
//! Rewards are β·log-ratio (SimPO: β·average log-probability).

use candle_core::{D, Tensor};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::reward::softplus;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    Simpo,
    Kto,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::Sigmoid => "sigmoid",
            Loss::Ipo => "ipo",
            Loss::Hinge => "hinge",
            Loss::Robust => "robust",
            Loss::Simpo => "simpo",
            Loss::Kto => "kto",
        }
    }

    /// SimPO needs no reference model.
    pub fn uses_reference(self) -> bool {
        self != Loss::Simpo
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LossSettings {
    pub loss: Loss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    /// RPO: add α × the mean NLL of the chosen answers' tokens (TRL: loss types
    /// `["sigmoid", "sft"]` with weights `[1, α]`).
    pub rpo_alpha: Option<f64>,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// Per-sequence figures of a batch of pairs, `[B]` each. For SimPO, `chosen`/`rejected` are
/// averages per answer token and there is no reference.
pub struct PairScores {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub reference: Option<(Tensor, Tensor)>,
    /// Answer tokens of each sequence (IPO averages over them).
    pub chosen_tokens: Tensor,
    pub rejected_tokens: Tensor,
}

/// `log σ(x)`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

/// Per-pair losses `[B]` and the chosen and rejected rewards (no gradient).
pub fn pair_losses(s: &LossSettings, x: &PairScores) -> Result<(Tensor, Tensor, Tensor)> {
    let beta = s.beta;
    let (chosen_ratio, rejected_ratio) = match &x.reference {
        Some((ref_chosen, ref_rejected)) => ((&x.chosen - ref_chosen)?, (&x.rejected - ref_rejected)?),
        None => (x.chosen.clone(), x.rejected.clone()),
    };
    let delta = (&chosen_ratio - &rejected_ratio)?;
    let smoothed = |logits: &Tensor, eps: f64| -> Result<Tensor> {
        let clean = (log_sigmoid(&(logits * beta)?)? * -(1.0 - eps))?;
        if eps == 0.0 {
            return Ok(clean);
        }
        Ok((clean - (log_sigmoid(&(logits * -beta)?)? * eps)?)?)
    };
    let losses = match s.loss {
        Loss::Sigmoid => smoothed(&delta, s.label_smoothing)?,
        Loss::Hinge => ((delta * -beta)? + 1.0)?.relu()?,
        Loss::Ipo => {
            let averaged = ((&chosen_ratio / &x.chosen_tokens)? - (&rejected_ratio / &x.rejected_tokens)?)?;
            (averaged - 1.0 / (2.0 * beta))?.sqr()?
        }
        Loss::Robust => {
            let eps = s.label_smoothing;
            let clean = (log_sigmoid(&(&delta * beta)?)? * -(1.0 - eps))?;
            let flipped = (log_sigmoid(&(&delta * -beta)?)? * -eps)?;
            ((clean - flipped)? / (1.0 - 2.0 * eps))?
        }
        Loss::Simpo => smoothed(&(delta - s.simpo_gamma / beta)?, s.label_smoothing)?,
        Loss::Kto => unreachable!("kto is not a paired loss"),
    };
    Ok((losses, (chosen_ratio.detach() * beta)?, (rejected_ratio.detach() * beta)?))
}

/// Per-example figures of a KTO batch, `[n]` each, and the KL estimate `z` (a scalar).
pub struct JudgedScores<'a> {
    pub logps: Tensor,
    pub reference: Tensor,
    pub desirable: &'a [bool],
    pub kl: Tensor,
}

/// The batch's KTO loss (a scalar) and each example's reward (no gradient).
pub fn kto_loss(s: &LossSettings, x: &JudgedScores) -> Result<(Tensor, Tensor)> {
    let device = x.logps.device();
    let ratio = (&x.logps - &x.reference)?;
    let sign: Vec<f32> = x.desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let weight: Vec<f32> =
        x.desirable.iter().map(|&d| if d { s.desirable_weight } else { s.undesirable_weight } as f32).collect();
    let n = sign.len();
    let sign = Tensor::from_vec(sign, n, device)?;
    let weight = Tensor::from_vec(weight, n, device)?;
    // 1 − σ(u) = σ(−u) = exp(−softplus(u)), u = β·(ratio − z) for desirable, β·(z − ratio) else.
    let u = (ratio.broadcast_sub(&x.kl)? * sign)?.affine(s.beta, 0.0)?;
    let losses = (softplus(&u)?.neg()?.exp()? * weight)?;
    Ok((losses.mean_all()?, (ratio.detach() * s.beta)?))
}

/// `max(0, mean(policy − reference))` of the mismatched pairs' log-probabilities, no gradient.
pub fn kl_estimate(policy: &Tensor, reference: &Tensor) -> Result<Tensor> {
    Ok((policy.detach() - reference)?.mean_all()?.relu()?.reshape(1)?)
}

/// Sums for TRL's `logits/*`: the mean over the vocabulary of each answer position's logits,
/// summed, and the positions counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogitSum {
    pub sum: f64,
    pub count: usize,
}

impl LogitSum {
    fn mean(self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }
    }
}

/// Each row's mean over the last dimension, as f64 (for [`LogitSum`]).
pub fn row_means(logits: &Tensor) -> Result<Vec<f64>> {
    Ok(logits.detach().mean(D::Minus1)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

fn mean(values: &[f32]) -> f64 {
    values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64
}

/// TRL's metrics of one batch of pairs.
pub fn pair_metrics(
    chosen_rewards: &[f32],
    rejected_rewards: &[f32],
    chosen_logps: &[f32],
    rejected_logps: &[f32],
    logits: (LogitSum, LogitSum),
) -> Map<String, Value> {
    let correct = chosen_rewards.iter().zip(rejected_rewards).filter(|(c, r)| c > r).count();
    let margins: Vec<f32> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| c - r).collect();
    let mut m = Map::new();
    m.insert("rewards/chosen".into(), json!(mean(chosen_rewards)));
    m.insert("rewards/rejected".into(), json!(mean(rejected_rewards)));
    m.insert("rewards/accuracies".into(), json!(correct as f64 / chosen_rewards.len().max(1) as f64));
    m.insert("rewards/margins".into(), json!(mean(&margins)));
    m.insert("logps/chosen".into(), json!(mean(chosen_logps)));
    m.insert("logps/rejected".into(), json!(mean(rejected_logps)));
    m.insert("logits/chosen".into(), json!(logits.0.mean()));
    m.insert("logits/rejected".into(), json!(logits.1.mean()));
    m
}

/// KTOTrainer's metrics of one batch: means over its desirable and undesirable examples (each
/// only when the batch has some), the margin when it has both, and the KL estimate.
pub fn judged_metrics(rewards: &[f32], logps: &[f32], desirable: &[bool], logits: (LogitSum, LogitSum), kl: f32) -> Map<String, Value> {
    let pick = |values: &[f32], want: bool| -> Vec<f32> {
        values.iter().zip(desirable).filter(|(_, d)| **d == want).map(|(v, _)| *v).collect()
    };
    let mut m = Map::new();
    let mut means = [None, None];
    for (k, (want, name)) in [(true, "chosen"), (false, "rejected")].into_iter().enumerate() {
        let group = pick(rewards, want);
        if group.is_empty() {
            continue;
        }
        means[k] = Some(mean(&group));
        m.insert(format!("rewards/{name}"), json!(mean(&group)));
        m.insert(format!("logps/{name}"), json!(mean(&pick(logps, want))));
        let logit = if want { logits.0 } else { logits.1 };
        if logit.count > 0 {
            m.insert(format!("logits/{name}"), json!(logit.mean()));
        }
    }
    if let [Some(chosen), Some(rejected)] = means {
        m.insert("rewards/margins".into(), json!(chosen - rejected));
    }
    m.insert("kl".into(), json!(kl));
    m
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn settings(loss: Loss) -> LossSettings {
        LossSettings { loss, beta: 0.5, label_smoothing: 0.0, simpo_gamma: 0.5, rpo_alpha: None, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
    }

    fn losses(s: &LossSettings) -> Vec<f32> {
        let x = PairScores {
            chosen: t(&[-10.0, -4.0]),
            rejected: t(&[-12.0, -3.0]),
            reference: Some((t(&[-11.0, -4.0]), t(&[-11.0, -4.0]))),
            chosen_tokens: t(&[4.0, 2.0]),
            rejected_tokens: t(&[5.0, 1.0]),
        };
        pair_losses(s, &x).unwrap().0.to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    /// Δ = (1 − (−1)) = 2 and (0 − 1) = −1, β = 0.5: the formulas by hand.
    #[test]
    fn the_paired_losses_follow_their_definitions() {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        close(&losses(&settings(Loss::Sigmoid)), &[-(sig(1.0)).ln(), -(sig(-0.5)).ln()]);
        close(&losses(&settings(Loss::Hinge)), &[0.0, 1.5]);
        // IPO: (1/4 − (−1)/5 − 1)² and (0/2 − 1/1 − 1)².
        close(&losses(&settings(Loss::Ipo)), &[(0.25 + 0.2 - 1.0f64).powi(2), 4.0]);
        let eps = 0.1;
        let robust = LossSettings { label_smoothing: eps, ..settings(Loss::Robust) };
        let r = |z: f64| (-(1.0 - eps) * sig(z).ln() + eps * sig(-z).ln()) / (1.0 - 2.0 * eps);
        close(&losses(&robust), &[r(1.0), r(-0.5)]);
        let cdpo = LossSettings { label_smoothing: eps, ..settings(Loss::Sigmoid) };
        let c = |z: f64| -(1.0 - eps) * sig(z).ln() - eps * sig(-z).ln();
        close(&losses(&cdpo), &[c(1.0), c(-0.5)]);
    }

    #[test]
    fn simpo_needs_no_reference_and_subtracts_its_margin() {
        let x = PairScores { chosen: t(&[-1.0]), rejected: t(&[-2.0]), reference: None, chosen_tokens: t(&[1.0]), rejected_tokens: t(&[1.0]) };
        let (loss, chosen, _) = pair_losses(&settings(Loss::Simpo), &x).unwrap();
        // ρ = 1 − 0.5 / 0.5 = 0.
        close(&loss.to_vec1::<f32>().unwrap(), &[std::f64::consts::LN_2]);
        close(&chosen.to_vec1::<f32>().unwrap(), &[-0.5]);
    }

    #[test]
    fn kto_weighs_desirable_and_undesirable_answers_against_the_kl_estimate() {
        let s = LossSettings { desirable_weight: 2.0, ..settings(Loss::Kto) };
        let kl = kl_estimate(&t(&[-3.0, -5.0]), &t(&[-4.0, -5.0])).unwrap();
        close(&kl.to_vec1::<f32>().unwrap(), &[0.5]);
        let x = JudgedScores { logps: t(&[-1.0, -6.0]), reference: t(&[-2.0, -4.0]), desirable: &[true, false], kl };
        let (loss, rewards) = kto_loss(&s, &x).unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = (2.0 * (1.0 - sig(0.5 * (1.0 - 0.5))) + (1.0 - sig(0.5 * (0.5 + 2.0)))) / 2.0;
        close(&[loss.to_scalar::<f32>().unwrap()], &[want]);
        close(&rewards.to_vec1::<f32>().unwrap(), &[0.5, -1.0]);
        let negative = kl_estimate(&t(&[-5.0]), &t(&[-4.0])).unwrap();
        close(&negative.to_vec1::<f32>().unwrap(), &[0.0]);
    }
}
