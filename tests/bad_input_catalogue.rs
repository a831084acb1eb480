//! The catalogue of refused input: every case a stage refuses, with the one line it says.
//!
//! Each case must exit 2 with exactly one line `STAGE: error: …` holding the expected message
//! (informational `note:` lines may come first), never panic, and leave nothing behind: no
//! output file, no 0-byte `.tmp`, no half run folder. Checked before any work starts.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field};
use lathe::data::Message;
use lathe::data::ParquetSource;
use lathe::data::records::{ChatRecord, PreferenceRecord, Prompt, PromptRecord, RecordReader, RecordWriter, ResponseRecord, TextRecord};

use common::{copy_folder, files_in, ok, response, s, shakespeare_tokens, testdata};

/// One refused case in `dir`, which must hold only `keep` afterwards.
#[track_caller]
fn refused(stage: &str, args: &[&str], message: &str, dir: &Path, keep: &[&str]) {
    common::assert_refused(stage, args, message, dir, keep);
}

fn model() -> PathBuf {
    testdata("hf-tiny/causal-lm")
}

fn write_prompts(path: &Path, prompts: &[&str]) {
    let rows: Vec<PromptRecord> = prompts.iter().map(|p| PromptRecord { prompt_id: None, prompt: Prompt::Text(p.to_string()) }).collect();
    let mut writer = RecordWriter::<PromptRecord>::create(path, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
}

fn write_chats(path: &Path, chats: &[Vec<Message>]) {
    let rows: Vec<ChatRecord> = chats.iter().map(|m| ChatRecord { messages: m.clone() }).collect();
    let mut writer = RecordWriter::<ChatRecord>::create(path, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
}

const HUGE: &str = "1000000000000000000";

/// A Shakespeare tokenizer and its tokens in a folder of their own (kept alive by the first
/// value), and the empty folder the refusals run in.
fn shakespeare_workspace() -> (tempfile::TempDir, PathBuf, PathBuf, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(work.path(), 300);
    (work, tokenizer, tokens, tempfile::tempdir().unwrap())
}

// ---- tokenize ----

#[test]
fn tokenize() {
    let (_work, tokenizer, tokens, dir) = shakespeare_workspace();
    let out = dir.path().join("out.parquet");
    let (tok, o) = (s(&tokenizer), s(&out));
    let shakespeare = testdata("pretrain_tinyshakespeare.parquet");
    let sp = s(&shakespeare);
    let t = |args: &[&str], message: &str, keep: &[&str]| refused("tokenize", args, message, dir.path(), keep);

    t(&["encode", "/no/such/file.parquet", "--tokenizer", tok, "-o", o], "/no/such/file.parquet: no such file", &[]);
    let not_parquet = dir.path().join("notes.parquet");
    std::fs::write(&not_parquet, "this is not parquet\n").unwrap();
    t(&["encode", s(&not_parquet), "--tokenizer", tok, "-o", o], "notes.parquet: not a readable Parquet file", &["notes.parquet"]);
    std::fs::remove_file(&not_parquet).unwrap();
    t(&["encode", sp, "--column", "body", "--tokenizer", tok, "-o", o], "no column `body`", &[]);

    let typed = dir.path().join("typed.parquet");
    let mut writer = RecordWriter::<TextRecord>::create(&typed, "test", vec![], vec![Field::new("n", DataType::Int64, false)]).unwrap();
    writer.write(&[TextRecord { text: "x".into() }], vec![Arc::new(Int64Array::from(vec![1])) as ArrayRef]).unwrap();
    writer.finish().unwrap();
    t(&["encode", s(&typed), "--column", "n", "--tokenizer", tok, "-o", o], "column `n`: expected string", &["typed.parquet"]);
    std::fs::remove_file(&typed).unwrap();
    for empty_name in ["empty.parquet", "empty.txt"] {
        let empty = dir.path().join(empty_name);
        std::fs::write(&empty, "").unwrap();
        t(&["encode", s(&empty), "--tokenizer", tok, "-o", o], "empty file", &[empty_name]);
        std::fs::remove_file(&empty).unwrap();
    }
    let corrupt = dir.path().join("corrupt.json");
    let bytes = std::fs::read(&tokenizer).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2 + 1]).unwrap();
    t(&["encode", sp, "--tokenizer", s(&corrupt), "-o", o], "not a valid tokenizer.json", &["corrupt.json"]);
    t(&["inspect", s(&corrupt)], "not a valid tokenizer.json", &["corrupt.json"]);
    std::fs::remove_file(&corrupt).unwrap();

    let other = dir.path().join("other.json");
    ok("tokenize", &["train", s(&testdata("pretrain_c4_sample.parquet")), "--vocab-size", "1000", "-o", s(&other), "-q"]);
    t(&["decode", s(&tokens), "--tokenizer", s(&other), "-o", o], "written with tokenizer sha256", &["other.json"]);
    std::fs::remove_file(&other).unwrap();

    t(&["train", sp, "--vocab-size", "100", "-o", o], "--vocab-size 100: must be at least 260", &[]);
    t(&["train", sp, "--vocab-size", "1000", "-o", "/no/such/dir/tok.json"], "does not exist", &[]);
    t(&["train", sp, "--vocab-size", HUGE, "-o", o], "--vocab-size 1000000000000000000: at most 4294967295 (token ids are 32-bit)", &[]);

    // An output that is an input would replace it.
    let copy = dir.path().join("copy.parquet");
    std::fs::copy(&shakespeare, &copy).unwrap();
    t(&["encode", s(&copy), "--tokenizer", tok, "-o", s(&copy)], "copy.parquet: is also an input", &["copy.parquet"]);
    let tokens_copy = dir.path().join("tokens.parquet");
    std::fs::copy(&tokens, &tokens_copy).unwrap();
    t(&["decode", s(&tokens_copy), "--tokenizer", tok, "-o", s(&tokens_copy)], "tokens.parquet: is also an input", &["copy.parquet", "tokens.parquet"]);
    let alias = dir.path().join("alias.parquet");
    std::fs::hard_link(&copy, &alias).unwrap();
    t(&["encode", s(&copy), "--tokenizer", tok, "-o", s(&alias)], "alias.parquet: is also an input", &["alias.parquet", "copy.parquet", "tokens.parquet"]);
    for name in ["alias.parquet", "copy.parquet", "tokens.parquet"] {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }

    // Recipes: an unknown key, a value the flag cannot take, a value the stage refuses.
    let recipe = dir.path().join("r.toml");
    let with_recipe = |text: &str, message: &str| {
        std::fs::write(&recipe, text).unwrap();
        refused("tokenize", &["train", sp, "--config", s(&recipe), "-o", o], message, dir.path(), &["r.toml"]);
    };
    with_recipe("vocab_size = 600\nvocab_sise = 3\n", "r.toml: unknown key `vocab_sise`");
    with_recipe("vocab_size = \"many\"\n", "r.toml: key `vocab_size`: invalid value 'many' for '--vocab-size <VOCAB_SIZE>': invalid digit found in string");
    with_recipe("vocab_size = 100\n", &format!("--vocab-size 100: must be at least 260 (256 byte tokens + 4 special tokens) (set by `vocab_size` in {})", recipe.display()));
    with_recipe("vocab_size = 600\nmin_frequency = = 2\n", "r.toml: line 2, column 17");
    // clap's own refusals are one line too.
    refused("tokenize", &["train", sp, "--vocab-size", "600", "--no-such-flag", "-o", o], "unexpected argument '--no-such-flag' found", dir.path(), &["r.toml"]);
}

