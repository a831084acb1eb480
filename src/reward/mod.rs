//! Sequence-scoring models: a decoder backbone with a `score` head `[num_labels, hidden]` (no
//! bias) read at the last real token, saved as `LlamaForSequenceClassification`. Trained as
//! reward models (Bradley–Terry on preference pairs, or regression on scores) and as multi-label
//! guard classifiers.

pub mod metrics;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::data::records::{LabeledTextRecord, PreferenceRecord, RecordReader};
use crate::data::{ColumnType, ParquetSource};
use crate::error::{Result, bad_input, failed, usage};
use crate::model::folder::{FolderParts, ModelFolder};
use crate::model::lora::{self, LoraSettings};
use crate::model::{Decoder, ForwardOptions, Head, ModelConfig, Params};
use crate::train::tuned::{Start, TunedModel};
use crate::limits::Tuning;
use crate::progress;
use crate::tokenizer::{LoadedTokenizer, PAD_TOKEN};
use crate::train::cursor::{EpochCursor, shuffled};
use crate::train::sequences::{LengthReport, PackedRows, Truncation, gather_places, gather_positions, kept_range, pack, pad_right};
use crate::train::{Evaluation, StepLoss, Task};
use metrics::{Confusion, accuracy_by_length_diff, auroc, choose_threshold, mean_std, pearson, spearman};

/// What the score head learns.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Bradley–Terry on (chosen, rejected) pairs: one reward per sequence.
    Preference,
    /// Mean squared error against a numeric score.
    Regression,
    /// Independent sigmoid per label (guard classifiers).
    Multilabel,
}

impl Objective {
    fn name(self) -> &'static str {
        match self {
            Objective::Preference => "preference",
            Objective::Regression => "regression",
            Objective::Multilabel => "multilabel",
        }
    }
}

pub struct RewardOptions {
    pub inputs: Vec<PathBuf>,
    pub model: String,
    pub objective: Objective,
    /// Multilabel: the label order (default: the model's, else the data's).
    pub labels: Option<Vec<String>>,
    /// Regression: the numeric column.
    pub score_column: String,
    pub center_rewards: Option<f64>,
    /// Multilabel: pick each threshold as the lowest reaching this precision, not max F1.
    pub target_precision: Option<f64>,
    pub max_length: usize,
    pub truncation: Truncation,
    pub batch_size: usize,
    pub seed: u64,
    pub val: Option<PathBuf>,
    pub val_fraction: Option<f64>,
    pub eval_batches: usize,
    pub device: Device,
    /// Train a LoRA adapter (and the head in full) on the frozen model instead of every weight.
    pub lora: Option<LoraSettings>,
    pub gradient_checkpointing: bool,
}

/// How text becomes the token ids a scoring model reads, recorded in its `config.json`
/// (`lathe_scoring`) so every later scorer (score, redteam, serve-guard) encodes alike.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ScoringFormat {
    /// EOS appended after the text (as TRL's reward trainer does).
    pub append_eos: bool,
    pub max_length: usize,
    pub truncation: Truncation,
}

impl ScoringFormat {
    /// Token ids for `text`; `None` when the length policy drops it.
    pub fn encode(&self, tokenizer: &LoadedTokenizer, text: &str, eos: Option<u32>) -> Result<(Option<Vec<u32>>, bool)> {
        let mut ids = tokenizer.encode_prompt(text)?;
        if let (true, Some(eos)) = (self.append_eos, eos) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        let len = ids.len();
        Ok(match kept_range(len, self.max_length, self.truncation) {
            Some(range) => (Some(ids[range.clone()].to_vec()), range.len() < len),
            None => (None, true),
        })
    }
}

/// The target of one example.
#[derive(Clone, Debug)]
enum Target {
    Pair { margin: f32 },
    Value(f32),
    /// Per label: positive, negative, or not judged (masked out of the loss).
    Labels(Vec<Option<bool>>),
}

/// One example: one sequence (two for a pair: chosen, rejected) and its target.
#[derive(Clone, Debug)]
struct Item {
    sequences: Vec<Vec<u32>>,
    target: Target,
}

