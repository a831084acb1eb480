//! The decoder of every model family, top to bottom in the order data flows through it: linear
//! layers, attention, MLP, block, model. Families differ only in the fields of
//! [`Architecture`](super::family::Architecture) the blocks read (biases, norm offsets,
//! q/k norms, sandwich norms, soft-caps, sliding windows, fused projections, partial rotary),
//! never in code paths of their own. Every weight is named as Hugging Face names it, and every
//! op has a backward, so this one model serves inference and training.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{D, DType, Device, Result, Tensor, TensorId, Var};

use super::config::ModelConfig;
use super::family::Activation;
use super::fused;
use super::lora::{self, Adapter};
use super::panels::Panels;
use super::ops::{attention_softmax, gated_activation, rms_norm, rope_heads_first, softcap};
use super::recompute::{self, Backward};
use super::rope::Rope;
use super::weights::{Params, layer_names};

/// Added to attention scores a query must not see. Finite, so a fully masked row (a padding
/// query) gives a uniform distribution instead of NaNs that would poison later positions.
const MASKED: f32 = -1e30;

/// What a decoder's adapters do right now, shared by all its LoRA layers: on or off (PEFT's
/// `disable_adapter`, the PPO reference), recording gradients or not (sampling), and the seed
/// of this micro-batch's dropout masks (none: no dropout, as in evaluation).
#[derive(Debug)]
pub struct AdapterSwitch {
    enabled: AtomicBool,
    grad: AtomicBool,
    dropout_seed: AtomicU64,
}

const NO_DROPOUT: u64 = u64::MAX;

impl AdapterSwitch {
    fn new() -> Self {
        AdapterSwitch { enabled: AtomicBool::new(true), grad: AtomicBool::new(true), dropout_seed: AtomicU64::new(NO_DROPOUT) }
    }

    /// Run with the adapters on (the tuned model) or off (the base).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Record gradients through the adapters (training) or not (sampling, evaluation).
    pub fn set_grad(&self, on: bool) {
        self.grad.store(on, Ordering::Relaxed);
    }

    /// Dropout masks drawn from `seed` (a micro-batch's), or no dropout.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        self.dropout_seed.store(seed.map_or(NO_DROPOUT, |s| s & !(1 << 63)), Ordering::Relaxed);
    }

    fn dropout_seed(&self) -> Option<u64> {
        Some(self.dropout_seed.load(Ordering::Relaxed)).filter(|&s| s != NO_DROPOUT)
    }
}

/// A LoRA pair on a linear layer: `scale · B A dropout(x)`, stored transposed.
#[derive(Clone)]
struct Lora {
    /// `Aᵀ` `[in, r]` and `Bᵀ` `[r, out]`.
    a_t: Tensor,
    b_t: Tensor,
    scale: f64,
    dropout: f64,
    /// This module's place in the model, mixed into its dropout masks.
    id: u64,
    switch: Arc<AdapterSwitch>,
}

impl Lora {
    /// The adapter's term for rows `x` `[rows, in]`, when the adapter is on.
    fn delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.switch.enabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (a_t, b_t) = match self.switch.grad.load(Ordering::Relaxed) {
            true => (self.a_t.clone(), self.b_t.clone()),
            false => (self.a_t.detach(), self.b_t.detach()),
        };
        let x = match self.switch.dropout_seed() {
            Some(seed) if self.dropout > 0.0 => super::ops::dropout(x, self.dropout, seed ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15))?,
            _ => x.clone(),
        };
        Ok(Some((x.matmul(&a_t)?.matmul(&b_t)? * self.scale)?))
    }
}

/// `y = x Wᵀ + b` over the last dimension, plus a LoRA term where an adapter wraps the layer.
#[derive(Clone)]
struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    /// A frozen base's weight: no gradient is computed for it.
    frozen: bool,
}

