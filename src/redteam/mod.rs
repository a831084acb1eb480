//! `redteam`: attack a model (local or behind an OpenAI-compatible endpoint) with the probes of
//! a suite, judge every response with the suite's detectors, and report attack-success rates
//! with confidence intervals, bias gaps and task accuracy. Answers are journaled as they come,
//! so an interrupted run continues where it stopped; findings feed back into training data.

pub mod detect;
pub mod report;
pub mod stats;
pub mod suite;
pub mod summary;
pub mod target;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Int32Array, StringArray};
use arrow::datatypes::{DataType, Field};
use serde::{Deserialize, Serialize};

use crate::data::ParquetSource;
use crate::data::meta;
use crate::data::parquet_io::DEFAULT_BATCH_ROWS;
use crate::data::records::{ChatRecord, FindingRecord, PreferenceRecord, Record, RecordWriter, ResponseRecord};
use crate::data::{ColumnType, Message};
use crate::error::{Error, Result, bad_input};
use crate::output;
use crate::progress::{self, Progress, Unit};
use detect::{Detector, DetectorModels, Verdict};
use stats::Rate;
use suite::{Attempt, Section, Suite};
use summary::{BaselineRates, GateBound, Judged, Summary, SummaryInputs, disagreements, summarise};
use target::{GenerationSettings, Outcome, Target};

pub struct RedteamOptions {
    pub suite: PathBuf,
    pub output: PathBuf,
    /// Default: the output's name with `.summary.json`.
    pub summary: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub baseline: Option<PathBuf>,
    pub fail_above: Option<f64>,
    /// Fewer attempts answered than this fraction fails the run (exit 3).
    pub min_answered: f64,
    pub gate: GateBound,
    pub export_sft: Option<PathBuf>,
    pub export_prefs: Option<PathBuf>,
    pub export_disagreements: Option<PathBuf>,
    pub generation: GenerationSettings,
    pub detector_models: DetectorModels,
    /// Ignore (and replace) an earlier run's journal.
    pub restart: bool,
    /// The resolved configuration, recorded in the findings' metadata.
    pub config: String,
}

pub struct RedteamReport {
    pub summary: Summary,
    pub summary_path: PathBuf,
    /// Attempts answered in this run (the rest came from the journal).
    pub answered_now: usize,
}

/// A journal line: one answered attempt.
#[derive(Serialize, Deserialize)]
struct JournalEntry {
    id: String,
    fingerprint: String,
    outcome: Outcome,
}

/// The first journal line: what the answers were produced by.
#[derive(Serialize, Deserialize, PartialEq)]
struct JournalHeader {
    lathe_redteam_journal: u32,
    target: String,
    generation: String,
}

