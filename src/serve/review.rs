//! The human review queue: guard decisions sampled by the policy, kept in SQLite (WAL, every
//! write synced before it is acknowledged), reviewed at the terminal or on the `/review` page,
//! summarised per guard (`stats`) and exported as SPEC labeled text for the next guard.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::data::records::{LabeledTextRecord, RecordWriter};
use crate::error::{Error, Result, bad_input, failed, usage};
use crate::serve::guard::{Judged, predicted_labels};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    direction TEXT NOT NULL,
    text TEXT NOT NULL,
    scores TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    labels TEXT,
    reviewer TEXT,
    reviewed_at TEXT
);
CREATE INDEX IF NOT EXISTS decisions_status ON decisions(status, id);
";

/// A decision to review, as it is written.
#[derive(Clone, Debug)]
pub struct NewDecision {
    pub request_id: String,
    pub direction: &'static str,
    pub text: String,
    pub judged: Vec<Judged>,
    pub action: &'static str,
    pub reason: &'static str,
    pub policy_version: String,
}

/// A decision in the queue.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub id: i64,
    pub request_id: String,
    pub created_at: String,
    pub direction: String,
    pub text: String,
    /// Every guard's score of every category, with the rule it was judged by.
    pub scores: Vec<Judged>,
    pub action: String,
    pub reason: String,
    pub policy_version: String,
    /// `pending`, `confirmed` or `overturned`.
    pub status: String,
    /// The reviewer's labels (the true categories of the text; empty = clean).
    pub labels: Option<Vec<String>>,
    pub reviewer: Option<String>,
    pub reviewed_at: Option<String>,
}

impl Item {
    /// What the guards said the text is.
    pub fn predicted(&self) -> Vec<String> {
        predicted_labels(&self.scores)
    }

    /// Every category any guard judged.
    pub fn categories(&self) -> Vec<String> {
        let mut all: Vec<String> = self.scores.iter().map(|j| j.category.clone()).collect();
        all.sort();
        all.dedup();
        all
    }
}

/// A reviewer's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The guards were right: the labels are the categories they hit.
    Confirm,
    /// The guards were wrong: these are the true labels (empty = clean).
    Overturn(Vec<String>),
}

pub struct ReviewDb {
    conn: Connection,
    path: PathBuf,
}

fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    failed(format!("{}: {e}", path.display()))
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The queue holds prompts and responses: readable by its owner only (SQLite gives its WAL
/// and shared-memory files the database file's mode). An older, wider file is narrowed.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            for file in [path.to_path_buf(), PathBuf::from(format!("{}-wal", path.display())), PathBuf::from(format!("{}-shm", path.display()))] {
                if let Ok(meta) = std::fs::metadata(&file) {
                    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(meta.permissions().mode() & 0o700))?;
                    }
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl ReviewDb {
    /// Open (creating) the queue. Writes are synced before they return, so an acknowledged
    /// decision survives the process being killed.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(bad_input(path, "its folder does not exist"));
            }
        }
        owner_only(path).map_err(|e| bad_input(path, format!("cannot create the review database: {e}")))?;
        let conn = Connection::open(path).map_err(|e| bad_input(path, format!("cannot open the review database: {e}")))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(SCHEMA)
        };
        setup().map_err(|e| bad_input(path, format!("not a usable review database: {e}")))?;
        Ok(ReviewDb { conn, path: path.to_path_buf() })
    }

    /// Open an existing queue (review, stats, export).
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(bad_input(path, "no such review database (serve-guard serve --db creates it)"));
        }
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn insert(&self, d: &NewDecision) -> Result<i64> {
        let scores = serde_json::to_string(&d.judged)?;
        self.conn
            .execute(
                "INSERT INTO decisions (request_id, created_at, direction, text, scores, action, reason, policy_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![d.request_id, now(), d.direction, d.text, scores, d.action, d.reason, d.policy_version],
            )
            .map_err(|e| db_error(&self.path, e))?;
        Ok(self.conn.last_insert_rowid())
    }

    fn read(row: &rusqlite::Row) -> rusqlite::Result<Item> {
        let scores: String = row.get("scores")?;
        let labels: Option<String> = row.get("labels")?;
        Ok(Item {
            id: row.get("id")?,
            request_id: row.get("request_id")?,
            created_at: row.get("created_at")?,
            direction: row.get("direction")?,
            text: row.get("text")?,
            scores: serde_json::from_str(&scores).unwrap_or_default(),
            action: row.get("action")?,
            reason: row.get("reason")?,
            policy_version: row.get("policy_version")?,
            status: row.get("status")?,
            labels: labels.and_then(|l| serde_json::from_str(&l).ok()),
            reviewer: row.get("reviewer")?,
            reviewed_at: row.get("reviewed_at")?,
        })
    }

    /// Items in id order: `pending`, `reviewed` (confirmed or overturned) or all.
    pub fn list(&self, which: Which, limit: usize) -> Result<Vec<Item>> {
        let condition = match which {
            Which::Pending => "status = 'pending'",
            Which::Reviewed => "status != 'pending'",
            Which::All => "1",
        };
        let mut statement = self
            .conn
            .prepare(&format!("SELECT * FROM decisions WHERE {condition} ORDER BY id LIMIT ?1"))
            .map_err(|e| db_error(&self.path, e))?;
        let rows = statement.query_map(params![limit as i64], Self::read).map_err(|e| db_error(&self.path, e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| db_error(&self.path, e))
    }

    pub fn get(&self, id: i64) -> Result<Option<Item>> {
        self.conn
            .query_row("SELECT * FROM decisions WHERE id = ?1", params![id], Self::read)
            .optional()
            .map_err(|e| db_error(&self.path, e))
    }

    pub fn counts(&self) -> Result<BTreeMap<String, i64>> {
        let mut statement = self.conn.prepare("SELECT status, COUNT(*) FROM decisions GROUP BY status").map_err(|e| db_error(&self.path, e))?;
        let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(|e| db_error(&self.path, e))?;
        rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().map_err(|e| db_error(&self.path, e))
    }

    /// Record a reviewer's verdict; returns the item as reviewed. Overturned labels must be
    /// categories the guards know. Reviewing an item again replaces the earlier verdict.
    pub fn review(&self, id: i64, verdict: &Verdict, reviewer: &str) -> Result<Item> {
        let item = self.get(id)?.ok_or_else(|| usage(format!("no decision {id} in the review queue")))?;
        let (status, labels) = match verdict {
            Verdict::Confirm => ("confirmed", item.predicted()),
            Verdict::Overturn(labels) => {
                let known = item.categories();
                if let Some(unknown) = labels.iter().find(|l| !known.contains(l)) {
                    return Err(usage(format!("label `{unknown}` is not a category of the guards (categories: {})", known.join(", "))));
                }
                let mut labels = labels.clone();
                labels.sort();
                labels.dedup();
                ("overturned", labels)
            }
        };
        self.conn
            .execute(
                "UPDATE decisions SET status = ?1, labels = ?2, reviewer = ?3, reviewed_at = ?4 WHERE id = ?5",
                params![status, serde_json::to_string(&labels)?, reviewer, now(), id],
            )
            .map_err(|e| db_error(&self.path, e))?;
        self.get(id)?.ok_or_else(|| failed(format!("decision {id} vanished")))
    }

    /// Every reviewed item as SPEC labeled text (`text`, `labels`), written atomically.
    pub fn export(&self, output: &Path) -> Result<u64> {
        let items = self.list(Which::Reviewed, usize::MAX >> 1)?;
        if items.is_empty() {
            return Err(usage(format!("{}: no reviewed decisions to export yet (serve-guard review)", self.path.display())));
        }
        let rows: Vec<LabeledTextRecord> = items
            .iter()
            .map(|i| LabeledTextRecord { text: i.text.clone(), labels: i.labels.clone().unwrap_or_default(), unlabeled: Vec::new() })
            .collect();
        let mut versions: Vec<&str> = items.iter().map(|i| i.policy_version.as_str()).collect();
        versions.sort();
        versions.dedup();
        let metadata = vec![("lathe.review.policy_versions".to_string(), versions.join(","))];
        let mut writer = RecordWriter::<LabeledTextRecord>::create(output, "serve-guard", metadata, vec![])?;
        writer.write(&rows, vec![])?;
        writer.finish()
    }

    /// Per guard and category, how its decisions held up under review.
    pub fn stats(&self) -> Result<Vec<CategoryStats>> {
        let items = self.list(Which::Reviewed, usize::MAX >> 1)?;
        let mut by_key: BTreeMap<(String, String), Vec<Observation>> = BTreeMap::new();
        for item in &items {
            let truth = item.labels.clone().unwrap_or_default();
            for j in &item.scores {
                let seen = Observation { score: j.score, threshold: j.threshold, truth: truth.contains(&j.category) };
                by_key.entry((j.guard.clone(), j.category.clone())).or_default().push(seen);
            }
        }
        Ok(by_key
            .into_iter()
            .map(|((guard, category), rows)| {
                let threshold = rows.last().map_or(0.5, |r| r.threshold);
                let mut s = CategoryStats { guard, category, reviewed: rows.len(), positives: 0, tp: 0, fp: 0, tn: 0, fn_: 0, precision: None, false_positive_rate: None, recall: None, threshold, suggested_threshold: None };
                for &Observation { score, threshold, truth } in &rows {
                    let predicted = score >= threshold;
                    s.positives += usize::from(truth);
                    match (predicted, truth) {
                        (true, true) => s.tp += 1,
                        (true, false) => s.fp += 1,
                        (false, false) => s.tn += 1,
                        (false, true) => s.fn_ += 1,
                    }
                }
                let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
                s.precision = ratio(s.tp, s.tp + s.fp);
                s.false_positive_rate = ratio(s.fp, s.fp + s.tn);
                s.recall = ratio(s.tp, s.tp + s.fn_);
                s.suggested_threshold = suggest_threshold(&rows);
                s
            })
            .collect())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Pending,
    Reviewed,
    All,
}

#[derive(Clone, Debug, Serialize)]
pub struct CategoryStats {
    pub guard: String,
    pub category: String,
    pub reviewed: usize,
    /// Reviewed items the reviewers gave this label.
    pub positives: usize,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub precision: Option<f64>,
    pub false_positive_rate: Option<f64>,
    pub recall: Option<f64>,
    /// The threshold in force at the latest reviewed decision.
    pub threshold: f64,
    /// The threshold with the best F1 on the reviewed items (midway between the scores it
    /// separates); none without both positive and negative reviews.
    pub suggested_threshold: Option<f64>,
}

/// One reviewed score of one category: the guard's score, the threshold it was judged by, and
/// whether the reviewer gave the text that label.
#[derive(Clone, Copy)]
struct Observation {
    score: f64,
    threshold: f64,
    truth: bool,
}

fn suggest_threshold(rows: &[Observation]) -> Option<f64> {
    if !rows.iter().any(|r| r.truth) || rows.iter().all(|r| r.truth) {
        return None;
    }
    let mut scores: Vec<f64> = rows.iter().map(|r| r.score).collect();
    scores.sort_by(f64::total_cmp);
    scores.dedup();
    let mut candidates: Vec<f64> = scores.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    candidates.push(scores[0]);
    let f1 = |t: f64| {
        let tp = rows.iter().filter(|r| r.score >= t && r.truth).count() as f64;
        let fp = rows.iter().filter(|r| r.score >= t && !r.truth).count() as f64;
        let fn_ = rows.iter().filter(|r| r.score < t && r.truth).count() as f64;
        2.0 * tp / (2.0 * tp + fp + fn_).max(1.0)
    };
    candidates.into_iter().map(|t| (f1(t), t)).max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1))).map(|(_, t)| t.clamp(0.0, 1.0))
}

