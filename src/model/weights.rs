//! Named parameters: loaded from safetensors (any float dtype, into f32), saved with Hugging Face
//! names, and held as `Var`s so the same tensors serve inference and training.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::config::{Head, ModelConfig};
use crate::error::{Result, bad_input};

/// Parameters by Hugging Face tensor name.
#[derive(Clone, Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Load every tensor of the given safetensors files onto `device` as f32, one tensor at a
    /// time: the peak is the model plus its largest tensor, not two or three whole copies.
    pub fn load(files: &[PathBuf], device: &Device) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for file in files {
            read_safetensors(file, device, |name, var| {
                vars.insert(name, var);
            })?;
        }
        Ok(Params { vars })
    }

    /// Random weights for a new model: normal(0, std) for matrices; norms start as the
    /// identity (weight 1, or 0 where the family scales by `1 + weight`).
    pub fn init(config: &ModelConfig, std: f64, seed: u64, device: &Device) -> Result<Self> {
        let identity_norm = 1.0 - config.arch.norm_weight_offset;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0f32, std as f32).map_err(crate::error::failed)?;
        let mut params = Params::default();
        for (name, shape) in expected_shapes(config) {
            let tensor = if name.ends_with("norm.weight") {
                (Tensor::ones(shape.as_slice(), DType::F32, device)? * identity_norm)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            } else {
                let count: usize = shape.iter().product();
                let values: Vec<f32> = (0..count).map(|_| normal.sample(&mut rng)).collect();
                Tensor::from_vec(values, shape.as_slice(), device)?
            };
            params.insert(&name, tensor)?;
        }
        Ok(params)
    }

    pub fn insert(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        self.vars.insert(name.to_string(), Var::from_tensor(&tensor)?);
        Ok(())
    }

    /// One set over several models' parameters, each name prefixed (`policy.`, `value.`). The
    /// variables are shared, not copied: an optimizer stepping the union updates every model.
    pub fn union(parts: &[(&str, &Params)]) -> Params {
        let vars = parts
            .iter()
            .flat_map(|(prefix, params)| params.vars.iter().map(move |(name, var)| (format!("{prefix}{name}"), var.clone())))
            .collect();
        Params { vars }
    }

    pub fn remove(&mut self, name: &str) -> Option<Var> {
        self.vars.remove(name)
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Grow the embedding (and an untied LM head) to `rows` rows, each new row the mean of the
    /// old ones, as transformers' `resize_token_embeddings` does: new tokens start as an
    /// average token rather than noise. Returns whether anything grew.
    pub fn grow_vocab(&mut self, rows: usize) -> Result<bool> {
        let mut grew = false;
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let Some(var) = self.vars.get(name) else { continue };
            let (old, hidden) = var.dims2()?;
            if old >= rows {
                continue;
            }
            let mean = var.as_tensor().mean_keepdim(0)?;
            let grown = Tensor::cat(&[var.as_tensor(), &mean.broadcast_as((rows - old, hidden))?.contiguous()?], 0)?;
            self.insert(name, grown)?;
            grew = true;
        }
        Ok(grew)
    }

    /// Check names and shapes against a config before building a model from them.
    pub fn check(&self, config: &ModelConfig, source: &Path) -> Result<()> {
        for (name, shape) in expected_shapes(config) {
            let Some(var) = self.vars.get(&name) else {
                return Err(bad_input(source, format!("missing tensor `{name}` (shape {shape:?})")));
            };
            if var.dims() != shape.as_slice() {
                return Err(bad_input(
                    source,
                    format!("tensor `{name}` has shape {:?}, config.json implies {shape:?}", var.dims()),
                ));
            }
        }
        Ok(())
    }

    /// Save as one safetensors file (`{"format": "pt"}` metadata, as transformers writes).
    pub fn save(&self, path: &Path) -> Result<()> {
        save_tensors(path, self.vars.iter().map(|(k, v)| (k.as_str(), v.as_tensor())))
    }

    /// Overwrite every parameter with the tensor of the same name in `file` (exact bits).
    pub fn load_values(&self, file: &Path) -> Result<()> {
        let device = self.vars.values().next().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
        let tensors = candle_core::safetensors::load(file, &device)
            .map_err(|e| bad_input(file, format!("not a readable safetensors file ({e})")))?;
        for (name, var) in &self.vars {
            let tensor = tensors.get(name).ok_or_else(|| bad_input(file, format!("missing tensor `{name}`")))?;
            if tensor.dims() != var.dims() {
                return Err(bad_input(file, format!("tensor `{name}` has shape {:?}, expected {:?}", tensor.dims(), var.dims())));
            }
            var.set(&tensor.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

/// A safetensors file opened at its header: the header's JSON bytes (names, dtypes, shapes,
/// offsets), the file's size and where its tensor data starts; no tensor is read.
pub(crate) struct SafetensorsHeader {
    pub file: std::fs::File,
    pub json: Vec<u8>,
    pub size: u64,
    pub data_start: u64,
}

/// The error for a file that is not a readable safetensors file, and why.
pub(crate) fn unreadable_safetensors(file: &Path, why: impl std::fmt::Display) -> crate::Error {
    bad_input(file, format!("not a readable safetensors file ({why})"))
}

pub(crate) fn open_safetensors(path: &Path) -> Result<SafetensorsHeader> {
    use std::io::Read;
    let unreadable = |why: String| unreadable_safetensors(path, why);
    let mut file = std::fs::File::open(path).map_err(|e| bad_input(path, format!("cannot read: {e}")))?;
    let size = file.metadata().map_err(|e| unreadable(e.to_string()))?.len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|e| unreadable(e.to_string()))?;
    let header_len = u64::from_le_bytes(length);
    if header_len > 100_000_000 || 8 + header_len > size {
        return Err(unreadable(format!("a header of {header_len} bytes in a file of {size}")));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(|e| unreadable(e.to_string()))?;
    Ok(SafetensorsHeader { file, json, size, data_start: 8 + header_len })
}

/// Each tensor of a safetensors file as an f32 `Var`, read from its place in the file (the
/// header, parsed by the safetensors crate, gives names, dtypes, shapes and offsets).
fn read_safetensors(file: &Path, device: &Device, mut each: impl FnMut(String, Var)) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let unreadable = |why: String| unreadable_safetensors(file, why);
    let SafetensorsHeader { file: mut reader, json, size, data_start } = open_safetensors(file)?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&json).map_err(|e| unreadable(e.to_string()))?;
    let mut tensors: Vec<(String, &safetensors::tensor::TensorInfo)> = metadata.tensors().into_iter().collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets.0);
    for (name, info) in tensors {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F64 => DType::F64,
            other => return Err(bad_input(file, format!("tensor `{name}` has dtype {other:?}, expected a float dtype"))),
        };
        let (start, end) = info.data_offsets;
        let elements = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let expected = elements.and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        if end < start || expected != Some(end - start) || data_start + end as u64 > size {
            return Err(unreadable(format!("tensor `{name}`: offsets {start}..{end} do not fit its shape {:?} or the file", info.shape)));
        }
        reader.seek(SeekFrom::Start(data_start + start as u64)).map_err(|e| unreadable(e.to_string()))?;
        let mut bytes = vec![0u8; end - start];
        reader.read_exact(&mut bytes).map_err(|e| unreadable(e.to_string()))?;
        let values: Vec<f32> = match dtype {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            // bf16 is the top half of an f32.
            DType::BF16 => bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
            _ => Tensor::from_raw_buffer(&bytes, dtype, &info.shape, &Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        };
        drop(bytes);
        each(name, Var::from_vec(values, info.shape.as_slice(), device)?);
    }
    Ok(())
}

