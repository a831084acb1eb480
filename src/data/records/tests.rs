use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, LargeListArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};

use super::*;
use crate::data::{Kind, ParquetSink, ParquetSource, meta};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn round_trip<R: Record + PartialEq + std::fmt::Debug + Clone>(rows: Vec<R>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.parquet");
    let mut writer = RecordWriter::<R>::create(&path, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    assert_eq!(writer.finish().unwrap(), rows.len() as u64);
    let reader = RecordReader::<R>::open(&path).unwrap();
    assert_eq!(reader.source().meta(meta::SCHEMA), Some(R::KIND.tag().as_str()));
    assert_eq!(reader.read_all().unwrap(), rows);
}

fn write_batch(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns.into_iter().map(|(_, a)| a).collect()).unwrap();
    let mut sink = ParquetSink::create(path, batch.schema(), vec![]).unwrap();
    sink.write(&batch).unwrap();
    sink.finish().unwrap();
}

#[test]
fn every_kind_round_trips() {
    round_trip(vec![TextRecord { text: "a".into() }, TextRecord { text: "ü 🎉\n".into() }]);
    round_trip(vec![TokensRecord { input_ids: vec![0, 5, 4095] }, TokensRecord { input_ids: vec![] }]);
    round_trip(vec![ChatRecord { messages: vec![Message::new("system", "s"), Message::new("user", "u"), Message::new("assistant", "a")] }]);
    round_trip(vec![PromptCompletionRecord { prompt: "p".into(), completion: "c".into() }]);
    round_trip(vec![
        PromptRecord { prompt_id: Some("1".into()), prompt: Prompt::Text("hi".into()) },
        PromptRecord { prompt_id: None, prompt: Prompt::Messages(vec![Message::new("user", "hey")]) },
    ]);
    let response = ResponseRecord {
        prompt_id: "p0".into(),
        prompt: "q".into(),
        response: "r".into(),
        sample: 2,
        model: "m".into(),
        finish_reason: "length".into(),
        num_tokens: 64,
        logprob: -12.5,
    };
    round_trip(vec![response.clone()]);
    round_trip(vec![ScoredRecord { response, score: 0.25, scorer: "rule:length".into() }]);
    round_trip(vec![PreferenceRecord {
        prompt: "p".into(),
        chosen: "c".into(),
        rejected: "r".into(),
        margin: Some(1.5),
        prompt_id: None,
        chosen_score: Some(2.0),
        rejected_score: None,
    }]);
    let turn = |role: &str, content: &str| vec![Message::new(role, content)];
    round_trip(vec![ChatPreferenceRecord { prompt: turn("user", "q"), chosen: turn("assistant", "a"), rejected: turn("assistant", "b") }]);
    round_trip(vec![
        UnpairedRecord { prompt: "p".to_string(), completion: "c".to_string(), label: true },
        UnpairedRecord { prompt: "p".to_string(), completion: "d".to_string(), label: false },
    ]);
    round_trip(vec![UnpairedRecord { prompt: turn("user", "q"), completion: turn("assistant", "a"), label: false }]);
    round_trip(vec![
        LabeledTextRecord { text: "ok".into(), labels: vec![], unlabeled: vec![] },
        LabeledTextRecord { text: "bad".into(), labels: vec!["hate".into(), "violence".into()], unlabeled: vec![] },
    ]);
    round_trip(vec![FindingRecord {
        probe: "dan".into(),
        category: "jailbreak".into(),
        prompt: "p".into(),
        response: "r".into(),
        detector: "refusal".into(),
        score: 0.9,
        success: true,
        attribute: Some("gender".into()),
        group: Some("female".into()),
    }]);
}

#[test]
fn reads_chat_data_written_by_pyarrow() {
    let all = RecordReader::<ChatRecord>::open(&testdata("sft_alpaca_messages.parquet")).unwrap().read_all().unwrap();
    assert_eq!(all.len(), 1500);
    assert!(all.iter().all(|r| r.messages.last().is_some_and(|m| m.role == "assistant")));
    // pyarrow ≥ 13 names the list item `element`, not `item`.
    let dolly = RecordReader::<ChatRecord>::open(&testdata("sft_dolly_messages.slice.parquet")).unwrap().read_all().unwrap();
    assert_eq!(dolly.len(), 48);
    assert_eq!(dolly[0].messages[0].role, "user");
}

#[test]
fn reads_prompt_completion_and_preferences_written_by_pyarrow() {
    let pc = RecordReader::<PromptCompletionRecord>::open(&testdata("sft_alpaca_prompt_completion.slice.parquet"))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(pc.len(), 48);
    let prefs = RecordReader::<PreferenceRecord>::open(&testdata("pref_hh_rlhf_harmless_base.slice.parquet"))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(prefs.len(), 48);
    assert!(prefs[0].prompt.ends_with("\n\nAssistant:"));
    assert!(prefs.iter().all(|p| p.margin.is_none() && p.chosen.starts_with(' ')));
}

