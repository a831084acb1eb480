//! Adapters against PEFT: `testdata/peft` was written by PEFT 0.21 / transformers 5.24
//! (scripts/make_peft_fixtures.py); every expectation below comes from there.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::*;
use crate::model::{Decoder, ForwardOptions, ModelFolder};

fn peft(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/peft").join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(peft("expected.safetensors"), &Device::Cpu).unwrap()
}

fn open(name: &str) -> ModelFolder {
    ModelFolder::open(peft(name).to_str().unwrap()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn probe() -> Tensor {
    expected()["input_ids"].to_dtype(DType::U32).unwrap().unsqueeze(0).unwrap()
}

fn logits(model: &Decoder) -> Tensor {
    model.forward_logits(&probe(), ForwardOptions::default(), None).unwrap().1.squeeze(0).unwrap()
}

#[test]
fn a_peft_adapter_is_a_model_with_peft_logits() {
    let folder = open("causal-adapter");
    assert!(folder.base.is_some());
    let want = &expected()["logits"];
    // Merged for inference, as generate and score load it.
    let merged = folder.load_model(&Device::Cpu).unwrap().0;
    assert!(max_abs_diff(&logits(&merged), want) <= 1e-4);
    // Unmerged, as a trainer holds it: the same linear layers with the pair beside them.
    let adapter = folder.load_adapter(&Device::Cpu).unwrap().unwrap();
    let base = folder.load_base_params(&Device::Cpu).unwrap();
    let wrapped = Decoder::with_adapter(&folder.config, &base, &adapter).unwrap();
    assert!(max_abs_diff(&logits(&wrapped), want) <= 1e-4);
    // Switched off, it is the base model exactly.
    wrapped.adapter_switch().set_enabled(false);
    let plain = Decoder::new_inference(&folder.config, &base).unwrap();
    assert_eq!(max_abs_diff(&logits(&wrapped), &logits(&plain)), 0.0);
}

#[test]
fn merging_equals_peft_merge_and_unload() {
    let folder = open("causal-adapter");
    let merged = folder.load_params(&Device::Cpu).unwrap();
    let mut compared = 0;
    for (name, want) in expected().iter().filter(|(k, _)| k.starts_with("merged.")) {
        let ours = merged.get(name.trim_start_matches("merged.")).unwrap().as_tensor().clone();
        let diff = max_abs_diff(&ours, want);
        assert!(diff <= 1e-5, "{name}: {diff}");
        compared += 1;
    }
    assert_eq!(compared, 9, "layer 0's norms and projections");
}

#[test]
fn a_peft_classifier_adapter_scores_as_peft() {
    let folder = open("cls-adapter");
    assert_eq!(folder.config.head, crate::model::Head::SequenceClassification { num_labels: 1 });
    let adapter = folder.load_adapter(&Device::Cpu).unwrap().unwrap();
    assert!(adapter.settings.use_rslora);
    assert_eq!(adapter.modules.len(), 4, "q_proj and v_proj of two layers");
    let tensors = expected();
    let input = tensors["cls_input_ids"].to_dtype(DType::U32).unwrap();
    let mask = tensors["cls_attention_mask"].to_dtype(DType::U32).unwrap();
    let lengths: Vec<u32> = mask.sum(1).unwrap().to_vec1().unwrap();
    let base = folder.load_base_params(&Device::Cpu).unwrap();
    for model in [folder.load_model(&Device::Cpu).unwrap().0, Decoder::with_adapter(&folder.config, &base, &adapter).unwrap()] {
        let options = ForwardOptions { attention_mask: Some(&mask), position_ids: None, segment_ids: None };
        let scores = model.class_scores(&model.forward(&input, options, None).unwrap()).unwrap();
        for (b, length) in lengths.iter().enumerate() {
            let diff = max_abs_diff(&scores.i((b, *length as usize - 1)).unwrap(), &tensors["cls_scores"].i(b).unwrap());
            assert!(diff <= 1e-4, "row {b}: {diff}");
        }
    }
}

#[test]
fn a_saved_adapter_reads_back_the_same_in_peft_layout() {
    let folder = open("causal-adapter");
    let adapter = folder.load_adapter(&Device::Cpu).unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), &folder.config).unwrap();
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["task_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some("CAUSAL_LM"), Some(4)));
    let again = Adapter::load(dir.path(), &folder.config, &Device::Cpu).unwrap();
    let names = |a: &Adapter| a.params.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&again), names(&adapter));
    assert!(names(&again).contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string()));
    for (name, var) in adapter.params.iter() {
        assert_eq!(max_abs_diff(var.as_tensor(), again.params.get(name).unwrap().as_tensor()), 0.0);
    }
}

#[test]
fn a_new_adapter_starts_as_the_base_and_refuses_unknown_targets() {
    let base = ModelFolder::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny/causal-lm").to_str().unwrap()).unwrap();
    let settings = |targets: Targets| LoraSettings { r: 2, alpha: 4.0, dropout: 0.0, targets, use_rslora: false };
    let adapter = Adapter::new(settings(Targets::AllLinear), &base.config, "base", 1, &Device::Cpu).unwrap();
    assert_eq!(adapter.modules.len(), 14);
    let (a, b) = adapter.pair("model.layers.0.self_attn.q_proj").unwrap();
    let bound = 1.0 / 64f32.sqrt();
    let a_max: f32 = a.as_tensor().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(a_max <= bound && a_max > 0.5 * bound, "Kaiming-uniform A");
    assert_eq!(b.as_tensor().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "zero B");
    let e = Adapter::new(settings(Targets::Names(vec!["query".into()])), &base.config, "base", 1, &Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("--lora-target query: matches no module"), "{e}");
    assert_eq!(e.exit_code(), 2);
}
