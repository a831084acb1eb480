//! Supervised fine-tuning: chat (`messages`) or prompt/completion data, rendered with the model's
//! chat template (ChatML when it has none), trained with next-token loss on the answers only.
//!
//! Which tokens are answers is found on the rendered text, not by tokenizing pieces apart (BPE
//! merges across piece boundaries): each assistant turn's span is the text its rendering adds
//! after the generation prompt, and a token is an answer token when it starts inside a span.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use serde_json::{Map, Value, json};

use crate::data::records::{ChatRecord, PromptCompletionRecord, RecordReader};
use crate::data::{Message, ParquetSource};
use crate::error::{Result, bad_input, usage};
use crate::model::chat::CHATML;
use crate::model::folder::{FolderParts, ModelFolder};
use crate::model::fused::IGNORE_INDEX;
use crate::model::lora::LoraSettings;
use crate::model::{ChatTemplate, Decoder, ForwardOptions, Head, ModelConfig, Params};
use crate::limits::Tuning;
use crate::train::tuned::{Start, TunedModel};
use crate::progress;
use crate::tokenizer::{IM_END_TOKEN, IM_START_TOKEN, LoadedTokenizer, PAD_TOKEN};
use crate::train::cursor::{EpochCursor, epoch_rng, shuffled};
use crate::train::sequences::{LengthReport, PackedRows, Truncation, kept_range};
use crate::train::{Evaluation, StepLoss, Task};

/// Batches are formed from windows of this many batches' worth of examples sorted by length,
/// so a batch holds similar lengths (little padding) while batch order stays random.
const LENGTH_GROUP_BATCHES: usize = 16;

pub struct SftOptions {
    pub inputs: Vec<PathBuf>,
    pub model: String,
    /// A Jinja chat template file to use instead of the model's.
    pub chat_template: Option<PathBuf>,
    /// Render prompt/completion rows as a user turn and an assistant turn.
    pub prompt_completion_as_chat: bool,
    pub train_on_prompt: bool,
    pub max_length: usize,
    pub truncation: Truncation,
    pub packing: bool,
    pub batch_size: usize,
    pub seed: u64,
    pub val: Option<PathBuf>,
    pub val_fraction: Option<f64>,
    pub eval_batches: usize,
    pub device: Device,
    /// Train a LoRA adapter on the frozen model instead of every weight.
    pub lora: Option<LoraSettings>,
    pub gradient_checkpointing: bool,
}

/// A rendered, tokenized sample: ids and whether each token is an answer token.
#[derive(Clone, Debug, PartialEq)]
pub struct Marked {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

/// One training sequence: input ids, the target at each position (the next id), and whether
/// the loss counts that target.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
    pub counted: Vec<bool>,
}

impl Example {
    /// Next-token targets of a marked sample: position `p` predicts token `p + 1`, counted when
    /// that token is an answer token.
    pub fn shifted(marked: &Marked) -> Self {
        let n = marked.ids.len();
        let targets = (0..n).map(|p| marked.ids.get(p + 1).copied().unwrap_or(IGNORE_INDEX)).collect();
        let counted = (0..n).map(|p| p + 1 < n && marked.trained[p + 1]).collect();
        Example { ids: marked.ids.clone(), targets, counted }
    }

    fn targets_counted(&self) -> usize {
        self.counted.iter().filter(|&&c| c).count()
    }
}

pub use crate::train::sequences::{Row, pack};

/// How conversations become text: the template, and how the answer tokens are found.
pub struct Renderer {
    template: Option<ChatTemplate>,
    train_on_prompt: bool,
    prompt_completion_as_chat: bool,
    eos_id: Option<u32>,
}

