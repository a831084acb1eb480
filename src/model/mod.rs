//! The model core: one decoder for every model family on differentiable candle ops with Hugging Face tensor
//! names, its config, weights, model folders and chat templates.

pub mod chat;
pub mod config;
pub mod folder;
pub mod lora;
pub mod fused;
pub mod decoder;
pub mod family;
pub mod fastexp;
pub mod ops;
pub mod recompute;
pub mod rope;
pub mod simd;
pub mod decode;
pub mod panels;
pub mod team;
pub mod weights;

pub use chat::ChatTemplate;
pub use config::{Head, ModelConfig};
pub use family::{Activation, Architecture, Family};
pub use folder::ModelFolder;
pub use decoder::{AdapterSwitch, Decoder, ForwardOptions, KvCache};
pub use weights::Params;

use candle_core::Device;

use crate::error::{Result, usage};

/// `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` cargo feature).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>().map_err(|_| usage(format!("--device {name}: expected cuda:N"))))
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(usage(format!("--device {name}: this build has no CUDA support (build with --features cuda)")));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => Err(usage(format!("--device {other}: expected cpu, cuda or cuda:N"))),
    }
}
