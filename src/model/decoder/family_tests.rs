//! Every family against transformers: `testdata/families/F` was written by transformers 5.24 /
//! torch 2.15 (scripts/make_family_fixtures.py); every expectation below comes from there.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::*;
use super::tests::{cached_logits, greedy, ids, max_abs_diff, row};
use crate::model::config::Head;
use crate::model::folder::{self, ModelFiles, ModelFolder};

fn family_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/families").join(family)
}

fn expected(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(family_dir(family).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn open(family: &str, kind: &str) -> ModelFolder {
    ModelFolder::open(family_dir(family).join(kind).to_str().unwrap()).unwrap()
}

fn causal_lm(family: &str) -> Decoder {
    open(family, "causal-lm").load_model(&Device::Cpu).unwrap().0
}

fn logits_match(family: &str) {
    let model = causal_lm(family);
    let tensors = expected(family);
    for probe in 0..2 {
        let input = ids(&tensors[&format!("input_ids.{probe}")]);
        let (_, logits) = model.forward_logits(&row(&input), ForwardOptions::default(), None).unwrap();
        let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &tensors[&format!("logits.{probe}")]);
        assert!(diff <= 1e-4, "{family} probe {probe}: max |Δ| = {diff}");
    }
}

/// Greedy decoding through the KV cache gives transformers' cache-free greedy tokens.
fn greedy_matches(family: &str) {
    let model = causal_lm(family);
    let tensors = expected(family);
    for probe in 0..2 {
        let prompt = ids(&tensors[&format!("input_ids.{probe}")]);
        let (tokens, logprob) = greedy(&model, &prompt, 16);
        assert_eq!(tokens, ids(&tensors[&format!("greedy.{probe}")]), "{family} probe {probe}");
        let want: f32 = tensors[&format!("greedy_logprob.{probe}")].i(0).unwrap().to_scalar().unwrap();
        assert!((logprob - want).abs() < 1e-3, "{family} probe {probe}: logprob {logprob} vs {want}");
    }
}

/// Prefill then one token at a time: the logits of a single forward over the whole sequence,
/// across every sliding window. Phi-3's LongRoPE switches every position to its long factors
/// once a sequence passes 32 tokens, so a cache filled before the switch holds keys rotated
/// the short way (in transformers too): its probe stays below the switch.
fn kv_cache_matches_full_forward(family: &str) {
    let model = causal_lm(family);
    let probe = if family == "phi3" { "input_ids.1" } else { "input_ids.0" };
    let input = ids(&expected(family)[probe]);
    let (_, full) = model.forward_logits(&row(&input), ForwardOptions::default(), None).unwrap();
    let (incremental, _) = cached_logits(&model, &input, 5);
    let scale = full.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
    let diff = max_abs_diff(&incremental, &full);
    assert!(diff <= 1e-5 * scale, "{family}: cached decoding differs by {diff} (logits up to {scale})");
}

/// The bf16 classifier folder scores right-padded rows at their last real token.
fn classifier_scores_match(family: &str) {
    let folder = open(family, "seq-cls");
    assert_eq!(folder.config.head, Head::SequenceClassification { num_labels: 2 });
    let (model, _) = folder.load_model(&Device::Cpu).unwrap();
    let tensors = expected(family);
    let input = tensors["cls_input_ids"].to_dtype(DType::U32).unwrap();
    let mask = tensors["cls_attention_mask"].to_dtype(DType::U32).unwrap();
    let options = ForwardOptions { attention_mask: Some(&mask), position_ids: None, segment_ids: None };
    let scores = model.class_scores(&model.forward(&input, options, None).unwrap()).unwrap();
    let lengths: Vec<u32> = mask.sum(1).unwrap().to_vec1().unwrap();
    for (b, length) in lengths.iter().enumerate() {
        let ours = scores.i((b, *length as usize - 1)).unwrap();
        let diff = max_abs_diff(&ours, &tensors["cls_scores"].i(b).unwrap());
        assert!(diff <= 1e-4, "{family} row {b}: scores differ by {diff}");
    }
}

/// Saved by lathe, the folder keeps its family: the same config keys and values, the same
/// tensor names, and reloads to the same logits.
fn saved_folder_keeps_the_family(family: &str) {
    let original = open(family, "causal-lm");
    let params = original.load_params(&Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_json = std::fs::read_to_string(original.tokenizer_path()).unwrap();
    let files = ModelFiles {
        config: &original.config,
        params: &params,
        tokenizer_json: &tokenizer_json,
        tokenizer_config: &original.tokenizer_config,
        chat_template: original.chat_template.as_deref(),
        generation_config: original.generation_config.as_ref(),
    };
    folder::save(dir.path(), &files).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(family_dir(family).join("causal-lm/config.json")).unwrap()).unwrap();
    for (key, value) in theirs.as_object().unwrap() {
        if ["dtype", "rope_parameters", "transformers_version"].contains(&key.as_str()) {
            continue;
        }
        assert_eq!(&written[key], value, "{family}: config key `{key}` changed");
    }
    let reloaded = ModelFolder::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(reloaded.config, ModelConfig { raw: reloaded.config.raw.clone(), ..original.config.clone() });
    let names = |p: &Params| p.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&reloaded.load_params(&Device::Cpu).unwrap()), names(&params), "{family}: tensor names");
    let input = ids(&expected(family)["input_ids.1"]);
    let logits = |m: &Decoder| m.forward_logits(&row(&input), ForwardOptions::default(), None).unwrap().1;
    let diff = max_abs_diff(&logits(&reloaded.load_model(&Device::Cpu).unwrap().0), &logits(&causal_lm(family)));
    assert_eq!(diff, 0.0, "{family}: reloaded logits differ");
}