pub struct RewardTask {
    objective: Objective,
    tuned: TunedModel,
    parts: FolderParts,
    labels: Vec<String>,
    format: ScoringFormat,
    train: Vec<Item>,
    val: Vec<Item>,
    cursor: EpochCursor<usize>,
    batch_size: usize,
    eval_batches: usize,
    pad_id: u32,
    center_rewards: Option<f64>,
    target_precision: Option<f64>,
    /// What the latest evaluation decided for `config.json` (reward mean/std, thresholds).
    calibration: Map<String, Value>,
    lengths: LengthReport,
}

impl RewardTask {
    pub fn new(options: RewardOptions) -> Result<Self> {
        crate::output::check_single_stdin(&options.inputs)?;
        if options.inputs.is_empty() {
            return Err(usage("no data files given"));
        }
        if options.center_rewards.is_some() && options.objective != Objective::Preference {
            return Err(usage("--center-rewards applies to --task preference"));
        }
        if options.target_precision.is_some() && options.objective != Objective::Multilabel {
            return Err(usage("--target-precision applies to --task multilabel"));
        }
        if let Some(p) = options.target_precision.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(usage(format!("--target-precision {p}: must be in (0, 1]")));
        }
        let folder = ModelFolder::open(&options.model)?;
        folder.check_max_length(options.max_length)?;
        let mut tokenizer = folder.load_matching_tokenizer()?;
        let mut config = folder.config.clone();
        let eos_id = config.eos_token_ids.first().copied().or(tokenizer.eos_id());
        let mut parts = FolderParts::of(&folder, &tokenizer)?;
        // transformers reads the score at the last token that is not padding, so padding must
        // be a token of its own and never the EOS the text ends with.
        let pad_id = match config.pad_token_id.or_else(|| tokenizer.tokenizer.token_to_id(PAD_TOKEN)) {
            Some(pad) if Some(pad) != eos_id => pad,
            _ => {
                tokenizer.add_special_tokens(&[PAD_TOKEN])?;
                parts.tokenizer_json = tokenizer.tokenizer.to_string(false)?;
                parts.tokenizer_config.insert("pad_token".into(), json!(PAD_TOKEN));
                progress::warn(format!("note: the model has no pad token distinct from EOS; adding {PAD_TOKEN}"));
                tokenizer.tokenizer.token_to_id(PAD_TOKEN).expect("added above")
            }
        };
        config.pad_token_id = Some(pad_id);
        let format = ScoringFormat { append_eos: eos_id.is_some(), max_length: options.max_length, truncation: options.truncation };

        let mut lengths = LengthReport::default();
        let model_labels = classifier_labels(&folder.config);
        let (mut train, labels) = read_items(&options, &options.inputs, &tokenizer, &format, eos_id, None, model_labels.as_deref(), &mut lengths)?;
        let val = match (&options.val, options.val_fraction) {
            (Some(path), _) => read_items(&options, std::slice::from_ref(path), &tokenizer, &format, eos_id, Some(&labels), None, &mut LengthReport::default())?.0,
            (None, Some(fraction)) => {
                if train.len() < 2 {
                    return Err(bad_input(&options.inputs[0], "too few examples to hold some out for --val-fraction"));
                }
                train.split_off(train.len() - crate::train::held_out_count(train.len(), fraction))
            }
            (None, None) => Vec::new(),
        };
        lengths.log("rm-train", "sequences", options.max_length, options.truncation);
        if train.is_empty() {
            return Err(bad_input(&options.inputs[0], "no training examples left after the length policy"));
        }