/// Write named tensors to a safetensors file atomically, with transformers' metadata.
pub fn save_tensors<'a>(path: &Path, tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<()> {
    let tensors: Vec<(&str, &Tensor)> = tensors.into_iter().collect();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    crate::output::write_safetensors(path, tensors, metadata)
}

/// The names of a layer's norms: Llama's `post_attention_layernorm` is the MLP's input norm;
/// Gemma 2's sandwich names it the attention's output norm and adds two.
pub struct LayerNames {
    pub attention_norm: &'static str,
    pub attention_out_norm: Option<&'static str>,
    pub mlp_norm: &'static str,
    pub mlp_out_norm: Option<&'static str>,
}

pub fn layer_names(config: &ModelConfig) -> LayerNames {
    if config.arch.sandwich_norms {
        LayerNames {
            attention_norm: "input_layernorm",
            attention_out_norm: Some("post_attention_layernorm"),
            mlp_norm: "pre_feedforward_layernorm",
            mlp_out_norm: Some("post_feedforward_layernorm"),
        }
    } else {
        LayerNames {
            attention_norm: "input_layernorm",
            attention_out_norm: None,
            mlp_norm: "post_attention_layernorm",
            mlp_out_norm: None,
        }
    }
}

/// Every tensor a model of `config` has, with its shape, by its family's Hugging Face name.
pub fn expected_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let arch = &config.arch;
    let norms = layer_names(config);
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for layer in 0..config.num_hidden_layers {
        let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
        let mut linear = |name: &str, out: usize, input: usize, bias: bool| {
            tensors.push((format!("{name}.weight"), vec![out, input]));
            if bias {
                tensors.push((format!("{name}.bias"), vec![out]));
            }
        };
        if arch.fused_projections {
            linear("self_attn.qkv_proj", q + 2 * kv, h, arch.qkv_bias);
        } else {
            linear("self_attn.q_proj", q, h, arch.qkv_bias);
            linear("self_attn.k_proj", kv, h, arch.qkv_bias);
            linear("self_attn.v_proj", kv, h, arch.qkv_bias);
        }
        linear("self_attn.o_proj", h, q, arch.o_bias);
        if arch.fused_projections {
            linear("mlp.gate_up_proj", 2 * i, h, arch.mlp_bias);
        } else {
            linear("mlp.gate_proj", i, h, arch.mlp_bias);
            linear("mlp.up_proj", i, h, arch.mlp_bias);
        }
        linear("mlp.down_proj", h, i, arch.mlp_bias);
        if arch.qk_norm {
            tensors.push(("self_attn.q_norm.weight".into(), vec![config.head_dim]));
            tensors.push(("self_attn.k_norm.weight".into(), vec![config.head_dim]));
        }
        let layer_norms = [Some(norms.attention_norm), norms.attention_out_norm, Some(norms.mlp_norm), norms.mlp_out_norm];
        for norm in layer_norms.into_iter().flatten() {
            tensors.push((format!("{norm}.weight"), vec![h]));
        }
        shapes.extend(tensors.into_iter().map(|(name, shape)| (format!("model.layers.{layer}.{name}"), shape)));
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    match config.head {
        Head::CausalLm if !config.tie_word_embeddings => shapes.push(("lm_head.weight".to_string(), vec![v, h])),
        Head::CausalLm => {}
        Head::SequenceClassification { num_labels } => shapes.push(("score.weight".to_string(), vec![num_labels, h])),
    }
    shapes
}