pub fn redteam(options: &RedteamOptions, target: &Target) -> Result<RedteamReport> {
    let mut suite = Suite::load(&options.suite)?;
    let unavailable: Vec<String> = suite
        .detectors
        .iter()
        .filter(|(_, spec)| !Detector::available(spec, &options.detector_models))
        .map(|(name, _)| name.clone())
        .collect();
    if !unavailable.is_empty() {
        progress::warn(format!("note: left out optional detectors without a model: {} (pass --guard / --reward-model)", unavailable.join(", ")));
        suite.drop_detectors(&unavailable)?;
    }
    let attempts = suite.attempts(options.generation.seed)?;
    let detectors = load_detectors(&suite, &options.detector_models)?;
    let summary_path = options.summary.clone().unwrap_or_else(|| sibling(&options.output, "summary.json"));
    for path in [Some(&options.output), Some(&summary_path), options.report.as_ref(), options.export_sft.as_ref(), options.export_prefs.as_ref(), options.export_disagreements.as_ref()].into_iter().flatten() {
        output::check_writable(path)?;
        output::check_distinct(path, &[options.baseline.as_deref(), Some(options.suite.as_path())].into_iter().flatten().collect::<Vec<_>>())?;
    }
    let baseline = match &options.baseline {
        Some(path) => Some(baseline_rates(path)?),
        None => None,
    };

    let started = Instant::now();
    let journal_path = sibling(&options.output, "journal.jsonl");
    let header = JournalHeader {
        lathe_redteam_journal: 1,
        target: target.name(),
        generation: serde_json::to_string(&options.generation)?,
    };
    let mut outcomes = if options.restart { HashMap::new() } else { read_journal(&journal_path, &header, &attempts)? };
    let resumed = outcomes.len();
    let pending: Vec<&Attempt> = attempts.iter().filter(|a| !outcomes.contains_key(&a.id)).collect();
    if resumed > 0 {
        progress::log(format!("resuming: {resumed} of {} attempts answered in an earlier run ({})", attempts.len(), journal_path.display()));
    }
    let mut journal = Journal::open(&journal_path, &header, resumed > 0)?;
    let bar = Progress::new("attacking", Some(attempts.len() as u64), Unit::Items("attempts"));
    bar.inc(resumed as u64);
    let answered = target.complete(&pending, &options.generation, &mut |finished| {
        for (i, outcome) in finished {
            let attempt = pending[i];
            journal.append(&JournalEntry { id: attempt.id.clone(), fingerprint: attempt.fingerprint(), outcome: outcome.clone() })?;
            outcomes.insert(attempt.id.clone(), outcome);
            bar.inc(1);
        }
        journal.sync()
    });
    if let Err(Error::Interrupted) = answered {
        bar.finish();
        progress::log(format!(
            "{} of {} attempts answered and kept in {}; run the same command again to continue",
            outcomes.len(),
            attempts.len(),
            journal_path.display()
        ));
    }
    answered?;
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();

    let judged = judge(&suite, &attempts, &outcomes, &detectors)?;
    let summary = summarise(&SummaryInputs {
        suite: &suite,
        judged: &judged,
        target: target.name(),
        seconds,
        fail_above: options.fail_above,
        min_answered: options.min_answered,
        bound: options.gate,
        baseline,
        seed: options.generation.seed,
    });

    write_findings(&options.output, &suite, &judged, &summary.target, &options.config)?;
    let summary_json = serde_json::to_string_pretty(&summary)?;
    output::write_atomic(&summary_path, format!("{summary_json}\n").as_bytes())?;
    if let Some(path) = &options.report {
        output::write_atomic(path, report::html(&suite, &summary, &judged).as_bytes())?;
    }
    if let Some(path) = &options.export_sft {
        export_sft(path, &suite, &judged)?;
    }
    if let Some(path) = &options.export_prefs {
        export_prefs(path, &suite, &judged)?;
    }
    if let Some(path) = &options.export_disagreements {
        export_disagreements(path, &suite, &judged, &summary.target)?;
    }
    drop(journal);
    // Everything is written: the journal has done its job.
    let _ = std::fs::remove_file(&journal_path);
    Ok(RedteamReport { summary, summary_path, answered_now: pending.len() })
}

/// `findings.parquet` → `findings.EXT` beside it.
fn sibling(output: &Path, extension: &str) -> PathBuf {
    if output::is_stdio(output) {
        return PathBuf::from(format!("redteam.{extension}"));
    }
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "findings".into());
    output.with_file_name(format!("{stem}.{extension}"))
}

fn load_detectors(suite: &Suite, models: &DetectorModels) -> Result<BTreeMap<String, Detector>> {
    let mut loaded = BTreeMap::new();
    for probe in &suite.probes {
        for name in &probe.detectors {
            for needed in std::iter::once(name).chain(&suite.detectors[name].of) {
                if !loaded.contains_key(needed) {
                    loaded.insert(needed.clone(), Detector::load(needed, &suite.detectors[needed], models)?);
                }
            }
        }
    }
    Ok(loaded)
}

