//! What people judge, read from the ITEMS files once and kept in the database: a response
//! (`score`), the responses of one prompt (`rank`), or a text with suggested labels (`label`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Task;
use crate::data::records::{LabeledTextRecord, RecordReader, ResponseRecord, TextRecord};
use crate::data::{ColumnMap, ColumnType, ParquetSource};
use crate::error::{Result, bad_input, usage};
use crate::human::ranking::MOST_RESPONSES;
use crate::human::{ItemKey, check_unique_responses};
use crate::progress;
use crate::rank::by_prompt;

/// One item's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum Content {
    Score { response: ResponseRecord },
    /// The responses of one prompt, by sample.
    Rank { responses: Vec<ResponseRecord> },
    Label { text: String, suggested: Vec<String> },
}

impl Content {
    pub fn task(&self) -> Task {
        match self {
            Content::Score { .. } => Task::Score,
            Content::Rank { .. } => Task::Rank,
            Content::Label { .. } => Task::Label,
        }
    }
}

/// An item: its key (`prompt_id/sample`, `prompt_id`, or the text's fingerprint) and content.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub key: String,
    pub content: Content,
}

/// The items of `inputs` for `task`, in file order.
pub fn read(task: Task, inputs: &[PathBuf]) -> Result<Vec<Item>> {
    crate::output::check_single_stdin(inputs)?;
    let items = match task {
        Task::Score => responses(inputs)?
            .into_iter()
            .map(|r| Item { key: ItemKey::response(&r.prompt_id, r.sample).to_string(), content: Content::Score { response: r } })
            .collect(),
        Task::Rank => ranked(inputs)?,
        Task::Label => labeled(inputs)?,
    };
    if items.is_empty() {
        return Err(bad_input(&inputs[0], format!("holds nothing to {}", task.name())));
    }
    Ok(items)
}

fn responses(inputs: &[PathBuf]) -> Result<Vec<ResponseRecord>> {
    let mut all = Vec::new();
    for path in inputs {
        all.extend(RecordReader::<ResponseRecord>::open(path)?.read_all()?);
    }
    check_unique_responses(&inputs[0], &all)?;
    Ok(all)
}

/// One item per prompt with two or more responses (at most A-Z), responses by sample.
fn ranked(inputs: &[PathBuf]) -> Result<Vec<Item>> {
    let rows = responses(inputs)?;
    let mut items = Vec::new();
    let mut single = 0;
    for mut group in by_prompt(rows.iter().map(|r| r.prompt_id.as_str())) {
        if group.len() < 2 {
            single += 1;
            continue;
        }
        group.sort_by_key(|&i| rows[i].sample);
        let first = &rows[group[0]];
        if group.len() > MOST_RESPONSES {
            return Err(bad_input(&inputs[0], format!("prompt_id `{}` has {} responses; at most {MOST_RESPONSES} (A-Z) are ranked together", first.prompt_id, group.len())));
        }
        let responses = group.iter().map(|&i| rows[i].clone()).collect();
        items.push(Item { key: first.prompt_id.clone(), content: Content::Rank { responses } });
    }
    if single > 0 {
        progress::warn(format!("note: {single} prompts have a single response and are left out (nothing to rank)"));
    }
    Ok(items)
}

/// Texts, with the labels the file gives (a `labels` list or boolean category columns) as
/// suggestions. The same text twice is one item.
fn labeled(inputs: &[PathBuf]) -> Result<Vec<Item>> {
    let mut items: Vec<Item> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for path in inputs {
        let source = ParquetSource::open(path)?;
        let has_labels = source.optional("labels", ColumnType::StrList)? || !LabeledTextRecord::boolean_categories(&source).is_empty();
        let rows: Vec<(String, Vec<String>)> = if has_labels {
            RecordReader::<LabeledTextRecord>::from_source(source, ColumnMap::default())?.read_all()?.into_iter().map(|r| (r.text, r.labels)).collect()
        } else {
            RecordReader::<TextRecord>::from_source(source, ColumnMap::default())?.read_all()?.into_iter().map(|r| (r.text, Vec::new())).collect()
        };
        for (text, suggested) in rows {
            let key = format!("text:{}", crate::human::session::fingerprint([text.as_str()]));
            if seen.insert(key.clone(), items.len()).is_none() {
                items.push(Item { key, content: Content::Label { text, suggested } });
            }
        }
    }
    Ok(items)
}

/// The categories of a `label` task: `--labels`, else every label the items suggest.
pub fn categories(given: &[String], items: &[Item], first_input: &Path) -> Result<Vec<String>> {
    let mut found: Vec<String> = if given.is_empty() {
        items.iter().flat_map(|i| match &i.content { Content::Label { suggested, .. } => suggested.clone(), _ => Vec::new() }).collect()
    } else {
        given.iter().map(|l| l.trim().to_string()).collect()
    };
    if let Some(bad) = found.iter().find(|l| l.is_empty() || l.chars().any(|c| c.is_whitespace() || c == ',')) {
        return Err(usage(format!("--labels: `{bad}` is not a label (one word each, comma-separated)")));
    }
    let mut sorted = found.clone();
    sorted.sort();
    sorted.dedup();
    if given.is_empty() {
        found = sorted;
    } else if sorted.len() != found.len() {
        return Err(usage("--labels names a label twice"));
    }
    if found.is_empty() {
        return Err(bad_input(first_input, "suggests no labels: give the categories with --labels a,b,c"));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::RecordWriter;

    #[test]
    fn items_per_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.parquet");
        let mut writer = RecordWriter::<ResponseRecord>::create(&path, "test", vec![], vec![]).unwrap();
        writer.write(&[ResponseRecord::example("a", 1), ResponseRecord::example("b", 0), ResponseRecord::example("a", 0)], vec![]).unwrap();
        writer.finish().unwrap();
        let scored = read(Task::Score, std::slice::from_ref(&path)).unwrap();
        assert_eq!(scored.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(), ["a/1", "b/0", "a/0"]);
        let ranked = read(Task::Rank, std::slice::from_ref(&path)).unwrap();
        assert_eq!(ranked.len(), 1, "b has one response");
        let Content::Rank { responses } = &ranked[0].content else { panic!() };
        assert_eq!(responses.iter().map(|r| r.sample).collect::<Vec<_>>(), [0, 1]);
        assert!(read(Task::Score, &[path.clone(), path.clone()]).unwrap_err().to_string().contains("again"), "the same response twice");

        let labeled = crate::data::records::LabeledTextRecord { text: "x".into(), labels: vec!["hate".into()], unlabeled: vec![] };
        let path = dir.path().join("l.parquet");
        let mut writer = RecordWriter::<LabeledTextRecord>::create(&path, "test", vec![], vec![]).unwrap();
        writer.write(&[labeled.clone(), labeled], vec![]).unwrap();
        writer.finish().unwrap();
        let items = read(Task::Label, std::slice::from_ref(&path)).unwrap();
        assert_eq!(items.len(), 1, "one item per text");
        assert_eq!(categories(&[], &items, &path).unwrap(), ["hate"]);
        assert_eq!(categories(&["spam".into(), "hate".into()], &items, &path).unwrap(), ["spam", "hate"]);
        assert!(categories(&["a b".into()], &items, &path).is_err());
    }
}
