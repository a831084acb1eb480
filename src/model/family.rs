//! Model families as data, the way LitGPT's `Config` covers dozens of them with one model: what
//! distinguishes Mistral, Qwen, Gemma or Phi-3 from Llama is a handful of [`Architecture`]
//! fields, read from (and written back to) each family's own `config.json` keys. The decoder
//! never asks which family it runs; it reads these fields.

use serde_json::{Map, Value, json};

use super::config::Keys;
use crate::error::{Result, bad_input};

/// The `model_type`s lathe reads, trains and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Phi3,
}

impl Family {
    pub const ALL: [Family; 7] =
        [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma, Family::Gemma2, Family::Phi3];

    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Phi3 => "phi3",
        }
    }

    /// The prefix of the family's transformers classes (`Qwen2ForCausalLM`).
    pub fn class_prefix(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
            Family::Qwen3 => "Qwen3",
            Family::Gemma => "Gemma",
            Family::Gemma2 => "Gemma2",
            Family::Phi3 => "Phi3",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// A family named on the command line or in a recipe (`--family qwen2`).
    pub fn from_flag(name: &str) -> Result<Family> {
        Family::from_model_type(name)
            .ok_or_else(|| crate::error::usage(format!("--family {name}: expected one of {}", Family::known())))
    }

    /// Every `model_type` lathe knows, for error messages.
    pub fn known() -> String {
        Family::ALL.map(|f| format!("\"{}\"", f.model_type())).join(", ")
    }

    /// The family's `config.json` key for the activation (Gemma 2 renamed it).
    fn activation_key(self) -> &'static str {
        if self == Family::Gemma2 { "hidden_activation" } else { "hidden_act" }
    }

    /// The sliding window and per-layer attention types (Qwen's and Gemma 2's `layer_types`).
    fn has_layer_types(self) -> bool {
        matches!(self, Family::Qwen2 | Family::Qwen3 | Family::Gemma2)
    }

    /// Families whose configs carry a single `attention_bias` for q, k, v and o.
    fn has_attention_bias_key(self) -> bool {
        matches!(self, Family::Llama | Family::Qwen3 | Family::Gemma | Family::Gemma2)
    }
}

/// The gate's activation in the gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU.
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// GeGLU with the exact erf GELU (`gelu`).
    Gelu,
}

impl Activation {
    fn parse(name: &str, family: Family) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Activation::GeluTanh),
            // transformers reads Gemma's legacy "gelu" as the tanh approximation.
            "gelu" if family == Family::Gemma => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
        }
    }
}

/// Where one family's decoder differs from Llama's.
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub hidden_act: Activation,
    /// Biases on q, k and v (Qwen2), and on o_proj (Llama's `attention_bias` sets both).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Norms multiply by `offset + weight` (Gemma's `1 + w`), computed in f32.
    pub norm_weight_offset: f64,
    /// Qwen3's per-head RMSNorm of queries and keys (`q_norm`, `k_norm`) before RoPE.
    pub qk_norm: bool,
    /// Gemma 2's norms after attention and after the MLP, before each residual add.
    pub sandwich_norms: bool,
    /// Gemma's embeddings are multiplied by sqrt(hidden_size).
    pub scale_embeddings: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `cap · tanh(x / cap)` on attention scores and on the final logits (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Per layer, the sliding window (a query sees itself and the `window - 1` keys before it),
    /// or `None` for full causal attention.
    pub sliding_windows: Vec<Option<usize>>,
    /// Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (gate first).
    pub fused_projections: bool,
}

impl Architecture {
    /// Llama's decoder: the base every family differs from.
    pub fn llama(layers: usize) -> Self {
        Architecture {
            hidden_act: Activation::Silu,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            norm_weight_offset: 0.0,
            qk_norm: false,
            sandwich_norms: false,
            scale_embeddings: false,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            sliding_windows: vec![None; layers],
            fused_projections: false,
        }
    }

    /// A new model of `family` with transformers' defaults for that family (pretraining).
    pub fn defaults(family: Family, layers: usize, head_dim: usize) -> Self {
        let mut a = Architecture::llama(layers);
        match family {
            Family::Llama | Family::Mistral | Family::Qwen3 => {}
            Family::Qwen2 => a.qkv_bias = true,
            Family::Gemma | Family::Gemma2 => {
                a.hidden_act = Activation::GeluTanh;
                a.norm_weight_offset = 1.0;
                a.scale_embeddings = true;
            }
            Family::Phi3 => a.fused_projections = true,
        }
        if family == Family::Qwen3 {
            a.qk_norm = true;
        }
        if family == Family::Gemma2 {
            a.sandwich_norms = true;
            a.query_pre_attn_scalar = Some(head_dim as f64);
            a.attn_logit_softcapping = Some(50.0);
            a.final_logit_softcapping = Some(30.0);
            a.sliding_windows = alternating_windows(layers, 4096);
        }
        a
    }