#[test]
fn boolean_category_columns_keep_nulls_as_unlabeled() {
    let path = testdata("moderation_openai_samples.slice.parquet");
    let reader = RecordReader::<LabeledTextRecord>::open(&path).unwrap();
    assert_eq!(LabeledTextRecord::boolean_categories(reader.source()).len(), 8);
    let rows = reader.read_all().unwrap();
    assert_eq!(rows.len(), 120);
    assert!(rows.iter().any(|r| r.unlabeled.contains(&"violence".to_string())));
    assert!(rows.iter().any(|r| r.labels.contains(&"violence".to_string())));
    assert!(rows.iter().all(|r| r.labels.iter().all(|l| !r.unlabeled.contains(l))));
}

#[test]
fn tokens_of_any_integer_width_and_large_lists_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let lists = LargeListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1), Some(2)]), Some(vec![])]);
    write_batch(&path, vec![("input_ids", Arc::new(lists)), ("id", Arc::new(Int64Array::from(vec![7, 8])))]);
    let rows = RecordReader::<TokensRecord>::open(&path).unwrap().read_all().unwrap();
    assert_eq!(rows, vec![TokensRecord { input_ids: vec![1, 2] }, TokensRecord { input_ids: vec![] }]);
}

#[test]
fn nulls_are_reported_with_their_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let texts: Vec<Option<&str>> = (0..10).map(|i| if i == 6 { None } else { Some("x") }).collect();
    write_batch(&path, vec![("text", Arc::new(StringArray::from(texts)))]);
    let e = RecordReader::<TextRecord>::open(&path).unwrap().read_all().unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("row 6, column `text`: null"), "{e}");
}

#[test]
fn wrong_type_and_missing_columns_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    write_batch(&path, vec![("text", Arc::new(Int64Array::from(vec![1])))]);
    let e = RecordReader::<TextRecord>::open(&path).err().unwrap();
    assert!(e.to_string().contains("column `text`: expected string, found integer"), "{e}");
    let e = RecordReader::<PromptCompletionRecord>::open(&path).err().unwrap();
    assert!(e.to_string().contains("no column `prompt`"), "{e}");
    let e = RecordReader::<PromptRecord>::open(&path).err().unwrap();
    assert!(e.to_string().contains("`messages`"), "{e}");
}

#[test]
fn files_of_another_kind_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let mut writer = RecordWriter::<TextRecord>::create(&path, "test", vec![], vec![]).unwrap();
    writer.write(&[TextRecord { text: "x".into() }], vec![]).unwrap();
    writer.finish().unwrap();
    let source = ParquetSource::open(&path).unwrap();
    assert_eq!(source.written_kind(), Some(Kind::Text));
    let e = source.expect_kind(Kind::Tokens).unwrap_err();
    assert!(e.to_string().contains("holds text data"), "{e}");
}

#[test]
fn renamed_columns_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    write_batch(&path, vec![("body", Arc::new(StringArray::from(vec!["a", "b"])))]);
    let reader = RecordReader::<TextRecord>::open_with(&path, ColumnMap::default().rename("text", "body")).unwrap();
    assert_eq!(reader.read_all().unwrap().len(), 2);
    let source = ParquetSource::open(&path).unwrap();
    assert!(source.require("body", crate::data::ColumnType::Str).is_ok());
    assert!(!crate::data::ColumnType::Str.accepts(&DataType::Int32));
}

#[test]
fn not_parquet_and_empty_files_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.parquet");
    std::fs::write(&text, "just text\n").unwrap();
    let e = ParquetSource::open(&text).err().unwrap();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("not a readable Parquet file"), "{e}");
    let empty = dir.path().join("e.parquet");
    std::fs::write(&empty, "").unwrap();
    assert!(ParquetSource::open(&empty).err().unwrap().to_string().contains("empty file"));
    assert!(ParquetSource::open(&dir.path().join("none.parquet")).err().unwrap().to_string().contains("no such file"));
}

#[test]
fn token_ids_outside_the_vocabulary_name_their_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let lists = LargeListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1), Some(2)]), Some(vec![Some(5000)])]);
    write_batch(&path, vec![("input_ids", Arc::new(lists))]);
    let batch = ParquetSource::open(&path).unwrap().batches(None, 16).unwrap().next().unwrap().unwrap();
    assert!(batch.token_ids("input_ids", 5001).is_ok());
    let e = batch.token_ids("input_ids", 4096).err().unwrap();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("row 1, column `input_ids`: token id 5000 outside the vocabulary of 4096"), "{e}");
}
