//! The `pretrain` binary: exact resume after SIGKILL and SIGINT (refusals: bad_input_catalogue.rs).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ok, s, shakespeare_tokens, stage};

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

