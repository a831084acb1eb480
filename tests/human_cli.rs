//! People in the loop, through the binaries: `score --human` and `rank --human` driven by
//! scripted answers (a keys file, a pipe) and stopped every way a session can stop (quit, the
//! end of the answers, SIGKILL), `score --import`, `score --merge` with agreement, the
//! `guard:` rule (refusals: bad_input_catalogue.rs).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, AsArray, StringArray};
use arrow::datatypes::{DataType, Field};
use common::{assert_refused, files_in, ok, response, run, s, stage, testdata};
use lathe::data::ParquetSource;
use lathe::data::records::{PreferenceRecord, RecordReader, RecordWriter, ResponseRecord};
use lathe::human::agreement::agreement;

const PROMPTS: usize = 3;
const SAMPLES: i32 = 3;

/// Three prompts with three responses each, and a `note` column to carry through.
fn write_responses(path: &Path, rows: &[ResponseRecord]) {
    let notes: ArrayRef = Arc::new(StringArray::from_iter_values((0..rows.len()).map(|i| format!("note {i}"))));
    let mut writer = RecordWriter::<ResponseRecord>::create(path, "test", vec![], vec![Field::new("note", DataType::Utf8, false)]).unwrap();
    writer.write(rows, vec![notes]).unwrap();
    writer.finish().unwrap();
}

fn fixture(dir: &Path) -> PathBuf {
    let path = dir.join("responses.parquet");
    let rows: Vec<ResponseRecord> = (0..PROMPTS).flat_map(|p| (0..SAMPLES).map(move |s| response(p, s))).collect();
    write_responses(&path, &rows);
    path
}

