//! Skipping a step whose loss or gradient norm is an outlier (a z-score over a recent window),
//! as llm.c does, so one bad batch cannot wreck a run.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Recent values of one statistic.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Window {
    values: VecDeque<f64>,
}

impl Window {
    fn z_score(&self, value: f64) -> Option<f64> {
        if self.values.len() < 2 {
            return None;
        }
        let n = self.values.len() as f64;
        let mean = self.values.iter().sum::<f64>() / n;
        let variance = self.values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let std = variance.sqrt();
        (std > 0.0).then(|| (value - mean) / std)
    }

    fn push(&mut self, value: f64, capacity: usize) {
        if self.values.len() == capacity {
            self.values.pop_front();
        }
        self.values.push_back(value);
    }
}

/// Saved in checkpoints: a resumed run must skip exactly the steps the original would have.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OutlierGuard {
    losses: Window,
    grad_norms: Window,
}

/// What the guard decided for one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Keep,
    Skip { loss_z: f64, grad_norm_z: f64 },
}

impl OutlierGuard {
    /// Judge a step; `threshold` None never skips (but still records). Skipped values are not
    /// recorded, so one spike does not widen the window's notion of normal.
    pub fn judge(&mut self, loss: f64, grad_norm: f64, threshold: Option<f64>, window: usize) -> Verdict {
        let window = window.max(2);
        let loss_z = self.losses.z_score(loss).unwrap_or(0.0);
        let grad_norm_z = self.grad_norms.z_score(grad_norm).unwrap_or(0.0);
        let full = self.losses.values.len() >= window;
        if let Some(threshold) = threshold {
            if full && (loss_z > threshold || grad_norm_z > threshold) {
                return Verdict::Skip { loss_z, grad_norm_z };
            }
        }
        self.losses.push(loss, window);
        self.grad_norms.push(grad_norm, window);
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spike_is_skipped_once_the_window_is_full() {
        let mut guard = OutlierGuard::default();
        for i in 0..20 {
            let loss = 3.0 + 0.01 * (i % 3) as f64;
            assert_eq!(guard.judge(loss, 1.0 + 0.01 * (i % 2) as f64, Some(5.0), 16), Verdict::Keep);
        }
        assert!(matches!(guard.judge(30.0, 1.0, Some(5.0), 16), Verdict::Skip { .. }));
        assert!(matches!(guard.judge(3.0, 50.0, Some(5.0), 16), Verdict::Skip { .. }));
        assert_eq!(guard.judge(3.01, 1.0, Some(5.0), 16), Verdict::Keep);
        assert_eq!(guard.judge(30.0, 1.0, None, 16), Verdict::Keep);
    }
}
