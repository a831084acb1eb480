//! The workbench's SQLite database: its settings, the items, who was shown what (with the
//! letter order a ranking was shown in), and every decision. WAL with `synchronous = FULL`:
//! a decision is on disk when its commit returns, before the answer is acknowledged.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::Task;
use super::answer::Answer;
use super::items::{Content, Item};
use crate::error::{Error, Result, bad_input, failed, usage};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    content TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    shown TEXT NOT NULL,
    PRIMARY KEY (item, annotator)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    skipped INTEGER NOT NULL,
    score REAL,
    ranking TEXT,
    ranks TEXT,
    labels TEXT,
    comment TEXT,
    shown TEXT NOT NULL,
    decided_at TEXT NOT NULL,
    UNIQUE (item, annotator)
);
CREATE INDEX IF NOT EXISTS decisions_by_annotator ON decisions(annotator, id);
";

/// What a database was started with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub task: Task,
    /// `score`: `LOW-HIGH`.
    pub scale: String,
    /// `label`: the categories.
    pub labels: Vec<String>,
    /// Different annotators each item is shown to.
    pub overlap: usize,
}

/// One decision as stored: an answer, or a skip (`answer: None`).
#[derive(Clone, Debug, PartialEq)]
pub struct Decided {
    pub id: i64,
    pub item: i64,
    pub annotator: String,
    pub answer: Option<Answer>,
    pub comment: Option<String>,
    /// Samples in the letter order the annotator saw (rank).
    pub shown: Vec<i32>,
    pub decided_at: String,
}

/// An item shown to an annotator and not yet decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Assigned {
    pub item: i64,
    pub annotator: String,
    /// Unix seconds.
    pub at: f64,
    pub shown: Vec<i32>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    failed(format!("{}: {e}", path.display()))
}

pub fn now_text() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