impl Renderer {
    /// Encode a conversation, marking every assistant turn's tokens (or all tokens with
    /// `--train-on-prompt`). `Ok(None)`: the conversation has no assistant turn to learn.
    pub fn chat(&self, tokenizer: &LoadedTokenizer, messages: &[Message]) -> std::result::Result<Option<Marked>, String> {
        let template = self.template.as_ref().ok_or("chat data needs a chat template")?;
        let render = |messages: &[Message], generation_prompt: bool| {
            template.render(messages, generation_prompt).map_err(|e| e.to_string())
        };
        let text = render(messages, false)?;
        let mut spans = Vec::new();
        for (k, message) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let prompt = render(&messages[..k], true)?;
            let through = render(&messages[..=k], false)?;
            if !through.starts_with(&prompt) || !text.starts_with(&through) {
                return Err(format!(
                    "the chat template does not render conversations incrementally (turn {k}, {}), so the assistant tokens cannot be found; pass --train-on-prompt or another --chat-template",
                    message.role
                ));
            }
            spans.push(prompt.len()..through.len());
        }
        if spans.is_empty() && !self.train_on_prompt {
            return Ok(None);
        }
        let (ids, offsets) = tokenizer.encode_with_offsets(&text, false).map_err(|e| e.to_string())?;
        Ok(Some(self.mark(ids, &offsets, &spans)))
    }

    /// A renderer for prompt/completion pairs scored on the completion only (as `dpo` reads
    /// them): text pairs become `prompt + completion + EOS`, chat pairs are rendered with
    /// `template`.
    pub fn for_completions(template: Option<ChatTemplate>, eos_id: Option<u32>) -> Self {
        Renderer { template, train_on_prompt: false, prompt_completion_as_chat: false, eos_id }
    }

    /// Encode a chat prompt and the turns that answer it (TRL's conversational
    /// prompt/completion): the answer is the text the whole conversation's rendering adds after
    /// the prompt's generation prompt.
    pub fn continuation(&self, tokenizer: &LoadedTokenizer, prompt: &[Message], completion: &[Message]) -> std::result::Result<Marked, String> {
        let template = self.template.as_ref().ok_or("chat data needs a chat template; pass --chat-template FILE")?;
        let head = template.render(prompt, true).map_err(|e| e.to_string())?;
        let conversation = [prompt, completion].concat();
        let text = template.render(&conversation, false).map_err(|e| e.to_string())?;
        if !text.starts_with(&head) {
            return Err("the chat template renders the prompt differently when an answer follows, so the answer tokens cannot be found; pass another --chat-template".into());
        }
        let (ids, offsets) = tokenizer.encode_with_offsets(&text, false).map_err(|e| e.to_string())?;
        Ok(self.mark(ids, &offsets, std::slice::from_ref(&(head.len()..text.len()))))
    }

    /// Encode a prompt/completion pair: the completion is the answer; EOS ends it (unless the
    /// completion already ends with it, as TRL checks).
    pub fn prompt_completion(&self, tokenizer: &LoadedTokenizer, prompt: &str, completion: &str) -> std::result::Result<Option<Marked>, String> {
        if self.prompt_completion_as_chat {
            return self.chat(tokenizer, &[Message::new("user", prompt), Message::new("assistant", completion)]);
        }
        let text = format!("{prompt}{completion}");
        let (mut ids, mut offsets) = tokenizer.encode_with_offsets(&text, true).map_err(|e| e.to_string())?;
        if let Some(eos) = self.eos_id.filter(|&eos| ids.last() != Some(&eos) || completion.is_empty()) {
            ids.push(eos);
            offsets.push((text.len(), text.len() + 1));
        }
        Ok(Some(self.mark(ids, &offsets, &[prompt.len()..text.len() + 1])))
    }

    fn mark(&self, ids: Vec<u32>, offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Marked {
        let trained = offsets
            .iter()
            .map(|&(start, _)| self.train_on_prompt || spans.iter().any(|s| s.contains(&start)))
            .collect();
        Marked { ids, trained }
    }
}