/// Every answered attempt with its verdicts; detectors run once over all their attempts.
fn judge<'a>(
    suite: &Suite,
    attempts: &'a [Attempt],
    outcomes: &'a HashMap<String, Outcome>,
    detectors: &BTreeMap<String, Detector>,
) -> Result<Vec<Judged<'a>>> {
    let mut judged: Vec<Judged> = attempts
        .iter()
        .map(|a| Judged { attempt: a, outcome: &outcomes[&a.id], verdicts: Vec::new() })
        .collect();
    // A detector judges the attempts of probes that list it, or list an `all` holding it.
    let runs_on = |name: &String, probe: usize| {
        suite.probes[probe].detectors.iter().any(|d| d == name || suite.detectors[d].of.contains(name))
    };
    let mut verdicts: HashMap<(usize, &str), Verdict> = HashMap::new();
    let bar = Progress::new("judging", None, Unit::Items("verdicts"));
    for (name, detector) in detectors.iter().filter(|(_, d)| !matches!(d, Detector::All(_))) {
        let mine: Vec<usize> = (0..judged.len()).filter(|&i| !judged[i].failed() && runs_on(name, judged[i].attempt.probe)).collect();
        let chosen: Vec<&Attempt> = mine.iter().map(|&i| judged[i].attempt).collect();
        let prompts: Vec<&str> = mine.iter().map(|&i| judged[i].outcome.scored_prompt.as_str()).collect();
        let responses: Vec<&str> = mine.iter().map(|&i| judged[i].outcome.response.as_str()).collect();
        let found = detector.judge(&chosen, &prompts, &responses)?;
        bar.inc(found.len() as u64);
        for (&i, verdict) in mine.iter().zip(found) {
            verdicts.insert((i, name.as_str()), verdict);
        }
    }
    bar.finish();
    // In the probe's order: its first detector decides.
    for (i, j) in judged.iter_mut().enumerate() {
        if j.failed() {
            continue;
        }
        for name in &suite.probes[j.attempt.probe].detectors {
            let verdict = match &detectors[name] {
                Detector::All(members) => {
                    let members: Vec<&Verdict> = members.iter().filter_map(|m| verdicts.get(&(i, m.as_str()))).collect();
                    Detector::combine(&members)
                }
                _ => verdicts[&(i, name.as_str())].clone(),
            };
            j.verdicts.push((name.clone(), verdict));
        }
    }
    Ok(judged)
}

/// Answers journaled by an earlier run of the same target and settings, for attempts whose
/// prompt is unchanged.
fn read_journal(path: &Path, header: &JournalHeader, attempts: &[Attempt]) -> Result<HashMap<String, Outcome>> {
    let Ok(file) = File::open(path) else { return Ok(HashMap::new()) };
    let mut lines = BufReader::new(file).lines();
    let first: Option<JournalHeader> = lines.next().and_then(|l| l.ok()).and_then(|l| serde_json::from_str(&l).ok());
    if first.as_ref() != Some(header) {
        progress::warn(format!("{}: written for another target or settings; starting over", path.display()));
        return Ok(HashMap::new());
    }
    let fingerprints: HashMap<&str, String> = attempts.iter().map(|a| (a.id.as_str(), a.fingerprint())).collect();
    let mut outcomes = HashMap::new();
    for line in lines {
        // A line cut short by a crash is the only partial one, and it is the last.
        let Ok(entry) = serde_json::from_str::<JournalEntry>(&line.map_err(|e| bad_input(path, e))?) else { break };
        if fingerprints.get(entry.id.as_str()) == Some(&entry.fingerprint) {
            outcomes.insert(entry.id, entry.outcome);
        }
    }
    Ok(outcomes)
}

struct Journal {
    file: File,
}

impl Journal {
    fn open(path: &Path, header: &JournalHeader, append: bool) -> Result<Self> {
        let mut file = if append {
            let mut file = OpenOptions::new().read(true).append(true).open(path).map_err(|e| bad_input(path, e))?;
            // A crash may have left half a line: end it so the next entry starts clean.
            let length = file.metadata()?.len();
            if length > 0 {
                use std::io::{Read, Seek, SeekFrom};
                let mut last = [0u8];
                file.seek(SeekFrom::Start(length - 1))?;
                file.read_exact(&mut last)?;
                if last[0] != b'\n' {
                    file.write_all(b"\n")?;
                }
            }
            file
        } else {
            let mut file = File::create(path).map_err(|e| bad_input(path, format!("cannot write the journal: {e}")))?;
            writeln!(file, "{}", serde_json::to_string(header)?)?;
            file
        };
        file.flush()?;
        Ok(Journal { file })
    }

    fn append(&mut self, entry: &JournalEntry) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(entry)?)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.file.flush()?;
        self.file.sync_data()?;
        Ok(())
    }
}