        let per_item = train.iter().map(|item| item.sequences.len()).max().unwrap_or(1);
        let longest = train.iter().flat_map(|item| item.sequences.iter().map(Vec::len)).max().unwrap_or(0);
        crate::limits::Footprint::new(format!("--batch-size {} × --max-length {}", options.batch_size, options.max_length))
            .training(&config, options.batch_size.saturating_mul(per_item), longest, &Tuning::of(options.lora.as_ref(), &config, options.gradient_checkpointing)?)
            .check(&options.device)?;
        let mut start = Start::open(&folder, options.lora.as_ref(), options.seed, &options.device)?;
        TunedModel::check_vocab_fits(&start, &config, tokenizer.vocab_size, "adding a pad token")?;
        match &mut start {
            Start::Full(params) => {
                if params.grow_vocab(tokenizer.vocab_size)? {
                    config.vocab_size = tokenizer.vocab_size;
                }
                let existing = params.remove("score.weight");
                params.remove("lm_head.weight");
                params.insert("score.weight", score_head(&config, existing, labels.len(), options.seed, &options.device)?)?;
            }
            // PEFT's `modules_to_save`: the head trains in full inside the adapter.
            Start::Lora { base, adapter } => {
                let existing = adapter.params.remove(lora::SCORE).or_else(|| base.remove("score.weight"));
                base.remove("lm_head.weight");
                adapter.params.insert(lora::SCORE, score_head(&config, existing, labels.len(), options.seed, &options.device)?)?;
            }
        }
        set_classifier_config(&mut config, &labels, options.objective);
        let tuned = TunedModel::new(config, start, options.gradient_checkpointing, options.seed)?;
        progress::log(format!(
            "rm-train ({}): {} training examples, {} held out; {} label{}; {} {}parameters",
            options.objective.name(),
            train.len(),
            val.len(),
            labels.len(),
            if labels.len() == 1 { "" } else { "s" },
            tuned.params().num_elements(),
            if tuned.adapter().is_some() { "LoRA and head " } else { "" }
        ));
        let (count, seed) = (train.len(), options.seed);
        Ok(RewardTask {
            objective: options.objective,
            tuned,
            parts,
            labels,
            format,
            train,
            val,
            cursor: EpochCursor::new(move |epoch| shuffled(count, seed, epoch)),
            batch_size: options.batch_size,
            eval_batches: options.eval_batches,
            pad_id,
            center_rewards: options.center_rewards,
            target_precision: options.target_precision,
            calibration: Map::new(),
            lengths,
        })
    }

    /// Scores `[n, num_labels]` of the items' sequences: every first sequence, then every
    /// second (chosen rows, then rejected rows).
    fn scores(&self, items: &[&Item]) -> Result<Tensor> {
        let slots = items[0].sequences.len();
        let rows: Vec<&[u32]> = (0..slots).flat_map(|s| items.iter().map(move |item| item.sequences[s].as_slice())).collect();
        score_rows(&self.tuned.decoder, &rows, self.pad_id)
    }

    fn loss(&self, items: &[&Item]) -> Result<(Tensor, Tensor)> {
        let scores = self.scores(items)?;
        let n = items.len();
        let loss = match self.objective {
            Objective::Preference => {
                let margins: Vec<f32> = items.iter().map(|i| if let Target::Pair { margin } = i.target { margin } else { 0.0 }).collect();
                let rewards = scores.squeeze(1)?;
                let (chosen, rejected) = (rewards.narrow(0, 0, n)?, rewards.narrow(0, n, n)?);
                let margins = Tensor::from_vec(margins, n, scores.device())?;
                let mut loss = bradley_terry_loss(&chosen, &rejected, Some(&margins))?;
                if let Some(coefficient) = self.center_rewards {
                    loss = (loss + ((&chosen + &rejected)?.sqr()?.mean_all()? * coefficient)?)?;
                }
                loss
            }
            Objective::Regression => {
                let values: Vec<f32> = items.iter().map(|i| if let Target::Value(v) = i.target { v } else { 0.0 }).collect();
                let values = Tensor::from_vec(values, n, scores.device())?;
                (scores.squeeze(1)? - values)?.sqr()?.mean_all()?
            }
            Objective::Multilabel => {
                let k = self.labels.len();
                let (mut truth, mut mask) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
                for item in items {
                    let Target::Labels(labels) = &item.target else { unreachable!("multilabel items") };
                    for label in labels {
                        truth.push(if *label == Some(true) { 1f32 } else { 0.0 });
                        mask.push(if label.is_some() { 1f32 } else { 0.0 });
                    }
                }
                let judged: f32 = mask.iter().sum();
                let truth = Tensor::from_vec(truth, (n, k), scores.device())?;
                let mask = Tensor::from_vec(mask, (n, k), scores.device())?;
                // Binary cross-entropy with logits: softplus(x) - x·y, over judged labels only.
                let per_label = (softplus(&scores)? - (&scores * &truth)?)?;
                ((per_label * mask)?.sum_all()? / judged.max(1.0) as f64)?
            }
        };
        Ok((loss, scores))
    }

    /// Everything evaluation reports, from scores of all held-out items.
    fn evaluation(&self, scores: &[Vec<f32>], loss: f64) -> (Map<String, Value>, Map<String, Value>) {
        let (mut metrics, mut calibration) = (Map::new(), Map::new());
        match self.objective {
            Objective::Preference => {
                let n = scores.len() / 2;
                let chosen: Vec<f64> = scores[..n].iter().map(|s| s[0] as f64).collect();
                let rejected: Vec<f64> = scores[n..].iter().map(|s| s[0] as f64).collect();
                metrics.extend(pair_metrics(&chosen, &rejected));
                let diffs: Vec<i64> = self.val[..n].iter().map(|i| i.sequences[0].len() as i64 - i.sequences[1].len() as i64).collect();
                let correct: Vec<bool> = chosen.iter().zip(&rejected).map(|(c, r)| c > r).collect();
                for (bucket, pairs, accuracy) in accuracy_by_length_diff(&diffs, &correct) {
                    metrics.insert(format!("accuracy_by_length_diff/{bucket}"), json!(accuracy));
                    metrics.insert(format!("pairs_by_length_diff/{bucket}"), json!(pairs));
                }
                let all: Vec<f64> = chosen.iter().chain(&rejected).copied().collect();
                let (mean, std) = mean_std(&all);
                calibration.insert("reward_mean".into(), json!(mean));
                calibration.insert("reward_std".into(), json!(std));
            }
            Objective::Regression => {
                let predicted: Vec<f64> = scores.iter().map(|s| s[0] as f64).collect();
                let truth: Vec<f64> = self.val[..scores.len()].iter().map(|i| if let Target::Value(v) = i.target { v as f64 } else { 0.0 }).collect();
                metrics.insert("mse".into(), json!(loss));
                metrics.insert("rmse".into(), json!(loss.sqrt()));
                metrics.insert("pearson".into(), json!(pearson(&predicted, &truth)));
                metrics.insert("spearman".into(), json!(spearman(&predicted, &truth)));
                let (mean, std) = mean_std(&predicted);
                calibration.insert("reward_mean".into(), json!(mean));
                calibration.insert("reward_std".into(), json!(std));
            }
            Objective::Multilabel => {
                let mut thresholds = Map::new();
                let (mut f1s, mut aurocs) = (Vec::new(), Vec::new());
                for (k, label) in self.labels.iter().enumerate() {
                    let (probabilities, truth): (Vec<f64>, Vec<bool>) = scores
                        .iter()
                        .zip(&self.val)
                        .filter_map(|(s, item)| match &item.target {
                            Target::Labels(l) => l[k].map(|y| (sigmoid(s[k] as f64), y)),
                            _ => None,
                        })
                        .unzip();
                    let threshold = choose_threshold(&probabilities, &truth, self.target_precision).unwrap_or(0.5);
                    let confusion = Confusion::at(&probabilities, &truth, threshold);
                    let area = auroc(&probabilities, &truth);
                    metrics.insert(format!("precision/{label}"), json!(confusion.precision()));
                    metrics.insert(format!("recall/{label}"), json!(confusion.recall()));
                    metrics.insert(format!("f1/{label}"), json!(confusion.f1()));
                    metrics.insert(format!("auroc/{label}"), json!(area));
                    metrics.insert(format!("threshold/{label}"), json!(threshold));
                    metrics.insert(format!("support/{label}"), json!(truth.iter().filter(|&&y| y).count()));
                    if truth.iter().any(|&y| y) {
                        f1s.push(confusion.f1());
                    }
                    aurocs.extend(area);
                    thresholds.insert(label.clone(), json!(threshold));
                }
                metrics.insert("macro_f1".into(), json!(mean_std(&f1s).0));
                metrics.insert("macro_auroc".into(), json!((!aurocs.is_empty()).then(|| mean_std(&aurocs).0)));
                calibration.insert("thresholds".into(), Value::Object(thresholds));
            }
        }
        (metrics, calibration)
    }
}

