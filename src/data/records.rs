//! Typed rows for every data kind of SPEC's table, with their readers and writers.
//!
//! A reader checks the schema before any row is read and can stream rows together with the raw
//! batch they came from, so stages carry extra columns through. Column names follow TRL.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, ListArray, StringArray, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde::{Deserialize, Serialize};

use super::parquet_io::{Batch, DEFAULT_BATCH_ROWS, ParquetSink, ParquetSource, lathe_metadata};
use super::{ColumnType, Kind};
use crate::error::{Result, bad_input};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// Logical column name → the name in the file (`--column body` reads `text` from `body`).
#[derive(Clone, Debug, Default)]
pub struct ColumnMap(HashMap<&'static str, String>);

impl ColumnMap {
    pub fn rename(mut self, logical: &'static str, physical: &str) -> Self {
        self.0.insert(logical, physical.to_string());
        self
    }

    pub fn get<'a>(&'a self, logical: &'a str) -> &'a str {
        self.0.get(logical).map_or(logical, String::as_str)
    }
}

/// One row of a data kind.
pub trait Record: Sized {
    const KIND: Kind;
    /// Check the file's schema; return the (physical) columns a reader needs.
    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>>;
    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>>;
    /// The columns a writer produces, in order.
    fn fields() -> Vec<Field>;
    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef>;
}

/// Streams typed rows of one file.
pub struct RecordReader<R> {
    source: ParquetSource,
    columns: ColumnMap,
    needed: Vec<String>,
    _record: PhantomData<R>,
}

impl<R: Record> RecordReader<R> {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, ColumnMap::default())
    }

    /// Open and check the schema; nothing is read yet.
    pub fn open_with(path: &Path, columns: ColumnMap) -> Result<Self> {
        let source = ParquetSource::open(path)?;
        Self::from_source(source, columns)
    }

    pub fn from_source(source: ParquetSource, columns: ColumnMap) -> Result<Self> {
        source.expect_kind(R::KIND)?;
        let needed = R::check(&source, &columns)?;
        Ok(RecordReader { source, columns, needed, _record: PhantomData })
    }

    pub fn source(&self) -> &ParquetSource {
        &self.source
    }

    /// Typed rows with the full batch they came from (for carrying extra columns).
    pub fn batches(&self) -> Result<impl Iterator<Item = Result<(Vec<R>, Batch)>> + '_> {
        let batches = self.source.batches(None, DEFAULT_BATCH_ROWS)?;
        Ok(batches.map(move |batch| {
            let batch = batch?;
            Ok((R::read(&batch, &self.columns)?, batch))
        }))
    }

    /// Typed rows only, reading just the columns needed.
    pub fn rows(&self) -> Result<impl Iterator<Item = Result<Vec<R>>> + '_> {
        let names: Vec<&str> = self.needed.iter().map(String::as_str).collect();
        let batches = self.source.batches(Some(&names), DEFAULT_BATCH_ROWS)?;
        Ok(batches.map(move |batch| R::read(&batch?, &self.columns)))
    }

    pub fn read_all(&self) -> Result<Vec<R>> {
        let mut all = Vec::new();
        for rows in self.rows()? {
            all.extend(rows?);
        }
        Ok(all)
    }
}

/// Writes typed rows, plus any carried columns, with `lathe.*` metadata.
pub struct RecordWriter<R> {
    sink: ParquetSink,
    _record: PhantomData<R>,
}

impl<R: Record> RecordWriter<R> {
    /// `carried` are extra fields written after the kind's own columns.
    pub fn create(path: &Path, stage: &str, extra_metadata: Vec<(String, String)>, carried: Vec<Field>) -> Result<Self> {
        let mut fields = R::fields();
        fields.extend(carried);
        let mut metadata = lathe_metadata(R::KIND, stage);
        metadata.extend(extra_metadata);
        let sink = ParquetSink::create(path, Arc::new(Schema::new(fields)), metadata)?;
        Ok(RecordWriter { sink, _record: PhantomData })
    }

