//! Sizes checked before they reach the allocator. A stage turns its flags into the memory they
//! imply — the model and its training state, one micro-batch's activations, a KV cache, the
//! rows it holds at once — as one [`Footprint`], and checks it once before any work starts (and
//! before any output or run folder exists). Estimates are lower bounds, so only settings that
//! cannot fit are refused; the message names the flags and the largest part.

use candle_core::Device;

use crate::error::{Result, usage};
use crate::model::ModelConfig;

const F32: u128 = 4;

/// `a × b × …` without overflow.
pub fn elements(dims: &[usize]) -> u128 {
    dims.iter().fold(1u128, |product, &d| product.saturating_mul(d as u128))
}

/// Parameters of a model of `config`, from the tensors it loads.
pub fn parameters(config: &ModelConfig) -> u128 {
    crate::model::weights::expected_shapes(config).iter().map(|(_, shape)| elements(shape)).fold(0, u128::saturating_add)
}

/// Named byte counts that must be in memory at once, for the settings that imply them.
#[derive(Debug)]
pub struct Footprint {
    settings: String,
    parts: Vec<(&'static str, u128)>,
}

impl Footprint {
    /// `settings` names the flags behind the sizes, e.g. `--batch-size 8, --seq-len 256`.
    pub fn new(settings: impl Into<String>) -> Self {
        Footprint { settings: settings.into(), parts: Vec::new() }
    }

    pub fn add(mut self, what: &'static str, bytes: u128) -> Self {
        self.parts.push((what, bytes));
        self
    }

    /// The weights (f32) and their rotary tables.
    pub fn model(self, config: &ModelConfig) -> Self {
        let rope = elements(&[config.max_position_embeddings, config.head_dim, 2]);
        self.add("the model", (parameters(config) + rope).saturating_mul(F32))
    }

    /// Training: weights, gradients and both AdamW moments of what trains, and the
    /// activations of one micro-batch of `sequences × length` tokens kept for the backward pass.
    pub fn training(self, config: &ModelConfig, sequences: usize, length: usize, tuning: &Tuning) -> Self {
        let state = tuning.trainable.unwrap_or_else(|| parameters(config)).saturating_mul(3 * F32);
        self.model(config)
            .add("gradients and optimizer state", state)
            .add("activations", activations(config, sequences, length, tuning.checkpointing))
    }

    /// Decoding `sequences` at once up to `length` tokens: the KV cache and one step's logits.
    pub fn decoding(self, config: &ModelConfig, sequences: usize, length: usize) -> Self {
        let kv = elements(&[sequences, length, config.num_hidden_layers, 2, config.num_key_value_heads, config.head_dim]);
        self.add("the KV cache", kv.saturating_mul(F32)).add("logits", elements(&[sequences, config.vocab_size]).saturating_mul(F32))
    }

    pub fn total(&self) -> u128 {
        self.parts.iter().map(|(_, b)| *b).fold(0, u128::saturating_add)
    }

    /// Refuse (exit 2) what cannot fit in the memory available to this process. Accelerator
    /// memory is the device's to refuse; there only sizes no allocation can hold are refused.
    pub fn check(&self, device: &Device) -> Result<()> {
        let total = self.total();
        let (available, place) = match device {
            Device::Cpu => (available_memory(), "of memory available"),
            _ => (isize::MAX as u128, "that one allocation can hold"),
        };
        if total <= available {
            return Ok(());
        }
        let largest = self.parts.iter().max_by_key(|(_, b)| *b).map(|(what, b)| format!("; {what}: {}", human(*b))).unwrap_or_default();
        Err(usage(format!("{}: needs at least {}{largest}, more than the {} {place}", self.settings, human(total), human(available))))
    }
}

/// What a trainer keeps beside the weights.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// Parameters with gradients and AdamW moments (`None`: all the model's; LoRA: the adapter's).
    pub trainable: Option<u128>,
    /// Layers recompute their activations in the backward pass, keeping only their inputs.
    pub checkpointing: bool,
}

