//! Direct preference optimisation and its relatives as one [`Task`] of the training engine:
//! DPO (`sigmoid`, cDPO with label smoothing), robust DPO, hinge, IPO, SimPO (reference-free) and
//! KTO (judged answers, paired or not), with `--rpo-alpha` adding the chosen answers' NLL. Losses
//! and metric names are TRL's ([`loss`]); the data is read and tokenized as [`data`] says; the
//! reference log-probabilities are computed once before training ([`reference`]).
//!
//! Log-probabilities are summed over answer tokens only (SimPO averages them); every batch goes
//! through the model as its chosen sequences then its rejected ones, right-padded, and only
//! answer positions through the LM head.

pub mod data;
pub mod loss;
pub mod reference;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{Result, bad_input, usage};
use crate::generate::chat_template;
use crate::model::folder::{FolderParts, ModelFolder};
use crate::limits::{Footprint, Tuning};
use crate::model::lora::LoraSettings;
use crate::model::{Decoder, Head, Params};
use crate::progress::{self, Progress, Unit};
use crate::sft::{Example, Renderer, Row, counted_logits, pack};
use crate::tokenizer::{LoadedTokenizer, PAD_TOKEN, check_same_vocabulary};
use crate::train::cursor::{EpochCursor, shuffled};
use crate::train::tuned::{Start, TunedModel};
use crate::train::{Evaluation, StepLoss, Task, sha256_hex};
use data::{DataReport, Encoder, Examples, example};
use loss::{JudgedScores, LogitSum, Loss, LossSettings, PairScores, judged_metrics, kl_estimate, kto_loss, pair_losses, pair_metrics, row_means};
use reference::{ReferenceLogps, ReferenceSource, SplitLogps};

/// The order batches are drawn in (TRL's `train_sampling_strategy`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// A new shuffle every epoch (pairs); KTO's batches are drawn once from a shuffle and then
    /// visited in a new order every epoch, so each keeps its mismatched KL pairs.
    Random,
    /// File order, batch after batch (KTOTrainer's default; unpaired pairs then come as TRL
    /// unpairs them, a thousand pairs' chosen answers before their rejected ones).
    Sequential,
}

pub struct DpoOptions {
    pub inputs: Vec<PathBuf>,
    pub model: String,
    pub ref_model: Option<String>,
    pub chat_template: Option<PathBuf>,
    pub settings: LossSettings,
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
    pub sampling: Sampling,
    pub batch_size: usize,
    pub seed: u64,
    pub val: Option<PathBuf>,
    pub val_fraction: Option<f64>,
    pub eval_batches: usize,
    pub device: Device,
    /// Train a LoRA adapter (the reference is then the base with the adapter off).
    pub lora: Option<LoraSettings>,
    pub gradient_checkpointing: bool,
    /// Where the reference log-probabilities are kept.
    pub run_dir: PathBuf,
}

/// Examples and the batches they are scored in: fixed for KTO (its KL pairs are drawn within
/// a batch), consecutive chunks otherwise (the reference is computed on those).
struct Split {
    examples: Examples,
    batches: Vec<Vec<usize>>,
}

impl Split {
    fn new(examples: Examples, order: Vec<usize>, batch_size: usize) -> Self {
        Split { examples, batches: order.chunks(batch_size).map(<[usize]>::to_vec).collect() }
    }
}

/// What one batch gave: its loss (in the graph), TRL's metrics, the tokens it held.
struct BatchOutcome {
    loss: Tensor,
    metrics: Map<String, Value>,
    tokens: usize,
}

pub struct DpoTask {
    settings: LossSettings,
    tuned: TunedModel,
    parts: FolderParts,
    train: Split,
    val: Split,
    reference: Option<ReferenceLogps>,
    source: Option<ReferenceSource>,
    cursor: EpochCursor<Vec<usize>>,
    eval_batches: usize,
    pad_id: u32,
    max_length: usize,
    report: DataReport,
    /// What reading `--val` found (none with `--val-fraction`).
    val_report: Option<DataReport>,
    watch: Watches,
}

