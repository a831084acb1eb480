//! The `rm-train` binary on the fixture model: reward models with the accuracy gate, guard
//! classifiers continued from an earlier guard, regression (refusals: bad_input_catalogue.rs).

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::{ok, read_json, run, s, testdata};
use lathe::data::records::{LabeledTextRecord, RecordWriter};

const SMALL: &[&str] = &["--max-length", "96", "--batch-size", "4", "--lr", "2e-3", "--threads", "2", "-q"];

fn rm_args<'a>(data: &'a Path, model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(data), "--model", s(model), "-o", s(out)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_reward_model_is_a_sequence_classifier_with_its_eval_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("hf-tiny/causal-lm");
    let data = testdata("pref_hh_rlhf_harmless_base.slice.parquet");
    let run_dir = dir.path().join("rm");
    ok("rm-train", &rm_args(&data, &model, &run_dir, &["--steps", "12", "--val-fraction", "0.25", "--center-rewards", "0.01"]));
    let config = read_json(&run_dir.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    assert_eq!(config["pad_token_id"], 3);
    assert!(config["reward_std"].as_f64().unwrap() > 0.0 && config["reward_mean"].is_number());
    assert_eq!(config["lathe_scoring"]["truncation"], "left");
    let tensors = candle_core::safetensors::load(run_dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors["score.weight"].dims(), &[1, 64]);
    assert!(!tensors.contains_key("lm_head.weight"));
    let eval = read_json(&run_dir.join("eval.json"));
    for key in ["eval_accuracy", "eval_margin", "eval_mean_reward", "eval_std_reward", "eval_min_reward", "eval_max_reward"] {
        assert!(eval[key].is_number(), "{key} missing from eval.json");
    }
    let steps = common::metric_rows(&run_dir, "accuracy");
    assert_eq!(steps.len(), 12, "every step logs TRL's accuracy");

    // The gate at its most demanding (about 7 of 12 held-out pairs are right after 2 steps): exit 3
    // with the model still written.
    let gated = dir.path().join("gated");
    let out = run("rm-train", &rm_args(&data, &model, &gated, &["--steps", "2", "--val-fraction", "0.25", "--min-accuracy", "1"]));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is below --min-accuracy 1"));
    assert!(gated.join("model.safetensors").exists());
}

#[test]
fn a_guard_learns_labels_with_thresholds_and_continues_from_itself() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("hf-tiny/causal-lm");
    let data = testdata("moderation_openai_samples.slice.parquet");
    let guard = dir.path().join("guard");
    ok("rm-train", &rm_args(&data, &model, &guard, &["--task", "multilabel", "--steps", "10", "--val-fraction", "0.3"]));
    let config = read_json(&guard.join("config.json"));
    assert_eq!(config["problem_type"], "multi_label_classification");
    assert_eq!(config["num_labels"], 8);
    assert_eq!(config["id2label"]["0"], "sexual");
    let thresholds = config["thresholds"].as_object().unwrap();
    assert_eq!(thresholds.len(), 8);
    assert!(thresholds.values().all(|t| (0.0..=1.0).contains(&t.as_f64().unwrap())));
    let eval = read_json(&guard.join("eval.json"));
    for key in ["eval_precision/violence", "eval_recall/violence", "eval_f1/violence", "eval_auroc/violence", "eval_macro_f1"] {
        assert!(eval[key].is_number(), "{key} missing from eval.json");
    }

    // Reviewed decisions in the list layout, naming a subset of the labels, train the next guard.
    let reviewed = dir.path().join("reviewed.parquet");
    let rows = vec![
        LabeledTextRecord { text: "I will hurt you".into(), labels: vec!["violence".into(), "harassment".into()], unlabeled: vec![] },
        LabeledTextRecord { text: "What a lovely day".into(), labels: vec![], unlabeled: vec![] },
        LabeledTextRecord { text: "You people are vermin".into(), labels: vec!["hate".into()], unlabeled: vec![] },
        LabeledTextRecord { text: "Thanks for the help!".into(), labels: vec![], unlabeled: vec![] },
    ];
    let mut writer = RecordWriter::<LabeledTextRecord>::create(&reviewed, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
    let next = dir.path().join("next");
    ok("rm-train", &rm_args(&reviewed, &guard, &next, &["--task", "multilabel", "--steps", "3"]));
    let next_config = read_json(&next.join("config.json"));
    assert_eq!(next_config["id2label"], config["id2label"], "the label order carries over");
    let unknown = dir.path().join("unknown.parquet");
    let rows = vec![LabeledTextRecord { text: "spam spam".into(), labels: vec!["spam".into()], unlabeled: vec![] }];
    let mut writer = RecordWriter::<LabeledTextRecord>::create(&unknown, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
    let out = run("rm-train", &rm_args(&unknown, &guard, &dir.path().join("bad"), &["--task", "multilabel", "--steps", "1"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("label `spam` is not one of the labels"));
}

#[test]
fn regression_reports_correlation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("scored.parquet");
    let texts: Vec<String> = (0..40).map(|i| "ha ".repeat(1 + i % 10)).collect();
    let scores: Vec<f64> = (0..40).map(|i| (1 + i % 10) as f64 / 10.0).collect();
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false), Field::new("rating", DataType::Float64, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(texts)), Arc::new(Float64Array::from(scores))]).unwrap();
    let mut sink = lathe::data::ParquetSink::create(&data, schema, vec![]).unwrap();
    sink.write(&batch).unwrap();
    sink.finish().unwrap();
    let out = dir.path().join("reg");
    let model = testdata("hf-tiny/causal-lm");
    ok("rm-train", &rm_args(&data, &model, &out, &["--task", "regression", "--score-column", "rating", "--steps", "40", "--val-fraction", "0.25"]));
    let eval = read_json(&out.join("eval.json"));
    // Length predicts the score exactly, so even a tiny model finds it.
    assert!(eval["eval_pearson"].as_f64().unwrap() > 0.5, "{eval}");
    assert!(eval["eval_mse"].is_number() && eval["eval_spearman"].is_number());
}