impl Store {
    /// Open (creating, readable by its owner only) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(bad_input(path, "its folder does not exist"));
            }
        }
        let created = !path.exists();
        let conn = Connection::open(path).map_err(|e| bad_input(path, format!("cannot open the annotation database: {e}")))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(SCHEMA)
        };
        setup().map_err(|e| bad_input(path, format!("not a usable annotation database: {e}")))?;
        #[cfg(unix)]
        if created {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(Store { conn, path: path.to_path_buf() })
    }

    /// Open a database `annotate serve` made (export, stats).
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(bad_input(path, "no such annotation database (annotate serve --db creates it)"));
        }
        let store = Self::open(path)?;
        if store.settings()?.is_none() {
            return Err(bad_input(path, "holds no items (annotate serve ITEMS... --db fills it)"));
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, e: rusqlite::Error) -> Error {
        db_error(&self.path, e)
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        self.conn.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0)).optional().map_err(|e| self.error(e))
    }

    pub fn settings(&self) -> Result<Option<Settings>> {
        let Some(text) = self.setting("settings")? else { return Ok(None) };
        serde_json::from_str(&text).map(Some).map_err(|e| bad_input(&self.path, format!("settings: {e}")))
    }

    /// Start an empty database with `settings` and `items`, or check that a started one holds
    /// the same items and task (the overlap may change between runs).
    pub fn prepare(&mut self, settings: &Settings, items: Option<&[Item]>) -> Result<Settings> {
        let fingerprint = items.map(items_fingerprint).transpose()?;
        match self.settings()? {
            None => {
                let items = items.ok_or_else(|| usage(format!("{}: a new database needs the ITEMS to annotate", self.path.display())))?;
                let path = self.path.clone();
                let tx = self.conn.transaction().map_err(|e| db_error(&path, e))?;
                let write = |tx: &Transaction| -> rusqlite::Result<()> {
                    for (i, item) in items.iter().enumerate() {
                        let content = serde_json::to_string(&item.content).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                        tx.execute("INSERT INTO items (id, key, content) VALUES (?1, ?2, ?3)", params![i as i64 + 1, item.key, content])?;
                    }
                    let text = serde_json::to_string(settings).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                    tx.execute("INSERT INTO settings (key, value) VALUES ('settings', ?1)", params![text])?;
                    tx.execute("INSERT INTO settings (key, value) VALUES ('items', ?1)", params![fingerprint])?;
                    Ok(())
                };
                write(&tx).map_err(|e| db_error(&path, e))?;
                tx.commit().map_err(|e| db_error(&path, e))?;
                Ok(settings.clone())
            }
            Some(stored) => {
                let refuse = |what: String| usage(format!("{}: {what}; give the same, or another --db", self.path.display()));
                if stored.task != settings.task {
                    return Err(refuse(format!("this database holds a {} task, not {}", stored.task.name(), settings.task.name())));
                }
                if stored.task == Task::Score && stored.scale != settings.scale {
                    return Err(refuse(format!("this database was started with --scale {}, not {}", stored.scale, settings.scale)));
                }
                if stored.task == Task::Label && !settings.labels.is_empty() && stored.labels != settings.labels {
                    return Err(refuse(format!("this database was started with --labels {}, not {}", stored.labels.join(","), settings.labels.join(","))));
                }
                if let Some(fingerprint) = fingerprint {
                    if self.setting("items")?.as_deref() != Some(fingerprint.as_str()) {
                        return Err(refuse("this database holds other items than ITEMS".to_string()));
                    }
                }
                let updated = Settings { overlap: settings.overlap, ..stored };
                let text = serde_json::to_string(&updated)?;
                self.conn.execute("UPDATE settings SET value = ?1 WHERE key = 'settings'", params![text]).map_err(|e| self.error(e))?;
                Ok(updated)
            }
        }
    }

    /// Every item, by id (1, 2, …).
    pub fn items(&self) -> Result<Vec<(i64, Item)>> {
        let mut statement = self.conn.prepare("SELECT id, key, content FROM items ORDER BY id").map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(|e| self.error(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.error(e))?;
        rows.into_iter()
            .map(|(id, key, content)| {
                let content: Content = serde_json::from_str(&content).map_err(|e| bad_input(&self.path, format!("item {id}: {e}")))?;
                Ok((id, Item { key, content }))
            })
            .collect()
    }

    /// Every decision standing, in the order made.
    pub fn decisions(&self) -> Result<Vec<Decided>> {
        let mut statement = self
            .conn
            .prepare("SELECT id, item, annotator, skipped, score, ranking, ranks, labels, comment, shown, decided_at FROM decisions ORDER BY id")
            .map_err(|e| self.error(e))?;
        let rows = statement.query_map([], read_decided).map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.error(e))
    }

    pub fn assignments(&self) -> Result<Vec<Assigned>> {
        let mut statement = self.conn.prepare("SELECT item, annotator, assigned_at, shown FROM assignments ORDER BY assigned_at").map_err(|e| self.error(e))?;
        let rows = statement
            .query_map([], |r| {
                let shown: String = r.get(3)?;
                Ok(Assigned { item: r.get(0)?, annotator: r.get(1)?, at: r.get(2)?, shown: serde_json::from_str(&shown).unwrap_or_default() })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.error(e))
    }

    /// Record an item shown. Not synced on its own (`synchronous = NORMAL` for this commit):
    /// it survives the process being killed, and only a power cut before the next synced
    /// commit could lose it, which would merely show the item afresh. Answers stay FULL.
    pub fn assign(&self, assigned: &Assigned) -> Result<()> {
        let shown = serde_json::to_string(&assigned.shown)?;
        let write = || -> rusqlite::Result<()> {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
            let inserted = self.conn.execute(
                "INSERT OR REPLACE INTO assignments (item, annotator, assigned_at, shown) VALUES (?1, ?2, ?3, ?4)",
                params![assigned.item, assigned.annotator, assigned.at, shown],
            );
            self.conn.pragma_update(None, "synchronous", "FULL")?;
            inserted.map(|_| ())
        };
        write().map_err(|e| self.error(e))
    }

    pub fn unassign(&self, item: i64, annotator: &str) -> Result<()> {
        self.conn.execute("DELETE FROM assignments WHERE item = ?1 AND annotator = ?2", params![item, annotator]).map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Record a decision and end its assignment, in one commit; returns the decision's id.
    pub fn decide(&mut self, item: i64, annotator: &str, answer: Option<&Answer>, comment: Option<&str>, shown: &[i32]) -> Result<i64> {
        let (score, ranking, ranks, labels) = match answer {
            Some(Answer::Score(s)) => (Some(*s), None, None, None),
            Some(Answer::Rank { ranking, order }) => (None, Some(ranking.clone()), Some(serde_json::to_string(order)?), None),
            Some(Answer::Label(labels)) => (None, None, None, Some(serde_json::to_string(labels)?)),
            None => (None, None, None, None),
        };
        let shown = serde_json::to_string(shown)?;
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| db_error(&path, e))?;
        let id = (|| -> rusqlite::Result<i64> {
            tx.execute(
                "INSERT INTO decisions (item, annotator, skipped, score, ranking, ranks, labels, comment, shown, decided_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![item, annotator, answer.is_none(), score, ranking, ranks, labels, comment, shown, now_text()],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute("DELETE FROM assignments WHERE item = ?1 AND annotator = ?2", params![item, annotator])?;
            Ok(id)
        })()
        .map_err(|e| db_error(&path, e))?;
        tx.commit().map_err(|e| db_error(&path, e))?;
        Ok(id)
    }

    /// The annotator's latest decision still standing.
    pub fn latest(&self, annotator: &str) -> Result<Option<Decided>> {
        self.conn
            .query_row(
                "SELECT id, item, annotator, skipped, score, ranking, ranks, labels, comment, shown, decided_at FROM decisions WHERE annotator = ?1 ORDER BY id DESC LIMIT 1",
                params![annotator],
                read_decided,
            )
            .optional()
            .map_err(|e| self.error(e))
    }

    /// Take back decision `decided` and give its item back to the annotator (as shown before),
    /// in one commit; the annotator's other assignment, if any, is let go.
    pub fn undo(&mut self, decided: &Decided, at: f64) -> Result<()> {
        let shown = serde_json::to_string(&decided.shown)?;
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| db_error(&path, e))?;
        (|| -> rusqlite::Result<()> {
            tx.execute("DELETE FROM decisions WHERE id = ?1", params![decided.id])?;
            tx.execute("DELETE FROM assignments WHERE annotator = ?1", params![decided.annotator])?;
            tx.execute("INSERT INTO assignments (item, annotator, assigned_at, shown) VALUES (?1, ?2, ?3, ?4)", params![decided.item, decided.annotator, at, shown])?;
            Ok(())
        })()
        .map_err(|e| db_error(&path, e))?;
        tx.commit().map_err(|e| db_error(&path, e))
    }
}

