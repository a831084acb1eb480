//! Response scoring: a numeric score per response from a reward model or from programmatic
//! rules, added to a responses Parquet (with every other column carried through).

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::Device;
use regex::Regex;
use serde_json::Value;

use crate::data::parquet_io::{Batch, lathe_metadata};
use crate::data::records::{Record, RecordReader, ResponseRecord};
use crate::data::{Kind, ParquetSink, meta};
use crate::error::{Result, bad_input, usage};
use crate::model::{Head, Llama, ModelFolder};
use crate::progress::{self, Progress, Unit};
use crate::reward::{ScoringFormat, score_rows};
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
}

#[derive(Debug)]
pub struct WeightedRule {
    pub rule: Rule,
    pub weight: f64,
    pub spec: String,
}

impl WeightedRule {
    /// `NAME[:ARG][:WEIGHT]`: `length:-0.01`, `regex:^[A-Z]:1`, `contains:Paris`, `refusal:-1`,
    /// `exact`, `chrf:2`. The weight is the last field when it is a number (default 1).
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
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
                    "--rule {spec}: unknown rule `{other}`; expected length, regex, contains, refusal, exact or chrf"
                )));
            }
        };
        if !weight.is_finite() {
            return Err(usage(format!("--rule {spec}: the weight must be a finite number")));
        }
        Ok(WeightedRule { rule, weight, spec: spec.to_string() })
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self.rule, Rule::Exact | Rule::Chrf)
    }

    /// The rule's raw value (before its weight) for one response.
    pub fn value(&self, response: &str, reference: Option<&str>) -> f64 {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let reference = reference.unwrap_or("");
        match &self.rule {
            Rule::Length => response.chars().count() as f64,
            Rule::Regex(pattern) => flag(pattern.is_match(response)),
            Rule::Contains(text) => flag(response.contains(text.as_str())),
            Rule::Refusal => flag(is_refusal(response)),
            Rule::Exact => flag(response.trim() == reference.trim()),
            Rule::Chrf => chrf(response, reference),
        }
    }
}

/// A reward model ready to score text.
pub struct RewardScorer {
    model: Llama,
    tokenizer: LoadedTokenizer,
    format: ScoringFormat,
    eos: Option<u32>,
    pad: u32,
    /// (mean, std) to normalise with.
    normalization: Option<(f64, f64)>,
    batch_size: usize,
    name: String,
}

impl RewardScorer {
    pub fn load(model: &str, normalize: bool, batch_size: usize, device: &Device) -> Result<Self> {
        let folder = ModelFolder::open(model)?;
        if folder.config.head != (Head::SequenceClassification { num_labels: 1 }) {
            return Err(bad_input(&folder.dir, "is not a reward model (LlamaForSequenceClassification with one label)"));
        }
        let raw = &folder.config.raw;
        let format = match raw.get("lathe_scoring") {
            Some(value) => serde_json::from_value(value.clone()).map_err(|e| bad_input(folder.dir.join("config.json"), format!("`lathe_scoring`: {e}")))?,
            None => ScoringFormat {
                append_eos: true,
                max_length: folder.config.max_position_embeddings,
                truncation: Truncation::Left,
            },
        };
        let normalization = if normalize {
            let number = |k: &str| raw.get(k).and_then(Value::as_f64);
            match (number("reward_mean"), number("reward_std")) {
                (Some(mean), Some(std)) if std > 0.0 => Some((mean, std)),
                _ => return Err(bad_input(folder.dir.join("config.json"), "--normalize needs `reward_mean` and a positive `reward_std` (rm-train writes them)")),
            }
        } else {
            None
        };
        let tokenizer = folder.load_tokenizer()?;
        let (model_params, eos) = (folder.load_params(device)?, folder.config.eos_token_ids.first().copied().or(tokenizer.eos_id()));
        Ok(RewardScorer {
            model: Llama::new_inference(&folder.config, &model_params)?,
            pad: folder.config.pad_token_id.unwrap_or(0),
            tokenizer,
            format,
            eos,
            normalization,
            batch_size: batch_size.max(1),
            name: format!("reward-model:{}", folder.dir.display()),
        })
    }

    /// `reward-model:DIR`, as recorded in the `scorer` column.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rewards of `prompt + response` texts, batched by length.
    pub fn score(&self, texts: &[String]) -> Result<Vec<f64>> {
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
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut scores = vec![0f64; texts.len()];
        for chunk in order.chunks(self.batch_size) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
            let values = score_rows(&self.model, &rows, self.pad)?.squeeze(1)?.to_vec1::<f32>()?;
            for (&i, value) in chunk.iter().zip(values) {
                scores[i] = match self.normalization {
                    Some((mean, std)) => (value as f64 - mean) / std,
                    None => value as f64,
                };
            }
        }
        Ok(scores)
    }
}

