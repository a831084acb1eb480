//! What `dpo` trains on: preference pairs (SPEC's text layout or TRL's conversational one) and,
//! for KTO, unpaired judged answers (TRL's `prompt`/`completion`/`label`), each turned into token
//! ids of a prompt and its answers. Answers are found as `sft` finds them (the model's chat
//! template, the text the answer adds after the prompt); a prompt is the part chosen and
//! rejected share, as TRL takes it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::records::{ChatPreferenceRecord, PreferenceRecord, RecordReader, UnpairedRecord};
use crate::data::{ColumnType, Message, ParquetSource};
use crate::error::{Result, bad_input, usage};
use crate::progress;
use crate::sft::{Example, Marked, Renderer};
use crate::tokenizer::LoadedTokenizer;

/// TRL unpairs a preference dataset `map`-batch by `map`-batch (1,000 rows): each batch's chosen
/// answers, then its rejected ones.
const UNPAIR_BATCH: usize = 1000;

/// A prompt and two answers to it as token ids (the prompt cut to `--max-prompt-length`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A prompt and one answer judged desirable or not (KTO).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Judged {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub desirable: bool,
}

/// Lengths and what the length policy and the checks did, reported before training.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DataReport {
    pub rows: usize,
    /// Pairs or rows with an empty answer (or prompt and answer missing), left out.
    pub empty: usize,
    /// Pairs whose chosen and rejected answers are the same, left out.
    pub identical: usize,
    /// Prompts cut from the left to `--max-prompt-length`.
    pub prompts_truncated: usize,
    /// Answers cut at the end to fit `--max-length`.
    pub answers_truncated: usize,
    /// Examples whose prompt alone fills `--max-length`, left out (TRL drops them too).
    pub prompt_fills_max_length: usize,
    pub kept: usize,
    pub desirable: usize,
    pub undesirable: usize,
}

impl DataReport {
    /// One line of what was left out or cut; warnings for what matters.
    pub fn log(&self, what: &str, max_length: usize, max_prompt_length: Option<usize>) {
        if self.empty + self.identical > 0 {
            progress::warn(format!(
                "dpo: {what}: left out {} with an empty answer and {} whose chosen and rejected answers are identical",
                self.empty, self.identical
            ));
        }
        if self.prompt_fills_max_length > 0 {
            progress::warn(format!(
                "dpo: {what}: left out {} whose prompt alone fills --max-length {max_length}{}",
                self.prompt_fills_max_length,
                if max_prompt_length.is_none() { " (--max-prompt-length N keeps the last N prompt tokens)" } else { "" }
            ));
        }
        if self.prompts_truncated > 0 {
            progress::warn(format!(
                "dpo: {what}: {} prompts cut from the left to --max-prompt-length {}",
                self.prompts_truncated,
                max_prompt_length.unwrap_or(0)
            ));
        }
        if self.answers_truncated > 0 {
            progress::warn(format!("dpo: {what}: {} answers cut at the end to fit --max-length {max_length}", self.answers_truncated));
        }
    }
}

/// How prompts and answers become tokens and how long they may be.
pub struct Encoder<'a> {
    pub renderer: &'a Renderer,
    pub tokenizer: &'a LoadedTokenizer,
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
}