/// Findings: one row per attempt × detector (SPEC columns) plus where it came from.
fn write_findings(path: &Path, suite: &Suite, judged: &[Judged], target: &str, config: &str) -> Result<()> {
    let carried = vec![
        Field::new("attempt_id", DataType::Utf8, false),
        Field::new("family", DataType::Utf8, false),
        Field::new("primary", DataType::Boolean, false),
        Field::new("chosen", DataType::Int32, true),
        Field::new("finish_reason", DataType::Utf8, false),
        Field::new("truncated", DataType::Boolean, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("target", DataType::Utf8, false),
    ];
    let metadata = vec![(meta::CONFIG.to_string(), config.to_string()), ("lathe.redteam.suite".into(), suite.display_name())];
    let mut writer = RecordWriter::<FindingRecord>::create(path, "redteam", metadata, carried)?;
    let mut rows = Vec::new();
    let mut provenance = Vec::new();
    for j in judged {
        let probe = &suite.probes[j.attempt.probe];
        let failed_verdicts: Vec<(String, Verdict)>;
        let verdicts = if j.failed() {
            failed_verdicts = probe.detectors.iter().map(|d| (d.clone(), Verdict { score: f64::NAN, success: false, chosen: None })).collect();
            &failed_verdicts
        } else {
            &j.verdicts
        };
        for (k, (detector, verdict)) in verdicts.iter().enumerate() {
            rows.push(FindingRecord {
                probe: probe.name.clone(),
                category: suite.category(j.attempt.probe).to_string(),
                prompt: j.attempt.user.clone(),
                response: j.outcome.response.clone(),
                detector: detector.clone(),
                score: verdict.score,
                success: verdict.success,
                attribute: j.attempt.attribute.clone(),
                group: j.attempt.group.clone(),
            });
            provenance.push(Provenance { judged: j, family: probe.family.name(), primary: k == 0, chosen: verdict.chosen.map(|c| c as i32) });
        }
    }
    for (chunk, extra) in rows.chunks(DEFAULT_BATCH_ROWS).zip(provenance.chunks(DEFAULT_BATCH_ROWS)) {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(extra.iter().map(|e| e.judged.attempt.id.as_str()))),
            Arc::new(StringArray::from_iter_values(extra.iter().map(|e| e.family))),
            Arc::new(extra.iter().map(|e| Some(e.primary)).collect::<BooleanArray>()),
            Arc::new(extra.iter().map(|e| e.chosen).collect::<Int32Array>()),
            Arc::new(StringArray::from_iter_values(extra.iter().map(|e| e.judged.outcome.finish_reason.as_str()))),
            Arc::new(extra.iter().map(|e| Some(e.judged.outcome.truncated)).collect::<BooleanArray>()),
            Arc::new(extra.iter().map(|e| e.judged.outcome.error.as_deref()).collect::<StringArray>()),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(target, extra.len()))),
        ];
        writer.write(chunk, columns)?;
    }
    writer.finish()?;
    Ok(())
}

/// Where a findings row came from, beside the SPEC columns.
struct Provenance<'a> {
    judged: &'a Judged<'a>,
    family: &'static str,
    primary: bool,
    chosen: Option<i32>,
}

/// Per attack category (and detector), the attack-success rates of an earlier findings file:
/// its rows of attack families, or every row of a findings file from elsewhere.
fn baseline_rates(path: &Path) -> Result<BaselineRates> {
    let source = ParquetSource::open(path)?;
    source.expect_kind(crate::data::Kind::Findings)?;
    source.require("category", ColumnType::Str)?;
    source.require("detector", ColumnType::Str)?;
    source.require("success", ColumnType::Bool)?;
    let ours = source.has_column("primary") && source.has_column("family");
    let mut primary: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut by_detector: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for batch in source.batches(None, DEFAULT_BATCH_ROWS)? {
        let batch = batch?;
        let (categories, detectors, successes) = (batch.strings("category")?, batch.strings("detector")?, batch.bools("success")?);
        let primaries = if ours { Some(batch.bools("primary")?) } else { None };
        let families = if ours { Some(batch.strings("family")?) } else { None };
        let errors = if source.has_column("error") { Some(batch.optional_strings("error")?) } else { None };
        for i in 0..batch.len() {
            let attack = families.as_ref().is_none_or(|f| ATTACK_FAMILIES.contains(&f.value(i)));
            if !attack || errors.as_ref().is_some_and(|e| arrow::array::Array::is_valid(e, i)) {
                continue;
            }
            let success = u64::from(successes.value(i));
            let category = categories.value(i).to_string();
            let entry = by_detector.entry((category.clone(), detectors.value(i).to_string())).or_default();
            entry.0 += success;
            entry.1 += 1;
            if primaries.as_ref().is_none_or(|p| p.value(i)) {
                let entry = primary.entry(category).or_default();
                entry.0 += success;
                entry.1 += 1;
            }
        }
    }
    let rates = |counts: &(u64, u64)| Rate::wilson(counts.0, counts.1);
    Ok(BaselineRates {
        path: path.display().to_string(),
        primary: primary.iter().map(|(k, v)| (k.clone(), rates(v))).collect(),
        by_detector: by_detector.iter().map(|(k, v)| (k.clone(), rates(v))).collect(),
    })
}

