//! One judging session: show an item on standard error, read a line, journal the decision,
//! show the next undecided item, until every item is decided or the person stops.
//!
//! Answers are lines, so a person at a terminal and a script (`--keys FILE`, a pipe) drive
//! the same loop. Every line is a judgement for the item shown, or `s` (skip), `u` (undo the
//! latest decision, also one made in an earlier run) or `q` (quit; the journal keeps all).

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::ItemKey;
use super::journal::{Decisions, Journal, Settings};
use crate::error::{Error, Result, bad_input, usage};
use crate::progress;

/// What a person judges, one item at a time.
pub trait Judgement {
    type Answer: Serialize + DeserializeOwned;
    /// `response` or `prompt`.
    const NOUN: &'static str;
    /// The items, in the order they are shown.
    fn items(&self) -> &[ItemKey];
    /// Item `index` as the person sees it.
    fn show(&self, index: usize) -> String;
    /// A fingerprint of the text judged for item `index` (see [`fingerprint`]).
    fn shown(&self, index: usize) -> String;
    /// What to type for item `index`, e.g. `1-7 score`.
    fn ask(&self, index: usize) -> String;
    /// A typed line as an answer for item `index`, or what was expected.
    fn parse(&self, index: usize, typed: &str) -> std::result::Result<Self::Answer, String>;
    /// Whether a journaled answer still fits item `index`.
    fn fits(&self, index: usize, answer: &Self::Answer) -> std::result::Result<(), String>;
}

/// Where answers come from, one per line.
pub struct Answers {
    lines: Box<dyn BufRead>,
    name: String,
    /// A person types: a bad line is asked again, not refused.
    interactive: bool,
    line: usize,
}

impl Answers {
    /// `--keys FILE` when given, else the terminal when standard input carries the data, else
    /// standard input.
    pub fn open(keys: Option<&Path>, data_on_stdin: bool) -> Result<Self> {
        if let Some(path) = keys {
            let file = File::open(path).map_err(|e| bad_input(path, format!("cannot read the answers: {e}")))?;
            let interactive = file.is_terminal();
            return Ok(Answers { lines: Box::new(BufReader::new(file)), name: path.display().to_string(), interactive, line: 0 });
        }
        if data_on_stdin {
            let tty = File::open("/dev/tty").map_err(|_| {
                usage("the responses come on standard input and there is no terminal to answer at: give --keys FILE")
            })?;
            return Ok(Answers { lines: Box::new(BufReader::new(tty)), name: "/dev/tty".into(), interactive: true, line: 0 });
        }
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        Ok(Answers { lines: Box::new(BufReader::new(stdin)), name: "<stdin>".into(), interactive, line: 0 })
    }

    /// The next line, trimmed; `None` at the end.
    fn next(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        let read = self.lines.read_line(&mut line).map_err(|e| bad_input(&self.name, format!("cannot read answers: {e}")))?;
        self.line += 1;
        Ok((read > 0).then(|| line.trim().to_string()))
    }
}

/// A typed line.
enum Command<'a> {
    Skip,
    Undo,
    Quit,
    Judge(&'a str),
}

fn command(line: &str) -> Command<'_> {
    match line {
        "s" | "S" => Command::Skip,
        "u" | "U" => Command::Undo,
        "q" | "Q" => Command::Quit,
        other => Command::Judge(other),
    }
}

pub struct SessionOptions {
    pub journal: PathBuf,
    pub settings: Settings,
    /// The data's name, recorded in the journal.
    pub input: String,
    pub answers: Answers,
    /// Hide the screen when a script answers and `--quiet` was given.
    pub quiet: bool,
}