/// Pairs (for the paired losses) or judged answers (KTO).
#[derive(Clone, Debug, PartialEq)]
pub enum Examples {
    Pairs(Vec<Pair>),
    Judged(Vec<Judged>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Pairs(p) => p.len(),
            Examples::Judged(j) => j.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The layouts a file can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    TextPairs,
    ChatPairs,
    TextUnpaired,
    ChatUnpaired,
}

fn layout(source: &ParquetSource, unpaired_allowed: bool) -> Result<Layout> {
    let type_of = |name: &str| source.schema().field_with_name(name).ok().map(|f| f.data_type().clone());
    if let (Some(chosen), Some(_)) = (type_of("chosen"), type_of("rejected")) {
        return Ok(if ColumnType::Messages.accepts(&chosen) { Layout::ChatPairs } else { Layout::TextPairs });
    }
    if let Some(completion) = type_of("completion") {
        if !unpaired_allowed {
            return Err(bad_input(
                source.path(),
                "holds unpaired rows (prompt, completion, label); this loss needs pairs (prompt, chosen, rejected): use --loss kto for unpaired data",
            ));
        }
        if !source.has_column("label") {
            return Err(bad_input(
                source.path(),
                format!("--loss kto: no column `label` (boolean: is the completion desirable?) beside `completion`; columns: {}", source.column_names()),
            ));
        }
        return Ok(if ColumnType::Messages.accepts(&completion) { Layout::ChatUnpaired } else { Layout::TextUnpaired });
    }
    Err(bad_input(
        source.path(),
        format!(
            "expected preference pairs (`prompt`, `chosen`, `rejected`){}; columns: {}",
            if unpaired_allowed { " or unpaired rows (`prompt`, `completion`, `label`)" } else { "" },
            source.column_names()
        ),
    ))
}

/// A row before tokenization: its prompt and answers as text or as chat turns.
enum Row<T> {
    Pair { prompt: T, chosen: T, rejected: T },
    Judged { prompt: T, completion: T, desirable: bool },
}

/// What the files held: pairs, and judged answers (KTO's unpaired rows).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub pairs: Vec<Pair>,
    pub judged: Vec<Judged>,
}

impl Loaded {
    pub fn len(&self) -> usize {
        self.pairs.len() + self.judged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last `fraction` of the pairs and of the judged answers, removed (held out); pairs
    /// are held out whole, so KTO sees both answers of a held-out pair.
    pub fn hold_out(&mut self, fraction: f64) -> Loaded {
        let tail = |n: usize| if n < 2 { 0 } else { crate::train::held_out_count(n, fraction) };
        let (pairs, judged) = (tail(self.pairs.len()), tail(self.judged.len()));
        Loaded {
            pairs: self.pairs.split_off(self.pairs.len() - pairs),
            judged: self.judged.split_off(self.judged.len() - judged),
        }
    }

    /// Pairs for the paired losses; for KTO every answer, pairs split as TRL splits them.
    pub fn into_examples(self, unpaired: bool) -> Examples {
        if !unpaired {
            return Examples::Pairs(self.pairs);
        }
        let mut judged = unpair(&self.pairs);
        judged.extend(self.judged);
        Examples::Judged(judged)
    }
}

/// Read and encode every file; unpaired rows only when `unpaired` (KTO).
pub fn read(paths: &[PathBuf], encoder: &Encoder, unpaired: bool) -> Result<(Loaded, DataReport)> {
    let mut report = DataReport::default();
    let mut loaded = Loaded::default();
    for path in paths {
        let source = ParquetSource::open(path)?;
        let layout = layout(&source, unpaired)?;
        let has_prompt = source.has_column("prompt");
        let (pairs, judged) = match layout {
            Layout::TextPairs => {
                let rows = RecordReader::<PreferenceRecord>::from_source(source, Default::default())?.read_all()?;
                let rows = rows.into_iter().map(|r| text_pair(r, has_prompt)).collect();
                encode_rows(rows, path, encoder, &mut report, |e, p, a| e.text(p, a))?
            }
            Layout::ChatPairs => {
                let rows = RecordReader::<ChatPreferenceRecord>::from_source(source, Default::default())?.read_all()?;
                let rows = rows.into_iter().map(chat_pair).collect();
                encode_rows(rows, path, encoder, &mut report, |e, p, a| e.chat(p, a))?
            }
            Layout::TextUnpaired => {
                let rows = RecordReader::<UnpairedRecord<String>>::from_source(source, Default::default())?.read_all()?;
                let rows = rows.into_iter().map(judged_row).collect();
                encode_rows(rows, path, encoder, &mut report, |e, p, a| e.text(p, a))?
            }
            Layout::ChatUnpaired => {
                let rows = RecordReader::<UnpairedRecord<Vec<Message>>>::from_source(source, Default::default())?.read_all()?;
                let rows = rows.into_iter().map(judged_row).collect();
                encode_rows(rows, path, encoder, &mut report, |e, p, a| e.chat(p, a))?
            }
        };
        loaded.pairs.extend(pairs);
        loaded.judged.extend(judged);
    }
    report.kept = loaded.len();
    Ok((loaded, report))
}

fn text_pair(r: PreferenceRecord, has_prompt: bool) -> Row<String> {
    if has_prompt {
        return Row::Pair { prompt: r.prompt, chosen: r.chosen, rejected: r.rejected };
    }
    let (prompt, chosen, rejected) = implicit_text_prompt(&r.chosen, &r.rejected);
    Row::Pair { prompt, chosen, rejected }
}

fn chat_pair(r: ChatPreferenceRecord) -> Row<Vec<Message>> {
    if !r.prompt.is_empty() {
        return Row::Pair { prompt: r.prompt, chosen: r.chosen, rejected: r.rejected };
    }
    let shared = r.chosen.iter().zip(&r.rejected).take_while(|(a, b)| a == b).count();
    Row::Pair { prompt: r.chosen[..shared].to_vec(), chosen: r.chosen[shared..].to_vec(), rejected: r.rejected[shared..].to_vec() }
}

fn judged_row<T>(r: UnpairedRecord<T>) -> Row<T> {
    Row::Judged { prompt: r.prompt, completion: r.completion, desirable: r.label }
}

/// TRL's `extract_prompt` on text: the common prefix of chosen and rejected, without the space
/// before the answers.
fn implicit_text_prompt(chosen: &str, rejected: &str) -> (String, String, String) {
    let (c, r): (Vec<char>, Vec<char>) = (chosen.chars().collect(), rejected.chars().collect());
    let shortest = c.len().min(r.len());
    let mut split = shortest.saturating_sub(1);
    for i in 0..shortest {
        if c[i] != r[i] {
            split = if i > 0 && c[i - 1] == ' ' { i - 1 } else { i };
            break;
        }
    }
    let text = |chars: &[char]| chars.iter().collect::<String>();
    (text(&c[..split]), text(&c[split..]), text(&r[split..]))
}

/// An answer that holds nothing to learn.
trait Blank {
    fn is_blank(&self) -> bool;
}

impl Blank for String {
    fn is_blank(&self) -> bool {
        self.trim().is_empty()
    }
}

impl Blank for Vec<Message> {
    fn is_blank(&self) -> bool {
        self.iter().all(|m| m.content.trim().is_empty())
    }
}

impl Encoder<'_> {
    fn text(&self, prompt: &str, answer: &str) -> std::result::Result<Marked, String> {
        Ok(self.renderer.prompt_completion(self.tokenizer, prompt, answer)?.expect("plain prompt/completion always has an answer"))
    }

