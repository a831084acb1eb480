//! `annotate export`: the answers as SPEC Parquet the next stage reads as it is.
//!
//! - `score` → scored, in `score --merge`'s layout: the mean `score`, `annotators`, `ratings`
//!   (`{annotator, score}`), plus `comments` (`annotator: text`). For `rank`, `rm-train --task regression`.
//! - `rank` → preferences: for each pair of a prompt's responses, the one more annotators
//!   placed higher is `chosen`; `margin` is (votes for − votes against) / annotators, so a
//!   pair everyone agrees on weighs 1 and a split one less; pairs with even votes are left
//!   out. `chosen_score`/`rejected_score` are mean Borda points (responses placed below, ties
//!   half). For `rm-train`, `dpo`. With `--listwise`: scored responses with those points as
//!   `score` and their `rank` instead.
//! - `label` → labeled text: the labels at least half of an item's annotators ticked, plus
//!   `annotators` and `votes_<label>` counts. For `rm-train --task multilabel`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, ListBuilder, StringBuilder};
use arrow::datatypes::{DataType, Field};
use serde::Serialize;

use super::Task;
use super::answer::Answer;
use super::items::{Content, Item};
use super::report::{answers_by_item, mid_ranks, report};
use super::store::{Decided, Store};
use crate::data::meta;
use crate::data::records::{LabeledTextRecord, PreferenceRecord, RecordWriter, ResponseRecord, ScoredRecord};
use crate::error::{Result, usage};
use crate::human::merge::{Rated, write_merged};

pub struct ExportOptions {
    pub db: PathBuf,
    pub output: PathBuf,
    /// Items with fewer answers are left out.
    pub min_annotators: usize,
    /// `rank`: per-response ranks instead of pairs.
    pub listwise: bool,
    pub config: String,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ExportReport {
    pub task: String,
    /// Items written (with `--min-annotators` answers or more).
    pub items: usize,
    /// Items left out for want of answers.
    pub left_out: usize,
    pub rows: usize,
    /// `rank`: pairs left out because as many annotators put each response above the other.
    pub even_pairs: usize,
}

/// One item and its answers, with the comments given.
struct Answered<'a> {
    item: &'a Item,
    answers: Vec<(&'a str, &'a Answer)>,
    comments: Vec<String>,
}

pub fn export(options: &ExportOptions) -> Result<ExportReport> {
    if options.min_annotators == 0 {
        return Err(usage("--min-annotators must be at least 1"));
    }
    let store = Store::open_existing(&options.db)?;
    let settings = store.settings()?.unwrap_or_else(|| unreachable!("open_existing checks the settings"));
    if options.listwise && settings.task != Task::Rank {
        return Err(usage(format!("--listwise is for rank tasks; {} holds a {} task", options.db.display(), settings.task.name())));
    }
    let items = store.items()?;
    let decisions = store.decisions()?;
    let by_item = answers_by_item(&decisions);
    let comments = comments_by_item(&decisions);
    let mut kept = Vec::new();
    for (id, item) in &items {
        let answers = by_item.get(id).cloned().unwrap_or_default();
        if answers.len() >= options.min_annotators {
            kept.push(Answered { item, answers, comments: comments.get(id).cloned().unwrap_or_default() });
        }
    }
    if kept.is_empty() {
        return Err(usage(format!("{}: no item has {} answers or more yet; nothing to export", options.db.display(), options.min_annotators)));
    }
    let summary = report(&settings, &items, &decisions);
    let metadata = vec![
        (meta::CONFIG.to_string(), options.config.clone()),
        ("lathe.agreement".to_string(), serde_json::to_string(&summary.agreement)?),
        ("lathe.annotate.task".to_string(), settings.task.name().to_string()),
    ];
    let mut result = ExportReport { task: settings.task.name().to_string(), items: kept.len(), left_out: items.len() - kept.len(), ..Default::default() };
    match settings.task {
        Task::Score => result.rows = write_scored(options, &kept, metadata)?,
        Task::Rank if options.listwise => result.rows = write_listwise(options, &kept, metadata)?,
        Task::Rank => (result.rows, result.even_pairs) = write_preferences(options, &kept, metadata)?,
        Task::Label => result.rows = write_labels(options, &kept, &settings.labels, metadata)?,
    }
    Ok(result)
}

fn comments_by_item(decisions: &[Decided]) -> HashMap<i64, Vec<String>> {
    let mut by_item: HashMap<i64, Vec<String>> = HashMap::new();
    for d in decisions {
        if let (Some(comment), Some(_)) = (&d.comment, &d.answer) {
            by_item.entry(d.item).or_default().push(format!("{}: {comment}", d.annotator));
        }
    }
    by_item
}

fn string_lists<'a>(rows: impl Iterator<Item = &'a [String]>) -> ArrayRef {
    let mut builder = ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new_list_field(DataType::Utf8, false)));
    for row in rows {
        for value in row {
            builder.values().append_value(value);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}

fn int32s(values: impl Iterator<Item = usize>) -> ArrayRef {
    Arc::new(Int32Array::from_iter_values(values.map(|v| v as i32)))
}

fn write_scored(options: &ExportOptions, kept: &[Answered], metadata: Vec<(String, String)>) -> Result<usize> {
    let rows: Vec<Rated> = kept
        .iter()
        .filter_map(|a| match &a.item.content {
            Content::Score { response } => Some(Rated {
                response: response.clone(),
                ratings: a.answers.iter().filter_map(|(who, answer)| if let Answer::Score(s) = answer { Some((who.to_string(), *s)) } else { None }).collect(),
            }),
            _ => None,
        })
        .collect();
    let comments = string_lists(kept.iter().map(|a| a.comments.as_slice()));
    let field = Field::new("comments", comments.data_type().clone(), false);
    write_merged(&options.output, "annotate", "score", &rows, vec![(field, comments)], metadata)?;
    Ok(rows.len())
}

/// A ranked prompt's responses and, per annotator, each sample's place (1 = best).
type Places<'a> = (&'a [ResponseRecord], Vec<HashMap<i32, f64>>);

