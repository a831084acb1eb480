//! `config.json` of a decoder model of any supported family, read in every layout transformers has written
//! (`rope_theta` or `rope_parameters`, `eos_token_id` int or list, `torch_dtype` or `dtype`)
//! and written back with every key it came with.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Result, bad_input};

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// What sits on top of the decoder.
#[derive(Clone, Debug, PartialEq)]
pub enum Head {
    /// `LlamaForCausalLM`: `lm_head` (or the tied embedding).
    CausalLm,
    /// `LlamaForSequenceClassification`: `score` `[num_labels, hidden]`, no bias.
    SequenceClassification { num_labels: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
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
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Generation stops on any of these.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub head: Head,
    /// Every key of the file, so saving loses nothing we do not model.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// A fresh config for a model we create (pretraining).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings,
            tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
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
        let reader = Keys { raw: &raw, path };
        let model_type = reader.string("model_type")?.unwrap_or_default();
        if model_type != "llama" {
            return Err(bad_input(
                path,
                format!("model_type `{model_type}`: lathe's model is the Decoder family, expected \"llama\""),
            ));
        }
        if let Some(act) = reader.string("hidden_act")? {
            if act != "silu" {
                return Err(bad_input(path, format!("hidden_act `{act}`: expected \"silu\"")));
            }
        }
        let hidden_size = reader.required_usize("hidden_size")?;
        let num_attention_heads = reader.required_usize("num_attention_heads")?;
        let num_key_value_heads = reader.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad_input(
                path,
                format!("num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}"),
            ));
        }
        let (rope_theta, rope_scaling) = reader.rope()?;
        let head = match reader.architecture()?.as_deref() {
            Some("LlamaForSequenceClassification") => Head::SequenceClassification {
                num_labels: reader
                    .usize("num_labels")?
                    .or_else(|| raw.get("id2label").and_then(Value::as_object).map(Map::len))
                    .unwrap_or(2),
            },
            _ => Head::CausalLm,
        };
        Ok(ModelConfig {
            vocab_size: reader.required_usize("vocab_size")?,
            hidden_size,
            intermediate_size: reader.required_usize("intermediate_size")?,
            num_hidden_layers: reader.required_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: reader.usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads),
            rms_norm_eps: reader.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: reader.usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: reader.bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: reader.bool("attention_bias")?.unwrap_or(false),
            mlp_bias: reader.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: reader.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: reader.token_ids("eos_token_id")?,
            pad_token_id: reader.token_ids("pad_token_id")?.first().copied(),
            head,
            raw,
        })
    }

    /// `config.json` as transformers writes it: every original key, ours updated, weights f32.
    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        put(&mut out, "model_type", json!("llama"));
        put(&mut out, "architectures", json!([match self.head {
            Head::CausalLm => "LlamaForCausalLM",
            Head::SequenceClassification { .. } => "LlamaForSequenceClassification",
        }]));
        put(&mut out, "vocab_size", json!(self.vocab_size));
        put(&mut out, "hidden_size", json!(self.hidden_size));
        put(&mut out, "intermediate_size", json!(self.intermediate_size));
        put(&mut out, "num_hidden_layers", json!(self.num_hidden_layers));
        put(&mut out, "num_attention_heads", json!(self.num_attention_heads));
        put(&mut out, "num_key_value_heads", json!(self.num_key_value_heads));
        put(&mut out, "head_dim", json!(self.head_dim));
        put(&mut out, "hidden_act", json!("silu"));
        put(&mut out, "rms_norm_eps", json!(self.rms_norm_eps));
        put(&mut out, "max_position_embeddings", json!(self.max_position_embeddings));
        put(&mut out, "tie_word_embeddings", json!(self.tie_word_embeddings));
        put(&mut out, "attention_bias", json!(self.attention_bias));
        put(&mut out, "mlp_bias", json!(self.mlp_bias));
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
}

fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.insert(key.to_string(), value);
}

/// The rope parameters object, without `rope_theta`.
fn rope_json(scaling: &RopeScaling) -> Value {
    match scaling {
        RopeScaling::Default => json!({"rope_type": "default"}),
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

/// Typed access to config keys with errors that name the key.
struct Keys<'a> {
    raw: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, expected: &str) -> crate::error::Error {
        bad_input(self.path, format!("key `{key}`: expected {expected}, found {}", self.raw[key]))
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key)
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| self.wrong(key, "a non-negative integer")))
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| bad_input(self.path, format!("missing key `{key}` (a non-negative integer)")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "a number")))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "true or false")))
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
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

    fn architecture(&self) -> Result<Option<String>> {
        match self.present("architectures") {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(items.first().and_then(Value::as_str).map(str::to_string)),
            Some(_) => Err(self.wrong("architectures", "a list of strings")),
        }
    }

    /// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let parameters = self.present("rope_parameters").or_else(|| self.present("rope_scaling"));
        let theta = parameters
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.f64("rope_theta")?)
            .unwrap_or(10_000.0);
        let Some(parameters) = parameters else { return Ok((theta, RopeScaling::Default)) };
        let kind = parameters
            .get("rope_type")
            .or_else(|| parameters.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| -> Result<f64> {
            parameters.get(key).and_then(Value::as_f64).ok_or_else(|| {
                bad_input(self.path, format!("rope parameters of type `{kind}`: missing number `{key}`"))
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: number("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
            other => {
                return Err(bad_input(
                    self.path,
                    format!("rope_type `{other}` is not supported (expected default, linear or llama3)"),
                ));
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