pub enum Scorer {
    RewardModel(Box<RewardScorer>),
    Rules(Vec<WeightedRule>),
}

impl Scorer {
    fn name(&self) -> String {
        match self {
            Scorer::RewardModel(m) => m.name.clone(),
            Scorer::Rules(rules) => format!("rules:{}", rules.iter().map(|r| r.spec.as_str()).collect::<Vec<_>>().join(",")),
        }
    }

    fn scores(&self, rows: &[ResponseRecord], batch: &Batch) -> Result<Vec<f64>> {
        match self {
            Scorer::RewardModel(model) => {
                let texts: Vec<String> = rows.iter().map(|r| format!("{}{}", r.prompt, r.response)).collect();
                model.score(&texts)
            }
            Scorer::Rules(rules) => {
                let references = if rules.iter().any(WeightedRule::needs_reference) { Some(batch.strings("reference")?) } else { None };
                Ok(rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| {
                        let reference = references.as_ref().map(|r| r.value(i));
                        rules.iter().map(|rule| rule.weight * rule.value(&row.response, reference)).sum()
                    })
                    .collect())
            }
        }
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
    let own: Vec<String> = ResponseRecord::fields().iter().map(|f| f.name().clone()).collect();
    let carried: Vec<Field> = reader
        .source()
        .schema()
        .fields()
        .iter()
        .filter(|f| !own.contains(f.name()) && f.name() != &options.column && f.name() != "scorer")
        .map(|f| f.as_ref().clone())
        .collect();
    let mut fields = ResponseRecord::fields();
    fields.push(Field::new(options.column.as_str(), DataType::Float64, false));
    fields.push(Field::new("scorer", DataType::Utf8, false));
    fields.extend(carried.iter().cloned());
    let schema = Arc::new(Schema::new(fields));
    let mut metadata = lathe_metadata(Kind::Scored, "score");
    metadata.push((meta::CONFIG.to_string(), options.config.clone()));
    let mut sink = ParquetSink::create(&options.output, schema.clone(), metadata)?;
    let name = scorer.name();
    let bar = Progress::new("scoring", Some(reader.source().num_rows()), Unit::Items("responses"));
    let (mut count, mut sum) = (0u64, 0f64);
    for item in reader.batches()? {
        let (rows, batch) = item?;
        let scores = scorer.scores(&rows, &batch)?;
        let mut columns = ResponseRecord::to_arrays(&rows);
        columns.push(Arc::new(Float64Array::from(scores.clone())) as ArrayRef);
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(name.as_str(), rows.len()))));
        for field in &carried {
            columns.push(batch.column(field.name()).expect("read with all columns").clone());
        }
        sink.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
        count += rows.len() as u64;
        sum += scores.iter().sum::<f64>();
        bar.set_position(count);
        crate::cli::check_interrupt()?;
    }
    bar.finish();
    if count == 0 {
        return Err(bad_input(&options.input, "holds no responses"));
    }
    sink.finish()?;
    let report = ScoreReport { responses: count, mean: sum / count as f64 };
    progress::log(format!("scored {} responses with {name}: mean {:.4}", report.responses, report.mean));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_weights_and_colons_in_patterns() {
        let r = WeightedRule::parse("length:-0.01").unwrap();
        assert!(matches!(r.rule, Rule::Length) && r.weight == -0.01);
        let r = WeightedRule::parse("regex:^[A-Z]:1").unwrap();
        assert!(matches!(&r.rule, Rule::Regex(p) if p.as_str() == "^[A-Z]") && r.weight == 1.0);
        let r = WeightedRule::parse("regex:a:b").unwrap();
        assert!(matches!(&r.rule, Rule::Regex(p) if p.as_str() == "a:b") && r.weight == 1.0);
        let r = WeightedRule::parse("refusal").unwrap();
        assert!(matches!(r.rule, Rule::Refusal) && r.weight == 1.0);
        assert!(WeightedRule::parse("regex").is_err());
        assert!(WeightedRule::parse("length:abc").is_err());
        assert!(WeightedRule::parse("sentiment:1").is_err());
        assert!(WeightedRule::parse("regex:(:1").is_err());
    }

    #[test]
    fn rule_values() {
        let value = |spec: &str, response: &str, reference: Option<&str>| WeightedRule::parse(spec).unwrap().value(response, reference);
        assert_eq!(value("length:-0.5", "abcd", None), 4.0);
        assert_eq!(value("regex:^[A-Z]", "Paris", None), 1.0);
        assert_eq!(value("contains:Paris", "It is Paris.", None), 1.0);
        assert_eq!(value("refusal", "I can't help with that.", None), 1.0);
        assert_eq!(value("exact", " Paris ", Some("Paris")), 1.0);
        assert_eq!(value("chrf", "Paris", Some("Paris")), 1.0);
    }
}
