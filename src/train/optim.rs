//! AdamW as PyTorch computes it, with moments kept by parameter name so they can be saved and
//! restored exactly, and gradient clipping by global norm.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, failed};
use crate::model::Params;

/// Gradients by parameter name.
pub type Grads = BTreeMap<String, Tensor>;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, applied to tensors with two or more dimensions only.
    pub weight_decay: f64,
}

/// First and second moments of one parameter.
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdamW {
    config: AdamWConfig,
    /// Updates taken so far (bias correction uses it).
    steps: u64,
    moments: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, steps: 0, moments: BTreeMap::new() }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.steps as i32)).sqrt();
        for (name, var) in params.iter() {
            let Some(grad) = grads.get(name) else { continue };
            let param = var.as_tensor();
            let decay = if param.rank() >= 2 { c.weight_decay } else { 0.0 };
            let moments = match self.moments.remove(name) {
                Some(m) => m,
                None => Moments { exp_avg: param.zeros_like()?, exp_avg_sq: param.zeros_like()? },
            };
            let update = Update { lr, decay, step_size: lr / bias1, bias2_sqrt, config: c };
            let moments = if param.device().is_cpu() && param.dtype() == DType::F32 && param.is_contiguous() {
                update.in_place(param, grad, &moments)?;
                moments
            } else {
                let (new_param, moments) = update.with_tensor_ops(param, grad, moments)?;
                var.set(&new_param)?;
                moments
            };
            self.moments.insert(name.to_string(), moments);
        }
        Ok(())
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.moments
            .iter()
            .flat_map(|(name, m)| {
                [(format!("{name}.exp_avg"), m.exp_avg.clone()), (format!("{name}.exp_avg_sq"), m.exp_avg_sq.clone())]
            })
            .collect()
    }

    /// Restore what [`Self::state_tensors`] saved, after `steps` updates.
    pub fn load_state(&mut self, mut tensors: BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        self.moments.clear();
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".exp_avg").map(str::to_string))
            .collect();
        for name in names {
            let exp_avg = tensors.remove(&format!("{name}.exp_avg")).expect("listed above");
            let exp_avg_sq = tensors
                .remove(&format!("{name}.exp_avg_sq"))
                .ok_or_else(|| failed(format!("optimizer state has no exp_avg_sq for `{name}`")))?;
            self.moments.insert(name, Moments { exp_avg, exp_avg_sq });
        }
        self.steps = steps;
        Ok(())
    }
}

/// The per-parameter arithmetic of one step, in `torch.optim.AdamW`'s order.
struct Update {
    lr: f64,
    decay: f64,
    step_size: f64,
    bias2_sqrt: f64,
    config: AdamWConfig,
}

impl Update {
    /// The step in place over the storages: no copy of a parameter, its gradient or its moments,
    /// so the optimizer needs no memory beyond what it holds.
    fn in_place(&self, param: &Tensor, grad: &Tensor, m: &Moments) -> Result<()> {
        let grad = grad.contiguous()?;
        let (b1, b2) = (self.config.beta1 as f32, self.config.beta2 as f32);
        let keep = (1.0 - self.lr * self.decay) as f32;
        let (step_size, bias2_sqrt, eps) = (self.step_size as f32, self.bias2_sqrt as f32, self.config.eps as f32);
        m.exp_avg.inplace_op2(&grad, &InPlace(#[inline(always)] move |avg: &mut f32, [g]: [f32; 1]| *avg += (g - *avg) * (1.0 - b1)))?;
        m.exp_avg_sq
            .inplace_op2(&grad, &InPlace(#[inline(always)] move |sq: &mut f32, [g]: [f32; 1]| *sq = *sq * b2 + (1.0 - b2) * g * g))?;
        param.inplace_op3(
            &m.exp_avg,
            &m.exp_avg_sq,
            &InPlace(#[inline(always)] move |p: &mut f32, [avg, sq]: [f32; 2]| {
                let denom = sq.sqrt() / bias2_sqrt + eps;
                *p *= keep;
                *p -= step_size * avg / denom;
            }),
        )?;
        Ok(())
    }

    fn with_tensor_ops(&self, param: &Tensor, grad: &Tensor, m: Moments) -> Result<(Tensor, Moments)> {
        let c = self.config;
        let decayed = (param * (1.0 - self.lr * self.decay))?;
        let exp_avg = (&m.exp_avg + ((grad - &m.exp_avg)? * (1.0 - c.beta1))?)?;
        let exp_avg_sq = ((&m.exp_avg_sq * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
        let denom = ((exp_avg_sq.sqrt()? / self.bias2_sqrt)? + c.eps)?;
        let new_param = (decayed - ((&exp_avg / denom)? * self.step_size)?)?;
        Ok((new_param, Moments { exp_avg, exp_avg_sq }))
    }
}

/// An element-wise update of a contiguous f32 CPU tensor from N others of its shape, in place
/// and over both cores (the optimizer is bound by memory bandwidth).
struct InPlace<F>(F);

const IN_PLACE_CHUNK: usize = 1 << 16;

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// Runs `f` on each element of `dst` with the matching elements of `sources`.
fn update_each<const N: usize>(
    dst: &mut CpuStorage,
    dst_layout: &Layout,
    sources: [(&CpuStorage, &Layout); N],
    f: &(impl Fn(&mut f32, [f32; N]) + Sync),
) -> candle_core::Result<()> {
    let (CpuStorage::F32(values), Some((start, end))) = (dst, dst_layout.contiguous_offsets()) else {
        candle_core::bail!("adamw: expected a contiguous f32 parameter")
    };
    let dst = &mut values[start..end];
    let mut slices = [&[][..]; N];
    for (slice, (storage, layout)) in slices.iter_mut().zip(sources) {
        *slice = contiguous_f32(storage, layout)?;
        if slice.len() != dst.len() {
            candle_core::bail!("adamw: a state tensor has {} elements, its parameter {}", slice.len(), dst.len())
        }
    }
    dst.par_chunks_mut(IN_PLACE_CHUNK).enumerate().for_each(|(chunk, values)| {
        let offset = chunk * IN_PLACE_CHUNK;
        let sources: [&[f32]; N] = std::array::from_fn(|s| &slices[s][offset..offset + values.len()]);
        crate::model::simd::widest!({
            // A copy local to the compiled copy: the slices need not be reloaded after every store.
            let local: [&[f32]; N] = sources;
            for (i, value) in values.iter_mut().enumerate() {
                // SAFETY: every source was cut to `values.len()` elements just above; without
                // the bounds checks the loop vectorises.
                f(value, std::array::from_fn(|s| unsafe { *local[s].get_unchecked(i) }));
            }
        })
    });
    Ok(())
}

impl<F: Fn(&mut f32, [f32; 1]) + Sync> InplaceOp2 for InPlace<F> {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_layout: &Layout, s: &CpuStorage, l: &Layout) -> candle_core::Result<()> {
        update_each(dst, dst_layout, [(s, l)], &self.0)
    }
}

impl<F: Fn(&mut f32, [f32; 2]) + Sync> InplaceOp3 for InPlace<F> {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_layout: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<()> {
        update_each(dst, dst_layout, [(s2, l2), (s3, l3)], &self.0)
    }
}

/// Scale gradients so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: Option<f64>) -> Result<f64> {
    let mut squared = 0f64;
    for grad in grads.values() {
        squared += grad.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = squared.sqrt();
    if let Some(max_norm) = max_norm {
        let coefficient = (max_norm / (norm + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            for grad in grads.values_mut() {
                *grad = (&*grad * coefficient)?;
            }
        }
    }
    Ok(norm)
}
