//! Byte-level BPE tokenizers in Hugging Face's `tokenizer.json` format: train, encode, decode,
//! inspect. Every byte is in the base alphabet, so any text round-trips exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use arrow::array::ArrayRef;
use arrow::datatypes::Field;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::cli;
use crate::data::parquet_io::{ParquetSource, lathe_metadata, DEFAULT_BATCH_ROWS};
use crate::data::text::{DocBatch, TextInput, TextOptions, open_inputs};
use crate::data::{ColumnType, Kind, ParquetSink, TextRecord, TokensRecord, meta};
use crate::data::records::Record;
use crate::error::{Error, Result, bad_input, usage};
use crate::output::{self, write_atomic};
use crate::progress::{self, Progress, Unit};

pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const PAD_TOKEN: &str = "<|pad|>";
pub const IM_START_TOKEN: &str = "<|im_start|>";
pub const IM_END_TOKEN: &str = "<|im_end|>";
/// Special tokens of every tokenizer we train, with ids 0..4 in this order.
pub const SPECIAL_TOKENS: [&str; 4] = [EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN];

/// Text per encode batch: big enough to keep all threads busy, small enough to bound memory.
const ENCODE_BATCH_BYTES: usize = 4 << 20;

/// A tokenizer with the facts stages check it by.
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    /// SHA-256 of the canonical JSON (formatting-independent), recorded in token files.
    pub sha256: String,
    /// Size including added tokens: the embedding rows a model needs.
    pub vocab_size: usize,
    /// The EOS token named by a model folder's `tokenizer_config.json`, when known.
    pub eos_token: Option<String>,
    /// A copy that encodes special-token strings as plain text (for documents).
    literal: Tokenizer,
}

impl LoadedTokenizer {
    /// Load `tokenizer.json`, or the one in a model folder (taking its EOS token from
    /// `tokenizer_config.json`). A missing or corrupt file is bad input.
    pub fn load(path: &Path) -> Result<Self> {
        let (file, eos_token) = if path.is_dir() {
            let file = path.join("tokenizer.json");
            (file, crate::model::folder::read_eos_token(path)?)
        } else {
            (path.to_path_buf(), None)
        };
        if !file.exists() {
            return Err(bad_input(&file, "no such file, expected a tokenizer.json"));
        }
        let bytes = std::fs::read(&file).map_err(|e| bad_input(&file, format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| bad_input(&file, "not a valid tokenizer.json (not UTF-8 text)"))?;
        if text.trim().is_empty() {
            return Err(bad_input(&file, "empty file, expected a tokenizer.json"));
        }
        // Check the JSON syntax first: tokenizers panics (rather than errs) on some broken JSON.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| bad_input(&file, format!("not a valid tokenizer.json ({e})")))?;
        let tokenizer: Tokenizer = text
            .parse()
            .map_err(|e| bad_input(&file, format!("not a valid tokenizer.json ({e})")))?;
        Self::from_tokenizer(tokenizer, &file, eos_token)
    }

    pub fn from_tokenizer(tokenizer: Tokenizer, path: &Path, eos_token: Option<String>) -> Result<Self> {
        let sha256 = canonical_sha256(&tokenizer)?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        Ok(LoadedTokenizer { tokenizer, path: path.to_path_buf(), sha256, vocab_size, eos_token, literal })
    }

    /// Id of the end-of-sequence token: the folder's, else `<|endoftext|>`.
    pub fn eos_id(&self) -> Option<u32> {
        self.tokenizer.token_to_id(self.eos_token.as_deref().unwrap_or(EOS_TOKEN))
    }

    pub fn special_tokens(&self) -> Vec<(u32, String)> {
        let mut specials: Vec<(u32, String)> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort();
        specials
    }

    /// Encode documents in parallel. Special-token strings inside the text are encoded as
    /// ordinary text, so a document can never forge an EOS or a chat marker.
    pub fn encode_documents(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        // Each `Encoding` (a string per token, several vectors) is dropped as soon as its ids
        // are copied out, so memory stays small and is reused instead of freshly paged in.
        texts
            .par_iter()
            .map(|text| Ok(self.literal.encode_fast(text.as_str(), false)?.get_ids().to_vec()))
            .collect()
    }

    /// Encode a plain-text prompt as transformers' `tokenizer(prompt)` does: special-token
    /// strings are special, and the post-processor adds what it adds (a BOS for Llama 2, …).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_fast(text, true)?.get_ids().to_vec())
    }

