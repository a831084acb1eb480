//! Sampling responses: prompts (text, or chat messages rendered with the model's template) are
//! left-padded into batches and decoded through the KV cache with greedy, temperature, top-k
//! and top-p sampling. Each (prompt, sample) has its own random stream derived from the seed,
//! so results do not depend on batch size or order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::datatypes::{Field, Schema};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand::rngs::StdRng;
use serde_json::Value;

use crate::cli;
use crate::data::records::{Prompt, PromptRecord, Record, ResponseRecord};
use crate::data::{ColumnMap, Kind, Message, ParquetSink, ParquetSource, meta};
use crate::data::parquet_io::lathe_metadata;
use crate::error::{Result, bad_input, usage};
use crate::model::{ChatTemplate, ForwardOptions, KvCache, Decoder, ModelFolder, fastexp, simd};
use crate::output;
use crate::progress::{Progress, Unit};
use crate::tokenizer::LoadedTokenizer;

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }

    /// Pick the next token from raw logits.
    pub fn pick(&self, logits: &[f32], rng: &mut StdRng) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let inverse_t = 1.0 / self.temperature as f32;
        if self.top_k == 0 && self.top_p >= 1.0 {
            return sample_all(logits, inverse_t, rng);
        }
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inverse_t)).collect();
        if self.top_k > 0 && self.top_k < candidates.len() {
            // The k-th largest value in linear time; ties with it are kept, as transformers does.
            let mut values: Vec<f32> = candidates.iter().map(|c| c.1).collect();
            let (_, &mut threshold, _) = values.select_nth_unstable_by(self.top_k - 1, |a, b| b.total_cmp(a));
            candidates.retain(|&(_, l)| l >= threshold);
        }
        let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for candidate in &mut candidates {
            candidate.1 = fastexp::exp(candidate.1 - max);
            total += candidate.1;
        }
        if self.top_p < 1.0 {
            // Only the nucleus needs an order: most likely first, ties by id.
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cumulative = 0f32;
            let keep = candidates
                .iter()
                .position(|c| {
                    cumulative += c.1 / total;
                    cumulative >= self.top_p as f32
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep.max(1));
            total = candidates.iter().map(|c| c.1).sum();
        }
        let mut draw = rng.random::<f32>() * total;
        for &(id, weight) in &candidates {
            if draw < weight {
                return id;
            }
            draw -= weight;
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// A draw from `softmax(logits / t)` over the whole vocabulary, in the order of the ids.
fn sample_all(logits: &[f32], inverse_t: f32, rng: &mut StdRng) -> u32 {
    let mut weights: Vec<f32> = logits.iter().map(|&l| l * inverse_t).collect();
    let total = simd::widest!({
        let max = simd::max(&weights);
        fastexp::exp_shifted_in_place(&mut weights, max);
        fastexp::sum(&weights)
    });
    let mut draw = rng.random::<f32>() * total;
    for (id, &weight) in weights.iter().enumerate() {
        if draw < weight {
            return id as u32;
        }
        draw -= weight;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

/// The first index of the largest value (0 when there is none but NaN).
fn argmax(values: &[f32]) -> u32 {
    let max = simd::widest!({ simd::max(values) });
    values.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// `log softmax(logits)[token]`: f32 exponentials, summed in f64 (in lanes of 16, the
/// order fixed whatever the vector width).
fn log_prob(logits: &[f32], token: u32) -> f64 {
    simd::widest!({
        let max = simd::max(logits);
        let mut lanes = [0f64; 16];
        let chunks = logits.chunks_exact(16);
        let tail: f64 = chunks.remainder().iter().map(|&l| fastexp::exp(l - max) as f64).sum();
        for chunk in chunks {
            for (lane, &l) in lanes.iter_mut().zip(chunk) {
                *lane += fastexp::exp(l - max) as f64;
            }
        }
        let sum = lanes.iter().sum::<f64>() + tail;
        (logits[token as usize] - max) as f64 - sum.ln()
    })
}

/// The random stream of one (prompt, sample): independent of batching.
pub fn sample_rng(seed: u64, prompt: u64, sample: u64) -> StdRng {
    let mut x = seed ^ prompt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sample.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    // splitmix64 finaliser: nearby inputs give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(x ^ (x >> 31))
}

/// One finished sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// New tokens, without the EOS that ended them.
    pub tokens: Vec<u32>,
    /// Sum of the model's log-probabilities of the generated tokens (EOS included).
    pub logprob: f64,
    /// Ended by an EOS token (`stop`) rather than the length limit (`length`).
    pub stopped: bool,
}

/// Decodes batches of prompts with one model.
pub struct Generator<'a> {
    pub model: &'a Decoder,
    pub eos: Vec<u32>,
    pub pad: u32,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
}

impl Generator<'_> {
    /// Complete every prompt; `rngs[i]` drives sequence `i`. `on_tokens` hears of progress.
    pub fn run(&self, prompts: &[Vec<u32>], rngs: &mut [StdRng], mut on_tokens: impl FnMut(u64)) -> Result<Vec<Completion>> {
        self.run_observed(prompts, rngs, |chosen, _| on_tokens(chosen.iter().flatten().count() as u64))
    }

    /// [`Generator::run`], with `observe(chosen, done)` called after every step: `chosen[i]`
    /// is the token sequence `i` picked this step (`None` once it is done), and `done[i]` is
    /// already true when that token was an EOS. Setting `done[i]` stops sequence `i` there
    /// (a server's cancellation, stop strings or per-request length); when every sequence is
    /// done decoding ends.
    pub fn run_observed(
        &self,
        prompts: &[Vec<u32>],
        rngs: &mut [StdRng],
        mut observe: impl FnMut(&[Option<u32>], &mut [bool]),
    ) -> Result<Vec<Completion>> {
        let device = self.model.device().clone();
        let b = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.iter().any(Vec::is_empty) {
            return Err(usage("a prompt encodes to no tokens"));
        }
        let padded = prompts.iter().any(|p| p.len() != longest);
        let mut ids = Vec::with_capacity(b * longest);
        let mut mask = Vec::with_capacity(b * longest);
        let mut positions = Vec::with_capacity(b * longest);
        for prompt in prompts {
            let pad = longest - prompt.len();
            ids.extend(std::iter::repeat_n(self.pad, pad).chain(prompt.iter().copied()));
            mask.extend(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1, prompt.len())));
            positions.extend((0..longest).map(|j| j.saturating_sub(pad) as u32));
        }
        let mut cache = self.model.cache_for(longest + self.max_new_tokens);
        let mut mask_tensor = Tensor::from_vec(mask, (b, longest), &device)?;
        let position_tensor = Tensor::from_vec(positions, (b, longest), &device)?;
        let options = if padded {
            ForwardOptions { attention_mask: Some(&mask_tensor), position_ids: Some(&position_tensor), segment_ids: None }
        } else {
            ForwardOptions::default()
        };
        let input = Tensor::from_vec(ids, (b, longest), &device)?;
        let mut logits = self.last_logits(&input, options, &mut cache)?;

        let mut next_position: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
        let mut done = vec![false; b];
        let mut out: Vec<Completion> = vec![Completion { tokens: Vec::new(), logprob: 0.0, stopped: false }; b];
        for step in 0..self.max_new_tokens {
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            let mut chosen = vec![self.pad; b];
            let active: Vec<usize> = (0..b).filter(|&i| !done[i]).collect();
            let mut picked: Vec<Option<u32>> = vec![None; b];
            for &i in &active {
                let token = self.sampling.pick(&rows[i], &mut rngs[i]);
                out[i].logprob += log_prob(&rows[i], token);
                if !self.ignore_eos && self.eos.contains(&token) {
                    out[i].stopped = true;
                    done[i] = true;
                } else {
                    out[i].tokens.push(token);
                }
                chosen[i] = token;
                picked[i] = Some(token);
            }
            observe(&picked, &mut done);
            if done.iter().all(|&d| d) || step + 1 == self.max_new_tokens {
                break;
            }
            let input = Tensor::from_vec(chosen, (b, 1), &device)?;
            logits = if padded {
                mask_tensor = Tensor::cat(&[&mask_tensor, &Tensor::ones((b, 1), DType::U32, &device)?], 1)?;
                let positions = Tensor::from_vec(next_position.clone(), (b, 1), &device)?;
                let options = ForwardOptions { attention_mask: Some(&mask_tensor), position_ids: Some(&positions), segment_ids: None };
                self.last_logits(&input, options, &mut cache)?
            } else {
                self.last_logits(&input, ForwardOptions::default(), &mut cache)?
            };
            next_position.iter_mut().for_each(|p| *p += 1);
        }
        Ok(out)
    }

    /// Logits of the last position of each row, `[B, vocab]`.
    fn last_logits(&self, input: &Tensor, options: ForwardOptions, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.model.forward(input, options, Some(cache))?;
        let t = hidden.dim(1)?;
        Ok(self.model.lm_logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)?)
    }
}

