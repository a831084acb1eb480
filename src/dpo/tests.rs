//! `dpo` against TRL: `testdata/hf-tiny/dpo/` was written by `scripts/make_dpo_fixtures.py`
//! (TRL 1.16 DPOTrainer and KTOTrainer on `hf-tiny/causal-lm`): the token ids TRL trains on,
//! and 5 steps at batch 4 of sigmoid, ipo and kto with their metrics and the weights after.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value;

use super::*;
use crate::train::schedule::ScheduleKind;
use crate::train::{RunSetup, TrainArgs, train};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("dpo/expected.json")).unwrap()).unwrap()
}

fn settings(loss: Loss) -> LossSettings {
    let undesirable_weight = if loss == Loss::Kto { expected()["settings"]["undesirable_weight"].as_f64().unwrap() } else { 1.0 };
    LossSettings { loss, beta: 0.1, label_smoothing: 0.0, simpo_gamma: 0.5, rpo_alpha: None, desirable_weight: 1.0, undesirable_weight }
}

fn options(data: &str, loss: Loss, run_dir: &Path) -> DpoOptions {
    DpoOptions {
        inputs: vec![fixture(data)],
        model: fixture("causal-lm").to_str().unwrap().into(),
        ref_model: None,
        chat_template: None,
        settings: settings(loss),
        max_length: 64,
        max_prompt_length: None,
        sampling: Sampling::Sequential,
        batch_size: 4,
        seed: 1,
        val: None,
        val_fraction: None,
        eval_batches: 0,
        device: Device::Cpu,
        lora: None,
        gradient_checkpointing: false,
        run_dir: run_dir.to_path_buf(),
    }
}

/// The fixture's optimizer: AdamW lr 1e-3 constant, betas (0.9, 0.999), eps 1e-8, no weight
/// decay, clip 1.0 (TRL's defaults but the rate).
fn fixture_args(steps: u64) -> TrainArgs {
    TrainArgs {
        steps,
        batch_size: 4,
        lr: 1e-3,
        schedule: ScheduleKind::Constant,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        grad_clip: 1.0,
        eval_every: 0,
        checkpoint_every: 0,
        ..TrainArgs::default()
    }
}

fn ids(value: &Value) -> Vec<Vec<u32>> {
    value.as_array().unwrap().iter().map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()).collect()
}

fn task(data: &str, loss: Loss, run_dir: &Path) -> DpoTask {
    DpoTask::new(options(data, loss, run_dir)).unwrap()
}

#[test]
fn text_and_chat_pairs_are_tokenized_as_trl_does() {
    let dir = tempfile::tempdir().unwrap();
    let want = expected();
    for (data, prepared) in [("dpo/pairs.parquet", &want["sigmoid"]["prepared"]), ("dpo/chat_pairs.parquet", &want["chat_tokenized"])] {
        let t = task(data, Loss::Sigmoid, dir.path());
        let Examples::Pairs(pairs) = &t.train.examples else { panic!("pairs") };
        assert_eq!(pairs.iter().map(|p| p.prompt.clone()).collect::<Vec<_>>(), ids(&prepared["prompt_ids"]), "{data}: prompts");
        assert_eq!(pairs.iter().map(|p| p.chosen.clone()).collect::<Vec<_>>(), ids(&prepared["chosen_ids"]), "{data}: chosen");
        assert_eq!(pairs.iter().map(|p| p.rejected.clone()).collect::<Vec<_>>(), ids(&prepared["rejected_ids"]), "{data}: rejected");
        assert_eq!(t.report.prompt_fills_max_length, 1, "{data}: TRL drops the pair whose prompt fills max_length");
    }
}

