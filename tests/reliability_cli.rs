//! What a careless user, a full disk or a kill does to a stage: signals with stderr closed,
//! the modes of written models, what `kill -9` leaves behind and `--resume` cleans, a full
//! disk and a closed pipe named once, SIGTERM inside a long gradient accumulation, and the
//! `lathe.*` metadata where pyarrow, pandas and polars read it.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{files_in, ok, s, shakespeare_tokens, stage, testdata};

const TINY: &[&str] = &[
    "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "1", "--num-attention-heads", "4",
    "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--threads", "1", "-q",
];

fn pretrain_args<'a>(tokens: &'a Path, tokenizer: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![s(tokens), "--tokenizer", s(tokenizer), "-o", s(out)];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

fn signal(child: &Child, name: &str) {
    assert!(Command::new("kill").args([name, &child.id().to_string()]).status().unwrap().success());
}

/// The exit of `child` within `limit`, else kill it and fail.
fn exit_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let started = Instant::now();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what}: still running {limit:?} after the signal");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// A command run with this umask.
fn with_umask(umask: &str, program: &str, args: &[&str]) -> Output {
    let mut script = format!("umask {umask}; exec \"$0\"");
    for i in 1..=args.len() {
        script += &format!(" \"${{{i}}}\"");
    }
    let out = Command::new("sh").arg("-c").arg(script).arg(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn sigterm_stops_generate_with_stderr_closed_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Once upon a time\"}\n".repeat(50)).unwrap();
    let out = dir.path().join("out.parquet");
    let mut child = stage("generate")
        .args([s(&prompts), "--model", s(&testdata("hf-tiny/causal-lm")), "-n", "64", "--max-new-tokens", "100", "--ignore-eos", "--threads", "1"])
        .args(["-o", s(&out)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, "-TERM");
    let result = exit_within(child, Duration::from_secs(10), "generate");
    assert_eq!(result.status.code(), Some(130), "{:?}", result.status);
    assert_eq!(files_in(dir.path()), vec!["prompts.jsonl"], "no output and no temporary file");
}

/// Model and optimizer files get the mode every other output gets (0666 less the umask), not
/// a temporary file's owner-only 0600, so other users and services can load them.
#[test]
fn trained_models_are_written_with_the_umask_like_other_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(dir.path(), 300);
    for (umask, expected) in [("022", 0o644), ("002", 0o664)] {
        let run = dir.path().join(format!("run-{umask}"));
        with_umask(umask, env!("CARGO_BIN_EXE_pretrain"), &pretrain_args(&tokens, &tokenizer, &run, &["--steps", "2"]));
        for file in ["model.safetensors", "config.json", "checkpoints/step-2/model.safetensors", "checkpoints/step-2/optimizer.safetensors", "checkpoints/step-2/trainer_state.json"] {
            assert_eq!(mode(&run.join(file)), expected, "umask {umask}: {file}");
        }
    }
}

/// `kill -9` during the final write leaves a full-size hidden temporary model; during
/// checkpoint rotation a half-deleted `step-N/`. `--resume` removes both and resumes from
/// the newest complete checkpoint.
#[test]
fn resume_cleans_what_a_kill_left_and_skips_incomplete_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(dir.path(), 300);
    let run = dir.path().join("run");
    ok("pretrain", &pretrain_args(&tokens, &tokenizer, &run, &["--steps", "2", "--checkpoint-every", "1"]));
    let weights = std::fs::read(run.join("model.safetensors")).unwrap();
    // What the kills left: our temporary output, the safetensors crate's, a half-deleted step.
    std::fs::write(run.join(".model.safetensors.a1b2c3.tmp"), &weights).unwrap();
    std::fs::write(run.join(".tmpX7kq2z"), &weights).unwrap();
    let half = run.join("checkpoints/step-9");
    std::fs::create_dir_all(&half).unwrap();
    let state = std::fs::read_to_string(run.join("checkpoints/step-2/trainer_state.json")).unwrap();
    std::fs::write(half.join("trainer_state.json"), state.replace("\"step\": 2", "\"step\": 9")).unwrap();

    let resumed = ok("pretrain", &pretrain_args(&tokens, &tokenizer, &run, &["--steps", "3", "--checkpoint-every", "1", "--resume"]));
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    let names = files_in(&run);
    assert!(!names.iter().any(|n| n.ends_with(".tmp") || n.starts_with(".tmp")), "leftovers removed: {names:?} {stderr}");
    assert_eq!(files_in(&run.join("checkpoints")), vec!["step-2", "step-3"], "the incomplete step-9 is gone, not resumed from");
    let eval = common::read_json(&run.join("eval.json"));
    assert_eq!(eval["step"], 3);
}