    pub fn write(&mut self, rows: &[R], carried: Vec<ArrayRef>) -> Result<()> {
        let mut arrays = R::to_arrays(rows);
        arrays.extend(carried);
        let batch = arrow::array::RecordBatch::try_new(self.sink.schema(), arrays)?;
        self.sink.write(&batch)
    }

    pub fn finish(self) -> Result<u64> {
        self.sink.finish()
    }
}

// ---- column builders shared by the kinds ----

fn field(name: &str, data_type: DataType, nullable: bool) -> Field {
    Field::new(name, data_type, nullable)
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn optional_strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn f64s(values: impl Iterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(values))
}

fn optional_f64s(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(values.collect::<Float64Array>())
}

fn i32s(values: impl Iterator<Item = i32>) -> ArrayRef {
    Arc::new(Int32Array::from_iter_values(values))
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(item, true)))
}

fn list_array(item: DataType, lengths: impl Iterator<Item = usize>, values: ArrayRef) -> ArrayRef {
    let field = Arc::new(Field::new_list_field(item, true));
    Arc::new(ListArray::new(field, OffsetBuffer::from_lengths(lengths), values, None))
}

fn message_fields() -> Fields {
    Fields::from(vec![field("role", DataType::Utf8, true), field("content", DataType::Utf8, true)])
}

pub fn messages_type() -> DataType {
    list_of(DataType::Struct(message_fields()))
}

fn messages_array<'a>(rows: impl Iterator<Item = Option<&'a [Message]>>) -> ArrayRef {
    let rows: Vec<Option<&[Message]>> = rows.collect();
    let all = || rows.iter().flatten().flat_map(|m| m.iter());
    let items = StructArray::new(
        message_fields(),
        vec![strings(all().map(|m| m.role.as_str())), strings(all().map(|m| m.content.as_str()))],
        None,
    );
    let lengths = rows.iter().map(|r| r.map_or(0, |m| m.len()));
    let nulls = rows.iter().any(Option::is_none).then(|| rows.iter().map(Option::is_some).collect());
    let field = Arc::new(Field::new_list_field(DataType::Struct(message_fields()), true));
    Arc::new(ListArray::new(field, OffsetBuffer::from_lengths(lengths), Arc::new(items), nulls))
}

fn require_all(source: &ParquetSource, columns: &ColumnMap, spec: &[(&'static str, ColumnType)]) -> Result<Vec<String>> {
    spec.iter()
        .map(|(name, ty)| {
            let physical = columns.get(name);
            source.require(physical, *ty)?;
            Ok(physical.to_string())
        })
        .collect()
}

fn optional_columns(
    source: &ParquetSource,
    columns: &ColumnMap,
    spec: &[(&'static str, ColumnType)],
) -> Result<Vec<String>> {
    let mut present = Vec::new();
    for (name, ty) in spec {
        let physical = columns.get(name);
        if source.optional(physical, *ty)? {
            present.push(physical.to_string());
        }
    }
    Ok(present)
}

fn string_values(array: &StringArray) -> impl Iterator<Item = String> + '_ {
    (0..array.len()).map(|i| array.value(i).to_string())
}

fn optional_string_values(batch: &Batch, name: &str) -> Result<Vec<Option<String>>> {
    if batch.column(name).is_none() {
        return Ok(vec![None; batch.len()]);
    }
    let array = batch.optional_strings(name)?;
    Ok((0..array.len()).map(|i| array.is_valid(i).then(|| array.value(i).to_string())).collect())
}

fn optional_f64_values(batch: &Batch, name: &str) -> Result<Vec<Option<f64>>> {
    if batch.column(name).is_none() {
        return Ok(vec![None; batch.len()]);
    }
    let array = batch.optional_f64s(name)?;
    Ok((0..array.len()).map(|i| array.is_valid(i).then(|| array.value(i))).collect())
}

// ---- the kinds ----

/// `text: string`
#[derive(Clone, Debug, PartialEq)]
pub struct TextRecord {
    pub text: String,
}

impl Record for TextRecord {
    const KIND: Kind = Kind::Text;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        require_all(source, columns, &[("text", ColumnType::Str)])
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        Ok(string_values(&batch.strings(columns.get("text"))?).map(|text| TextRecord { text }).collect())
    }

    fn fields() -> Vec<Field> {
        vec![field("text", DataType::Utf8, false)]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![strings(rows.iter().map(|r| r.text.as_str()))]
    }
}

/// `input_ids: list<int32>`
#[derive(Clone, Debug, PartialEq)]
pub struct TokensRecord {
    pub input_ids: Vec<u32>,
}

impl TokensRecord {
    pub fn field() -> Field {
        field("input_ids", list_of(DataType::Int32), false)
    }

    /// Rows of ids as one list column, built without per-row allocation.
    pub fn array<'a>(rows: impl Iterator<Item = &'a [u32]> + Clone) -> ArrayRef {
        let values = Int32Array::from_iter_values(rows.clone().flat_map(|r| r.iter().map(|&id| id as i32)));
        list_array(DataType::Int32, rows.map(<[u32]>::len), Arc::new(values))
    }
}

impl Record for TokensRecord {
    const KIND: Kind = Kind::Tokens;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        require_all(source, columns, &[("input_ids", ColumnType::IntList)])
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let name = columns.get("input_ids");
        let lists = batch.int_lists(name)?;
        (0..lists.len())
            .map(|i| {
                let row = lists.row(i);
                if let Some(bad) = row.iter().find(|&&id| id < 0) {
                    return Err(batch.error_at(i, name, format!("negative token id {bad}")));
                }
                Ok(TokensRecord { input_ids: row.iter().map(|&id| id as u32).collect() })
            })
            .collect()
    }

    fn fields() -> Vec<Field> {
        vec![Self::field()]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![Self::array(rows.iter().map(|r| r.input_ids.as_slice()))]
    }
}

