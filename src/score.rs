//! Response scoring: a numeric score per response from a reward model, programmatic rules
//! (a guard classifier's probability among them), a person at the terminal, or imported human
//! ratings, added to a responses Parquet with every other column carried through. Several
//! annotators' scores are merged by [`crate::human::merge`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::Device;
use regex::Regex;
use serde_json::Value;

use crate::data::parquet_io::{Batch, lathe_metadata};
use crate::data::records::{Record, RecordReader, ResponseRecord};
use crate::data::{Kind, ParquetSink, meta};
use crate::error::{Result, bad_input, usage};
use crate::human::scoring::{Scale, ScoreJudgement};
use crate::human::session::{self, Annotation};
use crate::human::{ItemKey, first_few, ratings, read_responses};
use crate::model::{Head, Decoder, ModelFolder};
use crate::progress::{self, Progress, Unit};
use crate::reward::{ScoringFormat, classifier_labels, score_rows};
use crate::safety::{chrf, is_refusal};
use crate::tokenizer::LoadedTokenizer;
use crate::train::sequences::Truncation;

/// One programmatic scorer.
#[derive(Debug)]
pub enum Rule {
    /// Characters in the response.
    Length,
    /// 1 when the pattern matches the response.
    Regex(Regex),
    /// 1 when the response contains the text.
    Contains(String),
    /// 1 when the response opens with a refusal.
    Refusal,
    /// 1 when the response equals the `reference` column (trimmed).
    Exact,
    /// chrF against the `reference` column, in [0, 1].
    Chrf,
    /// The probability a multi-label guard classifier gives the response for one label.
    Guard(Box<Guard>),
}

/// How models named in rules are run.
#[derive(Clone, Debug)]
pub struct ModelSettings {
    pub device: Device,
    /// Sequences per forward pass.
    pub batch_size: usize,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings { device: Device::Cpu, batch_size: 16 }
    }
}

#[derive(Debug)]
pub struct WeightedRule {
    pub rule: Rule,
    pub weight: f64,
    pub spec: String,
}