/// What reading and encoding the data found, reported before training.
#[derive(Default)]
struct DataReport {
    rows: usize,
    without_answer: usize,
    /// Rows whose answer the length policy cut away entirely.
    answer_cut: usize,
    lengths: LengthReport,
    answer_tokens: usize,
    tokens: usize,
}

pub struct SftTask {
    tuned: TunedModel,
    parts: FolderParts,
    train: Vec<Example>,
    val: Vec<Example>,
    cursor: EpochCursor<Row>,
    rows_per_batch: usize,
    eval_batch: usize,
    eval_batches: usize,
    pad_id: u32,
    packing: bool,
    max_length: usize,
    report: DataReport,
}

impl SftTask {
    /// Read and check everything, then build the model; nothing is trained yet.
    pub fn new(options: SftOptions) -> Result<Self> {
        crate::output::check_single_stdin(&options.inputs)?;
        let folder = ModelFolder::open(&options.model)?;
        if folder.config.head != Head::CausalLm {
            return Err(bad_input(&folder.dir, "is a sequence classifier (…ForSequenceClassification); sft needs a causal LM"));
        }
        folder.check_max_length(options.max_length)?;
        let mut tokenizer = folder.load_matching_tokenizer()?;
        let sources = open_sources(&options.inputs)?;
        let val_sources = options.val.as_ref().map(|p| open_sources(std::slice::from_ref(p))).transpose()?;
        let has_chat = sources.iter().chain(val_sources.iter().flatten()).any(|s| matches!(s, Source::Chat(_)))
            || options.prompt_completion_as_chat;

        let mut parts = FolderParts::of(&folder, &tokenizer)?;
        let mut config = folder.config.clone();
        let template_source = match &options.chat_template {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read the chat template: {e}")))?),
            None => folder.chat_template.clone(),
        };
        let template_source = match template_source {
            Some(source) => Some(source),
            None if has_chat => {
                let added = tokenizer.add_special_tokens(&[IM_START_TOKEN, IM_END_TOKEN])?;
                progress::warn(format!(
                    "note: model {} has no chat template; using ChatML{}",
                    folder.dir.display(),
                    if added.is_empty() { String::new() } else { format!(" and adding the special tokens {}", added.join(", ")) }
                ));
                // Saved whether or not the embedding must grow (a model may have spare rows).
                parts.tokenizer_json = tokenizer.tokenizer.to_string(false)?;
                let im_end = tokenizer.tokenizer.token_to_id(IM_END_TOKEN).expect("added above");
                add_stop_token(&mut config, &mut parts, im_end);
                Some(CHATML.to_string())
            }
            None => None,
        };
        let template = template_source
            .as_deref()
            .map(|source| ChatTemplate::new(source, crate::model::folder::special_tokens(&parts.tokenizer_config)))
            .transpose()?;
        parts.chat_template = template_source;

        let eos_id = config.eos_token_ids.first().copied().or(tokenizer.eos_id());
        let pad_id = config.pad_token_id.or_else(|| tokenizer.tokenizer.token_to_id(PAD_TOKEN)).or(eos_id).unwrap_or(0);
        if Some(pad_id) == eos_id && config.pad_token_id.is_some() {
            progress::warn(format!(
                "note: the pad token is EOS (id {pad_id}); lathe masks padding by position, not by id, so EOS is still learned"
            ));
        }
        if eos_id.is_none() {
            progress::warn("warning: the model names no EOS token; prompt/completion answers get no end marker");
        }
        let renderer = Renderer {
            template,
            train_on_prompt: options.train_on_prompt,
            prompt_completion_as_chat: options.prompt_completion_as_chat,
            eos_id,
        };

        let mut report = DataReport::default();
        let mut examples = encode_sources(&sources, &renderer, &tokenizer, &options, &mut report)?;
        let mut val_report = DataReport::default();
        let val = match (val_sources, options.val_fraction) {
            (Some(sources), _) => encode_sources(&sources, &renderer, &tokenizer, &options, &mut val_report)?,
            (None, Some(fraction)) => {
                if examples.len() < 2 {
                    return Err(bad_input(&options.inputs[0], "too few examples to hold some out for --val-fraction"));
                }
                examples.split_off(examples.len() - crate::train::held_out_count(examples.len(), fraction))
            }
            (None, None) => Vec::new(),
        };
        if examples.is_empty() {
            return Err(bad_input(&options.inputs[0], "no training examples left (every row was dropped; see the lines above)"));
        }

        let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let rows = if options.packing { options.max_length } else { longest };
        crate::limits::Footprint::new(format!("--batch-size {} × --max-length {}", options.batch_size, options.max_length))
            .training(&config, options.batch_size.min(examples.len()), rows, &Tuning::of(options.lora.as_ref(), &config, options.gradient_checkpointing)?)
            .check(&options.device)?;
        let mut start = Start::open(&folder, options.lora.as_ref(), options.seed, &options.device)?;
        TunedModel::check_vocab_fits(&start, &config, tokenizer.vocab_size, "adding the chat tokens")?;
        if let Start::Full(params) = &mut start {
            if params.grow_vocab(tokenizer.vocab_size)? {
                progress::warn(format!("note: embedding grown from {} to {} rows", config.vocab_size, tokenizer.vocab_size));
                config.vocab_size = tokenizer.vocab_size;
            }
        }
        let tuned = TunedModel::new(config, start, options.gradient_checkpointing, options.seed)?;
        Self::assemble(tuned, parts, examples, val, pad_id, &options, report)
    }

