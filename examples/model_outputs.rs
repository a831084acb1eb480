//! Print what a lathe-loaded model computes for given token ids, as JSON, so
//! `scripts/check_transformers.py` can compare it with transformers.
//!
//!   cargo run --release --example model_outputs -- MODEL ids.json
//!
//! `ids.json` is a list of token-id lists. A causal LM gives every position's logits per row
//! (rows run one at a time); a sequence classifier gives each row's scores, with all rows
//! right-padded into one batch.

use candle_core::{Device, Tensor};
use lathe::model::{ForwardOptions, Head, ModelFolder};
use serde_json::json;

fn main() -> lathe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, ids_path] = args.as_slice() else {
        eprintln!("usage: model_outputs MODEL ids.json");
        std::process::exit(2);
    };
    let rows: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(ids_path)?)?;
    let folder = ModelFolder::open(model)?;
    let (model, _) = folder.load_model(&Device::Cpu)?;
    let output = match folder.config.head {
        Head::CausalLm => {
            let mut logits = Vec::new();
            for row in &rows {
                let ids = Tensor::new(row.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let (_, row_logits) = model.forward_logits(&ids, ForwardOptions::default(), None)?;
                logits.push(row_logits.squeeze(0)?.to_vec2::<f32>()?);
            }
            json!({"kind": "causal", "logits": logits})
        }
        Head::SequenceClassification { .. } => {
            let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
            let pad = folder.config.pad_token_id.unwrap_or(0);
            let scores = lathe::reward::score_rows(&model, &refs, pad)?.to_vec2::<f32>()?;
            json!({"kind": "classifier", "scores": scores})
        }
    };
    println!("{output}");
    Ok(())
}
