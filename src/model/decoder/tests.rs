//! The model against transformers: `testdata/hf-tiny` was written by transformers 5.24 / torch
//! 2.15 (see its README); every expectation below comes from there, none is typed by hand.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use serde_json::Value;

use super::*;
use crate::model::folder::ModelFolder;
use crate::model::ops::log_softmax_last_dim;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny").join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn causal_lm() -> Decoder {
    let folder = ModelFolder::open(fixture("causal-lm").to_str().unwrap()).unwrap();
    folder.load_model(&Device::Cpu).unwrap().0
}

pub(super) fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub(super) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

pub(super) fn row(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

/// Greedy decoding through the KV cache: the new tokens and the sum of their log-probabilities.
pub(super) fn greedy(model: &Decoder, prompt: &[u32], steps: usize) -> (Vec<u32>, f32) {
    let mut cache = model.new_cache();
    let (_, logits) = model.forward_logits(&row(prompt), ForwardOptions::default(), Some(&mut cache)).unwrap();
    let mut last = logits.i((0, prompt.len() - 1)).unwrap();
    let (mut out, mut logprob) = (Vec::new(), 0f32);
    for _ in 0..steps {
        let logp = log_softmax_last_dim(&last).unwrap();
        let next = logp.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        logprob += logp.i(next as usize).unwrap().to_scalar::<f32>().unwrap();
        out.push(next);
        let (_, logits) = model.forward_logits(&row(&[next]), ForwardOptions::default(), Some(&mut cache)).unwrap();
        last = logits.i((0, 0)).unwrap();
    }
    (out, logprob)
}

#[test]
fn logits_match_transformers() {
    let model = causal_lm();
    let tensors = load("expected_logits.safetensors");
    for probe in 0..2 {
        let input = ids(&tensors[&format!("input_ids.{probe}")]);
        let (_, logits) = model.forward_logits(&row(&input), ForwardOptions::default(), None).unwrap();
        let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &tensors[&format!("logits.{probe}")]);
        assert!(diff <= 1e-4, "probe {probe}: max |Δ| = {diff}");
    }
}

/// An inference decoder (its weights packed in panels where the CPU has AVX-512 or AVX2) gives
/// transformers' logits, prefilled or decoded, and its loss in chunks equals the whole one.
#[test]
fn inference_decoder_matches_transformers_cached_and_in_chunks() {
    let folder = ModelFolder::open(fixture("causal-lm").to_str().unwrap()).unwrap();
    let model = Decoder::new_inference(&folder.config, &folder.load_params(&Device::Cpu).unwrap()).unwrap();
    let tensors = load("expected_logits.safetensors");
    for probe in 0..2 {
        let input = ids(&tensors[&format!("input_ids.{probe}")]);
        let (hidden, logits) = model.forward_logits(&row(&input), ForwardOptions::default(), None).unwrap();
        let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &tensors[&format!("logits.{probe}")]);
        assert!(diff <= 1e-4, "probe {probe}: max |Δ| = {diff}");
        let (incremental, _) = cached_logits(&model, &input, 3);
        assert!(max_abs_diff(&incremental, &logits) <= 1e-5, "probe {probe}: through the cache");

        let (hidden, targets) = (hidden.squeeze(0).unwrap().narrow(0, 0, input.len() - 1).unwrap(), &input[1..]);
        let (whole, whole_argmax) = model.unchunked_cross_entropy(&hidden, targets, true).unwrap();
        let (chunked, chunked_argmax) = model.cross_entropy_in_chunks(&hidden, targets, true, 3).unwrap();
        assert!(max_abs_diff(&whole, &chunked) <= 1e-6, "probe {probe}: chunked loss");
        assert_eq!(whole_argmax, chunked_argmax);
        assert_eq!(whole.dims1().unwrap(), targets.len());
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    let model = causal_lm();
    let tensors = load("expected_logits.safetensors");
    for probe in 0..2 {
        let input = ids(&tensors[&format!("input_ids.{probe}")]);
        let (tokens, logprob) = greedy(&model, &input, 16);
        assert_eq!(tokens, ids(&tensors[&format!("greedy.{probe}")]), "probe {probe}");
        let expected: f32 = tensors[&format!("greedy_logprob.{probe}")].i(0).unwrap().to_scalar().unwrap();
        assert!((logprob - expected).abs() < 1e-3, "probe {probe}: logprob {logprob} vs {expected}");
    }
}