fn write_keys(dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).unwrap();
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run a stage with `input` on its standard input.
fn run_with_stdin(name: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = stage(name).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn floats(path: &Path, column: &str) -> Vec<Option<f64>> {
    let source = ParquetSource::open(path).unwrap();
    let mut out = Vec::new();
    for batch in source.batches(Some(&[column]), 1024).unwrap() {
        let values = batch.unwrap().optional_f64s(column).unwrap();
        out.extend(values.iter());
    }
    out
}

fn strings(path: &Path, column: &str) -> Vec<Option<String>> {
    let source = ParquetSource::open(path).unwrap();
    let mut out = Vec::new();
    for batch in source.batches(Some(&[column]), 1024).unwrap() {
        let values = batch.unwrap().optional_strings(column).unwrap();
        out.extend(values.iter().map(|v| v.map(str::to_string)));
    }
    out
}

/// Decisions (answers, skips, undos) in a journal so far.
fn decisions_in(journal: &Path) -> usize {
    std::fs::read_to_string(journal).unwrap_or_default().lines().filter(|l| !l.contains("\"event\":\"session\"")).count()
}

fn wait_for_decisions(child: &mut Child, journal: &Path, n: usize) {
    let start = Instant::now();
    while decisions_in(journal) < n {
        assert!(child.try_wait().unwrap().is_none(), "the session ended early");
        assert!(start.elapsed() < Duration::from_secs(60), "the journal never showed {n} decisions");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn score_human_survives_sigkill_and_resumes_with_nothing_lost_or_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let responses = fixture(dir.path());
    let out = dir.path().join("ana.parquet");
    let journal = dir.path().join("ana.parquet.journal.jsonl");
    let args = [s(&responses), "--human", "--annotator", "ana", "-o", s(&out)];

    // A person answers through a pipe; the process is killed while waiting for the 6th line.
    let mut child = stage("score").args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (line, decided) in [("5", 1), ("3", 2), ("s", 3), ("u", 4), ("6", 5)] {
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        wait_for_decisions(&mut child, &journal, decided);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists());
    assert_eq!(files_in(dir.path()), ["ana.parquet.journal.jsonl", "responses.parquet"], "nothing half-written");

    // The same command continues at the 4th response; `u` first takes back the 3rd (6) across
    // the restart, which is then answered 2.
    let keys = write_keys(dir.path(), "keys.txt", &["u", "2", "7", "1", "s", "4", "4", "5"]);
    let done = ok("score", &[&args[..], &["--keys", s(&keys)]].concat());
    assert!(stderr(&done).contains("continuing"), "{}", stderr(&done));
    assert!(stderr(&done).contains("8 scored, 1 skipped"), "{}", stderr(&done));
    assert!(stderr(&done).contains("response 4 of 9"), "the resumed session starts after the journaled answers");

    assert_eq!(floats(&out, "score"), [Some(5.), Some(3.), Some(2.), Some(7.), Some(1.), None, Some(4.), Some(4.), Some(5.)]);
    assert_eq!(strings(&out, "annotator"), vec![Some("ana".to_string()); 9]);
    assert_eq!(strings(&out, "scorer"), vec![Some("human:ana".to_string()); 9]);
    let notes: Vec<Option<String>> = (0..9).map(|i| Some(format!("note {i}"))).collect();
    assert_eq!(strings(&out, "note"), notes, "other columns are carried");
    let rows = RecordReader::<ResponseRecord>::open(&out).unwrap().read_all().unwrap();
    let expected: Vec<ResponseRecord> = (0..PROMPTS).flat_map(|p| (0..SAMPLES).map(move |s| response(p, s))).collect();
    assert_eq!(rows, expected, "every response once, in order");

    // Running it again with every response decided writes the same file without asking.
    std::fs::remove_file(&out).unwrap();
    ok("score", &[&args[..], &["--keys", "/dev/null"]].concat());
    assert_eq!(floats(&out, "score")[2], Some(2.));
}

#[test]
fn quitting_keeps_the_journal_and_the_same_command_continues() {
    let dir = tempfile::tempdir().unwrap();
    let responses = fixture(dir.path());
    let out = dir.path().join("scored.parquet");
    let args = [s(&responses), "--human", "--annotator", "bo", "--scale", "1-5", "-o", s(&out)];

    let quit = run_with_stdin("score", &args, b"4\nq\n");
    assert_eq!(quit.status.code(), Some(130), "{}", stderr(&quit));
    assert!(stderr(&quit).contains("1 of 9 responses decided (1 answered, 0 skipped)"), "{}", stderr(&quit));
    assert!(stderr(&quit).contains("run the same command again to continue"));
    assert!(stderr(&quit).contains("score 1-5"), "the screen asks on the chosen scale");
    assert!(!out.exists());

    // The end of the answers stops the same way.
    let ended = run_with_stdin("score", &args, b"5\n");
    assert_eq!(ended.status.code(), Some(130));
    assert!(stderr(&ended).contains("2 of 9 responses decided"), "{}", stderr(&ended));

    // A score off the scale in a script is refused; what came before it is kept.
    let keys = write_keys(dir.path(), "bad.txt", &["1", "6"]);
    let refused = run("score", &[&args[..], &["--keys", s(&keys), "-q"]].concat());
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("bad.txt: line 2: `6`: expected a whole number from 1 to 5"), "{}", stderr(&refused));

    // Another annotator, or another scale, cannot continue bo's journal.
    let other = [s(&responses), "--human", "--annotator", "cy", "--scale", "1-5", "-o", s(&out)];
    let journal = "scored.parquet.journal.jsonl";
    assert_refused("score", &other, "this journal is bo's, not cy's", dir.path(), &["bad.txt", journal, "responses.parquet"]);
    let other = [s(&responses), "--human", "--annotator", "bo", "-o", s(&out)];
    assert_refused("score", &other, "started with --scale 1-5, not 1-7", dir.path(), &["bad.txt", journal, "responses.parquet"]);

    let rest = run_with_stdin("score", &args, b"2\n2\n2\n2\n2\n2\n");
    assert!(rest.status.success(), "{}", stderr(&rest));
    assert_eq!(floats(&out, "score"), [Some(4.), Some(5.), Some(1.), Some(2.), Some(2.), Some(2.), Some(2.), Some(2.), Some(2.)]);

    // Responses regenerated under the same prompt_id and sample are not the ones bo scored.
    let changed = dir.path().join("changed.parquet");
    let mut rows: Vec<ResponseRecord> = (0..PROMPTS).flat_map(|p| (0..SAMPLES).map(move |s| response(p, s))).collect();
    rows[0].response = "A regenerated answer.".into();
    write_responses(&changed, &rows);
    let args = [s(&changed), "--human", "--annotator", "bo", "--scale", "1-5", "-o", s(&out)];
    let keep = ["bad.txt", "changed.parquet", journal, "responses.parquet", "scored.parquet"];
    assert_refused("score", &args, "the text of response p0/0 is not the text that was judged; this journal belongs to other data", dir.path(), &keep);
}

#[test]
fn rank_human_orders_become_preference_pairs_and_resume_with_undo() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<ResponseRecord> = (0..PROMPTS).flat_map(|p| (0..SAMPLES).map(move |s| response(p, s))).collect();
    rows.push(response(7, 0)); // a prompt with one response: nothing to order
    let responses = dir.path().join("responses.parquet");
    write_responses(&responses, &rows);
    let prefs = dir.path().join("prefs.parquet");
    let args = [s(&responses), "--human", "--annotator", "ana", "-o", s(&prefs)];

    // p0: C, A, B. p1: skipped, the skip undone, then B, C, A; then quit.
    let first = write_keys(dir.path(), "first.txt", &["CAB", "s", "u", "b > c > a", "q"]);
    let quit = run("rank", &[&args[..], &["--keys", s(&first)]].concat());
    assert_eq!(quit.status.code(), Some(130), "{}", stderr(&quit));
    assert!(stderr(&quit).contains("2 of 3 prompts decided"), "{}", stderr(&quit));
    assert!(stderr(&quit).contains("A (sample 0)\nAnswer 0 to question 0."), "responses are shown by letter");

    // Undo across the restart takes back p1's order; p1 becomes A, C, B and p2 is skipped.
    let second = write_keys(dir.path(), "second.txt", &["u", "ACB", "s"]);
    let done = ok("rank", &[&args[..], &["--keys", s(&second)]].concat());
    assert!(stderr(&done).contains("2 ordered, 1 skipped"), "{}", stderr(&done));
    assert!(stderr(&done).contains("single-response prompts 1"), "{}", stderr(&done));

    let pairs = RecordReader::<PreferenceRecord>::open(&prefs).unwrap().read_all().unwrap();
    let got: Vec<(String, String, String, f64)> = pairs
        .iter()
        .map(|p| (p.prompt_id.clone().unwrap(), p.chosen.clone(), p.rejected.clone(), p.margin.unwrap()))
        .collect();
    let a = |p: usize, s: i32| format!("Answer {s} to question {p}.");
    let expected = vec![
        ("p0".to_string(), a(0, 2), a(0, 0), 1.0),
        ("p0".to_string(), a(0, 2), a(0, 1), 2.0),
        ("p0".to_string(), a(0, 0), a(0, 1), 1.0),
        ("p1".to_string(), a(1, 0), a(1, 2), 1.0),
        ("p1".to_string(), a(1, 0), a(1, 1), 2.0),
        ("p1".to_string(), a(1, 2), a(1, 1), 1.0),
    ];
    assert_eq!(got, expected);
    assert!(pairs.iter().all(|p| p.chosen_score.unwrap() - p.rejected_score.unwrap() == p.margin.unwrap()));
    assert_eq!((pairs[1].chosen_score, pairs[1].rejected_score), (Some(2.0), Some(0.0)), "score = k − position");

    // The same answers give other pairs under --pairs, without asking again.
    let best_worst = dir.path().join("best-worst.parquet");
    let journal = dir.path().join("prefs.parquet.journal.jsonl");
    let args = [s(&responses), "--human", "--annotator", "ana", "--journal", s(&journal), "--pairs", "best-worst", "-o", s(&best_worst)];
    ok("rank", &[&args[..], &["--keys", "/dev/null"]].concat());
    let pairs = RecordReader::<PreferenceRecord>::open(&best_worst).unwrap().read_all().unwrap();
    let got: Vec<(String, String, f64)> = pairs.iter().map(|p| (p.chosen.clone(), p.rejected.clone(), p.margin.unwrap())).collect();
    assert_eq!(got, vec![(a(0, 2), a(0, 1), 2.0), (a(1, 0), a(1, 1), 2.0)]);
}