    fn assemble(
        tuned: TunedModel,
        parts: FolderParts,
        train: Vec<Example>,
        val: Vec<Example>,
        pad_id: u32,
        options: &SftOptions,
        report: DataReport,
    ) -> Result<Self> {
        let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
        let (seed, batch) = (options.seed, options.batch_size);
        let (cursor, rows_per_batch) = if options.packing {
            let rows = pack(&lengths, options.max_length);
            progress::log(format!(
                "sft: packed {} examples into {} rows of up to {} tokens ({:.0}% filled)",
                train.len(),
                rows.len(),
                options.max_length,
                100.0 * lengths.iter().sum::<usize>() as f64 / (rows.len() * options.max_length) as f64
            ));
            let cursor = EpochCursor::new(move |epoch| shuffled(rows.len(), seed, epoch).into_iter().map(|i| rows[i].clone()).collect());
            (cursor, batch)
        } else {
            (EpochCursor::new(move |epoch| length_grouped_batches(&lengths, batch, seed, epoch)), 1)
        };
        progress::log(format!(
            "sft: {} training examples ({} answer tokens of {}), {} held out; {} {}parameters",
            train.len(),
            report.answer_tokens,
            report.tokens,
            val.len(),
            tuned.params().num_elements(),
            if tuned.adapter().is_some() { "LoRA " } else { "" }
        ));
        Ok(SftTask {
            tuned,
            parts,
            train,
            val,
            cursor,
            rows_per_batch,
            eval_batch: options.batch_size,
            eval_batches: options.eval_batches,
            pad_id,
            packing: options.packing,
            max_length: options.max_length,
            report,
        })
    }
}

/// The LM-head logits of every counted target of some rows, in row order.
pub struct CountedLogits {
    /// `[targets, vocab]`, in the graph.
    pub logits: Tensor,
    /// `[targets]` ids, and the same ids on the host.
    pub targets: Tensor,
    pub target_ids: Vec<u32>,
    /// The example (index into `examples`) each target belongs to.
    pub owners: Vec<usize>,
    /// Non-padding tokens.
    pub tokens: usize,
}

/// The final hidden state `[targets, hidden]` (in the graph) of every counted target of some
/// rows, in row order, with the target ids and the examples they belong to.
struct CountedHidden {
    hidden: Tensor,
    target_ids: Vec<u32>,
    owners: Vec<usize>,
    tokens: usize,
}

