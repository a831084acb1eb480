//! The `dpo` binary on the fixture model: every loss with TRL's metric names, conversational
//! pairs, the reference kept in the run folder, exact resume after SIGKILL, and refusals.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_refused, copy_folder, metric_rows, ok, read_json, run, s, shakespeare_tokens, stage, testdata, write_rows};
use lathe::data::records::{PreferenceRecord, PromptCompletionRecord};

const SMALL: &[&str] = &["--max-length", "64", "--batch-size", "4", "--lr", "1e-3", "--weight-decay", "0", "--threads", "2", "-q"];

const PAIRS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/hf-tiny/dpo/pairs.parquet");

fn pairs() -> &'static Path {
    Path::new(PAIRS)
}

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/hf-tiny/causal-lm");

fn dpo_args<'a>(data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(data), "--model", MODEL, "-o", s(out)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

const STEP_METRICS: [&str; 11] = [
    "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
];

#[test]
fn every_loss_trains_and_logs_trl_s_metrics() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("sigmoid", vec!["--loss", "sigmoid"]),
        ("cdpo", vec!["--loss", "sigmoid", "--label-smoothing", "0.1"]),
        ("rpo", vec!["--loss", "sigmoid", "--rpo-alpha", "1"]),
        ("ipo", vec!["--loss", "ipo"]),
        ("hinge", vec!["--loss", "hinge"]),
        ("robust", vec!["--loss", "robust", "--label-smoothing", "0.1"]),
        ("simpo", vec!["--loss", "simpo", "--beta", "2", "--simpo-gamma", "1"]),
        ("kto", vec!["--loss", "kto", "--undesirable-weight", "1.5"]),
    ] {
        let out = dir.path().join(name);
        let mut args = dpo_args(pairs(), &out, &["--steps", "4", "--val-fraction", "0.25", "--eval-every", "2", "--eval-on-start"]);
        args.extend(extra.iter().copied());
        ok("dpo", &args);
        let steps = metric_rows(&out, "loss");
        assert_eq!(steps.len(), 4, "{name}: a record per step");
        // KTO logs the figures of desirable and undesirable answers only for batches that hold some.
        let paired = name != "kto";
        for key in STEP_METRICS.iter().filter(|k| paired || ["loss", "grad_norm", "learning_rate"].contains(*k)) {
            assert!(steps.iter().all(|r| r[*key].is_number()), "{name}: {key} missing from a step");
        }
        let evals = metric_rows(&out, "eval_loss");
        assert_eq!(evals.len(), 3, "{name}: evaluations at the start, step 2 and the end");
        assert!(evals[0]["eval_rewards/margins"].is_number(), "{name}: eval_rewards/margins");
        if name == "kto" {
            assert!(steps.iter().all(|r| r["kl"].is_number()), "kto logs its KL estimate");
        }
        if name == "rpo" {
            assert!(steps.iter().all(|r| r["nll_loss"].as_f64().unwrap() > 0.0), "rpo logs the chosen NLL");
        }
        for file in ["config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "curves.svg", "eval.json", "config.toml"] {
            assert!(out.join(file).exists(), "{name}: {file} missing");
        }
        assert_eq!(out.join("reference_logps.json").exists(), name != "simpo", "{name}: only simpo is reference-free");
        let eval = read_json(&out.join("eval.json"));
        assert_eq!(eval["loss_type"], if name == "cdpo" || name == "rpo" { "sigmoid" } else { name });
        assert!(eval["eval_rewards/chosen"].is_number());
    }
}

#[test]
fn conversational_pairs_and_unpaired_rows_train() {
    let dir = tempfile::tempdir().unwrap();
    let chat = dir.path().join("chat");
    ok("dpo", &dpo_args(&testdata("hf-tiny/dpo/chat_pairs.parquet"), &chat, &["--steps", "2"]));
    assert_eq!(metric_rows(&chat, "rewards/margins").len(), 2);
    let kto = dir.path().join("kto");
    ok("dpo", &dpo_args(&testdata("hf-tiny/dpo/kto.parquet"), &kto, &["--steps", "2", "--loss", "kto"]));
    assert_eq!(metric_rows(&kto, "kl").len(), 2);
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model.safetensors")).unwrap()
}

