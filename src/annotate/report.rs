//! How the annotation stands: who did how much, how far annotators agree (Krippendorff's
//! alpha for scores, interval, and for ranks, ordinal; Fleiss' and Cohen's kappa per label),
//! and the items they disagree on most. The admin page, `annotate stats` and the export's
//! metadata all read it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::Task;
use super::answer::Answer;
use super::items::{Content, Item};
use super::store::{Decided, Settings};
use crate::human::agreement::{LabelAgreement, Metric, agreement, krippendorff_alpha, label_agreement};

/// How far the annotators agree, in the measure that fits the task.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Agreement {
    /// Items answered by two or more annotators: the only ones agreement is measured on.
    pub items_rated_twice: usize,
    /// Scores (interval) and ranks (ordinal; responses are the units, their places the values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub krippendorff_alpha: Option<f64>,
    /// Scores: the mean Spearman correlation over annotator pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_pairwise_spearman: Option<f64>,
    /// Labels: per label.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelAgreement>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AnnotatorSummary {
    pub annotator: String,
    pub answered: usize,
    pub skipped: usize,
}

/// An item its annotators disagree on, with every answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Disagreement {
    pub item: i64,
    pub key: String,
    /// From 0 (all agree) to 1 (as far apart as the task allows).
    pub spread: f64,
    pub answers: Vec<(String, Value)>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub task: Task,
    pub items: usize,
    pub overlap: usize,
    /// Items answered by `overlap` annotators or more.
    pub complete: usize,
    pub answers: usize,
    pub skips: usize,
    pub annotators: Vec<AnnotatorSummary>,
    pub agreement: Agreement,
    /// The items disagreed on most, most first.
    pub disagreements: Vec<Disagreement>,
}

/// Disagreements listed at most.
const MOST_DISAGREEMENTS: usize = 10;

/// Per item (by id), the answers given to it, in the order given.
pub fn answers_by_item(decisions: &[Decided]) -> BTreeMap<i64, Vec<(&str, &Answer)>> {
    let mut by_item: BTreeMap<i64, Vec<(&str, &Answer)>> = BTreeMap::new();
    for d in decisions {
        if let Some(answer) = &d.answer {
            by_item.entry(d.item).or_default().push((d.annotator.as_str(), answer));
        }
    }
    by_item
}

/// Each sample's place in an order best first: 1 for the best; tied responses share the
/// mean of the places they fill (`[[2], [0, 1]]` → 2: 1, 0: 2.5, 1: 2.5).
pub fn mid_ranks(order: &[Vec<i32>]) -> Vec<(i32, f64)> {
    let mut out = Vec::new();
    let mut place = 1usize;
    for group in order {
        let mid = place as f64 + (group.len() as f64 - 1.0) / 2.0;
        out.extend(group.iter().map(|&s| (s, mid)));
        place += group.len();
    }
    out
}

pub fn report(settings: &Settings, items: &[(i64, Item)], decisions: &[Decided]) -> Report {
    let by_item = answers_by_item(decisions);
    let mut annotators: BTreeMap<&str, AnnotatorSummary> = BTreeMap::new();
    for d in decisions {
        let summary = annotators.entry(d.annotator.as_str()).or_insert_with(|| AnnotatorSummary { annotator: d.annotator.clone(), answered: 0, skipped: 0 });
        if d.answer.is_some() { summary.answered += 1 } else { summary.skipped += 1 }
    }
    let keys: BTreeMap<i64, &Item> = items.iter().map(|(id, item)| (*id, item)).collect();
    let mut disagreements: Vec<Disagreement> = by_item
        .iter()
        .filter(|(_, answers)| answers.len() >= 2)
        .filter_map(|(&id, answers)| {
            let spread = spread(settings, keys.get(&id)?, answers);
            (spread > 0.0).then(|| Disagreement {
                item: id,
                key: keys[&id].key.clone(),
                spread,
                answers: answers.iter().map(|(a, answer)| (a.to_string(), answer.to_json())).collect(),
            })
        })
        .collect();
    disagreements.sort_by(|a, b| b.spread.total_cmp(&a.spread).then(a.item.cmp(&b.item)));
    disagreements.truncate(MOST_DISAGREEMENTS);
    Report {
        task: settings.task,
        items: items.len(),
        overlap: settings.overlap,
        complete: by_item.values().filter(|a| a.len() >= settings.overlap).count(),
        answers: decisions.iter().filter(|d| d.answer.is_some()).count(),
        skips: decisions.iter().filter(|d| d.answer.is_none()).count(),
        annotators: annotators.into_values().collect(),
        agreement: measure(settings, &by_item),
        disagreements,
    }
}