impl Task for RewardTask {
    fn params(&self) -> &Params {
        self.tuned.params()
    }

    fn next_loss(&mut self) -> Result<StepLoss> {
        self.tuned.dropout_for(Some(self.cursor.consumed()));
        let picked = self.cursor.take(self.batch_size);
        let items: Vec<&Item> = picked.iter().map(|&i| &self.train[i]).collect();
        let (loss, scores) = self.loss(&items)?;
        let tokens = items.iter().flat_map(|i| &i.sequences).map(Vec::len).sum::<usize>() as u64;
        let mut metrics = Map::new();
        if self.objective == Objective::Preference {
            let rewards: Vec<f64> = scores.detach().squeeze(1)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
            let n = items.len();
            metrics.extend(pair_metrics(&rewards[..n], &rewards[n..]));
        }
        metrics.insert("epoch".into(), json!(self.cursor.epochs()));
        Ok(StepLoss { loss, tokens, metrics })
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let limit = crate::train::eval_limit(self.eval_batches, self.batch_size, self.val.len());
        self.tuned.dropout_for(None);
        let (mut loss_sum, mut firsts, mut seconds) = (0f64, Vec::new(), Vec::new());
        for chunk in self.val[..limit].chunks(self.batch_size) {
            let items: Vec<&Item> = chunk.iter().collect();
            let (loss, scores) = self.loss(&items)?;
            loss_sum += loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
            let rows = scores.detach().to_vec2::<f32>()?;
            let (first, second) = rows.split_at(chunk.len());
            firsts.extend_from_slice(first);
            seconds.extend_from_slice(second);
        }
        let loss = loss_sum / limit as f64;
        firsts.extend(seconds);
        let (metrics, calibration) = self.evaluation(&firsts, loss);
        self.calibration = calibration;
        Ok(Some(Evaluation { loss, perplexity: false, metrics }))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        let mut config = self.tuned.config.clone();
        let raw = &mut config.raw;
        raw.insert("lathe_scoring".into(), serde_json::to_value(&self.format)?);
        raw.insert("lathe_task".into(), json!(self.objective.name()));
        for (key, value) in &self.calibration {
            raw.insert(key.clone(), value.clone());
        }
        self.tuned.save_as(dir, &self.parts, &config)
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
            "task": self.objective.name(), "labels": self.labels, "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers, "max_length": self.format.max_length,
            "examples": self.train.len(),
        })
    }

    fn summary(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("task".into(), json!(self.objective.name()));
        out.insert("labels".into(), json!(self.labels));
        out.insert("examples".into(), json!(self.train.len()));
        out.insert("held_out".into(), json!(self.val.len()));
        out.insert("truncated".into(), json!(self.lengths.truncated));
        out.insert("dropped_over_length".into(), json!(self.lengths.dropped));
        out.insert("parameters".into(), json!(self.tuned.params().num_elements()));
        out.extend(self.calibration.clone());
        out
    }
}

