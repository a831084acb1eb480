//! LoRA at the command line: `sft`, `rm-train`, `ppo` and `dpo` with `--lora-r` write PEFT adapter
//! folders, resume byte-identically after `kill -9`, and every stage takes an adapter folder as
//! a model; `adapter merge` gives the same model as the adapter.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ok, s, stage, testdata};
use serde_json::Value;

fn base() -> PathBuf {
    testdata("hf-tiny/causal-lm")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter_model.safetensors")).unwrap()
}

fn wait_for(path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An uninterrupted run and one killed with SIGKILL once `checkpoints/step-{at}` exists, then
/// resumed, end with byte-identical adapters (and value adapters, for ppo).
fn kill_and_resume(name: &str, args: &dyn Fn(&Path) -> Vec<String>, at: u64, dir: &Path) -> PathBuf {
    let straight = dir.join(format!("{name}-straight"));
    let straight_args = args(&straight);
    ok(name, &straight_args.iter().map(String::as_str).collect::<Vec<_>>());
    let killed = dir.join(format!("{name}-killed"));
    let mut child = stage(name).args(args(&killed)).stderr(Stdio::null()).spawn().unwrap();
    wait_for(&killed.join(format!("checkpoints/step-{at}/trainer_state.json")), Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("adapter_model.safetensors").exists(), "{name} finished before it was killed");
    let mut resumed = args(&killed);
    resumed.push("--resume".into());
    ok(name, &resumed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(adapter_bytes(&straight) == adapter_bytes(&killed), "{name}: the resumed adapter differs");
    killed
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn sft_lora_writes_a_peft_adapter_that_resumes_exactly_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = testdata("sft_alpaca_prompt_completion.slice.parquet");
    let args = |run: &Path| {
        owned(&[s(&data), "--model", s(&base()), "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lora-target", "q_proj,v_proj,down_proj",
                "--steps", "60", "--batch-size", "2", "--max-length", "96", "--lr", "3e-3", "--eval-every", "0", "--checkpoint-every", "10",
                "--gradient-checkpointing", "--threads", "2", "-o", s(run), "-q"])
    };
    let run = kill_and_resume("sft", &args, 20, dir.path());
    let config = read_json(&run.join("adapter_config.json"));
    assert_eq!((config["peft_type"].as_str(), config["task_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some("CAUSAL_LM"), Some(4)));
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    assert!(!run.join("config.json").exists() && !run.join("model.safetensors").exists(), "an adapter folder, not a model folder");
    for file in ["tokenizer.json", "tuned_config.json", "generation_config.json", "metrics.jsonl", "curves.svg"] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    // Only the adapter trained: 6 modules × 2 layers.
    let tensors = candle_core::safetensors::load(run.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 12);

    // The adapter is a model: generate from it, continue it, merge it.
    let prompts = testdata("demo_prompts.jsonl");
    let greedy = |model: &Path, out: &str| {
        let path = dir.path().join(out);
        ok("generate", &[s(&prompts), "--model", s(model), "--temperature", "0", "--max-new-tokens", "12", "-o", s(&path), "-q"]);
        lathe::data::records::RecordReader::<lathe::data::records::ResponseRecord>::open(&path).unwrap().read_all().unwrap()
            .into_iter().map(|r| r.response).collect::<Vec<_>>()
    };
    let merged = dir.path().join("merged");
    ok("adapter", &["merge", s(&run), "-o", s(&merged), "-q"]);
    assert_eq!(read_json(&merged.join("config.json"))["architectures"][0], "LlamaForCausalLM");
    assert_eq!(greedy(&run, "a.parquet"), greedy(&merged, "b.parquet"), "the adapter and its merge generate alike");
    let more = dir.path().join("more");
    ok("sft", &[s(&data), "--model", s(&run), "--steps", "3", "--batch-size", "2", "--max-length", "96", "--eval-every", "0", "--checkpoint-every", "0", "-o", s(&more), "-q"]);
    assert_eq!(read_json(&more.join("adapter_config.json"))["r"], 4, "sft --model ADAPTER continues the adapter");
    let inspected = ok("adapter", &["inspect", s(&more), "--json"]);
    let inspected: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    // r 4 × (in + out) per module: q_proj 64→64, v_proj 64→32 (2 kv heads of 16), down_proj 176→64.
    let per_layer = 4 * (64 + 64) + 4 * (64 + 32) + 4 * (176 + 64);
    assert_eq!((inspected["modules"].as_u64(), inspected["parameters"].as_u64()), (Some(6), Some(2 * per_layer)));
}

#[test]
fn rm_train_lora_is_a_seq_cls_adapter_that_scores_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = testdata("pref_hh_rlhf_harmless_base.slice.parquet");
    let args = |run: &Path| {
        owned(&[s(&data), "--model", s(&base()), "--lora-r", "4", "--use-rslora", "--steps", "40", "--batch-size", "4", "--max-length", "96",
                "--lr", "3e-3", "--eval-every", "0", "--checkpoint-every", "10", "--threads", "2", "-o", s(run), "-q"])
    };
    let run = kill_and_resume("rm-train", &args, 20, dir.path());
    let config = read_json(&run.join("adapter_config.json"));
    assert_eq!((config["task_type"].as_str(), config["use_rslora"].as_bool()), (Some("SEQ_CLS"), Some(true)));
    assert_eq!(config["modules_to_save"], serde_json::json!(["score"]));
    assert_eq!(read_json(&run.join("tuned_config.json"))["architectures"][0], "LlamaForSequenceClassification");
    // A reward model to score with, and a value model for ppo.
    let responses = dir.path().join("responses.parquet");
    ok("generate", &[s(&testdata("demo_prompts.jsonl")), "--model", s(&base()), "-n", "2", "--max-new-tokens", "8", "-o", s(&responses), "-q"]);
    ok("score", &[s(&responses), "--reward-model", s(&run), "-o", s(&dir.path().join("scored.parquet")), "-q"]);
}

#[test]
fn ppo_lora_trains_policy_and_value_adapters_against_the_base_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = testdata("demo_rl_prompts.jsonl");
    let reward = testdata("hf-tiny/reward-model");
    let args = |run: &Path| {
        owned(&[s(&prompts), "--policy", s(&base()), "--reward-model", s(&reward), "--lora-r", "4", "--updates", "6", "--batch-size", "4",
                "--minibatches", "2", "--max-new-tokens", "8", "--truncate-prompt", "left", "--eval-every", "0", "--checkpoint-every", "2",
                "--threads", "2", "-o", s(run), "-q"])
    };
    // The engine counts optimizer steps: 2 minibatches × 4 epochs per update.
    let run = kill_and_resume("ppo", &args, 16, dir.path());
    assert_eq!(read_json(&run.join("adapter_config.json"))["task_type"], "CAUSAL_LM");
    assert_eq!(read_json(&run.join("value_model/adapter_config.json"))["task_type"], "SEQ_CLS");
    let straight = dir.path().join("ppo-straight");
    assert!(adapter_bytes(&straight.join("value_model")) == adapter_bytes(&run.join("value_model")), "the value adapter differs");
    // The first update's KL to the reference (the base, adapter off) is 0: B starts at zero.
    let first: Value = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r.get("objective/kl").is_some()).unwrap();
    assert_eq!(first["objective/kl"].as_f64(), Some(0.0));
}

#[test]
fn dpo_lora_scores_against_the_base_with_the_adapter_off_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = testdata("hf-tiny/dpo/pairs.parquet");
    let args = |run: &Path| {
        owned(&[s(&pairs), "--model", s(&base()), "--lora-r", "4", "--lora-dropout", "0.1", "--steps", "30", "--batch-size", "4", "--max-length", "64",
                "--lr", "3e-3", "--val-fraction", "0.25", "--eval-every", "10", "--checkpoint-every", "10", "--gradient-checkpointing",
                "--threads", "2", "-o", s(run), "-q"])
    };
    let run = kill_and_resume("dpo", &args, 20, dir.path());
    assert_eq!(read_json(&run.join("adapter_config.json"))["task_type"], "CAUSAL_LM");
    assert!(read_json(&run.join("reference_logps.json"))["source"].as_str().unwrap().contains("adapter off"));
    let rows: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<&Value> = rows.iter().filter(|r| r.get("rewards/margins").is_some()).collect();
    // B starts at zero, so the first step's policy is the reference exactly; then it learns.
    assert_eq!((steps[0]["rewards/chosen"].as_f64(), steps[0]["rewards/rejected"].as_f64()), (Some(0.0), Some(0.0)));
    assert!(steps.last().unwrap()["rewards/margins"].as_f64().unwrap() > 0.0, "the margin never grew");
    ok("generate", &[s(&testdata("demo_prompts.jsonl")), "--model", s(&run), "--max-new-tokens", "8", "-o", s(&dir.path().join("g.parquet")), "-q"]);
}