impl WeightedRule {
    /// `NAME[:ARG][:WEIGHT]`: `length:-0.01`, `regex:^[A-Z]:1`, `contains:Paris`, `refusal:-1`,
    /// `exact`, `chrf:2`, `guard:MODEL:LABEL:-1`. The weight is the last field when it is a
    /// number (default 1).
    pub fn parse(spec: &str, models: &ModelSettings) -> Result<Self> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        if name == "guard" {
            return Self::parse_guard(spec, rest, models);
        }
        let (argument, weight): (&str, f64) = match rest.rsplit_once(':') {
            Some((argument, weight)) if weight.parse::<f64>().is_ok() => (argument, weight.parse().unwrap_or(1.0)),
            _ if rest.parse::<f64>().is_ok() => ("", rest.parse().unwrap_or(1.0)),
            _ => (rest, 1.0),
        };
        let needs_argument = |what: &str| {
            if argument.is_empty() { Err(usage(format!("--rule {spec}: `{name}` needs {what}, e.g. {name}:{what}:1"))) } else { Ok(()) }
        };
        let no_argument = || {
            if argument.is_empty() { Ok(()) } else { Err(usage(format!("--rule {spec}: `{name}` takes only a weight, e.g. {name}:-1"))) }
        };
        let rule = match name {
            "length" => no_argument().map(|_| Rule::Length)?,
            "refusal" => no_argument().map(|_| Rule::Refusal)?,
            "exact" => no_argument().map(|_| Rule::Exact)?,
            "chrf" => no_argument().map(|_| Rule::Chrf)?,
            "regex" => {
                needs_argument("PATTERN")?;
                Rule::Regex(Regex::new(argument).map_err(|e| usage(format!("--rule {spec}: bad pattern ({e})")))?)
            }
            "contains" => {
                needs_argument("TEXT")?;
                Rule::Contains(argument.to_string())
            }
            other => {
                return Err(usage(format!(
                    "--rule {spec}: unknown rule `{other}`; expected length, regex, contains, refusal, exact, chrf or guard"
                )));
            }
        };
        Self::weighted(rule, weight, spec)
    }

    /// `guard:MODEL:LABEL[:WEIGHT]`. LABEL and WEIGHT are the last fields, so MODEL may hold
    /// ':' itself; a LABEL that is a number needs the weight written out (`guard:m:3:1`).
    fn parse_guard(spec: &str, rest: &str, models: &ModelSettings) -> Result<Self> {
        let (model_and_label, weight) = match rest.rsplit_once(':') {
            Some((head, weight)) if head.contains(':') && weight.parse::<f64>().is_ok() => (head, weight.parse().unwrap_or(1.0)),
            _ => (rest, 1.0),
        };
        let (model, label) = model_and_label
            .rsplit_once(':')
            .filter(|(model, label)| !model.is_empty() && !label.is_empty())
            .ok_or_else(|| usage(format!("--rule {spec}: `guard` needs MODEL:LABEL, e.g. guard:runs/guard:violence:-1")))?;
        Self::weighted(Rule::Guard(Box::new(Guard::load(model, label, models)?)), weight, spec)
    }

    fn weighted(rule: Rule, weight: f64, spec: &str) -> Result<Self> {
        if !weight.is_finite() {
            return Err(usage(format!("--rule {spec}: the weight must be a finite number")));
        }
        Ok(WeightedRule { rule, weight, spec: spec.to_string() })
    }

    /// Exact and chrF compare with a `reference` text.
    pub fn needs_reference(&self) -> bool {
        matches!(self.rule, Rule::Exact | Rule::Chrf)
    }

    /// The rule's value (before its weight) for each response; `references` line up with them.
    pub fn values(&self, responses: &[&str], references: Option<&[&str]>) -> Result<Vec<f64>> {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let reference = |i: usize| references.map_or("", |r| r[i]);
        let each = |value: &dyn Fn(usize, &str) -> f64| responses.iter().enumerate().map(|(i, response)| value(i, response)).collect();
        Ok(match &self.rule {
            Rule::Length => each(&|_, response| response.chars().count() as f64),
            Rule::Regex(pattern) => each(&|_, response| flag(pattern.is_match(response))),
            Rule::Contains(text) => each(&|_, response| flag(response.contains(text.as_str()))),
            Rule::Refusal => each(&|_, response| flag(is_refusal(response))),
            Rule::Exact => each(&|i, response| flag(response.trim() == reference(i).trim())),
            Rule::Chrf => each(&|i, response| chrf(response, reference(i))),
            Rule::Guard(guard) => guard.probabilities(responses)?,
        })
    }
}

/// The weighted sum of the rules' values for each response: the score `--rule` gives.
pub fn rule_scores(rules: &[WeightedRule], responses: &[&str], references: Option<&[&str]>) -> Result<Vec<f64>> {
    let mut total = vec![0f64; responses.len()];
    for rule in rules {
        for (sum, value) in total.iter_mut().zip(rule.values(responses, references)?) {
            *sum += rule.weight * value;
        }
    }
    Ok(total)
}

/// A sequence classifier ready to score text: the encoding it was trained with (`lathe_scoring`
/// in its config.json), its padding and batching.
struct Classifier {
    model: Decoder,
    tokenizer: LoadedTokenizer,
    format: ScoringFormat,
    eos: Option<u32>,
    pad: u32,
    batch_size: usize,
}

impl Classifier {
    fn load(folder: &ModelFolder, batch_size: usize, device: &Device) -> Result<Self> {
        let format = match folder.config.raw.get("lathe_scoring") {
            Some(value) => serde_json::from_value(value.clone()).map_err(|e| bad_input(folder.dir.join("config.json"), format!("`lathe_scoring`: {e}")))?,
            None => ScoringFormat {
                append_eos: true,
                max_length: folder.config.max_position_embeddings,
                truncation: Truncation::Left,
            },
        };
        let tokenizer = folder.load_tokenizer()?;
        let (params, eos) = (folder.load_params(device)?, folder.config.eos_token_ids.first().copied().or(tokenizer.eos_id()));
        Ok(Classifier {
            model: Decoder::new_inference(&folder.config, &params)?,
            pad: folder.config.pad_token_id.unwrap_or(0),
            tokenizer,
            format,
            eos,
            batch_size: batch_size.max(1),
        })
    }