fn measure(settings: &Settings, by_item: &BTreeMap<i64, Vec<(&str, &Answer)>>) -> Agreement {
    let mut names: Vec<&str> = by_item.values().flatten().map(|(a, _)| *a).collect();
    names.sort();
    names.dedup();
    let index = |name: &str| names.binary_search(&name).unwrap_or(0);
    let items_rated_twice = by_item.values().filter(|a| a.len() >= 2).count();
    match settings.task {
        Task::Score => {
            let table: Vec<Vec<Option<f64>>> = by_item
                .values()
                .map(|answers| {
                    let mut row = vec![None; names.len()];
                    for (a, answer) in answers {
                        if let Answer::Score(s) = answer {
                            row[index(a)] = Some(*s);
                        }
                    }
                    row
                })
                .collect();
            let found = agreement(&table, names.len());
            Agreement {
                items_rated_twice,
                metric: Some(Metric::Interval),
                krippendorff_alpha: found.krippendorff_alpha,
                mean_pairwise_spearman: found.mean_pairwise_spearman,
                labels: Vec::new(),
            }
        }
        Task::Rank => {
            // One unit per response: the places its annotators gave it.
            let mut units: BTreeMap<(i64, i32), Vec<f64>> = BTreeMap::new();
            for (&id, answers) in by_item {
                for (_, answer) in answers {
                    if let Answer::Rank { order, .. } = answer {
                        for (sample, place) in mid_ranks(order) {
                            units.entry((id, sample)).or_default().push(place);
                        }
                    }
                }
            }
            let units: Vec<Vec<f64>> = units.into_values().collect();
            Agreement { items_rated_twice, metric: Some(Metric::Ordinal), krippendorff_alpha: krippendorff_alpha(&units, Metric::Ordinal), ..Default::default() }
        }
        Task::Label => {
            let labels = settings
                .labels
                .iter()
                .map(|label| {
                    let ticked: Vec<Vec<(usize, bool)>> = by_item
                        .values()
                        .map(|answers| answers.iter().filter_map(|(a, answer)| match answer { Answer::Label(given) => Some((index(a), given.contains(label))), _ => None }).collect())
                        .collect();
                    label_agreement(label, &ticked)
                })
                .collect();
            Agreement { items_rated_twice, labels, ..Default::default() }
        }
    }
}

/// How far apart one item's answers are, from 0 to 1: scores, their range over the scale's;
/// ranks, each response's range of places over the widest possible, averaged; labels, the
/// share of labels some but not all annotators ticked.
fn spread(settings: &Settings, item: &Item, answers: &[(&str, &Answer)]) -> f64 {
    match (&item.content, settings.task) {
        (_, Task::Score) => {
            let scores: Vec<f64> = answers.iter().filter_map(|(_, a)| if let Answer::Score(s) = a { Some(*s) } else { None }).collect();
            let width = settings.scale.parse::<crate::human::scoring::Scale>().map_or(1.0, |s| (s.high - s.low) as f64);
            let (low, high) = scores.iter().fold((f64::MAX, f64::MIN), |(l, h), &s| (l.min(s), h.max(s)));
            if scores.is_empty() { 0.0 } else { (high - low) / width }
        }
        (Content::Rank { responses }, _) => {
            let mut places: BTreeMap<i32, (f64, f64)> = BTreeMap::new();
            for (_, answer) in answers {
                if let Answer::Rank { order, .. } = answer {
                    for (sample, place) in mid_ranks(order) {
                        let entry = places.entry(sample).or_insert((place, place));
                        *entry = (entry.0.min(place), entry.1.max(place));
                    }
                }
            }
            let widest = (responses.len() as f64 - 1.0).max(1.0);
            places.values().map(|(low, high)| (high - low) / widest).sum::<f64>() / places.len().max(1) as f64
        }
        _ => {
            let split = settings
                .labels
                .iter()
                .filter(|label| {
                    let ticked = answers.iter().filter(|(_, a)| matches!(a, Answer::Label(given) if given.contains(label))).count();
                    ticked > 0 && ticked < answers.len()
                })
                .count();
            split as f64 / settings.labels.len().max(1) as f64
        }
    }
}