/// Scores `[rows, num_labels]` at each row's last token. Short rows are packed together up to
/// the longest one's length (each sees only itself), so a batch of mixed lengths runs fewer
/// rows than padding each to the longest; the rest are right-padded with `pad`.
pub fn score_rows(model: &Decoder, rows: &[&[u32]], pad: u32) -> Result<Tensor> {
    let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let packed = pack(&lengths, longest);
    if lengths.contains(&0) || packed.len() == rows.len() {
        let ids = pad_right(rows, pad, model.device())?;
        let hidden = model.forward(&ids, ForwardOptions::default(), None)?;
        let last: Vec<usize> = rows.iter().map(|r| r.len().max(1) - 1).collect();
        let picked = gather_positions(&hidden, &last)?;
        return Ok(model.class_scores(&picked.unsqueeze(1)?)?.squeeze(1)?);
    }
    let batch = PackedRows::build(rows, &packed, pad, model.device())?;
    let options = ForwardOptions { attention_mask: None, position_ids: batch.position_ids.as_ref(), segment_ids: batch.segment_ids.as_ref() };
    let hidden = model.forward(&batch.input_ids, options, None)?;
    let last: Vec<(usize, usize)> = batch.places.iter().zip(&lengths).map(|(&(row, start), &len)| (row, start + len - 1)).collect();
    let picked = gather_places(&hidden, &last)?;
    Ok(model.class_scores(&picked.unsqueeze(1)?)?.squeeze(1)?)
}

/// Mean Bradley–Terry loss `-log σ(r_chosen − r_rejected − margin)`.
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor, margin: Option<&Tensor>) -> Result<Tensor> {
    let diff = (rejected - chosen)?;
    let diff = match margin {
        Some(m) => (diff + m)?,
        None => diff,
    };
    Ok(softplus(&diff)?.mean_all()?)
}

