//! Response ranking: the scored responses of each prompt, ordered by score (or by a person at
//! the terminal), become preference pairs (chosen / rejected / margin) or a per-response rank.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int32Array};
use arrow::datatypes::{DataType, Field};
use serde::Serialize;

use crate::data::records::{PreferenceRecord, RecordReader, RecordWriter, ResponseRecord, ScoredRecord};
use crate::data::{ColumnType, meta};
use crate::error::{Result, bad_input, usage};
use crate::human::ranking::RankJudgement;
use crate::human::session::{self, Annotation, Judgement};
use crate::human::read_responses;
use crate::progress;

/// Which pairs a prompt's ordered responses give.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pairs {
    /// Every pair with different scores.
    All,
    /// The best response against the worst.
    BestWorst,
    /// Each response against the next one down.
    Adjacent,
}

pub struct RankOptions {
    pub input: PathBuf,
    /// The score column.
    pub by: String,
    pub pairs: Pairs,
    /// Pairs whose score difference is below this are near-ties and left out.
    pub min_margin: f64,
    /// Write each response with its `rank` instead of pairs.
    pub listwise: bool,
    pub output: PathBuf,
    pub config: String,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct RankReport {
    pub responses: usize,
    pub prompts: usize,
    /// Prompts with a single response: nothing to compare.
    pub single_response_prompts: usize,
    pub pairs: usize,
    /// Pairs left out as ties or near-ties (`--min-margin`).
    pub ties_dropped: usize,
    /// Responses left out for want of a score (null or NaN: skipped by a person, not rated).
    pub unscored: usize,
    /// `--human`: prompts the person skipped.
    pub skipped_prompts: usize,
}

/// Row indices grouped by prompt id, groups in order of first appearance, rows in file order.
pub fn by_prompt<'a>(prompt_ids: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, prompt_id) in prompt_ids.enumerate() {
        let slot = *index.entry(prompt_id).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[slot].push(i);
    }
    groups
}

/// Indices of `rows` grouped by `prompt_id`, groups in order of first appearance, each group
/// ordered best first (ties keep their sample order).
pub fn groups(rows: &[ScoredRecord]) -> Vec<Vec<usize>> {
    let mut groups = by_prompt(rows.iter().map(|r| r.response.prompt_id.as_str()));
    for group in &mut groups {
        group.sort_by(|&a, &b| rows[b].score.total_cmp(&rows[a].score).then(rows[a].response.sample.cmp(&rows[b].response.sample)));
    }
    groups
}

/// (chosen, rejected) index pairs of one best-first group, and how many near-ties were left out.
pub fn pairs_of(rows: &[ScoredRecord], group: &[usize], pairs: Pairs, min_margin: f64) -> (Vec<(usize, usize)>, usize) {
    let candidates: Vec<(usize, usize)> = match pairs {
        Pairs::All => (0..group.len()).flat_map(|i| (i + 1..group.len()).map(move |j| (group[i], group[j]))).collect(),
        Pairs::BestWorst if group.len() >= 2 => vec![(group[0], group[group.len() - 1])],
        Pairs::BestWorst => Vec::new(),
        Pairs::Adjacent => group.windows(2).map(|w| (w[0], w[1])).collect(),
    };
    let total = candidates.len();
    let kept: Vec<(usize, usize)> = candidates
        .into_iter()
        .filter(|&(c, r)| {
            let margin = rows[c].score - rows[r].score;
            margin > 0.0 && margin >= min_margin
        })
        .collect();
    let dropped = total - kept.len();
    (kept, dropped)
}

/// Competition ranks of a best-first group (1 = best; equal scores share a rank: 1, 2, 2, 4).
pub fn ranks_of(rows: &[ScoredRecord], group: &[usize]) -> Vec<(usize, i32)> {
    let mut out: Vec<(usize, i32)> = Vec::with_capacity(group.len());
    for (position, &i) in group.iter().enumerate() {
        let rank = match out.last() {
            Some(&(previous, rank)) if rows[previous].score == rows[i].score => rank,
            _ => position as i32 + 1,
        };
        out.push((i, rank));
    }
    out
}

