//! The decoder of every model family, top to bottom in the order data flows through it: rotary tables, linear
//! layers, attention, MLP, block, model. Every weight is named as Hugging Face names it, and
//! every op has a backward, so this one model serves inference and training.

use candle_core::{D, DType, Device, Result, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::ops::{attention_softmax, rms_norm, rope_heads_first, swiglu};
use super::weights::Params;

/// Added to attention scores a query must not see. Finite, so a fully masked row (a padding
/// query) gives a uniform distribution instead of NaNs that would poison later positions.
const MASKED: f32 = -1e30;

/// Rotary embedding tables `cos`, `sin`: `[max_positions, head_dim]`, halves duplicated.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let dim = config.head_dim;
        // f32 throughout, as transformers computes `inv_freq` and the angles.
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
            .map(|f| scale_frequency(f, &config.rope_scaling))
            .collect();
        let positions = config.max_position_embeddings;
        let mut angles = Vec::with_capacity(positions * dim);
        for p in 0..positions {
            let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (positions, dim), device)?;
        Ok(Rope { cos: angles.cos()?, sin: angles.sin()? })
    }

    /// Tables for `t` tokens after `past` cached ones, or at explicit `[B, T]` positions:
    /// `[1 or B, T, head_dim]`.
    fn at(&self, past: usize, t: usize, positions: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let max = self.cos.dim(0)?;
        match positions {
            None => {
                if past + t > max {
                    candle_core::bail!("sequence of {} tokens is longer than max_position_embeddings {max}", past + t)
                }
                let take = |table: &Tensor| table.narrow(0, past, t)?.unsqueeze(0);
                Ok((take(&self.cos)?, take(&self.sin)?))
            }
            Some(positions) => {
                let (b, t) = positions.dims2()?;
                let flat = positions.flatten_all()?.to_dtype(DType::U32)?;
                let highest = flat.max(0)?.to_scalar::<u32>()? as usize;
                if highest >= max {
                    candle_core::bail!("position {highest} is beyond max_position_embeddings {max}")
                }
                let take = |table: &Tensor| table.index_select(&flat, 0)?.reshape((b, t, table.dim(1)?));
                Ok((take(&self.cos)?, take(&self.sin)?))
            }
        }
    }
}