    /// Scores `[text][label]`, encoded with the model's length policy.
    fn scores(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut encoded = Vec::with_capacity(texts.len());
        for text in texts {
            let (ids, _) = self.format.encode(&self.tokenizer, text, self.eos)?;
            // A length policy of `drop` cannot drop a response that must be scored: keep its end.
            let ids = match ids {
                Some(ids) => ids,
                None => {
                    let all = ScoringFormat { truncation: Truncation::Left, ..self.format.clone() };
                    all.encode(&self.tokenizer, text, self.eos)?.0.unwrap_or_default()
                }
            };
            encoded.push(ids);
        }
        self.score_encoded(&encoded)
    }

    /// Scores `[text][label]` of the whole of each text: one longer than the model reads is
    /// scored in overlapping windows (the windows output guards check a stream in), each
    /// ending with EOS as in training, and each label's highest score counts. So no part of a
    /// text goes unread, wherever it sits.
    fn covering_scores(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let eos = self.eos.filter(|_| self.format.append_eos);
        let room = self.format.max_length.saturating_sub(usize::from(eos.is_some())).max(2);
        let (mut rows, mut owner) = (Vec::new(), Vec::new());
        for (i, text) in texts.iter().enumerate() {
            let mut ids = self.tokenizer.encode_prompt(text)?;
            if ids.last().is_some() && ids.last() == eos.as_ref() {
                ids.pop();
            }
            for span in guard_windows(ids.len(), room) {
                rows.push(ids[span].iter().copied().chain(eos).collect::<Vec<u32>>());
                owner.push(i);
            }
        }
        let mut best: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for (i, scores) in owner.into_iter().zip(self.score_encoded(&rows)?) {
            if best[i].is_empty() {
                best[i] = scores;
            } else {
                best[i].iter_mut().zip(scores).for_each(|(b, s)| *b = b.max(s));
            }
        }
        Ok(best)
    }

    /// Scores of token rows, batched by length.
    fn score_encoded(&self, encoded: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut scores = vec![Vec::new(); encoded.len()];
        for chunk in order.chunks(self.batch_size) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
            let values = score_rows(&self.model, &rows, self.pad)?.to_vec2::<f32>()?;
            for (&i, value) in chunk.iter().zip(values) {
                scores[i] = value;
            }
        }
        Ok(scores)
    }
}

/// Overlapping spans that cover `0..len`: span `k` holds the `chunk` items from `k × chunk`
/// with up to `overlap` items before them, so anything up to `overlap + 1` items long lies
/// whole in one span. Output guards check a stream in these spans of characters; guards read
/// a long text in these spans of tokens.
pub fn overlapping_windows(len: usize, chunk: usize, overlap: usize) -> Vec<std::ops::Range<usize>> {
    (0..len).step_by(chunk.max(1)).map(|start| start.saturating_sub(overlap)..(start + chunk).min(len)).collect()
}

/// The token spans a guard reads a text of `len` tokens in, each at most `room` long: the whole
/// text when it fits, else half-window steps, so any run of up to `room / 2` tokens lies whole
/// in a span.
fn guard_windows(len: usize, room: usize) -> Vec<std::ops::Range<usize>> {
    if len <= room {
        // An empty text too is read once (as EOS alone), like any text that fits.
        return vec![std::ops::Range { start: 0, end: len }];
    }
    let half = room / 2;
    let mut spans = overlapping_windows(len, half, half);
    // The first span is the start of the second.
    if spans.len() > 1 && spans[1].start == 0 {
        spans.remove(0);
    }
    spans
}

/// A reward model ready to score text.
pub struct RewardScorer {
    classifier: Classifier,
    /// (mean, std) to normalise with.
    normalization: Option<(f64, f64)>,
    name: String,
}

impl RewardScorer {
    pub fn load(model: &str, normalize: bool, batch_size: usize, device: &Device) -> Result<Self> {
        let folder = ModelFolder::open(model)?;
        if folder.config.head != (Head::SequenceClassification { num_labels: 1 }) {
            return Err(bad_input(&folder.dir, "is not a reward model (a …ForSequenceClassification with one label)"));
        }
        let raw = &folder.config.raw;
        let normalization = if normalize {
            let number = |k: &str| raw.get(k).and_then(Value::as_f64);
            match (number("reward_mean"), number("reward_std")) {
                (Some(mean), Some(std)) if std > 0.0 => Some((mean, std)),
                _ => return Err(bad_input(folder.dir.join("config.json"), "--normalize needs `reward_mean` and a positive `reward_std` (rm-train writes them)")),
            }
        } else {
            None
        };
        Ok(RewardScorer {
            classifier: Classifier::load(&folder, batch_size, device)?,
            normalization,
            name: format!("reward-model:{}", folder.dir.display()),
        })
    }

