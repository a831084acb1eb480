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

    /// One update of every parameter that has a gradient times `grad_scale` (gradient
    /// clipping's [`clip_coefficient`]), at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &Grads, grad_scale: f64, lr: f64) -> Result<()> {
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
            let update = Update { lr, decay, step_size: lr / bias1, bias2_sqrt, grad_scale, config: c };
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
    grad_scale: f64,
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
        // The clipped gradient, as `g · coefficient` in f32 (what scaling the tensor gave).
        let scale = self.grad_scale as f32;
        m.exp_avg.inplace_op2(&grad, &InPlace(#[inline(always)] move |avg: &mut f32, [g]: [f32; 1]| *avg += (g * scale - *avg) * (1.0 - b1)))?;
        m.exp_avg_sq.inplace_op2(
            &grad,
            &InPlace(#[inline(always)] move |sq: &mut f32, [g]: [f32; 1]| {
                let g = g * scale;
                *sq = *sq * b2 + (1.0 - b2) * g * g
            }),
        )?;
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
        let grad = &if self.grad_scale < 1.0 { (grad * self.grad_scale)? } else { grad.clone() };
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

/// The global L2 norm of the gradients, as `torch.nn.utils.clip_grad_norm_` measures it.
pub fn grad_norm(grads: &Grads) -> Result<f64> {
    let mut squared = 0f64;
    for grad in grads.values() {
        squared += match sum_of_squares(grad)? {
            Some(sum) => sum,
            None => grad.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        };
    }
    Ok(squared.sqrt())
}

/// The factor that brings a gradient norm down to `max_norm` (1 below it, or with no limit).
/// [`AdamW::step`] applies it as it reads the gradients: no scaled copy of them is made.
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> f64 {
    max_norm.map_or(1.0, |max| (max / (norm + 1e-6)).min(1.0))
}

/// Σ g² of a CPU f32 tensor over both cores, without a squared copy; `None` elsewhere. Chunks'
/// sums are added in order, so the result does not depend on the thread count.
fn sum_of_squares(t: &Tensor) -> Result<Option<f64>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    let chunks: Vec<f64> = contiguous_f32(cpu, layout)?
        .par_chunks(IN_PLACE_CHUNK)
        .map(|chunk| crate::model::simd::widest!({ crate::model::simd::dot(chunk, chunk) }) as f64)
        .collect();
    Ok(Some(chunks.iter().sum()))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn grad_norm_is_the_f64_norm_and_clipping_scales_the_update() {
        // One gradient over several chunks, one strided (a transposed view).
        let big = values(3 * IN_PLACE_CHUNK + 17, 1);
        let small = Tensor::from_vec(values(12, 2), (3, 4), &Device::Cpu).unwrap().t().unwrap();
        let exact: f64 = big.iter().chain(&small.t().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        let grads: Grads = [("a".to_string(), Tensor::from_vec(big.clone(), big.len(), &Device::Cpu).unwrap()), ("b".to_string(), small)].into();
        let norm = grad_norm(&grads).unwrap();
        assert!((norm - exact).abs() / exact < 1e-6, "{norm} vs {exact}");
        assert_eq!(clip_coefficient(norm, None), 1.0);
        assert_eq!(clip_coefficient(norm, Some(norm * 2.0)), 1.0);
        let coefficient = clip_coefficient(norm, Some(1.0));
        assert!((coefficient - 1.0 / (norm + 1e-6)).abs() < 1e-12);

        // A step with the coefficient is the step on the gradients scaled as f32 tensors.
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let start = Tensor::from_vec(values(64, 3), (8, 8), &Device::Cpu).unwrap();
        let grad = Tensor::from_vec(values(64, 4), (8, 8), &Device::Cpu).unwrap();
        let run = |grads: Grads, scale: f64| -> Vec<f32> {
            let mut params = Params::default();
            params.insert("w", start.copy().unwrap()).unwrap();
            let mut optimizer = AdamW::new(config);
            optimizer.step(&params, &grads, scale, 1e-2).unwrap();
            optimizer.step(&params, &grads, scale, 1e-2).unwrap();
            params.iter().next().unwrap().1.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
        };
        let scaled = run([("w".to_string(), (&grad * 0.25).unwrap())].into(), 1.0);
        assert_eq!(run([("w".to_string(), grad.clone())].into(), 0.25), scaled);
    }
}
