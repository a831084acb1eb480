//! The `adapter` stage: fold a LoRA adapter into its base (`merge`) and describe one
//! (`inspect`). Any adapter folder, PEFT's or lathe's, is a model to every other stage already.

use std::path::Path;

use candle_core::Device;
use serde::Serialize;

use crate::error::{Result, bad_input};
use crate::model::ModelFolder;
use crate::model::folder::{self, FolderParts};
use crate::model::lora::Targets;
use crate::output::check_distinct;

/// Write `W + scale · B A` for every adapted module (and the adapter's head) as a plain model
/// folder in the base's family layout and dtype.
pub fn merge(adapter: &str, output: &Path) -> Result<MergeReport> {
    let folder = ModelFolder::open(adapter)?;
    let Some(base) = &folder.base else {
        return Err(bad_input(&folder.dir, "is not a LoRA adapter folder (no adapter_config.json)"));
    };
    check_distinct(output, &[&folder.dir, &base.dir])?;
    let dtype = base.stored_dtype()?;
    let params = folder.load_params(&Device::Cpu)?;
    let tokenizer = folder.load_tokenizer()?;
    let parts = FolderParts::of(&folder, &tokenizer)?;
    let files = folder::ModelFiles {
        config: &folder.config,
        params: &params,
        tokenizer_json: &parts.tokenizer_json,
        tokenizer_config: &parts.tokenizer_config,
        chat_template: parts.chat_template.as_deref(),
        generation_config: parts.generation_config.as_ref(),
    };
    folder::save_as(output, &files, dtype)?;
    Ok(MergeReport {
        base: base.dir.display().to_string(),
        architecture: folder.config.architecture_name(),
        dtype: folder::dtype_name(dtype).to_string(),
        parameters: params.num_elements(),
    })
}

#[derive(Debug, Serialize)]
pub struct MergeReport {
    pub base: String,
    pub architecture: String,
    pub dtype: String,
    pub parameters: usize,
}

/// What an adapter is: its rank and scale, what it wraps, its size and its base.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub adapter: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub scale: f64,
    pub use_rslora: bool,
    pub lora_dropout: f64,
    /// `target_modules` as the adapter names them.
    pub target_modules: Vec<String>,
    /// The modules of the base it wraps.
    pub modules: usize,
    pub parameters: usize,
    pub base: String,
    pub base_architecture: String,
    pub base_parameters: usize,
}

pub fn inspect(adapter: &str) -> Result<Inspection> {
    let folder = ModelFolder::open(adapter)?;
    let Some(base) = &folder.base else {
        return Err(bad_input(&folder.dir, "is not a LoRA adapter folder (no adapter_config.json)"));
    };
    let loaded = folder.load_adapter(&Device::Cpu)?.expect("an adapter folder has an adapter");
    let s = &loaded.settings;
    let targets = match &s.targets {
        Targets::AllLinear => vec!["all-linear".to_string()],
        // PEFT spells "all-linear" out as full module paths: show the module names once.
        Targets::Names(names) => {
            let mut short: Vec<String> = names.iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_string()).collect();
            short.sort();
            short.dedup();
            short
        }
        Targets::Pattern(pattern) => vec![pattern.clone()],
    };
    let base_parameters = crate::limits::parameters(&base.config) as usize;
    Ok(Inspection {
        adapter: folder.dir.display().to_string(),
        task_type: if folder.config.head == crate::model::Head::CausalLm { "CAUSAL_LM" } else { "SEQ_CLS" }.to_string(),
        r: s.r,
        lora_alpha: s.alpha,
        scale: s.scale(),
        use_rslora: s.use_rslora,
        lora_dropout: s.dropout,
        target_modules: targets,
        modules: loaded.modules.len(),
        parameters: loaded.num_parameters(),
        base: base.dir.display().to_string(),
        base_architecture: base.config.architecture_name(),
        base_parameters,
    })
}