/// Run a session to the end: every item decided. Quitting (`q`, or the end of the answers)
/// returns [`Error::Interrupted`] once the person is told how far they got.
pub fn run<J: Judgement>(judgement: &J, options: SessionOptions) -> Result<Decisions<J::Answer>> {
    let items = judgement.items();
    let index_of: std::collections::HashMap<&ItemKey, usize> = items.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let (mut journal, mut decisions) = Journal::open(&options.journal, &options.settings, &options.input, items.len(), |item, answer, shown| {
        let index = *index_of.get(item).ok_or_else(|| format!("{} {item} is not in {}", J::NOUN, options.input))?;
        if shown.is_some_and(|shown| shown != judgement.shown(index)) {
            return Err(format!("the text of {} {item} is not the text that was judged", J::NOUN));
        }
        answer.map_or(Ok(()), |a| judgement.fits(index, a))
    })?;
    if decisions.decided() > 0 {
        progress::log(format!(
            "continuing {}: {} of {} {}s decided ({} answered, {} skipped)",
            options.journal.display(),
            decisions.decided(),
            items.len(),
            J::NOUN,
            decisions.answered(),
            decisions.skipped()
        ));
    }
    let mut answers = options.answers;
    let show = answers.interactive || !options.quiet;
    let clear = answers.interactive && std::io::stderr().is_terminal();
    let mut notice: Option<String> = None;
    loop {
        let Some(index) = items.iter().position(|k| !decisions.is_decided(k)) else { return Ok(decisions) };
        let item = &items[index];
        if show {
            screen(judgement, index, &decisions, notice.take(), clear);
        }
        let Some(line) = answers.next()? else { return Err(stopped(&journal, &decisions, items.len(), J::NOUN)) };
        if show && !answers.interactive {
            // A script's answer is not echoed by a terminal: show it, so the screen reads as a transcript.
            crate::progress::line(&line);
        }
        match command(&line) {
            Command::Quit => return Err(stopped(&journal, &decisions, items.len(), J::NOUN)),
            Command::Skip => {
                journal.skip(item, &judgement.shown(index))?;
                decisions.record(item.clone(), None);
            }
            Command::Undo => match decisions.undo() {
                Some(undone) => {
                    journal.undo(&undone)?;
                    notice = Some(format!("took back the decision on {undone}"));
                }
                None => notice = Some("nothing to undo".into()),
            },
            Command::Judge(typed) => match judgement.parse(index, typed) {
                Ok(answer) => {
                    journal.answer(item, &answer, &judgement.shown(index))?;
                    decisions.record(item.clone(), Some(answer));
                }
                Err(expected) if answers.interactive => notice = Some(format!("`{typed}`: {expected}")),
                Err(expected) => {
                    return Err(bad_input(&answers.name, format!("line {}: `{typed}`: {expected}, or s, u, q", answers.line)));
                }
            },
        }
    }
}

fn screen<J: Judgement>(judgement: &J, index: usize, decisions: &Decisions<J::Answer>, notice: Option<String>, clear: bool) {
    let total = judgement.items().len();
    let mut text = String::new();
    text.push_str(if clear { "\x1b[2J\x1b[H" } else { "\n" });
    text.push_str(&format!(
        "── {} {} of {} · {} answered, {} skipped ──\n",
        J::NOUN,
        index + 1,
        total,
        decisions.answered(),
        decisions.skipped()
    ));
    text.push_str(&judgement.show(index));
    if let Some(notice) = notice {
        text.push_str(&format!("\n({notice})"));
    }
    text.push_str(&format!("\n{} · s skip · u undo · q quit > ", judgement.ask(index)));
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
}

/// A short fingerprint of texts: the first 16 hex digits of the SHA-256 of them, each ended by a NUL.
pub fn fingerprint<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut hasher = Sha256::new();
    for text in texts {
        hasher.update(text.as_bytes());
        hasher.update([0u8]);
    }
    hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The person stopped before the end: say how far they got and how to continue.
fn stopped<A>(journal: &Journal, decisions: &Decisions<A>, total: usize, noun: &str) -> Error {
    progress::warn(format!(
        "\n{} of {total} {noun}s decided ({} answered, {} skipped), kept in {}; run the same command again to continue",
        decisions.decided(),
        decisions.answered(),
        decisions.skipped(),
        journal.path().display()
    ));
    Error::Interrupted
}

/// Who judges, where the answers come from and where they are journaled.
pub struct Annotation {
    pub annotator: String,
    pub journal: PathBuf,
    /// Answers from this file, one per line, instead of the terminal or standard input.
    pub keys: Option<PathBuf>,
    pub quiet: bool,
}

impl Annotation {
    /// From the flags: `--annotator` (else `$USER`), `--journal` (else beside `-o`), `--keys`.
    pub fn new(annotator: Option<&str>, journal: Option<&Path>, output: &Path, keys: Option<&Path>, quiet: bool) -> Result<Self> {
        Ok(Annotation {
            annotator: super::annotator_name(annotator)?,
            journal: journal_path(journal, output)?,
            keys: keys.map(Path::to_path_buf),
            quiet,
        })
    }

    /// The session for judging `input` in `task` (`score`, `rank`).
    pub fn session(&self, task: &str, scale: Option<String>, input: &Path) -> Result<SessionOptions> {
        Ok(SessionOptions {
            journal: self.journal.clone(),
            settings: Settings { task: task.into(), annotator: self.annotator.clone(), scale },
            input: input.display().to_string(),
            answers: Answers::open(self.keys.as_deref(), crate::output::is_stdio(input))?,
            quiet: self.quiet,
        })
    }
}

/// The journal beside `output` (`scored.parquet` → `scored.parquet.journal.jsonl`), or `given`.
fn journal_path(given: Option<&Path>, output: &Path) -> Result<PathBuf> {
    match given {
        Some(path) => {
            crate::output::check_writable(path)?;
            Ok(path.to_path_buf())
        }
        None if crate::output::is_stdio(output) => Err(usage("with -o - the answers journal needs a place: give --journal FILE")),
        None => {
            let mut name = output.as_os_str().to_owned();
            name.push(".journal.jsonl");
            Ok(PathBuf::from(name))
        }
    }
}
