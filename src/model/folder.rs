//! Hugging Face model folders: `config.json`, `model.safetensors` (or shards),
//! `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`.
//! A model argument is a local folder or a hub id found in the local hub cache.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value, json};

use super::chat::ChatTemplate;
use super::config::{Head, ModelConfig};
use super::decoder::Decoder;
use super::lora::{self, Adapter};
use super::weights::{Params, open_safetensors, unreadable_safetensors};
use crate::error::{Result, bad_input, usage};
use crate::output::write_atomic;
use crate::tokenizer::LoadedTokenizer;

pub const CONFIG: &str = "config.json";
/// Beside a LoRA adapter: the config.json of the tuned model (what `adapter merge` writes).
/// Not `config.json`, which would make transformers read the adapter folder as a full model.
pub const TUNED_CONFIG: &str = "tuned_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";

/// Turn a model argument into a folder: a local path, or `org/name` in the hub cache
/// (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). Never uses the network.
pub fn resolve(model: &str) -> Result<PathBuf> {
    resolve_in(model, &hub_cache())
}

fn resolve_in(model: &str, cache: &hf_hub::Cache) -> Result<PathBuf> {
    let local = PathBuf::from(model);
    if local.is_dir() {
        return Ok(local);
    }
    if local.exists() {
        return Err(bad_input(&local, "is a file, expected a model folder (config.json + model.safetensors)"));
    }
    let looks_like_hub_id = model.split('/').count() == 2
        && !model.starts_with('.')
        && !model.starts_with('/')
        && model.split('/').all(|part| !part.is_empty());
    if !looks_like_hub_id {
        return Err(bad_input(&local, "no such model folder"));
    }
    match cache.model(model.to_string()).get(CONFIG) {
        Some(config) => Ok(config.parent().map(Path::to_path_buf).unwrap_or(config)),
        None => Err(usage(format!(
            "model `{model}`: not a local folder and not in the Hugging Face cache at {} \
             (lathe reads the cache only; fetch it once with `huggingface-cli download {model}`)",
            cache.path().display()
        ))),
    }
}

fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE")) {
        Some(path) => hf_hub::Cache::new(PathBuf::from(path)),
        None => hf_hub::Cache::from_env(),
    }
}