    /// Read the family's own keys; refuse values lathe does not implement, naming the key.
    pub fn read(family: Family, keys: &Keys, layers: usize, head_dim: usize) -> Result<Self> {
        let mut a = Architecture::defaults(family, layers, head_dim);
        let act_key = family.activation_key();
        if let Some(name) = keys.string(act_key)? {
            a.hidden_act = Activation::parse(&name, family).ok_or_else(|| {
                keys.unsupported(act_key, &name, "silu, gelu_pytorch_tanh, gelu_new or gelu")
            })?;
        }
        if family.has_attention_bias_key() {
            let bias = keys.bool("attention_bias")?.unwrap_or(false);
            a.qkv_bias = bias;
            a.o_bias = bias;
        }
        if family == Family::Llama {
            a.mlp_bias = keys.bool("mlp_bias")?.unwrap_or(false);
        }
        if matches!(family, Family::Gemma | Family::Gemma2) && keys.bool("use_bidirectional_attention")?.unwrap_or(false) {
            return Err(keys.unsupported("use_bidirectional_attention", "true", "false (lathe's decoder is causal)"));
        }
        if family == Family::Gemma2 {
            a.query_pre_attn_scalar = Some(keys.f64("query_pre_attn_scalar")?.unwrap_or(256.0));
            a.attn_logit_softcapping = keys.f64_or_null("attn_logit_softcapping", Some(50.0))?;
            a.final_logit_softcapping = keys.f64_or_null("final_logit_softcapping", Some(30.0))?;
        }
        a.sliding_windows = read_windows(family, keys, layers)?;
        Ok(a)
    }

    /// Write the family's own keys into `out` (the rest of config.json is kept as read).
    pub fn write(&self, family: Family, out: &mut Map<String, Value>) {
        out.insert(family.activation_key().into(), json!(self.hidden_act.name()));
        if family.has_attention_bias_key() {
            out.insert("attention_bias".into(), json!(self.qkv_bias));
        }
        if family == Family::Llama {
            out.insert("mlp_bias".into(), json!(self.mlp_bias));
        }
        if family == Family::Gemma2 {
            out.insert("query_pre_attn_scalar".into(), json!(self.query_pre_attn_scalar.map(integer_if_whole)));
            out.insert("attn_logit_softcapping".into(), json!(self.attn_logit_softcapping));
            out.insert("final_logit_softcapping".into(), json!(self.final_logit_softcapping));
        }
        let window = self.sliding_windows.iter().flatten().next().copied();
        match family {
            Family::Llama | Family::Gemma => {}
            Family::Mistral | Family::Phi3 => {
                out.insert("sliding_window".into(), json!(window));
            }
            Family::Qwen2 | Family::Qwen3 => {
                out.insert("use_sliding_window".into(), json!(window.is_some()));
                out.insert("sliding_window".into(), json!(window));
                let first_sliding = self.sliding_windows.iter().position(Option::is_some);
                out.insert("max_window_layers".into(), json!(first_sliding.unwrap_or(self.sliding_windows.len())));
            }
            Family::Gemma2 => {
                out.insert("sliding_window".into(), json!(window));
            }
        }
        if family.has_layer_types() {
            let types: Vec<&str> = self
                .sliding_windows
                .iter()
                .map(|w| if w.is_some() { "sliding_attention" } else { "full_attention" })
                .collect();
            out.insert("layer_types".into(), json!(types));
        }
    }
}

/// `12.0` as `12`, as transformers writes its integer fields.
fn integer_if_whole(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 { json!(x as i64) } else { json!(x) }
}

/// Gemma 2's pattern: even layers slide, odd layers see everything.
fn alternating_windows(layers: usize, window: usize) -> Vec<Option<usize>> {
    (0..layers).map(|i| if i % 2 == 0 { Some(window) } else { None }).collect()
}

/// Each layer's window as transformers derives it for the family.
fn read_windows(family: Family, keys: &Keys, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = |default: Option<usize>| -> Result<Option<usize>> {
        match keys.raw.get("sliding_window") {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(_) => match keys.usize("sliding_window")? {
                Some(0) => Err(keys.unsupported("sliding_window", "0", "a positive window or null")),
                w => Ok(w),
            },
        }
    };
    match family {
        Family::Llama | Family::Gemma => Ok(vec![None; layers]),
        Family::Mistral => Ok(vec![window(Some(4096))?; layers]),
        Family::Phi3 => Ok(vec![window(None)?; layers]),
        Family::Qwen2 | Family::Qwen3 => {
            // transformers drops the window unless `use_sliding_window` is set.
            let window = if keys.bool("use_sliding_window")?.unwrap_or(false) { window(Some(4096))? } else { None };
            let from = keys.usize("max_window_layers")?.unwrap_or(28);
            let derived = (0..layers).map(|i| if window.is_some() && i >= from { window } else { None }).collect();
            layer_types(keys, layers, window)?.map_or(Ok(derived), Ok)
        }
        Family::Gemma2 => {
            let window = window(Some(4096))?;
            let derived = match window {
                Some(w) => alternating_windows(layers, w),
                None => vec![None; layers],
            };
            layer_types(keys, layers, window)?.map_or(Ok(derived), Ok)
        }
    }
}

/// An explicit `layer_types` list: one of `full_attention` / `sliding_attention` per layer.
fn layer_types(keys: &Keys, layers: usize, window: Option<usize>) -> Result<Option<Vec<Option<usize>>>> {
    let Some(value) = keys.raw.get("layer_types").filter(|v| !v.is_null()) else { return Ok(None) };
    let items = value.as_array().ok_or_else(|| keys.wrong("layer_types", "a list of strings"))?;
    if items.len() != layers {
        return Err(bad_input(
            keys.path,
            format!("key `layer_types`: {} entries for num_hidden_layers {layers}", items.len()),
        ));
    }
    items
        .iter()
        .map(|item| match item.as_str() {
            Some("full_attention") => Ok(None),
            Some("sliding_attention") => match window {
                Some(w) => Ok(Some(w)),
                None => Err(bad_input(
                    keys.path,
                    "key `layer_types`: a sliding_attention layer but no sliding_window (or use_sliding_window false)",
                )),
            },
            other => Err(keys.unsupported(
                "layer_types",
                &other.map_or_else(|| item.to_string(), str::to_string),
                "full_attention or sliding_attention",
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
