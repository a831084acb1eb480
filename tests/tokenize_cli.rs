//! The `tokenize` binary as a user runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{files_in, read_texts, s, testdata, write_texts};

use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field};
use lathe::data::records::{ChatRecord, RecordReader, RecordWriter, TextRecord, TokensRecord};

fn bin() -> Command {
    common::stage("tokenize")
}

fn ok(args: &[&str]) -> std::process::Output {
    common::ok("tokenize", args)
}

use lathe::data::{ParquetSource, meta};

/// A tokenizer trained on Shakespeare only, so other corpora hold bytes it never saw.
fn trained_tokenizer(dir: &Path) -> PathBuf {
    let tokenizer = dir.join("tokenizer.json");
    ok(&["train", s(&testdata("pretrain_tinyshakespeare.parquet")), "--vocab-size", "1000", "-o", s(&tokenizer), "-q"]);
    tokenizer
}

fn unusual_texts() -> Vec<String> {
    [
        "emoji 🎉🦀👩‍👩‍👧 and flags 🇯🇵",
        "CJK 漢字かなカナ 한국어 中文标点，。",
        "control \u{0}\u{1}\u{7}\u{1b}[31m bell \t tab \r\n crlf \u{7f} del",
        "literal specials <|endoftext|> <|pad|> <|im_start|>user<|im_end|>",
        "",
        "   leading and trailing spaces   ",
        "\n\n\nnewlines only at start",
        "combining e\u{301} and RTL \u{202e}txet\u{202c} and zero-width \u{200b}joiner",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect()
}

fn assert_round_trip(dir: &Path, tokenizer: &Path, input: &Path) {
    let tokens = dir.join("tokens.parquet");
    let decoded = dir.join("decoded.parquet");
    ok(&["encode", s(input), "--tokenizer", s(tokenizer), "-o", s(&tokens), "-q"]);
    ok(&["decode", s(&tokens), "--tokenizer", s(tokenizer), "-o", s(&decoded), "-q"]);
    let (original, back) = (read_texts(input), read_texts(&decoded));
    assert_eq!(original.len(), back.len(), "{}", input.display());
    for (row, (a, b)) in original.iter().zip(&back).enumerate() {
        assert!(a == b, "{} row {row} changed:\n{a:?}\n{b:?}", input.display());
    }
    let rows = RecordReader::<TokensRecord>::open(&tokens).unwrap().read_all().unwrap();
    assert!(rows.iter().all(|r| r.input_ids.last() == Some(&0) && r.input_ids.iter().all(|&id| id < 1000)));
}

#[test]
fn every_shipped_text_round_trips_exactly_including_unseen_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    for corpus in ["pretrain_tinyshakespeare", "pretrain_c4_sample", "pretrain_wikipedia_sample", "pretrain_tinystories_sample"] {
        assert_round_trip(dir.path(), &tokenizer, &testdata(&format!("{corpus}.parquet")));
    }
    let chats = RecordReader::<ChatRecord>::open(&testdata("sft_alpaca_messages.parquet")).unwrap().read_all().unwrap();
    let contents: Vec<String> = chats.into_iter().flat_map(|c| c.messages).map(|m| m.content).collect();
    let alpaca = dir.path().join("alpaca_text.parquet");
    write_texts(&alpaca, &contents);
    assert_round_trip(dir.path(), &tokenizer, &alpaca);
    let unusual = dir.path().join("unusual.parquet");
    write_texts(&unusual, &unusual_texts());
    assert_round_trip(dir.path(), &tokenizer, &unusual);
}

#[test]
fn literal_special_tokens_in_text_stay_text() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    let input = dir.path().join("in.parquet");
    write_texts(&input, &["a <|endoftext|> b".to_string()]);
    let tokens = dir.path().join("t.parquet");
    ok(&["encode", s(&input), "--tokenizer", s(&tokenizer), "-o", s(&tokens), "--no-eos", "-q"]);
    let ids = &RecordReader::<TokensRecord>::open(&tokens).unwrap().read_all().unwrap()[0].input_ids;
    assert!(ids.iter().all(|&id| id >= 4), "a special id appeared in {ids:?}");
}