    /// `reward-model:DIR`, as recorded in the `scorer` column.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rewards of `prompt + response` texts, batched by length.
    pub fn score(&self, texts: &[String]) -> Result<Vec<f64>> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        Ok(self
            .classifier
            .scores(&texts)?
            .into_iter()
            .map(|value| {
                let value = value[0] as f64;
                match self.normalization {
                    Some((mean, std)) => (value - mean) / std,
                    None => value,
                }
            })
            .collect())
    }
}

/// A multi-label guard classifier (`rm-train --task multilabel`) with all its labels.
pub struct GuardModel {
    classifier: Classifier,
    pub labels: Vec<String>,
    /// The per-label decision thresholds rm-train chose on held-out data (`thresholds` in
    /// config.json), in label order, when the folder has them for every label.
    pub thresholds: Option<Vec<f64>>,
    pub dir: PathBuf,
}

impl GuardModel {
    pub fn load(model: &str, models: &ModelSettings) -> Result<Self> {
        let folder = ModelFolder::open(model)?;
        let labels = classifier_labels(&folder.config).ok_or_else(|| {
            bad_input(&folder.dir, "is not a multi-label classifier (config.json needs problem_type multi_label_classification and id2label; rm-train --task multilabel makes one)")
        })?;
        let thresholds = folder.config.raw.get("thresholds").and_then(Value::as_object).and_then(|map| {
            labels.iter().map(|l| map.get(l).and_then(Value::as_f64)).collect::<Option<Vec<f64>>>()
        });
        Ok(GuardModel { classifier: Classifier::load(&folder, models.batch_size, &models.device)?, labels, thresholds, dir: folder.dir })
    }

    /// The index of `label`, or bad input naming the labels there are.
    pub fn label_index(&self, label: &str) -> Result<usize> {
        self.labels.iter().position(|l| l == label).ok_or_else(|| {
            bad_input(&self.dir, format!("the guard has no label `{label}`; its labels: {}", self.labels.join(", ")))
        })
    }

    /// σ(logit) of every label for each text: `[text][label]`. The whole text is read: a
    /// longer one than the guard's `max_length` in overlapping windows, the highest counting.
    pub fn probabilities(&self, texts: &[&str]) -> Result<Vec<Vec<f64>>> {
        Ok(self
            .classifier
            .covering_scores(texts)?
            .into_iter()
            .map(|row| row.into_iter().map(|s| 1.0 / (1.0 + (-(s as f64)).exp())).collect())
            .collect())
    }
}

/// A multi-label guard classifier judging responses for one label.
pub struct Guard {
    model: GuardModel,
    label: usize,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guard(label {})", self.label)
    }
}

impl Guard {
    pub fn load(model: &str, label: &str, models: &ModelSettings) -> Result<Self> {
        let model = GuardModel::load(model, models)?;
        let label = model.label_index(label)?;
        Ok(Guard { model, label })
    }

    /// σ(logit) of the label for each response.
    pub fn probabilities(&self, responses: &[&str]) -> Result<Vec<f64>> {
        Ok(self.model.probabilities(responses)?.into_iter().map(|p| p[self.label]).collect())
    }
}

/// A score decided before writing: a person's answer or an imported rating.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    /// `None`: skipped, or left blank.
    pub score: Option<f64>,
    pub annotator: Option<String>,
}

/// Scores decided before writing, by response.
pub struct KnownScores {
    pub by_response: HashMap<ItemKey, Judged>,
    /// The `scorer` of responses without an annotator (`human:NAME` otherwise).
    pub scorer: String,
}

pub enum Scorer {
    RewardModel(Box<RewardScorer>),
    Rules(Vec<WeightedRule>),
    Known(KnownScores),
}

/// What a scorer says about one batch of rows.
struct Judgements {
    scores: Vec<Option<f64>>,
    scorers: Vec<String>,
    annotators: Vec<Option<String>>,
}