pub fn rank(options: &RankOptions) -> Result<RankReport> {
    check_min_margin(options)?;
    let (rows, unscored) = read_scored(&options.input, &options.by)?;
    let report = write_ranking(&rows, options)?;
    Ok(RankReport { unscored, ..report })
}

fn check_min_margin(options: &RankOptions) -> Result<()> {
    if options.min_margin.is_nan() || options.min_margin < 0.0 {
        return Err(usage(format!("--min-margin {}: must be 0 or more", options.min_margin)));
    }
    Ok(())
}

/// The responses with a score in column `by`, and how many had none (null or NaN).
fn read_scored(input: &std::path::Path, by: &str) -> Result<(Vec<ScoredRecord>, usize)> {
    let reader = RecordReader::<ResponseRecord>::open(input)?;
    reader.source().require(by, ColumnType::Float)?;
    let has_scorer = reader.source().optional("scorer", ColumnType::Str)?;
    let (mut rows, mut unscored) = (Vec::new(), 0);
    for item in reader.batches()? {
        let (responses, batch) = item?;
        let scores = batch.optional_f64s(by)?;
        let scorers = if has_scorer { Some(batch.optional_strings("scorer")?) } else { None };
        for (i, response) in responses.into_iter().enumerate() {
            let score = scores.is_valid(i).then(|| scores.value(i)).filter(|s| !s.is_nan());
            let Some(score) = score else {
                unscored += 1;
                continue;
            };
            if score.is_infinite() {
                return Err(batch.error_at(i, by, format!("{score}, expected a finite score")));
            }
            let scorer = scorers.as_ref().filter(|s| s.is_valid(i)).map_or(by, |s| s.value(i)).to_string();
            rows.push(ScoredRecord { response, score, scorer });
        }
    }
    let total = rows.len() + unscored;
    if total == 0 {
        return Err(bad_input(input, "holds no responses"));
    }
    if rows.is_empty() {
        return Err(bad_input(input, format!("column `{by}`: none of the {total} responses has a score (all null or NaN); nothing to rank")));
    }
    if unscored > 0 {
        progress::warn(format!("note: {unscored} of {total} responses have no score (null or NaN) and are left out"));
    }
    Ok((rows, unscored))
}

/// Pairs (or listwise ranks) of `rows` to `-o`.
fn write_ranking(rows: &[ScoredRecord], options: &RankOptions) -> Result<RankReport> {
    let groups = groups(rows);
    let mut report = RankReport {
        responses: rows.len(),
        prompts: groups.len(),
        single_response_prompts: groups.iter().filter(|g| g.len() < 2).count(),
        ..Default::default()
    };
    let metadata = vec![(meta::CONFIG.to_string(), options.config.clone())];
    if options.listwise {
        let mut ranked: Vec<(usize, i32)> = groups.iter().flat_map(|g| ranks_of(rows, g)).collect();
        ranked.sort();
        let ordered: Vec<ScoredRecord> = ranked.iter().map(|&(i, _)| rows[i].clone()).collect();
        let rank_column: ArrayRef = Arc::new(Int32Array::from_iter_values(ranked.iter().map(|&(_, r)| r)));
        let mut writer = RecordWriter::<ScoredRecord>::create(&options.output, "rank", metadata, vec![Field::new("rank", DataType::Int32, false)])?;
        writer.write(&ordered, vec![rank_column])?;
        writer.finish()?;
        return Ok(report);
    }
    let mut preferences = Vec::new();
    for group in &groups {
        let (pairs, dropped) = pairs_of(rows, group, options.pairs, options.min_margin);
        report.ties_dropped += dropped;
        preferences.extend(pairs.into_iter().map(|(c, r)| {
            let (chosen, rejected) = (&rows[c], &rows[r]);
            PreferenceRecord {
                prompt: chosen.response.prompt.clone(),
                chosen: chosen.response.response.clone(),
                rejected: rejected.response.response.clone(),
                margin: Some(chosen.score - rejected.score),
                prompt_id: Some(chosen.response.prompt_id.clone()),
                chosen_score: Some(chosen.score),
                rejected_score: Some(rejected.score),
            }
        }));
    }
    report.pairs = preferences.len();
    let mut writer = RecordWriter::<PreferenceRecord>::create(&options.output, "rank", metadata, Vec::new())?;
    writer.write(&preferences, Vec::new())?;
    writer.finish()?;
    Ok(report)
}

