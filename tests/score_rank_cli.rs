//! The human-feedback loop's data path on the fixture models: generate → score → rank →
//! rm-train (refusals: bad_input_catalogue.rs).

mod common;

use common::{assert_refused, ok, s, testdata};
use lathe::data::records::{PreferenceRecord, RecordReader, ScoredRecord};

#[test]
fn responses_are_scored_ranked_and_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let responses = dir.path().join("responses.parquet");
    let policy = testdata("hf-tiny/causal-lm");
    let reward = testdata("hf-tiny/reward-model");
    ok("generate", &[s(&testdata("demo_prompts.jsonl")), "--model", s(&policy), "-n", "3", "--max-new-tokens", "12", "-o", s(&responses), "-q"]);

    let scored = dir.path().join("scored.parquet");
    ok("score", &[s(&responses), "--reward-model", s(&reward), "-o", s(&scored), "-q"]);
    let rows = RecordReader::<ScoredRecord>::open(&scored).unwrap().read_all().unwrap();
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r.score.is_finite() && r.scorer.starts_with("reward-model:")));
    // Batching does not change a score.
    let one_by_one = dir.path().join("single.parquet");
    ok("score", &[s(&responses), "--reward-model", s(&reward), "--batch-size", "1", "-o", s(&one_by_one), "-q"]);
    let single = RecordReader::<ScoredRecord>::open(&one_by_one).unwrap().read_all().unwrap();
    for (a, b) in rows.iter().zip(&single) {
        assert!((a.score - b.score).abs() < 1e-5, "{} vs {}", a.score, b.score);
    }

    let prefs = dir.path().join("prefs.parquet");
    let out = ok("rank", &[s(&scored), "--pairs", "all", "-o", s(&prefs)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompts 4, responses 12"));
    let pairs = RecordReader::<PreferenceRecord>::open(&prefs).unwrap().read_all().unwrap();
    assert!(!pairs.is_empty() && pairs.len() <= 12);
    assert!(pairs.iter().all(|p| p.margin.unwrap() > 0.0 && p.chosen_score.unwrap() > p.rejected_score.unwrap()));

    let run = dir.path().join("rm");
    ok("rm-train", &[s(&prefs), "--model", s(&policy), "-o", s(&run), "--steps", "2", "--batch-size", "2", "--max-length", "96", "-q"]);

    let ruled = dir.path().join("ruled.parquet");
    ok("score", &[s(&responses), "--rule", "length:-0.01", "--rule", "regex:^[A-Z]:1", "--column", "style", "-o", s(&ruled), "-q"]);
    let columns = lathe::data::records::ColumnMap::default().rename("score", "style");
    let ruled_rows = RecordReader::<ScoredRecord>::open_with(&ruled, columns).unwrap().read_all().unwrap();
    for row in &ruled_rows {
        let starts_upper = row.response.response.chars().next().is_some_and(|c| c.is_ascii_uppercase());
        let expected = -0.01 * row.response.response.chars().count() as f64 + if starts_upper { 1.0 } else { 0.0 };
        assert!((row.score - expected).abs() < 1e-9);
    }
}

#[test]
fn rank_leaves_out_responses_without_a_score_and_refuses_when_none_has_one() {
    use lathe::data::records::{RecordWriter, ResponseRecord};
    let dir = tempfile::tempdir().unwrap();
    let scored = |path: &std::path::Path, scores: &[f64]| {
        let rows: Vec<ScoredRecord> = scores
            .iter()
            .enumerate()
            .map(|(i, &score)| ScoredRecord {
                response: ResponseRecord {
                    prompt_id: "p".into(),
                    prompt: "Q?".into(),
                    response: format!("answer {i}"),
                    sample: i as i32,
                    model: "m".into(),
                    finish_reason: "stop".into(),
                    num_tokens: 2,
                    logprob: -1.0,
                },
                score,
                scorer: "test".into(),
            })
            .collect();
        let mut writer = RecordWriter::<ScoredRecord>::create(path, "test", vec![], vec![]).unwrap();
        writer.write(&rows, vec![]).unwrap();
        writer.finish().unwrap();
    };
    let nan = dir.path().join("nan.parquet");
    scored(&nan, &[f64::NAN, f64::NAN]);
    let out = dir.path().join("prefs.parquet");
    assert_refused("rank", &[s(&nan), "-o", s(&out)], "none of the 2 responses has a score (all null or NaN)", dir.path(), &["nan.parquet"]);
    let some = dir.path().join("some.parquet");
    scored(&some, &[1.0, f64::NAN, 3.0]);
    let ranked = ok("rank", &[s(&some), "-o", s(&out)]);
    assert!(String::from_utf8_lossy(&ranked.stderr).contains("note: 1 of 3 responses have no score"));
    let pairs = RecordReader::<PreferenceRecord>::open(&out).unwrap().read_all().unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!((pairs[0].chosen.as_str(), pairs[0].rejected.as_str()), ("answer 2", "answer 0"));
}