#[test]
fn text_files_jsonl_and_carried_ids() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    let txt = dir.path().join("doc.txt");
    std::fs::write(&txt, "First para\nline two\n\nSecond para\n\n\nThird\n").unwrap();
    let out = dir.path().join("p.parquet");
    ok(&["encode", s(&txt), "--paragraphs", "--tokenizer", s(&tokenizer), "-o", s(&out), "-q"]);
    let decoded = dir.path().join("d.parquet");
    ok(&["decode", s(&out), "--tokenizer", s(&tokenizer), "-o", s(&decoded), "-q"]);
    assert_eq!(read_texts(&decoded), vec!["First para\nline two", "Second para", "Third"]);

    let jsonl = dir.path().join("doc.jsonl");
    std::fs::write(&jsonl, "{\"body\": \"one\"}\n{\"body\": \"two 🎉\"}\n").unwrap();
    ok(&["encode", s(&jsonl), "--column", "body", "--tokenizer", s(&tokenizer), "-o", s(&out), "-q"]);
    ok(&["decode", s(&out), "--tokenizer", s(&tokenizer), "-o", s(&decoded), "-q"]);
    assert_eq!(read_texts(&decoded), vec!["one", "two 🎉"]);

    let with_ids = dir.path().join("ids.parquet");
    let mut writer = RecordWriter::<TextRecord>::create(&with_ids, "test", vec![], vec![Field::new("id", DataType::Int64, false)]).unwrap();
    let rows = vec![TextRecord { text: "x".into() }, TextRecord { text: "y".into() }];
    writer.write(&rows, vec![Arc::new(Int64Array::from(vec![41, 42])) as ArrayRef]).unwrap();
    writer.finish().unwrap();
    ok(&["encode", s(&with_ids), "--tokenizer", s(&tokenizer), "-o", s(&out), "-q"]);
    ok(&["decode", s(&out), "--tokenizer", s(&tokenizer), "-o", s(&decoded), "-q"]);
    let source = ParquetSource::open(&decoded).unwrap();
    let batch = source.batches(None, 16).unwrap().next().unwrap().unwrap();
    assert_eq!(batch.i64s("id").unwrap().values().to_vec(), vec![41, 42]);
}

#[test]
fn stages_pipe_through_standard_streams() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    let input = std::fs::File::open(testdata("pretrain_tinystories_sample.parquet")).unwrap();
    let encode = bin()
        .args(["encode", "-", "--tokenizer", s(&tokenizer), "-o", "-", "-q"])
        .stdin(input)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let decoded = dir.path().join("d.parquet");
    let status = bin()
        .args(["decode", "-", "--tokenizer", s(&tokenizer), "-o", s(&decoded), "-q"])
        .stdin(encode.stdout.unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(read_texts(&decoded), read_texts(&testdata("pretrain_tinystories_sample.parquet")));
}

#[test]
fn recipes_supply_flags_and_the_resolved_config_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "vocab_size = 600\nmin_frequency = 3\n").unwrap();
    let tokenizer = dir.path().join("tok.json");
    let input = testdata("pretrain_tinystories_sample.parquet");
    ok(&["train", s(&input), "--config", s(&recipe), "-o", s(&tokenizer), "-q"]);
    let summary: serde_json::Value =
        serde_json::from_slice(&ok(&["inspect", s(&tokenizer), "--json"]).stdout).unwrap();
    assert!(summary["vocab_size"].as_u64().unwrap() <= 600);

    let tokens = dir.path().join("t.parquet");
    ok(&["encode", s(&input), "--tokenizer", s(&tokenizer), "-o", s(&tokens), "-q"]);
    let source = ParquetSource::open(&tokens).unwrap();
    let config = source.meta(meta::CONFIG).unwrap();
    assert!(config.contains("no_eos = false") && config.contains("tokenizer = "), "{config}");
    assert_eq!(source.meta(meta::VOCAB_SIZE).unwrap(), summary["vocab_size"].to_string());
    assert_eq!(source.meta(meta::TOKENIZER_SHA256).unwrap(), summary["sha256"].as_str().unwrap());
    let stats: serde_json::Value = serde_json::from_slice(&ok(&["inspect", s(&tokens), "--json"]).stdout).unwrap();
    assert_eq!(stats["kind"], "tokens");
    assert_eq!(stats["rows"], 3);
    assert!(stats["tokens"]["total"].as_u64().unwrap() > 100);
}

#[test]
fn help_and_version_exit_zero() {
    let out = ok(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["train", "encode", "decode", "inspect"] {
        assert!(text.contains(sub));
    }
    assert!(String::from_utf8_lossy(&ok(&["encode", "--help"]).stdout).contains("Example"));
    assert!(String::from_utf8_lossy(&ok(&["--version"]).stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn sigint_and_sigterm_exit_130_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    // ~40 MB of text on one thread takes seconds to encode: long enough to interrupt.
    let big = dir.path().join("big.txt");
    let text: String = read_texts(&testdata("pretrain_tinyshakespeare.parquet")).join("\n");
    let mut content = String::new();
    while content.len() < 40_000_000 {
        content.push_str(&text);
        content.push('\n');
    }
    std::fs::write(&big, content).unwrap();
    let out = dir.path().join("tokens.parquet");
    for signal in ["-INT", "-TERM"] {
        let child = bin()
            .args(["encode", s(&big), "--tokenizer", s(&tokenizer), "--threads", "1", "-q", "-o", s(&out)])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        let killed = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let result = child.wait_with_output().unwrap();
        assert_eq!(result.status.code(), Some(130), "{signal}: {}", String::from_utf8_lossy(&result.stderr));
        assert_eq!(files_in(dir.path()), vec!["big.txt", "tokenizer.json"], "{signal} left files behind");
    }
}