// ---- pretrain ----

#[test]
fn pretrain() {
    let (work, tokenizer, tokens, dir) = shakespeare_workspace();
    let run = dir.path().join("run");
    let tiny = ["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "4", "--seq-len", "32", "--batch-size", "4", "--threads", "2", "-q"];
    let args = |tokens: &Path, tokenizer: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [s(tokens), "--tokenizer", s(tokenizer), "-o", s(&run), "--steps", "5"].iter().map(|a| a.to_string()).collect();
        args.extend(tiny.iter().chain(extra).map(|a| a.to_string()));
        args
    };
    let p = |args: Vec<String>, message: &str, keep: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused("pretrain", &args, message, dir.path(), keep)
    };

    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[model]\nhidden_size = 32\nhiden_layers = 2\n").unwrap();
    p(args(&tokens, &tokenizer, &["--config", s(&recipe)]), "unknown key `model.hiden_layers`", &["r.toml"]);
    std::fs::remove_file(&recipe).unwrap();
    let other = work.path().join("other.json");
    ok("tokenize", &["train", s(&testdata("pretrain_c4_sample.parquet")), "--vocab-size", "300", "-o", s(&other), "-q"]);
    p(args(&tokens, &other, &[]), "written with tokenizer sha256", &[]);
    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, "").unwrap();
    p(args(&empty, &tokenizer, &[]), "empty file", &["empty.parquet"]);
    std::fs::remove_file(&empty).unwrap();
    let no_rows = dir.path().join("none.parquet");
    let source = lathe::data::ParquetSource::open(&tokens).unwrap();
    let mut sink = lathe::data::ParquetSink::create(&no_rows, source.schema().clone(), source.metadata().clone().into_iter().collect()).unwrap();
    sink.write(&arrow::array::RecordBatch::new_empty(source.schema().clone())).unwrap();
    sink.finish().unwrap();
    p(args(&no_rows, &tokenizer, &[]), "empty tokens file", &["none.parquet"]);
    std::fs::remove_file(&no_rows).unwrap();
    p(args(&tokens, &tokenizer, &["--max-position-embeddings", "16"]), "--seq-len 32 is longer than the model's max_position_embeddings 16", &[]);
    let fixture_tokens = work.path().join("fixture_tokens.parquet");
    ok("tokenize", &["encode", s(&testdata("pretrain_tinystories_sample.parquet")), "--tokenizer", s(&model()), "-o", s(&fixture_tokens), "-q"]);
    refused("pretrain", &[s(&fixture_tokens), "--init", s(&model()), "-o", s(&run), "--seq-len", "512", "-q"], "max_position_embeddings 128", dir.path(), &[]);

    // Sizes that would reach the allocator: refused against the data and the memory there is.
    p(args(&tokens, &tokenizer, &["--seq-len", HUGE]), "fewer than one block of --seq-len 1000000000000000000 + 1", &[]);
    p(args(&tokens, &tokenizer, &["--batch-size", HUGE]), "--batch-size 1000000000000000000 × --seq-len 32 with this model shape: needs at least", &[]);
    p(args(&tokens, &tokenizer, &["--hidden-size", "1000000000", "--intermediate-size", "64"]), "needs at least", &[]);
    p(args(&tokens, &tokenizer, &["--warmup-steps", "10"]), "--warmup-steps 10 is longer than the run (--steps 5)", &[]);
    p(args(&tokens, &tokenizer, &["--beta2", "1.5"]), "--beta2 1.5: expected a number in [0, 1)", &[]);
    // Continuing a model into its own folder would overwrite it.
    let base = dir.path().join("base");
    copy_folder(&model(), &base);
    refused("pretrain", &[s(&fixture_tokens), "--init", s(&base), "-o", s(&base), "--seq-len", "32", "-q"], "base: is also an input", dir.path(), &["base"]);
    std::fs::remove_dir_all(&base).unwrap();

    // A run folder that holds a run, or one of another shape.
    ok("pretrain", &args(&tokens, &tokenizer, &["--steps", "3"]).iter().map(String::as_str).collect::<Vec<_>>());
    let mut wider = args(&tokens, &tokenizer, &["--steps", "6", "--resume"]);
    wider.extend(["--hidden-size".to_string(), "64".to_string()]);
    p(wider, "another model shape (hidden_size: 32 → 64)", &["run"]);
    p(args(&tokens, &tokenizer, &["--steps", "6"]), "pass --resume to continue it", &["run"]);
}

