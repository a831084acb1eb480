//! Guards and the policy over them. Each guard is a multi-label classifier running on its own
//! worker thread (texts queued to it are scored in batches); a check sends the texts to every
//! guard at once, so guards run concurrently with each other. The policy turns the scores into
//! an action per category and decides what goes to human review.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, bad_input, failed};
use crate::score::GuardModel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through without note.
    Allow,
    /// Let it through, but report it (moderations' `flagged`, metrics, review).
    Flag,
    /// Stop it: a blocked input never reaches the model, a blocked output never the user.
    Block,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Flag => "flag",
            Action::Block => "block",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Input,
    Output,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
        }
    }
}

// ---- the policy file ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: Option<String>,
    refusal: Option<String>,
    #[serde(default)]
    review: ReviewFile,
    #[serde(default)]
    stream: StreamFile,
    #[serde(default)]
    defaults: RuleFile,
    #[serde(default)]
    guards: BTreeMap<String, GuardFile>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    threshold: Option<f64>,
    action: Option<Action>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GuardFile {
    threshold: Option<f64>,
    action: Option<Action>,
    #[serde(default)]
    categories: BTreeMap<String, RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReviewFile {
    blocks: bool,
    flags: bool,
    allow_sample: f64,
    band: f64,
}

impl Default for ReviewFile {
    fn default() -> Self {
        ReviewFile { blocks: true, flags: true, allow_sample: 0.01, band: 0.05 }
    }
}

#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct StreamFile {
    /// Generated characters held back and checked together before release.
    pub chunk_chars: usize,
    /// Characters of already released text checked again with the next chunk, so a phrase
    /// split across chunks is still seen whole.
    pub overlap_chars: usize,
}

impl Default for StreamFile {
    fn default() -> Self {
        StreamFile { chunk_chars: 64, overlap_chars: 32 }
    }
}

/// Threshold and action of one category of one guard.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Rule {
    pub threshold: f64,
    pub action: Action,
}

pub const DEFAULT_REFUSAL: &str = "I can't help with that.";

/// The resolved policy: a rule for every category of every guard.
#[derive(Debug)]
pub struct Policy {
    pub version: String,
    pub refusal: String,
    pub review_blocks: bool,
    pub review_flags: bool,
    pub allow_sample: f64,
    pub band: f64,
    pub stream: StreamFile,
    /// guard → category → rule.
    pub rules: BTreeMap<String, BTreeMap<String, Rule>>,
}

/// What the policy needs to know of a loaded guard.
pub struct GuardInfo<'a> {
    pub name: &'a str,
    pub labels: &'a [String],
    pub thresholds: &'a HashMap<String, f64>,
}