/// What `generate` and `ppo` do with a prompt that leaves too little room for the response.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptTruncation {
    /// Refuse the input, naming the row.
    #[default]
    None,
    /// Keep the end of the prompt (the question and the generation prompt), cut its start.
    Left,
}

/// Make room for `max_new_tokens` after `ids` within `limit` positions: cut the prompt at the
/// left if allowed (true when cut), else explain why it does not fit.
pub fn fit_prompt(ids: &mut Vec<u32>, max_new_tokens: usize, limit: usize, truncation: PromptTruncation) -> std::result::Result<bool, String> {
    if ids.len() + max_new_tokens <= limit {
        return Ok(false);
    }
    let room = limit.saturating_sub(max_new_tokens);
    if truncation == PromptTruncation::None || room == 0 {
        let hint = if room == 0 { "lower --max-new-tokens" } else { "pass --truncate-prompt left to keep the end of long prompts" };
        return Err(format!(
            "a prompt of {} tokens plus --max-new-tokens {max_new_tokens} exceeds the model's max_position_embeddings {limit}; {hint}",
            ids.len()
        ));
    }
    ids.drain(..ids.len() - room);
    Ok(true)
}

pub struct GenerateOptions {
    pub model: String,
    pub prompts: PathBuf,
    pub samples: usize,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub batch_size: usize,
    pub output: PathBuf,
    pub chat_template: Option<PathBuf>,
    pub ignore_eos: bool,
    pub truncate_prompt: PromptTruncation,
    pub device: Device,
    pub config: String,
    /// Print this many responses to the terminal when done.
    pub show: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct GenerateReport {
    pub prompts: u64,
    /// Prompts cut at the left to fit (`--truncate-prompt left`).
    pub truncated: u64,
    pub responses: u64,
    pub new_tokens: u64,
    pub seconds: f64,
}

impl GenerateReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.new_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Prompts of one input batch, ready to encode, with the rows to carry.
struct PromptBatch {
    rows: Vec<PromptRecord>,
    carried: Vec<ArrayRef>,
    first_row: u64,
}

pub fn generate(options: &GenerateOptions) -> Result<GenerateReport> {
    if options.samples == 0 {
        return Err(usage("-n must be at least 1"));
    }
    if options.max_new_tokens == 0 {
        return Err(usage("--max-new-tokens must be at least 1"));
    }
    if options.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    crate::limits::at_most("-n", options.samples, i32::MAX as usize, "the `sample` column is 32-bit")?;
    let prompts = PromptSource::open(&options.prompts)?;
    output::check_writable(&options.output)?;
    let folder = ModelFolder::open(&options.model)?;
    output::check_distinct(&options.output, &[&options.prompts, &folder.dir])?;
    footprint(options, &folder.config, prompts.rows_at_once()).check(&options.device)?;
    let template = chat_template(&folder, options.chat_template.as_deref())?;
    if prompts.needs_template && template.is_none() {
        return Err(bad_input(
            &options.prompts,
            format!("has chat `messages` but model {} has no chat template; pass --chat-template FILE", folder.dir.display()),
        ));
    }
    let tokenizer = folder.load_tokenizer()?;
    // The decoder keeps transposed copies of the projections: the loaded originals go now.
    let model = Decoder::new_inference(&folder.config, &folder.load_params(&options.device)?)?;
    let mut eos = folder.eos_token_ids();
    if eos.is_empty() {
        eos.extend(tokenizer.eos_id());
    }
    let generator = Generator {
        model: &model,
        eos,
        pad: folder.config.pad_token_id.or(tokenizer.eos_id()).unwrap_or(0),
        max_new_tokens: options.max_new_tokens,
        sampling: options.sampling,
        ignore_eos: options.ignore_eos,
    };

    let mut fields = ResponseRecord::fields();
    fields.extend(prompts.carried.iter().cloned());
    let schema = Arc::new(Schema::new(fields));
    let mut metadata = lathe_metadata(Kind::Responses, "generate");
    metadata.push((meta::CONFIG.to_string(), options.config.clone()));
    let mut sink = ParquetSink::create(&options.output, schema.clone(), metadata)?;

    let started = Instant::now();
    let bar = Progress::new("generating", None, Unit::Items("tokens"));
    let mut report = GenerateReport { prompts: 0, truncated: 0, responses: 0, new_tokens: 0, seconds: 0.0 };
    let mut shown: Vec<ResponseRecord> = Vec::new();
    for batch in prompts.batches()? {
        let batch = batch?;
        let encoded = encode_prompts(&batch, &tokenizer, template.as_ref(), &folder, options)?;
        report.truncated += encoded.truncated;
        let completions = complete(&generator, &encoded, batch.first_row, options, &bar)?;
        let responses = to_responses(&batch, &encoded, &completions, &tokenizer, options)?;
        shown.extend(responses.iter().take(options.show.saturating_sub(shown.len())).cloned());
        let take: Vec<u32> = (0..batch.rows.len() as u32).flat_map(|i| std::iter::repeat_n(i, options.samples)).collect();
        let take = UInt32Array::from(take);
        let mut columns = ResponseRecord::to_arrays(&responses);
        for column in &batch.carried {
            columns.push(arrow::compute::take(column, &take, None)?);
        }
        sink.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
        report.prompts += batch.rows.len() as u64;
        report.responses += responses.len() as u64;
        report.new_tokens += completions.iter().map(|c| c.tokens.len() as u64 + u64::from(c.stopped)).sum::<u64>();
    }
    bar.finish();
    if report.prompts == 0 {
        return Err(bad_input(&options.prompts, "holds no prompts"));
    }
    if report.truncated > 0 {
        crate::progress::warn(format!(
            "generate: {} of {} prompts were cut at the left to leave room for --max-new-tokens",
            report.truncated, report.prompts
        ));
    }
    sink.finish()?;
    report.seconds = started.elapsed().as_secs_f64();
    for response in &shown {
        crate::progress::log(format!(
            "── prompt {} sample {} ({}, {} tokens)\n{}\u{2502}{}",
            response.prompt_id, response.sample, response.finish_reason, response.num_tokens, response.prompt, response.response
        ));
    }
    Ok(report)
}

/// What one input batch holds at once: its (prompt, sample) jobs and their responses, and the
/// model decoding a group of them.
fn footprint(options: &GenerateOptions, config: &crate::model::ModelConfig, rows: usize) -> crate::limits::Footprint {
    let jobs = rows.saturating_mul(options.samples);
    let per_response = std::mem::size_of::<(usize, usize)>() + std::mem::size_of::<Option<Completion>>() + std::mem::size_of::<ResponseRecord>();
    crate::limits::Footprint::new(format!("-n {} × --batch-size {} × --max-new-tokens {}", options.samples, options.batch_size, options.max_new_tokens))
        .model(config)
        .add("the responses of one input batch", crate::limits::elements(&[jobs, per_response]))
        .decoding(config, options.batch_size.min(jobs), options.max_new_tokens.saturating_add(1))
}

/// The chat template for `messages` prompts: the file given, else the model's own.
pub fn chat_template(folder: &ModelFolder, file: Option<&Path>) -> Result<Option<ChatTemplate>> {
    match file {
        Some(path) => {
            let source = std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read: {e}")))?;
            Ok(Some(ChatTemplate::new(&source, Vec::new())?))
        }
        None => folder.chat(),
    }
}

/// The text a prompt turns into (chat `messages` rendered with a generation prompt) and its
/// token ids. Callers check that `messages` prompts have a template before any work.
pub fn encode_prompt(prompt: &Prompt, tokenizer: &LoadedTokenizer, template: Option<&ChatTemplate>) -> Result<(String, Vec<u32>)> {
    Ok(match prompt {
        Prompt::Text(text) => (text.clone(), tokenizer.encode_prompt(text)?),
        Prompt::Messages(messages) => {
            let rendered = template.expect("checked before work").render(messages, true)?;
            let ids = tokenizer.encode_with_specials(&rendered)?;
            (rendered, ids)
        }
    })
}

/// A prompt ready to decode: its id, the text it was rendered to, and its token ids.
#[derive(Clone, Debug)]
pub struct ReadyPrompt {
    pub prompt_id: String,
    pub text: String,
    pub ids: Vec<u32>,
    /// Row in its file, for error lines.
    pub row: u64,
}

/// Every prompt of a Parquet or JSONL file, rendered with `template` when it holds chat
/// `messages`, and encoded. Lengths are the caller's to check.
pub fn read_prompts(path: &Path, tokenizer: &LoadedTokenizer, template: Option<&ChatTemplate>) -> Result<Vec<ReadyPrompt>> {
    let source = PromptSource::open(path)?;
    if source.needs_template && template.is_none() {
        return Err(bad_input(path, "has chat `messages` but the model has no chat template; pass --chat-template FILE"));
    }
    let mut prompts = Vec::new();
    for batch in source.batches()? {
        let batch = batch?;
        for (i, row) in batch.rows.iter().enumerate() {
            let row_number = batch.first_row + i as u64;
            let (text, ids) = encode_prompt(&row.prompt, tokenizer, template)?;
            if ids.is_empty() {
                return Err(bad_input(path, format!("row {row_number}: the prompt is empty")));
            }
            let prompt_id = row.prompt_id.clone().unwrap_or_else(|| row_number.to_string());
            prompts.push(ReadyPrompt { prompt_id, text, ids, row: row_number });
        }
    }
    Ok(prompts)
}

/// The prompt text each row turns into, and its token ids.
struct Encoded {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    truncated: u64,
}

fn encode_prompts(
    batch: &PromptBatch,
    tokenizer: &LoadedTokenizer,
    template: Option<&ChatTemplate>,
    folder: &ModelFolder,
    options: &GenerateOptions,
) -> Result<Encoded> {
    let mut encoded = Encoded { texts: Vec::new(), ids: Vec::new(), truncated: 0 };
    for (i, row) in batch.rows.iter().enumerate() {
        let (text, mut ids) = encode_prompt(&row.prompt, tokenizer, template)?;
        let row_number = batch.first_row + i as u64;
        if ids.is_empty() {
            return Err(bad_input(&options.prompts, format!("row {row_number}: the prompt is empty")));
        }
        let limit = folder.config.max_position_embeddings;
        let cut = fit_prompt(&mut ids, options.max_new_tokens, limit, options.truncate_prompt)
            .map_err(|why| bad_input(&options.prompts, format!("row {row_number}: {why}")))?;
        encoded.truncated += u64::from(cut);
        encoded.texts.push(text);
        encoded.ids.push(ids);
    }
    Ok(encoded)
}

/// Every sample of every prompt of the batch, in (prompt, sample) order. Sequences of similar
/// length are batched together to waste little on padding.
fn complete(generator: &Generator, encoded: &Encoded, first_row: u64, options: &GenerateOptions, bar: &Progress) -> Result<Vec<Completion>> {
    let mut jobs: Vec<(usize, usize)> =
        (0..encoded.ids.len()).flat_map(|p| (0..options.samples).map(move |s| (p, s))).collect();
    jobs.sort_by_key(|&(p, _)| encoded.ids[p].len());
    let mut results: Vec<Option<Completion>> = vec![None; jobs.len()];
    for group in jobs.chunks(options.batch_size) {
        cli::check_interrupt()?;
        let prompts: Vec<Vec<u32>> = group.iter().map(|&(p, _)| encoded.ids[p].clone()).collect();
        let mut rngs: Vec<StdRng> =
            group.iter().map(|&(p, s)| sample_rng(options.seed, first_row + p as u64, s as u64)).collect();
        let completions = generator.run(&prompts, &mut rngs, |n| bar.inc(n))?;
        for (&(p, s), completion) in group.iter().zip(completions) {
            results[p * options.samples + s] = Some(completion);
        }
    }
    Ok(results.into_iter().map(|c| c.expect("every job ran")).collect())
}

fn to_responses(
    batch: &PromptBatch,
    encoded: &Encoded,
    completions: &[Completion],
    tokenizer: &LoadedTokenizer,
    options: &GenerateOptions,
) -> Result<Vec<ResponseRecord>> {
    let mut responses = Vec::with_capacity(completions.len());
    for (p, row) in batch.rows.iter().enumerate() {
        let prompt_id = row.prompt_id.clone().unwrap_or_else(|| (batch.first_row + p as u64).to_string());
        for s in 0..options.samples {
            let c = &completions[p * options.samples + s];
            responses.push(ResponseRecord {
                prompt_id: prompt_id.clone(),
                prompt: encoded.texts[p].clone(),
                response: tokenizer.decode(&c.tokens)?,
                sample: s as i32,
                model: options.model.clone(),
                finish_reason: if c.stopped { "stop" } else { "length" }.into(),
                num_tokens: c.tokens.len() as i32,
                logprob: c.logprob,
            });
        }
    }
    Ok(responses)
}

/// Prompts from Parquet (`prompt` or `messages`, optional `prompt_id`, other columns carried
/// to the output) or JSONL (objects with the same fields).
struct PromptSource {
    parquet: Option<crate::data::records::RecordReader<PromptRecord>>,
    jsonl: Option<Vec<PromptRecord>>,
    carried: Vec<Field>,
    needs_template: bool,
}

impl PromptSource {
    fn open(path: &Path) -> Result<Self> {
        let is_jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
        if is_jsonl {
            let rows = read_jsonl_prompts(path)?;
            let needs_template = rows.iter().any(|r| matches!(r.prompt, Prompt::Messages(_)));
            return Ok(PromptSource { parquet: None, jsonl: Some(rows), carried: Vec::new(), needs_template });
        }
        let source = ParquetSource::open(path)?;
        let reader = crate::data::records::RecordReader::<PromptRecord>::from_source(source, ColumnMap::default())?;
        let response_names: Vec<String> = ResponseRecord::fields().iter().map(|f| f.name().clone()).collect();
        let carried = reader
            .source()
            .schema()
            .fields()
            .iter()
            .filter(|f| !response_names.contains(f.name()))
            .map(|f| f.as_ref().clone())
            .collect();
        let needs_template = !reader.source().has_column("prompt");
        if reader.source().num_rows() == 0 {
            return Err(bad_input(reader.source().path(), "holds no prompts"));
        }
        Ok(PromptSource { parquet: Some(reader), jsonl: None, carried, needs_template })
    }