// ---- generate ----

#[test]
fn generate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    let prompts = dir.path().join("prompts.parquet");
    write_prompts(&prompts, &["ROMEO:"]);
    let model = model();
    let (p, o, m) = (s(&prompts), s(&out), s(&model));
    let g = |args: &[&str], message: &str, keep: &[&str]| refused("generate", args, message, dir.path(), keep);
    let keep = ["prompts.parquet"];

    g(&[p, "--model", "/no/such/model", "-o", o], "no such model folder", &keep);
    g(&[p, "--model", m, "-n", "0", "-o", o], "-n must be at least 1", &keep);
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, "not parquet").unwrap();
    g(&[s(&bad), "--model", m, "-o", o], "not a readable Parquet file", &["bad.parquet", "prompts.parquet"]);
    std::fs::remove_file(&bad).unwrap();
    let jsonl = dir.path().join("p.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"ok\"}\n{\"question\": \"no prompt here\"}\n").unwrap();
    g(&[s(&jsonl), "--model", m, "-o", o], "p.jsonl: line 2: expected a string `prompt` or a `messages` list", &["p.jsonl", "prompts.parquet"]);
    std::fs::remove_file(&jsonl).unwrap();
    let long = dir.path().join("long.parquet");
    write_prompts(&long, &["ok", &"word ".repeat(200)]);
    g(&[s(&long), "--model", m, "-o", o], "row 1: a prompt of", &["long.parquet", "prompts.parquet"]);
    std::fs::remove_file(&long).unwrap();

    g(&[p, "--model", m, "--temperature", "NaN", "-o", o], "--temperature NaN: expected a finite number >= 0 (0 is greedy)", &keep);
    g(&[p, "--model", m, "--top-p", "NaN", "-o", o], "--top-p NaN: expected a number in (0, 1]", &keep);
    g(&[p, "--model", m, "-n", "1000000000000", "-o", o], "-n 1000000000000: at most 2147483647 (the `sample` column is 32-bit)", &keep);
    g(&[p, "--model", m, "-n", "2000000000", "-o", o], "-n 2000000000 × --batch-size 8 × --max-new-tokens 64: needs at least", &keep);
    g(&[p, "--model", m, "-o", p], "prompts.parquet: is also an input", &keep);
}