/// One forward over rows of examples, keeping the counted positions only: the prompt's
/// logits are never needed.
fn counted_hidden(model: &Decoder, examples: &[Example], rows: &[Row], pad: u32) -> Result<CountedHidden> {
    let device = model.device();
    let batch = RowBatch::build(examples, rows, pad, device)?;
    let options = ForwardOptions {
        attention_mask: None,
        position_ids: batch.position_ids.as_ref(),
        segment_ids: batch.segment_ids.as_ref(),
    };
    let hidden = model.forward(&batch.input_ids, options, None)?;
    let (b, t, h) = hidden.dims3()?;
    let index: Vec<u32> = batch.targeted.iter().map(|&(row, pos)| (row * t + pos) as u32).collect();
    let index = Tensor::from_vec(index, batch.targeted.len(), device)?;
    let picked = hidden.reshape((b * t, h))?.index_select(&index, 0)?;
    Ok(CountedHidden { hidden: picked, target_ids: batch.targets, owners: batch.owners, tokens: batch.tokens })
}

/// The LM-head logits of the counted targets of some rows (see [`CountedLogits`]).
pub fn counted_logits(model: &Decoder, examples: &[Example], rows: &[Row], pad: u32) -> Result<CountedLogits> {
    let counted = counted_hidden(model, examples, rows, pad)?;
    let logits = model.lm_logits(&counted.hidden.unsqueeze(0)?)?.squeeze(0)?;
    let targets = Tensor::from_slice(&counted.target_ids, counted.target_ids.len(), model.device())?;
    Ok(CountedLogits { logits, targets, target_ids: counted.target_ids, owners: counted.owners, tokens: counted.tokens })
}

/// Summed loss, counted targets and correct argmax predictions over rows of examples.
pub fn sequence_loss(model: &Decoder, examples: &[Example], rows: &[Row], pad: u32) -> Result<RowsLoss> {
    let counted = counted_hidden(model, examples, rows, pad)?;
    let (losses, predicted) = model.lm_cross_entropy(&counted.hidden, &counted.target_ids, true)?;
    let correct = predicted.iter().zip(&counted.target_ids).filter(|(p, t)| p == t).count();
    Ok(RowsLoss { sum: losses.sum_all()?, count: counted.target_ids.len(), correct, tokens: counted.tokens })
}

pub struct RowsLoss {
    /// Summed cross-entropy of the counted targets (in the graph).
    pub sum: Tensor,
    pub count: usize,
    pub correct: usize,
    /// Non-padding tokens.
    pub tokens: usize,
}

/// Tensors for a batch of rows (see [`PackedRows`]) and the targets they count.
struct RowBatch {
    input_ids: Tensor,
    position_ids: Option<Tensor>,
    segment_ids: Option<Tensor>,
    /// (row, position) of every counted target, the target ids and their examples in the same
    /// order.
    targeted: Vec<(usize, usize)>,
    targets: Vec<u32>,
    owners: Vec<usize>,
    tokens: usize,
}

impl RowBatch {
    fn build(examples: &[Example], rows: &[Row], pad: u32, device: &Device) -> Result<Self> {
        let sequences: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
        let packed = PackedRows::build(&sequences, rows, pad, device)?;
        let (mut targeted, mut targets, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for &i in rows.iter().flatten() {
            let (row, start) = packed.places[i];
            let example = &examples[i];
            for p in (0..example.ids.len()).filter(|&p| example.counted[p]) {
                targeted.push((row, start + p));
                targets.push(example.targets[p]);
                owners.push(i);
            }
        }
        debug_assert!(targets.iter().all(|&t| t != IGNORE_INDEX));
        Ok(RowBatch {
            input_ids: packed.input_ids,
            position_ids: packed.position_ids,
            segment_ids: packed.segment_ids,
            targeted,
            targets,
            owners,
            tokens: packed.tokens,
        })
    }
}

impl Task for SftTask {
    fn params(&self) -> &Params {
        self.tuned.params()
    }