/// `stats` as text lines.
pub fn stats_table(stats: &[CategoryStats]) -> String {
    let pct = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.2}", v));
    let mut out = format!("{:<16} {:<22} {:>8} {:>5} {:>9} {:>7} {:>7} {:>9} {:>9}\n", "guard", "category", "reviewed", "true", "precision", "fpr", "recall", "threshold", "suggested");
    for s in stats {
        out.push_str(&format!(
            "{:<16} {:<22} {:>8} {:>5} {:>9} {:>7} {:>7} {:>9.3} {:>9}\n",
            s.guard,
            s.category,
            s.reviewed,
            s.positives,
            pct(s.precision),
            pct(s.false_positive_rate),
            pct(s.recall),
            s.threshold,
            s.suggested_threshold.map_or_else(|| "-".to_string(), |t| format!("{t:.3}"))
        ));
    }
    out
}

/// One item for the terminal.
pub fn describe(item: &Item) -> String {
    let hits: Vec<String> = item
        .scores
        .iter()
        .filter(|j| j.hit || j.score >= j.threshold * 0.5)
        .map(|j| format!("{}/{}={:.3}{}", j.guard, j.category, j.score, if j.hit { format!(" (≥{:.2} {})", j.threshold, j.action.name()) } else { String::new() }))
        .collect();
    let status = match &item.labels {
        Some(labels) => format!(" — {} as [{}] by {}", item.status, labels.join(", "), item.reviewer.as_deref().unwrap_or("?")),
        None => String::new(),
    };
    format!(
        "#{} {} {} ({}, policy {}) request {} at {}{}\n  text: {}\n  scores: {}",
        item.id,
        item.direction,
        item.action,
        item.reason,
        item.policy_version,
        item.request_id,
        item.created_at,
        status,
        item.text.replace('\n', "\n        "),
        if hits.is_empty() { "all low".to_string() } else { hits.join(", ") }
    )
}

