//! Learning-rate schedules: a pure function of the step, so a resumed run follows the same
//! curve without saving anything but the step.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Linear warm-up, then constant.
    Constant,
    /// Linear warm-up, then cosine decay to `min_lr` at the last step.
    Cosine,
    /// Linear warm-up, then linear decay to `min_lr` at the last step (TRL's PPO default).
    Linear,
    /// Warm-up, stable, decay: linear warm-up, constant, then linear decay to `min_lr` over the
    /// last `decay_steps`.
    Wsd,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Wsd only: length of the final decay.
    pub decay_steps: u64,
}

impl Schedule {
    /// Learning rate of update `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Linear => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.lr + (self.min_lr - self.lr) * progress
            }
            ScheduleKind::Wsd => {
                let decay_start = self.total_steps.saturating_sub(self.decay_steps).max(self.warmup_steps);
                if step < decay_start {
                    self.lr
                } else {
                    let span = self.total_steps.saturating_sub(decay_start).max(1);
                    let progress = ((step - decay_start + 1) as f64 / span as f64).min(1.0);
                    self.lr + (self.min_lr - self.lr) * progress
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule { kind, lr: 1.0, min_lr: 0.1, warmup_steps: 10, total_steps: 110, decay_steps: 20 }
    }

    #[test]
    fn linear_decays_from_the_peak_after_warmup() {
        let s = schedule(ScheduleKind::Linear);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn warmup_is_linear_and_reaches_the_peak() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_ends_at_min_lr_and_decreases() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((10..110).all(|i| s.lr_at(i + 1) <= s.lr_at(i)));
    }

    #[test]
    fn wsd_is_stable_then_decays() {
        let s = schedule(ScheduleKind::Wsd);
        assert_eq!(s.lr_at(50), 1.0);
        assert_eq!(s.lr_at(89), 1.0);
        assert!(s.lr_at(90) < 1.0);
        assert!((s.lr_at(109) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn constant_stays() {
        let s = Schedule { warmup_steps: 0, ..schedule(ScheduleKind::Constant) };
        assert_eq!(s.lr_at(0), 1.0);
        assert_eq!(s.lr_at(1000), 1.0);
    }
}
