//! The model a trainer tunes: every parameter (full fine-tuning), or a LoRA adapter on a frozen
//! base, as PEFT does. The engine optimises [`TunedModel::params`]; the run folder is a model
//! folder, or a PEFT adapter folder with the tokenizer and the tuned config beside it.

use std::path::Path;

use candle_core::Device;

use crate::error::{Result, usage};
use crate::model::folder::{self, FolderParts, ModelFolder};
use crate::model::lora::{self, Adapter, LoraSettings};
use crate::model::{Decoder, ModelConfig, Params};

/// What a trainer starts from, before its own changes (a grown vocabulary, a new head).
pub enum Start {
    Full(Params),
    /// A frozen base and the adapter that trains: a new one, or the adapter of `--model`.
    Lora { base: Params, adapter: Adapter },
}

impl Start {
    /// `--model` as the trainer will tune it: an adapter folder continues its adapter; LoRA
    /// settings put a new adapter on any other model.
    pub fn open(folder: &ModelFolder, lora: Option<&LoraSettings>, seed: u64, device: &Device) -> Result<Self> {
        match (folder.base.is_some(), lora) {
            (true, Some(_)) => Err(usage(format!(
                "{} is a LoRA adapter, which trains on as it is: drop the --lora-* flags (or `adapter merge` it first)",
                folder.dir.display()
            ))),
            (true, None) => {
                let adapter = folder.load_adapter(device)?.expect("an adapter folder has an adapter");
                Ok(Start::Lora { base: folder.load_base_params(device)?, adapter })
            }
            (false, Some(settings)) => {
                let adapter = Adapter::new(settings.clone(), &folder.config, &base_name(folder), seed, device)?;
                Ok(Start::Lora { base: folder.load_params(device)?, adapter })
            }
            (false, None) => Ok(Start::Full(folder.load_params(device)?)),
        }
    }

    /// The parameters that will train (for a trainer's own changes, e.g. a new head).
    pub fn is_lora(&self) -> bool {
        matches!(self, Start::Lora { .. })
    }
}

/// `base_model_name_or_path` for a new adapter: the base folder's absolute path, so the adapter
/// opens from anywhere on this machine (PEFT keeps what it was given, often a hub id).
fn base_name(folder: &ModelFolder) -> String {
    std::fs::canonicalize(&folder.dir).unwrap_or_else(|_| folder.dir.clone()).display().to_string()
}

pub struct TunedModel {
    pub config: ModelConfig,
    pub decoder: Decoder,
    /// Every parameter, or the adapter's.
    params: Params,
    adapter: Option<Adapter>,
    seed: u64,
}

impl TunedModel {
    /// Build the decoder over `start` for `config` (the base is held once, by the decoder).
    pub fn new(config: ModelConfig, start: Start, gradient_checkpointing: bool, seed: u64) -> Result<Self> {
        let (mut decoder, params, adapter) = match start {
            Start::Full(params) => (Decoder::new(&config, &params)?, params, None),
            Start::Lora { base, adapter } => {
                let decoder = Decoder::with_adapter(&config, &base, &adapter)?;
                (decoder, adapter.params.clone(), Some(adapter))
            }
        };
        decoder.set_gradient_checkpointing(gradient_checkpointing);
        Ok(TunedModel { config, decoder, params, adapter, seed })
    }

    /// The parameters the optimizer updates.
    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// Write the model folder, or the adapter folder with the folder's other files.
    pub fn save(&self, dir: &Path, parts: &FolderParts) -> Result<()> {
        self.save_as(dir, parts, &self.config)
    }

    /// [`Self::save`] with a config the trainer completed (calibration, scoring format).
    pub fn save_as(&self, dir: &Path, parts: &FolderParts, config: &ModelConfig) -> Result<()> {
        match &self.adapter {
            None => parts.save(dir, config, &self.params),
            Some(adapter) => {
                parts.save_beside_adapter(dir, config)?;
                adapter.save(dir, config)
            }
        }
    }

    /// Read a checkpoint's weights back into the trained parameters.
    pub fn load_checkpoint(&self, dir: &Path) -> Result<()> {
        let file = if self.adapter.is_some() { lora::ADAPTER_WEIGHTS } else { folder::WEIGHTS };
        self.params.load_values(&dir.join(file))
    }

    /// Run `f` on a decoder of the current weights that records no gradients: a snapshot for
    /// full fine-tuning, the adapted decoder itself for LoRA (no second copy of the base).
    pub fn sampling<R>(&self, f: impl FnOnce(&Decoder) -> Result<R>) -> Result<R> {
        match &self.adapter {
            None => f(&Decoder::new_inference(&self.config, &self.params)?),
            Some(_) => self.no_grad(f),
        }
    }

    /// The adapter's dropout masks for the micro-batch numbered `key` (a data cursor's count,
    /// so a resumed run draws the same masks); `None` turns dropout off (evaluation).
    pub fn dropout_for(&self, key: Option<u64>) {
        let seed = key.map(|k| self.seed.rotate_left(17) ^ k.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        self.decoder.adapter_switch().set_dropout_seed(seed);
    }

    /// Run `f` on the trained decoder for figures that need no gradients, without dropout:
    /// LoRA's records none; a full model's graph is simply dropped with the result.
    pub fn no_grad<R>(&self, f: impl FnOnce(&Decoder) -> Result<R>) -> Result<R> {
        let switch = self.decoder.adapter_switch();
        switch.set_grad(false);
        switch.set_dropout_seed(None);
        let out = f(&self.decoder);
        switch.set_grad(true);
        out
    }

    /// Run `f` on the base model (the adapter off): LoRA's reference, without a second copy.
    pub fn base<R>(&self, f: impl FnOnce(&Decoder) -> Result<R>) -> Option<Result<R>> {
        self.adapter.as_ref()?;
        let switch = self.decoder.adapter_switch();
        switch.set_enabled(false);
        switch.set_grad(false);
        let out = f(&self.decoder);
        switch.set_enabled(true);
        switch.set_grad(true);
        Some(out)
    }

    /// A LoRA base's vocabulary cannot grow: refuse, naming what would need it.
    pub fn check_vocab_fits(start: &Start, config: &ModelConfig, wanted: usize, why: &str) -> Result<()> {
        if start.is_lora() && wanted > config.vocab_size {
            return Err(usage(format!(
                "{why} needs {wanted} embedding rows but a LoRA base keeps its {}; fine-tune fully, or pass a chat template using existing tokens",
                config.vocab_size
            )));
        }
        Ok(())
    }
}
