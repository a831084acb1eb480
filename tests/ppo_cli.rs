//! The `ppo` binary: the whole loop on tiny models (a rule's preferences → reward model → PPO)
//! raises the held-out reward with the KL bounded; exact resume after SIGINT mid-run; GRPO;
//! refusals in bad_input_catalogue.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{metric_rows, ok, read_json, s, stage, testdata};

fn policy() -> PathBuf {
    testdata("hf-tiny/causal-lm")
}

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/hf-tiny/causal-lm");

/// Short prompts the fixture's 128-token context takes with room for a response.
fn write_prompts(path: &Path, count: usize) {
    let words = ["king", "queen", "war", "peace", "love", "night", "sword", "crown", "river", "storm", "winter", "gold"];
    let lines: Vec<String> = (0..count)
        .map(|i| {
            let (a, b) = (words[i % words.len()], words[(i * 7 + 3) % words.len()]);
            serde_json::json!({"prompt_id": format!("p{i}"), "prompt": format!("Tell me about the {a} and the {b}.")}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

const TINY_PPO: &[&str] = &["--batch-size", "8", "--max-new-tokens", "16", "--lr", "2e-3", "--temperature", "1", "--threads", "2", "-q"];

fn ppo_args<'a>(prompts: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(prompts), "--policy", POLICY, "-o", s(out)];
    args.extend_from_slice(TINY_PPO);
    args.extend_from_slice(extra);
    args
}

fn owned(args: Vec<&str>) -> Vec<String> {
    args.into_iter().map(String::from).collect()
}

/// The loop: a known reward (characters in the response) scores sampled responses,
/// `rank` turns the scores into preferences, `rm-train` learns a reward model from them, and
/// PPO against that reward model raises the held-out reward while the KL stays bounded.
#[test]
fn ppo_against_a_learned_reward_raises_the_held_out_reward() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let (all, train, val) = (path("all.jsonl"), path("train.jsonl"), path("val.jsonl"));
    write_prompts(&all, 64);
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&train, lines[..48].join("\n") + "\n").unwrap();
    std::fs::write(&val, lines[48..].join("\n") + "\n").unwrap();
    let fixture = policy();
    ok("generate", &[s(&all), "--model", s(&fixture), "-n", "4", "--max-new-tokens", "16", "--temperature", "1", "-o", s(&path("responses.parquet")), "-q"]);
    ok("score", &[s(&path("responses.parquet")), "--rule", "length:0.05", "-o", s(&path("scored.parquet")), "-q"]);
    ok("rank", &[s(&path("scored.parquet")), "--min-margin", "0.1", "-o", s(&path("prefs.parquet")), "-q"]);
    let rm = path("rm");
    ok("rm-train", &[s(&path("prefs.parquet")), "--model", s(&fixture), "--steps", "200", "--batch-size", "8", "--lr", "1e-3",
                     "--eval-every", "0", "--checkpoint-every", "0", "--max-length", "128", "-o", s(&rm), "-q"]);

    let run = path("ppo");
    ok("ppo", &ppo_args(&train, &run, &["--val", s(&val), "--reward-model", s(&rm), "--updates", "20", "--eval-every", "5"]));
    let evals: Vec<f64> = metric_rows(&run, "eval_score").iter().map(|r| r["eval_score"].as_f64().unwrap()).collect();
    assert_eq!(evals.len(), 5, "evaluations at updates 0, 5, 10, 15, 20");
    let (before, after) = (evals[0], *evals.last().unwrap());
    assert!(after > before + 1.0, "held-out reward {before:.3} → {after:.3} did not rise clearly ({evals:?})");
    let updates = metric_rows(&run, "objective/kl");
    assert_eq!(updates.len(), 20);
    for row in &updates {
        let kl = row["objective/kl"].as_f64().unwrap();
        assert!(kl.abs() < 5.0, "objective/kl {kl} ran away at update {}", row["update"]);
        for name in ["objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
                     "val/clipfrac_avg", "val/ratio", "loss/policy_avg", "loss/value_avg"] {
            assert!(row[name].is_number(), "{name} missing from update {}", row["update"]);
        }
    }
    // The first minibatch of an update sees the policy that sampled it: ratio 1, KL 0.
    assert_eq!(updates[0]["objective/kl"].as_f64().unwrap(), 0.0);

    // Every update's rollout is a scored-responses file the next round can rank.
    let rollout = run.join("rollouts/update-000020.parquet");
    assert!(rollout.exists());
    ok("rank", &[s(&rollout), "--pairs", "best-worst", "-o", s(&path("again.parquet")), "-q"]);
    // The run folder is the tuned policy; the value model sits beside it.
    ok("generate", &[s(&val), "--model", s(&run), "--max-new-tokens", "8", "-o", s(&path("after.parquet")), "-q"]);
    assert!(run.join("value_model/model.safetensors").exists());
    let eval = read_json(&run.join("eval.json"));
    assert_eq!(eval["updates"], 20);
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model.safetensors")).unwrap()
}

/// A run stopped with SIGINT part-way (often inside an update, with its rollout saved in the
/// checkpoint) and resumed ends with the same policy and value weights, byte for byte.
#[test]
fn sigint_then_resume_gives_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_prompts(&prompts, 40);
    let extra = ["--reward-rule", "length:0.05", "--updates", "60", "--batch-size", "4", "--minibatches", "2", "--ppo-epochs", "2",
                 "--target-kl", "1", "--missing-eos-penalty", "0.5", "--whiten-rewards", "--checkpoint-every", "5"];
    let straight = dir.path().join("straight");
    ok("ppo", &ppo_args(&prompts, &straight, &extra));

    let stopped = dir.path().join("stopped");
    let child = stage("ppo").args(owned(ppo_args(&prompts, &stopped, &extra))).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while metric_rows_or_empty(&stopped, "objective/kl") < 7 {
        assert!(started.elapsed() < Duration::from_secs(60), "the run never reached update 7");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.code(), Some(130), "{}", String::from_utf8_lossy(&result.stderr));
    assert!(!stopped.join("model.safetensors").exists(), "the run finished before it was stopped");

    let mut resumed = ppo_args(&prompts, &stopped, &extra);
    resumed.push("--resume");
    ok("ppo", &resumed);
    assert!(weights(&straight) == weights(&stopped), "resumed policy weights differ");
    let value = |run: &Path| std::fs::read(run.join("value_model/model.safetensors")).unwrap();
    assert!(value(&straight) == value(&stopped), "resumed value weights differ");
    let updates: Vec<u64> = metric_rows(&stopped, "objective/kl").iter().map(|r| r["update"].as_u64().unwrap()).collect();
    assert_eq!(updates, (1..=60).collect::<Vec<_>>(), "metrics.jsonl holds each update once");
}

fn metric_rows_or_empty(run: &Path, key: &str) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().filter(|l| l.contains(&format!("\"{key}\""))).count())
}

#[test]
fn grpo_learns_from_groups_without_a_value_model() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_prompts(&prompts, 40);
    let run = dir.path().join("grpo");
    ok("ppo", &ppo_args(&prompts, &run, &["--algo", "grpo", "-n", "4", "--batch-size", "4", "--reward-rule", "length:0.05",
                                          "--updates", "15", "--val-fraction", "0.2", "--eval-every", "0", "--kl-coef", "0.02"]));
    let evals: Vec<f64> = metric_rows(&run, "eval_score").iter().map(|r| r["eval_score"].as_f64().unwrap()).collect();
    assert!(evals.last().unwrap() > &(evals[0] + 0.5), "GRPO did not raise the held-out score: {evals:?}");
    assert!(!run.join("value_model").exists());
    let first = &metric_rows(&run, "objective/kl")[0];
    assert_eq!(first["episode"], 16, "4 prompts × 4 samples per update");
}

