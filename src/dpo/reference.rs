//! The reference model's log-probabilities: computed once before training from the model a
//! [`ReferenceSource`] names, kept in the run folder (`reference_logps.json`) and read back on
//! resume, so no second model is in memory while training.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, bad_input};
use crate::output::write_atomic;

pub const FILE: &str = "reference_logps.json";

/// Where the reference log-probabilities come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ReferenceSource {
    /// The policy as it is before the first update (TRL's default without `ref_model`).
    InitialPolicy { model: String },
    /// `--ref-model`.
    Model { model: String },
    /// A LoRA policy's base with the adapter turned off (TRL's reference for a PEFT model): the
    /// same weights the policy holds, so no second copy.
    AdapterOff { model: String },
}

impl ReferenceSource {
    pub fn describe(&self) -> String {
        match self {
            ReferenceSource::InitialPolicy { model } => format!("the policy as it starts ({model})"),
            ReferenceSource::Model { model } => model.clone(),
            ReferenceSource::AdapterOff { model } => format!("the base of the LoRA policy, adapter off ({model})"),
        }
    }
}

/// Two figures per example of one split: chosen and rejected (pairs), or the answer and the
/// mismatched KL sequence (KTO).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitLogps {
    pub first: Vec<f32>,
    pub second: Vec<f32>,
}

/// Every reference log-probability a run reads. f32 values survive JSON exactly (shortest
/// round-trip digits), so a resumed run sees the same bits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogps {
    /// What they were computed from and on: the source and every scored sequence's token ids.
    pub fingerprint: String,
    pub source: String,
    pub train: SplitLogps,
    pub eval: SplitLogps,
}

impl ReferenceLogps {
    /// The stored figures when they belong to `fingerprint`.
    pub fn load(run_dir: &Path, fingerprint: &str) -> Result<Option<Self>> {
        let path = run_dir.join(FILE);
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let stored: ReferenceLogps =
            serde_json::from_str(&text).map_err(|e| bad_input(&path, format!("not reference log-probabilities ({e}); delete it to recompute")))?;
        Ok((stored.fingerprint == fingerprint).then_some(stored))
    }

    pub fn save(&self, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir).map_err(|e| bad_input(run_dir, format!("cannot create: {e}")))?;
        write_atomic(&run_dir.join(FILE), (serde_json::to_string(self)? + "\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_figures_come_back_bit_for_bit_and_only_for_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let values = vec![-123.456_79f32, 0.1 + 0.2, f32::MIN_POSITIVE, -1.0 / 3.0];
        let stored = ReferenceLogps {
            fingerprint: "abc".into(),
            source: "m".into(),
            train: SplitLogps { first: values.clone(), second: values.iter().map(|v| v * 7.0).collect() },
            eval: SplitLogps::default(),
        };
        stored.save(dir.path()).unwrap();
        let back = ReferenceLogps::load(dir.path(), "abc").unwrap().unwrap();
        assert!(back.train.first.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(back, stored);
        assert_eq!(ReferenceLogps::load(dir.path(), "other").unwrap(), None);
    }
}