    /// Encode text in which special-token strings (chat markers) are meant as special tokens.
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_fast(text, false)?.get_ids().to_vec())
    }

    /// Ids and the byte range each token came from, special-token strings meant as special.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let encoding = self.tokenizer.encode(text, add_special_tokens)?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Add special tokens the tokenizer lacks; returns the ones added (the vocabulary grows).
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<Vec<String>> {
        let missing: Vec<String> =
            tokens.iter().filter(|t| self.tokenizer.token_to_id(t).is_none()).map(|t| t.to_string()).collect();
        if missing.is_empty() {
            return Ok(missing);
        }
        let added: Vec<AddedToken> = missing.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
        self.tokenizer.add_special_tokens(added)?;
        *self = Self::from_tokenizer(self.tokenizer.clone(), &self.path, self.eos_token.clone())?;
        Ok(missing)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.tokenizer.decode(ids, false)?)
    }

}

/// A model that reads the policy's token ids (a value model, a reference) must give each of the
/// policy's tokens the same id (it may have more, e.g. a pad token a reward model added).
pub fn check_same_vocabulary(policy: &LoadedTokenizer, other: &LoadedTokenizer, dir: &Path, flag: &str) -> Result<()> {
    let theirs = other.tokenizer.get_vocab(true);
    let mismatch = policy.tokenizer.get_vocab(true).into_iter().find(|(token, id)| theirs.get(token) != Some(id));
    match mismatch {
        None => Ok(()),
        Some((token, id)) => Err(bad_input(
            dir,
            format!("{flag}: its tokenizer differs from the policy's (token {token:?} is id {id} in the policy's); it must read the policy's token ids"),
        )),
    }
}