/// A full disk (here: the file-size limit) is one line naming the file and its cause once,
/// and leaves no temporary file; so is a standard output whose reader went away.
#[test]
fn a_failed_write_names_the_file_and_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, _) = shakespeare_tokens(dir.path(), 300);
    let text = testdata("pretrain_tinyshakespeare.parquet");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("tokens.parquet");
    // SIGXFSZ ignored, as a shell script or service manager may leave it: writes fail EFBIG.
    let script = "trap '' XFSZ; ulimit -f 128; exec \"$0\" \"$@\"";
    let full = Command::new("sh")
        .args(["-c", script, env!("CARGO_BIN_EXE_tokenize"), "encode", s(&text), "--tokenizer", s(&tokenizer), "-o", s(&out), "-q"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("{}: cannot write: File too large (os error 27)", out.display())), "{stderr}");
    assert_eq!(stderr.matches("File too large").count(), 1, "the cause once: {stderr}");
    assert!(files_in(&out_dir).is_empty(), "no temporary file left: {:?}", files_in(&out_dir));

    let mut piped = stage("tokenize")
        .args(["encode", s(&text), "--tokenizer", s(&tokenizer), "-o", "-", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    piped.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(piped.stdout.take());
    let result = exit_within(piped, Duration::from_secs(30), "tokenize encode -o -");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim(), "tokenize: error: standard output: cannot write: Broken pipe (os error 32)");
}

/// SIGTERM inside a step of many micro-batches stops at the next micro-batch, not the step's
/// end; the step is abandoned with the data where it began, so resuming ends where an
/// uninterrupted run does, byte for byte.
#[test]
fn sigterm_is_honoured_inside_a_long_gradient_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let (tokenizer, tokens) = shakespeare_tokens(dir.path(), 300);
    let endless = dir.path().join("endless");
    let child = stage("pretrain").args(pretrain_args(&tokens, &tokenizer, &endless, &["--steps", "1", "--grad-accum", "1000000"])).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    signal(&child, "-TERM");
    let stopped = exit_within(child, Duration::from_secs(10), "pretrain inside its accumulation");
    assert_eq!(stopped.status.code(), Some(130));
    assert_eq!(files_in(&endless.join("checkpoints")), vec!["step-0"]);

    // Exact resume across an abandoned step: signals at a few moments of a 3-step run.
    let accum = ["--steps", "3", "--grad-accum", "2000", "--checkpoint-every", "0"];
    let straight = dir.path().join("straight");
    let started = Instant::now();
    ok("pretrain", &pretrain_args(&tokens, &tokenizer, &straight, &accum));
    let straight_seconds = started.elapsed();
    let sigterm_run = |name: &str, after: Duration| -> PathBuf {
        let run = dir.path().join(name);
        let child = stage("pretrain").args(pretrain_args(&tokens, &tokenizer, &run, &accum)).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(after);
        signal(&child, "-TERM");
        let stopped = exit_within(child, Duration::from_secs(30), "pretrain");
        if stopped.status.code() == Some(130) {
            let mut resume = accum.to_vec();
            resume.push("--resume");
            ok("pretrain", &pretrain_args(&tokens, &tokenizer, &run, &resume));
        }
        run
    };
    for (i, fraction) in [0.35, 0.7].iter().enumerate() {
        let run = sigterm_run(&format!("stopped-{i}"), straight_seconds.mul_f64(*fraction).max(Duration::from_millis(300)));
        assert!(std::fs::read(run.join("model.safetensors")).unwrap() == std::fs::read(straight.join("model.safetensors")).unwrap(), "stopped at {fraction}: resumed weights differ");
    }
}

/// `lathe.*` metadata is also in the Arrow schema stored in the file, where pyarrow's
/// `read_table(f).schema.metadata` (and pandas, polars, DuckDB) find it.
#[test]
fn lathe_metadata_is_in_the_stored_arrow_schema() {
    use parquet::file::reader::FileReader;
    let dir = tempfile::tempdir().unwrap();
    let (_, tokens) = shakespeare_tokens(dir.path(), 300);
    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&tokens).unwrap()).unwrap();
    let file = reader.metadata().file_metadata();
    let stored: Vec<_> = file.key_value_metadata().unwrap().iter().filter(|kv| kv.key == "ARROW:schema").cloned().collect();
    assert_eq!(stored.len(), 1, "the writer stores its Arrow schema");
    // Read back from that schema alone, without the footer's other key-value pairs.
    let schema = parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), Some(&stored)).unwrap();
    assert_eq!(schema.metadata().get("lathe.schema").map(String::as_str), Some("tokens/1"), "{:?}", schema.metadata());
    assert!(schema.metadata().contains_key("lathe.writer") && schema.metadata().contains_key("lathe.tokenizer_sha256"));
}