/// `log(1 + eˣ)`, stable for large |x|, differentiable.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// TRL's reward metrics for pairs.
fn pair_metrics(chosen: &[f64], rejected: &[f64]) -> Map<String, Value> {
    let n = chosen.len().max(1) as f64;
    let correct = chosen.iter().zip(rejected).filter(|(c, r)| c > r).count();
    let margin = chosen.iter().zip(rejected).map(|(c, r)| c - r).sum::<f64>() / n;
    let all: Vec<f64> = chosen.iter().chain(rejected).copied().collect();
    let (mean, std) = mean_std(&all);
    let mut m = Map::new();
    m.insert("accuracy".into(), json!(correct as f64 / n));
    m.insert("margin".into(), json!(margin));
    m.insert("mean_reward".into(), json!(mean));
    m.insert("std_reward".into(), json!(std));
    m.insert("min_reward".into(), json!(all.iter().copied().fold(f64::INFINITY, f64::min)));
    m.insert("max_reward".into(), json!(all.iter().copied().fold(f64::NEG_INFINITY, f64::max)));
    m
}

/// The label names of a multi-label classifier folder (its `id2label` in id order), if it is one.
pub fn classifier_labels(config: &ModelConfig) -> Option<Vec<String>> {
    if !matches!(config.head, Head::SequenceClassification { .. }) {
        return None;
    }
    if config.raw.get("problem_type").and_then(Value::as_str) != Some("multi_label_classification") {
        return None;
    }
    let id2label = config.raw.get("id2label")?.as_object()?;
    let mut pairs: Vec<(usize, String)> =
        id2label.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string()))).collect();
    pairs.sort();
    Some(pairs.into_iter().map(|(_, v)| v).collect())
}

/// A `score` head `[num_labels, hidden]`: `existing` when it has that shape (continuing a
/// reward model or guard), else drawn from normal(0, initializer_range) as transformers
/// initialises it.
fn score_head(config: &ModelConfig, existing: Option<candle_core::Var>, num_labels: usize, seed: u64, device: &Device) -> Result<Tensor> {
    if let Some(var) = existing.filter(|v| v.dims() == [num_labels, config.hidden_size]) {
        return Ok(var.as_tensor().clone());
    }
    let std = config.raw.get("initializer_range").and_then(Value::as_f64).unwrap_or(0.02);
    let normal = Normal::new(0f32, std as f32).map_err(failed)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5C0E);
    let values: Vec<f32> = (0..num_labels * config.hidden_size).map(|_| normal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(values, (num_labels, config.hidden_size), device)?)
}

/// The classifier's head, labels and problem type in `config`.
fn set_classifier_config(config: &mut ModelConfig, labels: &[String], objective: Objective) {
    let num_labels = labels.len();
    config.head = Head::SequenceClassification { num_labels };
    let id2label: Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect();
    let label2id: Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
    config.raw.insert("id2label".into(), Value::Object(id2label));
    config.raw.insert("label2id".into(), Value::Object(label2id));
    config.raw.insert("num_labels".into(), json!(num_labels));
    match objective {
        Objective::Multilabel => config.raw.insert("problem_type".into(), json!("multi_label_classification")),
        Objective::Regression | Objective::Preference => config.raw.insert("problem_type".into(), json!("regression")),
    };
}