impl Scorer {
    fn name(&self) -> String {
        match self {
            Scorer::RewardModel(m) => m.name().to_string(),
            Scorer::Rules(rules) => format!("rules:{}", rules.iter().map(|r| r.spec.as_str()).collect::<Vec<_>>().join(",")),
            Scorer::Known(known) => known.scorer.clone(),
        }
    }

    /// Known scores may be missing, and name their annotators.
    fn is_known(&self) -> bool {
        matches!(self, Scorer::Known(_))
    }

    fn judge(&self, rows: &[ResponseRecord], batch: &Batch) -> Result<Judgements> {
        let computed = |scores: Vec<f64>| Judgements {
            scores: scores.into_iter().map(Some).collect(),
            scorers: vec![self.name(); rows.len()],
            annotators: vec![None; rows.len()],
        };
        Ok(match self {
            Scorer::RewardModel(model) => {
                let texts: Vec<String> = rows.iter().map(|r| format!("{}{}", r.prompt, r.response)).collect();
                computed(model.score(&texts)?)
            }
            Scorer::Rules(rules) => {
                let references = if rules.iter().any(WeightedRule::needs_reference) { Some(batch.strings("reference")?) } else { None };
                let references: Option<Vec<&str>> = references.as_ref().map(|r| (0..r.len()).map(|i| r.value(i)).collect());
                let responses: Vec<&str> = rows.iter().map(|r| r.response.as_str()).collect();
                computed(rule_scores(rules, &responses, references.as_deref())?)
            }
            Scorer::Known(known) => {
                let judged: Vec<Option<&Judged>> = rows.iter().map(|r| known.by_response.get(&ItemKey::of(r))).collect();
                let annotators: Vec<Option<String>> = judged.iter().map(|j| j.and_then(|j| j.annotator.clone())).collect();
                Judgements {
                    scores: judged.iter().map(|j| j.and_then(|j| j.score)).collect(),
                    scorers: annotators.iter().map(|a| a.as_ref().map_or_else(|| known.scorer.clone(), |a| format!("human:{a}"))).collect(),
                    annotators,
                }
            }
        })
    }
}

pub struct ScoreOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub column: String,
    pub config: String,
}

#[derive(Debug, Default)]
pub struct ScoreReport {
    pub responses: u64,
    /// Responses given a score (the rest are null: skipped or without a rating).
    pub scored: u64,
    /// Mean of the scores given.
    pub mean: f64,
}

/// Score every response of `input` and write them with `column` and `scorer` added.
pub fn score(options: &ScoreOptions, scorer: &Scorer) -> Result<ScoreReport> {
    let reader = RecordReader::<ResponseRecord>::open(&options.input)?;
    if let Scorer::Rules(rules) = scorer {
        if rules.iter().any(WeightedRule::needs_reference) && !reader.source().has_column("reference") {
            return Err(bad_input(&options.input, "the exact / chrf rules need a `reference` column"));
        }
    }
    write_scored(&reader, options, scorer)
}

/// The columns of `schema` a scored output carries through: all but the responses columns and
/// those the output writes itself (`ours`).
pub fn carried_fields(schema: &Schema, ours: &[&str]) -> Vec<Field> {
    let own: Vec<String> = ResponseRecord::fields().iter().map(|f| f.name().clone()).collect();
    schema
        .fields()
        .iter()
        .filter(|f| !own.contains(f.name()) && !ours.contains(&f.name().as_str()))
        .map(|f| f.as_ref().clone())
        .collect()
}