    fn chat(&self, prompt: &[Message], answer: &[Message]) -> std::result::Result<Marked, String> {
        self.renderer.continuation(self.tokenizer, prompt, answer)
    }

    /// Cut a prompt to `--max-prompt-length` (keeping its end) and count the answers that will
    /// not fit after it; `None` when the prompt leaves no room. Answers are kept whole and cut
    /// when a sequence is built ([`example`]): KTO pairs an answer with other prompts too.
    fn fit(&self, prompt: &[u32], answers: &[&[u32]], report: &mut DataReport) -> Option<(Vec<u32>, Vec<Vec<u32>>)> {
        let mut prompt = prompt;
        if let Some(limit) = self.max_prompt_length.filter(|&n| prompt.len() > n) {
            prompt = &prompt[prompt.len() - limit..];
            report.prompts_truncated += 1;
        }
        if prompt.len() >= self.max_length {
            report.prompt_fills_max_length += 1;
            return None;
        }
        let room = self.max_length - prompt.len();
        let answers = answers
            .iter()
            .map(|a| {
                if a.len() > room {
                    report.answers_truncated += 1;
                }
                a.to_vec()
            })
            .collect();
        Some((prompt.to_vec(), answers))
    }
}

/// Encode rows: pairs and judged answers, in file order.
fn encode_rows<T: Blank + PartialEq>(
    rows: Vec<Row<T>>,
    path: &Path,
    encoder: &Encoder,
    report: &mut DataReport,
    encode: impl Fn(&Encoder, &T, &T) -> std::result::Result<Marked, String>,
) -> Result<(Vec<Pair>, Vec<Judged>)> {
    let (mut pairs, mut judged) = (Vec::new(), Vec::new());
    for (i, row) in rows.into_iter().enumerate() {
        report.rows += 1;
        let at = |what: String| bad_input(path, format!("row {i}: {what}"));
        match row {
            Row::Pair { prompt, chosen, rejected } => {
                if chosen.is_blank() || rejected.is_blank() {
                    report.empty += 1;
                    continue;
                }
                if chosen == rejected {
                    report.identical += 1;
                    continue;
                }
                let chosen = split(encode(encoder, &prompt, &chosen).map_err(at)?);
                let rejected = split(encode(encoder, &prompt, &rejected).map_err(at)?);
                // The prompt is what both encodings share before either answer starts (TRL:
                // the common prefix of the prompt's and each sequence's tokens).
                let shared = chosen.0.iter().zip(&rejected.0).take_while(|(a, b)| a == b).count();
                let prompt_len = chosen.1.min(rejected.1).min(shared);
                let answers = [&chosen.0[prompt_len..], &rejected.0[prompt_len..]];
                if let Some((prompt, mut answers)) = encoder.fit(&chosen.0[..prompt_len], &answers, report) {
                    let rejected = answers.pop().expect("two answers");
                    let chosen = answers.pop().expect("two answers");
                    pairs.push(Pair { prompt, chosen, rejected });
                }
            }
            Row::Judged { prompt, completion, desirable } => {
                if completion.is_blank() {
                    report.empty += 1;
                    continue;
                }
                let (ids, start) = split(encode(encoder, &prompt, &completion).map_err(at)?);
                if let Some((prompt, mut answers)) = encoder.fit(&ids[..start], &[&ids[start..]], report) {
                    judged.push(Judged { prompt, completion: answers.pop().expect("one answer"), desirable });
                }
            }
        }
    }
    Ok((pairs, judged))
}