/// `rank --human`: a person orders the responses of each prompt, best first; response at
/// position p (from 1) of k gets the score k − p, so a pair's margin is how far apart the two
/// were placed. The pairs follow `--pairs` and `--min-margin` as for scores.
pub fn rank_by_hand(options: &RankOptions, human: &Annotation) -> Result<RankReport> {
    check_min_margin(options)?;
    let (_, rows) = read_responses(&options.input)?;
    let judgement = RankJudgement::new(&options.input, &rows)?;
    if judgement.items().is_empty() {
        return Err(bad_input(&options.input, "no prompt has two or more responses: nothing to rank"));
    }
    let decisions = session::run(&judgement, human.session("rank", None, &options.input)?)?;
    let scorer = format!("human:{}", human.annotator);
    let (mut ranked, mut skipped_prompts) = (Vec::new(), 0);
    for (index, prompt) in judgement.items().iter().enumerate() {
        let Some(answer) = decisions.get(prompt).flatten() else {
            skipped_prompts += 1;
            continue;
        };
        let order = judgement.ordered_rows(index, answer);
        for (position, &i) in order.iter().enumerate() {
            let score = (order.len() - (position + 1)) as f64;
            ranked.push(ScoredRecord { response: rows[i].clone(), score, scorer: scorer.clone() });
        }
    }
    let report = write_ranking(&ranked, options)?;
    progress::log(format!(
        "every prompt decided: {} ordered, {skipped_prompts} skipped; the answers stay in {}",
        judgement.items().len() - skipped_prompts,
        human.journal.display()
    ));
    Ok(RankReport {
        responses: rows.len(),
        prompts: judgement.items().len() + judgement.single_response_prompts,
        single_response_prompts: judgement.single_response_prompts,
        skipped_prompts,
        ..report
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::ResponseRecord;

    fn scored(prompt_id: &str, sample: i32, score: f64) -> ScoredRecord {
        ScoredRecord { response: ResponseRecord::example(prompt_id, sample), score, scorer: "test".into() }
    }

    fn rows() -> Vec<ScoredRecord> {
        vec![scored("a", 0, 1.0), scored("b", 0, 5.0), scored("a", 1, 3.0), scored("a", 2, 1.0), scored("a", 3, 2.5)]
    }

    #[test]
    fn groups_keep_first_appearance_and_order_best_first() {
        assert_eq!(groups(&rows()), vec![vec![2, 4, 0, 3], vec![1]]);
    }

    #[test]
    fn pair_policies_and_ties() {
        let rows = rows();
        let group = &groups(&rows)[0];
        // Scores best first: 3.0, 2.5, 1.0, 1.0 — six pairs, one of them a tie.
        assert_eq!(pairs_of(&rows, group, Pairs::All, 0.0), (vec![(2, 4), (2, 0), (2, 3), (4, 0), (4, 3)], 1));
        assert_eq!(pairs_of(&rows, group, Pairs::BestWorst, 0.0), (vec![(2, 3)], 0));
        assert_eq!(pairs_of(&rows, group, Pairs::Adjacent, 0.0), (vec![(2, 4), (4, 0)], 1));
        assert_eq!(pairs_of(&rows, group, Pairs::All, 1.0), (vec![(2, 0), (2, 3), (4, 0), (4, 3)], 2));
        assert_eq!(pairs_of(&rows, &[1], Pairs::BestWorst, 0.0), (vec![], 0));
    }

    #[test]
    fn ties_share_a_competition_rank() {
        let rows = rows();
        assert_eq!(ranks_of(&rows, &groups(&rows)[0]), vec![(2, 1), (4, 2), (0, 3), (3, 3)]);
    }
}