/// The base model an adapter folder's `--base` names instead of its `base_model_name_or_path`.
static ADAPTER_BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--base MODEL`: the base of every adapter given as a model in this process.
pub fn set_adapter_base(base: String) {
    let _ = ADAPTER_BASE.set(base);
}

/// A model folder's files, read and checked. A LoRA adapter folder (`adapter_config.json`) is
/// a model too: its base supplies the weights, and whatever files the adapter folder holds
/// (tokenizer, chat template, a tuned config) take precedence over the base's.
pub struct ModelFolder {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub generation_config: Option<Value>,
    pub tokenizer_config: Map<String, Value>,
    pub chat_template: Option<String>,
    /// For an adapter folder: the base model folder.
    pub base: Option<Box<ModelFolder>>,
}

impl ModelFolder {
    /// Open a model argument (folder, adapter folder or hub id) and read its configuration files.
    pub fn open(model: &str) -> Result<Self> {
        let dir = resolve(model)?;
        if lora::is_adapter(&dir) {
            return Self::open_adapter(dir);
        }
        let config_path = dir.join(CONFIG);
        if !config_path.exists() {
            return Err(bad_input(&dir, "no config.json: not a Hugging Face model folder"));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let generation_config = read_json_if_present(&dir.join(GENERATION_CONFIG))?;
        let tokenizer_config = read_tokenizer_config(&dir)?;
        let chat_template = read_chat_template(&dir, &tokenizer_config)?;
        Ok(ModelFolder { dir, config, generation_config, tokenizer_config, chat_template, base: None })
    }

    /// An adapter folder on its base: `--base`, else `base_model_name_or_path` (relative to the
    /// adapter folder, absolute, or a hub id in the local cache).
    fn open_adapter(dir: PathBuf) -> Result<Self> {
        let (_, _, named) = lora::read_adapter_config(&dir)?;
        let base_arg = ADAPTER_BASE.get().cloned().unwrap_or(named);
        if base_arg.is_empty() {
            return Err(usage(format!("adapter {}: no base_model_name_or_path; pass --base MODEL", dir.display())));
        }
        let beside = dir.join(&base_arg);
        let base_arg = if Path::new(&base_arg).is_relative() && beside.is_dir() { beside.display().to_string() } else { base_arg };
        let base = ModelFolder::open(&base_arg).map_err(|e| {
            usage(format!("adapter {}: its base `{base_arg}` cannot be opened ({}); pass --base MODEL", dir.display(), e.one_line()))
        })?;
        if base.base.is_some() {
            return Err(bad_input(&dir, format!("its base {} is itself an adapter; merge that one first (adapter merge)", base.dir.display())));
        }
        // A tuned config lathe wrote beside the adapter (new stop tokens, a classifier head);
        // else the base's, with PEFT's classifier head when the adapter is one.
        let config = match dir.join(TUNED_CONFIG).exists() {
            true => {
                let tuned = ModelConfig::from_file(&dir.join(TUNED_CONFIG))?;
                check_same_architecture(&tuned, &base.config, &dir)?;
                tuned
            }
            false => adapter_head_config(&dir, &base.config)?,
        };
        let generation_config = read_json_if_present(&dir.join(GENERATION_CONFIG))?.or_else(|| base.generation_config.clone());
        let own = read_tokenizer_config(&dir)?;
        let tokenizer_config = if own.is_empty() { base.tokenizer_config.clone() } else { own };
        let chat_template = read_chat_template(&dir, &tokenizer_config)?.or_else(|| base.chat_template.clone());
        Ok(ModelFolder { dir, config, generation_config, tokenizer_config, chat_template, base: Some(Box::new(base)) })
    }

    /// Where `tokenizer.json` is: the folder's own, else (an adapter without one) the base's.
    fn tokenizer_dir(&self) -> &Path {
        match &self.base {
            Some(base) if !self.dir.join(TOKENIZER).exists() => &base.dir,
            _ => &self.dir,
        }
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.tokenizer_dir().join(TOKENIZER)
    }

    pub fn load_tokenizer(&self) -> Result<LoadedTokenizer> {
        LoadedTokenizer::load(self.tokenizer_dir())
    }

    /// The adapter of an adapter folder (its A/B pairs on `device`).
    pub fn load_adapter(&self, device: &Device) -> Result<Option<Adapter>> {
        self.base.as_ref().map(|_| Adapter::load(&self.dir, &self.config, device)).transpose()
    }

    /// The base model's parameters, with the head this folder's config wants (a classifier
    /// adapter's base loses its LM head): what a LoRA trainer freezes.
    pub fn load_base_params(&self, device: &Device) -> Result<Params> {
        let Some(base) = &self.base else { return self.load_params(device) };
        let mut params = base.load_params(device)?;
        if matches!(self.config.head, Head::SequenceClassification { .. }) {
            params.remove("lm_head.weight");
        }
        Ok(params)
    }

    /// The folder's tokenizer, refused when it has more tokens than the model has embedding rows.
    pub fn load_matching_tokenizer(&self) -> Result<LoadedTokenizer> {
        let tokenizer = self.load_tokenizer()?;
        if tokenizer.vocab_size > self.config.vocab_size {
            return Err(bad_input(
                tokenizer.path.clone(),
                format!(
                    "{} tokens, but the model has {} embedding rows: tokenizer and model do not match",
                    tokenizer.vocab_size, self.config.vocab_size
                ),
            ));
        }
        Ok(tokenizer)
    }

    /// Refuse `--max-length` values the model cannot take (below 2, or past its positions).
    pub fn check_max_length(&self, max_length: usize) -> Result<()> {
        let positions = self.config.max_position_embeddings;
        if max_length < 2 || max_length > positions {
            return Err(usage(format!(
                "--max-length {max_length} must be between 2 and model {}'s max_position_embeddings {positions}",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// The `--max-length` a stage uses with this model: an explicit value must fit (see
    /// [`Self::check_max_length`]); the stage's default is lowered to the model's
    /// `max_position_embeddings`, with a note, when the model is shorter.
    pub fn fit_max_length(&self, stage: &str, explicit: Option<usize>, default: usize) -> Result<usize> {
        let chosen = match explicit {
            Some(n) => n,
            None if default > self.config.max_position_embeddings => {
                let positions = self.config.max_position_embeddings;
                crate::progress::warn(format!(
                    "note: {stage}: --max-length {positions} (the default {default} is longer than {}'s max_position_embeddings)",
                    self.dir.display()
                ));
                positions
            }
            None => default,
        };
        self.check_max_length(chosen)?;
        Ok(chosen)
    }

    /// The float dtype the weights are stored in (loaded as f32 whatever it is).
    pub fn stored_dtype(&self) -> Result<DType> {
        let first = self.weight_files()?.into_iter().next().ok_or_else(|| bad_input(&self.dir, "no weight files"))?;
        let header = safetensors_header(&first)?;
        let stored = header.iter().filter(|(name, _)| *name != "__metadata__").find_map(|(_, info)| info["dtype"].as_str());
        Ok(match stored {
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            Some("F64") => DType::F64,
            _ => DType::F32,
        })
    }

    /// The weight files: `model.safetensors`, or the shards its index names (an adapter's base's).
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        if let Some(base) = &self.base {
            return base.weight_files();
        }
        let single = self.dir.join(WEIGHTS);
        if single.exists() {
            return Ok(vec![single]);
        }
        let index_path = self.dir.join(WEIGHTS_INDEX);
        let Some(index) = read_json_if_present(&index_path)? else {
            return Err(bad_input(&self.dir, "no model.safetensors (nor a sharded index)"));
        };
        let mut shards: Vec<String> = index["weight_map"]
            .as_object()
            .ok_or_else(|| bad_input(&index_path, "no `weight_map` object"))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        Ok(shards.into_iter().map(|s| self.dir.join(s)).collect())
    }

    /// The model's parameters; an adapter folder's are its base's with the adapter merged in.
    pub fn load_params(&self, device: &Device) -> Result<Params> {
        if self.base.is_some() {
            let mut params = self.load_base_params(device)?;
            let adapter = self.load_adapter(device)?.expect("an adapter folder has an adapter");
            adapter.merge_into(&mut params)?;
            params.check(&self.config, &self.dir.join(lora::ADAPTER_WEIGHTS))?;
            return Ok(params);
        }
        let files = self.weight_files()?;
        let mut params = Params::load(&files, device)?;
        // Older checkpoints carry rotary tables as buffers; we compute our own.
        let stale: Vec<String> = params.names().filter(|n| n.ends_with("rotary_emb.inv_freq")).map(str::to_string).collect();
        for name in stale {
            params.remove(&name);
        }
        params.check(&self.config, files.first().map_or(self.dir.as_path(), PathBuf::as_path))?;
        Ok(params)
    }

    /// Load weights and build the model.
    pub fn load_model(&self, device: &Device) -> Result<(Decoder, Params)> {
        let params = self.load_params(device)?;
        let model = Decoder::new(&self.config, &params)?;
        Ok((model, params))
    }

    /// The chat template with the folder's special tokens, if the folder has one.
    pub fn chat(&self) -> Result<Option<ChatTemplate>> {
        self.chat_template
            .as_deref()
            .map(|source| ChatTemplate::new(source, special_tokens(&self.tokenizer_config)))
            .transpose()
    }

    /// Token ids that end generation: generation_config's, else config's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_generation = self
            .generation_config
            .as_ref()
            .map(|g| match &g["eos_token_id"] {
                Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Value::Array(items) => items.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect(),
                _ => Vec::new(),
            })
            .unwrap_or_default();
        if from_generation.is_empty() { self.config.eos_token_ids.clone() } else { from_generation }
    }
}

/// A tuned config beside an adapter must describe its base's architecture.
fn check_same_architecture(tuned: &ModelConfig, base: &ModelConfig, dir: &Path) -> Result<()> {
    let shape = |c: &ModelConfig| {
        (c.family, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size)
    };
    if shape(tuned) != shape(base) || tuned.arch != base.arch {
        return Err(bad_input(
            dir.join(TUNED_CONFIG),
            "describes another model than the adapter's base (family, shape or vocabulary differ); pass the right --base",
        ));
    }
    Ok(())
}

/// A PEFT-written adapter's config: the base's, as a classifier when the adapter is one
/// (`task_type: SEQ_CLS`, its `score` head saved in full).
fn adapter_head_config(dir: &Path, base: &ModelConfig) -> Result<ModelConfig> {
    let (raw, _, _) = lora::read_adapter_config(dir)?;
    let mut config = base.clone();
    if raw.get("task_type").and_then(Value::as_str) == Some("SEQ_CLS") {
        let file = dir.join(lora::ADAPTER_WEIGHTS);
        let tensors = safetensors_shapes(&file)?;
        let rows = tensors
            .get(lora::SCORE)
            .and_then(|shape| shape.first().copied())
            .ok_or_else(|| bad_input(&file, format!("a SEQ_CLS adapter without `{}` (PEFT saves the head it trained)", lora::SCORE)))?;
        config.head = Head::SequenceClassification { num_labels: rows };
    }
    Ok(config)
}

/// A safetensors file's JSON header (name → dtype, shape, offsets), read without the tensors:
/// an 8-byte little-endian length, then that many bytes of JSON.
fn safetensors_header(file: &Path) -> Result<Map<String, Value>> {
    let header = open_safetensors(file)?;
    serde_json::from_slice(&header.json).map_err(|e| unreadable_safetensors(file, e))
}

/// Tensor names and shapes of a safetensors file, without reading the tensors.
fn safetensors_shapes(file: &Path) -> Result<std::collections::HashMap<String, Vec<usize>>> {
    let shape = |info: &Value| info["shape"].as_array().map(|dims| dims.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect());
    Ok(safetensors_header(file)?.iter().filter_map(|(name, info)| Some((name.clone(), shape(info)?))).collect())
}

/// transformers' name of a dtype (`config.json`'s `dtype`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad_input(path, format!("not valid JSON ({e})")))
}

/// `chat_template.jinja` (transformers 5), else `chat_template` in `tokenizer_config.json`
/// (a string, or a list of named templates of which `default` is used).
fn read_chat_template(dir: &Path, tokenizer_config: &Map<String, Value>) -> Result<Option<String>> {
    let file = dir.join(CHAT_TEMPLATE);
    if file.exists() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|e| bad_input(&file, format!("cannot read: {e}")));
    }
    Ok(match tokenizer_config.get("chat_template") {
        Some(Value::String(template)) => Some(template.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| named.first())
            .and_then(|t| t["template"].as_str().map(str::to_string)),
        _ => None,
    })
}

/// A folder's `tokenizer_config.json`; empty when it has none.
pub fn read_tokenizer_config(dir: &Path) -> Result<Map<String, Value>> {
    match read_json_if_present(&dir.join(TOKENIZER_CONFIG))? {
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(bad_input(dir.join(TOKENIZER_CONFIG), "expected a JSON object")),
        None => Ok(Map::new()),
    }
}

/// The EOS token a folder's `tokenizer_config.json` names, if any.
pub fn read_eos_token(dir: &Path) -> Result<Option<String>> {
    let config = read_json_if_present(&dir.join(TOKENIZER_CONFIG))?;
    Ok(config.and_then(|c| token_string(&c["eos_token"])))
}

/// Special tokens as a template sees them (`bos_token`, `eos_token`, …).
pub fn special_tokens(tokenizer_config: &Map<String, Value>) -> Vec<(String, String)> {
    ["bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"]
        .iter()
        .filter_map(|key| tokenizer_config.get(*key).and_then(token_string).map(|t| (key.to_string(), t)))
        .collect()
}

/// A token given as a string or as `{"content": …}` (older tokenizer configs).
fn token_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Everything a model folder holds, for writing.
pub struct ModelFiles<'a> {
    pub config: &'a ModelConfig,
    pub params: &'a Params,
    /// `tokenizer.json` content, written as given.
    pub tokenizer_json: &'a str,
    pub tokenizer_config: &'a Map<String, Value>,
    pub chat_template: Option<&'a str>,
    pub generation_config: Option<&'a Value>,
}

/// A model folder's files besides config and weights, as a training stage carries them from
/// its input model to its output.
#[derive(Clone)]
pub struct FolderParts {
    pub tokenizer_json: String,
    pub tokenizer_config: Map<String, Value>,
    pub chat_template: Option<String>,
    pub generation_config: Option<Value>,
}

impl FolderParts {
    /// The parts of an existing folder, with its tokenizer as loaded (possibly grown).
    pub fn of(folder: &ModelFolder, tokenizer: &LoadedTokenizer) -> Result<Self> {
        Ok(FolderParts {
            tokenizer_json: tokenizer.tokenizer.to_string(false)?,
            tokenizer_config: folder.tokenizer_config.clone(),
            chat_template: folder.chat_template.clone(),
            generation_config: folder.generation_config.clone(),
        })
    }

    pub fn save(&self, dir: &Path, config: &ModelConfig, params: &Params) -> Result<()> {
        save(dir, &self.files(config, params))
    }

    /// Every file of the folder but the weights, beside a LoRA adapter: its tokenizer and the
    /// tuned config (new stop tokens, a classifier head) as `tuned_config.json`, which PEFT
    /// and transformers ignore and lathe reads.
    pub fn save_beside_adapter(&self, dir: &Path, config: &ModelConfig) -> Result<()> {
        save_files(dir, &self.files(config, &Params::default()), None)
    }

    fn files<'a>(&'a self, config: &'a ModelConfig, params: &'a Params) -> ModelFiles<'a> {
        ModelFiles {
            config,
            params,
            tokenizer_json: &self.tokenizer_json,
            tokenizer_config: &self.tokenizer_config,
            chat_template: self.chat_template.as_deref(),
            generation_config: self.generation_config.as_ref(),
        }
    }
}

/// Write a model folder in transformers' layout. Each file lands atomically.
pub fn save(dir: &Path, files: &ModelFiles) -> Result<()> {
    save_files(dir, files, Some(DType::F32))
}

/// [`save`] with the weights stored as `dtype` (a merged adapter keeps its base's bf16).
pub fn save_as(dir: &Path, files: &ModelFiles, dtype: DType) -> Result<()> {
    save_files(dir, files, Some(dtype))
}

/// `weights: None` writes everything but the weights, the config as `tuned_config.json`.
fn save_files(dir: &Path, files: &ModelFiles, weights: Option<DType>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| bad_input(dir, format!("cannot create folder: {e}")))?;
    let config_name = if weights.is_some() { CONFIG } else { TUNED_CONFIG };
    let mut config = files.config.to_json();
    if let Some(dtype) = weights {
        config["dtype"] = json!(dtype_name(dtype));
    }
    write_atomic(&dir.join(config_name), pretty_json(&config)?.as_bytes())?;
    let generation = files.generation_config.cloned().unwrap_or_else(|| default_generation_config(files.config));
    write_atomic(&dir.join(GENERATION_CONFIG), pretty_json(&generation)?.as_bytes())?;
    match weights {
        Some(DType::F32) => files.params.save(&dir.join(WEIGHTS))?,
        Some(dtype) => {
            let converted: Vec<(&str, Tensor)> =
                files.params.iter().map(|(name, var)| Ok((name, var.as_tensor().to_dtype(dtype)?))).collect::<Result<_>>()?;
            super::weights::save_tensors(&dir.join(WEIGHTS), converted.iter().map(|(n, t)| (*n, t)))?;
        }
        None => {}
    }
    write_atomic(&dir.join(TOKENIZER), files.tokenizer_json.as_bytes())?;
    let mut tokenizer_config = files.tokenizer_config.clone();
    match files.chat_template {
        Some(template) => {
            // Both places: transformers 5 reads the .jinja file, 4.x the config key.
            tokenizer_config.insert("chat_template".into(), json!(template));
            write_atomic(&dir.join(CHAT_TEMPLATE), template.as_bytes())?;
        }
        None => {
            tokenizer_config.remove("chat_template");
        }
    }
    write_atomic(&dir.join(TOKENIZER_CONFIG), pretty_json(&Value::Object(tokenizer_config))?.as_bytes())?;
    Ok(())
}

fn default_generation_config(config: &ModelConfig) -> Value {
    let eos = match config.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    json!({
        "_from_model_config": true,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
    })
}

/// JSON as transformers writes it: two-space indent, sorted keys, trailing newline.
fn pretty_json(value: &Value) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// `tokenizer_config.json` for a tokenizer we trained (special tokens of [`crate::tokenizer`]).
pub fn tokenizer_config_for_trained() -> Map<String, Value> {
    let value = json!({
        "backend": "tokenizers",
        "bos_token": null,
        "eos_token": crate::tokenizer::EOS_TOKEN,
        "pad_token": crate::tokenizer::PAD_TOKEN,
        "unk_token": null,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    value.as_object().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny").join(name)
    }

    fn open(dir: &Path) -> ModelFolder {
        ModelFolder::open(dir.to_str().unwrap()).unwrap()
    }

    fn resave(folder: &ModelFolder, to: &Path) {
        let params = folder.load_params(&Device::Cpu).unwrap();
        let tokenizer_json = std::fs::read_to_string(folder.tokenizer_path()).unwrap();
        let files = ModelFiles {
            config: &folder.config,
            params: &params,
            tokenizer_json: &tokenizer_json,
            tokenizer_config: &folder.tokenizer_config,
            chat_template: folder.chat_template.as_deref(),
            generation_config: folder.generation_config.as_ref(),
        };
        save(to, &files).unwrap();
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn chat_template_renders_the_fixture_strings() {
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
        let case = &expected["chat_template"];
        let messages: Vec<crate::data::Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let template = open(&fixture("causal-lm")).chat().unwrap().expect("the fixture has a template");
        assert_eq!(template.render(&messages, false).unwrap(), case["rendered"].as_str().unwrap());
        assert_eq!(
            template.render(&messages[..1], true).unwrap(),
            case["generation_prompt_rendered"].as_str().unwrap()
        );
    }

    #[test]
    fn save_then_load_is_bit_identical_with_the_hf_layout() {
        let original = open(&fixture("causal-lm"));
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        resave(&original, &first);
        let reloaded = open(&first);
        resave(&reloaded, &second);

        assert_eq!(file_names(&first), file_names(&fixture("causal-lm")));
        for name in file_names(&first) {
            let (a, b) = (std::fs::read(first.join(&name)).unwrap(), std::fs::read(second.join(&name)).unwrap());
            assert!(a == b, "{name} differs between two saves");
        }
        let theirs = candle_core::safetensors::load(fixture("causal-lm").join(WEIGHTS), &Device::Cpu).unwrap();
        let ours = candle_core::safetensors::load(first.join(WEIGHTS), &Device::Cpu).unwrap();
        let mut their_names: Vec<&String> = theirs.keys().collect();
        let mut our_names: Vec<&String> = ours.keys().collect();
        their_names.sort();
        our_names.sort();
        assert_eq!(our_names, their_names);
        for (name, tensor) in &theirs {
            let a: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = ours[name].flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} changed");
        }
        assert_eq!(reloaded.config.to_json(), original.config.to_json());
        assert_eq!(reloaded.chat_template, original.chat_template);
        assert_eq!(reloaded.eos_token_ids(), vec![0]);
    }

    #[test]
    fn hub_ids_resolve_from_the_local_cache_only() {
        let cache_dir = tempfile::tempdir().unwrap();
        let repo = cache_dir.path().join("models--org--tiny");
        let snapshot = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        std::fs::write(snapshot.join(CONFIG), "{}").unwrap();
        let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
        assert_eq!(resolve_in("org/tiny", &cache).unwrap(), snapshot);
        let missing = resolve_in("org/absent", &cache).unwrap_err();
        assert_eq!(missing.exit_code(), 2);
        assert!(missing.to_string().contains("huggingface-cli download org/absent"), "{missing}");
        assert_eq!(resolve_in("no/such/local/dir", &cache).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn missing_tensor_is_bad_input_naming_it() {
        let original = open(&fixture("causal-lm"));
        let dir = tempfile::tempdir().unwrap();
        let mut params = original.load_params(&Device::Cpu).unwrap();
        params.remove("model.layers.1.mlp.up_proj.weight");
        params.save(&dir.path().join(WEIGHTS)).unwrap();
        std::fs::copy(fixture("causal-lm").join(CONFIG), dir.path().join(CONFIG)).unwrap();
        let folder = open(dir.path());
        let e = folder.load_params(&Device::Cpu).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    }
}