/// Ids and where the answer starts (the first marked token).
fn split(marked: Marked) -> (Vec<u32>, usize) {
    let start = marked.trained.iter().position(|&t| t).unwrap_or(marked.ids.len());
    (marked.ids, start)
}

/// Pairs as judged answers, in the order TRL's `unpair_preference_dataset` gives them.
fn unpair(pairs: &[Pair]) -> Vec<Judged> {
    let mut out = Vec::with_capacity(2 * pairs.len());
    for chunk in pairs.chunks(UNPAIR_BATCH) {
        for desirable in [true, false] {
            out.extend(chunk.iter().map(|p| Judged {
                prompt: p.prompt.clone(),
                completion: if desirable { p.chosen.clone() } else { p.rejected.clone() },
                desirable,
            }));
        }
    }
    out
}

/// A scored sequence: `prompt + answer`, the answer's next-token targets counted.
pub fn example(prompt: &[u32], answer: &[u32], max_length: usize) -> Example {
    let answer = &answer[..answer.len().min(max_length.saturating_sub(prompt.len()))];
    let ids = [prompt, answer].concat();
    let trained = (0..ids.len()).map(|i| i >= prompt.len()).collect();
    Example::shifted(&Marked { ids, trained })
}

/// Refuse settings the data cannot take before reading anything.
pub fn check_lengths(max_length: usize, max_prompt_length: Option<usize>) -> Result<()> {
    if let Some(n) = max_prompt_length {
        if n == 0 || n >= max_length {
            return Err(usage(format!("--max-prompt-length {n} must be at least 1 and below --max-length {max_length}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_implicit_text_prompt_is_the_shared_start_without_its_last_space() {
        let (p, c, r) = implicit_text_prompt("Human: hi Assistant: hello", "Human: hi Assistant: go away");
        assert_eq!((p.as_str(), c.as_str(), r.as_str()), ("Human: hi Assistant:", " hello", " go away"));
    }

    #[test]
    fn pairs_unpair_as_trl_orders_them() {
        let pair = |k: u32| Pair { prompt: vec![k], chosen: vec![10 + k], rejected: vec![20 + k] };
        let judged = unpair(&[pair(1), pair(2)]);
        let order: Vec<(u32, bool)> = judged.iter().map(|j| (j.completion[0], j.desirable)).collect();
        assert_eq!(order, vec![(11, true), (12, true), (21, false), (22, false)]);
    }

    #[test]
    fn a_scored_sequence_counts_its_answer_only_and_fits_the_limit() {
        let e = example(&[1, 2, 3], &[4, 5, 6], 5);
        assert_eq!(e.ids, vec![1, 2, 3, 4, 5]);
        let counted: Vec<u32> = e.targets.iter().zip(&e.counted).filter(|(_, c)| **c).map(|(t, _)| *t).collect();
        assert_eq!(counted, vec![4, 5]);
    }
}