impl DpoTask {
    /// Read and check everything, compute (or read back) the reference log-probabilities;
    /// nothing is trained yet.
    pub fn new(options: DpoOptions) -> Result<Self> {
        let s = &options.settings;
        check_settings(s, options.ref_model.is_some())?;
        data::check_lengths(options.max_length, options.max_prompt_length)?;
        crate::output::check_single_stdin(&options.inputs)?;
        if options.inputs.is_empty() {
            return Err(usage("no preference files given"));
        }
        let (folder, tokenizer, ref_folder) = open_models(&options)?;
        let template = chat_template(&folder, options.chat_template.as_deref())?;
        let eos = tokenizer.eos_id().or(folder.config.eos_token_ids.first().copied());
        let renderer = Renderer::for_completions(template, eos);
        let encoder = Encoder { renderer: &renderer, tokenizer: &tokenizer, max_length: options.max_length, max_prompt_length: options.max_prompt_length };
        let unpaired = s.loss == Loss::Kto;
        let (train, val, report, val_report) = read_data(&options, &encoder, unpaired)?;
        let (train, val) = batches(train, val, options.sampling, options.batch_size, options.seed);
        let config = folder.config.clone();
        let sequences = 2 * options.batch_size.min(train.examples.len());
        Footprint::new(format!("--batch-size {} × --max-length {}", options.batch_size, options.max_length))
            .training(&config, sequences, options.max_length, &Tuning::of(options.lora.as_ref(), &config, options.gradient_checkpointing)?)
            .check(&options.device)?;
        let start = Start::open(&folder, options.lora.as_ref(), options.seed, &options.device)?;
        let tuned = TunedModel::new(config, start, options.gradient_checkpointing, options.seed)?;
        let pad_id = tuned.config.pad_token_id.or_else(|| tokenizer.tokenizer.token_to_id(PAD_TOKEN)).or(eos).unwrap_or(0);
        let source = s.loss.uses_reference().then(|| match &options.ref_model {
            Some(model) => ReferenceSource::Model { model: model.clone() },
            None if tuned.adapter().is_some() => ReferenceSource::AdapterOff { model: options.model.clone() },
            None => ReferenceSource::InitialPolicy { model: options.model.clone() },
        });
        let parts = FolderParts::of(&folder, &tokenizer)?;
        progress::log(format!(
            "dpo ({}): {} training {}, {} held out; beta {}; {} {}parameters",
            s.loss.name(),
            train.examples.len(),
            if unpaired { format!("answers ({} desirable, {} undesirable)", report.desirable, report.undesirable) } else { "pairs".into() },
            val.examples.len(),
            s.beta,
            tuned.params().num_elements(),
            if tuned.adapter().is_some() { "LoRA " } else { "" }
        ));
        let mut task = DpoTask {
            settings: s.clone(),
            cursor: plan(&train, options.sampling, options.seed),
            tuned,
            parts,
            train,
            val,
            reference: None,
            source,
            eval_batches: options.eval_batches,
            pad_id,
            max_length: options.max_length,
            report,
            val_report,
            watch: Watches::default(),
        };
        if let Some(source) = task.source.clone() {
            task.reference = Some(task.reference_logps(&source, ref_folder.as_ref(), &options)?);
        }
        Ok(task)
    }