    fn next_loss(&mut self) -> Result<StepLoss> {
        let rows: Vec<Row> = if self.packing {
            self.cursor.take(self.rows_per_batch)
        } else {
            self.cursor.next().into_iter().map(|i| vec![i]).collect()
        };
        self.tuned.dropout_for(Some(self.cursor.consumed()));
        let out = sequence_loss(&self.tuned.decoder, &self.train, &rows, self.pad_id)?;
        let loss = (out.sum / out.count.max(1) as f64)?;
        let mut metrics = Map::new();
        metrics.insert("mean_token_accuracy".into(), json!(out.correct as f64 / out.count.max(1) as f64));
        metrics.insert("num_tokens".into(), json!(out.count));
        metrics.insert("epoch".into(), json!(self.cursor.epochs()));
        Ok(StepLoss { loss, tokens: out.tokens as u64, metrics })
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let limit = crate::train::eval_limit(self.eval_batches, self.eval_batch, self.val.len());
        self.tuned.dropout_for(None);
        let (mut sum, mut count, mut correct) = (0f64, 0usize, 0usize);
        let indices: Vec<usize> = (0..limit).collect();
        for chunk in indices.chunks(self.eval_batch) {
            let rows: Vec<Row> = chunk.iter().map(|&i| vec![i]).collect();
            let out = sequence_loss(&self.tuned.decoder, &self.val, &rows, self.pad_id)?;
            sum += out.sum.detach().to_scalar::<f32>()? as f64;
            count += out.count;
            correct += out.correct;
        }
        let mut metrics = Map::new();
        metrics.insert("mean_token_accuracy".into(), json!(correct as f64 / count.max(1) as f64));
        metrics.insert("num_tokens".into(), json!(count));
        Ok(Some(Evaluation { loss: sum / count.max(1) as f64, perplexity: true, metrics }))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.tuned.save(dir, &self.parts)
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.tuned.load_checkpoint(dir)
    }

    fn data_state(&self) -> Value {
        self.cursor.state()
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        self.cursor.restore(state)
    }

    fn signature(&self) -> Value {
        let c = &self.tuned.config;
        json!({
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "max_length": self.max_length, "packing": self.packing, "examples": self.train.len(),
            "lora": self.tuned.adapter().map(|a| json!({"r": a.settings.r, "modules": a.modules.len()})),
        })
    }