impl Tuning {
    pub fn of(lora: Option<&crate::model::lora::LoraSettings>, config: &ModelConfig, checkpointing: bool) -> Result<Self> {
        let trainable = lora.map(|s| crate::model::lora::adapter_size(s, config)).transpose()?;
        Ok(Tuning { trainable: trainable.map(|n| n as u128), checkpointing })
    }
}

/// Floats a training step keeps per token: per layer the block's inputs, norms, q/k/v, the
/// attention output and the MLP's three projections, plus each head's attention row (with
/// checkpointing, each layer's input and one layer's worth); the logits and their gradient
/// on top.
fn activations(config: &ModelConfig, sequences: usize, length: usize, checkpointing: bool) -> u128 {
    let per_layer = 10 * config.hidden_size as u128 + 4 * config.intermediate_size as u128 + 2 * elements(&[config.num_attention_heads, length]);
    let layers = config.num_hidden_layers as u128;
    let kept = if checkpointing { per_layer.saturating_add(layers.saturating_mul(config.hidden_size as u128)) } else { per_layer.saturating_mul(layers) };
    let per_token = kept.saturating_add(3 * config.vocab_size as u128);
    elements(&[sequences, length]).saturating_mul(per_token).saturating_mul(F32)
}

/// Bytes this process may still allocate: the kernel's `MemAvailable`, or less when a
/// cgroup limit is nearer. Unknown (not Linux): no limit.
pub fn available_memory() -> u128 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u128>().ok().map(|kb| kb * 1024)
    });
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok().and_then(|v| v.trim().parse::<u128>().ok());
    let cgroup = read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    [meminfo, cgroup].into_iter().flatten().min().unwrap_or(u128::MAX)
}

/// `1.5 GB`, `12 MB`, `3.2e+09 GB`.
pub fn human(bytes: u128) -> String {
    let b = bytes as f64;
    match b {
        b if b >= 1e12 * 1e3 => format!("{:.1e} GB", b / 1e9),
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.0} MB", b / 1e6),
        b => format!("{:.0} kB", (b / 1e3).ceil()),
    }
}

/// Refuse `value` of `flag` above `most` (sizes a later type or format cannot hold).
pub fn at_most(flag: &str, value: usize, most: usize, why: &str) -> Result<()> {
    if value > most {
        return Err(usage(format!("{flag} {value}: at most {most} ({why})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::new(crate::model::Family::Llama, 300, 32, 64, 2, 4, 4, 128, true)
    }

    #[test]
    fn a_tiny_run_fits_and_absurd_sizes_are_refused_naming_the_flags() {
        Footprint::new("--batch-size 8").training(&tiny(), 8, 128, &Tuning::default()).check(&Device::Cpu).unwrap();
        let e = Footprint::new("--batch-size 1000000000000000000").training(&tiny(), 1_000_000_000_000_000_000, 128, &Tuning::default()).check(&Device::Cpu).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let line = e.one_line();
        assert!(line.starts_with("--batch-size 1000000000000000000: needs at least") && line.contains("activations:"), "{line}");
        let wide = ModelConfig::new(crate::model::Family::Llama, 300, 1_000_000_000, 64, 2, 4, 4, 128, true);
        let e = Footprint::new("--hidden-size 1000000000").training(&wide, 1, 16, &Tuning::default()).check(&Device::Cpu).unwrap_err();
        assert!(e.one_line().contains("gradients and optimizer state:"), "{}", e.one_line());
    }

    #[test]
    fn sizes_multiply_without_overflow() {
        assert_eq!(elements(&[usize::MAX, usize::MAX, usize::MAX]), u128::MAX);
        assert_eq!(elements(&[3, 4]), 12);
        // 32 × 32 embedding rows… counted from the tensors the model loads.
        let c = tiny();
        let per_layer = 2 * 32 + 4 * 32 * 32 + 3 * 32 * 64;
        assert_eq!(parameters(&c), (300 * 32 + 2 * per_layer + 32) as u128);
        assert!(human(3_200_000_000).starts_with("3.2 GB"));
    }
}