#[test]
fn imported_ratings_are_joined_and_the_unmatched_reported() {
    let dir = tempfile::tempdir().unwrap();
    let responses = fixture(dir.path());
    let csv = dir.path().join("ratings.csv");
    std::fs::write(
        &csv,
        "prompt_id,sample,rating,annotator\np0,0,4,ana\np0,1,2.5,ana\np0,2,,ana\np1,0,5,bo\np1,1,1,bo\np9,0,3,bo\np9,1,3,bo\np2,2,6,\n",
    )
    .unwrap();
    let out = dir.path().join("rated.parquet");
    let done = ok("score", &[s(&responses), "--import", s(&csv), "--column", "rating", "-o", s(&out)]);
    let log = stderr(&done);
    assert!(log.contains("2 ratings match no response and are left out: p9/0, p9/1"), "{log}");
    assert!(log.contains("4 responses have no rating (null rating): p0/2, p1/2, p2/0, p2/1"), "{log}");
    let expected = [Some(4.), Some(2.5), None, Some(5.), Some(1.), None, None, None, Some(6.)];
    assert_eq!(floats(&out, "rating"), expected);
    let annotators = strings(&out, "annotator");
    assert_eq!(annotators[0].as_deref(), Some("ana"));
    assert_eq!(annotators[3].as_deref(), Some("bo"));
    assert_eq!(annotators[8], None);
    assert_eq!(strings(&out, "scorer")[8].as_deref(), Some("import:ratings.csv"));

    // The same ratings as JSON lines and as Parquet give the same scores.
    let jsonl = dir.path().join("ratings.jsonl");
    let lines = [
        r#"{"prompt_id": "p0", "sample": 0, "rating": 4, "annotator": "ana"}"#,
        r#"{"prompt_id": "p0", "sample": 1, "rating": 2.5, "annotator": "ana"}"#,
        r#"{"prompt_id": "p1", "sample": 0, "rating": 5}"#,
        r#"{"prompt_id": "p1", "sample": 1, "rating": 1}"#,
        r#"{"prompt_id": "p2", "sample": 2, "rating": 6, "comment": "long"}"#,
    ];
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let from_jsonl = dir.path().join("from-jsonl.parquet");
    ok("score", &[s(&responses), "--import", s(&jsonl), "--column", "rating", "-o", s(&from_jsonl), "-q"]);
    assert_eq!(floats(&from_jsonl, "rating"), expected);
    let from_parquet = dir.path().join("from-parquet.parquet");
    ok("score", &[s(&out), "--import", s(&out), "--column", "rating", "-o", s(&from_parquet), "-q"]);
    assert_eq!(floats(&from_parquet, "rating"), expected);

    // A second rating of one response, and ratings of other responses altogether, are refused.
    let twice = dir.path().join("twice.csv");
    std::fs::write(&twice, "prompt_id,sample,score\np0,0,1\np0,1,2\np0,0,3\n").unwrap();
    let keep = ["from-jsonl.parquet", "from-parquet.parquet", "rated.parquet", "ratings.csv", "ratings.jsonl", "responses.parquet", "twice.csv"];
    assert_refused("score", &[s(&responses), "--import", s(&twice), "-o", s(&dir.path().join("x.parquet"))], "row 2: a second rating of prompt_id `p0` sample 0 (the first is at row 0)", dir.path(), &keep);
    let elsewhere = dir.path().join("elsewhere.csv");
    std::fs::write(&elsewhere, "prompt_id,sample,score\nq1,0,1\n").unwrap();
    let keep = [&keep[..], &["elsewhere.csv"]].concat();
    assert_refused("score", &[s(&responses), "--import", s(&elsewhere), "-o", s(&dir.path().join("x.parquet"))], "none of its 1 ratings names a response", dir.path(), &keep);
}