    fn summary(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("examples".into(), json!(self.train.len()));
        out.insert("held_out".into(), json!(self.val.len()));
        out.insert("rows_read".into(), json!(self.report.rows));
        out.insert("rows_without_answer".into(), json!(self.report.without_answer));
        out.insert("truncated".into(), json!(self.report.lengths.truncated));
        out.insert("dropped_over_length".into(), json!(self.report.lengths.dropped));
        out.insert("answer_truncated_away".into(), json!(self.report.answer_cut));
        out.insert("answer_tokens".into(), json!(self.report.answer_tokens));
        out.insert("parameters".into(), json!(self.tuned.params().num_elements()));
        out
    }
}

/// The model stops on `id` too (ChatML's end of turn), in config and generation config.
fn add_stop_token(config: &mut ModelConfig, parts: &mut FolderParts, id: u32) {
    if !config.eos_token_ids.contains(&id) {
        config.eos_token_ids.push(id);
    }
    if let Some(generation) = parts.generation_config.as_mut().and_then(Value::as_object_mut) {
        generation.insert("eos_token_id".into(), json!(config.eos_token_ids));
    }
}

enum Source {
    Chat(RecordReader<ChatRecord>),
    PromptCompletion(RecordReader<PromptCompletionRecord>),
}

fn open_sources(paths: &[PathBuf]) -> Result<Vec<Source>> {
    if paths.is_empty() {
        return Err(usage("no data files given"));
    }
    paths
        .iter()
        .map(|path| {
            let source = ParquetSource::open(path)?;
            if source.has_column("messages") {
                Ok(Source::Chat(RecordReader::from_source(source, Default::default())?))
            } else if source.has_column("prompt") && source.has_column("completion") {
                Ok(Source::PromptCompletion(RecordReader::from_source(source, Default::default())?))
            } else {
                Err(bad_input(
                    path,
                    format!("expected chat data (`messages`) or `prompt` + `completion` columns; columns: {}", source.column_names()),
                ))
            }
        })
        .collect()
}

fn encode_sources(
    sources: &[Source],
    renderer: &Renderer,
    tokenizer: &LoadedTokenizer,
    options: &SftOptions,
    report: &mut DataReport,
) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for source in sources {
        let (path, encoded) = match source {
            Source::Chat(reader) => {
                let rows = reader.read_all()?;
                let encoded: Vec<_> = rows.iter().map(|r| renderer.chat(tokenizer, &r.messages)).collect();
                (reader.source().path().to_path_buf(), encoded)
            }
            Source::PromptCompletion(reader) => {
                let rows = reader.read_all()?;
                let encoded: Vec<_> =
                    rows.iter().map(|r| renderer.prompt_completion(tokenizer, &r.prompt, &r.completion)).collect();
                (reader.source().path().to_path_buf(), encoded)
            }
        };
        let before = report.without_answer;
        for (row, example) in encoded.into_iter().enumerate() {
            report.rows += 1;
            let example = example.map_err(|what| bad_input(&path, format!("row {row}: {what}")))?;
            let Some(example) = example else {
                report.without_answer += 1;
                continue;
            };
            report.lengths.examples += 1;
            let Some(kept) = kept_range(example.ids.len(), options.max_length, options.truncation) else {
                report.lengths.dropped += 1;
                continue;
            };
            if kept.len() < example.ids.len() {
                report.lengths.truncated += 1;
            }
            let example = Example::shifted(&Marked { ids: example.ids[kept.clone()].to_vec(), trained: example.trained[kept].to_vec() });
            if example.targets_counted() == 0 {
                report.answer_cut += 1;
                continue;
            }
            report.answer_tokens += example.targets_counted();
            report.tokens += example.ids.len();
            examples.push(example);
        }
        let without = report.without_answer - before;
        if without == encoded_rows(source) && !options.train_on_prompt {
            return Err(bad_input(
                &path,
                "no row has an assistant turn (or answer) to learn from; pass --train-on-prompt to train on whole conversations",
            ));
        }
        if without > 0 {
            progress::warn(format!("sft: {}: {without} rows have no answer tokens to learn from and are left out", path.display()));
        }
    }
    report.lengths.log("sft", "examples", options.max_length, options.truncation);
    if report.answer_cut > 0 {
        progress::warn(format!(
            "sft: {} examples lost every answer token to --truncation {:?} and are left out",
            report.answer_cut, options.truncation
        ));
    }
    Ok(examples)
}

fn encoded_rows(source: &Source) -> usize {
    match source {
        Source::Chat(r) => r.source().num_rows() as usize,
        Source::PromptCompletion(r) => r.source().num_rows() as usize,
    }
}

/// Batches of similar length: each window of `LENGTH_GROUP_BATCHES` batches of a shuffled
/// epoch is sorted by length and cut into batches, then the batches are shuffled.
fn length_grouped_batches(lengths: &[usize], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let order = shuffled(lengths.len(), seed, epoch);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(batch_size * LENGTH_GROUP_BATCHES) {
        let mut window = window.to_vec();
        window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut epoch_rng(seed.wrapping_add(1), epoch));
    batches
}

#[cfg(test)]
mod tests;