/// `messages: list<struct<role, content>>`
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRecord {
    pub messages: Vec<Message>,
}

pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Every message of every (row, conversation) has a known role.
fn check_roles<'a>(batch: &Batch, name: &str, rows: impl Iterator<Item = (usize, &'a Vec<Message>)>) -> Result<()> {
    for (i, messages) in rows {
        if let Some((j, m)) = messages.iter().enumerate().find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str())) {
            return Err(batch.error_at(
                i,
                name,
                format!("message {j}: role `{}`, expected one of {}", m.role, CHAT_ROLES.join(", ")),
            ));
        }
    }
    Ok(())
}

impl Record for ChatRecord {
    const KIND: Kind = Kind::Chat;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        require_all(source, columns, &[("messages", ColumnType::Messages)])
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let name = columns.get("messages");
        let rows = batch.messages(name)?;
        check_roles(batch, name, rows.iter().enumerate())?;
        Ok(rows.into_iter().map(|messages| ChatRecord { messages }).collect())
    }

    fn fields() -> Vec<Field> {
        vec![field("messages", messages_type(), false)]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![messages_array(rows.iter().map(|r| Some(r.messages.as_slice())))]
    }
}

/// `prompt: string`, `completion: string`
#[derive(Clone, Debug, PartialEq)]
pub struct PromptCompletionRecord {
    pub prompt: String,
    pub completion: String,
}

impl Record for PromptCompletionRecord {
    const KIND: Kind = Kind::PromptCompletion;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        require_all(source, columns, &[("prompt", ColumnType::Str), ("completion", ColumnType::Str)])
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let prompts = batch.strings(columns.get("prompt"))?;
        let completions = batch.strings(columns.get("completion"))?;
        Ok(string_values(&prompts)
            .zip(string_values(&completions))
            .map(|(prompt, completion)| PromptCompletionRecord { prompt, completion })
            .collect())
    }

    fn fields() -> Vec<Field> {
        vec![field("prompt", DataType::Utf8, false), field("completion", DataType::Utf8, false)]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            strings(rows.iter().map(|r| r.prompt.as_str())),
            strings(rows.iter().map(|r| r.completion.as_str())),
        ]
    }
}

/// A prompt: plain text or a conversation without its final assistant turn.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

/// `prompt: string` or `messages`; optional `prompt_id: string`.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRecord {
    pub prompt_id: Option<String>,
    pub prompt: Prompt,
}