    /// The stored reference log-probabilities when they belong to this data and reference,
    /// else computed now (one pass, no gradients) and stored.
    fn reference_logps(&self, source: &ReferenceSource, ref_folder: Option<&ModelFolder>, options: &DpoOptions) -> Result<ReferenceLogps> {
        let fingerprint = sha256_hex(&serde_json::to_string(&json!({
            "source": source, "max_length": self.max_length,
            "train": sequences_json(&self.train), "eval": sequences_json(&self.val),
        }))?);
        if let Some(stored) = ReferenceLogps::load(&options.run_dir, &fingerprint)? {
            progress::log(format!("dpo: reference log-probabilities read from {}", options.run_dir.join(reference::FILE).display()));
            return Ok(stored);
        }
        // The reference scores exactly as the policy does (same code, same batches), so at the
        // first step the policy's log-ratios are zero to the bit, as in TRL.
        let total = (self.train.batches.len() + self.val.batches.len()) as u64;
        let bar = Progress::new("reference log-probs", Some(total), Unit::Items("batches"));
        let split_logps = |model: &Decoder, split: &Split| -> Result<SplitLogps> {
            let n = split.examples.len();
            let mut out = SplitLogps { first: vec![0.0; n], second: vec![0.0; n] };
            for batch in &split.batches {
                let (first, second) = self.sequences(split, batch);
                let scored = score(model, &[first, second].concat(), self.pad_id, self.max_length)?;
                let values: Vec<f32> = scored.logps.detach().to_vec1()?;
                for (k, &i) in batch.iter().enumerate() {
                    out.first[i] = values[k];
                    out.second[i] = values[batch.len() + k];
                }
                bar.inc(1);
            }
            Ok(out)
        };
        let both = |model: &Decoder| Ok::<_, crate::Error>((split_logps(model, &self.train)?, split_logps(model, &self.val)?));
        self.tuned.dropout_for(None);
        let (train, eval) = match (ref_folder, source) {
            (Some(folder), _) => {
                let params = folder.load_params(&options.device)?;
                both(&Decoder::new_inference(&folder.config, &params)?)?
            }
            (None, ReferenceSource::AdapterOff { .. }) => self.tuned.base(both).expect("a LoRA policy has a base")?,
            (None, _) => self.tuned.no_grad(both)?,
        };
        let stored = ReferenceLogps { fingerprint, source: source.describe(), train, eval };
        bar.finish();
        stored.save(&options.run_dir)?;
        progress::log(format!("dpo: reference log-probabilities of {} computed once and kept in {}", source.describe(), options.run_dir.join(reference::FILE).display()));
        Ok(stored)
    }

    /// The scored sequences of a batch: chosen then rejected answers (pairs), or each answer then
    /// its mismatched KL sequence (the prompt with the previous example's answer, as TRL).
    fn sequences(&self, split: &Split, batch: &[usize]) -> (Vec<Example>, Vec<Example>) {
        let m = self.max_length;
        match &split.examples {
            Examples::Pairs(pairs) => batch
                .iter()
                .map(|&i| (example(&pairs[i].prompt, &pairs[i].chosen, m), example(&pairs[i].prompt, &pairs[i].rejected, m)))
                .unzip(),
            Examples::Judged(judged) => {
                let n = batch.len();
                let answers = batch.iter().map(|&i| example(&judged[i].prompt, &judged[i].completion, m)).collect();
                let mismatched = (0..n).map(|k| example(&judged[batch[k]].prompt, &judged[batch[(k + n - 1) % n]].completion, m)).collect();
                (answers, mismatched)
            }
        }
    }

    /// The loss and metrics of one batch of `split`, whose reference figures are `reference`.
    fn batch(&self, split: &Split, batch: &[usize], reference: Option<&SplitLogps>) -> Result<BatchOutcome> {
        let (first, second) = self.sequences(split, batch);
        match &split.examples {
            Examples::Pairs(pairs) => self.pair_batch(pairs, batch, [first, second].concat(), reference),
            Examples::Judged(judged) => self.judged_batch(judged, batch, &first, &second, reference.expect("kto has a reference")),
        }
    }