/// A run killed with SIGKILL after a checkpoint and resumed ends with the weights of a run never
/// interrupted, byte for byte; the resumed run reads its reference log-probabilities back.
#[test]
fn sigkill_then_resume_gives_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--steps", "60", "--checkpoint-every", "10", "--val-fraction", "0.2", "--eval-every", "20", "--lr", "3e-4"];
    let straight = dir.path().join("straight");
    ok("dpo", &dpo_args(pairs(), &straight, &extra));

    let stopped = dir.path().join("stopped");
    let args: Vec<String> = dpo_args(pairs(), &stopped, &extra).into_iter().map(String::from).collect();
    let child = stage("dpo").args(&args).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while !stopped.join("checkpoints/step-20").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "the run never reached step 20");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(std::process::Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap().success());
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.code(), None, "{}", String::from_utf8_lossy(&result.stderr));
    assert!(!stopped.join("model.safetensors").exists(), "the run finished before it was killed");

    let mut resumed: Vec<&str> = dpo_args(pairs(), &stopped, &extra);
    resumed.retain(|a| *a != "-q");
    resumed.push("--resume");
    let out = ok("dpo", &resumed);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("reference log-probabilities read from"), "the reference was recomputed: {log}");
    assert!(weights(&straight) == weights(&stopped), "resumed weights differ");
    let steps: Vec<u64> = metric_rows(&stopped, "loss").iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>(), "metrics.jsonl holds each step once");
}

fn write_pairs(path: &Path, rows: &[(&str, &str, &str)]) {
    let rows: Vec<PreferenceRecord> = rows
        .iter()
        .map(|(p, c, r)| PreferenceRecord {
            prompt: p.to_string(),
            chosen: c.to_string(),
            rejected: r.to_string(),
            margin: None,
            prompt_id: None,
            chosen_score: None,
            rejected_score: None,
        })
        .collect();
    write_rows(path, &rows);
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    // Empty and identical pairs are counted and left out; with none left, refused.
    let useless = dir.path().join("useless.parquet");
    write_pairs(&useless, &[("Q: hi", "", " no"), ("Q: hi", " same", " same"), ("Q: yo", " ok", "  ")]);
    assert_refused("dpo", &dpo_args(&useless, &out, &[]), "2 with an empty answer, 1 with identical chosen and rejected", dir.path(), &["useless.parquet"]);
    let mixed = dir.path().join("mixed.parquet");
    write_pairs(&mixed, &[("Q: hi", "", " no"), ("Q: hi", " same", " same"), ("Q: yo", " fine", " bad")]);
    let trained = run("dpo", &dpo_args(&mixed, &dir.path().join("mixed"), &["--steps", "1"]));
    assert!(trained.status.success());
    let eval = read_json(&dir.path().join("mixed/eval.json"));
    assert_eq!((eval["data"]["empty"].as_u64(), eval["data"]["identical"].as_u64(), eval["examples"].as_u64()), (Some(1), Some(1), Some(1)));
    std::fs::remove_dir_all(dir.path().join("mixed")).unwrap();

    // KTO rows need their label; unpaired rows need KTO.
    let unlabeled = dir.path().join("unlabeled.parquet");
    write_rows(&unlabeled, &[PromptCompletionRecord { prompt: "Q: hi".into(), completion: " hello".into() }]);
    let kept = ["useless.parquet", "mixed.parquet", "unlabeled.parquet"];
    assert_refused("dpo", &dpo_args(&unlabeled, &out, &["--loss", "kto"]), "no column `label`", dir.path(), &kept);
    assert_refused("dpo", &dpo_args(&testdata("hf-tiny/dpo/kto.parquet"), &out, &[]), "use --loss kto", dir.path(), &kept);

    // A reference of another vocabulary, before any compute.
    let other = dir.path().join("other");
    std::fs::create_dir_all(dir.path().join("tok")).unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(&dir.path().join("tok"), 300);
    ok("pretrain", &[s(&tokens), "--tokenizer", s(&tokenizer), "-o", s(&other), "--steps", "0", "--hidden-size", "32",
                     "--intermediate-size", "64", "--num-hidden-layers", "1", "--num-attention-heads", "2", "--num-key-value-heads", "1", "-q"]);
    let kept = ["useless.parquet", "mixed.parquet", "unlabeled.parquet", "other", "tok"];
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--ref-model", s(&other)]), "its tokenizer differs from the policy's", dir.path(), &kept);
    // The same tokenizer over a model with more embedding rows.
    let wider = dir.path().join("wider");
    copy_folder(Path::new(MODEL), &wider);
    let mut config = read_json(&wider.join("config.json"));
    config["vocab_size"] = serde_json::json!(1024);
    std::fs::write(wider.join("config.json"), config.to_string()).unwrap();
    let kept = ["useless.parquet", "mixed.parquet", "unlabeled.parquet", "other", "tok", "wider"];
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--ref-model", s(&wider)]), "embedding rows", dir.path(), &kept);
    // Settings that do not go together.
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--loss", "ipo", "--label-smoothing", "0.1"]), "--label-smoothing", dir.path(), &kept);
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--loss", "robust", "--label-smoothing", "0.5"]), "[0, 0.5)", dir.path(), &kept);
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--loss", "kto", "--rpo-alpha", "1"]), "--rpo-alpha", dir.path(), &kept);
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--max-prompt-length", "64"]), "--max-prompt-length", dir.path(), &kept);
    assert_refused("dpo", &dpo_args(pairs(), &out, &["--model", s(&testdata("hf-tiny/reward-model"))]), "sequence classifier", dir.path(), &kept);
}
