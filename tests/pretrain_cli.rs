//! The `pretrain` binary: exact resume after SIGKILL and SIGINT, and refusals.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_refused, ok, s, shakespeare_tokens, stage, testdata};

/// A model small enough that hundreds of steps take seconds.
const TINY: &[&str] = &[
    "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "4",
    "--num-key-value-heads", "2", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "5",
    "--eval-every", "50", "--val-fraction", "0.05", "--threads", "2", "-q",
];

fn pretrain_args<'a>(tokens: &'a Path, tokenizer: &'a Path, out: &'a Path, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(tokens), "--tokenizer", s(tokenizer), "-o", s(out), "--steps", steps];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model.safetensors")).unwrap()
}

fn wait_for(path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An uninterrupted run, and a run stopped with `signal` once checkpoint `step-40` exists and
/// then resumed, end with byte-identical weights.
fn resume_after(signal: &str, expected_exit: Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(dir.path(), 300);
    let straight = dir.path().join("straight");
    ok("pretrain", &pretrain_args(&tokens, &tokenizer, &straight, "300", &["--checkpoint-every", "20"]));

    let stopped = dir.path().join("stopped");
    let child = stage("pretrain")
        .args(pretrain_args(&tokens, &tokenizer, &stopped, "300", &["--checkpoint-every", "20"]))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&stopped.join("checkpoints/step-40"), Duration::from_secs(60));
    assert!(std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.code(), expected_exit, "{}", String::from_utf8_lossy(&result.stderr));
    assert!(!stopped.join("model.safetensors").exists(), "the run finished before it was stopped");

    ok("pretrain", &pretrain_args(&tokens, &tokenizer, &stopped, "300", &["--checkpoint-every", "20", "--resume"]));
    assert!(weights(&straight) == weights(&stopped), "resumed weights differ after {signal}");
    let steps: Vec<u64> = std::fs::read_to_string(stopped.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=300).collect::<Vec<_>>(), "metrics.jsonl holds each step once");
}

#[test]
fn sigkill_then_resume_gives_the_same_weights() {
    resume_after("-KILL", None);
}

#[test]
fn sigint_saves_exits_130_and_resumes_to_the_same_weights() {
    resume_after("-INT", Some(130));
}

#[test]
fn a_run_writes_a_model_folder_that_learns() {
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(dir.path(), 300);
    let run = dir.path().join("run");
    ok("pretrain", &pretrain_args(&tokens, &tokenizer, &run, "150", &[]));
    for file in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "config.toml", "metrics.jsonl", "curves.svg", "eval.json"] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    let eval: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let (loss, entropy) = (eval["eval_loss"].as_f64().unwrap(), eval["unigram_entropy"].as_f64().unwrap());
    assert!(loss < entropy, "eval loss {loss} is not below the unigram entropy {entropy}");
    // The folder is a model the next stage (and --init) accepts.
    let next = dir.path().join("next");
    ok("pretrain", &[s(&tokens), "--init", s(&run), "-o", s(&next), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "-q"]);
}

#[test]
fn bad_inputs_exit_2_with_one_line() {
    let work = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(work.path(), 300);
    let dir = tempfile::tempdir().unwrap();
    let run: PathBuf = dir.path().join("run");

    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[model]\nhidden_size = 32\nhiden_layers = 2\n").unwrap();
    let mut args = pretrain_args(&tokens, &tokenizer, &run, "5", &[]);
    args.extend(["--config", s(&recipe)]);
    assert_refused("pretrain", &args, "unknown key `model.hiden_layers`", dir.path(), &["r.toml"]);
    std::fs::remove_file(&recipe).unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let other = other_dir.path().join("other.json");
    ok("tokenize", &["train", s(&testdata("pretrain_c4_sample.parquet")), "--vocab-size", "300", "-o", s(&other), "-q"]);
    assert_refused("pretrain", &pretrain_args(&tokens, &other, &run, "5", &[]), "written with tokenizer sha256", dir.path(), &[]);

    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, "").unwrap();
    assert_refused("pretrain", &pretrain_args(&empty, &tokenizer, &run, "5", &[]), "empty file", dir.path(), &["empty.parquet"]);
    std::fs::remove_file(&empty).unwrap();

    let no_rows = dir.path().join("none.parquet");
    let source = lathe::data::ParquetSource::open(&tokens).unwrap();
    let mut sink = lathe::data::ParquetSink::create(&no_rows, source.schema().clone(), source.metadata().clone().into_iter().collect()).unwrap();
    sink.write(&arrow::array::RecordBatch::new_empty(source.schema().clone())).unwrap();
    sink.finish().unwrap();
    assert_refused("pretrain", &pretrain_args(&no_rows, &tokenizer, &run, "5", &[]), "empty tokens file", dir.path(), &["none.parquet"]);
    std::fs::remove_file(&no_rows).unwrap();

    let fixture = testdata("hf-tiny/causal-lm");
    let fixture_tokens = work.path().join("fixture_tokens.parquet");
    let text = testdata("pretrain_tinystories_sample.parquet");
    ok("tokenize", &["encode", s(&text), "--tokenizer", s(&fixture), "-o", s(&fixture_tokens), "-q"]);
    assert_refused(
        "pretrain",
        &[s(&fixture_tokens), "--init", s(&fixture), "-o", s(&run), "--seq-len", "512", "-q"],
        "max_position_embeddings 128",
        dir.path(),
        &[],
    );
    assert_refused(
        "pretrain",
        &pretrain_args(&tokens, &tokenizer, &run, "5", &["--max-position-embeddings", "16"]),
        "max_position_embeddings 16",
        dir.path(),
        &[],
    );

    ok("pretrain", &pretrain_args(&tokens, &tokenizer, &run, "3", &[]));
    let mut wider = pretrain_args(&tokens, &tokenizer, &run, "6", &["--resume"]);
    wider.extend(["--hidden-size", "64"]);
    let out = common::run("pretrain", &wider);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another model shape (hidden_size: 32 → 64)"));
    let again = common::run("pretrain", &pretrain_args(&tokens, &tokenizer, &run, "6", &[]));
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --resume"));
}