/// A linear layer's weight as its products read it.
#[derive(Clone)]
enum LinearWeight {
    /// `Wᵀ`, `[in, out]` (see [`Weights::transposed`]).
    Transposed(Tensor),
    /// An inference decoder's on a CPU with AVX-512 or AVX2: packed for reading at memory speed.
    Panels(Arc<Panels>),
}

impl LinearWeight {
    /// `weight` `[out, in]` as `params`' mode wants it.
    fn of(params: &Weights, weight: &Tensor) -> Result<Self> {
        if params.mode == Mode::Inference
            && let Some(panels) = Panels::pack(weight)?
        {
            return Ok(LinearWeight::Panels(Arc::new(panels)));
        }
        Ok(LinearWeight::Transposed(params.transposed(weight)?))
    }

    fn out_features(&self) -> Result<usize> {
        match self {
            LinearWeight::Transposed(weight_t) => weight_t.dim(1),
            LinearWeight::Panels(panels) => Ok(panels.out_features()),
        }
    }

    /// `x Wᵀ` for rows `x` `[N, in]`; for a frozen weight that `x` needs a gradient through,
    /// without one for the weight.
    fn product(&self, x: &Tensor, frozen: bool) -> Result<Tensor> {
        match self {
            LinearWeight::Panels(panels) => panels.product(x),
            LinearWeight::Transposed(weight_t) if frozen && x.track_op() && fused::supported(x) && fused::supported(weight_t) => {
                fused::frozen_matmul(x, weight_t)
            }
            LinearWeight::Transposed(weight_t) => x.matmul(weight_t),
        }
    }
}

impl Linear {
    fn load(params: &Weights, prefix: &str, bias: bool) -> Result<Self> {
        let weight = params.get(&format!("{prefix}.weight"))?;
        Ok(Linear {
            weight: LinearWeight::of(params, &weight)?,
            bias: if bias { Some(params.get(&format!("{prefix}.bias"))?) } else { None },
            lora: params.lora(prefix)?,
            frozen: params.mode == Mode::Frozen,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let features = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let x = x.reshape((rows, features))?;
        let mut y = self.weight.product(&x, self.frozen)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(delta) = self.lora.as_ref().map(|l| l.delta(&x)).transpose()?.flatten() {
            y = (y + delta)?;
        }
        dims.push(self.weight.out_features()?);
        y.reshape(dims)
    }
}

/// Several projections of the same input: separate layers (`q_proj`, `k_proj`, `v_proj`), or
/// one stored fused (Phi-3's `qkv_proj`, `gate_up_proj`) whose output is split in order.
#[derive(Clone)]
enum Projections {
    Separate(Vec<Linear>),
    Fused { linear: Linear, sizes: Vec<usize> },
}

impl Projections {
    /// `names` and `sizes` in output order; `fused` names the one stored tensor instead.
    fn load(params: &Weights, prefix: &str, names: &[&str], fused: Option<&str>, sizes: &[usize], bias: bool) -> Result<Self> {
        if let Some(name) = fused {
            return Ok(Projections::Fused {
                linear: Linear::load(params, &format!("{prefix}.{name}"), bias)?,
                sizes: sizes.to_vec(),
            });
        }
        let prefixes: Vec<String> = names.iter().map(|name| format!("{prefix}.{name}")).collect();
        if params.mode == Mode::Inference && names.len() > 1 && params.adapter.is_none() {
            return Self::joined(params, &prefixes, sizes, bias);
        }
        let layers = prefixes.iter().map(|p| Linear::load(params, p, bias)).collect::<Result<Vec<_>>>()?;
        Ok(Projections::Separate(layers))
    }

    /// For inference, separate projections as one product of their weights stacked
    /// (`[q + k + v, in]`, `[2 · intermediate, in]`): a decoding step makes one call instead
    /// of three or two, large enough to share between the cores. Not with an adapter, whose
    /// LoRA pairs act on each layer alone.
    fn joined(params: &Weights, prefixes: &[String], sizes: &[usize], bias: bool) -> Result<Self> {
        let tensors = |suffix: &str| prefixes.iter().map(|p| params.get(&format!("{p}.{suffix}"))).collect::<Result<Vec<_>>>();
        let linear = Linear {
            weight: LinearWeight::of(params, &Tensor::cat(&tensors("weight")?, 0)?)?,
            bias: if bias { Some(Tensor::cat(&tensors("bias")?, 0)?) } else { None },
            lora: None,
            frozen: false,
        };
        Ok(Projections::Fused { linear, sizes: sizes.to_vec() })
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(layers) => layers.iter().map(|l| l.forward(x)).collect(),
            Projections::Fused { linear, sizes } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                sizes
                    .iter()
                    .map(|&size| {
                        let part = y.narrow(D::Minus1, start, size)?.contiguous();
                        start += size;
                        part
                    })
                    .collect()
            }
        }
    }
}

