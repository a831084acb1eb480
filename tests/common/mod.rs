//! Helpers the binary tests share: running a stage, checking refusals, test data.
#![allow(dead_code)]

pub mod web;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lathe::data::records::{Record, RecordReader, RecordWriter, ResponseRecord, TextRecord};

pub fn stage(name: &str) -> Command {
    let path = match name {
        "tokenize" => env!("CARGO_BIN_EXE_tokenize"),
        "pretrain" => env!("CARGO_BIN_EXE_pretrain"),
        "generate" => env!("CARGO_BIN_EXE_generate"),
        "sft" => env!("CARGO_BIN_EXE_sft"),
        "rm-train" => env!("CARGO_BIN_EXE_rm-train"),
        "score" => env!("CARGO_BIN_EXE_score"),
        "rank" => env!("CARGO_BIN_EXE_rank"),
        "ppo" => env!("CARGO_BIN_EXE_ppo"),
        "dpo" => env!("CARGO_BIN_EXE_dpo"),
        "redteam" => env!("CARGO_BIN_EXE_redteam"),
        "serve-guard" => env!("CARGO_BIN_EXE_serve-guard"),
        "annotate" => env!("CARGO_BIN_EXE_annotate"),
        "adapter" => env!("CARGO_BIN_EXE_adapter"),
        other => panic!("no stage {other}"),
    };
    Command::new(path)
}

pub fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn run(name: &str, args: &[&str]) -> Output {
    stage(name).args(args).output().expect("the stage runs")
}

pub fn ok(name: &str, args: &[&str]) -> Output {
    let out = run(name, args);
    assert!(out.status.success(), "{name} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Exit 2, exactly one line on stderr mentioning `needle`, and nothing left in `dir` but `keep`.
pub fn assert_refused(name: &str, args: &[&str], needle: &str, dir: &Path, keep: &[&str]) {
    let out = run(name, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {stderr}");
    // Informational lines (`sft: 48 examples …`, `note: …`) may come before the refusal.
    let lines: Vec<&str> = stderr
        .trim_end()
        .lines()
        .filter(|l| l.contains("error") || !(l.starts_with(&format!("{name}: ")) || l.starts_with("note: ") || l.starts_with("warning: ")))
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].starts_with(&format!("{name}: error: ")), "not `{name}: error: …`: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let mut expected: Vec<String> = keep.iter().map(|k| k.to_string()).collect();
    expected.sort();
    assert_eq!(files_in(dir), expected, "{name} {args:?} left files behind");
}

pub fn write_texts(path: &Path, texts: &[String]) {
    let rows: Vec<TextRecord> = texts.iter().map(|t| TextRecord { text: t.clone() }).collect();
    write_rows(path, &rows);
}

/// A Parquet file of typed rows.
pub fn write_rows<R: Record>(path: &Path, rows: &[R]) {
    let mut writer = RecordWriter::<R>::create(path, "test", vec![], vec![]).unwrap();
    writer.write(rows, vec![]).unwrap();
    writer.finish().unwrap();
}

pub fn read_texts(path: &Path) -> Vec<String> {
    RecordReader::<TextRecord>::open(path).unwrap().read_all().unwrap().into_iter().map(|r| r.text).collect()
}

/// A tokenizer trained on Shakespeare and the Shakespeare tokens, in `dir`.
pub fn shakespeare_tokens(dir: &Path, vocab: usize) -> (PathBuf, PathBuf) {
    let tokenizer = dir.join("tokenizer.json");
    let tokens = dir.join("tokens.parquet");
    let text = testdata("pretrain_tinyshakespeare.parquet");
    ok("tokenize", &["train", s(&text), "--vocab-size", &vocab.to_string(), "-o", s(&tokenizer), "-q"]);
    ok("tokenize", &["encode", s(&text), "--tokenizer", s(&tokenizer), "-o", s(&tokens), "-q"]);
    (tokenizer, tokens)
}

/// A copy of a model folder to modify.
pub fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Rows of `metrics.jsonl` that carry `key`.
pub fn metric_rows(run: &Path, key: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get(key).is_some())
        .collect()
}

/// Response `sample` to prompt `p{prompt}`, with made-up text.
pub fn response(prompt: usize, sample: i32) -> ResponseRecord {
    ResponseRecord {
        prompt_id: format!("p{prompt}"),
        prompt: format!("Question {prompt}?"),
        response: format!("Answer {sample} to question {prompt}."),
        sample,
        model: "fixture".into(),
        finish_reason: "stop".into(),
        num_tokens: 5,
        logprob: -1.0,
    }
}