impl Record for PromptRecord {
    const KIND: Kind = Kind::Prompts;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        let mut needed = optional_columns(
            source,
            columns,
            &[("prompt", ColumnType::Str), ("messages", ColumnType::Messages)],
        )?;
        if needed.is_empty() {
            return Err(bad_input(
                source.path(),
                format!("no column `prompt` (string) or `messages` (chat); columns: {}", source.column_names()),
            ));
        }
        needed.extend(optional_columns(source, columns, &[("prompt_id", ColumnType::Str)])?);
        Ok(needed)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let ids = optional_string_values(batch, columns.get("prompt_id"))?;
        let (prompt_name, messages_name) = (columns.get("prompt"), columns.get("messages"));
        let texts = optional_string_values(batch, prompt_name)?;
        let chats = if batch.column(messages_name).is_some() {
            let chats = batch.optional_messages(messages_name)?;
            let present = chats.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|m| (i, m)));
            check_roles(batch, messages_name, present)?;
            chats
        } else {
            vec![None; batch.len()]
        };
        ids.into_iter()
            .zip(texts.into_iter().zip(chats))
            .enumerate()
            .map(|(i, (prompt_id, (text, chat)))| {
                let prompt = match (text, chat) {
                    (Some(text), _) => Prompt::Text(text),
                    (None, Some(messages)) => Prompt::Messages(messages),
                    (None, None) => return Err(batch.error_at(i, prompt_name, "null prompt, expected a string")),
                };
                Ok(PromptRecord { prompt_id, prompt })
            })
            .collect()
    }

    fn fields() -> Vec<Field> {
        vec![
            field("prompt_id", DataType::Utf8, true),
            field("prompt", DataType::Utf8, true),
            field("messages", messages_type(), true),
        ]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            optional_strings(rows.iter().map(|r| r.prompt_id.as_deref())),
            optional_strings(rows.iter().map(|r| match &r.prompt {
                Prompt::Text(t) => Some(t.as_str()),
                Prompt::Messages(_) => None,
            })),
            messages_array(rows.iter().map(|r| match &r.prompt {
                Prompt::Text(_) => None,
                Prompt::Messages(m) => Some(m.as_slice()),
            })),
        ]
    }
}

/// One sampled response (SPEC `responses`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseRecord {
    pub prompt_id: String,
    pub prompt: String,
    pub response: String,
    pub sample: i32,
    pub model: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    pub num_tokens: i32,
    pub logprob: f64,
}

#[cfg(test)]
impl ResponseRecord {
    /// A response for tests: `prompt {prompt_id}` answered `{prompt_id}-{sample}`.
    pub(crate) fn example(prompt_id: &str, sample: i32) -> Self {
        ResponseRecord {
            prompt_id: prompt_id.into(),
            prompt: format!("prompt {prompt_id}"),
            response: format!("{prompt_id}-{sample}"),
            sample,
            model: "m".into(),
            finish_reason: "stop".into(),
            num_tokens: 1,
            logprob: 0.0,
        }
    }
}

const RESPONSE_COLUMNS: [(&str, ColumnType); 8] = [
    ("prompt_id", ColumnType::Str),
    ("prompt", ColumnType::Str),
    ("response", ColumnType::Str),
    ("sample", ColumnType::Int),
    ("model", ColumnType::Str),
    ("finish_reason", ColumnType::Str),
    ("num_tokens", ColumnType::Int),
    ("logprob", ColumnType::Float),
];