#[test]
fn merged_annotators_give_mean_scores_and_their_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let responses = fixture(dir.path());
    let ana_keys = ["7", "5", "1", "6", "4", "2", "5", "5", "3"];
    let bo_keys = ["6", "5", "2", "7", "3", "1", "s", "4", "3"];
    // Ana answers at the terminal-less pipe with the data on standard input, Bo from a file.
    let ana = dir.path().join("ana.parquet");
    let keys = write_keys(dir.path(), "ana.txt", &ana_keys);
    let data = std::fs::read(&responses).unwrap();
    let out = run_with_stdin("score", &["-", "--human", "--annotator", "ana", "--keys", s(&keys), "-o", s(&ana), "-q"], &data);
    assert!(out.status.success(), "{}", stderr(&out));
    let bo = dir.path().join("bo.parquet");
    let keys = write_keys(dir.path(), "bo.txt", &bo_keys);
    ok("score", &[s(&responses), "--human", "--annotator", "bo", "--keys", s(&keys), "-o", s(&bo), "-q"]);
    // Cy's ratings come from a spreadsheet and cover four responses.
    let cy_csv = dir.path().join("cy.csv");
    std::fs::write(&cy_csv, "prompt_id,sample,score,annotator\np0,0,2,cy\np0,1,3,cy\np1,0,1,cy\np2,2,7,cy\n").unwrap();
    let cy = dir.path().join("cy.parquet");
    ok("score", &[s(&responses), "--import", s(&cy_csv), "-o", s(&cy), "-q"]);

    let merged = dir.path().join("merged.parquet");
    let out = ok("score", &["--merge", s(&ana), s(&bo), s(&cy), "-o", s(&merged)]);
    let log = stderr(&out);

    let number = |k: &str| k.parse::<f64>().ok();
    let cy_scores = [Some(2.), Some(3.), None, Some(1.), None, None, None, None, Some(7.)];
    let table: Vec<Vec<Option<f64>>> = (0..9).map(|i| vec![number(ana_keys[i]), number(bo_keys[i]), cy_scores[i]]).collect();
    let expected = agreement(&table, 3);
    let line = format!(
        "agreement over 8 responses rated by 2 or more annotators: Krippendorff's alpha (interval) {:.3}, mean pairwise Spearman {:.3} (3 pairs)",
        expected.krippendorff_alpha.unwrap(),
        expected.mean_pairwise_spearman.unwrap()
    );
    assert!(log.contains(&line), "expected `{line}` in: {log}");
    assert!(log.contains("merged 9 responses from 3 annotators (ana, bo, cy)"), "{log}");

    let means: Vec<Option<f64>> = table
        .iter()
        .map(|row| {
            let given: Vec<f64> = row.iter().flatten().copied().collect();
            Some(given.iter().sum::<f64>() / given.len() as f64)
        })
        .collect();
    assert_eq!(floats(&merged, "score"), means);
    let counts = ParquetSource::open(&merged).unwrap().batches(Some(&["annotators", "ratings"]), 64).unwrap().next().unwrap().unwrap();
    let annotators = counts.i64s("annotators").unwrap();
    assert_eq!(annotators.values().to_vec(), vec![3, 3, 2, 3, 2, 2, 1, 2, 3]);
    let ratings = counts.data.column_by_name("ratings").unwrap().as_list::<i32>().value(6);
    let names = ratings.as_struct().column_by_name("annotator").unwrap().as_string::<i32>().value(0).to_string();
    assert_eq!(names, "ana", "bo skipped p2/0, so only ana's score is listed");
    assert_eq!(strings(&merged, "note")[4].as_deref(), Some("note 4"), "other columns are carried");

    // The merged file ranks like any scored file.
    let prefs = dir.path().join("prefs.parquet");
    let out = ok("rank", &[s(&merged), "-o", s(&prefs)]);
    assert!(stderr(&out).contains("prompts 3, responses 9"), "{}", stderr(&out));

    // A response one annotator rated twice is refused.
    let keep = files_in(dir.path());
    let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
    assert_refused("score", &["--merge", s(&ana), s(&ana), "-o", s(&dir.path().join("x.parquet"))], "ana rated p0/0 a second time", dir.path(), &keep);
}