    /// `values[i]` of each example `i` of the batch, as a tensor.
    fn pick(&self, values: &[f32], batch: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(batch.iter().map(|&i| values[i]).collect::<Vec<f32>>(), batch.len(), self.tuned.decoder.device())?)
    }

    /// A batch of pairs: its chosen then its rejected sequences in one forward.
    fn pair_batch(&self, pairs: &[data::Pair], batch: &[usize], sequences: Vec<Example>, reference: Option<&SplitLogps>) -> Result<BatchOutcome> {
        let (b, device) = (batch.len(), self.tuned.decoder.device());
        // IPO averages over answer tokens as the length policy left them (TRL's completion
        // mask); SimPO over the scored targets (CPOTrainer's label mask).
        let fitted = |prompt: &[u32], answer: &[u32]| answer.len().min(self.max_length - prompt.len()).max(1) as f32;
        let chosen_tokens: Vec<f32> = batch.iter().map(|&i| fitted(&pairs[i].prompt, &pairs[i].chosen)).collect();
        let rejected_tokens: Vec<f32> = batch.iter().map(|&i| fitted(&pairs[i].prompt, &pairs[i].rejected)).collect();
        let scored = score(&self.tuned.decoder, &sequences, self.pad_id, self.max_length)?;
        let (mut chosen, mut rejected) = (scored.logps.narrow(0, 0, b)?, scored.logps.narrow(0, b, b)?);
        if self.settings.loss == Loss::Simpo {
            let targets = |range: std::ops::Range<usize>| -> Result<Tensor> {
                let counts: Vec<f32> = scored.counted[range].iter().map(|&c| c.max(1) as f32).collect();
                Ok(Tensor::from_vec(counts, b, device)?)
            };
            chosen = (chosen / targets(0..b)?)?;
            rejected = (rejected / targets(b..2 * b)?)?;
        }
        let reference = reference.map(|r| Ok::<_, crate::Error>((self.pick(&r.first, batch)?, self.pick(&r.second, batch)?))).transpose()?;
        let scores = PairScores {
            chosen: chosen.clone(),
            rejected: rejected.clone(),
            reference,
            chosen_tokens: Tensor::from_vec(chosen_tokens, b, device)?,
            rejected_tokens: Tensor::from_vec(rejected_tokens, b, device)?,
        };
        let (losses, chosen_rewards, rejected_rewards) = pair_losses(&self.settings, &scores)?;
        let mut loss = losses.mean_all()?;
        let mut metrics = pair_metrics(
            &chosen_rewards.to_vec1::<f32>()?,
            &rejected_rewards.to_vec1::<f32>()?,
            &chosen.detach().to_vec1::<f32>()?,
            &rejected.detach().to_vec1::<f32>()?,
            (scored.logits[..b].iter().fold(LogitSum::default(), add), scored.logits[b..].iter().fold(LogitSum::default(), add)),
        );
        if let Some(alpha) = self.settings.rpo_alpha {
            // TRL's `sft` loss: the mean negative log-likelihood of every chosen answer token.
            let counted: usize = scored.counted[..b].iter().sum();
            let nll = (scored.logps.narrow(0, 0, b)?.sum_all()? / -(counted.max(1) as f64))?;
            metrics.insert("nll_loss".into(), json!(nll.to_dtype(DType::F64)?.to_scalar::<f64>()?));
            loss = (loss + (nll * alpha)?)?;
        }
        Ok(BatchOutcome { loss, metrics, tokens: scored.tokens })
    }

    /// A KTO batch: its answers, and their mismatched KL sequences in a forward without
    /// gradients (they only estimate z).
    fn judged_batch(&self, judged: &[data::Judged], batch: &[usize], answers: &[Example], mismatched: &[Example], reference: &SplitLogps) -> Result<BatchOutcome> {
        let desirable: Vec<bool> = batch.iter().map(|&i| judged[i].desirable).collect();
        let mismatched = score(&self.tuned.decoder, mismatched, self.pad_id, self.max_length)?;
        let kl = kl_estimate(&mismatched.logps, &self.pick(&reference.second, batch)?)?;
        let scored = score(&self.tuned.decoder, answers, self.pad_id, self.max_length)?;
        let scores = JudgedScores { logps: scored.logps.clone(), reference: self.pick(&reference.first, batch)?, desirable: &desirable, kl: kl.clone() };
        let (loss, rewards) = kto_loss(&self.settings, &scores)?;
        let logits = |want: bool| {
            scored.logits.iter().zip(&desirable).filter(|(_, d)| **d == want).map(|(l, _)| *l).fold(LogitSum::default(), |a, l| add(a, &l))
        };
        let metrics = judged_metrics(
            &rewards.to_vec1::<f32>()?,
            &scored.logps.detach().to_vec1::<f32>()?,
            &desirable,
            (logits(true), logits(false)),
            kl.to_vec1::<f32>()?[0],
        );
        Ok(BatchOutcome { loss, metrics, tokens: scored.tokens + mismatched.tokens })
    }
}