/// The logits of `input` through the KV cache: its first `split` tokens in one forward, then
/// one token at a time; and the cache they filled.
pub(super) fn cached_logits(model: &Decoder, input: &[u32], split: usize) -> (Tensor, KvCache) {
    let mut cache = model.new_cache();
    let (_, first) = model.forward_logits(&row(&input[..split]), ForwardOptions::default(), Some(&mut cache)).unwrap();
    let mut pieces = vec![first];
    for &token in &input[split..] {
        pieces.push(model.forward_logits(&row(&[token]), ForwardOptions::default(), Some(&mut cache)).unwrap().1);
    }
    (Tensor::cat(&pieces, 1).unwrap(), cache)
}

#[test]
fn kv_cache_gives_the_full_forward_logits() {
    let model = causal_lm();
    let input = ids(&load("expected_logits.safetensors")["input_ids.0"]);
    let (_, full) = model.forward_logits(&row(&input), ForwardOptions::default(), None).unwrap();
    let (incremental, cache) = cached_logits(&model, &input, 20);
    assert_eq!(cache.len(), input.len());
    assert!(max_abs_diff(&incremental, &full) <= 1e-5);
}

#[test]
fn left_padded_batch_matches_single_rows() {
    let model = causal_lm();
    let tensors = load("expected_logits.safetensors");
    let (long, short) = (ids(&tensors["input_ids.0"]), ids(&tensors["input_ids.1"]));
    let pad = long.len() - short.len();
    let padded: Vec<u32> = std::iter::repeat_n(3, pad).chain(short.iter().copied()).collect();
    let input = Tensor::new(vec![long.clone(), padded].concat(), &Device::Cpu).unwrap().reshape((2, long.len())).unwrap();
    let mask: Vec<u32> = vec![vec![1; long.len()], [vec![0; pad], vec![1; short.len()]].concat()].concat();
    let mask = Tensor::new(mask, &Device::Cpu).unwrap().reshape((2, long.len())).unwrap();
    let positions: Vec<u32> = (0..long.len() as u32).chain((0..long.len()).map(|i| i.saturating_sub(pad) as u32)).collect();
    let positions = Tensor::new(positions, &Device::Cpu).unwrap().reshape((2, long.len())).unwrap();
    let options = ForwardOptions { attention_mask: Some(&mask), position_ids: Some(&positions), segment_ids: None };
    let (_, batch) = model.forward_logits(&input, options, None).unwrap();
    let last = long.len() - 1;
    for (b, expected) in [(0, &tensors["logits.0"]), (1, &tensors["logits.1"])] {
        let expected_last = expected.i(expected.dim(0).unwrap() - 1).unwrap();
        let diff = max_abs_diff(&batch.i((b, last)).unwrap(), &expected_last);
        assert!(diff <= 1e-4, "row {b}: max |Δ| = {diff}");
    }
}

#[test]
fn packed_samples_do_not_see_each_other() {
    let model = causal_lm();
    let tensors = load("expected_logits.safetensors");
    let (a, b) = (ids(&tensors["input_ids.0"]), ids(&tensors["input_ids.1"]));
    let packed = row(&[a.clone(), b.clone()].concat());
    let segments: Vec<u32> = [vec![0; a.len()], vec![1; b.len()]].concat();
    let positions: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
    let segments = row(&segments);
    let positions = row(&positions);
    let options = ForwardOptions { attention_mask: None, position_ids: Some(&positions), segment_ids: Some(&segments) };
    let (_, logits) = model.forward_logits(&packed, options, None).unwrap();
    let second = logits.i((0, a.len()..)).unwrap();
    assert!(max_abs_diff(&second, &tensors["logits.1"]) <= 1e-4);
}

