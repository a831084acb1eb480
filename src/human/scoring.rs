//! `score --human`: a person gives each response a whole-number score on a scale.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ItemKey;
use super::session::{Judgement, fingerprint};
use crate::data::records::ResponseRecord;
use crate::error::{Error, usage};

/// The scores a person may give: whole numbers from `low` to `high`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub low: i64,
    pub high: i64,
}

impl FromStr for Scale {
    type Err = Error;

    /// `LOW-HIGH`, e.g. `1-7` or `0-10`.
    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = || usage(format!("--scale {text}: expected LOW-HIGH with whole numbers LOW < HIGH, e.g. 1-7"));
        let (low, high) = text.split_once('-').ok_or_else(bad)?;
        let (low, high): (i64, i64) = (low.trim().parse().map_err(|_| bad())?, high.trim().parse().map_err(|_| bad())?);
        if low >= high {
            return Err(bad());
        }
        Ok(Scale { low, high })
    }
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl Scale {
    pub fn contains(&self, score: f64) -> bool {
        score.fract() == 0.0 && score >= self.low as f64 && score <= self.high as f64
    }
}

/// One journaled score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreAnswer {
    pub score: f64,
}

/// The responses to score, in file order.
pub struct ScoreJudgement<'a> {
    rows: &'a [ResponseRecord],
    keys: Vec<ItemKey>,
    scale: Scale,
}

impl<'a> ScoreJudgement<'a> {
    pub fn new(rows: &'a [ResponseRecord], scale: Scale) -> Self {
        ScoreJudgement { keys: rows.iter().map(ItemKey::of).collect(), rows, scale }
    }
}

impl Judgement for ScoreJudgement<'_> {
    type Answer = ScoreAnswer;
    const NOUN: &'static str = "response";

    fn items(&self) -> &[ItemKey] {
        &self.keys
    }

    fn show(&self, index: usize) -> String {
        let row = &self.rows[index];
        format!("prompt_id {} · sample {}\n\nPROMPT\n{}\n\nRESPONSE\n{}\n", row.prompt_id, row.sample, row.prompt, row.response)
    }

    fn shown(&self, index: usize) -> String {
        let row = &self.rows[index];
        fingerprint([row.prompt.as_str(), row.response.as_str()])
    }

    fn ask(&self, _: usize) -> String {
        format!("score {}", self.scale)
    }

    fn parse(&self, _: usize, typed: &str) -> Result<ScoreAnswer, String> {
        match typed.parse::<i64>() {
            Ok(score) if self.scale.contains(score as f64) => Ok(ScoreAnswer { score: score as f64 }),
            _ => Err(format!("expected a whole number from {} to {}", self.scale.low, self.scale.high)),
        }
    }

    fn fits(&self, _: usize, answer: &ScoreAnswer) -> Result<(), String> {
        if self.scale.contains(answer.score) { Ok(()) } else { Err(format!("score {} is outside the scale {}", answer.score, self.scale)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_parse_and_bound_answers() {
        let scale: Scale = "1-5".parse().unwrap();
        assert_eq!(scale, Scale { low: 1, high: 5 });
        assert_eq!("0-10".parse::<Scale>().unwrap(), Scale { low: 0, high: 10 });
        for bad in ["5-1", "3-3", "1to7", "a-b", "1-"] {
            assert!(bad.parse::<Scale>().is_err(), "{bad}");
        }
        let rows = vec![];
        let judgement = ScoreJudgement::new(&rows, scale);
        assert_eq!(judgement.parse(0, "5"), Ok(ScoreAnswer { score: 5.0 }));
        assert!(judgement.parse(0, "6").is_err() && judgement.parse(0, "0").is_err() && judgement.parse(0, "2.5").is_err());
        assert!(judgement.fits(0, &ScoreAnswer { score: 7.0 }).is_err());
    }
}