impl Record for ResponseRecord {
    const KIND: Kind = Kind::Responses;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        require_all(source, columns, &RESPONSE_COLUMNS)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let s = |name| batch.strings(columns.get(name));
        let (ids, prompts, responses, models, reasons) =
            (s("prompt_id")?, s("prompt")?, s("response")?, s("model")?, s("finish_reason")?);
        let samples = batch.i64s(columns.get("sample"))?;
        let lengths = batch.i64s(columns.get("num_tokens"))?;
        let logprobs = batch.f64s(columns.get("logprob"))?;
        (0..batch.len())
            .map(|i| {
                let reason = reasons.value(i);
                if reason != "stop" && reason != "length" {
                    return Err(batch.error_at(i, columns.get("finish_reason"), format!("`{reason}`, expected stop or length")));
                }
                Ok(ResponseRecord {
                    prompt_id: ids.value(i).into(),
                    prompt: prompts.value(i).into(),
                    response: responses.value(i).into(),
                    sample: samples.value(i) as i32,
                    model: models.value(i).into(),
                    finish_reason: reason.into(),
                    num_tokens: lengths.value(i) as i32,
                    logprob: logprobs.value(i),
                })
            })
            .collect()
    }

    fn fields() -> Vec<Field> {
        RESPONSE_COLUMNS
            .iter()
            .map(|(name, ty)| {
                let data_type = match ty {
                    ColumnType::Str => DataType::Utf8,
                    ColumnType::Int => DataType::Int32,
                    _ => DataType::Float64,
                };
                field(name, data_type, false)
            })
            .collect()
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            strings(rows.iter().map(|r| r.prompt_id.as_str())),
            strings(rows.iter().map(|r| r.prompt.as_str())),
            strings(rows.iter().map(|r| r.response.as_str())),
            i32s(rows.iter().map(|r| r.sample)),
            strings(rows.iter().map(|r| r.model.as_str())),
            strings(rows.iter().map(|r| r.finish_reason.as_str())),
            i32s(rows.iter().map(|r| r.num_tokens)),
            f64s(rows.iter().map(|r| r.logprob)),
        ]
    }
}

/// A scored response: responses + `score` (renamable with [`ColumnMap`]) + `scorer`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredRecord {
    pub response: ResponseRecord,
    pub score: f64,
    pub scorer: String,
}

impl Record for ScoredRecord {
    const KIND: Kind = Kind::Scored;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        let mut needed = ResponseRecord::check(source, columns)?;
        needed.extend(require_all(source, columns, &[("score", ColumnType::Float), ("scorer", ColumnType::Str)])?);
        Ok(needed)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let responses = ResponseRecord::read(batch, columns)?;
        let scores = batch.f64s(columns.get("score"))?;
        let scorers = batch.strings(columns.get("scorer"))?;
        Ok(responses
            .into_iter()
            .enumerate()
            .map(|(i, response)| ScoredRecord { response, score: scores.value(i), scorer: scorers.value(i).into() })
            .collect())
    }

    fn fields() -> Vec<Field> {
        let mut fields = ResponseRecord::fields();
        fields.push(field("score", DataType::Float64, false));
        fields.push(field("scorer", DataType::Utf8, false));
        fields
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        let responses: Vec<ResponseRecord> = rows.iter().map(|r| r.response.clone()).collect();
        let mut arrays = ResponseRecord::to_arrays(&responses);
        arrays.push(f64s(rows.iter().map(|r| r.score)));
        arrays.push(strings(rows.iter().map(|r| r.scorer.as_str())));
        arrays
    }
}

/// A preference pair. Without a `prompt` column (TRL's implicit-prompt layout) the prompt is
/// empty and `chosen`/`rejected` hold whole conversations.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceRecord {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub margin: Option<f64>,
    pub prompt_id: Option<String>,
    pub chosen_score: Option<f64>,
    pub rejected_score: Option<f64>,
}