/// Stream the responses of `reader` to `-o` with the scorer's columns: `column`, `scorer`, and
/// for known scores `annotator`; other columns carried through.
fn write_scored(reader: &RecordReader<ResponseRecord>, options: &ScoreOptions, scorer: &Scorer) -> Result<ScoreReport> {
    let mut ours = vec![options.column.as_str(), "scorer"];
    if scorer.is_known() {
        ours.push("annotator");
    }
    let carried = carried_fields(reader.source().schema(), &ours);
    let mut fields = ResponseRecord::fields();
    fields.push(Field::new(options.column.as_str(), DataType::Float64, scorer.is_known()));
    fields.push(Field::new("scorer", DataType::Utf8, false));
    if scorer.is_known() {
        fields.push(Field::new("annotator", DataType::Utf8, true));
    }
    fields.extend(carried.iter().cloned());
    let schema = Arc::new(Schema::new(fields));
    let mut metadata = lathe_metadata(Kind::Scored, "score");
    metadata.push((meta::CONFIG.to_string(), options.config.clone()));
    let mut sink = ParquetSink::create(&options.output, schema.clone(), metadata)?;
    let bar = Progress::new("scoring", Some(reader.source().num_rows()), Unit::Items("responses"));
    let mut report = ScoreReport::default();
    let mut sum = 0f64;
    for item in reader.batches()? {
        let (rows, batch) = item?;
        let judged = scorer.judge(&rows, &batch)?;
        let mut columns = ResponseRecord::to_arrays(&rows);
        columns.push(Arc::new(judged.scores.iter().collect::<Float64Array>()) as ArrayRef);
        columns.push(Arc::new(StringArray::from_iter_values(&judged.scorers)));
        if scorer.is_known() {
            columns.push(Arc::new(judged.annotators.iter().map(Option::as_deref).collect::<StringArray>()));
        }
        for field in &carried {
            columns.push(batch.column(field.name()).expect("read with all columns").clone());
        }
        sink.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
        report.responses += rows.len() as u64;
        report.scored += judged.scores.iter().flatten().count() as u64;
        sum += judged.scores.iter().flatten().sum::<f64>();
        bar.set_position(report.responses);
        crate::cli::check_interrupt()?;
    }
    bar.finish();
    if report.responses == 0 {
        return Err(bad_input(&options.input, "holds no responses"));
    }
    sink.finish()?;
    report.mean = sum / report.scored.max(1) as f64;
    progress::log(format!("scored {} of {} responses with {}: mean {:.4}", report.scored, report.responses, scorer.name(), report.mean));
    Ok(report)
}

/// `score --human`: a person scores every response (or skips it); the scores are written once
/// every response is decided. Quitting early keeps the journal and returns `Interrupted`.
pub fn score_by_hand(options: &ScoreOptions, human: &Annotation, scale: Scale) -> Result<ScoreReport> {
    let (reader, rows) = read_responses(&options.input)?;
    let session = human.session("score", Some(scale.to_string()), &options.input)?;
    let decisions = session::run(&ScoreJudgement::new(&rows, scale), session)?;
    let by_response = rows
        .iter()
        .map(|row| {
            let key = ItemKey::of(row);
            let score = decisions.get(&key).flatten().map(|answer| answer.score);
            (key, Judged { score, annotator: Some(human.annotator.clone()) })
        })
        .collect();
    let known = KnownScores { by_response, scorer: format!("human:{}", human.annotator) };
    let report = write_scored(&reader, options, &Scorer::Known(known))?;
    progress::log(format!(
        "every response decided: {} scored, {} skipped (null {}); the answers stay in {}",
        report.scored,
        report.responses - report.scored,
        options.column,
        human.journal.display()
    ));
    Ok(report)
}