fn add(a: LogitSum, b: &LogitSum) -> LogitSum {
    LogitSum { sum: a.sum + b.sum, count: a.count + b.count }
}

/// Summed answer log-probabilities `[sequences]` (in the graph) and what the metrics need.
struct Scored {
    logps: Tensor,
    counted: Vec<usize>,
    logits: Vec<LogitSum>,
    tokens: usize,
}

/// One forward over the sequences, packed into rows of `capacity` tokens (samples never see
/// each other; a batch's padding would otherwise be a quarter of its compute).
fn score(model: &Decoder, sequences: &[Example], pad: u32, capacity: usize) -> Result<Scored> {
    let lengths: Vec<usize> = sequences.iter().map(|e| e.ids.len()).collect();
    let rows: Vec<Row> = pack(&lengths, capacity);
    let counted = counted_logits(model, sequences, &rows, pad)?;
    let device = model.device();
    let per_target = crate::model::ops::cross_entropy_rows(&counted.logits, &counted.targets)?.neg()?;
    let (s, n) = (sequences.len(), counted.owners.len());
    // Per-sequence sums as one product with a 0/1 selection matrix (it has a backward).
    let mut selection = vec![0f32; s * n];
    let mut count = vec![0usize; s];
    let mut logits = vec![LogitSum::default(); s];
    for (j, (&owner, mean)) in counted.owners.iter().zip(row_means(&counted.logits)?).enumerate() {
        selection[owner * n + j] = 1.0;
        count[owner] += 1;
        logits[owner].sum += mean;
        logits[owner].count += 1;
    }
    let logps = Tensor::from_vec(selection, (s, n), device)?.matmul(&per_target.unsqueeze(1)?)?.squeeze(1)?;
    Ok(Scored { logps, counted: count, logits, tokens: counted.tokens })
}

/// The token ids every scored sequence is made from (for the reference fingerprint).
fn sequences_json(split: &Split) -> Value {
    match &split.examples {
        Examples::Pairs(pairs) => json!({"pairs": pairs, "batches": split.batches}),
        Examples::Judged(judged) => json!({"judged": judged, "batches": split.batches}),
    }
}

/// Batches of the training and held-out examples: held-out ones in file order; training pairs
/// in file order (the reference is computed on those chunks; random sampling redraws them
/// every epoch), KTO's training answers drawn once into fixed batches.
fn batches(train: Examples, val: Examples, sampling: Sampling, batch_size: usize, seed: u64) -> (Split, Split) {
    let order = match (&train, sampling) {
        (Examples::Judged(_), Sampling::Random) => shuffled(train.len(), seed, 0),
        _ => (0..train.len()).collect(),
    };
    let val_order = (0..val.len()).collect();
    (Split::new(train, order, batch_size), Split::new(val, val_order, batch_size))
}

/// Where the training batches come from, epoch by epoch.
fn plan(train: &Split, sampling: Sampling, seed: u64) -> EpochCursor<Vec<usize>> {
    let batches = train.batches.clone();
    let batch_size = batches[0].len();
    let n = train.examples.len();
    match (&train.examples, sampling) {
        (_, Sampling::Sequential) => EpochCursor::new(move |_| batches.clone()),
        (Examples::Pairs(_), Sampling::Random) => EpochCursor::new(move |epoch| {
            shuffled(n, seed, epoch).chunks(batch_size).map(<[usize]>::to_vec).collect()
        }),
        (Examples::Judged(_), Sampling::Random) => EpochCursor::new(move |epoch| {
            shuffled(batches.len(), seed.wrapping_add(1), epoch).into_iter().map(|b| batches[b].clone()).collect()
        }),
    }
}