/// SHA-256 of the tokenizer's canonical (library-serialised, compact) JSON.
pub fn canonical_sha256(tokenizer: &Tokenizer) -> Result<String> {
    let canonical = tokenizer.to_string(false)?;
    Ok(hex(&Sha256::digest(canonical.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh byte-level BPE tokenizer (GPT-2 split regex, no normaliser), untrained.
fn byte_level_bpe() -> Tokenizer {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
    tokenizer
}

// ---- train ----

pub struct TrainOptions {
    pub inputs: Vec<PathBuf>,
    pub text: TextOptions,
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub output: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub documents: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub vocab_size: usize,
    pub sha256: String,
}

pub fn train(options: &TrainOptions) -> Result<TrainReport> {
    let minimum = 256 + SPECIAL_TOKENS.len();
    if options.vocab_size < minimum {
        return Err(usage(format!(
            "--vocab-size {}: must be at least {minimum} (256 byte tokens + {} special tokens)",
            options.vocab_size,
            SPECIAL_TOKENS.len()
        )));
    }
    crate::limits::at_most("--vocab-size", options.vocab_size, u32::MAX as usize, "token ids are 32-bit")?;
    // The trainer reserves its tables for the whole vocabulary up front: a string, its id and
    // two hash entries per token at the least.
    crate::limits::Footprint::new(format!("--vocab-size {}", options.vocab_size))
        .add("the vocabulary tables", crate::limits::elements(&[options.vocab_size, 64]))
        .check(&candle_core::Device::Cpu)?;
    output::check_writable(&options.output)?;
    let inputs = open_inputs(&options.inputs, &options.text)?;
    let started = Instant::now();

    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(options.vocab_size)
            .min_frequency(options.min_frequency)
            .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build(),
    );
    let total: u64 = inputs.iter().map(TextInput::text_bytes).sum();
    let bar = Progress::new("reading text", Some(total), Unit::Bytes);
    let stream = DocumentStream::new(&inputs, &bar);
    let mut tokenizer = byte_level_bpe();
    let trained = tokenizer.train(&mut trainer, stream.iter());
    bar.finish();
    stream.into_result()?;
    trained?;
    let documents_bytes = bar.position();

    let loaded = LoadedTokenizer::from_tokenizer(tokenizer, &options.output, None)?;
    write_atomic(&options.output, loaded.tokenizer.to_string(false)?.as_bytes())?;
    Ok(TrainReport {
        documents: stream.documents(),
        bytes: documents_bytes,
        seconds: started.elapsed().as_secs_f64(),
        vocab_size: loaded.vocab_size,
        sha256: loaded.sha256,
    })
}

/// Documents of several inputs, one after another, for the trainer. Errors (bad rows,
/// interruption) end the stream and are reported after training returns.
struct DocumentStream<'a> {
    inputs: &'a [TextInput],
    progress: &'a Progress,
    error: Mutex<Option<Error>>,
    documents: Mutex<u64>,
}

impl<'a> DocumentStream<'a> {
    fn new(inputs: &'a [TextInput], progress: &'a Progress) -> Self {
        DocumentStream { inputs, progress, error: Mutex::new(None), documents: Mutex::new(0) }
    }

    fn iter(&self) -> impl Iterator<Item = String> + Send + '_ {
        self.inputs
            .iter()
            .flat_map(move |input| match input.batches(ENCODE_BATCH_BYTES) {
                Ok(batches) => batches,
                Err(e) => {
                    self.fail(e);
                    Box::new(std::iter::empty())
                }
            })
            .map_while(move |batch| {
                if self.failed() {
                    return None;
                }
                if let Err(e) = cli::check_interrupt() {
                    self.fail(e);
                    return None;
                }
                match batch {
                    Ok(batch) => {
                        self.progress.inc(batch.bytes);
                        *self.documents.lock().unwrap_or_else(|e| e.into_inner()) += batch.texts.len() as u64;
                        Some(batch.texts)
                    }
                    Err(e) => {
                        self.fail(e);
                        None
                    }
                }
            })
            .flatten()
    }

    fn documents(&self) -> u64 {
        *self.documents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, error: Error) {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(error);
    }

    fn failed(&self) -> bool {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn into_result(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None if self.documents() == 0 => {
                Err(usage("the inputs hold no documents"))
            }
            None => Ok(()),
        }
    }
}

// ---- encode ----

pub struct EncodeOptions {
    pub inputs: Vec<PathBuf>,
    pub text: TextOptions,
    pub tokenizer: PathBuf,
    pub append_eos: bool,
    pub output: PathBuf,
    /// The stage's resolved configuration, recorded in the output's metadata.
    pub config: String,
}

#[derive(Debug, Serialize)]
pub struct EncodeReport {
    pub documents: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl EncodeReport {
    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

pub fn encode(options: &EncodeOptions) -> Result<EncodeReport> {
    let tokenizer = LoadedTokenizer::load(&options.tokenizer)?;
    let eos = if options.append_eos {
        Some(tokenizer.eos_id().ok_or_else(|| {
            bad_input(
                &tokenizer.path,
                format!(
                    "no EOS token `{}` (special tokens: {}); pass --no-eos to encode without one",
                    tokenizer.eos_token.as_deref().unwrap_or(EOS_TOKEN),
                    tokenizer.special_tokens().iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )
        })?)
    } else {
        None
    };
    output::check_writable(&options.output)?;
    let inputs = open_inputs(&options.inputs, &options.text)?;

    let mut fields = vec![TokensRecord::field()];
    let carried = inputs.first().and_then(|i| i.carried_field().cloned());
    fields.extend(carried.clone());
    let mut metadata = lathe_metadata(Kind::Tokens, "tokenize");
    metadata.extend([
        (meta::TOKENIZER_SHA256.to_string(), tokenizer.sha256.clone()),
        (meta::VOCAB_SIZE.to_string(), tokenizer.vocab_size.to_string()),
        (meta::EOS_APPENDED.to_string(), eos.is_some().to_string()),
        (meta::CONFIG.to_string(), options.config.clone()),
    ]);
    if let Some(eos) = eos {
        metadata.push((meta::EOS_ID.to_string(), eos.to_string()));
    }
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
    let mut sink = ParquetSink::create(&options.output, schema.clone(), metadata)?;

    let started = Instant::now();
    let total: u64 = inputs.iter().map(TextInput::text_bytes).sum();
    let bar = Progress::new("encoding", Some(total), Unit::Bytes);
    let mut report = EncodeReport { documents: 0, tokens: 0, bytes: 0, seconds: 0.0 };
    for input in &inputs {
        for batch in input.batches(ENCODE_BATCH_BYTES)? {
            cli::check_interrupt()?;
            let DocBatch { texts, carried, bytes } = batch?;
            let mut ids = tokenizer.encode_documents(&texts)?;
            if let Some(eos) = eos {
                ids.iter_mut().for_each(|row| row.push(eos));
            }
            let mut columns: Vec<ArrayRef> = vec![TokensRecord::array(ids.iter().map(Vec::as_slice))];
            columns.extend(carried);
            sink.write(&arrow::array::RecordBatch::try_new(schema.clone(), columns)?)?;
            report.documents += texts.len() as u64;
            report.tokens += ids.iter().map(|r| r.len() as u64).sum::<u64>();
            report.bytes += bytes;
            bar.inc(bytes);
            bar.set_message(format!("{} tokens", report.tokens));
        }
    }
    bar.finish();
    if report.documents == 0 {
        return Err(usage("the inputs hold no documents"));
    }
    sink.finish()?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

// ---- decode ----

pub struct DecodeOptions {
    pub input: PathBuf,
    pub tokenizer: PathBuf,
    pub output: PathBuf,
    pub config: String,
}

#[derive(Debug, Serialize)]
pub struct DecodeReport {
    pub rows: u64,
    pub tokens: u64,
}

/// Refuse token files written with another tokenizer (by hash) or holding ids out of range.
pub fn check_tokens_match(source: &ParquetSource, tokenizer: &LoadedTokenizer) -> Result<()> {
    if let Some(recorded) = source.meta(meta::TOKENIZER_SHA256) {
        if recorded != tokenizer.sha256 {
            return Err(bad_input(
                source.path(),
                format!(
                    "written with tokenizer sha256 {}…, but {} has sha256 {}…; use the tokenizer the file was encoded with",
                    &recorded[..recorded.len().min(12)],
                    tokenizer.path.display(),
                    &tokenizer.sha256[..12]
                ),
            ));
        }
    }
    if let Some(recorded) = source.meta(meta::VOCAB_SIZE).and_then(|v| v.parse::<usize>().ok()) {
        if recorded != tokenizer.vocab_size {
            return Err(bad_input(
                source.path(),
                format!("vocabulary size {recorded} recorded, tokenizer has {}", tokenizer.vocab_size),
            ));
        }
    }
    Ok(())
}

pub fn decode(options: &DecodeOptions) -> Result<DecodeReport> {
    let tokenizer = LoadedTokenizer::load(&options.tokenizer)?;
    let source = ParquetSource::open(&options.input)?;
    source.expect_kind(Kind::Tokens)?;
    source.require("input_ids", ColumnType::IntList)?;
    check_tokens_match(&source, &tokenizer)?;
    output::check_writable(&options.output)?;
    let eos_appended = source.meta(meta::EOS_APPENDED).map(|v| v == "true");
    let eos = tokenizer.eos_id();

    let carried: Vec<Field> = source
        .schema()
        .fields()
        .iter()
        .filter(|f| f.name() != "input_ids" && f.name() != "text")
        .map(|f| f.as_ref().clone())
        .collect();
    let mut fields = TextRecord::fields();
    fields.extend(carried.iter().cloned());
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
    let mut metadata = lathe_metadata(Kind::Text, "tokenize");
    metadata.push((meta::CONFIG.to_string(), options.config.clone()));
    let mut sink = ParquetSink::create(&options.output, schema.clone(), metadata)?;

    let bar = Progress::new("decoding", Some(source.num_rows()), Unit::Items("rows"));
    let mut report = DecodeReport { rows: 0, tokens: 0 };
    for batch in source.batches(None, DEFAULT_BATCH_ROWS)? {
        cli::check_interrupt()?;
        let batch = batch?;
        let lists = batch.token_ids("input_ids", tokenizer.vocab_size)?;
        let ids: Vec<Vec<u32>> = (0..lists.len()).map(|i| lists.row(i).iter().map(|&id| id as u32).collect()).collect();
        let mut rows: Vec<&[u32]> = Vec::with_capacity(ids.len());
        for row in &ids {
            let strip = match (eos_appended, eos, row.last()) {
                (Some(false), _, _) => false,
                (_, Some(eos), Some(&last)) => last == eos,
                _ => false,
            };
            rows.push(if strip { &row[..row.len() - 1] } else { row });
        }
        let texts: Vec<String> = tokenizer.tokenizer.decode_batch(&rows, false)?;
        let mut columns: Vec<ArrayRef> = vec![std::sync::Arc::new(arrow::array::StringArray::from(texts))];
        columns.extend(carried.iter().map(|f| batch.column(f.name()).expect("read with all columns").clone()));
        sink.write(&arrow::array::RecordBatch::try_new(schema.clone(), columns)?)?;
        report.rows += ids.len() as u64;
        report.tokens += ids.iter().map(|r| r.len() as u64).sum::<u64>();
        bar.inc(ids.len() as u64);
    }
    bar.finish();
    sink.finish()?;
    Ok(report)
}

// ---- inspect ----

/// A summary of a tokenizer.json, a model folder's tokenizer, or any Parquet file.
pub fn inspect(path: &Path) -> Result<Value> {
    if path.is_dir() || path.extension().is_some_and(|e| e == "json") {
        return inspect_tokenizer(path);
    }
    inspect_parquet(path)
}

fn inspect_tokenizer(path: &Path) -> Result<Value> {
    let loaded = LoadedTokenizer::load(path)?;
    let raw: Value = serde_json::from_str(&loaded.tokenizer.to_string(false)?)?;
    let model = &raw["model"];
    let kind_of = |v: &Value| v.get("type").and_then(Value::as_str).unwrap_or("none").to_string();
    Ok(json!({
        "file": loaded.path.display().to_string(),
        "kind": "tokenizer",
        "model": kind_of(model),
        "vocab_size": loaded.vocab_size,
        "base_vocab_size": loaded.tokenizer.get_vocab_size(false),
        "merges": model.get("merges").and_then(Value::as_array).map_or(0, Vec::len),
        "special_tokens": loaded.special_tokens().into_iter().map(|(id, t)| json!({"id": id, "token": t})).collect::<Vec<_>>(),
        "eos_token": loaded.eos_token.as_deref().unwrap_or(EOS_TOKEN),
        "eos_id": loaded.eos_id(),
        "normalizer": kind_of(&raw["normalizer"]),
        "pre_tokenizer": kind_of(&raw["pre_tokenizer"]),
        "decoder": kind_of(&raw["decoder"]),
        "sha256": loaded.sha256,
    }))
}

fn inspect_parquet(path: &Path) -> Result<Value> {
    let source = ParquetSource::open(path)?;
    let columns: Vec<Value> = source
        .schema()
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": crate::data::describe_type(f.data_type())}))
        .collect();
    let lathe: BTreeMap<&str, &str> = source
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("lathe.") && k.as_str() != meta::CONFIG)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut summary = json!({
        "file": source.path().display().to_string(),
        "kind": source.written_kind().map_or("parquet", Kind::name),
        "rows": source.num_rows(),
        "columns": columns,
        "metadata": lathe,
    });
    if source.has_column("input_ids") && ColumnType::IntList.accepts(source.schema().field_with_name("input_ids")?.data_type()) {
        summary["tokens"] = token_statistics(&source)?;
    }
    if source.has_column("text") && ColumnType::Str.accepts(source.schema().field_with_name("text")?.data_type()) {
        summary["text"] = text_statistics(&source)?;
    }
    Ok(summary)
}

fn text_statistics(source: &ParquetSource) -> Result<Value> {
    let (mut bytes, mut characters, mut rows) = (0u64, 0u64, 0u64);
    for batch in source.batches(Some(&["text"]), DEFAULT_BATCH_ROWS)? {
        let texts = batch?.optional_strings("text")?;
        for text in texts.iter().flatten() {
            bytes += text.len() as u64;
            characters += text.chars().count() as u64;
            rows += 1;
        }
    }
    Ok(json!({"bytes": bytes, "characters": characters, "non_null_rows": rows}))
}

fn token_statistics(source: &ParquetSource) -> Result<Value> {
    let mut lengths: Vec<u64> = Vec::with_capacity(source.num_rows() as usize);
    let mut max_id = 0i64;
    for batch in source.batches(Some(&["input_ids"]), DEFAULT_BATCH_ROWS)? {
        let batch = batch?;
        let lists = batch.int_lists("input_ids")?;
        for i in 0..lists.len() {
            let row = lists.row(i);
            lengths.push(row.len() as u64);
            max_id = max_id.max(row.iter().copied().max().unwrap_or(0) as i64);
        }
    }
    let total: u64 = lengths.iter().sum();
    let mut sorted = lengths.clone();
    sorted.sort_unstable();
    let percentile = |p: f64| -> u64 {
        if sorted.is_empty() { 0 } else { sorted[((sorted.len() - 1) as f64 * p).round() as usize] }
    };
    Ok(json!({
        "total": total,
        "mean_length": if lengths.is_empty() { 0.0 } else { total as f64 / lengths.len() as f64 },
        "min_length": sorted.first().copied().unwrap_or(0),
        "p50_length": percentile(0.5),
        "p90_length": percentile(0.9),
        "p99_length": percentile(0.99),
        "max_length": sorted.last().copied().unwrap_or(0),
        "max_id": max_id,
        "length_histogram": length_histogram(&lengths),
    }))
}

/// Rows per power-of-two length bucket: `"[16, 32)": n`.
fn length_histogram(lengths: &[u64]) -> Vec<Value> {
    let mut buckets: BTreeMap<u32, u64> = BTreeMap::new();
    for &len in lengths {
        let bucket = if len == 0 { 0 } else { 64 - len.leading_zeros() };
        *buckets.entry(bucket).or_default() += 1;
    }
    buckets
        .into_iter()
        .map(|(bucket, rows)| {
            let (low, high) = if bucket == 0 { (0, 1) } else { (1u64 << (bucket - 1), 1u64 << bucket) };
            json!({"from": low, "to": high, "rows": rows})
        })
        .collect()
}

/// The summary as lines for people.
pub fn render_inspection(summary: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, key: &str, value: String| out.push_str(&format!("{key:<20} {value}\n"));
    let show = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (key, value) in summary.as_object().into_iter().flatten() {
        match (key.as_str(), value) {
            ("special_tokens", Value::Array(tokens)) => {
                let list: Vec<String> = tokens.iter().map(|t| format!("{}={}", show(&t["token"]), t["id"])).collect();
                line(&mut out, key, list.join(" "));
            }
            ("columns", Value::Array(columns)) => {
                let list: Vec<String> = columns.iter().map(|c| format!("{}: {}", show(&c["name"]), show(&c["type"]))).collect();
                line(&mut out, key, list.join(", "));
            }
            ("metadata", Value::Object(entries)) => {
                for (k, v) in entries {
                    line(&mut out, k, show(v));
                }
            }
            ("text", Value::Object(stats)) => {
                for (k, v) in stats {
                    line(&mut out, &format!("text.{k}"), show(v));
                }
            }
            ("tokens", Value::Object(stats)) => {
                for (k, v) in stats {
                    if k == "length_histogram" {
                        continue;
                    }
                    line(&mut out, &format!("tokens.{k}"), match v {
                        Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
                        other => show(other),
                    });
                }
                out.push_str(&histogram_lines(&stats["length_histogram"]));
            }
            _ => line(&mut out, key, show(value)),
        }
    }
    out
}

fn histogram_lines(histogram: &Value) -> String {
    let buckets = histogram.as_array().cloned().unwrap_or_default();
    let most = buckets.iter().filter_map(|b| b["rows"].as_u64()).max().unwrap_or(1).max(1);
    let mut out = String::from("length histogram (tokens per row)\n");
    for bucket in buckets {
        let rows = bucket["rows"].as_u64().unwrap_or(0);
        let width = (40 * rows).div_ceil(most) as usize;
        out.push_str(&format!(
            "  [{:>6}, {:>6})  {:>8}  {}\n",
            bucket["from"],
            bucket["to"],
            rows,
            "#".repeat(width)
        ));
    }
    out
}

/// Human summary line after a stage finished.
pub fn log_report(what: &str, fields: &[(&str, String)]) {
    let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k} {v}")).collect();
    progress::log(format!("{what}: {}", parts.join(", ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_powers_of_two() {
        let h = length_histogram(&[0, 1, 2, 3, 4, 100]);
        let rows: Vec<(u64, u64)> = h.iter().map(|b| (b["from"].as_u64().unwrap(), b["rows"].as_u64().unwrap())).collect();
        assert_eq!(rows, vec![(0, 1), (1, 1), (2, 2), (4, 1), (64, 1)]);
    }

    #[test]
    fn fresh_tokenizer_has_byte_level_pieces() {
        let t = byte_level_bpe();
        let raw: Value = serde_json::from_str(&t.to_string(false).unwrap()).unwrap();
        assert_eq!(raw["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(raw["pre_tokenizer"]["add_prefix_space"], false);
        assert_eq!(raw["decoder"]["type"], "ByteLevel");
    }
}