// ---- sft, rm-train, ppo ----

#[test]
fn sft() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    let run = dir.path().join("run");
    let args = |data: &Path, model: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [s(data), "--model", s(model), "-o", s(&run), "--max-length", "96", "--batch-size", "4", "--threads", "2", "-q"].iter().map(|a| a.to_string()).collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let f = |args: Vec<String>, message: &str, keep: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused("sft", &args, message, dir.path(), keep)
    };
    let no_answers = dir.path().join("questions.parquet");
    write_chats(&no_answers, &[vec![Message::new("user", "Only a question?")], vec![Message::new("user", "Another?")]]);
    let keep = ["questions.parquet"];
    f(args(&no_answers, &model, &[]), "no row has an assistant turn", &keep);
    let data = testdata("sft_dolly_messages.slice.parquet");
    f(args(&data, &model, &["--max-length", "4096"]), "max_position_embeddings 128", &keep);
    f(args(&testdata("pretrain_tinystories_sample.parquet"), &model, &[]), "expected chat data (`messages`) or `prompt` + `completion`", &keep);
    f(args(&data, &testdata("hf-tiny/reward-model"), &[]), "sft needs a causal LM", &keep);
    f(args(&data, &model, &["--warmup-steps", "2000"]), "--warmup-steps 2000 is longer than the run (--steps 1000)", &keep);
    // Tuning a model into its own folder would overwrite the base model.
    let base = dir.path().join("base");
    copy_folder(&model, &base);
    let mut into_itself = args(&data, &base, &[]);
    let o = into_itself.iter().position(|a| a == "-o").unwrap();
    into_itself[o + 1] = s(&base).to_string();
    f(into_itself, "base: is also an input", &["base", "questions.parquet"]);
}

