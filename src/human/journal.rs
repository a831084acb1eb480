//! The answers journal: every decision a person makes, one JSON line each, appended and synced
//! to disk before the next item is shown. Ctrl-C, SIGKILL or a crash lose nothing, and the
//! next run replays the lines to continue where the last one stopped.
//!
//! ```text
//! {"event":"session","task":"score","annotator":"ana","scale":"1-7","input":"responses.parquet","items":12,"time":"…"}
//! {"event":"answer","prompt_id":"romeo","sample":0,"score":5.0,"shown":"9f2c…","time":"…"}
//! {"event":"skip","prompt_id":"romeo","sample":1,"shown":"41be…","time":"…"}
//! {"event":"undo","prompt_id":"romeo","sample":1,"time":"…"}
//! ```
//!
//! Replaying: an answer or skip decides its item (a later one replaces an earlier one), an
//! undo takes back the latest decision still standing, across runs as within one. `shown`
//! fingerprints the text the person judged, so answers are never applied to responses that
//! were regenerated under the same `prompt_id` and `sample`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ItemKey;
use crate::error::{Result, bad_input};
use crate::progress;

/// What a journal was started with; a run that continues it must agree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `score` or `rank`.
    pub task: String,
    pub annotator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event<A> {
    /// A run began.
    Session {
        #[serde(flatten)]
        settings: Settings,
        input: String,
        items: usize,
        time: String,
    },
    Answer {
        #[serde(flatten)]
        item: ItemKey,
        #[serde(flatten)]
        answer: A,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shown: Option<String>,
        time: String,
    },
    Skip {
        #[serde(flatten)]
        item: ItemKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shown: Option<String>,
        time: String,
    },
    /// Takes back the decision on `item` (the latest one standing).
    Undo {
        #[serde(flatten)]
        item: ItemKey,
        time: String,
    },
}

/// The decisions standing, each an answer or a skip (`None`), in the order they were made.
#[derive(Debug)]
pub struct Decisions<A> {
    by_item: HashMap<ItemKey, Option<A>>,
    order: Vec<ItemKey>,
}

impl<A> Default for Decisions<A> {
    fn default() -> Self {
        Decisions { by_item: HashMap::new(), order: Vec::new() }
    }
}

impl<A> Decisions<A> {
    pub fn record(&mut self, item: ItemKey, decision: Option<A>) {
        if self.by_item.insert(item.clone(), decision).is_some() {
            self.order.retain(|k| k != &item);
        }
        self.order.push(item);
    }

    /// Take back the latest decision; returns its item.
    pub fn undo(&mut self) -> Option<ItemKey> {
        let item = self.order.pop()?;
        self.by_item.remove(&item);
        Some(item)
    }

    /// `None`: undecided; `Some(None)`: skipped; `Some(Some(answer))`: answered.
    pub fn get(&self, item: &ItemKey) -> Option<Option<&A>> {
        self.by_item.get(item).map(Option::as_ref)
    }

    pub fn is_decided(&self, item: &ItemKey) -> bool {
        self.by_item.contains_key(item)
    }

    pub fn answered(&self) -> usize {
        self.by_item.values().filter(|d| d.is_some()).count()
    }

    pub fn skipped(&self) -> usize {
        self.by_item.values().filter(|d| d.is_none()).count()
    }

    pub fn decided(&self) -> usize {
        self.order.len()
    }
}

