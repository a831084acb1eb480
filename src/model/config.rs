//! `config.json` of a decoder model of any supported family, read in every layout transformers
//! has written (`rope_theta` or `rope_parameters`, `eos_token_id` int or list, `torch_dtype` or
//! `dtype`) and written back in the family's own layout with every key it came with.

use std::path::Path;

use serde_json::{Map, Value, json};

pub use super::family::{Activation, Architecture, Family};
use crate::error::{Result, bad_input};

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// YaRN (Qwen's long-context scaling): interpolated low frequencies, extrapolated high ones.
    Yarn {
        factor: Option<f64>,
        original_max_position_embeddings: f64,
        attention_factor: Option<f64>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: Option<bool>,
    },
    /// LongRoPE (Phi-3.5, Phi-4-mini): per-frequency factors, the long set once a sequence
    /// passes `original_max_position_embeddings`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        factor: Option<f64>,
        attention_factor: Option<f64>,
    },
}

/// What sits on top of the decoder.
#[derive(Clone, Debug, PartialEq)]
pub enum Head {
    /// `…ForCausalLM`: `lm_head` (or the tied embedding).
    CausalLm,
    /// `…ForSequenceClassification`: `score` `[num_labels, hidden]`, no bias.
    SequenceClassification { num_labels: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The leading dimensions of each head that rotate (`partial_rotary_factor` × head_dim).
    pub rotary_dim: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Where this family's decoder differs from Llama's.
    pub arch: Architecture,
    pub bos_token_id: Option<u32>,
    /// Generation stops on any of these.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub head: Head,
    /// Every key of the file, so saving loses nothing we do not model.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// A fresh config for a model we create (pretraining), with the family's defaults.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        family: Family,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        let head_dim = hidden_size / num_attention_heads.max(1);
        ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            rotary_dim: head_dim,
            max_position_embeddings,
            tie_word_embeddings,
            arch: Architecture::defaults(family, num_hidden_layers, head_dim),
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            head: Head::CausalLm,
            raw: Map::new(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| bad_input(path, format!("not valid JSON ({e})")))?;
        Self::from_json(&value, path)
    }

    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let raw = value
            .as_object()
            .ok_or_else(|| bad_input(path, "expected a JSON object"))?
            .clone();
        let keys = Keys { raw: &raw, path };
        let model_type = keys.string("model_type")?.unwrap_or_default();
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            keys.unsupported("model_type", &model_type, &format!("one of {}", Family::known()))
        })?;
        let hidden_size = keys.required_usize("hidden_size")?;
        let num_attention_heads = keys.required_usize("num_attention_heads")?;
        let num_key_value_heads = keys.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad_input(
                path,
                format!("num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}"),
            ));
        }
        let num_hidden_layers = keys.required_usize("num_hidden_layers")?;
        if num_hidden_layers == 0 {
            return Err(bad_input(path, "key `num_hidden_layers`: 0 layers, expected at least 1"));
        }
        let head_dim = keys.usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        let (rope_theta, rope_scaling) = keys.rope(family)?;
        let rotary_dim = keys.rotary_dim(family, head_dim)?;
        let head = keys.head(family)?;
        let default_eps = if family == Family::Phi3 { 1e-5 } else { 1e-6 };
        Ok(ModelConfig {
            family,
            vocab_size: keys.required_usize("vocab_size")?,
            hidden_size,
            intermediate_size: keys.required_usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: keys.f64("rms_norm_eps")?.unwrap_or(default_eps),
            rope_theta,
            rope_scaling,
            rotary_dim,
            max_position_embeddings: keys.usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: keys.bool("tie_word_embeddings")?.unwrap_or(matches!(family, Family::Gemma | Family::Gemma2)),
            arch: Architecture::read(family, &keys, num_hidden_layers, head_dim)?,
            bos_token_id: keys.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: keys.token_ids("eos_token_id")?,
            pad_token_id: keys.token_ids("pad_token_id")?.first().copied(),
            head,
            raw,
        })
    }

    /// `architectures` as transformers names the class: `Qwen2ForCausalLM`, …
    pub fn architecture_name(&self) -> String {
        let prefix = self.family.class_prefix();
        match self.head {
            Head::CausalLm => format!("{prefix}ForCausalLM"),
            Head::SequenceClassification { .. } => format!("{prefix}ForSequenceClassification"),
        }
    }

    /// `config.json` as transformers writes it for the family: every original key, ours
    /// updated, weights f32.
    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        put(&mut out, "model_type", json!(self.family.model_type()));
        put(&mut out, "architectures", json!([self.architecture_name()]));
        put(&mut out, "vocab_size", json!(self.vocab_size));
        put(&mut out, "hidden_size", json!(self.hidden_size));
        put(&mut out, "intermediate_size", json!(self.intermediate_size));
        put(&mut out, "num_hidden_layers", json!(self.num_hidden_layers));
        put(&mut out, "num_attention_heads", json!(self.num_attention_heads));
        put(&mut out, "num_key_value_heads", json!(self.num_key_value_heads));
        put(&mut out, "head_dim", json!(self.head_dim));
        put(&mut out, "rms_norm_eps", json!(self.rms_norm_eps));
        put(&mut out, "max_position_embeddings", json!(self.max_position_embeddings));
        put(&mut out, "tie_word_embeddings", json!(self.tie_word_embeddings));
        self.arch.write(self.family, &mut out);
        put(&mut out, "bos_token_id", json!(self.bos_token_id));
        put(&mut out, "eos_token_id", match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        });
        put(&mut out, "pad_token_id", json!(self.pad_token_id));
        // Both layouts: transformers 5 reads `rope_parameters`, 4.x reads `rope_theta`.
        let mut rope = rope_json(&self.rope_scaling);
        rope["rope_theta"] = json!(self.rope_theta);
        if self.rotary_dim != self.head_dim {
            let factor = self.rotary_dim as f64 / self.head_dim as f64;
            rope["partial_rotary_factor"] = json!(factor);
            put(&mut out, "partial_rotary_factor", json!(factor));
        }
        put(&mut out, "rope_parameters", rope);
        put(&mut out, "rope_theta", json!(self.rope_theta));
        if self.rope_scaling != RopeScaling::Default {
            put(&mut out, "rope_scaling", rope_json(&self.rope_scaling));
        }
        put(&mut out, "dtype", json!("float32"));
        out.remove("torch_dtype");
        if let Head::SequenceClassification { num_labels } = self.head {
            if !out.contains_key("id2label") {
                let id2label: Map<String, Value> =
                    (0..num_labels).map(|i| (i.to_string(), json!(format!("LABEL_{i}")))).collect();
                let label2id: Map<String, Value> = (0..num_labels).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
                put(&mut out, "id2label", Value::Object(id2label));
                put(&mut out, "label2id", Value::Object(label2id));
            }
        }
        Value::Object(out)
    }

    /// Attention scores are multiplied by this before the softmax.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.arch.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).sqrt()
    }
}

fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.insert(key.to_string(), value);
}

/// The rope parameters object, without `rope_theta`.
fn rope_json(scaling: &RopeScaling) -> Value {
    let mut value = match scaling {
        RopeScaling::Default => json!({"rope_type": "default"}),
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
        } => json!({
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original_max_position_embeddings,
            "attention_factor": attention_factor,
            "beta_fast": beta_fast,
            "beta_slow": beta_slow,
            "mscale": mscale,
            "mscale_all_dim": mscale_all_dim,
            "truncate": truncate,
        }),
        RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, factor, attention_factor } => json!({
            "rope_type": "longrope",
            "short_factor": short_factor,
            "long_factor": long_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
            "factor": factor,
            "attention_factor": attention_factor,
        }),
    };
    // Unset options are left out, as transformers leaves them.
    if let Some(map) = value.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    value
}

/// Typed access to config keys with errors that name the key.
pub struct Keys<'a> {
    pub raw: &'a Map<String, Value>,
    pub path: &'a Path,
}

impl Keys<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    pub fn wrong(&self, key: &str, expected: &str) -> crate::error::Error {
        bad_input(self.path, format!("key `{key}`: expected {expected}, found {}", self.raw[key]))
    }

    /// A value lathe reads but does not implement: refused, never silently ignored.
    pub fn unsupported(&self, key: &str, value: &str, expected: &str) -> crate::error::Error {
        bad_input(self.path, format!("key `{key}` = `{value}` is not supported by lathe (expected {expected})"))
    }

    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key)
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| self.wrong(key, "a non-negative integer")))
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| bad_input(self.path, format!("missing key `{key}` (a non-negative integer)")))
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "a number")))
            .transpose()
    }

    /// A number that may be `null` (off); `default` when the key is absent.
    pub fn f64_or_null(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        if self.raw.contains_key(key) { self.f64(key) } else { Ok(default) }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "true or false")))
            .transpose()
    }

    pub fn string(&self, key: &str) -> Result<Option<String>> {
        self.present(key)
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.wrong(key, "a string")))
            .transpose()
    }

    /// An id given as an integer or a list of integers.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| self.wrong(key, "an integer or a list of integers")))
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.wrong(key, "an integer or a list of integers")),
        }
    }

    /// The head `architectures` names; transformers picks the decoder by `model_type`, so any
    /// family's `…ForCausalLM` is a causal LM.
    fn head(&self, family: Family) -> Result<Head> {
        let name = match self.present("architectures") {
            None => return Ok(Head::CausalLm),
            Some(Value::Array(items)) => items.first().and_then(Value::as_str).unwrap_or_default().to_string(),
            Some(_) => return Err(self.wrong("architectures", "a list of strings")),
        };
        if name.ends_with("ForSequenceClassification") {
            let num_labels = self
                .usize("num_labels")?
                .or_else(|| self.raw.get("id2label").and_then(Value::as_object).map(Map::len))
                .unwrap_or(2);
            Ok(Head::SequenceClassification { num_labels })
        } else if name.is_empty() || name.ends_with("ForCausalLM") {
            Ok(Head::CausalLm)
        } else {
            let prefix = family.class_prefix();
            Err(self.unsupported("architectures", &name, &format!("{prefix}ForCausalLM or {prefix}ForSequenceClassification")))
        }
    }

    /// `partial_rotary_factor` (in `rope_parameters` or at the top) as a number of dimensions.
    fn rotary_dim(&self, family: Family, head_dim: usize) -> Result<usize> {
        let parameters = self.present("rope_parameters").or_else(|| self.present("rope_scaling"));
        let factor = match parameters.and_then(|p| p.get("partial_rotary_factor")).filter(|v| !v.is_null()) {
            Some(v) => Some(v.as_f64().ok_or_else(|| self.wrong("rope_parameters", "a number as partial_rotary_factor"))?),
            None => self.f64("partial_rotary_factor")?,
        };
        let Some(factor) = factor.filter(|&f| f != 1.0) else { return Ok(head_dim) };
        if family != Family::Phi3 {
            return Err(self.unsupported("partial_rotary_factor", &factor.to_string(), "1.0 for this model_type"));
        }
        let dim = (head_dim as f64 * factor) as usize;
        if dim == 0 || dim % 2 != 0 || dim > head_dim {
            return Err(self.unsupported("partial_rotary_factor", &factor.to_string(), "a fraction giving an even number of rotary dimensions"));
        }
        Ok(dim)
    }

    /// `rope_scaling` (4.x) or `rope_parameters` (5), as transformers gives `rope_scaling` priority.
    fn rope(&self, family: Family) -> Result<(f64, RopeScaling)> {
        let parameters = self.present("rope_scaling").or_else(|| self.present("rope_parameters"));
        let theta = parameters
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.f64("rope_theta")?)
            .unwrap_or(10_000.0);
        let Some(parameters) = parameters else { return Ok((theta, RopeScaling::Default)) };
        let mut kind = parameters
            .get("rope_type")
            .or_else(|| parameters.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        // transformers' Phi-3 reads its older names for LongRoPE this way.
        if family == Family::Phi3 && matches!(kind, "su" | "yarn") {
            kind = "longrope";
        }
        let optional = |key: &str| -> Result<Option<f64>> {
            match parameters.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    bad_input(self.path, format!("rope parameters of type `{kind}`: `{key}` must be a number"))
                }),
            }
        };
        let number = |key: &str| -> Result<f64> {
            optional(key)?.ok_or_else(|| {
                bad_input(self.path, format!("rope parameters of type `{kind}`: missing number `{key}`"))
            })
        };
        // Phi-3 keeps the pretraining length at the top level, and transformers prefers it there.
        let original_max = || -> Result<f64> {
            let top = if family == Family::Phi3 { self.f64("original_max_position_embeddings")? } else { None };
            match top.or(optional("original_max_position_embeddings")?) {
                Some(n) => Ok(n),
                None => Ok(self.f64("max_position_embeddings")?.unwrap_or(2048.0)),
            }
        };
        let factors = |key: &str| -> Result<Vec<f64>> {
            parameters
                .get(key)
                .and_then(Value::as_array)
                .and_then(|items| items.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| bad_input(self.path, format!("rope parameters of type `{kind}`: `{key}` must be a list of numbers")))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: number("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: original_max()?,
            },
            "yarn" => RopeScaling::Yarn {
                factor: optional("factor")?,
                original_max_position_embeddings: original_max()?,
                attention_factor: optional("attention_factor")?,
                beta_fast: optional("beta_fast")?,
                beta_slow: optional("beta_slow")?,
                mscale: optional("mscale")?,
                mscale_all_dim: optional("mscale_all_dim")?,
                truncate: parameters.get("truncate").and_then(Value::as_bool),
            },
            "longrope" => RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original_max()?,
                factor: optional("factor")?,
                attention_factor: optional("attention_factor")?,
            },
            other => {
                return Err(self.unsupported("rope_type", other, "default, linear, llama3, yarn or longrope"));
            }
        };
        Ok((theta, scaling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&value, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2})
    }

    #[test]
    fn reads_both_rope_layouts_and_eos_forms() {
        let mut old = base();
        old["rope_theta"] = json!(500000.0);
        old["eos_token_id"] = json!([1, 7]);
        old["torch_dtype"] = json!("bfloat16");
        let c = parse(old).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.eos_token_ids, vec![1, 7]);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);

        let mut new = base();
        new["rope_parameters"] = json!({"rope_theta": 1000.0, "rope_type": "default"});
        new["eos_token_id"] = json!(3);
        new["dtype"] = json!("float32");
        let c = parse(new).unwrap();
        assert_eq!(c.rope_theta, 1000.0);
        assert_eq!(c.eos_token_ids, vec![3]);
    }

    #[test]
    fn llama3_scaling_is_read() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert!(matches!(parse(v).unwrap().rope_scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn errors_name_the_key() {
        let mut v = base();
        v["hidden_size"] = json!("big");
        let e = parse(v).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let mut v = base();
        v["model_type"] = json!("gpt2");
        assert!(parse(v).unwrap_err().to_string().contains("gpt2"));
    }

    fn family(model_type: &str) -> Value {
        let mut v = base();
        v["model_type"] = json!(model_type);
        v
    }

    #[test]
    fn every_family_round_trips_through_its_own_keys() {
        for f in Family::ALL {
            let c = parse(family(f.model_type())).unwrap();
            assert_eq!(c.family, f);
            let written = c.to_json();
            assert_eq!(written["model_type"], f.model_type());
            assert_eq!(written["architectures"][0], format!("{}ForCausalLM", f.class_prefix()));
            assert_eq!(parse(written).unwrap(), ModelConfig { raw: c.to_json().as_object().unwrap().clone(), ..c });
        }
    }

    #[test]
    fn family_defaults_follow_transformers() {
        let qwen2 = parse(family("qwen2")).unwrap();
        assert!(qwen2.arch.qkv_bias && !qwen2.arch.o_bias);
        assert_eq!(qwen2.arch.sliding_windows, vec![None], "no window unless use_sliding_window");
        let mut v = family("qwen2");
        v["num_hidden_layers"] = json!(3);
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(16);
        v["max_window_layers"] = json!(1);
        assert_eq!(parse(v).unwrap().arch.sliding_windows, vec![None, Some(16), Some(16)]);
        let mistral = parse(family("mistral")).unwrap();
        assert_eq!(mistral.arch.sliding_windows, vec![Some(4096)], "Mistral's default window");
        let mut v = family("mistral");
        v["sliding_window"] = Value::Null;
        assert_eq!(parse(v).unwrap().arch.sliding_windows, vec![None]);
        let mut v = family("gemma2");
        v["num_hidden_layers"] = json!(2);
        let gemma2 = parse(v).unwrap();
        assert_eq!(gemma2.arch.sliding_windows, vec![Some(4096), None]);
        assert_eq!((gemma2.arch.attn_logit_softcapping, gemma2.arch.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert!(gemma2.tie_word_embeddings && gemma2.arch.sandwich_norms && gemma2.arch.norm_weight_offset == 1.0);
        assert_eq!(gemma2.attention_scale(), 1.0 / 16f64, "query_pre_attn_scalar 256");
        let mut v = family("gemma");
        v["hidden_act"] = json!("gelu");
        assert_eq!(parse(v).unwrap().arch.hidden_act, Activation::GeluTanh, "Gemma's legacy gelu is tanh");
        assert!(parse(family("phi3")).unwrap().arch.fused_projections);
    }

    #[test]
    fn phi3_longrope_and_partial_rotary() {
        let mut v = family("phi3");
        v["original_max_position_embeddings"] = json!(4096);
        v["rope_scaling"] = json!({"type": "su", "short_factor": [1.0, 1.0], "long_factor": [2.0, 3.0]});
        v["partial_rotary_factor"] = json!(1.0);
        let c = parse(v.clone()).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::LongRope { original_max_position_embeddings: 4096.0, .. }));
        v["partial_rotary_factor"] = json!(0.5);
        assert_eq!(parse(v).unwrap().rotary_dim, 2);
    }

    #[test]
    fn unimplemented_features_are_refused_naming_key_and_value() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"model_type": "gpt2"}), "`model_type` = `gpt2`"),
            (json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}), "`rope_type` = `dynamic`"),
            (json!({"hidden_act": "relu"}), "`hidden_act` = `relu`"),
            (json!({"partial_rotary_factor": 0.5}), "`partial_rotary_factor` = `0.5`"),
            (json!({"num_hidden_layers": 0}), "`num_hidden_layers`: 0 layers"),
            (json!({"architectures": ["LlamaForTokenClassification"]}), "`architectures` = `LlamaForTokenClassification`"),
        ];
        for (patch, expected) in cases {
            let mut v = base();
            for (key, value) in patch.as_object().unwrap() {
                v[key] = value.clone();
            }
            let e = parse(v).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(expected), "{e} (wanted {expected})");
        }
        let mut v = family("gemma2");
        v["use_bidirectional_attention"] = json!(true);
        assert!(parse(v).unwrap_err().to_string().contains("use_bidirectional_attention"));
        let mut v = family("qwen2");
        v["layer_types"] = json!(["chunked_attention"]);
        assert!(parse(v).unwrap_err().to_string().contains("`layer_types` = `chunked_attention`"));
        let mut v = family("gemma2");
        v["num_hidden_layers"] = json!(2);
        v["layer_types"] = json!(["sliding_attention", "full_attention"]);
        v["sliding_window"] = Value::Null;
        assert!(parse(v).unwrap_err().to_string().contains("no sliding_window"));
    }

    #[test]
    fn written_config_reads_back_equal() {
        let mut v = base();
        v["eos_token_id"] = json!(0);
        v["custom_key"] = json!("kept");
        let c = parse(v).unwrap();
        let written = c.to_json();
        assert_eq!(written["custom_key"], "kept");
        assert_eq!(written["rope_parameters"]["rope_theta"], 10000.0);
        let again = parse(written.clone()).unwrap();
        assert_eq!(again.to_json(), written);
    }
}