#[test]
fn rm_train() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    let run = dir.path().join("run");
    let prefs = testdata("pref_hh_rlhf_harmless_base.slice.parquet");
    let args = |data: &Path, model: &Path, out: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [s(data), "--model", s(model), "-o", s(out), "--max-length", "96", "--batch-size", "4", "--threads", "2", "-q"].iter().map(|a| a.to_string()).collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let r = |args: Vec<String>, message: &str, keep: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused("rm-train", &args, message, dir.path(), keep)
    };
    r(args(&prefs, &model, &run, &["--min-accuracy", "0.6"]), "--min-accuracy 0.6 needs held-out data", &[]);
    r(args(&testdata("moderation_openai_samples.slice.parquet"), &model, &run, &[]), "`chosen`", &[]);
    r(args(&prefs, &model, &run, &["--task", "regression"]), "`score`", &[]);
    r(args(&prefs, &model, &run, &["--max-length", "1000"]), "max_position_embeddings 128", &[]);
    r(args(&prefs, &model, &run, &["--min-accuracy", "2", "--val-fraction", "0.2"]), "--min-accuracy 2: expected an accuracy in [0, 1]", &[]);
    r(args(&prefs, &model, &run, &["--batch-size", HUGE]), "--batch-size 1000000000000000000 × --max-length 96: needs at least", &[]);
    let base = dir.path().join("base");
    copy_folder(&model, &base);
    r(args(&prefs, &base, &base, &[]), "base: is also an input", &["base"]);
}

#[test]
fn ppo() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = (0..20).map(|i| serde_json::json!({"prompt": format!("Tell me about the king number {i}.")}).to_string()).collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let policy = model();
    let (p, o, m) = (s(&prompts), s(&out), s(&policy));
    let long = dir.path().join("long.jsonl");
    std::fs::write(&long, format!("{{\"prompt\": \"{}\"}}\n", "word ".repeat(200)).repeat(10)).unwrap();
    let keep = ["long.jsonl", "prompts.jsonl"];
    let r = |args: &[&str], message: &str| refused("ppo", args, message, dir.path(), &keep);
    r(&[s(&long), "--policy", m, "--reward-rule", "length", "-o", o], "row 0: a prompt of");
    r(&[p, "--policy", m, "-o", o, "--reward-model", m], "is not a reward model");
    r(&[p, "--policy", s(&testdata("hf-tiny/reward-model")), "--reward-rule", "length", "-o", o], "must be a causal LM");
    r(&[p, "--policy", m, "--reward-rule", "length", "--algo", "grpo", "-o", o], "-n 2 or more");
    r(&[p, "--policy", m, "--reward-rule", "length", "--minibatches", "3", "-o", o], "do not split");
    r(&[p, "--policy", m, "--reward-rule", "exact", "-o", o], "needs a `reference`");
    // Without a reward: clap's refusal, in one line.
    r(&[p, "--policy", m, "-o", o], "the following required arguments were not provided: --reward-model <MODEL> (see ppo --help)");
    r(&[p, "--policy", m, "--reward-rule", "length", "--kl-coef", "NaN", "-o", o], "--kl-coef NaN: expected a finite number >= 0");
    r(&[p, "--policy", m, "--reward-rule", "length", "--gamma", "2", "-o", o], "--gamma 2: expected a number in [0, 1]");
    r(&[p, "--policy", m, "--reward-rule", "length", "-n", "1000000000000", "-o", o], "--batch-size 8 × -n 1000000000000 × --max-new-tokens 64: needs at least");
    r(&[p, "--policy", m, "--reward-rule", "length", "--updates", "2", "--warmup-steps", "100", "-o", o], "--warmup-steps 100 is longer than the run (8 optimizer steps: --updates 2 × --ppo-epochs 4 × --minibatches 1)");
    r(&[p, "--policy", m, "--reward-rule", "length", "-o", m], "causal-lm: is also an input");
}