impl Record for PreferenceRecord {
    const KIND: Kind = Kind::Preferences;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        let mut needed = require_all(source, columns, &[("chosen", ColumnType::Str), ("rejected", ColumnType::Str)])?;
        needed.extend(optional_columns(
            source,
            columns,
            &[
                ("prompt", ColumnType::Str),
                ("margin", ColumnType::Float),
                ("prompt_id", ColumnType::Str),
                ("chosen_score", ColumnType::Float),
                ("rejected_score", ColumnType::Float),
            ],
        )?);
        Ok(needed)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let prompt_name = columns.get("prompt");
        let prompts = if batch.column(prompt_name).is_some() {
            string_values(&batch.strings(prompt_name)?).collect()
        } else {
            vec![String::new(); batch.len()]
        };
        let chosen = batch.strings(columns.get("chosen"))?;
        let rejected = batch.strings(columns.get("rejected"))?;
        let margins = optional_f64_values(batch, columns.get("margin"))?;
        let ids = optional_string_values(batch, columns.get("prompt_id"))?;
        let chosen_scores = optional_f64_values(batch, columns.get("chosen_score"))?;
        let rejected_scores = optional_f64_values(batch, columns.get("rejected_score"))?;
        Ok(prompts
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| PreferenceRecord {
                prompt,
                chosen: chosen.value(i).into(),
                rejected: rejected.value(i).into(),
                margin: margins[i],
                prompt_id: ids[i].clone(),
                chosen_score: chosen_scores[i],
                rejected_score: rejected_scores[i],
            })
            .collect())
    }

    fn fields() -> Vec<Field> {
        vec![
            field("prompt", DataType::Utf8, false),
            field("chosen", DataType::Utf8, false),
            field("rejected", DataType::Utf8, false),
            field("margin", DataType::Float64, true),
            field("prompt_id", DataType::Utf8, true),
            field("chosen_score", DataType::Float64, true),
            field("rejected_score", DataType::Float64, true),
        ]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            strings(rows.iter().map(|r| r.prompt.as_str())),
            strings(rows.iter().map(|r| r.chosen.as_str())),
            strings(rows.iter().map(|r| r.rejected.as_str())),
            optional_f64s(rows.iter().map(|r| r.margin)),
            optional_strings(rows.iter().map(|r| r.prompt_id.as_deref())),
            optional_f64s(rows.iter().map(|r| r.chosen_score)),
            optional_f64s(rows.iter().map(|r| r.rejected_score)),
        ]
    }
}

/// A preference pair in TRL's conversational layout: `prompt`, `chosen` and `rejected` as chat
/// messages. Without a `prompt` column (TRL's implicit prompt) the prompt is empty and
/// `chosen`/`rejected` hold whole conversations.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatPreferenceRecord {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
}

impl Record for ChatPreferenceRecord {
    const KIND: Kind = Kind::Preferences;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        let mut needed = require_all(source, columns, &[("chosen", ColumnType::Messages), ("rejected", ColumnType::Messages)])?;
        needed.extend(optional_columns(source, columns, &[("prompt", ColumnType::Messages)])?);
        Ok(needed)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let prompt_name = columns.get("prompt");
        let prompts = match batch.column(prompt_name) {
            Some(_) => <Vec<Message> as Turns>::read(batch, prompt_name)?,
            None => vec![Vec::new(); batch.len()],
        };
        let chosen = <Vec<Message> as Turns>::read(batch, columns.get("chosen"))?;
        let rejected = <Vec<Message> as Turns>::read(batch, columns.get("rejected"))?;
        Ok(prompts
            .into_iter()
            .zip(chosen.into_iter().zip(rejected))
            .map(|(prompt, (chosen, rejected))| ChatPreferenceRecord { prompt, chosen, rejected })
            .collect())
    }

    fn fields() -> Vec<Field> {
        ["prompt", "chosen", "rejected"].iter().map(|name| field(name, messages_type(), false)).collect()
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            messages_array(rows.iter().map(|r| Some(r.prompt.as_slice()))),
            messages_array(rows.iter().map(|r| Some(r.chosen.as_slice()))),
            messages_array(rows.iter().map(|r| Some(r.rejected.as_slice()))),
        ]
    }
}

/// What a prompt or an answer is in TRL's layouts: text (standard) or chat messages
/// (conversational).
pub trait Turns: Sized + Clone {
    const TYPE: ColumnType;
    fn data_type() -> DataType;
    fn read(batch: &Batch, name: &str) -> Result<Vec<Self>>;
    fn array<'a>(rows: impl Iterator<Item = &'a Self>) -> ArrayRef
    where
        Self: 'a;
}

impl Turns for String {
    const TYPE: ColumnType = ColumnType::Str;

    fn data_type() -> DataType {
        DataType::Utf8
    }

    fn read(batch: &Batch, name: &str) -> Result<Vec<Self>> {
        Ok(string_values(&batch.strings(name)?).collect())
    }