#[test]
fn kto_answers_and_their_kl_pairs_are_trl_s() {
    let dir = tempfile::tempdir().unwrap();
    let prepared = &expected()["kto"]["prepared"];
    let t = task("dpo/kto.parquet", Loss::Kto, dir.path());
    let Examples::Judged(judged) = &t.train.examples else { panic!("judged") };
    assert_eq!(judged.iter().map(|j| j.prompt.clone()).collect::<Vec<_>>(), ids(&prepared["prompt_ids"]));
    assert_eq!(judged.iter().map(|j| j.completion.clone()).collect::<Vec<_>>(), ids(&prepared["completion_ids"]));
    let labels: Vec<bool> = prepared["label"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    assert_eq!(judged.iter().map(|j| j.desirable).collect::<Vec<_>>(), labels);
    // The KL sequence of each answer is its prompt with the previous answer of its batch.
    let kl = ids(&prepared["KL_completion_ids"]);
    for batch in &t.train.batches {
        let (_, mismatched) = t.sequences(&t.train, batch);
        for (k, &i) in batch.iter().enumerate() {
            let want = example(&judged[i].prompt, &kl[i], 64);
            assert_eq!(mismatched[k].ids, want.ids, "KL sequence of answer {i}");
        }
    }
}

fn parity(data: &str, loss: Loss) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = task(data, loss, dir.path());
    let setup = RunSetup { run_dir: dir.path().to_path_buf(), config_toml: "fixture = true\n".into(), seed: 1, threads: rayon::current_num_threads() };
    train(&mut t, &fixture_args(5), &setup).unwrap();

    let steps = &expected()[loss.name()]["steps"];
    let records: Vec<Value> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5);
    let mut worst: std::collections::BTreeMap<String, (f64, String)> = Default::default();
    for (step, (ours, theirs)) in records.iter().zip(steps.as_array().unwrap()).enumerate() {
        for (key, value) in theirs.as_object().unwrap() {
            let theirs = value.as_f64().unwrap();
            let ours = ours[key].as_f64().unwrap_or_else(|| panic!("step {}: no {key}", step + 1));
            let rel = (ours - theirs).abs() / theirs.abs().max(1e-12);
            let entry = worst.entry(key.clone()).or_default();
            if rel >= entry.0 {
                *entry = (rel, format!("step {} {ours} vs {theirs}", step + 1));
            }
        }
    }
    for (k, v) in &worst { eprintln!("{} {k}: {:.2e} {}", loss.name(), v.0, v.1); }
    let stride = expected()["settings"]["weight_stride"].as_u64().unwrap() as usize;
    let want = candle_core::safetensors::load(fixture("dpo/weights.safetensors"), &Device::Cpu).unwrap();
    let ours = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut worst = (0f32, String::new());
    for (name, tensor) in &ours {
        let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let sampled: Vec<f32> = values.into_iter().step_by(stride).collect();
        let theirs: Vec<f32> = want[&format!("{}/{name}", loss.name())].to_vec1().unwrap();
        assert_eq!(sampled.len(), theirs.len(), "{name}");
        for (a, b) in sampled.iter().zip(&theirs) {
            if (a - b).abs() > worst.0 {
                worst = ((a - b).abs(), name.clone());
            }
        }
    }
    eprintln!("{}: weights differ by at most {:.2e} ({})", loss.name(), worst.0, worst.1);
    for (step, (ours, theirs)) in records.iter().zip(steps.as_array().unwrap()).enumerate() {
        // Rewards and the KL estimate are differences of summed log-probabilities, which float32
        // holds to about 2⁻²⁴ of their size (TRL's own figures are no closer): they must agree
        // within 1e-5 relative or within 8 such roundings of the larger mean log-probability.
        let logps = ["logps/chosen", "logps/rejected"].iter().filter_map(|k| theirs[*k].as_f64()).fold(0f64, |m, v| m.max(v.abs()));
        let rounding = 8.0 * logps * 2f64.powi(-24);
        for key in ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "kl"] {
            let Some(theirs) = theirs[key].as_f64() else { continue };
            let ours = ours[key].as_f64().unwrap();
            let floor = match key {
                "kl" => rounding,
                k if k.starts_with("rewards/") && k != "rewards/accuracies" => t.settings.beta * rounding,
                _ => 0.0,
            };
            let ok = (ours - theirs).abs() <= (1e-5 * theirs.abs()).max(floor);
            assert!(ok, "{} step {}: {key} {ours} vs TRL {theirs}", loss.name(), step + 1);
        }
    }
    assert!(worst.0 <= 1e-5, "{}: weights after 5 steps differ by {} in {}", loss.name(), worst.0, worst.1);
}

#[test]
fn five_sigmoid_steps_match_trl() {
    parity("dpo/pairs.parquet", Loss::Sigmoid);
}

#[test]
fn five_ipo_steps_match_trl() {
    parity("dpo/pairs.parquet", Loss::Ipo);
}

#[test]
fn five_kto_steps_match_trl() {
    parity("dpo/kto.parquet", Loss::Kto);
}

#[test]
fn falling_chosen_rewards_with_a_growing_margin_warn_once() {
    let mut watch = FallingChosen::default();
    let warned: Vec<bool> = (0..30).map(|i| watch.push(-0.01 * i as f64, 0.02 * i as f64, 4, 5, "").is_some()).collect();
    assert_eq!(warned.iter().filter(|w| **w).count(), 1, "one warning");
    assert!(warned[19], "as soon as the window is full");
    let mut steady = FallingChosen::default();
    assert!((0..30).all(|i| steady.push(-0.01 * i as f64, -0.01 * i as f64, 4, 5, "").is_none()), "a shrinking margin is not the failure");
    let mut rising = FallingChosen::default();
    assert!((0..30).all(|i| rising.push(0.01 * i as f64, 0.02 * i as f64, 4, 5, "").is_none()), "rising chosen rewards are fine");
}