/// RMSNorm over the last dimension, scaling by `offset + weight` (Gemma's `1 + w`). The offset
/// is added at every forward: the weight changes in place while training.
#[derive(Clone)]
struct Norm {
    weight: Tensor,
    offset: f64,
    eps: f64,
}

impl Norm {
    fn load(params: &Weights, name: &str, config: &ModelConfig) -> Result<Self> {
        Ok(Norm { weight: params.get(name)?, offset: config.arch.norm_weight_offset, eps: config.rms_norm_eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.offset == 0.0 {
            rms_norm(x, &self.weight, self.eps)
        } else {
            rms_norm(x, &(&self.weight + self.offset)?, self.eps)
        }
    }
}

/// How a decoder holds its weights.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every weight trains: views of the optimizer's `Var`s.
    Train,
    /// LoRA training: the base is frozen (detached, no gradients), the adapter trains.
    Frozen,
    /// Inference: everything detached.
    Inference,
}

/// Weights by Hugging Face name, shared with the optimizer's `Var`s or detached from them,
/// and an adapter's pairs by module.
struct Weights<'a> {
    params: &'a Params,
    mode: Mode,
    adapter: Option<&'a Adapter>,
    switch: Arc<AdapterSwitch>,
    /// Ids of the trainable tensors handed out since the last [`Weights::take_trained`].
    trained: std::cell::RefCell<Vec<TensorId>>,
}

impl<'a> Weights<'a> {
    fn new(params: &'a Params, mode: Mode, adapter: Option<&'a Adapter>) -> Self {
        Weights { params, mode, adapter, switch: Arc::new(AdapterSwitch::new()), trained: Default::default() }
    }

    /// The trainable tensors handed out since the last call (a layer's, for checkpointing).
    fn take_trained(&self) -> Vec<TensorId> {
        std::mem::take(&mut *self.trained.borrow_mut())
    }