/// An open journal, appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Open (or start) the journal at `path`, replay its decisions and record this run.
    /// `check` says why a journaled decision (item, answer or skip, fingerprint of what was
    /// shown) does not fit the data (an unknown item, changed text, an answer the item cannot
    /// have), which means the journal belongs to other data.
    pub fn open<A: Serialize + DeserializeOwned>(
        path: &Path,
        settings: &Settings,
        input: &str,
        items: usize,
        check: impl Fn(&ItemKey, Option<&A>, Option<&str>) -> std::result::Result<(), String>,
    ) -> Result<(Journal, Decisions<A>)> {
        let created = !path.exists();
        let text = read_whole_lines(path)?;
        let mut decisions = Decisions::default();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = |what: String| bad_input(path, format!("line {}: {what}", i + 1));
            let event: Event<A> = serde_json::from_str(line).map_err(|e| at(format!("not a journal entry ({e})")))?;
            match event {
                Event::Session { settings: started, .. } => {
                    if let Some(what) = settings_differ(&started, settings) {
                        return Err(at(format!("{what}; continue with the same settings, or give another -o or --journal")));
                    }
                }
                Event::Answer { item, answer, shown, .. } => {
                    check(&item, Some(&answer), shown.as_deref()).map_err(|e| at(format!("{e}; this journal belongs to other data")))?;
                    decisions.record(item, Some(answer));
                }
                Event::Skip { item, shown, .. } => {
                    check(&item, None, shown.as_deref()).map_err(|e| at(format!("{e}; this journal belongs to other data")))?;
                    decisions.record(item, None);
                }
                Event::Undo { .. } => {
                    decisions.undo();
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| bad_input(path, format!("cannot write the journal: {e}")))?;
        if created {
            sync_parent(path)?;
        }
        let mut journal = Journal { file, path: path.to_path_buf() };
        journal.append(&Event::<A>::Session { settings: settings.clone(), input: input.to_string(), items, time: now() })?;
        Ok((journal, decisions))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `shown`: the fingerprint of what the person saw.
    pub fn answer<A: Serialize>(&mut self, item: &ItemKey, answer: &A, shown: &str) -> Result<()> {
        self.append(&Event::Answer { item: item.clone(), answer, shown: Some(shown.to_string()), time: now() })
    }

    pub fn skip(&mut self, item: &ItemKey, shown: &str) -> Result<()> {
        self.append(&Event::<()>::Skip { item: item.clone(), shown: Some(shown.to_string()), time: now() })
    }

    pub fn undo(&mut self, item: &ItemKey) -> Result<()> {
        self.append(&Event::<()>::Undo { item: item.clone(), time: now() })
    }

    /// One line in one write, on disk before returning.
    fn append<A: Serialize>(&mut self, event: &Event<A>) -> Result<()> {
        let mut line = serde_json::to_string(event)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        Ok(())
    }
}

/// The journal's text up to its last newline. A line without one was being written when the
/// last run was killed; it is cut off so the next entry starts on a line of its own.
fn read_whole_lines(path: &Path) -> Result<String> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => file.read_to_end(&mut bytes).map_err(|e| bad_input(path, format!("cannot read the journal: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(bad_input(path, format!("cannot read the journal: {e}"))),
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        progress::warn(format!("note: {}: dropping an unfinished last line (the previous run stopped while writing it)", path.display()));
        OpenOptions::new().write(true).open(path)?.set_len(whole as u64)?;
        bytes.truncate(whole);
    }
    String::from_utf8(bytes).map_err(|_| bad_input(path, "not UTF-8 text, expected a JSON-lines journal"))
}

fn settings_differ(started: &Settings, now: &Settings) -> Option<String> {
    if started.task != now.task {
        return Some(format!("this journal holds `{}` answers, not `{}` answers", started.task, now.task));
    }
    if started.annotator != now.annotator {
        return Some(format!("this journal is {}'s, not {}'s (--annotator)", started.annotator, now.annotator));
    }
    if started.scale != now.scale {
        let scale = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
        return Some(format!("this journal was started with --scale {}, not {}", scale(&started.scale), scale(&now.scale)));
    }
    None
}

/// A new file's name is durable only once its folder is synced.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()?;
    Ok(())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Score {
        score: f64,
    }

    fn settings(annotator: &str) -> Settings {
        Settings { task: "score".into(), annotator: annotator.into(), scale: Some("1-7".into()) }
    }

    fn open(path: &Path, annotator: &str) -> Result<(Journal, Decisions<Score>)> {
        Journal::open(path, &settings(annotator), "in.parquet", 3, |item, _, shown| match (item.prompt_id.as_str(), shown) {
            ("gone", _) => Err(format!("{item} is not in the data")),
            (_, Some("old")) => Err(format!("{item} changed")),
            _ => Ok(()),
        })
    }

    #[test]
    fn replay_restores_answers_skips_and_undos_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (a, b, c) = (ItemKey::response("p", 0), ItemKey::response("p", 1), ItemKey::response("q", 0));
        {
            let (mut journal, decisions) = open(&path, "ana").unwrap();
            assert_eq!(decisions.decided(), 0);
            journal.answer(&a, &Score { score: 5.0 }, "x").unwrap();
            journal.skip(&b, "x").unwrap();
            journal.answer(&c, &Score { score: 2.0 }, "x").unwrap();
        }
        let (mut journal, mut decisions) = open(&path, "ana").unwrap();
        assert_eq!((decisions.answered(), decisions.skipped()), (2, 1));
        // An undo in the second run takes back the last decision of the first.
        let undone = decisions.undo().unwrap();
        assert_eq!(undone, c);
        journal.undo(&undone).unwrap();
        journal.answer(&b, &Score { score: 7.0 }, "x").unwrap();
        drop(journal);
        let (_, decisions) = open(&path, "ana").unwrap();
        assert_eq!(decisions.get(&a), Some(Some(&Score { score: 5.0 })));
        assert_eq!(decisions.get(&b), Some(Some(&Score { score: 7.0 })), "a later decision replaces an earlier one");
        assert_eq!(decisions.get(&c), None);
        assert_eq!(decisions.decided(), 2);
    }

    #[test]
    fn an_unfinished_last_line_is_dropped_and_the_journal_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        drop(open(&path, "ana").unwrap());
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"event\":\"answer\",\"prompt_id\":\"p\",\"sam").unwrap();
        let (mut journal, decisions) = open(&path, "ana").unwrap();
        assert_eq!(decisions.decided(), 0);
        journal.skip(&ItemKey::response("p", 0), "x").unwrap();
        let (_, decisions) = open(&path, "ana").unwrap();
        assert_eq!(decisions.skipped(), 1);
    }

    #[test]
    fn other_settings_or_other_data_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        drop(open(&path, "ana").unwrap());
        let e = open(&path, "bo").unwrap_err();
        assert!(e.to_string().contains("line 1: this journal is ana's, not bo's"), "{e}");
        let (mut journal, _) = open(&path, "ana").unwrap();
        journal.answer(&ItemKey::response("gone", 0), &Score { score: 1.0 }, "x").unwrap();
        let e = open(&path, "ana").unwrap_err();
        assert!(e.to_string().contains("line 3: gone/0 is not in the data; this journal belongs to other data"), "{e}");
        std::fs::write(&path, "").unwrap();
        let (mut journal, _) = open(&path, "ana").unwrap();
        journal.skip(&ItemKey::response("p", 0), "old").unwrap();
        let e = open(&path, "ana").unwrap_err();
        assert!(e.to_string().contains("line 2: p/0 changed"), "{e}");
        std::fs::write(&path, "not json\n").unwrap();
        assert_eq!(open(&path, "ana").unwrap_err().exit_code(), 2);
    }
}
