//! The per-token arithmetic of PPO and GRPO, on plain vectors (one per episode, ragged): KL
//! estimators, the KL-shaped reward, generalised advantage estimation, whitening, group-relative
//! advantages and the adaptive KL coefficient. Kept free of tensors so each formula can be
//! checked against hand-computed values.

use serde::{Deserialize, Serialize};

/// How the per-token KL to the reference is estimated from sampled tokens (Schulman, "Approximating
/// KL divergence"): with `r = ref_logprob − logprob`, k1 = −r (unbiased, can be negative) and
/// k3 = (eʳ − 1) − r (unbiased, never negative, lower variance).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    K1,
    K3,
}

pub fn kl_per_token(logprobs: &[f32], ref_logprobs: &[f32], estimator: KlEstimator) -> Vec<f32> {
    logprobs
        .iter()
        .zip(ref_logprobs)
        .map(|(&lp, &rlp)| {
            let r = rlp - lp;
            match estimator {
                KlEstimator::K1 => -r,
                KlEstimator::K3 => r.exp_m1() - r,
            }
        })
        .collect()
}

/// Per-token rewards: `−kl_coef · kl` everywhere, plus the sequence's score on its last token.
pub fn shaped_rewards(kl: &[f32], score: f32, kl_coef: f32) -> Vec<f32> {
    let mut rewards: Vec<f32> = kl.iter().map(|&k| -kl_coef * k).collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    rewards
}

/// Generalised advantage estimation over one episode (the value after its last token is 0):
/// δₜ = rₜ + γ·Vₜ₊₁ − Vₜ, Aₜ = δₜ + γλ·Aₜ₊₁; returns Aₜ + Vₜ are the value targets.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut advantages = vec![0f32; n];
    let mut running = 0f32;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        running = delta + gamma * lambda * running;
        advantages[t] = running;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Mean and unbiased variance over every token of every episode, in f64.
fn mean_var(episodes: &[Vec<f32>]) -> (f64, f64) {
    let n: usize = episodes.iter().map(Vec::len).sum();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = episodes.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let squares = episodes.iter().flatten().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
    let var = if n > 1 { squares / (n - 1) as f64 } else { 0.0 };
    (mean, var)
}

/// Whiten across all tokens of the batch: zero mean (unless `keep_mean`), unit variance, as
/// TRL's `masked_whiten`.
pub fn whiten(episodes: &mut [Vec<f32>], keep_mean: bool) {
    let (mean, var) = mean_var(episodes);
    let scale = 1.0 / (var + 1e-8).sqrt();
    for x in episodes.iter_mut().flatten() {
        let centred = (*x as f64 - mean) * scale;
        *x = if keep_mean { (centred + mean) as f32 } else { centred as f32 };
    }
}

/// GRPO: each score relative to the others of its group (the samples of one prompt),
/// `(s − mean) / (std + 1e-4)` with the unbiased standard deviation; one value per episode.
pub fn group_advantages(scores: &[f32], group_size: usize) -> Vec<f32> {
    scores
        .chunks(group_size.max(1))
        .flat_map(|group| {
            let n = group.len() as f64;
            let mean = group.iter().map(|&s| s as f64).sum::<f64>() / n;
            let var = if group.len() > 1 { group.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
            let std = var.sqrt();
            group.iter().map(move |&s| ((s as f64 - mean) / (std + 1e-4)) as f32)
        })
        .collect()
}

/// The KL coefficient: fixed, or adapted towards a target KL per sequence (Ziegler et al.
/// 2019): `β ← β · (1 + clip(KL / target − 1, ±0.2) · episodes / horizon)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub coef: f64,
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn update(&mut self, kl: f64, episodes: usize) {
        let Some(target) = self.target else { return };
        if !kl.is_finite() {
            return;
        }
        let error = (kl / target - 1.0).clamp(-0.2, 0.2);
        self.coef *= 1.0 + error * episodes as f64 / self.horizon;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn kl_estimators_by_hand() {
        // logprob −1, ref −2: r = −1 → k1 = 1, k3 = e⁻¹ − 1 + 1 = 0.367879.
        // logprob −2, ref −1: r = 1 → k1 = −1, k3 = e − 1 − 1 = 0.718282.
        let (lp, rlp) = ([-1.0, -2.0, -0.5], [-2.0, -1.0, -0.5]);
        assert!(close(&kl_per_token(&lp, &rlp, KlEstimator::K1), &[1.0, -1.0, 0.0]));
        assert!(close(&kl_per_token(&lp, &rlp, KlEstimator::K3), &[0.367_879_4, 0.718_281_8, 0.0]));
    }

    #[test]
    fn score_lands_on_the_last_token() {
        assert!(close(&shaped_rewards(&[1.0, -1.0, 2.0], 5.0, 0.1), &[-0.1, 0.1, 4.8]));
    }

    #[test]
    fn gae_by_hand() {
        // r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 0.9, λ = 0.8.
        // δ₂ = 1 − 0.7 = 0.3;               A₂ = 0.3
        // δ₁ = 0 + 0.9·0.7 − 0.6 = 0.03;    A₁ = 0.03 + 0.72·0.3 = 0.246
        // δ₀ = 0 + 0.9·0.6 − 0.5 = 0.04;    A₀ = 0.04 + 0.72·0.246 = 0.21712
        let (a, ret) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 0.9, 0.8);
        assert!(close(&a, &[0.21712, 0.246, 0.3]), "{a:?}");
        assert!(close(&ret, &[0.71712, 0.846, 1.0]), "{ret:?}");
        // γ = λ = 1: every advantage is the return-to-go minus the value.
        let (a, _) = gae(&[1.0, 2.0], &[0.0, 0.0], 1.0, 1.0);
        assert!(close(&a, &[3.0, 2.0]));
    }

    #[test]
    fn whitening_spans_ragged_episodes() {
        // Tokens 1, 2, 3, 6: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3.
        let mut x = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        whiten(&mut x, false);
        let s = (14.0f64 / 3.0).sqrt() as f32;
        assert!(close(&x.concat(), &[-2.0 / s, -1.0 / s, 0.0, 3.0 / s]), "{x:?}");
        let mut y = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        whiten(&mut y, true);
        assert!(close(&y.concat(), &[3.0 - 2.0 / s, 3.0 - 1.0 / s, 3.0, 3.0 + 3.0 / s]));
    }

    #[test]
    fn group_advantages_by_hand() {
        // Group [1, 3]: mean 2, std √2; group [5, 5]: no spread, no advantage.
        let a = group_advantages(&[1.0, 3.0, 5.0, 5.0], 2);
        let s = 2f32.sqrt() + 1e-4;
        assert!(close(&a, &[-1.0 / s, 1.0 / s, 0.0, 0.0]), "{a:?}");
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target_and_fixed_stays() {
        let mut c = KlController { coef: 0.1, target: Some(6.0), horizon: 10000.0 };
        c.update(12.0, 8); // error clipped to 0.2: × (1 + 0.2 · 8 / 10000)
        assert!((c.coef - 0.1 * 1.00016).abs() < 1e-12);
        c.update(3.0, 100); // error −0.2: × (1 − 0.002)
        assert!((c.coef - 0.1 * 1.00016 * 0.998).abs() < 1e-12);
        let mut fixed = KlController { coef: 0.05, target: None, horizon: 10000.0 };
        fixed.update(100.0, 8);
        assert_eq!(fixed.coef, 0.05);
    }
}