/// `annotate stats` as text lines.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "{} task: {} items, {} complete (answered by {} or more), {} answers, {} skips\n",
        report.task.name(),
        report.items,
        report.complete,
        report.overlap,
        report.answers,
        report.skips
    );
    out.push_str(&format!("{:<20} {:>8} {:>8}\n", "annotator", "answered", "skipped"));
    for a in &report.annotators {
        out.push_str(&format!("{:<20} {:>8} {:>8}\n", a.annotator, a.answered, a.skipped));
    }
    let value = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let agreement = &report.agreement;
    out.push_str(&format!("agreement on {} items answered twice or more", agreement.items_rated_twice));
    if let Some(metric) = agreement.metric {
        out.push_str(&format!(": Krippendorff's alpha ({metric:?}) {}", value(agreement.krippendorff_alpha)).to_lowercase());
    }
    if agreement.mean_pairwise_spearman.is_some() {
        out.push_str(&format!(", mean pairwise Spearman {}", value(agreement.mean_pairwise_spearman)));
    }
    out.push('\n');
    if !agreement.labels.is_empty() {
        out.push_str(&format!("{:<20} {:>8} {:>9} {:>9} {:>9}\n", "label", "items", "positive", "fleiss", "cohen"));
        for l in &agreement.labels {
            out.push_str(&format!("{:<20} {:>8} {:>9} {:>9} {:>9}\n", l.label, l.items_rated_twice, value(l.positive_rate), value(l.fleiss_kappa), value(l.cohen_kappa)));
        }
    }
    for d in &report.disagreements {
        let answers: Vec<String> = d.answers.iter().map(|(a, v)| format!("{a}: {v}")).collect();
        out.push_str(&format!("disagreement {:.2} on item {} ({}): {}\n", d.spread, d.item, d.key, answers.join("; ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::ResponseRecord;

    fn decided(id: i64, item: i64, annotator: &str, answer: Answer) -> Decided {
        Decided { id, item, annotator: annotator.into(), answer: Some(answer), comment: None, shown: vec![], decided_at: String::new() }
    }

    #[test]
    fn mid_ranks_share_tied_places() {
        assert_eq!(mid_ranks(&[vec![2], vec![0, 1]]), vec![(2, 1.0), (0, 2.5), (1, 2.5)]);
        assert_eq!(mid_ranks(&[vec![0], vec![1], vec![2]]), vec![(0, 1.0), (1, 2.0), (2, 3.0)]);
    }

    #[test]
    fn reports_agreement_per_task_and_the_widest_disagreements() {
        let score_item = |i: i64| (i, Item { key: format!("p/{i}"), content: Content::Score { response: ResponseRecord::example("p", i as i32) } });
        let settings = Settings { task: Task::Score, scale: "1-5".into(), labels: vec![], overlap: 2 };
        let items = vec![score_item(1), score_item(2), score_item(3)];
        // Krippendorff's by-hand example: items (1, 2), (3, 3), (5, 4): alpha 5/6.
        let decisions = vec![
            decided(1, 1, "ana", Answer::Score(1.0)),
            decided(2, 1, "bo", Answer::Score(2.0)),
            decided(3, 2, "ana", Answer::Score(3.0)),
            decided(4, 2, "bo", Answer::Score(3.0)),
            decided(5, 3, "ana", Answer::Score(5.0)),
            decided(6, 3, "bo", Answer::Score(4.0)),
            Decided { answer: None, ..decided(7, 3, "cy", Answer::Score(0.0)) },
        ];
        let r = report(&settings, &items, &decisions);
        assert_eq!((r.complete, r.answers, r.skips), (3, 6, 1));
        assert!((r.agreement.krippendorff_alpha.unwrap() - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(r.disagreements.iter().map(|d| d.item).collect::<Vec<_>>(), [1, 3], "item 2 is agreed on");
        assert!((r.disagreements[0].spread - 0.25).abs() < 1e-12, "a range of 1 on a 1-5 scale");
        assert_eq!(r.annotators[2], AnnotatorSummary { annotator: "cy".into(), answered: 0, skipped: 1 });
        assert!(table(&r).contains("krippendorff's alpha (interval) 0.833"), "{}", table(&r));

        let settings = Settings { task: Task::Label, scale: "1-7".into(), labels: vec!["hate".into(), "spam".into()], overlap: 2 };
        let label = |id: i64| (id, Item { key: format!("t{id}"), content: Content::Label { text: "t".into(), suggested: vec![] } });
        let labels = |l: &[&str]| Answer::Label(l.iter().map(|s| s.to_string()).collect());
        let decisions = vec![decided(1, 1, "ana", labels(&["hate"])), decided(2, 1, "bo", labels(&["hate", "spam"])), decided(3, 2, "ana", labels(&[])), decided(4, 2, "bo", labels(&[]))];
        let r = report(&settings, &[label(1), label(2)], &decisions);
        assert_eq!(r.agreement.labels.len(), 2);
        assert_eq!(r.agreement.labels[0].cohen_kappa, Some(1.0), "both tick hate on 1, neither on 2");
        assert_eq!(r.disagreements.len(), 1);
        assert!((r.disagreements[0].spread - 0.5).abs() < 1e-12, "spam split, hate agreed");
    }
}