/// Read and encode the examples of `paths`; returns them with the label names.
#[allow(clippy::too_many_arguments)]
fn read_items(
    options: &RewardOptions,
    paths: &[PathBuf],
    tokenizer: &LoadedTokenizer,
    format: &ScoringFormat,
    eos: Option<u32>,
    known_labels: Option<&[String]>,
    model_labels: Option<&[String]>,
    lengths: &mut LengthReport,
) -> Result<(Vec<Item>, Vec<String>)> {
    let mut items = Vec::new();
    let encode = |text: &str, lengths: &mut LengthReport| -> Result<Option<Vec<u32>>> {
        lengths.examples += 1;
        let (ids, truncated) = format.encode(tokenizer, text, eos)?;
        match (&ids, truncated) {
            (None, _) => lengths.dropped += 1,
            (Some(_), true) => lengths.truncated += 1,
            _ => {}
        }
        Ok(ids)
    };
    match options.objective {
        Objective::Preference => {
            for path in paths {
                let reader = RecordReader::<PreferenceRecord>::open(path)?;
                for row in reader.read_all()? {
                    let chosen = encode(&format!("{}{}", row.prompt, row.chosen), lengths)?;
                    let rejected = encode(&format!("{}{}", row.prompt, row.rejected), lengths)?;
                    if let (Some(chosen), Some(rejected)) = (chosen, rejected) {
                        items.push(Item { sequences: vec![chosen, rejected], target: Target::Pair { margin: row.margin.unwrap_or(0.0) as f32 } });
                    }
                }
            }
            Ok((items, vec!["reward".into()]))
        }
        Objective::Regression => {
            for path in paths {
                for (text, value) in read_scored_texts(path, &options.score_column)? {
                    if let Some(ids) = encode(&text, lengths)? {
                        items.push(Item { sequences: vec![ids], target: Target::Value(value as f32) });
                    }
                }
            }
            Ok((items, vec!["score".into()]))
        }
        Objective::Multilabel => {
            let mut rows = Vec::new();
            for path in paths {
                let reader = RecordReader::<LabeledTextRecord>::open(path)?;
                let categories = LabeledTextRecord::boolean_categories(reader.source());
                rows.extend(reader.read_all()?.into_iter().map(|r| (path.clone(), categories.clone(), r)));
            }
            let labels = label_set(options, known_labels, model_labels, &rows)?;
            for (path, categories, row) in rows {
                if let Some(unknown) = row.labels.iter().find(|l| !labels.contains(l)) {
                    return Err(bad_input(&path, format!("label `{unknown}` is not one of the labels {}", labels.join(", "))));
                }
                // In the boolean layout a category the file lacks is unjudged; in the list
                // layout every label is judged (absent = negative).
                let judged = |label: &String| {
                    !row.unlabeled.contains(label) && (categories.is_empty() || categories.contains(label))
                };
                let target: Vec<Option<bool>> =
                    labels.iter().map(|l| judged(l).then(|| row.labels.contains(l))).collect();
                if target.iter().all(Option::is_none) {
                    continue;
                }
                if let Some(ids) = encode(&row.text, lengths)? {
                    items.push(Item { sequences: vec![ids], target: Target::Labels(target) });
                }
            }
            Ok((items, labels))
        }
    }
}

/// The label order: `--labels`, the evaluation's training labels, the model's, or the data's
/// (boolean columns in file order, else sorted label names).
fn label_set(
    options: &RewardOptions,
    known: Option<&[String]>,
    model_labels: Option<&[String]>,
    rows: &[(PathBuf, Vec<String>, LabeledTextRecord)],
) -> Result<Vec<String>> {
    if let Some(labels) = options.labels.as_deref().or(known).or(model_labels) {
        return Ok(labels.to_vec());
    }
    let mut labels: Vec<String> = Vec::new();
    for (_, categories, row) in rows {
        for label in categories.iter().chain(&row.labels) {
            if !labels.contains(label) {
                labels.push(label.clone());
            }
        }
    }
    if labels.is_empty() {
        let path = rows.first().map_or_else(|| options.inputs[0].clone(), |r| r.0.clone());
        return Err(bad_input(path, "no labels anywhere in the data: nothing to classify (give --labels to name them)"));
    }
    if rows.iter().all(|(_, categories, _)| categories.is_empty()) {
        labels.sort();
    }
    Ok(labels)
}

/// (text, score) rows: `text`, or `prompt` + `response` (or `completion`), and a numeric column.
fn read_scored_texts(path: &Path, score_column: &str) -> Result<Vec<(String, f64)>> {
    let source = ParquetSource::open(path)?;
    source.require(score_column, ColumnType::Float)?;
    let (first, second) = if source.has_column("text") {
        ("text", None)
    } else if source.has_column("prompt") && source.has_column("response") {
        ("prompt", Some("response"))
    } else if source.has_column("prompt") && source.has_column("completion") {
        ("prompt", Some("completion"))
    } else {
        return Err(bad_input(
            path,
            format!("expected `text`, or `prompt` + `response`, beside `{score_column}`; columns: {}", source.column_names()),
        ));
    };
    let mut wanted = vec![first, score_column];
    wanted.extend(second);
    let mut rows = Vec::new();
    for batch in source.batches(Some(&wanted), crate::data::parquet_io::DEFAULT_BATCH_ROWS)? {
        let batch = batch?;
        let firsts = batch.strings(first)?;
        let seconds = second.map(|s| batch.strings(s)).transpose()?;
        let scores = batch.f64s(score_column)?;
        for i in 0..batch.len() {
            let score = scores.value(i);
            if !score.is_finite() {
                return Err(batch.error_at(i, score_column, format!("{score}, expected a finite number")));
            }
            let text = match &seconds {
                Some(s) => format!("{}{}", firsts.value(i), s.value(i)),
                None => firsts.value(i).to_string(),
            };
            rows.push((text, score));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