/// `serve-guard review`: go through the pending items at the terminal. Answers are read one
/// per line from `input`: `c` confirm, `o` overturn (then the true labels, comma-separated,
/// empty for clean), `s` skip, `q` quit. Each answer is committed before the next item shows.
pub fn review_terminal(db: &ReviewDb, reviewer: &str, input: &mut impl BufRead, out: &mut impl Write) -> Result<(usize, usize)> {
    let pending = db.list(Which::Pending, usize::MAX >> 1)?;
    writeln!(out, "{} decisions to review", pending.len())?;
    let (mut reviewed, mut skipped) = (0, 0);
    let mut line = String::new();
    let mut read = |out: &mut dyn Write, prompt: &str| -> Result<Option<String>> {
        write!(out, "{prompt}")?;
        out.flush()?;
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(line.trim().to_string()))
    };
    'items: for item in pending {
        writeln!(out, "\n{}\n  guards say: [{}]", describe(&item), item.predicted().join(", "))?;
        loop {
            let Some(answer) = read(out, "[c]onfirm, [o]verturn, [s]kip, [q]uit: ")? else { break 'items };
            let verdict = match answer.as_str() {
                "c" | "confirm" => Verdict::Confirm,
                "o" | "overturn" => {
                    let categories = item.categories().join(", ");
                    let Some(labels) = read(out, &format!("true labels, comma-separated, empty if clean ({categories}): "))? else { break 'items };
                    Verdict::Overturn(labels.split(',').map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
                }
                "s" | "skip" => {
                    skipped += 1;
                    continue 'items;
                }
                "q" | "quit" => break 'items,
                _ => continue,
            };
            match db.review(item.id, &verdict, reviewer) {
                Ok(done) => {
                    writeln!(out, "  → {} [{}]", done.status, done.labels.unwrap_or_default().join(", "))?;
                    reviewed += 1;
                    continue 'items;
                }
                Err(Error::Input(message)) => writeln!(out, "  {message}")?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok((reviewed, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::guard::Action;

    fn judged(category: &str, score: f64) -> Judged {
        Judged { guard: "g".into(), category: category.into(), score, threshold: 0.5, action: Action::Block, hit: score >= 0.5 }
    }

    #[test]
    fn decisions_are_reviewed_counted_and_exported() {
        let dir = tempfile::tempdir().unwrap();
        let db = ReviewDb::open(&dir.path().join("q.sqlite")).unwrap();
        let add = |text: &str, hate: f64| {
            db.insert(&NewDecision {
                request_id: "r".into(),
                direction: "input",
                text: text.into(),
                judged: vec![judged("hate", hate), judged("violence", 0.1)],
                action: if hate >= 0.5 { "block" } else { "allow" },
                reason: "block",
                policy_version: "v1".into(),
            })
            .unwrap()
        };
        let a = add("vermin", 0.9);
        let b = add("lovely day", 0.6);
        let c = add("hello", 0.2);
        assert_eq!(db.review(a, &Verdict::Confirm, "ana").unwrap().labels.unwrap(), vec!["hate"]);
        assert_eq!(db.review(b, &Verdict::Overturn(vec![]), "ana").unwrap().status, "overturned");
        assert!(db.review(c, &Verdict::Overturn(vec!["spam".into()]), "ana").is_err());
        let mut input = std::io::Cursor::new("x\nc\n");
        let mut out = Vec::new();
        assert_eq!(review_terminal(&db, "bo", &mut input, &mut out).unwrap(), (1, 0));
        let stats = db.stats().unwrap();
        let hate = stats.iter().find(|s| s.category == "hate").unwrap();
        assert_eq!((hate.tp, hate.fp, hate.tn), (1, 1, 1));
        assert_eq!(hate.precision, Some(0.5));
        assert_eq!(hate.false_positive_rate, Some(0.5));
        assert_eq!(hate.suggested_threshold, Some(0.75));
        let path = dir.path().join("labeled.parquet");
        assert_eq!(db.export(&path).unwrap(), 3);
        let rows = crate::data::records::RecordReader::<LabeledTextRecord>::open(&path).unwrap().read_all().unwrap();
        assert_eq!(rows[0].labels, vec!["hate"]);
        assert!(rows[1].labels.is_empty());
    }
}
