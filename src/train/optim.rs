//! AdamW as PyTorch computes it, with moments kept by parameter name so they can be saved and
//! restored exactly, and gradient clipping by global norm.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
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
            let (new_param, moments) = if param.device().is_cpu() && param.dtype() == DType::F32 {
                update.on_cpu(param, grad, moments)?
            } else {
                update.with_tensor_ops(param, grad, moments)?
            };
            var.set(&new_param)?;
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
    fn on_cpu(&self, param: &Tensor, grad: &Tensor, m: Moments) -> Result<(Tensor, Moments)> {
        let p: Vec<f32> = param.flatten_all()?.to_vec1()?;
        let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let mut exp_avg: Vec<f32> = m.exp_avg.flatten_all()?.to_vec1()?;
        let mut exp_avg_sq: Vec<f32> = m.exp_avg_sq.flatten_all()?.to_vec1()?;
        let (b1, b2) = (self.config.beta1 as f32, self.config.beta2 as f32);
        let keep = (1.0 - self.lr * self.decay) as f32;
        let (step_size, bias2_sqrt, eps) = (self.step_size as f32, self.bias2_sqrt as f32, self.config.eps as f32);
        let mut out = p;
        for i in 0..out.len() {
            out[i] *= keep;
            exp_avg[i] += (g[i] - exp_avg[i]) * (1.0 - b1);
            exp_avg_sq[i] = exp_avg_sq[i] * b2 + (1.0 - b2) * g[i] * g[i];
            let denom = exp_avg_sq[i].sqrt() / bias2_sqrt + eps;
            out[i] -= step_size * exp_avg[i] / denom;
        }
        let shape = param.shape();
        let device = param.device();
        Ok((
            Tensor::from_vec(out, shape, device)?,
            Moments { exp_avg: Tensor::from_vec(exp_avg, shape, device)?, exp_avg_sq: Tensor::from_vec(exp_avg_sq, shape, device)? },
        ))
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