    fn array<'a>(rows: impl Iterator<Item = &'a Self>) -> ArrayRef {
        strings(rows.map(String::as_str))
    }
}

impl Turns for Vec<Message> {
    const TYPE: ColumnType = ColumnType::Messages;

    fn data_type() -> DataType {
        messages_type()
    }

    fn read(batch: &Batch, name: &str) -> Result<Vec<Self>> {
        let rows = batch.messages(name)?;
        check_roles(batch, name, rows.iter().enumerate())?;
        Ok(rows)
    }

    fn array<'a>(rows: impl Iterator<Item = &'a Self>) -> ArrayRef {
        messages_array(rows.map(|m| Some(m.as_slice())))
    }
}

/// TRL's unpaired preference layout (KTO's data): a prompt, one completion and whether it is
/// desirable (`label: bool`); prompt and completion are both text or both chat messages.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedRecord<T> {
    pub prompt: T,
    pub completion: T,
    pub label: bool,
}

impl<T: Turns> Record for UnpairedRecord<T> {
    const KIND: Kind = Kind::Preferences;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        require_all(source, columns, &[("prompt", T::TYPE), ("completion", T::TYPE), ("label", ColumnType::Bool)])
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let prompts = T::read(batch, columns.get("prompt"))?;
        let completions = T::read(batch, columns.get("completion"))?;
        let label_name = columns.get("label");
        let labels = batch.optional_bools(label_name)?;
        prompts
            .into_iter()
            .zip(completions)
            .enumerate()
            .map(|(i, (prompt, completion))| match labels.is_valid(i) {
                true => Ok(UnpairedRecord { prompt, completion, label: labels.value(i) }),
                false => Err(batch.error_at(i, label_name, "null, expected true (desirable) or false (undesirable)")),
            })
            .collect()
    }

    fn fields() -> Vec<Field> {
        vec![field("prompt", T::data_type(), false), field("completion", T::data_type(), false), field("label", DataType::Boolean, false)]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            T::array(rows.iter().map(|r| &r.prompt)),
            T::array(rows.iter().map(|r| &r.completion)),
            Arc::new(rows.iter().map(|r| Some(r.label)).collect::<BooleanArray>()),
        ]
    }
}

/// Labeled text: `labels: list<string>` (empty = clean), or one boolean column per category
/// where null means "not labeled for this category" (masked out of a loss).
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledTextRecord {
    pub text: String,
    pub labels: Vec<String>,
    /// Categories this row carries no judgement for.
    pub unlabeled: Vec<String>,
}

impl LabeledTextRecord {
    /// The boolean category columns of a file in the one-column-per-category layout.
    pub fn boolean_categories(source: &ParquetSource) -> Vec<String> {
        source
            .schema()
            .fields()
            .iter()
            .filter(|f| f.data_type() == &DataType::Boolean)
            .map(|f| f.name().clone())
            .collect()
    }
}

impl Record for LabeledTextRecord {
    const KIND: Kind = Kind::LabeledText;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        let mut needed = require_all(source, columns, &[("text", ColumnType::Str)])?;
        if source.optional(columns.get("labels"), ColumnType::StrList)? {
            needed.push(columns.get("labels").to_string());
        } else {
            let categories = Self::boolean_categories(source);
            if categories.is_empty() {
                return Err(bad_input(
                    source.path(),
                    format!(
                        "no column `labels` (list<string>) and no boolean category columns; columns: {}",
                        source.column_names()
                    ),
                ));
            }
            needed.extend(categories);
        }
        Ok(needed)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let texts = batch.strings(columns.get("text"))?;
        let labels_name = columns.get("labels");
        let mut rows: Vec<Self> = string_values(&texts)
            .map(|text| LabeledTextRecord { text, labels: Vec::new(), unlabeled: Vec::new() })
            .collect();
        if batch.column(labels_name).is_some() {
            for (row, labels) in rows.iter_mut().zip(batch.string_lists(labels_name)?) {
                row.labels = labels;
            }
            return Ok(rows);
        }
        let categories: Vec<String> = batch
            .data
            .schema()
            .fields()
            .iter()
            .filter(|f| f.data_type() == &DataType::Boolean)
            .map(|f| f.name().clone())
            .collect();
        for category in categories {
            let flags: BooleanArray = batch.optional_bools(&category)?;
            for (i, row) in rows.iter_mut().enumerate() {
                match flags.is_valid(i).then(|| flags.value(i)) {
                    Some(true) => row.labels.push(category.clone()),
                    Some(false) => {}
                    None => row.unlabeled.push(category.clone()),
                }
            }
        }
        Ok(rows)
    }

    fn fields() -> Vec<Field> {
        vec![field("text", DataType::Utf8, false), field("labels", list_of(DataType::Utf8), false)]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        let values = strings(rows.iter().flat_map(|r| r.labels.iter().map(String::as_str)));
        vec![
            strings(rows.iter().map(|r| r.text.as_str())),
            list_array(DataType::Utf8, rows.iter().map(|r| r.labels.len()), values),
        ]
    }
}