// ---- score, rank, redteam ----

#[test]
fn score_rank_redteam() {
    let dir = tempfile::tempdir().unwrap();
    let responses = dir.path().join("responses.parquet");
    ok("generate", &[s(&testdata("demo_prompts.jsonl")), "--model", s(&model()), "-n", "1", "--max-new-tokens", "4", "-o", s(&responses), "-q"]);
    let out = dir.path().join("out.parquet");
    let (r, o) = (s(&responses), s(&out));
    let keep = ["responses.parquet"];
    let t = |stage: &str, args: &[&str], message: &str| refused(stage, args, message, dir.path(), &keep);
    t("score", &[r, "--rule", "exact", "-o", o], "need a `reference` column");
    t("score", &[r, "--rule", "sentiment:1", "-o", o], "unknown rule `sentiment`");
    t("score", &[r, "--reward-model", s(&model()), "-o", o], "is not a reward model");
    t("score", &[r, "--rule", "length", "--batch-size", "0", "-o", o], "--batch-size must be at least 1");
    t("score", &[r, "--rule", "length", "-o", r], "responses.parquet: is also an input");
    t("rank", &[r, "-o", o], "score");
    t("rank", &[r, "-o", r], "responses.parquet: is also an input");

    let model = model();
    let m = s(&model);
    let suite = testdata("../recipes/redteam/default.toml");
    let sf = s(&suite);
    t("redteam", &["--model", m, "--suite", sf, "--max-new-tokens", "0", "-o", o], "--max-new-tokens must be at least 1: an empty answer would count as complying");
    t("redteam", &["--model", m, "--suite", sf, "--batch-size", "0", "-o", o], "--batch-size and --concurrency must be at least 1");
    t("redteam", &["--model", m, "--suite", sf, "--min-answered", "2", "-o", o], "--min-answered 2: expected a fraction in [0, 1]");
    t("redteam", &["--model", m, "--suite", sf, "--temperature", "NaN", "-o", o], "--temperature NaN must be a number >= 0");
    t("redteam", &["--endpoint", "http://127.0.0.1:9/v1", "--timeout", "inf", "-o", o], "--timeout inf: expected a number of seconds > 0");
    t("redteam", &["--model", m, "--suite", sf, "--baseline", r, "-o", r], "responses.parquet: is also an input");
}

// ---- score and rank by hand, redteam suites ----

fn write_responses(path: &Path, rows: &[ResponseRecord]) {
    let mut writer = RecordWriter::<ResponseRecord>::create(path, "test", vec![], vec![]).unwrap();
    writer.write(rows, vec![]).unwrap();
    writer.finish().unwrap();
}

fn write_keys(dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).unwrap();
    path
}

