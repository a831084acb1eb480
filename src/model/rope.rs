//! Rotary position embedding tables for every `rope_type` lathe reads, computed as transformers
//! computes them (`modeling_rope_utils.py`): f32 inverse frequencies, `cos`/`sin` of
//! `position · inv_freq` with the halves duplicated, times the type's attention factor.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{ModelConfig, RopeScaling};

/// `cos`, `sin`: `[max_positions, rotary_dim]`.
struct Tables {
    cos: Tensor,
    sin: Tensor,
}

impl Tables {
    fn new(inv_freq: &[f32], attention_factor: f32, positions: usize, device: &Device) -> Result<Self> {
        let dim = inv_freq.len() * 2;
        let mut angles = Vec::with_capacity(positions * dim);
        for p in 0..positions {
            let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (positions, dim), device)?;
        let scaled = |t: Tensor| if attention_factor == 1.0 { Ok(t) } else { t * attention_factor as f64 };
        Ok(Tables { cos: scaled(angles.cos()?)?, sin: scaled(angles.sin()?)? })
    }
}

pub struct Rope {
    tables: Tables,
    /// LongRoPE's tables for sequences longer than `threshold` positions.
    long: Option<(Tables, usize)>,
}

impl Rope {
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let dim = config.rotary_dim;
        let theta = config.rope_theta as f32;
        // base^(2i/dim) in f32, as `base ** (torch.arange(0, dim, 2).float() / dim)`.
        let powers: Vec<f32> = (0..dim / 2).map(|i| theta.powf((2 * i) as f32 / dim as f32)).collect();
        let positions = config.max_position_embeddings;
        let build = |inv_freq: Vec<f32>, factor: f64| Tables::new(&inv_freq, factor as f32, positions, device);
        match &config.rope_scaling {
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, factor, attention_factor } => {
                let original = *original_max_position_embeddings;
                let attention = attention_factor.unwrap_or_else(|| {
                    let factor = factor.unwrap_or(config.max_position_embeddings as f64 / original);
                    if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / original.ln()).sqrt() }
                });
                let scaled = |factors: &[f64]| -> Result<Vec<f32>> {
                    if factors.len() != powers.len() {
                        candle_core::bail!("longrope factors: {} values for {} rotary frequencies", factors.len(), powers.len())
                    }
                    Ok(powers.iter().zip(factors).map(|(p, f)| 1.0 / (*f as f32 * p)).collect())
                };
                Ok(Rope {
                    tables: build(scaled(short_factor)?, attention)?,
                    long: Some((build(scaled(long_factor)?, attention)?, original as usize)),
                })
            }
            RopeScaling::Yarn { .. } => {
                let (inv_freq, attention) = yarn(&config.rope_scaling, &powers, dim, config);
                Ok(Rope { tables: build(inv_freq, attention)?, long: None })
            }
            scaling => {
                let inv_freq = powers.iter().map(|p| scale_frequency(1.0 / p, scaling)).collect();
                Ok(Rope { tables: build(inv_freq, 1.0)?, long: None })
            }
        }
    }

    /// Tables for `t` tokens after `past` cached ones, or at explicit `[B, T]` positions:
    /// `[1 or B, T, rotary_dim]`.
    pub fn at(&self, past: usize, t: usize, positions: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let max = self.tables.cos.dim(0)?;
        match positions {
            None => {
                if past + t > max {
                    candle_core::bail!("sequence of {} tokens is longer than max_position_embeddings {max}", past + t)
                }
                let tables = self.tables_for(past + t);
                let take = |table: &Tensor| table.narrow(0, past, t)?.unsqueeze(0);
                Ok((take(&tables.cos)?, take(&tables.sin)?))
            }
            Some(positions) => {
                let (b, t) = positions.dims2()?;
                let flat = positions.flatten_all()?.to_dtype(DType::U32)?;
                let highest = flat.max(0)?.to_scalar::<u32>()? as usize;
                if highest >= max {
                    candle_core::bail!("position {highest} is beyond max_position_embeddings {max}")
                }
                let tables = self.tables_for(highest + 1);
                let take = |table: &Tensor| table.index_select(&flat, 0)?.reshape((b, t, table.dim(1)?));
                Ok((take(&tables.cos)?, take(&tables.sin)?))
            }
        }
    }

    /// LongRoPE switches every position to the long factors once the sequence is longer than
    /// the pretraining length, as transformers does per forward.
    fn tables_for(&self, sequence: usize) -> &Tables {
        match &self.long {
            Some((long, threshold)) if sequence > *threshold => long,
            _ => &self.tables,
        }
    }
}

fn scale_frequency(inv_freq: f32, scaling: &RopeScaling) -> f32 {
    match *scaling {
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
        _ => inv_freq,
    }
}

/// YaRN's inverse frequencies and attention factor (`_compute_yarn_parameters`).
fn yarn(scaling: &RopeScaling, powers: &[f32], dim: usize, config: &ModelConfig) -> (Vec<f32>, f64) {
    let RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        attention_factor,
        beta_fast,
        beta_slow,
        mscale,
        mscale_all_dim,
        truncate,
    } = *scaling
    else {
        unreachable!("yarn() is called for yarn scaling only")
    };
    let factor = factor.unwrap_or(config.max_position_embeddings as f64 / original);
    let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => get_mscale(factor, m) / get_mscale(factor, all),
        _ => get_mscale(factor, 1.0),
    });
    let (fast, slow) = (beta_fast.unwrap_or(32.0), beta_slow.unwrap_or(1.0));
    let base = config.rope_theta;
    let correction_dim =
        |rotations: f64| (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(fast), correction_dim(slow));
    if truncate.unwrap_or(true) {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0) as f32, high.min(dim as f64 - 1.0) as f32);
    if low == high {
        high += 0.001;
    }
    let inv_freq = powers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let (extrapolated, interpolated) = (1.0 / p, 1.0 / (factor as f32 * p));
            interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
        })
        .collect();
    (inv_freq, attention)
}
