//! `RUN_DIR/checkpoints/step-N/`: the model files, `optimizer.safetensors` (AdamW moments) and
//! `trainer_state.json` (step, data cursor, guard window, …). A checkpoint is written into a
//! hidden folder and renamed into place, so a kill mid-write never leaves a half checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::guard::OutlierGuard;
use crate::error::{Result, bad_input, failed};
use crate::model::folder::WEIGHTS;
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::model::weights::save_tensors;
use crate::output::write_atomic;

pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINER_STATE: &str = "trainer_state.json";
const PREFIX: &str = "step-";
const PARTIAL: &str = ".partial";
const REMOVING: &str = ".removing";
const CONFIG: &str = "config.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BestEval {
    pub step: u64,
    pub eval_loss: f64,
}

/// Everything besides weights and moments that a resumed run needs to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub optimizer_steps: u64,
    pub tokens_seen: u64,
    /// The learning rate of the last update (the schedule is a function of `step`).
    pub learning_rate: f64,
    /// The task's data cursor and any random state.
    pub data: Value,
    pub guard: OutlierGuard,
    pub eval_loss: Option<f64>,
    /// The latest evaluation's record (`eval_loss`, `eval_accuracy`, …).
    #[serde(default)]
    pub eval_metrics: serde_json::Map<String, Value>,
    pub best: Option<BestEval>,
    /// The model's shape: a resumed run must have the same.
    pub model_signature: Value,
    /// SHA-256 of the resolved configuration the run started with.
    pub config_sha256: String,
    pub seed: u64,
    pub threads: usize,
}

pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    pub fn new(run_dir: &Path, keep: usize) -> Self {
        Checkpoints { dir: run_dir.join("checkpoints"), keep: keep.max(1) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step}"))
    }

    /// Completed checkpoints, oldest first: a folder missing any file a checkpoint is written
    /// with (a deletion cut short by a kill) is not one.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(Vec::new()) };
        let mut found: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name.strip_prefix(PREFIX)?.parse::<u64>().ok()?;
                let has = |files: &[&str]| files.iter().all(|f| e.path().join(f).is_file());
                // The model folder, or a LoRA run's adapter folder.
                let complete = has(&[TRAINER_STATE, OPTIMIZER]) && (has(&[WEIGHTS, CONFIG]) || has(&[ADAPTER_WEIGHTS, ADAPTER_CONFIG]));
                complete.then(|| (step, e.path()))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// Remove a checkpoint folder so that no kill can leave part of it listed: it is renamed
    /// to a hidden name first (one atomic step), then deleted.
    fn remove(&self, path: &Path) -> Result<()> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let doomed = self.dir.join(format!(".{name}{REMOVING}"));
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed)?;
        }
        std::fs::rename(path, &doomed)?;
        std::fs::remove_dir_all(&doomed)?;
        Ok(())
    }

    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.list()?.pop())
    }

    /// Write checkpoint `state.step`: `write_model` fills the folder with the model files.
    pub fn save(
        &self,
        state: &TrainerState,
        optimizer: &[(String, candle_core::Tensor)],
        write_model: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let final_path = self.path(state.step);
        let staging = self.dir.join(format!(".{PREFIX}{}{PARTIAL}", state.step));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        write_model(&staging)?;
        save_tensors(&staging.join(OPTIMIZER), optimizer.iter().map(|(n, t)| (n.as_str(), t)))?;
        write_atomic(&staging.join(TRAINER_STATE), (serde_json::to_string_pretty(state)? + "\n").as_bytes())?;
        if final_path.exists() {
            self.remove(&final_path)?;
        }
        std::fs::rename(&staging, &final_path)?;
        self.prune(state.best.as_ref().map(|b| b.step))?;
        Ok(final_path)
    }

    /// Keep the newest `keep` checkpoints and the best one; remove the rest and any leftovers
    /// of an interrupted write.
    fn prune(&self, best_step: Option<u64>) -> Result<()> {
        let all = self.list()?;
        let newest: Vec<u64> = all.iter().rev().take(self.keep).map(|(s, _)| *s).collect();
        for (step, path) in &all {
            if !newest.contains(step) && Some(*step) != best_step {
                self.remove(path)?;
            }
        }
        self.remove_partials()
    }

    /// Remove what interrupted writes and deletions left: hidden staging and doomed folders,
    /// and step folders a kill left incomplete.
    pub fn remove_partials(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Ok(()) };
        let complete: Vec<PathBuf> = self.list()?.into_iter().map(|(_, p)| p).collect();
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let hidden = name.starts_with('.') && (name.ends_with(PARTIAL) || name.ends_with(REMOVING));
            let incomplete = name.starts_with(PREFIX) && entry.path().is_dir() && !complete.contains(&entry.path());
            if hidden || incomplete {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }
}

/// A checkpoint read back.
pub struct Restored {
    pub path: PathBuf,
    pub state: TrainerState,
    pub optimizer: BTreeMap<String, candle_core::Tensor>,
}

pub fn restore(path: &Path, device: &Device) -> Result<Restored> {
    let state_path = path.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| bad_input(&state_path, format!("cannot read: {e}")))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| bad_input(&state_path, format!("not a trainer state ({e})")))?;
    let optimizer_path = path.join(OPTIMIZER);
    let optimizer = candle_core::safetensors::load(&optimizer_path, device)
        .map_err(|e| failed(format!("{}: {e}", optimizer_path.display())))?;
    Ok(Restored { path: path.to_path_buf(), state, optimizer: optimizer.into_iter().collect() })
}