#[test]
fn score_and_rank_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let responses = dir.path().join("responses.parquet");
    let rows: Vec<ResponseRecord> = (0..3).flat_map(|p| (0..3).map(move |s| response(p, s))).collect();
    write_responses(&responses, &rows);
    let out = dir.path().join("out.parquet");
    let o = s(&out);

    // Responses without prompt_id.
    let no_id = dir.path().join("no-id.parquet");
    {
        let source = ParquetSource::open(&responses).unwrap();
        let batch = source.batches(None, 64).unwrap().next().unwrap().unwrap().data;
        let index = batch.schema().index_of("prompt_id").unwrap();
        let mut batch = batch;
        batch.remove_column(index);
        let mut sink = lathe::data::ParquetSink::create(&no_id, batch.schema(), vec![]).unwrap();
        sink.write(&batch).unwrap();
        sink.finish().unwrap();
    }
    let keep = ["no-id.parquet", "responses.parquet"];
    for (name, args) in [
        ("score", vec![s(&no_id), "--human", "--annotator", "ana", "-o", o]),
        ("score", vec![s(&no_id), "--rule", "length", "-o", o]),
        ("rank", vec![s(&no_id), "--human", "--annotator", "ana", "-o", o]),
    ] {
        refused(name, &args, "no column `prompt_id`", dir.path(), &keep);
    }

    // Two responses sharing prompt_id and sample.
    let twice = dir.path().join("twice.parquet");
    write_responses(&twice, &[response(0, 0), response(0, 1), response(0, 0)]);
    let keep = ["no-id.parquet", "responses.parquet", "twice.parquet"];
    refused("score", &[s(&twice), "--human", "--annotator", "ana", "-o", o], "row 2: prompt_id `p0` sample 0 again (first at row 0)", dir.path(), &keep);

    // Usage: a backwards scale, a journal with nowhere to go, no mode, one file to merge.
    refused("score", &[s(&responses), "--human", "--scale", "7-1", "-o", o], "--scale 7-1: expected LOW-HIGH", dir.path(), &keep);
    refused("score", &[s(&responses), "--human", "--annotator", "ana", "-o", "-"], "give --journal FILE", dir.path(), &keep);
    refused("score", &[s(&responses), "-o", o], "give one of --reward-model, --rule, --human, --import or --merge", dir.path(), &keep);
    for args in [
        vec![s(&responses), "--import", s(&responses), "--human", "-o", o],
        vec!["--merge", s(&responses), "-o", o],
        vec![s(&responses), "--rule", "length", "--keys", "keys.txt", "-o", o],
    ] {
        let clap_refusal = common::run("score", &args);
        assert_eq!(clap_refusal.status.code(), Some(2), "{}", String::from_utf8_lossy(&clap_refusal.stderr));
        assert_eq!(files_in(dir.path()), keep);
    }

    // Scores that are all null (every response skipped) cannot be ranked; some null are left out.
    let skipped = dir.path().join("skipped.parquet");
    let keys = write_keys(dir.path(), "skip.txt", &["s"; 9]);
    ok("score", &[s(&responses), "--human", "--annotator", "ana", "--keys", s(&keys), "-o", s(&skipped), "-q"]);
    let keep = [&keep[..], &["skip.txt", "skipped.parquet", "skipped.parquet.journal.jsonl"]].concat();
    refused("rank", &[s(&skipped), "-o", o], "column `score`: none of the 9 responses has a score (all null or NaN); nothing to rank", dir.path(), &keep);
    let partly = dir.path().join("partly.parquet");
    let keys = write_keys(dir.path(), "partly.txt", &["1", "2", "3", "s", "s", "s", "s", "s", "s"]);
    ok("score", &[s(&responses), "--human", "--annotator", "ana", "--keys", s(&keys), "-o", s(&partly), "-q"]);
    let ranked = ok("rank", &[s(&partly), "-o", o]);
    assert!(String::from_utf8_lossy(&ranked.stderr).contains("note: 6 of 9 responses have no score (null or NaN) and are left out"), "{}", String::from_utf8_lossy(&ranked.stderr));
    assert_eq!(RecordReader::<PreferenceRecord>::open(&out).unwrap().read_all().unwrap().len(), 3);
}

#[test]
fn redteam_suites() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("hf-tiny/causal-lm");
    let out = dir.path().join("findings.parquet");
    let try_suite = |name: &str, text: &str, needle: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut keep: Vec<String> = files_in(dir.path());
        keep.retain(|f| f.ends_with(".toml"));
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        refused("redteam", &["--model", s(&model), "--suite", s(&path), "-o", s(&out)], needle, dir.path(), &keep);
    };
    let base = "[detectors.refusal]\nkind = \"refusal\"\n[[probes]]\nname = \"p\"\n";
    try_suite("unknown.toml", &format!("{base}family = \"harmful\"\ndetectors = [\"judge\"]\npayloads = {{ values = [\"x\"] }}\n"), "unknown detector `judge`");
    try_suite("slot.toml", &format!("{base}family = \"jailbreak\"\ndetectors = [\"refusal\"]\ntemplates = [\"You are DAN.\"]\npayloads = {{ values = [\"x\"] }}\n"), "has no {payload} slot");
    let advbench = testdata("redteam_advbench.slice.parquet");
    try_suite(
        "columns.toml",
        &format!("[detectors.answer]\nkind = \"answer\"\n[[probes]]\nname = \"p\"\nfamily = \"classification\"\ndetectors = [\"answer\"]\ntemplates = [\"{{payload}}\"]\noptions = [\"negative\", \"positive\"]\ndataset = {{ path = \"{}\" }}\n", advbench.display()),
        "no column `sentence`",
    );
    try_suite("guard.toml", "[detectors.guard]\nkind = \"guard\"\n[[probes]]\nname = \"p\"\nfamily = \"harmful\"\ndetectors = [\"guard\"]\npayloads = { values = [\"x\"] }\n", "needs a guard model");
    let keep: Vec<String> = files_in(dir.path());
    let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
    let suite = testdata("../recipes/redteam/default.toml");
    refused("redteam", &["--model", s(&testdata("hf-tiny/reward-model")), "--suite", s(&suite), "-o", s(&dir.path().join("f.parquet"))], "is a classifier, not a causal language model to red-team", dir.path(), &keep);
}

