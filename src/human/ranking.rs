//! `rank --human`: a person orders the responses of each prompt, shown as A, B, C…, by typing
//! the letters best first (`CAB`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ItemKey;
use super::session::{Judgement, fingerprint};
use crate::data::records::ResponseRecord;
use crate::error::{Result, bad_input};
use crate::rank::by_prompt;

/// Letters name the responses of a prompt, so a prompt can show at most 26.
pub const MOST_RESPONSES: usize = 26;

/// One journaled order: the responses' `sample` numbers, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankAnswer {
    pub order: Vec<i32>,
}

/// The prompts with two or more responses, in order of first appearance.
pub struct RankJudgement<'a> {
    rows: &'a [ResponseRecord],
    /// Per prompt: its rows, by sample (A is the lowest sample).
    groups: Vec<Vec<usize>>,
    keys: Vec<ItemKey>,
    /// Prompts with a single response: nothing to order.
    pub single_response_prompts: usize,
}

impl<'a> RankJudgement<'a> {
    pub fn new(input: &Path, rows: &'a [ResponseRecord]) -> Result<Self> {
        let mut groups = by_prompt(rows.iter().map(|r| r.prompt_id.as_str()));
        let single_response_prompts = groups.iter().filter(|g| g.len() < 2).count();
        groups.retain(|g| g.len() >= 2);
        for group in &mut groups {
            group.sort_by_key(|&i| rows[i].sample);
            if group.len() > MOST_RESPONSES {
                let id = &rows[group[0]].prompt_id;
                return Err(bad_input(input, format!("prompt_id `{id}` has {} responses; rank --human shows at most {MOST_RESPONSES} (A-Z)", group.len())));
            }
        }
        let keys = groups.iter().map(|g| ItemKey::prompt(&rows[g[0]].prompt_id)).collect();
        Ok(RankJudgement { rows, groups, keys, single_response_prompts })
    }

    /// Per prompt: its rows, by sample.
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// The rows of prompt `index` in the answer's order, best first.
    pub fn ordered_rows(&self, index: usize, answer: &RankAnswer) -> Vec<usize> {
        let group = &self.groups[index];
        answer.order.iter().filter_map(|&sample| group.iter().copied().find(|&i| self.rows[i].sample == sample)).collect()
    }

    fn letters(&self, index: usize) -> String {
        letter_range(self.groups[index].len())
    }
}

fn letter_range(k: usize) -> String {
    (b'A'..).take(k).map(char::from).collect()
}

impl Judgement for RankJudgement<'_> {
    type Answer = RankAnswer;
    const NOUN: &'static str = "prompt";

    fn items(&self) -> &[ItemKey] {
        &self.keys
    }

    fn show(&self, index: usize) -> String {
        let group = &self.groups[index];
        let first = &self.rows[group[0]];
        let mut text = format!("prompt_id {}\n\nPROMPT\n{}\n", first.prompt_id, first.prompt);
        for (letter, &i) in self.letters(index).chars().zip(group) {
            text.push_str(&format!("\n{letter} (sample {})\n{}\n", self.rows[i].sample, self.rows[i].response));
        }
        text
    }

    /// The prompt and its responses in letter order: a changed text or order is a changed item.
    fn shown(&self, index: usize) -> String {
        let group = &self.groups[index];
        let responses = group.iter().map(|&i| self.rows[i].response.as_str());
        fingerprint(std::iter::once(self.rows[group[0]].prompt.as_str()).chain(responses))
    }

    fn ask(&self, index: usize) -> String {
        format!("order best first, e.g. {}", self.letters(index).chars().rev().collect::<String>())
    }

    /// Every letter once, in any case, spaces, commas and `>` allowed: `CAB`, `c > a > b`.
    fn parse(&self, index: usize, typed: &str) -> std::result::Result<RankAnswer, String> {
        let letters = self.letters(index);
        let expected = || format!("expected each of {letters} once, best first");
        let mut order = Vec::with_capacity(letters.len());
        for c in typed.chars().filter(|c| !(c.is_whitespace() || *c == ',' || *c == '>')) {
            let position = letters.find(c.to_ascii_uppercase()).ok_or_else(expected)?;
            let sample = self.rows[self.groups[index][position]].sample;
            if order.contains(&sample) {
                return Err(expected());
            }
            order.push(sample);
        }
        if order.len() != letters.len() {
            return Err(expected());
        }
        Ok(RankAnswer { order })
    }

    fn fits(&self, index: usize, answer: &RankAnswer) -> std::result::Result<(), String> {
        let mut samples: Vec<i32> = self.groups[index].iter().map(|&i| self.rows[i].sample).collect();
        let mut given = answer.order.clone();
        samples.sort_unstable();
        given.sort_unstable();
        if samples == given { Ok(()) } else { Err(format!("the order {:?} does not name the samples {samples:?} of prompt {}", answer.order, self.keys[index])) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(prompt_id: &str, sample: i32) -> ResponseRecord {
        ResponseRecord::example(prompt_id, sample)
    }

    #[test]
    fn orders_are_letters_best_first_naming_every_response_once() {
        let rows = vec![response("a", 2), response("b", 0), response("a", 0), response("a", 1)];
        let judgement = RankJudgement::new(Path::new("x"), &rows).unwrap();
        assert_eq!(judgement.groups(), &[vec![2, 3, 0]]);
        assert_eq!(judgement.single_response_prompts, 1);
        // A = sample 0, B = sample 1, C = sample 2.
        assert_eq!(judgement.parse(0, "CAB"), Ok(RankAnswer { order: vec![2, 0, 1] }));
        assert_eq!(judgement.parse(0, "c > a, b"), Ok(RankAnswer { order: vec![2, 0, 1] }));
        assert_eq!(judgement.ordered_rows(0, &RankAnswer { order: vec![2, 0, 1] }), vec![0, 2, 3]);
        for bad in ["CA", "CAAB", "CAD", "CABB", "1 2 3"] {
            assert!(judgement.parse(0, bad).is_err(), "{bad}");
        }
        assert!(judgement.fits(0, &RankAnswer { order: vec![0, 1] }).is_err());
        assert!(judgement.fits(0, &RankAnswer { order: vec![1, 2, 0] }).is_ok());
    }
}