/// The policy's folder and tokenizer, and the `--ref-model` folder, checked to read the same
/// token ids before any compute.
fn open_models(options: &DpoOptions) -> Result<(ModelFolder, LoadedTokenizer, Option<ModelFolder>)> {
    let folder = ModelFolder::open(&options.model)?;
    check_causal(&folder, "--model")?;
    folder.check_max_length(options.max_length)?;
    let tokenizer = folder.load_matching_tokenizer()?;
    let ref_folder = options.ref_model.as_deref().map(ModelFolder::open).transpose()?;
    if let Some(reference) = &ref_folder {
        check_causal(reference, "--ref-model")?;
        check_same_vocabulary(&tokenizer, &reference.load_tokenizer()?, &reference.dir, "--ref-model")?;
        if reference.config.vocab_size != folder.config.vocab_size {
            return Err(bad_input(
                &reference.dir,
                format!(
                    "--ref-model: {} embedding rows, the policy has {}: it must score the policy's token ids",
                    reference.config.vocab_size, folder.config.vocab_size
                ),
            ));
        }
    }
    Ok((folder, tokenizer, ref_folder))
}

/// Training and held-out examples (`--val`, or the tail of the data with `--val-fraction`)
/// and what reading them found; refused when nothing is left to train on.
fn read_data(options: &DpoOptions, encoder: &Encoder, unpaired: bool) -> Result<(Examples, Examples, DataReport, Option<DataReport>)> {
    let (mut loaded, mut report) = data::read(&options.inputs, encoder, unpaired)?;
    report.log("training data", options.max_length, options.max_prompt_length);
    let (held, val_report) = match (&options.val, options.val_fraction) {
        (Some(path), _) => {
            let (held, val_report) = data::read(std::slice::from_ref(path), encoder, unpaired)?;
            val_report.log("held-out data", options.max_length, options.max_prompt_length);
            (held, Some(val_report))
        }
        (None, Some(fraction)) => {
            if loaded.len() < 2 {
                return Err(bad_input(&options.inputs[0], "too few examples to hold some out for --val-fraction"));
            }
            (loaded.hold_out(fraction), None)
        }
        (None, None) => (data::Loaded::default(), None),
    };
    if loaded.is_empty() {
        return Err(bad_input(
            &options.inputs[0],
            format!(
                "no examples left to train on: {} rows read, {} with an empty answer, {} with identical chosen and rejected answers, {} whose prompt fills --max-length",
                report.rows, report.empty, report.identical, report.prompt_fills_max_length
            ),
        ));
    }
    let (train, val) = (loaded.into_examples(unpaired), held.into_examples(unpaired));
    if let Examples::Judged(judged) = &train {
        report.desirable = judged.iter().filter(|j| j.desirable).count();
        report.undesirable = judged.len() - report.desirable;
    }
    Ok((train, val, report, val_report))
}

fn check_causal(folder: &ModelFolder, flag: &str) -> Result<()> {
    if folder.config.head != Head::CausalLm {
        return Err(bad_input(&folder.dir, format!("{flag} is a sequence classifier; dpo needs a causal LM")));
    }
    Ok(())
}