#[test]
fn the_guard_rule_scores_the_probability_of_a_label() {
    let dir = tempfile::tempdir().unwrap();
    let responses = fixture(dir.path());
    let guard = dir.path().join("guard");
    let data = testdata("moderation_openai_samples.slice.parquet");
    let model = testdata("hf-tiny/causal-lm");
    ok("rm-train", &[s(&data), "--model", s(&model), "--task", "multilabel", "--steps", "3", "--max-length", "96", "--batch-size", "4", "-o", s(&guard), "-q"]);

    let rule = format!("guard:{}:violence", s(&guard));
    let one = dir.path().join("one.parquet");
    ok("score", &[s(&responses), "--rule", &rule, "-o", s(&one), "-q"]);
    let probabilities: Vec<f64> = floats(&one, "score").into_iter().map(Option::unwrap).collect();
    assert!(probabilities.iter().all(|p| *p > 0.0 && *p < 1.0), "{probabilities:?}");
    assert!(probabilities.iter().any(|p| (p - probabilities[0]).abs() > 1e-9), "the responses differ, so do their scores");
    assert_eq!(strings(&one, "scorer")[0], Some(format!("rules:{rule}")));

    // Batching does not change a probability; the weight is the last field.
    let weighted = dir.path().join("weighted.parquet");
    ok("score", &[s(&responses), "--rule", &format!("{rule}:-2"), "--batch-size", "1", "-o", s(&weighted), "-q"]);
    for (p, w) in probabilities.iter().zip(floats(&weighted, "score")) {
        assert!((w.unwrap() + 2.0 * p).abs() < 1e-5, "{p} vs {w:?}");
    }

    let keep = ["guard", "one.parquet", "responses.parquet", "weighted.parquet"];
    let out = dir.path().join("x.parquet");
    assert_refused("score", &[s(&responses), "--rule", &format!("guard:{}:spam", s(&guard)), "-o", s(&out)], "the guard has no label `spam`; its labels: sexual", dir.path(), &keep);
    let reward = testdata("hf-tiny/reward-model");
    assert_refused("score", &[s(&responses), "--rule", &format!("guard:{}:violence", s(&reward)), "-o", s(&out)], "is not a multi-label classifier", dir.path(), &keep);
}