macro_rules! family_parity {
    ($($family:ident),*) => {$(
        mod $family {
            #[test]
            fn logits_match_transformers() {
                super::logits_match(stringify!($family));
            }
            #[test]
            fn greedy_continuations_match_transformers() {
                super::greedy_matches(stringify!($family));
            }
            #[test]
            fn kv_cache_gives_the_full_forward_logits() {
                super::kv_cache_matches_full_forward(stringify!($family));
            }
            #[test]
            fn classifier_scores_match_transformers() {
                super::classifier_scores_match(stringify!($family));
            }
            #[test]
            fn saved_folder_keeps_the_family() {
                super::saved_folder_keeps_the_family(stringify!($family));
            }
        }
    )*};
}

family_parity!(qwen2, qwen3, mistral, gemma, gemma2, phi3);

/// transformers 4.x wrote the same models without `rope_parameters` or `layer_types`: the
/// rope, the windows and the logits come out the same.
#[test]
fn transformers_4_layout_reads_the_same() {
    for family in ["qwen2", "qwen3", "gemma2", "phi3"] {
        let path = family_dir(family).join("causal-lm/config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let config = ModelConfig::from_json(&v, &path).unwrap();
        let map = v.as_object_mut().unwrap();
        let mut rope = map.remove("rope_parameters").unwrap();
        let rope_map = rope.as_object_mut().unwrap();
        map.insert("rope_theta".into(), rope_map.remove("rope_theta").unwrap());
        if let Some(factor) = rope_map.remove("partial_rotary_factor") {
            map.insert("partial_rotary_factor".into(), factor);
        }
        let kind = rope_map.remove("rope_type").unwrap();
        if kind != "default" {
            rope_map.insert("type".into(), kind);
            map.insert("rope_scaling".into(), rope);
        }
        map.remove("layer_types");
        map.remove("dtype");
        map.insert("torch_dtype".into(), serde_json::json!("float32"));
        let old = ModelConfig::from_json(&v, &path).unwrap();
        assert_eq!(ModelConfig { raw: config.raw.clone(), ..old }, config, "{family}");
    }
}

/// Gradient checkpointing recomputes each layer in the backward pass: the loss and every
/// parameter's gradient are the same as without it.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for family in ["qwen2", "gemma2", "phi3"] {
        let folder = open(family, "causal-lm");
        let params = folder.load_params(&Device::Cpu).unwrap();
        let input = row(&ids(&expected(family)["input_ids.0"]));
        let run = |checkpointing: bool| {
            let mut model = Decoder::new(&folder.config, &params).unwrap();
            model.set_gradient_checkpointing(checkpointing);
            let (_, logits) = model.forward_logits(&input, ForwardOptions::default(), None).unwrap();
            let loss = token_logprobs(&logits, &input).unwrap().sum_all().unwrap().neg().unwrap();
            let grads = crate::model::recompute::backward(&loss).unwrap();
            let all: Vec<(String, Tensor)> =
                params.iter().map(|(name, var)| (name.to_string(), grads.get(var.as_tensor()).expect(name).clone())).collect();
            (loss.to_scalar::<f32>().unwrap(), all)
        };
        let (plain_loss, plain) = run(false);
        let (checkpointed_loss, checkpointed) = run(true);
        assert_eq!(plain_loss, checkpointed_loss, "{family}");
        for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-6, "{family}: {name} gradient differs by {diff}");
        }
    }
}