    /// Prompts read (and answered) together: one record batch, or a whole JSONL file.
    fn rows_at_once(&self) -> usize {
        match (&self.jsonl, &self.parquet) {
            (Some(rows), _) => rows.len(),
            (None, Some(reader)) => (reader.source().num_rows() as usize).min(crate::data::parquet_io::DEFAULT_BATCH_ROWS),
            (None, None) => 0,
        }
    }

    fn batches(&self) -> Result<Box<dyn Iterator<Item = Result<PromptBatch>> + '_>> {
        if let Some(rows) = &self.jsonl {
            let batch = PromptBatch { rows: rows.clone(), carried: Vec::new(), first_row: 0 };
            return Ok(Box::new(std::iter::once(Ok(batch))));
        }
        let reader = self.parquet.as_ref().expect("a Parquet source");
        let carried = self.carried.clone();
        Ok(Box::new(reader.batches()?.map(move |item| {
            let (rows, batch) = item?;
            let columns = carried.iter().map(|f| batch.column(f.name()).expect("read with all columns").clone()).collect();
            Ok(PromptBatch { rows, carried: columns, first_row: batch.first_row })
        })))
    }
}

fn read_jsonl_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad_input(path, "no such file"),
        _ => bad_input(path, format!("cannot read: {e}")),
    })?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |what: String| bad_input(path, format!("line {}: {what}", n + 1));
        let value: Value = serde_json::from_str(line).map_err(|e| at(format!("not a JSON object ({e})")))?;
        let prompt_id = value.get("prompt_id").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        let prompt = match (value.get("prompt"), value.get("messages")) {
            (Some(Value::String(text)), _) => Prompt::Text(text.clone()),
            (_, Some(messages)) => Prompt::Messages(
                serde_json::from_value::<Vec<Message>>(messages.clone())
                    .map_err(|e| at(format!("`messages`: expected a list of {{role, content}} ({e})")))?,
            ),
            _ => return Err(at("expected a string `prompt` or a `messages` list".into())),
        };
        rows.push(PromptRecord { prompt_id, prompt });
    }
    if rows.is_empty() {
        return Err(bad_input(path, "holds no prompts"));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny")
    }

    #[test]
    fn greedy_continuations_match_transformers_alone_and_left_padded() {
        let folder = ModelFolder::open(fixture().join("causal-lm").to_str().unwrap()).unwrap();
        let params = folder.load_params(&Device::Cpu).unwrap();
        let model = Decoder::new_inference(&folder.config, &params).unwrap();
        let expected = candle_core::safetensors::load(fixture().join("expected_logits.safetensors"), &Device::Cpu).unwrap();
        let ids = |name: &str| -> Vec<u32> { expected[name].to_dtype(DType::U32).unwrap().to_vec1().unwrap() };
        let prompts = vec![ids("input_ids.0"), ids("input_ids.1")];
        let generator = Generator { model: &model, eos: vec![0], pad: 3, max_new_tokens: 16, sampling: Sampling::greedy(), ignore_eos: false };
        let mut rngs: Vec<StdRng> = (0..2).map(|i| sample_rng(0, i, 0)).collect();
        let batched = generator.run(&prompts, &mut rngs, |_| {}).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = generator.run(std::slice::from_ref(prompt), &mut rngs[..1], |_| {}).unwrap();
            let want = ids(&format!("greedy.{i}"));
            assert_eq!(alone[0].tokens, want, "probe {i} alone");
            assert_eq!(batched[i].tokens, want, "probe {i} in a padded batch");
            let want_logprob: f32 = expected[&format!("greedy_logprob.{i}")].to_vec1::<f32>().unwrap()[0];
            assert!((alone[0].logprob - want_logprob as f64).abs() < 1e-3, "probe {i}: {} vs {want_logprob}", alone[0].logprob);
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = sample_rng(1, 0, 0);
        assert_eq!(Sampling::greedy().pick(&[0.1, 3.0, 3.0, -1.0], &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let logits = [1.0, 5.0, 2.0, 4.9];
        let mut rng = sample_rng(3, 1, 2);
        let top1 = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0 };
        assert!((0..50).all(|_| top1.pick(&logits, &mut rng) == 1));
        let nucleus = Sampling { temperature: 1.0, top_k: 0, top_p: 0.5 };
        assert!((0..50).all(|_| nucleus.pick(&logits, &mut rng) == 1));
        let wide = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
        let picks: std::collections::BTreeSet<u32> = (0..200).map(|_| wide.pick(&logits, &mut rng)).collect();
        assert_eq!(picks, [1, 3].into_iter().collect());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0f32, (3f32).ln()];
        let mut rng = sample_rng(9, 0, 0);
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let ones = (0..4000).filter(|_| s.pick(&logits, &mut rng) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones} of 4000, expected about 3000");
    }

    #[test]
    fn streams_differ_by_prompt_and_sample_but_repeat_by_seed() {
        let draw = |mut r: StdRng| (0..4).map(|_| r.random::<u32>()).collect::<Vec<_>>();
        assert_eq!(draw(sample_rng(5, 1, 2)), draw(sample_rng(5, 1, 2)));
        assert_ne!(draw(sample_rng(5, 1, 2)), draw(sample_rng(5, 2, 1)));
        assert_ne!(draw(sample_rng(5, 1, 2)), draw(sample_rng(6, 1, 2)));
    }
}