fn scale_frequency(inv_freq: f32, scaling: &RopeScaling) -> f32 {
    match *scaling {
        RopeScaling::Default => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor as f32,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high, original) =
                (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
            let wavelength = 2.0 * std::f32::consts::PI / inv_freq;
            if wavelength < original / high {
                inv_freq
            } else if wavelength > original / low {
                inv_freq / factor
            } else {
                let smooth = (original / wavelength - low) / (high - low);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}

/// `y = x Wᵀ + b` over the last dimension.
struct Linear {
    /// `Wᵀ`, `[in, out]` (see [`Weights::transposed`]).
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(params: &Weights, prefix: &str, bias: bool) -> Result<Self> {
        let weight = params.get(&format!("{prefix}.weight"))?;
        Ok(Linear {
            weight_t: params.transposed(&weight)?,
            bias: if bias { Some(params.get(&format!("{prefix}.bias"))?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let features = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let y = x.reshape((rows, features))?.matmul(&self.weight_t)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        dims.push(self.weight_t.dim(1)?);
        y.reshape(dims)
    }
}

/// Weights by Hugging Face name, shared with the optimizer's `Var`s or detached from them.
struct Weights<'a> {
    params: &'a Params,
    detach: bool,
}

impl Weights<'_> {
    fn optional(&self, name: &str) -> Option<Tensor> {
        let tensor = self.params.get(name)?.as_tensor();
        Some(if self.detach { tensor.detach() } else { tensor.clone() })
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        self.optional(name).ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))
    }

    /// `Wᵀ` for `x Wᵀ`: a view of the parameter when training (it changes in place every
    /// step); a contiguous copy for inference, which gemm multiplies by small row counts twice
    /// as fast (batch-8 decoding: 2,740 → 5,530 tokens/s).
    fn transposed(&self, weight: &Tensor) -> Result<Tensor> {
        if self.detach { weight.t()?.contiguous() } else { weight.t() }
    }
}

/// Keys and values of one layer in buffers `[B, kv_heads, capacity, head_dim]` written in
/// place, so a decoding step copies only its new token's keys, not the whole history.
/// Inference only: gradients do not flow through cached keys.
#[derive(Clone, Default)]
struct LayerCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
}

impl LayerCache {
    /// Append `k`, `v` `[B, kv_heads, T, head_dim]`; return all keys and values so far.
    fn append(&mut self, k: &Tensor, v: &Tensor, capacity_hint: usize) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let needed = self.len + t;
        let capacity = self.buffers.as_ref().map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if needed > capacity {
            let (b, heads, _, d) = k.dims4()?;
            let grown = needed.max(capacity * 2).max(capacity_hint);
            let fresh = |old: Option<&Tensor>| -> Result<Tensor> {
                let buffer = Tensor::zeros((b, heads, grown, d), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| self.len > 0) {
                    buffer.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            let old = self.buffers.take();
            self.buffers = Some((fresh(old.as_ref().map(|o| &o.0))?, fresh(old.as_ref().map(|o| &o.1))?));
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }
}

/// Grouped-query self-attention (`model.layers.{i}.self_attn.*`).
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(params: &Weights, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let linear = |name: &str| Linear::load(params, &format!("{prefix}.{name}"), config.attention_bias);
        Ok(Attention {
            q_proj: linear("q_proj")?,
            k_proj: linear("k_proj")?,
            v_proj: linear("v_proj")?,
            o_proj: linear("o_proj")?,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<(&mut LayerCache, usize)>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        // Projections are [B, T, heads, D]; rotary embedding writes them heads-first.
        let q = rope_heads_first(&self.q_proj.forward(x)?.reshape((b, t, heads, d))?, cos, sin)?;
        let mut k = rope_heads_first(&self.k_proj.forward(x)?.reshape((b, t, kv_heads, d))?, cos, sin)?;
        let mut v = self.v_proj.forward(x)?.reshape((b, t, kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        if let Some((cache, capacity_hint)) = cache {
            (k, v) = cache.append(&k, &v, capacity_hint)?;
        }
        let keys = k.dim(2)?;
        // Query heads sharing a key/value head are stacked along the row axis, so one matmul
        // per kv head serves the whole group without copying keys and values.
        let groups = heads / kv_heads;
        let q = q.reshape((b, kv_heads, groups * t, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, kv_heads * groups, t, keys))?;
        let probs = attention_softmax(&scores, mask, 1.0 / (d as f64).sqrt())?.reshape((b, kv_heads, groups * t, keys))?;
        let out = probs.matmul(&v)?.reshape((b, heads, t, d))?.transpose(1, 2)?.contiguous()?;
        self.o_proj.forward(&out.reshape((b, t, heads * d))?)
    }
}

/// SwiGLU feed-forward (`model.layers.{i}.mlp.*`).
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(params: &Weights, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let linear = |name: &str| Linear::load(params, &format!("{prefix}.{name}"), config.mlp_bias);
        Ok(Mlp { gate_proj: linear("gate_proj")?, up_proj: linear("up_proj")?, down_proj: linear("down_proj")? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl Block {
    fn load(params: &Weights, layer: usize, config: &ModelConfig) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        Ok(Block {
            input_layernorm: params.get(&format!("{prefix}.input_layernorm.weight"))?,
            self_attn: Attention::load(params, &format!("{prefix}.self_attn"), config)?,
            post_attention_layernorm: params.get(&format!("{prefix}.post_attention_layernorm.weight"))?,
            mlp: Mlp::load(params, &format!("{prefix}.mlp"), config)?,
            eps: config.rms_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<(&mut LayerCache, usize)>) -> Result<Tensor> {
        let attended = self.self_attn.forward(&rms_norm(x, &self.input_layernorm, self.eps)?, cos, sin, mask, cache)?;
        let x = (x + attended)?;
        let fed = self.mlp.forward(&rms_norm(&x, &self.post_attention_layernorm, self.eps)?)?;
        x + fed
    }
}

/// Keys and values of every layer from earlier calls, for incremental decoding.
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    /// Tokens to make room for at once (the caller's prompt + new tokens, when known).
    capacity_hint: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache { layers: vec![LayerCache::default(); layers], len: 0, capacity_hint: 0 }
    }

    /// A cache that will hold `tokens` tokens without growing.
    pub fn with_capacity(layers: usize, tokens: usize) -> Self {
        KvCache { capacity_hint: tokens, ..Self::new(layers) }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Optional inputs beyond the token ids.
#[derive(Default, Clone, Copy)]
pub struct ForwardOptions<'a> {
    /// `[B, T_cached + T]`, 1 for tokens and 0 for padding: padding is never attended to.
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, T]` position of each token (left-padded batches, packed rows); default
    /// `T_cached + 0..T`.
    pub position_ids: Option<&'a Tensor>,
    /// `[B, T]` sample index within a packed row: tokens attend only within their sample.
    pub segment_ids: Option<&'a Tensor>,
}

/// The whole model: `model.embed_tokens`, `model.layers.*`, `model.norm`, and the heads
/// (`lm_head`, or the tied embedding; `score` for sequence classification).
pub struct Decoder {
    pub config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    /// Heads as `[hidden, out]` (see [`Linear`]): `lm_head` or the tied embedding, and `score`.
    lm_head_t: Option<Tensor>,
    score_t: Option<Tensor>,
    rope: Rope,
}

impl Decoder {
    /// Build from parameters already checked with [`Params::check`]; training reads the same
    /// tensors the optimizer updates.
    pub fn new(config: &ModelConfig, params: &Params) -> Result<Self> {
        Self::build(config, &Weights { params, detach: false })
    }

    /// Build for inference: the weights are detached, so no op records a backward graph (a KV
    /// cache would otherwise keep every step's graph alive), and projections are stored
    /// transposed. This is a snapshot: after the parameters change (a training step), build a
    /// new one.
    pub fn new_inference(config: &ModelConfig, params: &Params) -> Result<Self> {
        Self::build(config, &Weights { params, detach: true })
    }

    fn build(config: &ModelConfig, params: &Weights) -> Result<Self> {
        let embed_tokens = params.get("model.embed_tokens.weight")?;
        let device = embed_tokens.device().clone();
        let layers = (0..config.num_hidden_layers)
            .map(|layer| Block::load(params, layer, config))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if config.tie_word_embeddings {
            Some(embed_tokens.clone())
        } else {
            params.optional("lm_head.weight")
        };
        Ok(Decoder {
            config: config.clone(),
            layers,
            norm: params.get("model.norm.weight")?,
            lm_head_t: lm_head.map(|w| params.transposed(&w)).transpose()?,
            score_t: params.optional("score.weight").map(|w| params.transposed(&w)).transpose()?,
            rope: Rope::new(config, &device)?,
            embed_tokens,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// A cache sized for `tokens` tokens per row.
    pub fn cache_for(&self, tokens: usize) -> KvCache {
        KvCache::with_capacity(self.layers.len(), tokens)
    }

    /// Final hidden states `[B, T, hidden]` (after the last norm) for token ids `[B, T]`.
    /// With a cache, the tokens continue the cached sequence and the cache grows by `T`.
    pub fn forward(&self, input_ids: &Tensor, options: ForwardOptions, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if options.segment_ids.is_some() && past > 0 {
            candle_core::bail!("packed rows (segment_ids) cannot continue a KV cache")
        }
        let hidden = self.config.hidden_size;
        let mut x = self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, hidden))?;
        let (cos, sin) = self.rope.at(past, t, options.position_ids)?;
        let mask = attention_mask(b, t, past, &options, self.device())?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| (&mut c.layers[i], c.capacity_hint));
            x = layer.forward(&x, &cos, &sin, mask.as_ref(), layer_cache)?;
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Next-token logits `[B, T, vocab]` from hidden states.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let weight_t = self
            .lm_head_t
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("this model has no language-model head".into()))?;
        project(hidden, weight_t)
    }

    /// Classification scores `[B, T, num_labels]` from hidden states (`score` head).
    pub fn class_scores(&self, hidden: &Tensor) -> Result<Tensor> {
        let weight_t = self
            .score_t
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("this model has no `score` head".into()))?;
        project(hidden, weight_t)
    }

    /// Hidden states and logits of every position.
    pub fn forward_logits(&self, input_ids: &Tensor, options: ForwardOptions, cache: Option<&mut KvCache>) -> Result<(Tensor, Tensor)> {
        let hidden = self.forward(input_ids, options, cache)?;
        let logits = self.lm_logits(&hidden)?;
        Ok((hidden, logits))
    }
}

fn project(hidden: &Tensor, weight_t: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    hidden.reshape((b * t, h))?.matmul(weight_t)?.reshape((b, t, weight_t.dim(1)?))
}

/// The additive mask `[1 or B, T, T_cached + T]`: causal, minus padding, minus other
/// samples of a packed row. `None` when a single new token may see everything cached.
fn attention_mask(b: usize, t: usize, past: usize, options: &ForwardOptions, device: &Device) -> Result<Option<Tensor>> {
    let keys = past + t;
    let padding: Option<Vec<Vec<u32>>> = options
        .attention_mask
        .map(|m| m.to_dtype(DType::U32)?.to_vec2())
        .transpose()?;
    let segments: Option<Vec<Vec<u32>>> = options
        .segment_ids
        .map(|s| s.to_dtype(DType::U32)?.to_vec2())
        .transpose()?;
    if let Some(p) = &padding {
        if p.len() != b || p.iter().any(|row| row.len() != keys) {
            candle_core::bail!("attention_mask must be [{b}, {keys}] (cached + new tokens)")
        }
    }
    let per_row = padding.is_some() || segments.is_some();
    if !per_row && t == 1 {
        return Ok(None);
    }
    let rows = if per_row { b } else { 1 };
    let mut values = vec![0f32; rows * t * keys];
    for r in 0..rows {
        for i in 0..t {
            for j in 0..keys {
                let causal = j <= past + i;
                let not_padding = padding.as_ref().is_none_or(|p| p[r][j] != 0);
                let same_sample = segments.as_ref().is_none_or(|s| s[r][i] == s[r][j]);
                if !(causal && not_padding && same_sample) {
                    values[(r * t + i) * keys + j] = MASKED;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(values, (rows, t, keys), device)?))
}

/// Log-probability of each next token: `[B, T-1]` for ids `[B, T]` and logits `[B, T, V]`.
pub fn token_logprobs(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    let t = input_ids.dim(1)?;
    let logp = super::ops::log_softmax_last_dim(&logits.narrow(1, 0, t - 1)?)?;
    let targets = input_ids.narrow(1, 1, t - 1)?.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?;
    logp.gather(&targets.contiguous()?, D::Minus1)?.squeeze(D::Minus1)
}

#[cfg(test)]
mod tests;
