//! LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors` with
//! PEFT's tensor names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
//! `[r, in]`, `…lora_B.weight` `[out, r]`). The decoder's linear layers take an adapter's
//! pair as they are built (`W x + scale · B A x`); [`Adapter::merge`] folds it into the weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use super::config::{Head, ModelConfig};
use super::weights::{Params, save_tensors};
use crate::error::{Result, bad_input, usage};
use crate::output::write_atomic;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of every adapter tensor name.
const PREFIX: &str = "base_model.model.";

/// LoRA flags shared by every trainer.
#[derive(clap::Args, serde::Serialize, Debug, Clone)]
pub struct LoraArgs {
    /// LoRA rank: train a PEFT adapter of this rank on frozen weights (0: full fine-tuning).
    #[arg(long, default_value_t = 0)]
    pub lora_r: usize,
    /// LoRA scale numerator [default: 2 × --lora-r].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on each adapter's input while training.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Modules to adapt: all-linear, or Hugging Face module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; Phi-3: qkv_proj, gate_up_proj).
    #[arg(long, value_name = "all-linear|NAME,NAME…")]
    pub lora_target: Option<String>,
    /// rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.
    #[arg(long)]
    pub use_rslora: bool,
}

impl LoraArgs {
    /// The adapter settings asked for, or `None` for full fine-tuning. LoRA flags without a
    /// rank are refused rather than ignored.
    pub fn settings(&self) -> Result<Option<LoraSettings>> {
        if self.lora_r == 0 {
            let stray = [
                self.lora_alpha.map(|_| "--lora-alpha"),
                self.lora_dropout.map(|_| "--lora-dropout"),
                self.lora_target.as_ref().map(|_| "--lora-target"),
                self.use_rslora.then_some("--use-rslora"),
            ];
            if let Some(flag) = stray.into_iter().flatten().next() {
                return Err(usage(format!("{flag} needs --lora-r above 0 (--lora-r 0 is full fine-tuning)")));
            }
            return Ok(None);
        }
        let dropout = self.lora_dropout.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(usage(format!("--lora-dropout {dropout}: expected a number in [0, 1)")));
        }
        let alpha = self.lora_alpha.unwrap_or(2.0 * self.lora_r as f64);
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(usage(format!("--lora-alpha {alpha}: expected a positive number")));
        }
        let targets = match self.lora_target.as_deref().unwrap_or("all-linear") {
            "all-linear" => Targets::AllLinear,
            names => Targets::Names(names.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
        };
        Ok(Some(LoraSettings { r: self.lora_r, alpha, dropout, targets, use_rslora: self.use_rslora }))
    }
}

/// Which linear layers an adapter wraps, as PEFT's `target_modules` says it.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Every linear layer of the decoder, never the LM head or the score head.
    AllLinear,
    /// Module names or full paths: a module matches when its path equals one or ends with
    /// `.NAME`.
    Names(Vec<String>),
    /// A regular expression the whole module path must match.
    Pattern(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Targets,
    pub use_rslora: bool,
}

impl LoraSettings {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }
}

/// A linear layer an adapter can wrap: its module path and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearModule {
    pub path: String,
    pub input: usize,
    pub output: usize,
}

/// Every linear layer of a model of `config` (PEFT's "all-linear": the heads excluded), by
/// Hugging Face module path.
pub fn linear_modules(config: &ModelConfig) -> Vec<LinearModule> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let mut modules = Vec::new();
    for layer in 0..config.num_hidden_layers {
        let mut add = |name: &str, input: usize, output: usize| {
            modules.push(LinearModule { path: format!("model.layers.{layer}.{name}"), input, output });
        };
        if config.arch.fused_projections {
            add("self_attn.qkv_proj", h, q + 2 * kv);
        } else {
            add("self_attn.q_proj", h, q);
            add("self_attn.k_proj", h, kv);
            add("self_attn.v_proj", h, kv);
        }
        add("self_attn.o_proj", q, h);
        if config.arch.fused_projections {
            add("mlp.gate_up_proj", h, 2 * i);
        } else {
            add("mlp.gate_proj", h, i);
            add("mlp.up_proj", h, i);
        }
        add("mlp.down_proj", i, h);
    }
    modules
}

impl Targets {
    fn matches(&self, path: &str) -> Result<bool> {
        Ok(match self {
            Targets::AllLinear => true,
            Targets::Names(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Targets::Pattern(pattern) => regex::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| usage(format!("target_modules `{pattern}`: not a regular expression ({e})")))?
                .is_match(path),
        })
    }

    /// `target_modules` as PEFT writes it.
    fn to_json(&self) -> Value {
        match self {
            Targets::AllLinear => json!("all-linear"),
            Targets::Names(names) => json!(names),
            Targets::Pattern(pattern) => json!(pattern),
        }
    }
}