impl Policy {
    /// Read a policy (or the defaults when `path` is None) and resolve it against the guards.
    /// A category's rule comes from its own table, else its guard's, else `[defaults]`; a
    /// threshold left unset everywhere is the one `rm-train` chose for the category, else 0.5.
    pub fn load(path: Option<&Path>, guards: &[GuardInfo]) -> Result<Self> {
        let (file, version) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read the policy: {e}")))?;
                let file: PolicyFile = toml::from_str(&text).map_err(|e| bad_input(path, crate::cli::toml_error_line(&text, &e)))?;
                let digest = Sha256::digest(text.as_bytes());
                let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
                let version = file.version.clone().unwrap_or_else(|| format!("sha256:{short}"));
                (file, version)
            }
            None => (PolicyFile::default(), "default".to_string()),
        };
        let at = |what: String| match path {
            Some(p) => bad_input(p, what),
            None => crate::error::usage(what),
        };
        let known: Vec<&str> = guards.iter().map(|g| g.name).collect();
        for (name, guard) in &file.guards {
            let Some(info) = guards.iter().find(|g| g.name == name) else {
                return Err(at(format!("[guards.{name}]: no guard of that name is loaded (guards: {})", if known.is_empty() { "none".into() } else { known.join(", ") })));
            };
            for category in guard.categories.keys() {
                if !info.labels.contains(category) {
                    return Err(at(format!("[guards.{name}.categories.{category}]: guard `{name}` has no category `{category}` (its categories: {})", info.labels.join(", "))));
                }
            }
        }
        let check = |where_: &str, rule: &RuleFile| -> Result<()> {
            match rule.threshold {
                Some(t) if !(0.0..=1.0).contains(&t) => Err(at(format!("{where_}: threshold {t} must be between 0 and 1"))),
                _ => Ok(()),
            }
        };
        check("[defaults]", &file.defaults)?;
        let review = &file.review;
        if !(0.0..=1.0).contains(&review.allow_sample) {
            return Err(at(format!("[review] allow_sample {}: must be between 0 and 1", review.allow_sample)));
        }
        if !(0.0..=1.0).contains(&review.band) {
            return Err(at(format!("[review] band {}: must be between 0 and 1", review.band)));
        }
        if file.stream.chunk_chars == 0 {
            return Err(at("[stream] chunk_chars must be at least 1".into()));
        }
        let mut rules = BTreeMap::new();
        for info in guards {
            let guard_file = file.guards.get(info.name);
            let guard_rule = guard_file.map(|g| RuleFile { threshold: g.threshold, action: g.action }).unwrap_or_default();
            check(&format!("[guards.{}]", info.name), &guard_rule)?;
            let mut by_category = BTreeMap::new();
            for label in info.labels {
                let own = guard_file.and_then(|g| g.categories.get(label)).copied().unwrap_or_default();
                check(&format!("[guards.{}.categories.{label}]", info.name), &own)?;
                let threshold = own
                    .threshold
                    .or(guard_rule.threshold)
                    .or(file.defaults.threshold)
                    .or_else(|| info.thresholds.get(label).copied())
                    .unwrap_or(0.5);
                let action = own.action.or(guard_rule.action).or(file.defaults.action).unwrap_or(Action::Block);
                by_category.insert(label.clone(), Rule { threshold, action });
            }
            rules.insert(info.name.to_string(), by_category);
        }
        Ok(Policy {
            version,
            refusal: file.refusal.unwrap_or_else(|| DEFAULT_REFUSAL.to_string()),
            review_blocks: review.blocks,
            review_flags: review.flags,
            allow_sample: review.allow_sample,
            band: review.band,
            stream: file.stream,
            rules,
        })
    }

    /// Apply the rules to the guards' scores.
    pub fn decide(&self, scores: &[GuardScores]) -> Verdict {
        let mut verdict = Verdict { action: Action::Allow, judged: Vec::new(), near_threshold: false };
        for guard in scores {
            let Some(rules) = self.rules.get(&guard.guard) else { continue };
            for (label, &score) in &guard.scores {
                let Some(rule) = rules.get(label) else { continue };
                let hit = score >= rule.threshold;
                if (score - rule.threshold).abs() <= self.band {
                    verdict.near_threshold = true;
                }
                if hit && rule.action > verdict.action {
                    verdict.action = rule.action;
                }
                verdict.judged.push(Judged { guard: guard.guard.clone(), category: label.clone(), score, threshold: rule.threshold, action: rule.action, hit });
            }
        }
        verdict
    }

    /// Why a decision goes to human review, if it does.
    pub fn review_reason(&self, verdict: &Verdict, rng: &mut impl Rng) -> Option<&'static str> {
        if verdict.judged.is_empty() {
            return None;
        }
        match verdict.action {
            Action::Block if self.review_blocks => Some("block"),
            Action::Flag if self.review_flags => Some("flag"),
            _ if verdict.near_threshold => Some("band"),
            Action::Allow if self.allow_sample > 0.0 && rng.random::<f64>() < self.allow_sample => Some("sample"),
            _ => None,
        }
    }
}

/// One category's score under its rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Judged {
    pub guard: String,
    pub category: String,
    pub score: f64,
    pub threshold: f64,
    pub action: Action,
    /// The score reached the threshold.
    pub hit: bool,
}

#[derive(Clone, Debug)]
pub struct Verdict {
    /// The strongest action of the categories hit.
    pub action: Action,
    pub judged: Vec<Judged>,
    /// Some score lies within the review band around its threshold.
    pub near_threshold: bool,
}

impl Verdict {
    pub fn allowed() -> Self {
        Verdict { action: Action::Allow, judged: Vec::new(), near_threshold: false }
    }

    /// The categories hit with a block or flag action: what the guards say the text is.
    pub fn predicted_labels(&self) -> Vec<String> {
        predicted_labels(&self.judged)
    }
}

pub fn predicted_labels(judged: &[Judged]) -> Vec<String> {
    let mut labels: Vec<String> =
        judged.iter().filter(|j| j.hit && j.action != Action::Allow).map(|j| j.category.clone()).collect();
    labels.sort();
    labels.dedup();
    labels
}

// ---- guard workers ----

/// One guard's scores of a check: the highest over the texts checked, per category.
#[derive(Clone, Debug)]
pub struct GuardScores {
    pub guard: String,
    pub scores: BTreeMap<String, f64>,
    pub seconds: f64,
}

struct Job {
    texts: Vec<String>,
    reply: tokio::sync::oneshot::Sender<std::result::Result<Vec<Vec<f64>>, String>>,
}

/// A guard model on its own worker thread.
pub struct GuardWorker {
    pub name: String,
    pub labels: Vec<String>,
    jobs: mpsc::Sender<Job>,
}

/// A guard argument: `NAME=MODEL`, or `MODEL` named after its folder.
pub fn guard_name(spec: &str) -> (String, String) {
    match spec.split_once('=') {
        Some((name, model)) if !name.is_empty() && !name.contains('/') => (name.to_string(), model.to_string()),
        _ => {
            let name = Path::new(spec.trim_end_matches('/')).file_name().map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned());
            (name, spec.to_string())
        }
    }
}

/// Texts scored together in one batch at most.
const GUARD_BATCH: usize = 32;

