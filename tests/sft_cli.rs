//! The `sft` binary on the fixture model: ChatML fallback with embedding growth, exact resume
//! with packing. Its refusals are in bad_input_catalogue.rs.

mod common;

use std::path::Path;

use common::{copy_folder, metric_rows, ok, read_json, s, testdata};

const SMALL: &[&str] = &["--max-length", "96", "--batch-size", "4", "--lr", "2e-3", "--threads", "2", "-q"];

fn sft_args<'a>(data: &'a Path, model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(data), "--model", s(model), "-o", s(out)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_model_without_chat_template_gets_chatml_and_a_grown_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    copy_folder(&testdata("hf-tiny/causal-lm"), &model);
    // A tokenizer that lacks ChatML's markers: rename them.
    let tokenizer = std::fs::read_to_string(model.join("tokenizer.json")).unwrap();
    std::fs::write(model.join("tokenizer.json"), tokenizer.replace("<|im_start|>", "<|first|>").replace("<|im_end|>", "<|last|>")).unwrap();
    std::fs::remove_file(model.join("chat_template.jinja")).unwrap();

    let run = dir.path().join("run");
    let data = testdata("sft_dolly_messages.slice.parquet");
    let out = ok("sft", &sft_args(&data, &model, &run, &["--steps", "8", "--val-fraction", "0.2", "--eval-every", "0"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("using ChatML and adding the special tokens <|im_start|>, <|im_end|>"), "{stderr}");

    let config = read_json(&run.join("config.json"));
    assert_eq!(config["vocab_size"], 514);
    assert_eq!(config["eos_token_id"], serde_json::json!([0, 513]));
    assert_eq!(std::fs::read_to_string(run.join("chat_template.jinja")).unwrap(), lathe::model::chat::CHATML);
    let eval = read_json(&run.join("eval.json"));
    assert!(eval["eval_mean_token_accuracy"].as_f64().unwrap() > 0.0);
    // The tuned folder is a complete model: it tunes again without growing further.
    let again = dir.path().join("again");
    ok("sft", &sft_args(&data, &run, &again, &["--steps", "2"]));
    assert_eq!(read_json(&again.join("config.json"))["vocab_size"], 514);
}

#[test]
fn packed_training_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("hf-tiny/causal-lm");
    let data = testdata("sft_alpaca_prompt_completion.slice.parquet");
    let common = ["--packing", "--schedule", "constant", "--checkpoint-every", "5", "--eval-every", "0"];
    let straight = dir.path().join("straight");
    let mut args = sft_args(&data, &model, &straight, &common);
    args.extend(["--steps", "12"]);
    ok("sft", &args);

    let split = dir.path().join("split");
    let mut first = sft_args(&data, &model, &split, &common);
    first.extend(["--steps", "7"]);
    ok("sft", &first);
    let mut rest = sft_args(&data, &model, &split, &common);
    rest.extend(["--steps", "12", "--resume"]);
    ok("sft", &rest);
    let weights = |run: &Path| std::fs::read(run.join("model.safetensors")).unwrap();
    assert!(weights(&straight) == weights(&split), "resumed weights differ");
    let steps: Vec<u64> = metric_rows(&split, "loss").iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    // Prompt/completion data without --as-chat keeps the model's template untouched.
    assert!(split.join("chat_template.jinja").exists());
}