/// A LoRA adapter: its settings, the modules it wraps and their A/B pairs (plus, for a
/// classifier, the fully trained `score` head: PEFT's `modules_to_save`).
pub struct Adapter {
    pub settings: LoraSettings,
    /// The modules wrapped, in model order.
    pub modules: Vec<LinearModule>,
    /// PEFT-named tensors: `lora_A`/`lora_B` per module, and `score.weight` for classifiers.
    pub params: Params,
    /// `base_model_name_or_path` as written in (or to) `adapter_config.json`.
    pub base: String,
    /// Every key of `adapter_config.json`, so saving loses nothing PEFT wrote.
    pub raw: Map<String, Value>,
}

fn lora_names(path: &str) -> (String, String) {
    (format!("{PREFIX}{path}.lora_A.weight"), format!("{PREFIX}{path}.lora_B.weight"))
}

/// The adapter's own name of the classifier head PEFT saves in full.
pub const SCORE: &str = "base_model.model.score.weight";

impl Adapter {
    /// A fresh adapter on `config`'s modules: A Kaiming-uniform (PEFT's `a = sqrt(5)`, i.e.
    /// U(±1/sqrt(in))), B zero, so the adapted model starts as the base.
    pub fn new(settings: LoraSettings, config: &ModelConfig, base: &str, seed: u64, device: &Device) -> Result<Self> {
        let modules = Self::select(&settings.targets, config)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10AA);
        let mut params = Params::default();
        for module in &modules {
            let bound = 1.0 / (module.input as f32).sqrt();
            let a: Vec<f32> = (0..settings.r * module.input).map(|_| rng.random_range(-bound..bound)).collect();
            let (a_name, b_name) = lora_names(&module.path);
            params.insert(&a_name, Tensor::from_vec(a, (settings.r, module.input), device)?)?;
            params.insert(&b_name, Tensor::zeros((module.output, settings.r), DType::F32, device)?)?;
        }
        Ok(Adapter { settings, modules, params, base: base.to_string(), raw: Map::new() })
    }

    /// The modules `targets` selects; a target that matches nothing is refused.
    fn select(targets: &Targets, config: &ModelConfig) -> Result<Vec<LinearModule>> {
        let all = linear_modules(config);
        let mut chosen = Vec::new();
        for module in &all {
            if targets.matches(&module.path)? {
                chosen.push(module.clone());
            }
        }
        if let Targets::Names(names) = targets {
            for name in names {
                if !all.iter().any(|m| m.path == *name || m.path.ends_with(&format!(".{name}"))) {
                    let known = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Phi-3: qkv_proj, gate_up_proj)";
                    return Err(usage(format!("--lora-target {name}: matches no module of this {} model (known: {known})", config.family.model_type())));
                }
            }
        }
        if chosen.is_empty() {
            return Err(usage("the LoRA targets match no linear layer of the model"));
        }
        Ok(chosen)
    }

    /// Read an adapter folder written by PEFT or by lathe, checked against its base's config.
    pub fn load(dir: &Path, config: &ModelConfig, device: &Device) -> Result<Self> {
        let (raw, settings, base) = read_adapter_config(dir)?;
        let modules = Self::select(&settings.targets, config)?;
        let file = dir.join(ADAPTER_WEIGHTS);
        if !file.exists() {
            return Err(bad_input(dir, format!("no {ADAPTER_WEIGHTS}: not a LoRA adapter folder")));
        }
        let mut params = Params::load(std::slice::from_ref(&file), device)?;
        // PEFT names some tensors with the adapter's name (`lora_A.default.weight`) when saved
        // from inside a model; read those as the plain names.
        let renamed: Vec<(String, String)> = params
            .names()
            .filter(|n| n.contains(".default."))
            .map(|n| (n.to_string(), n.replace(".default.", ".")))
            .collect();
        for (old, new) in renamed {
            if let Some(var) = params.remove(&old) {
                params.insert(&new, var.as_tensor().clone())?;
            }
        }
        for module in &modules {
            let (a_name, b_name) = lora_names(&module.path);
            for (name, shape) in [(a_name, [settings.r, module.input]), (b_name, [module.output, settings.r])] {
                let Some(var) = params.get(&name) else {
                    return Err(bad_input(&file, format!("missing tensor `{name}` (target_modules names {})", module.path)));
                };
                if var.dims() != shape {
                    return Err(bad_input(&file, format!("tensor `{name}` has shape {:?}, the base model implies {shape:?}", var.dims())));
                }
            }
        }
        if let Head::SequenceClassification { num_labels } = config.head {
            if let Some(score) = params.get(SCORE) {
                if score.dims() != [num_labels, config.hidden_size] {
                    return Err(bad_input(&file, format!("`{SCORE}` has shape {:?}, expected [{num_labels}, {}]", score.dims(), config.hidden_size)));
                }
            }
        }
        Ok(Adapter { settings, modules, params, base, raw })
    }

    /// The (A, B) pair of a module, if the adapter wraps it.
    pub fn pair(&self, path: &str) -> Option<(&candle_core::Var, &candle_core::Var)> {
        let (a, b) = lora_names(path);
        Some((self.params.get(&a)?, self.params.get(&b)?))
    }

    /// Adapter parameters (A, B and a saved head).
    pub fn num_parameters(&self) -> usize {
        self.params.num_elements()
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` as PEFT does.
    pub fn save(&self, dir: &Path, config: &ModelConfig) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| bad_input(dir, format!("cannot create folder: {e}")))?;
        let mut out = self.raw.clone();
        let classifier = matches!(config.head, Head::SequenceClassification { .. });
        let fields = json!({
            "peft_type": "LORA",
            "task_type": if classifier { "SEQ_CLS" } else { "CAUSAL_LM" },
            "r": self.settings.r,
            "lora_alpha": self.settings.alpha,
            "lora_dropout": self.settings.dropout,
            "target_modules": self.settings.targets.to_json(),
            "use_rslora": self.settings.use_rslora,
            "modules_to_save": if classifier { json!(["score"]) } else { Value::Null },
            "base_model_name_or_path": self.base,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        out.extend(fields.as_object().cloned().unwrap_or_default());
        write_atomic(&dir.join(ADAPTER_CONFIG), (serde_json::to_string_pretty(&Value::Object(out))? + "\n").as_bytes())?;
        save_tensors(&dir.join(ADAPTER_WEIGHTS), self.params.iter().map(|(name, var)| (name, var.as_tensor())))
    }

    /// `W + scale · B A` for every wrapped module, and the adapter's head, into `params`.
    pub fn merge_into(&self, params: &mut Params) -> Result<()> {
        let scale = self.settings.scale();
        for module in &self.modules {
            let (a, b) = self.pair(&module.path).expect("selected modules have pairs");
            let name = format!("{}.weight", module.path);
            let weight = params
                .get(&name)
                .ok_or_else(|| crate::error::failed(format!("the base has no `{name}`")))?
                .as_tensor()
                .clone();
            let delta = (b.as_tensor().matmul(a.as_tensor())? * scale)?;
            params.insert(&name, (weight + delta)?)?;
        }
        if let Some(score) = self.params.get(SCORE) {
            params.insert("score.weight", score.as_tensor().clone())?;
        }
        Ok(())
    }
}

/// Parameters of the adapter `settings` would put on a model of `config`.
pub fn adapter_size(settings: &LoraSettings, config: &ModelConfig) -> Result<usize> {
    Ok(Adapter::select(&settings.targets, config)?.iter().map(|m| settings.r * (m.input + m.output)).sum())
}

/// Is `dir` an adapter folder (it has `adapter_config.json`)?
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).exists()
}

/// `adapter_config.json`: every key, the settings lathe implements, and the base. PEFT
/// features lathe does not implement are refused, naming the key.
pub fn read_adapter_config(dir: &Path) -> Result<(Map<String, Value>, LoraSettings, String)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| bad_input(&path, format!("cannot read: {e}")))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| bad_input(&path, format!("not valid JSON ({e})")))?;
    let raw = value.as_object().cloned().ok_or_else(|| bad_input(&path, "expected a JSON object"))?;
    let key = |k: &str| raw.get(k).filter(|v| !v.is_null());
    let refuse = |k: &str, expected: &str| bad_input(&path, format!("key `{k}` = {}: not supported by lathe (expected {expected})", raw[k]));
    match key("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        _ => return Err(bad_input(&path, "key `peft_type`: expected \"LORA\"")),
    }
    let r = key("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or_else(|| bad_input(&path, "key `r`: expected a positive integer"))? as usize;
    let alpha = key("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let dropout = key("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    for (k, off) in [("use_dora", json!(false)), ("fan_in_fan_out", json!(false)), ("lora_bias", json!(false)), ("bias", json!("none"))] {
        if key(k).is_some_and(|v| *v != off) {
            return Err(refuse(k, &off.to_string()));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if key(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(refuse(k, "{}"));
        }
    }
    for k in ["layers_to_transform", "exclude_modules", "target_parameters", "trainable_token_indices"] {
        if key(k).is_some_and(|v| !(v.as_array().is_some_and(Vec::is_empty))) {
            return Err(refuse(k, "null"));
        }
    }
    let targets = match key("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(pattern)) => Targets::Pattern(pattern.clone()),
        Some(Value::Array(items)) => Targets::Names(
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad_input(&path, "key `target_modules`: expected strings")))
                .collect::<Result<_>>()?,
        ),
        _ => return Err(bad_input(&path, "key `target_modules`: expected a list of module names or a string")),
    };
    let use_rslora = key("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    let base = key("base_model_name_or_path").and_then(Value::as_str).unwrap_or_default().to_string();
    Ok((raw, LoraSettings { r, alpha, dropout, targets, use_rslora }, base))
}

#[cfg(test)]
mod tests;