fn check_settings(s: &LossSettings, has_ref_model: bool) -> Result<()> {
    if !(s.beta > 0.0 && s.beta.is_finite()) {
        return Err(usage(format!("--beta {}: must be a positive number", s.beta)));
    }
    let eps = s.label_smoothing;
    match s.loss {
        Loss::Robust if !(0.0..0.5).contains(&eps) => {
            return Err(usage(format!("--label-smoothing {eps}: robust DPO needs a flip probability in [0, 0.5)")));
        }
        Loss::Sigmoid | Loss::Simpo if !(0.0..=0.5).contains(&eps) => {
            return Err(usage(format!("--label-smoothing {eps}: must be in [0, 0.5]")));
        }
        Loss::Hinge | Loss::Ipo | Loss::Kto if eps != 0.0 => {
            return Err(usage(format!("--label-smoothing applies to --loss sigmoid (cDPO), robust and simpo, not {}", s.loss.name())));
        }
        _ => {}
    }
    if s.loss == Loss::Simpo && has_ref_model {
        return Err(usage("--loss simpo is reference-free; drop --ref-model"));
    }
    if let Some(alpha) = s.rpo_alpha {
        if s.loss == Loss::Kto {
            return Err(usage("--rpo-alpha adds the chosen answers' NLL to a paired loss; kto has no chosen answers"));
        }
        if !(alpha >= 0.0 && alpha.is_finite()) {
            return Err(usage(format!("--rpo-alpha {alpha}: must be a number ≥ 0")));
        }
    }
    if !(s.desirable_weight > 0.0 && s.undesirable_weight > 0.0) {
        return Err(usage("--desirable-weight and --undesirable-weight must be positive"));
    }
    if s.loss != Loss::Kto && (s.desirable_weight != 1.0 || s.undesirable_weight != 1.0) {
        return Err(usage("--desirable-weight and --undesirable-weight apply to --loss kto"));
    }
    if !s.simpo_gamma.is_finite() {
        return Err(usage("--simpo-gamma must be a number"));
    }
    Ok(())
}

/// Warns once when the chosen answers' log-probabilities fall steadily (below the reference's)
/// while the margin rises: both answers are being pushed down, the most reported DPO failure.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct FallingChosen {
    /// (rewards/chosen, rewards/margins) of the latest points.
    points: VecDeque<(f64, f64)>,
    warned: bool,
}

impl FallingChosen {
    /// `segments` windows of `width` points: the chosen rewards' means fall from each to the
    /// next and end below zero while the margin's mean ends above where it started.
    fn push(&mut self, chosen: f64, signal: f64, segments: usize, width: usize, prefix: &str) -> Option<String> {
        self.points.push_back((chosen, signal));
        while self.points.len() > segments * width {
            self.points.pop_front();
        }
        if self.warned || self.points.len() < segments * width {
            return None;
        }
        let points: Vec<(f64, f64)> = self.points.iter().copied().collect();
        let means: Vec<(f64, f64)> = points
            .chunks(width)
            .map(|c| (c.iter().map(|p| p.0).sum::<f64>() / width as f64, c.iter().map(|p| p.1).sum::<f64>() / width as f64))
            .collect();
        let (first, last) = (means[0], means[segments - 1]);
        let falling = means.windows(2).all(|w| w[1].0 < w[0].0) && last.0 < 0.0;
        if !(falling && last.1 > first.1) {
            return None;
        }
        self.warned = true;
        Some(format!(
            "{prefix}rewards/chosen fell from {:.4} to {:.4} while {prefix}rewards/margins rose from {:.4} to {:.4}: the chosen answers' log-probabilities are falling too, the rejected ones only faster; consider a lower --lr, a higher --beta, --rpo-alpha 1 or --loss ipo",
            first.0, last.0, first.1, last.1
        ))
    }
}

/// The falling-chosen watch over training steps and over evaluations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Watches {
    steps: FallingChosen,
    evals: FallingChosen,
}

/// `rewards/chosen` and the margin beside it: a margin that grows while the chosen rewards
/// fall means the rejected answers fall faster, both pushed down.
fn watch_signal(metrics: &Map<String, Value>) -> Option<(f64, f64)> {
    let get = |k: &str| metrics.get(k).and_then(Value::as_f64);
    Some((get("rewards/chosen")?, get("rewards/margins")?))
}