fn read_decided(r: &rusqlite::Row) -> rusqlite::Result<Decided> {
    let skipped: bool = r.get(3)?;
    let score: Option<f64> = r.get(4)?;
    let ranking: Option<String> = r.get(5)?;
    let ranks: Option<String> = r.get(6)?;
    let labels: Option<String> = r.get(7)?;
    let shown: String = r.get(9)?;
    let answer = match (skipped, score, ranking, labels) {
        (true, ..) => None,
        (false, Some(score), _, _) => Some(Answer::Score(score)),
        (false, None, Some(ranking), _) => Some(Answer::Rank { ranking, order: ranks.and_then(|o| serde_json::from_str(&o).ok()).unwrap_or_default() }),
        (false, None, None, labels) => Some(Answer::Label(labels.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default())),
    };
    Ok(Decided {
        id: r.get(0)?,
        item: r.get(1)?,
        annotator: r.get(2)?,
        answer,
        comment: r.get(8)?,
        shown: serde_json::from_str(&shown).unwrap_or_default(),
        decided_at: r.get(10)?,
    })
}

/// A fingerprint of items' keys and contents, in order.
fn items_fingerprint(items: &[Item]) -> Result<String> {
    let mut texts = Vec::with_capacity(items.len() * 2);
    for item in items {
        texts.push(item.key.clone());
        texts.push(serde_json::to_string(&item.content)?);
    }
    Ok(crate::human::session::fingerprint(texts.iter().map(String::as_str)))
}