fn places<'a>(answered: &'a Answered) -> Option<Places<'a>> {
    let Content::Rank { responses } = &answered.item.content else { return None };
    let orders = answered
        .answers
        .iter()
        .filter_map(|(_, answer)| if let Answer::Rank { order, .. } = answer { Some(mid_ranks(order).into_iter().collect()) } else { None })
        .collect();
    Some((responses, orders))
}

/// Mean Borda points of `sample`: the responses placed below it, ties counting half.
fn points(orders: &[HashMap<i32, f64>], k: usize, sample: i32) -> f64 {
    orders.iter().map(|o| k as f64 - o.get(&sample).copied().unwrap_or(k as f64)).sum::<f64>() / orders.len().max(1) as f64
}

fn write_preferences(options: &ExportOptions, kept: &[Answered], metadata: Vec<(String, String)>) -> Result<(usize, usize)> {
    let (mut pairs, mut votes, mut even) = (Vec::new(), Vec::new(), 0);
    for answered in kept {
        let Some((responses, orders)) = places(answered) else { continue };
        let k = responses.len();
        for (i, a) in responses.iter().enumerate() {
            for b in &responses[i + 1..] {
                let above = |x: i32, y: i32| orders.iter().filter(|o| o.get(&x) < o.get(&y)).count();
                let (for_a, for_b) = (above(a.sample, b.sample), above(b.sample, a.sample));
                if for_a == for_b {
                    even += 1;
                    continue;
                }
                let (chosen, rejected, won, lost) = if for_a > for_b { (a, b, for_a, for_b) } else { (b, a, for_b, for_a) };
                pairs.push(PreferenceRecord {
                    prompt: chosen.prompt.clone(),
                    chosen: chosen.response.clone(),
                    rejected: rejected.response.clone(),
                    margin: Some((won - lost) as f64 / orders.len() as f64),
                    prompt_id: Some(chosen.prompt_id.clone()),
                    chosen_score: Some(points(&orders, k, chosen.sample)),
                    rejected_score: Some(points(&orders, k, rejected.sample)),
                });
                votes.push((orders.len(), won, lost));
            }
        }
    }
    if pairs.is_empty() {
        return Err(usage(format!("{}: every pair of responses has as many votes each way; no preference to export", options.db.display())));
    }
    let fields = vec![Field::new("annotators", DataType::Int32, false), Field::new("chosen_votes", DataType::Int32, false), Field::new("rejected_votes", DataType::Int32, false)];
    let carried = vec![int32s(votes.iter().map(|v| v.0)), int32s(votes.iter().map(|v| v.1)), int32s(votes.iter().map(|v| v.2))];
    let mut writer = RecordWriter::<PreferenceRecord>::create(&options.output, "annotate", metadata, fields)?;
    writer.write(&pairs, carried)?;
    writer.finish()?;
    Ok((pairs.len(), even))
}

fn write_listwise(options: &ExportOptions, kept: &[Answered], metadata: Vec<(String, String)>) -> Result<usize> {
    let mut rows = Vec::new();
    let mut annotators = Vec::new();
    for answered in kept {
        let Some((responses, orders)) = places(answered) else { continue };
        for r in responses {
            rows.push(ScoredRecord { response: r.clone(), score: points(&orders, responses.len(), r.sample), scorer: "annotate:borda".into() });
            annotators.push(orders.len());
        }
    }
    let mut ranked: Vec<(usize, i32)> = crate::rank::groups(&rows).iter().flat_map(|g| crate::rank::ranks_of(&rows, g)).collect();
    ranked.sort();
    let ranks: ArrayRef = Arc::new(Int32Array::from_iter_values(ranked.iter().map(|&(_, r)| r)));
    let fields = vec![Field::new("rank", DataType::Int32, false), Field::new("annotators", DataType::Int32, false)];
    let mut writer = RecordWriter::<ScoredRecord>::create(&options.output, "annotate", metadata, fields)?;
    writer.write(&rows, vec![ranks, int32s(annotators.into_iter())])?;
    writer.finish()?;
    Ok(rows.len())
}

fn write_labels(options: &ExportOptions, kept: &[Answered], categories: &[String], metadata: Vec<(String, String)>) -> Result<usize> {
    let mut rows = Vec::new();
    let mut votes: Vec<Vec<usize>> = vec![Vec::new(); categories.len()];
    for answered in kept {
        let Content::Label { text, .. } = &answered.item.content else { continue };
        let n = answered.answers.len();
        let mut labels = Vec::new();
        for (c, category) in categories.iter().enumerate() {
            let ticked = answered.answers.iter().filter(|(_, a)| matches!(a, Answer::Label(given) if given.contains(category))).count();
            if 2 * ticked >= n {
                labels.push(category.clone());
            }
            votes[c].push(ticked);
        }
        rows.push(LabeledTextRecord { text: text.clone(), labels, unlabeled: Vec::new() });
    }
    let mut fields = vec![Field::new("annotators", DataType::Int32, false)];
    let mut carried = vec![int32s(kept.iter().map(|a| a.answers.len()))];
    for (category, counts) in categories.iter().zip(votes) {
        fields.push(Field::new(format!("votes_{category}"), DataType::Int32, false));
        carried.push(int32s(counts.into_iter()));
    }
    let mut writer = RecordWriter::<LabeledTextRecord>::create(&options.output, "annotate", metadata, fields)?;
    writer.write(&rows, carried)?;
    writer.finish()?;
    Ok(rows.len())
}