/// One red-team finding: an attempt judged by one detector.
#[derive(Clone, Debug, PartialEq)]
pub struct FindingRecord {
    pub probe: String,
    pub category: String,
    pub prompt: String,
    pub response: String,
    pub detector: String,
    pub score: f64,
    pub success: bool,
    pub attribute: Option<String>,
    pub group: Option<String>,
}

impl Record for FindingRecord {
    const KIND: Kind = Kind::Findings;

    fn check(source: &ParquetSource, columns: &ColumnMap) -> Result<Vec<String>> {
        let mut needed = require_all(
            source,
            columns,
            &[
                ("probe", ColumnType::Str),
                ("category", ColumnType::Str),
                ("prompt", ColumnType::Str),
                ("response", ColumnType::Str),
                ("detector", ColumnType::Str),
                ("score", ColumnType::Float),
                ("success", ColumnType::Bool),
            ],
        )?;
        needed.extend(optional_columns(source, columns, &[("attribute", ColumnType::Str), ("group", ColumnType::Str)])?);
        Ok(needed)
    }

    fn read(batch: &Batch, columns: &ColumnMap) -> Result<Vec<Self>> {
        let s = |name| batch.strings(columns.get(name));
        let (probes, categories, prompts, responses, detectors) =
            (s("probe")?, s("category")?, s("prompt")?, s("response")?, s("detector")?);
        let scores = batch.f64s(columns.get("score"))?;
        let successes = batch.bools(columns.get("success"))?;
        let attributes = optional_string_values(batch, columns.get("attribute"))?;
        let groups = optional_string_values(batch, columns.get("group"))?;
        Ok((0..batch.len())
            .map(|i| FindingRecord {
                probe: probes.value(i).into(),
                category: categories.value(i).into(),
                prompt: prompts.value(i).into(),
                response: responses.value(i).into(),
                detector: detectors.value(i).into(),
                score: scores.value(i),
                success: successes.value(i),
                attribute: attributes[i].clone(),
                group: groups[i].clone(),
            })
            .collect())
    }

    fn fields() -> Vec<Field> {
        let text = |name| field(name, DataType::Utf8, false);
        vec![
            text("probe"),
            text("category"),
            text("prompt"),
            text("response"),
            text("detector"),
            field("score", DataType::Float64, false),
            field("success", DataType::Boolean, false),
            field("attribute", DataType::Utf8, true),
            field("group", DataType::Utf8, true),
        ]
    }

    fn to_arrays(rows: &[Self]) -> Vec<ArrayRef> {
        let text = |f: fn(&FindingRecord) -> &str| strings(rows.iter().map(f));
        vec![
            text(|r| &r.probe),
            text(|r| &r.category),
            text(|r| &r.prompt),
            text(|r| &r.response),
            text(|r| &r.detector),
            f64s(rows.iter().map(|r| r.score)),
            Arc::new(rows.iter().map(|r| Some(r.success)).collect::<BooleanArray>()),
            optional_strings(rows.iter().map(|r| r.attribute.as_deref())),
            optional_strings(rows.iter().map(|r| r.group.as_deref())),
        ]
    }
}

#[cfg(test)]
mod tests;