impl GuardWorker {
    /// Start a loaded guard's thread.
    pub fn start(name: String, guard: GuardModel, threads: usize) -> Result<Self> {
        let labels = guard.labels.clone();
        let (jobs, queue) = mpsc::channel::<Job>();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .stack_size(64 << 20)
            .thread_name({
                let name = name.clone();
                move |i| format!("guard-{name}-{i}")
            })
            .build()
            .map_err(|e| failed(format!("guard {name}: cannot start its threads: {e}")))?;
        std::thread::Builder::new()
            .name(format!("guard-{name}"))
            .spawn(move || pool.install(|| guard_loop(guard, queue)))
            .map_err(|e| failed(format!("guard {name}: cannot start its thread: {e}")))?;
        Ok(GuardWorker { name, labels, jobs })
    }

    fn send(&self, texts: Vec<String>) -> tokio::sync::oneshot::Receiver<std::result::Result<Vec<Vec<f64>>, String>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        // A guard thread that died answers with a closed channel, reported by the caller.
        let _ = self.jobs.send(Job { texts, reply });
        answer
    }
}

fn guard_loop(guard: GuardModel, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        let mut count = jobs[0].texts.len();
        while count < GUARD_BATCH {
            match queue.try_recv() {
                Ok(job) => {
                    count += job.texts.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let texts: Vec<&str> = jobs.iter().flat_map(|j| j.texts.iter().map(String::as_str)).collect();
        match guard.probabilities(&texts) {
            Ok(all) => {
                let mut rest = all.into_iter();
                for job in jobs {
                    let mine: Vec<Vec<f64>> = rest.by_ref().take(job.texts.len()).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.one_line()));
                }
            }
        }
    }
}

/// Score `texts` with every guard at once; each guard's score per category is its highest
/// over the texts.
pub async fn check(guards: &[std::sync::Arc<GuardWorker>], texts: &[String]) -> std::result::Result<Vec<GuardScores>, String> {
    let started = Instant::now();
    let pending: Vec<_> = guards.iter().map(|g| g.send(texts.to_vec())).collect();
    let mut out = Vec::with_capacity(guards.len());
    for (guard, answer) in guards.iter().zip(pending) {
        let rows = answer.await.map_err(|_| format!("guard {} stopped", guard.name))??;
        let mut scores = BTreeMap::new();
        for (k, label) in guard.labels.iter().enumerate() {
            let best = rows.iter().map(|r| r[k]).fold(0.0f64, f64::max);
            scores.insert(label.clone(), best);
        }
        out.push(GuardScores { guard: guard.name.clone(), scores, seconds: started.elapsed().as_secs_f64() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info<'a>(name: &'a str, labels: &'a [String], thresholds: &'a HashMap<String, f64>) -> GuardInfo<'a> {
        GuardInfo { name, labels, thresholds }
    }

    #[test]
    fn rules_resolve_from_category_guard_defaults_then_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            "version = \"v1\"\n[defaults]\naction = \"flag\"\n[guards.g]\nthreshold = 0.7\n[guards.g.categories.hate]\nthreshold = 0.2\naction = \"block\"\n",
        )
        .unwrap();
        let labels = vec!["hate".to_string(), "violence".to_string()];
        let thresholds = HashMap::from([("violence".to_string(), 0.3)]);
        let other = vec!["spam".to_string()];
        let none = HashMap::new();
        let policy = Policy::load(Some(&path), &[info("g", &labels, &thresholds), info("h", &other, &none)]).unwrap();
        assert_eq!(policy.version, "v1");
        assert_eq!(policy.rules["g"]["hate"].threshold, 0.2);
        assert_eq!(policy.rules["g"]["hate"].action, Action::Block);
        assert_eq!(policy.rules["g"]["violence"].threshold, 0.7);
        assert_eq!(policy.rules["g"]["violence"].action, Action::Flag);
        assert_eq!(policy.rules["h"]["spam"].threshold, 0.5);

        let scores = vec![GuardScores { guard: "g".into(), scores: BTreeMap::from([("hate".into(), 0.25), ("violence".into(), 0.1)]), seconds: 0.0 }];
        let verdict = policy.decide(&scores);
        assert_eq!(verdict.action, Action::Block);
        assert_eq!(verdict.predicted_labels(), vec!["hate".to_string()]);
        assert_eq!(policy.review_reason(&verdict, &mut rand::rng()), Some("block"));

        std::fs::write(&path, "[guards.g.categories.spam]\nthreshold = 0.2\n").unwrap();
        let e = Policy::load(Some(&path), &[info("g", &labels, &thresholds)]).unwrap_err();
        assert!(e.to_string().contains("has no category `spam`"), "{e}");
        std::fs::write(&path, "[guards.nope]\nthreshold = 0.2\n").unwrap();
        assert!(Policy::load(Some(&path), &[info("g", &labels, &thresholds)]).unwrap_err().to_string().contains("no guard of that name"));
        std::fs::write(&path, "[defaults]\naction = \"explode\"\n").unwrap();
        assert!(Policy::load(Some(&path), &[]).is_err());
    }

    #[test]
    fn guard_names() {
        assert_eq!(guard_name("runs/guard"), ("guard".into(), "runs/guard".into()));
        assert_eq!(guard_name("tox=runs/guard/"), ("tox".into(), "runs/guard/".into()));
    }
}
