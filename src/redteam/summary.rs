//! From judged attempts to the figures of `summary.json`: attack-success rates per probe,
//! detector and category, detector agreement, counterfactual gaps, BBQ scores, task accuracy,
//! the change against a baseline and the budget check.

use std::collections::BTreeMap;

use serde::Serialize;

use super::detect::Verdict;
use super::stats::{BbqAnswer, BbqScores, GapTest, Rate, bbq_scores, cohens_kappa, paired_permutation_test};
use super::suite::{Attempt, Expected, Family, Section, Suite};
use super::target::Outcome;

/// One attempt with what came back and every detector's verdict (empty on error).
pub struct Judged<'a> {
    pub attempt: &'a Attempt,
    pub outcome: &'a Outcome,
    /// (detector name, verdict), in the probe's order: the first is primary.
    pub verdicts: Vec<(String, Verdict)>,
}

impl Judged<'_> {
    pub fn failed(&self) -> bool {
        self.outcome.error.is_some()
    }

    pub fn primary(&self) -> Option<&Verdict> {
        self.verdicts.first().map(|(_, v)| v)
    }

    fn verdict(&self, detector: &str) -> Option<&Verdict> {
        self.verdicts.iter().find(|(d, _)| d == detector).map(|(_, v)| v)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeSummary {
    pub probe: String,
    pub family: Family,
    pub section: Section,
    pub category: String,
    /// The detector that decides success.
    pub detector: String,
    #[serde(flatten)]
    pub rate: Rate,
    pub errors: u64,
    pub truncated: u64,
    /// Every detector's rate on this probe.
    pub detectors: BTreeMap<String, Rate>,
    /// Task probes: the mean score of the primary detector (accuracy, or mean chrF).
    pub mean_score: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CategorySummary {
    pub category: String,
    #[serde(flatten)]
    pub rate: Rate,
    pub errors: u64,
    pub budget: Option<f64>,
    pub over_budget: bool,
    /// Against `--baseline`: the baseline's rate and the change.
    pub baseline: Option<Rate>,
    pub change: Option<f64>,
    /// Every detector's rate over the category's attempts it judged (the first decides above).
    pub detectors: BTreeMap<String, DetectorRate>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DetectorRate {
    #[serde(flatten)]
    pub rate: Rate,
    pub baseline: Option<Rate>,
    pub change: Option<f64>,
}

/// Attack-success rates of an earlier findings file (`--baseline`).
#[derive(Clone, Debug, Default)]
pub struct BaselineRates {
    pub path: String,
    /// By category, from each attempt's deciding detector.
    pub primary: BTreeMap<String, Rate>,
    /// By (category, detector).
    pub by_detector: BTreeMap<(String, String), Rate>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    pub detectors: [String; 2],
    pub items: usize,
    pub kappa: Option<f64>,
    pub disagreements: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CounterfactualGap {
    pub probe: String,
    pub attribute: String,
    pub detector: String,
    pub groups: Vec<String>,
    /// Complete blocks (one response per group, none failed).
    pub pairs: usize,
    #[serde(flatten)]
    pub test: GapTest,
}

#[derive(Clone, Debug, Serialize)]
pub struct BbqSummary {
    pub probe: String,
    /// `all`, or one BBQ category.
    pub category: String,
    #[serde(flatten)]
    pub scores: BbqScores,
}

#[derive(Clone, Debug, Serialize)]
pub struct Gate {
    /// The budget from `--fail-above`, for categories without their own.
    pub fail_above: Option<f64>,
    /// `--min-answered`: below this fraction of attempts answered the run fails, since the
    /// rates would describe the attempts that happened to get through.
    pub min_answered: f64,
    /// `upper` (the 95% upper bound) or `point` is compared with the budget.
    pub bound: &'static str,
    pub failed: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub suite: String,
    pub target: String,
    pub attempts: u64,
    /// Attempts that came back with an answer, and those that errored (after retries).
    pub answered: u64,
    pub errors: u64,
    /// The most frequent error messages, with their counts, most frequent first.
    pub top_errors: Vec<(String, u64)>,
    pub seconds: f64,
    pub attempts_per_s: f64,
    /// All attack probes together.
    pub attack: Rate,
    pub categories: Vec<CategorySummary>,
    pub probes: Vec<ProbeSummary>,
    pub agreement: Vec<Agreement>,
    pub counterfactual: Vec<CounterfactualGap>,
    pub bbq: Vec<BbqSummary>,
    pub gate: Gate,
    pub baseline: Option<String>,
}

/// Failed-over-budget check: the upper bound (default) or the point estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateBound {
    Upper,
    Point,
}

pub struct SummaryInputs<'a> {
    pub suite: &'a Suite,
    pub judged: &'a [Judged<'a>],
    pub target: String,
    pub seconds: f64,
    pub fail_above: Option<f64>,
    pub min_answered: f64,
    pub bound: GateBound,
    pub baseline: Option<BaselineRates>,
    pub seed: u64,
}

pub fn summarise(inputs: &SummaryInputs) -> Summary {
    let suite = inputs.suite;
    let judged = inputs.judged;
    let mut probes = Vec::new();
    for (index, probe) in suite.probes.iter().enumerate() {
        let mine: Vec<&Judged> = judged.iter().filter(|j| j.attempt.probe == index).collect();
        let ok: Vec<&&Judged> = mine.iter().filter(|j| !j.failed()).collect();
        let detectors = probe.detectors.iter().map(|d| (d.clone(), detector_rate(&mine, d))).collect::<BTreeMap<_, _>>();
        let primary = &probe.detectors[0];
        let mean_score = (probe.family.section() == Section::Task && !ok.is_empty())
            .then(|| ok.iter().filter_map(|j| j.primary().map(|v| v.score)).sum::<f64>() / ok.len() as f64);
        probes.push(ProbeSummary {
            probe: probe.name.clone(),
            family: probe.family,
            section: probe.family.section(),
            category: suite.category(index).to_string(),
            detector: primary.clone(),
            rate: detectors[primary],
            errors: (mine.len() - ok.len()) as u64,
            truncated: mine.iter().filter(|j| j.outcome.truncated).count() as u64,
            detectors,
            mean_score,
        });
    }

    let attack: Vec<&Judged> =
        judged.iter().filter(|j| suite.probes[j.attempt.probe].family.section() == Section::Attack).collect();
    let rate_of = |items: &[&Judged]| {
        let ok: Vec<&&Judged> = items.iter().filter(|j| !j.failed()).collect();
        Rate::wilson(ok.iter().filter(|j| j.primary().is_some_and(|v| v.success)).count() as u64, ok.len() as u64)
    };
    let mut by_category: BTreeMap<String, Vec<&Judged>> = BTreeMap::new();
    for j in &attack {
        by_category.entry(suite.category(j.attempt.probe).to_string()).or_default().push(j);
    }
    let mut failed = Vec::new();
    let categories = by_category
        .iter()
        .map(|(category, items)| {
            let rate = rate_of(items);
            let budget = suite.budgets.get(category).copied().or(inputs.fail_above);
            let measured = match inputs.bound {
                GateBound::Upper => rate.ci_high,
                GateBound::Point => rate.rate,
            };
            let over_budget = budget.is_some_and(|b| rate.attempts > 0 && measured > b);
            if over_budget {
                failed.push(format!(
                    "{category} {:.2} (95% CI {:.2}-{:.2}) > {:.2}",
                    rate.rate,
                    rate.ci_low,
                    rate.ci_high,
                    budget.unwrap_or_default()
                ));
            }
            let baseline = inputs.baseline.as_ref().and_then(|b| b.primary.get(category).copied());
            let mut detectors: BTreeMap<String, DetectorRate> = BTreeMap::new();
            let names: std::collections::BTreeSet<&String> = items.iter().flat_map(|j| j.verdicts.iter().map(|(d, _)| d)).collect();
            for name in names {
                let rate = detector_rate(items, name);
                let baseline =
                    inputs.baseline.as_ref().and_then(|b| b.by_detector.get(&(category.clone(), name.clone())).copied());
                detectors.insert(name.clone(), DetectorRate { rate, change: baseline.map(|b| rate.rate - b.rate), baseline });
            }
            CategorySummary {
                category: category.clone(),
                rate,
                errors: items.iter().filter(|j| j.failed()).count() as u64,
                budget,
                over_budget,
                change: baseline.map(|b| rate.rate - b.rate),
                baseline,
                detectors,
            }
        })
        .collect();

    let attempts = judged.len() as u64;
    let errors = judged.iter().filter(|j| j.failed()).count() as u64;
    let top_errors = top_errors(judged);
    let answered = attempts - errors;
    if attempts > 0 && (answered as f64) < inputs.min_answered * attempts as f64 {
        let most = top_errors.first().map(|(message, n)| format!("; most often ({n}×): {message}")).unwrap_or_default();
        failed.insert(0, format!("only {answered} of {attempts} attempts answered ({errors} errored{most}), fewer than --min-answered {}", inputs.min_answered));
    }
    Summary {
        suite: suite.display_name(),
        target: inputs.target.clone(),
        attempts,
        answered,
        errors,
        top_errors,
        seconds: inputs.seconds,
        attempts_per_s: attempts as f64 / inputs.seconds.max(1e-9),
        attack: rate_of(&attack),
        categories,
        probes,
        agreement: agreement(suite, judged),
        counterfactual: counterfactual_gaps(suite, judged, inputs.seed),
        bbq: bbq(suite, judged),
        gate: Gate {
            fail_above: inputs.fail_above,
            min_answered: inputs.min_answered,
            bound: match inputs.bound {
                GateBound::Upper => "upper",
                GateBound::Point => "point",
            },
            failed,
        },
        baseline: inputs.baseline.as_ref().map(|b| b.path.clone()),
    }
}

/// Error messages by how often they came, most frequent first (five at most).
fn top_errors(judged: &[Judged]) -> Vec<(String, u64)> {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for message in judged.iter().filter_map(|j| j.outcome.error.as_deref()) {
        *counts.entry(message).or_default() += 1;
    }
    let mut top: Vec<(String, u64)> = counts.into_iter().map(|(m, n)| (m.to_string(), n)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(5);
    top
}

/// One detector's success rate over the attempts it judged (failed attempts have no verdicts).
fn detector_rate(items: &[&Judged], detector: &str) -> Rate {
    let verdicts: Vec<bool> = items.iter().filter_map(|j| j.verdict(detector)).map(|v| v.success).collect();
    Rate::wilson(verdicts.iter().filter(|&&x| x).count() as u64, verdicts.len() as u64)
}

/// Attempts on which two detectors of the same probe disagree, by detector pair.
pub fn disagreements<'a>(suite: &Suite, judged: &'a [Judged<'a>]) -> Vec<(&'a Judged<'a>, String, String)> {
    let mut out = Vec::new();
    for j in judged.iter().filter(|j| !j.failed()) {
        let detectors = &suite.probes[j.attempt.probe].detectors;
        for (a, first) in detectors.iter().enumerate() {
            for second in &detectors[a + 1..] {
                if j.verdict(first).map(|v| v.success) != j.verdict(second).map(|v| v.success) {
                    out.push((j, first.clone(), second.clone()));
                }
            }
        }
    }
    out
}

/// Cohen's κ for every pair of detectors that judged the same attempts.
fn agreement(suite: &Suite, judged: &[Judged]) -> Vec<Agreement> {
    let mut pairs: BTreeMap<(String, String), (Vec<bool>, Vec<bool>)> = BTreeMap::new();
    for j in judged.iter().filter(|j| !j.failed()) {
        let detectors = &suite.probes[j.attempt.probe].detectors;
        for (a, first) in detectors.iter().enumerate() {
            for second in &detectors[a + 1..] {
                let (Some(x), Some(y)) = (j.verdict(first), j.verdict(second)) else { continue };
                let key = if first < second { (first.clone(), second.clone()) } else { (second.clone(), first.clone()) };
                let (xs, ys) = pairs.entry(key.clone()).or_default();
                let (x, y) = if key.0 == *first { (x, y) } else { (y, x) };
                xs.push(x.success);
                ys.push(y.success);
            }
        }
    }
    pairs
        .into_iter()
        .map(|((a, b), (xs, ys))| Agreement {
            items: xs.len(),
            kappa: cohens_kappa(&xs, &ys),
            disagreements: xs.iter().zip(&ys).filter(|(x, y)| x != y).count(),
            detectors: [a, b],
        })
        .collect()
}

/// Per counterfactual probe, attribute and detector: group means, the gap and its p-value.
fn counterfactual_gaps(suite: &Suite, judged: &[Judged], seed: u64) -> Vec<CounterfactualGap> {
    let mut out = Vec::new();
    for (index, probe) in suite.probes.iter().enumerate() {
        if probe.family != Family::Counterfactual {
            continue;
        }
        for (attribute, groups) in &probe.attributes {
            for detector in &probe.detectors {
                let mut blocks: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
                for j in judged.iter().filter(|j| j.attempt.probe == index && j.attempt.attribute.as_deref() == Some(attribute)) {
                    let (Some(block), Some(group)) = (j.attempt.block.as_deref(), j.attempt.group.as_deref()) else { continue };
                    let Some(g) = groups.iter().position(|x| x == group) else { continue };
                    let row = blocks.entry(block).or_insert_with(|| vec![None; groups.len()]);
                    row[g] = j.verdict(detector).map(|v| v.score).filter(|s| s.is_finite());
                }
                let complete: Vec<Vec<f64>> =
                    blocks.into_values().filter_map(|row| row.into_iter().collect::<Option<Vec<f64>>>()).collect();
                out.push(CounterfactualGap {
                    probe: probe.name.clone(),
                    attribute: attribute.clone(),
                    detector: detector.clone(),
                    groups: groups.clone(),
                    pairs: complete.len(),
                    test: paired_permutation_test(&complete, 9_999, seed),
                });
            }
        }
    }
    out
}

/// BBQ scores per probe, overall and per BBQ category, from the first `answer` verdict.
fn bbq(suite: &Suite, judged: &[Judged]) -> Vec<BbqSummary> {
    let mut out = Vec::new();
    for (index, probe) in suite.probes.iter().enumerate() {
        if probe.family != Family::Bbq {
            continue;
        }
        let mut by_category: BTreeMap<String, Vec<BbqAnswer>> = BTreeMap::new();
        for j in judged.iter().filter(|j| j.attempt.probe == index && !j.failed()) {
            let Expected::Choice { label, bbq: Some(item), .. } = &j.attempt.expected else { continue };
            let chosen = j.verdicts.iter().find_map(|(_, v)| v.chosen);
            let answer = BbqAnswer { ambiguous: item.ambiguous, negative: item.negative, roles: item.roles.clone(), label: *label, chosen };
            let category = j.attempt.attribute.clone().unwrap_or_default();
            by_category.entry("all".into()).or_default().push(answer.clone());
            by_category.entry(category).or_default().push(answer);
        }
        for (category, answers) in by_category {
            out.push(BbqSummary { probe: probe.name.clone(), category, scores: bbq_scores(&answers) });
        }
    }
    out
}
