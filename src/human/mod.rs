//! People in the loop: scoring and ranking at the terminal with an answers journal that
//! survives any stop, human ratings imported from files, and several annotators merged with
//! their agreement.
//!
//! `score --human` and `rank --human` share one session ([`session`]): items are shown one at
//! a time on standard error, each decision is appended to the journal ([`journal`]) and synced
//! before the next item appears, and a later run replays the journal and continues.

pub mod agreement;
pub mod journal;
pub mod merge;
pub mod ranking;
pub mod ratings;
pub mod scoring;
pub mod session;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::records::{RecordReader, ResponseRecord};
use crate::error::{Result, bad_input, usage};

/// What one decision is about: a response (`prompt_id` + `sample`) or, when ranking, a prompt.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ItemKey {
    pub prompt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<i32>,
}

impl ItemKey {
    pub fn response(prompt_id: &str, sample: i32) -> Self {
        ItemKey { prompt_id: prompt_id.to_string(), sample: Some(sample) }
    }

    pub fn prompt(prompt_id: &str) -> Self {
        ItemKey { prompt_id: prompt_id.to_string(), sample: None }
    }

    pub fn of(row: &ResponseRecord) -> Self {
        Self::response(&row.prompt_id, row.sample)
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sample {
            Some(sample) => write!(f, "{}/{sample}", self.prompt_id),
            None => write!(f, "{}", self.prompt_id),
        }
    }
}

/// All responses of `input`, refused when empty or when two share a `prompt_id` and `sample`.
pub fn read_responses(input: &Path) -> Result<(RecordReader<ResponseRecord>, Vec<ResponseRecord>)> {
    let reader = RecordReader::<ResponseRecord>::open(input)?;
    let rows = reader.read_all()?;
    if rows.is_empty() {
        return Err(bad_input(input, "holds no responses"));
    }
    check_unique_responses(input, &rows)?;
    Ok((reader, rows))
}

/// Refuse responses that share a `prompt_id` and `sample`: journals, ratings and merges name
/// a response by the two.
pub fn check_unique_responses(input: &Path, rows: &[ResponseRecord]) -> Result<()> {
    let mut first_row: HashMap<ItemKey, usize> = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        if let Some(first) = first_row.insert(ItemKey::of(row), i) {
            return Err(bad_input(
                input,
                format!("row {i}: prompt_id `{}` sample {} again (first at row {first}); responses are named by the two", row.prompt_id, row.sample),
            ));
        }
    }
    Ok(())
}

/// The annotator's name: `--annotator`, else `$USER`.
pub fn annotator_name(given: Option<&str>) -> Result<String> {
    let name = match given {
        Some(name) => name.to_string(),
        None => std::env::var("USER").map_err(|_| usage("give --annotator NAME ($USER is not set)"))?,
    };
    let name = name.trim().to_string();
    if name.is_empty() || name.contains(char::is_control) {
        return Err(usage(format!("--annotator `{name}`: expected a non-empty name on one line")));
    }
    Ok(name)
}

/// Up to `n` items for a report line: `a/0, b/1, … (+3 more)`.
pub fn first_few(keys: &[ItemKey], n: usize) -> String {
    let shown: Vec<String> = keys.iter().take(n).map(ToString::to_string).collect();
    let more = keys.len().saturating_sub(n);
    if more > 0 { format!("{}, … (+{more} more)", shown.join(", ")) } else { shown.join(", ") }
}