impl Task for DpoTask {
    fn params(&self) -> &Params {
        self.tuned.params()
    }

    fn next_loss(&mut self) -> Result<StepLoss> {
        let batch = self.cursor.next();
        self.tuned.dropout_for(Some(self.cursor.consumed()));
        let outcome = self.batch(&self.train, &batch, self.reference.as_ref().map(|r| &r.train))?;
        let mut metrics = outcome.metrics;
        if let Some((chosen, signal)) = watch_signal(&metrics) {
            if let Some(warning) = self.watch.steps.push(chosen, signal, 4, 5, "") {
                progress::warn(format!("warning: dpo: over the last 20 steps {warning}"));
            }
        }
        metrics.insert("epoch".into(), json!(self.cursor.epochs()));
        Ok(StepLoss { loss: outcome.loss, tokens: outcome.tokens as u64, metrics })
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        if self.val.examples.is_empty() {
            return Ok(None);
        }
        let limit = if self.eval_batches == 0 { self.val.batches.len() } else { self.eval_batches.min(self.val.batches.len()) };
        let (mut loss_sum, mut examples) = (0f64, 0usize);
        let mut sums: Map<String, Value> = Map::new();
        let mut counts: std::collections::HashMap<String, usize> = Default::default();
        self.tuned.dropout_for(None);
        for batch in &self.val.batches[..limit] {
            let outcome = self.batch(&self.val, batch, self.reference.as_ref().map(|r| &r.eval))?;
            loss_sum += outcome.loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()? * batch.len() as f64;
            examples += batch.len();
            // TRL averages each metric over the batches that logged it.
            for (key, value) in outcome.metrics {
                let v = value.as_f64().unwrap_or(f64::NAN);
                let total = sums.get(&key).and_then(Value::as_f64).unwrap_or(0.0);
                sums.insert(key.clone(), json!(total + v));
                *counts.entry(key).or_default() += 1;
            }
        }
        let metrics: Map<String, Value> =
            sums.into_iter().map(|(k, v)| (k.clone(), json!(v.as_f64().unwrap_or(f64::NAN) / counts[&k] as f64))).collect();
        if let Some((chosen, signal)) = watch_signal(&metrics) {
            if let Some(warning) = self.watch.evals.push(chosen, signal, 3, 1, "eval_") {
                progress::warn(format!("warning: dpo: over the last 3 evaluations {warning}"));
            }
        }
        Ok(Some(Evaluation { loss: loss_sum / examples.max(1) as f64, perplexity: false, metrics }))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.tuned.save(dir, &self.parts)
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.tuned.load_checkpoint(dir)
    }

    fn headline_metrics(&self) -> &'static [&'static str] {
        &["rewards/accuracies", "rewards/margins", "rewards/chosen", "kl"]
    }

    fn data_state(&self) -> Value {
        json!({"cursor": self.cursor.state(), "watch": self.watch})
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        self.cursor.restore(&state["cursor"])?;
        self.watch = serde_json::from_value(state["watch"].clone()).unwrap_or_default();
        Ok(())
    }

    fn signature(&self) -> Value {
        let c = &self.tuned.config;
        json!({
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "loss": self.settings.loss.name(), "max_length": self.max_length, "examples": self.train.examples.len(),
            "lora": self.tuned.adapter().map(|a| json!({"r": a.settings.r, "modules": a.modules.len()})),
        })
    }

    fn summary(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("loss_type".into(), json!(self.settings.loss.name()));
        out.insert("beta".into(), json!(self.settings.beta));
        out.insert("reference".into(), json!(self.source.as_ref().map(ReferenceSource::describe)));
        out.insert("examples".into(), json!(self.train.examples.len()));
        out.insert("held_out".into(), json!(self.val.examples.len()));
        out.insert("data".into(), json!(self.report));
        out.insert("held_out_data".into(), json!(self.val_report));
        out.insert("parameters".into(), json!(self.tuned.params().num_elements()));
        out
    }
}

#[cfg(test)]
mod tests;