/// `score --import RATINGS`: human ratings joined onto the responses by `prompt_id` and
/// `sample`. Ratings matching no response, and responses left without one (null score), are
/// reported; a response rated twice is refused.
pub fn import(options: &ScoreOptions, ratings_path: &Path, annotator: Option<&str>) -> Result<ScoreReport> {
    let (reader, rows) = read_responses(&options.input)?;
    let all = ratings::read_ratings(ratings_path, &options.column)?;
    let responses: HashSet<ItemKey> = rows.iter().map(ItemKey::of).collect();
    let unmatched: Vec<ItemKey> = all.iter().filter(|r| !responses.contains(&r.key)).map(|r| r.key.clone()).collect();
    let rated = all.len();
    let by_key = ratings::by_response(ratings_path, all)?;
    if unmatched.len() == rated {
        let first_responses: Vec<ItemKey> = rows.iter().take(3).map(ItemKey::of).collect();
        return Err(bad_input(
            ratings_path,
            format!(
                "none of its {} ratings names a response of {} (ratings: {}; responses: {})",
                rated,
                options.input.display(),
                first_few(&unmatched, 3),
                first_few(&first_responses, 3)
            ),
        ));
    }
    if !unmatched.is_empty() {
        progress::warn(format!("note: {} ratings match no response and are left out: {}", unmatched.len(), first_few(&unmatched, 5)));
    }
    let unrated: Vec<ItemKey> =
        rows.iter().map(ItemKey::of).filter(|k| by_key.get(k).and_then(|r| r.score).is_none()).collect();
    if !unrated.is_empty() {
        progress::warn(format!("note: {} responses have no rating (null {}): {}", unrated.len(), options.column, first_few(&unrated, 5)));
    }
    let by_response = by_key
        .into_iter()
        .filter(|(key, _)| responses.contains(key))
        .map(|(key, rating)| (key, Judged { score: rating.score, annotator: rating.annotator.or(annotator.map(str::to_string)) }))
        .collect();
    let name = ratings_path.file_name().map_or_else(|| ratings_path.display().to_string(), |n| n.to_string_lossy().into_owned());
    write_scored(&reader, options, &Scorer::Known(KnownScores { by_response, scorer: format!("import:{name}") }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_windows_hold_every_run_of_half_a_window_whole() {
        assert_eq!(guard_windows(5, 8), vec![0..5]);
        assert_eq!(guard_windows(0, 8), vec![0..0], "an empty text is still read once");
        let spans = guard_windows(30, 8);
        assert!(spans.iter().all(|s| s.len() <= 8), "{spans:?}");
        assert_eq!((spans[0].clone(), spans.last().unwrap().end), (0..8, 30), "from the first token to the last");
        for start in 0..=26 {
            assert!(spans.iter().any(|s| s.start <= start && start + 4 <= s.end), "tokens {start}..{} are in no window: {spans:?}", start + 4);
        }
    }

    #[test]
    fn rules_parse_with_weights_and_colons_in_patterns() {
        let parse = |spec: &str| WeightedRule::parse(spec, &ModelSettings::default());
        let r = parse("length:-0.01").unwrap();
        assert!(matches!(r.rule, Rule::Length) && r.weight == -0.01);
        let r = parse("regex:^[A-Z]:1").unwrap();
        assert!(matches!(&r.rule, Rule::Regex(p) if p.as_str() == "^[A-Z]") && r.weight == 1.0);
        let r = parse("regex:a:b").unwrap();
        assert!(matches!(&r.rule, Rule::Regex(p) if p.as_str() == "a:b") && r.weight == 1.0);
        let r = parse("refusal").unwrap();
        assert!(matches!(r.rule, Rule::Refusal) && r.weight == 1.0);
        assert!(parse("regex").is_err());
        assert!(parse("length:abc").is_err());
        assert!(parse("sentiment:1").is_err());
        assert!(parse("regex:(:1").is_err());
        for spec in ["guard", "guard:only-model", "guard::violence"] {
            let e = parse(spec).unwrap_err();
            assert!(e.to_string().contains("`guard` needs MODEL:LABEL"), "{spec}: {e}");
        }
        // The weight is the last field; MODEL may hold ':' (the folder is looked up, so missing).
        let e = parse("guard:/no/such:dir:violence:-2").unwrap_err();
        assert!(e.to_string().contains("/no/such:dir"), "{e}");
    }

    #[test]
    fn rule_values() {
        let value = |spec: &str, response: &str, reference: Option<&str>| {
            let references = reference.map(|r| vec![r]);
            WeightedRule::parse(spec, &ModelSettings::default()).unwrap().values(&[response], references.as_deref()).unwrap()[0]
        };
        assert_eq!(value("length:-0.5", "abcd", None), 4.0);
        assert_eq!(value("regex:^[A-Z]", "Paris", None), 1.0);
        assert_eq!(value("contains:Paris", "It is Paris.", None), 1.0);
        assert_eq!(value("refusal", "I can't help with that.", None), 1.0);
        assert_eq!(value("exact", " Paris ", Some("Paris")), 1.0);
        assert_eq!(value("chrf", "Paris", Some("Paris")), 1.0);
        let rules: Vec<WeightedRule> = ["length:-0.5", "contains:a:3"].iter().map(|r| WeightedRule::parse(r, &ModelSettings::default()).unwrap()).collect();
        assert_eq!(rule_scores(&rules, &["abcd", "xyz"], None).unwrap(), vec![-2.0 + 3.0, -1.5]);
    }
}