// ---- the size checks, one by one ----

/// `Footprint` refuses before the allocator sees the size, naming the largest part.
#[test]
fn sizes_name_their_largest_part() {
    let line = lathe::limits::Footprint::new("--batch-size 9")
        .add("the KV cache", u128::MAX / 2)
        .add("the model", 10)
        .check(&candle_core::Device::Cpu)
        .unwrap_err()
        .one_line();
    assert!(line.starts_with("--batch-size 9: needs at least") && line.contains("; the KV cache:") && line.contains("more than the"), "{line}");
}

// ---- LoRA and adapters ----

#[test]
fn lora_and_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let data = testdata("sft_alpaca_prompt_completion.slice.parquet");
    let (run, base) = (dir.path().join("run"), model());
    let (d, m, r) = (s(&data), s(&base), s(&run));
    refused("sft", &[d, "--model", m, "--lora-r", "4", "--lora-target", "query", "-o", r],
            "--lora-target query: matches no module of this llama model", dir.path(), &[]);
    refused("sft", &[d, "--model", m, "--lora-alpha", "16", "-o", r], "--lora-alpha needs --lora-r above 0", dir.path(), &[]);
    refused("sft", &[d, "--model", m, "--lora-r", "4", "--lora-dropout", "1", "-o", r], "--lora-dropout 1: expected a number in [0, 1)", dir.path(), &[]);
    let adapter = testdata("peft/causal-adapter");
    refused("sft", &[d, "--model", s(&adapter), "--lora-r", "4", "-o", r], "is a LoRA adapter, which trains on as it is", dir.path(), &[]);
    // An adapter whose shapes do not fit the base it is given.
    let qwen = testdata("families/qwen2/causal-lm");
    refused("generate", &[s(&testdata("demo_prompts.jsonl")), "--model", s(&adapter), "--base", s(&qwen), "-o", s(&dir.path().join("o.parquet"))],
            "has shape [4, 64], the base model implies [4, 32]", dir.path(), &[]);
    // An adapter whose base cannot be found.
    let moved = dir.path().join("moved");
    copy_folder(&adapter, &moved);
    refused("generate", &[s(&testdata("demo_prompts.jsonl")), "--model", s(&moved), "-o", s(&dir.path().join("o.parquet"))],
            "its base `../../hf-tiny/causal-lm` cannot be opened", dir.path(), &["moved"]);
    refused("adapter", &["merge", s(&model()), "-o", s(&dir.path().join("m"))], "is not a LoRA adapter folder", dir.path(), &["moved"]);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(moved.join("adapter_config.json")).unwrap()).unwrap();
    config["use_dora"] = serde_json::json!(true);
    config["base_model_name_or_path"] = serde_json::json!(s(&model()));
    std::fs::write(moved.join("adapter_config.json"), config.to_string()).unwrap();
    refused("adapter", &["inspect", s(&moved)], "key `use_dora` = true: not supported by lathe", dir.path(), &["moved"]);
}
