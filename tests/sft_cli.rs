//! The `sft` binary on the fixture model: ChatML fallback with embedding growth, exact resume
//! with packing, and refusals.

mod common;

use std::path::Path;

use common::{assert_refused, copy_folder, metric_rows, ok, read_json, s, testdata};
use lathe::data::Message;
use lathe::data::records::{ChatRecord, RecordWriter};

const SMALL: &[&str] = &["--max-length", "96", "--batch-size", "4", "--lr", "2e-3", "--threads", "2", "-q"];

fn sft_args<'a>(data: &'a Path, model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(data), "--model", s(model), "-o", s(out)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

fn write_chats(path: &Path, chats: &[Vec<Message>]) {
    let rows: Vec<ChatRecord> = chats.iter().map(|m| ChatRecord { messages: m.clone() }).collect();
    let mut writer = RecordWriter::<ChatRecord>::create(path, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
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

#[test]
fn bad_inputs_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("hf-tiny/causal-lm");
    let run = dir.path().join("run");

    let no_answers = dir.path().join("questions.parquet");
    write_chats(&no_answers, &[vec![Message::new("user", "Only a question?")], vec![Message::new("user", "Another?")]]);
    assert_refused("sft", &sft_args(&no_answers, &model, &run, &[]), "no row has an assistant turn", dir.path(), &["questions.parquet"]);

    let data = testdata("sft_dolly_messages.slice.parquet");
    assert_refused("sft", &sft_args(&data, &model, &run, &["--max-length", "4096"]), "max_position_embeddings 128", dir.path(), &["questions.parquet"]);
    let text = testdata("pretrain_tinystories_sample.parquet");
    assert_refused("sft", &sft_args(&text, &model, &run, &[]), "expected chat data (`messages`) or `prompt` + `completion`", dir.path(), &["questions.parquet"]);
    let classifier = testdata("hf-tiny/reward-model");
    assert_refused("sft", &sft_args(&data, &classifier, &run, &[]), "sft needs a causal LM", dir.path(), &["questions.parquet"]);
}