    fn optional(&self, name: &str) -> Option<Tensor> {
        let tensor = self.params.get(name)?.as_tensor();
        if self.mode == Mode::Train {
            self.trained.borrow_mut().push(tensor.id());
            Some(tensor.clone())
        } else {
            Some(tensor.detach())
        }
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        self.optional(name).ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))
    }

    /// `Wᵀ` for `x Wᵀ`: a view of the parameter when training (it changes in place every
    /// step) and of a frozen base (no second copy of the weights: LoRA is about memory); a
    /// contiguous copy for inference, which gemm multiplies by small row counts twice as fast
    /// (batch-8 decoding: 2,740 → 5,530 tokens/s).
    fn transposed(&self, weight: &Tensor) -> Result<Tensor> {
        if self.mode == Mode::Inference { weight.t()?.contiguous() } else { weight.t() }
    }

    /// The adapter's pair for the module at `prefix`, if it wraps that module.
    fn lora(&self, prefix: &str) -> Result<Option<Lora>> {
        let Some(adapter) = self.adapter else { return Ok(None) };
        let Some((a, b)) = adapter.pair(prefix) else { return Ok(None) };
        let id = adapter.modules.iter().position(|m| m.path == prefix).unwrap_or(0) as u64;
        let (a_t, b_t) = match self.mode {
            Mode::Inference => (a.as_tensor().detach().t()?.contiguous()?, b.as_tensor().detach().t()?.contiguous()?),
            _ => {
                self.trained.borrow_mut().extend([a.as_tensor().id(), b.as_tensor().id()]);
                (a.as_tensor().t()?, b.as_tensor().t()?)
            }
        };
        Ok(Some(Lora { a_t, b_t, scale: adapter.settings.scale(), dropout: adapter.settings.dropout, id, switch: self.switch.clone() }))
    }

    /// The classifier head: an adapter's own (PEFT's `modules_to_save`), else the base's.
    fn score(&self) -> Option<Tensor> {
        match self.adapter.and_then(|a| a.params.get(lora::SCORE)) {
            Some(var) if self.mode == Mode::Inference => Some(var.as_tensor().detach()),
            Some(var) => Some(var.as_tensor().clone()),
            None => self.optional("score.weight"),
        }
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
#[derive(Clone)]
struct Attention {
    qkv: Projections,
    o_proj: Linear,
    /// Qwen3's per-head norms of queries and keys, before RoPE.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    /// Probabilities per layer from which training recomputes them (see [`RECOMPUTED_PROBS`]).
    recompute_probs_from: usize,
}

impl Attention {
    fn load(params: &Weights, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let (q, kv) = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
        let fused = config.arch.fused_projections.then_some("qkv_proj");
        let qkv = Projections::load(params, prefix, &["q_proj", "k_proj", "v_proj"], fused, &[q, kv, kv], config.arch.qkv_bias)?;
        let norm = |name: &str| {
            config.arch.qk_norm.then(|| Norm::load(params, &format!("{prefix}.{name}.weight"), config)).transpose()
        };
        Ok(Attention {
            qkv,
            o_proj: Linear::load(params, &format!("{prefix}.o_proj"), config.arch.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            scale: config.attention_scale(),
            softcap: config.arch.attn_logit_softcapping,
            recompute_probs_from: RECOMPUTED_PROBS / config.num_hidden_layers.max(1),
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<(&mut LayerCache, usize)>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: expected q, k and v".into()))?;
        // Projections are [B, T, heads, D]; rotary embedding writes them heads-first.
        let normed = |x: Tensor, norm: &Option<Norm>| match norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        };
        let q = rope_heads_first(&normed(q.reshape((b, t, heads, d))?, &self.q_norm)?, cos, sin)?;
        let mut k = rope_heads_first(&normed(k.reshape((b, t, kv_heads, d))?, &self.k_norm)?, cos, sin)?;
        let mut v = v.reshape((b, t, kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        if let Some((cache, capacity_hint)) = cache {
            (k, v) = cache.append(&k, &v, capacity_hint)?;
        }
        if self.softcap.is_none() && super::decode::attention_applies(&q, &k) {
            let out = super::decode::attention(&q, &k, &v, mask, self.scale)?;
            return self.o_proj.forward(&out.reshape((b, t, heads * d))?);
        }
        let keys = k.dim(2)?;
        // Query heads sharing a key/value head are stacked along the row axis, so one matmul
        // per kv head serves the whole group without copying keys and values.
        let groups = heads / kv_heads;
        let q = q.reshape((b, kv_heads, groups * t, d))?;
        let fused_probs = self.softcap.is_none() && fused::supported(&q) && fused::supported(&k);
        if fused_probs && fused::supported(&v) && q.track_op() && b * heads * t * keys >= self.recompute_probs_from {
            let out = attention_recomputing_probs(&q, &k, &v, mask, self.scale)?.reshape((b, heads, t, d))?.transpose(1, 2)?.contiguous()?;
            return self.o_proj.forward(&out.reshape((b, t, heads * d))?);
        }
        let probs = if fused_probs {
            fused::attention_probs(&q, &k, mask, self.scale)?
        } else {
            let scores = q.matmul(&k.t()?)?.reshape((b, kv_heads * groups, t, keys))?;
            let probs = match self.softcap {
                Some(cap) => attention_softmax(&softcap(&(scores * self.scale)?, cap)?, mask, 1.0)?,
                None => attention_softmax(&scores, mask, self.scale)?,
            };
            probs.reshape((b, kv_heads, groups * t, keys))?
        };
        let out = probs.matmul(&v)?.reshape((b, heads, t, d))?.transpose(1, 2)?.contiguous()?;
        self.o_proj.forward(&out.reshape((b, t, heads * d))?)
    }
}

/// Attention probabilities (`[B, heads, T, keys]` f32 elements, over all layers) from which
/// training recomputes them in the backward pass instead of holding them: 256 MB. The
/// SmolLM2-135M shape's batch 4 × 512 holds 38 MB a layer, 1.1 GB over its 30 layers, and
/// recomputing costs one more `q kᵀ` and softmax, about 3% of a layer's work; bench-tiny's
/// 34 MB stay held.
const RECOMPUTED_PROBS: usize = 64 << 20;

/// `softmax(scale · q kᵀ + mask) v` for queries `[B, KV, G·T, D]` and keys and values
/// `[B, KV, keys, D]`, whose backward pass recomputes the probabilities from `q` and `k`: the
/// graph holds q, k and v (which it holds anyway) and not the probabilities. The same ops run
/// in the same order, so values and gradients are those of the plain path.
fn attention_recomputing_probs(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let attend = move |q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>| fused::attention_probs(q, k, mask, scale)?.matmul(v);
    let d = k.dim(3)?;
    let value = attend(&q.detach(), &k.detach(), &v.detach().contiguous()?, mask)?;
    let mask = mask.cloned();
    let backward: Backward = Arc::new(move |inputs: &[Tensor], grad: &Tensor| {
        let q = Var::from_tensor(&inputs[0].detach())?;
        let kv = Var::from_tensor(&inputs[1].detach())?;
        let (k, v) = (kv.narrow(3, 0, d)?.contiguous()?, kv.narrow(3, d, d)?.contiguous()?);
        let out = attend(q.as_tensor(), &k, &v, mask.as_ref())?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        Ok(vec![grads.get(q.as_tensor()).cloned(), grads.get(kv.as_tensor()).cloned()])
    });
    // Keys and values travel as one input (a recomputing op takes two).
    recompute::with_backward2(q, &Tensor::cat(&[k, v], 3)?, &value, backward)
}

/// Gated feed-forward, SwiGLU or GeGLU (`model.layers.{i}.mlp.*`).
#[derive(Clone)]
struct Mlp {
    gate_up: Projections,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    fn load(params: &Weights, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let i = config.intermediate_size;
        let fused = config.arch.fused_projections.then_some("gate_up_proj");
        Ok(Mlp {
            gate_up: Projections::load(params, prefix, &["gate_proj", "up_proj"], fused, &[i, i], config.arch.mlp_bias)?,
            down_proj: Linear::load(params, &format!("{prefix}.down_proj"), config.arch.mlp_bias)?,
            activation: config.arch.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = self.gate_up.forward(x)?;
        self.down_proj.forward(&gated_activation(&parts[0], &parts[1], self.activation)?)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual; Gemma 2 also
/// norms each one's output before adding it.
#[derive(Clone)]
struct Block {
    attention_norm: Norm,
    self_attn: Attention,
    attention_out_norm: Option<Norm>,
    mlp_norm: Norm,
    mlp: Mlp,
    mlp_out_norm: Option<Norm>,
    /// This layer's sliding window, if it has one.
    window: Option<usize>,
    /// Its trainable tensors, whose gradients a checkpointed backward hands on.
    trained: Arc<Vec<TensorId>>,
}

impl Block {
    fn load(params: &Weights, layer: usize, config: &ModelConfig) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        let names = layer_names(config);
        let norm = |name: &str| Norm::load(params, &format!("{prefix}.{name}.weight"), config);
        params.take_trained();
        let mut block = Block {
            attention_norm: norm(names.attention_norm)?,
            self_attn: Attention::load(params, &format!("{prefix}.self_attn"), config)?,
            attention_out_norm: names.attention_out_norm.map(norm).transpose()?,
            mlp_norm: norm(names.mlp_norm)?,
            mlp: Mlp::load(params, &format!("{prefix}.mlp"), config)?,
            mlp_out_norm: names.mlp_out_norm.map(norm).transpose()?,
            window: config.arch.sliding_windows[layer],
            trained: Arc::default(),
        };
        block.trained = Arc::new(params.take_trained());
        Ok(block)
    }

    /// [`Block::forward`] keeping only the input: the backward pass recomputes the layer's
    /// activations from it (gradient checkpointing), with the same gradients.
    fn checkpointed(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let value = self.forward(&x.detach(), cos, sin, mask, None)?;
        let (mut block, cos, sin, mask) = (self.clone(), cos.clone(), sin.clone(), mask.cloned());
        // The recomputed layer's activations live only through its own backward pass: its
        // attention probabilities need no second recomputation.
        block.self_attn.recompute_probs_from = usize::MAX;
        let backward: Backward = Arc::new(move |inputs: &[Tensor], grad: &Tensor| {
            let x = Var::from_tensor(&inputs[0].detach())?;
            let y = block.forward(x.as_tensor(), &cos, &sin, mask.as_ref(), None)?;
            let grads = (y * grad.detach())?.sum_all()?.backward()?;
            for &id in block.trained.iter() {
                if let Some(g) = grads.get_id(id) {
                    recompute::add_side_grad(id, g.clone())?;
                }
            }
            Ok(vec![grads.get(x.as_tensor()).cloned()])
        });
        recompute::with_backward(x, &value, backward)
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<(&mut LayerCache, usize)>) -> Result<Tensor> {
        let out_normed = |y: Tensor, norm: &Option<Norm>| match norm {
            Some(norm) => norm.forward(&y),
            None => Ok(y),
        };
        let attended = self.self_attn.forward(&self.attention_norm.forward(x)?, cos, sin, mask, cache)?;
        let x = (x + out_normed(attended, &self.attention_out_norm)?)?;
        let fed = self.mlp.forward(&self.mlp_norm.forward(&x)?)?;
        x + out_normed(fed, &self.mlp_out_norm)?
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
    norm: Norm,
    /// Heads (see [`LinearWeight`]): `lm_head` or the tied embedding, and `score`.
    lm_head: Option<LinearWeight>,
    score: Option<LinearWeight>,
    rope: Rope,
    switch: Arc<AdapterSwitch>,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    checkpointing: bool,
    /// The base is frozen (LoRA): its weights get no gradients.
    frozen_base: bool,
}

impl Decoder {
    /// Build from parameters already checked with [`Params::check`]; training reads the same
    /// tensors the optimizer updates.
    pub fn new(config: &ModelConfig, params: &Params) -> Result<Self> {
        Self::build(config, &Weights::new(params, Mode::Train, None))
    }

    /// Build for LoRA training: `base` frozen (the decoder keeps its own copies, so the caller
    /// may drop `base`), the adapter's pairs (and head) trained through the same linear layers.
    pub fn with_adapter(config: &ModelConfig, base: &Params, adapter: &Adapter) -> Result<Self> {
        Self::build(config, &Weights::new(base, Mode::Frozen, Some(adapter)))
    }

    /// Build for inference: the weights are detached, so no op records a backward graph (a KV
    /// cache would otherwise keep every step's graph alive), and projections are stored
    /// transposed. This is a snapshot: after the parameters change (a training step), build a
    /// new one.
    pub fn new_inference(config: &ModelConfig, params: &Params) -> Result<Self> {
        Self::build(config, &Weights::new(params, Mode::Inference, None))
    }

    /// Keep only each layer's input while training and recompute its activations in the
    /// backward pass: memory for one layer's activations instead of all, for one more forward.
    /// Gradients reach the parameters through [`recompute::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// The switch of this decoder's adapters (see [`AdapterSwitch`]).
    pub fn adapter_switch(&self) -> &AdapterSwitch {
        &self.switch
    }

    fn build(config: &ModelConfig, params: &Weights) -> Result<Self> {
        let embed_tokens = params.get("model.embed_tokens.weight")?;
        let device = embed_tokens.device().clone();
        let layers = (0..config.num_hidden_layers)
            .map(|layer| Block::load(params, layer, config))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if config.tie_word_embeddings { Some(embed_tokens.clone()) } else { params.optional("lm_head.weight") };
        let lm_head = lm_head.map(|w| LinearWeight::of(params, &w)).transpose()?;
        let score = params.score().map(|w| LinearWeight::of(params, &w)).transpose()?;
        Ok(Decoder {
            config: config.clone(),
            layers,
            norm: Norm::load(params, "model.norm.weight", config)?,
            lm_head,
            score,
            rope: Rope::new(config, &device)?,
            embed_tokens,
            switch: params.switch.clone(),
            checkpointing: false,
            frozen_base: params.mode == Mode::Frozen,
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
        if self.config.arch.scale_embeddings {
            x = (x * (hidden as f64).sqrt())?;
        }
        let (cos, sin) = self.rope.at(past, t, options.position_ids)?;
        // One mask per distinct window (full attention is the window `None`).
        let mut masks = BTreeMap::new();
        for layer in &self.layers {
            if let std::collections::btree_map::Entry::Vacant(slot) = masks.entry(layer.window) {
                slot.insert(attention_mask(b, t, past, &options, layer.window, self.device())?);
            }
        }
        // Checkpointing needs a graph to cut (training) and a CPU device (see `recompute`). A
        // frozen base's embeddings have no graph, so a checkpointed first layer would never
        // see its backward (nor hand on its adapter's gradients): they are anchored to a zero
        // that has one. Layers without a graph at all (no adapter gradients) run as they are.
        let checkpoint = self.checkpointing && cache.is_none() && x.device().is_cpu();
        if checkpoint && !x.track_op() && self.frozen_base && self.switch.grad.load(Ordering::Relaxed) {
            x = x.broadcast_add(Var::zeros(1, x.dtype(), x.device())?.as_tensor())?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let mask = masks[&layer.window].as_ref();
            x = if checkpoint && x.track_op() {
                layer.checkpointed(&x, &cos, &sin, mask)?
            } else {
                let layer_cache = cache.as_mut().map(|c| (&mut c.layers[i], c.capacity_hint));
                layer.forward(&x, &cos, &sin, mask, layer_cache)?
            };
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        self.norm.forward(&x)
    }

    /// Next-token logits `[B, T, vocab]` from hidden states (soft-capped where the family caps).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = project(hidden, self.lm_head()?, self.frozen_base)?;
        match self.config.arch.final_logit_softcapping {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    fn lm_head(&self) -> Result<&LinearWeight> {
        self.lm_head.as_ref().ok_or_else(|| candle_core::Error::Msg("this model has no language-model head".into()))
    }

    /// The LM head's cross-entropy `[N]` (in the graph) against `targets` for rows `hidden`
    /// `[N, H]`, and each row's argmax (empty unless `argmax`). A large head runs over chunks
    /// of rows ([`fused::linear_cross_entropy`]; for an inference decoder, which has no graph
    /// to keep, one chunk's logits after another) so the `[N, V]` logits are never held at once.
    pub fn lm_cross_entropy(&self, hidden: &Tensor, targets: &[u32], argmax: bool) -> Result<(Tensor, Vec<u32>)> {
        let n = targets.len();
        let head = self.lm_head()?;
        let vocab = head.out_features()?;
        let chunk_rows = (CHUNKED_HEAD_ELEMENTS / vocab).max(1);
        match head {
            LinearWeight::Transposed(weight_t) if n * vocab >= CHUNKED_HEAD_ELEMENTS && fused::supported(hidden) && fused::supported(weight_t) => {
                let softcap = self.config.arch.final_logit_softcapping.map(|c| c as f32);
                fused::linear_cross_entropy(hidden, weight_t, targets.to_vec(), softcap, !self.frozen_base)
            }
            LinearWeight::Panels(_) if n > chunk_rows => self.cross_entropy_in_chunks(hidden, targets, argmax, chunk_rows),
            _ => self.unchunked_cross_entropy(hidden, targets, argmax),
        }
    }

    /// Without a graph: one chunk of `chunk_rows` rows' logits at a time.
    fn cross_entropy_in_chunks(&self, hidden: &Tensor, targets: &[u32], argmax: bool, chunk_rows: usize) -> Result<(Tensor, Vec<u32>)> {
        let (mut losses, mut predicted) = (Vec::new(), Vec::new());
        for (i, chunk) in targets.chunks(chunk_rows).enumerate() {
            let (loss, argmaxes) = self.unchunked_cross_entropy(&hidden.narrow(0, i * chunk_rows, chunk.len())?, chunk, argmax)?;
            losses.push(loss);
            predicted.extend(argmaxes);
        }
        Ok((Tensor::cat(&losses, 0)?, predicted))
    }

    fn unchunked_cross_entropy(&self, hidden: &Tensor, targets: &[u32], argmax: bool) -> Result<(Tensor, Vec<u32>)> {
        let logits = self.lm_logits(&hidden.unsqueeze(0)?)?.squeeze(0)?;
        let losses = super::ops::cross_entropy_rows(&logits, &Tensor::from_slice(targets, targets.len(), hidden.device())?)?;
        let predicted = if argmax { logits.detach().argmax(D::Minus1)?.to_vec1()? } else { Vec::new() };
        Ok((losses, predicted))
    }

    /// Classification scores `[B, T, num_labels]` from hidden states (`score` head).
    pub fn class_scores(&self, hidden: &Tensor) -> Result<Tensor> {
        let weight = self
            .score
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("this model has no `score` head".into()))?;
        project(hidden, weight, false)
    }

    /// Hidden states and logits of every position.
    pub fn forward_logits(&self, input_ids: &Tensor, options: ForwardOptions, cache: Option<&mut KvCache>) -> Result<(Tensor, Tensor)> {
        let hidden = self.forward(input_ids, options, cache)?;
        let logits = self.lm_logits(&hidden)?;
        Ok((hidden, logits))
    }
}

fn project(hidden: &Tensor, weight: &LinearWeight, frozen: bool) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    weight.product(&hidden.reshape((b * t, h))?, frozen)?.reshape((b, t, weight.out_features()?))
}

/// Rows × vocabulary from which the LM head's loss runs chunked: 128 MB of f32 logits (the
/// bench-tiny step's 8M stay whole).
pub const CHUNKED_HEAD_ELEMENTS: usize = 32 << 20;

/// The additive mask `[1 or B, T, T_cached + T]`: causal, within the sliding window if any,
/// minus padding, minus other samples of a packed row. `None` when every new token may see
/// everything cached.
fn attention_mask(b: usize, t: usize, past: usize, options: &ForwardOptions, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
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
    let window_cuts = window.is_some_and(|w| keys > w);
    if !per_row && !window_cuts && t == 1 {
        return Ok(None);
    }
    let rows = if per_row { b } else { 1 };
    let mut values = vec![0f32; rows * t * keys];
    for r in 0..rows {
        for i in 0..t {
            let query = past + i;
            for j in 0..keys {
                // transformers' sliding window: a query sees keys j with j > query - window.
                let visible = j <= query && window.is_none_or(|w| j + w > query);
                let not_padding = padding.as_ref().is_none_or(|p| p[r][j] != 0);
                let same_sample = segments.as_ref().is_none_or(|s| s[r][i] == s[r][j]);
                if !(visible && not_padding && same_sample) {
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
#[cfg(test)]
mod family_tests;