/// Families whose findings are attacks (see [`suite::Family::section`]).
const ATTACK_FAMILIES: [&str; 5] = ["harmful", "jailbreak", "encoding", "injection", "leakage"];

fn successful_attacks<'a>(suite: &Suite, judged: &'a [Judged<'a>]) -> Vec<&'a Judged<'a>> {
    judged
        .iter()
        .filter(|j| suite.probes[j.attempt.probe].family.section() == Section::Attack)
        .filter(|j| !j.failed() && j.primary().is_some_and(|v| v.success))
        .collect()
}

/// Chat data teaching the safe answer to every attack that got through.
fn export_sft(path: &Path, suite: &Suite, judged: &[Judged]) -> Result<()> {
    let rows: Vec<ChatRecord> = successful_attacks(suite, judged)
        .iter()
        .map(|j| {
            let mut messages = Vec::new();
            if let Some(system) = &j.attempt.system {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", &j.attempt.user));
            messages.push(Message::new("assistant", &suite.safe_response));
            ChatRecord { messages }
        })
        .collect();
    write_export(path, &rows)
}

/// Preference pairs: the safe answer over the harmful response, for every attack that got through.
fn export_prefs(path: &Path, suite: &Suite, judged: &[Judged]) -> Result<()> {
    let rows: Vec<PreferenceRecord> = successful_attacks(suite, judged)
        .iter()
        .map(|j| PreferenceRecord {
            prompt: j.outcome.scored_prompt.clone(),
            chosen: suite.safe_response.clone(),
            rejected: j.outcome.response.clone(),
            margin: None,
            prompt_id: Some(j.attempt.id.clone()),
            chosen_score: None,
            rejected_score: None,
        })
        .collect();
    write_export(path, &rows)
}

/// Write training rows made from the findings, saying so when there are none.
fn write_export<R: Record>(path: &Path, rows: &[R]) -> Result<()> {
    if rows.is_empty() {
        progress::warn(format!("{}: no attack got through, so the export is empty", path.display()));
    }
    let mut writer = RecordWriter::<R>::create(path, "redteam", Vec::new(), Vec::new())?;
    writer.write(rows, Vec::new())?;
    writer.finish()?;
    Ok(())
}

/// Responses the detectors disagree on, in the responses layout so `score --human` can label
/// them, with both detectors' verdicts beside.
fn export_disagreements(path: &Path, suite: &Suite, judged: &[Judged], target: &str) -> Result<()> {
    let items = disagreements(suite, judged);
    let rows: Vec<ResponseRecord> = items
        .iter()
        .map(|(j, a, b)| ResponseRecord {
            prompt_id: format!("{}:{a}:{b}", j.attempt.id),
            prompt: j.attempt.user.clone(),
            response: j.outcome.response.clone(),
            sample: 0,
            model: target.to_string(),
            finish_reason: if j.outcome.finish_reason == "length" { "length" } else { "stop" }.into(),
            num_tokens: 0,
            logprob: f64::NAN,
        })
        .collect();
    let describe = |j: &Judged, d: &str| {
        j.verdicts.iter().find(|(n, _)| n == d).map(|(_, v)| format!("{d}: success={} score={:.3}", v.success, v.score)).unwrap_or_default()
    };
    let carried = vec![Field::new("probe", DataType::Utf8, false), Field::new("verdicts", DataType::Utf8, false)];
    let mut writer = RecordWriter::<ResponseRecord>::create(path, "redteam", Vec::new(), carried)?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(items.iter().map(|(j, _, _)| suite.probes[j.attempt.probe].name.as_str()))),
        Arc::new(StringArray::from_iter_values(items.iter().map(|(j, a, b)| format!("{}; {}", describe(j, a), describe(j, b))))),
    ];
    writer.write(&rows, columns)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests;