#[test]
fn reward_model_scores_match_transformers() {
    let folder = ModelFolder::open(fixture("reward-model").to_str().unwrap()).unwrap();
    assert_eq!(folder.config.head, crate::model::Head::SequenceClassification { num_labels: 1 });
    let (model, _) = folder.load_model(&Device::Cpu).unwrap();
    let tensors = load("expected_rewards.safetensors");
    let input = tensors["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = tensors["attention_mask"].to_dtype(DType::U32).unwrap();
    let options = ForwardOptions { attention_mask: Some(&mask), position_ids: None, segment_ids: None };
    let hidden = model.forward(&input, options, None).unwrap();
    let scores = model.class_scores(&hidden).unwrap();
    let lengths: Vec<u32> = mask.sum(1).unwrap().to_vec1().unwrap();
    let expected: Vec<f32> = tensors["scores"].to_vec1().unwrap();
    for (b, length) in lengths.iter().enumerate() {
        let score: f32 = scores.i((b, *length as usize - 1, 0)).unwrap().to_scalar().unwrap();
        assert!((score - expected[b]).abs() <= 1e-4, "row {b}: {score} vs {}", expected[b]);
    }
}

#[test]
fn first_training_step_matches_transformers_loss_and_gradient_norm() {
    let folder = ModelFolder::open(fixture("causal-lm").to_str().unwrap()).unwrap();
    let (model, params) = folder.load_model(&Device::Cpu).unwrap();
    let batch = load("train_batches.safetensors")["batches"].i(0).unwrap().to_dtype(DType::U32).unwrap();
    let t = batch.dim(1).unwrap();
    let (x, y) = (batch.narrow(1, 0, t - 1).unwrap(), batch.narrow(1, 1, t - 1).unwrap());
    let (_, logits) = model.forward_logits(&x, ForwardOptions::default(), None).unwrap();
    let logp = log_softmax_last_dim(&logits).unwrap();
    let picked = logp.gather(&y.unsqueeze(D::Minus1).unwrap().contiguous().unwrap(), D::Minus1).unwrap();
    let loss = picked.mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();

    let mut squared = 0f64;
    for (name, var) in params.iter() {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached `{name}`"));
        squared += grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    let training = &expected()["training"];
    let expected_loss = training["losses"][0].as_f64().unwrap();
    let expected_norm = training["grad_norms_before_clip"][0].as_f64().unwrap();
    let loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - expected_loss).abs() < 1e-4, "loss {loss} vs {expected_loss}");
    assert!((squared.sqrt() - expected_norm).abs() < 1e-4, "grad norm {} vs {expected_norm}", squared.sqrt());
}

#[test]
fn token_logprobs_pick_the_next_token() {
    let logits = Tensor::new(&[[[0f32, 10.0], [10.0, 0.0], [0.0, 0.0]]], &Device::Cpu).unwrap();
    let input = Tensor::new(&[[0u32, 1, 0]], &Device::Cpu).unwrap();
    let lp: Vec<f32> = token_logprobs(&logits, &input).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    assert!(lp[0] > -1e-3 && lp[1] > -1e-3);
}

#[test]
fn attention_recomputing_probs_gives_the_plain_values_and_gradients() {
    // Two query heads per key/value head, a causal mask with a padded first key in batch 1.
    let (b, kv_heads, groups, t, d) = (2, 2, 2, 5, 16);
    let device = Device::Cpu;
    let var = |shape: &[usize], seed: u64| {
        let values: Vec<f32> = (0..shape.iter().product::<usize>() as u64).map(|i| ((i * (2 * seed + 1) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
        Var::from_vec(values, shape, &device).unwrap()
    };
    let (q, k, v) = (var(&[b, kv_heads, groups * t, d], 1), var(&[b, kv_heads, t, d], 2), var(&[b, kv_heads, t, d], 3));
    let mask: Vec<f32> = (0..b * t * t).map(|i| {
        let (batch, row, col) = (i / (t * t), i / t % t, i % t);
        if col > row || (batch == 1 && col == 0) { MASKED } else { 0.0 }
    }).collect();
    let mask = Tensor::from_vec(mask, (b, t, t), &device).unwrap();
    let weights = var(&[b, kv_heads, groups * t, d], 4).as_tensor().detach();
    let run = |recomputed: bool| {
        let out = if recomputed {
            attention_recomputing_probs(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), 0.25).unwrap()
        } else {
            fused::attention_probs(q.as_tensor(), k.as_tensor(), Some(&mask), 0.25).unwrap().matmul(v.as_tensor()).unwrap()
        };
        let grads = recompute::backward(&(&out * &weights).unwrap().sum_all().unwrap()).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let grad = |x: &Var| flat(grads.get(x.as_tensor()).expect("a gradient"));
        (flat(&out), grad(&q), grad(&k), grad(&v))
    };
    assert_eq!(run(true), run(false));
}
