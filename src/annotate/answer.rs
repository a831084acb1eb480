//! Answers: a score on the scale, an order of the responses shown as A, B, C… (ties allowed),
//! or the labels that apply; each checked against the item it is for.

use serde::Deserialize;

use super::Task;
use crate::human::scoring::Scale;

/// What one annotator said about one item.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Score(f64),
    /// As typed, canonical (`CA=B`), and as samples best first, tied ones in one group.
    Rank { ranking: String, order: Vec<Vec<i32>> },
    /// In the order of the task's categories.
    Label(Vec<String>),
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Answer { answer: Answer, comment: Option<String> },
    Skip,
    Undo,
}

/// The rules answers are checked by.
#[derive(Clone, Debug)]
pub struct Rules {
    pub task: Task,
    pub scale: Scale,
    /// The `label` task's categories.
    pub labels: Vec<String>,
}

/// Longest comment kept, in characters.
pub const MOST_COMMENT_CHARS: usize = 2000;

/// The body of `POST /api/items/{id}/answer`: one of `score`, `ranking`, `labels` (with an
/// optional `comment`), `skip` or `undo`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    pub score: Option<f64>,
    pub ranking: Option<String>,
    pub labels: Option<Vec<String>>,
    pub comment: Option<String>,
    #[serde(default)]
    pub skip: bool,
    #[serde(default)]
    pub undo: bool,
}

impl AnswerBody {
    /// The decision asked for, checked; `shown` is the samples in letter order (rank).
    pub fn decision(self, rules: &Rules, shown: &[i32]) -> Result<Decision, String> {
        let given = [self.score.is_some(), self.ranking.is_some(), self.labels.is_some(), self.skip, self.undo];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(format!("send exactly one of {}, skip or undo", rules.task.answer_field()));
        }
        if self.skip {
            return Ok(Decision::Skip);
        }
        if self.undo {
            return Ok(Decision::Undo);
        }
        let comment = comment(self.comment)?;
        let answer = match (rules.task, self.score, self.ranking, self.labels) {
            (Task::Score, Some(score), _, _) => score_answer(score, rules.scale)?,
            (Task::Rank, _, Some(ranking), _) => ranking_answer(&ranking, shown)?,
            (Task::Label, _, _, Some(labels)) => label_answer(&labels, &rules.labels)?,
            (task, ..) => return Err(format!("a {} item takes `{}`", task.name(), task.answer_field())),
        };
        Ok(Decision::Answer { answer, comment })
    }
}

fn comment(text: Option<String>) -> Result<Option<String>, String> {
    let Some(text) = text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else { return Ok(None) };
    if text.chars().count() > MOST_COMMENT_CHARS {
        return Err(format!("the comment is longer than {MOST_COMMENT_CHARS} characters"));
    }
    Ok(Some(text))
}

pub fn score_answer(score: f64, scale: Scale) -> Result<Answer, String> {
    if scale.contains(score) { Ok(Answer::Score(score)) } else { Err(format!("score {score}: expected a whole number from {} to {}", scale.low, scale.high)) }
}

/// `CAB`, `C > A > B`, `CA=B` (A and B tied): every letter of the responses shown once, best
/// first; `=` ties a letter with the one before it.
pub fn ranking_answer(typed: &str, shown: &[i32]) -> Result<Answer, String> {
    let letters: String = (b'A'..).take(shown.len()).map(char::from).collect();
    let expected = || format!("`{typed}`: expected each of {letters} once, best first (`=` ties a letter with the one before)");
    let mut order: Vec<Vec<i32>> = Vec::new();
    let mut canonical = String::new();
    let mut tie = false;
    let mut used = vec![false; shown.len()];
    for c in typed.chars().filter(|c| !(c.is_whitespace() || *c == ',' || *c == '>')) {
        if c == '=' {
            if tie || order.is_empty() {
                return Err(expected());
            }
            tie = true;
            continue;
        }
        let position = letters.find(c.to_ascii_uppercase()).ok_or_else(expected)?;
        if std::mem::replace(&mut used[position], true) {
            return Err(expected());
        }
        let sample = shown[position];
        match order.last_mut() {
            Some(group) if tie => {
                group.push(sample);
                canonical.push('=');
            }
            _ => order.push(vec![sample]),
        }
        canonical.push(c.to_ascii_uppercase());
        tie = false;
    }
    if tie || used.iter().any(|u| !u) {
        return Err(expected());
    }
    Ok(Answer::Rank { ranking: canonical, order })
}

pub fn label_answer(given: &[String], categories: &[String]) -> Result<Answer, String> {
    if let Some(unknown) = given.iter().find(|l| !categories.contains(l)) {
        return Err(format!("label `{unknown}` is not one of {}", categories.join(", ")));
    }
    Ok(Answer::Label(categories.iter().filter(|c| given.contains(c)).cloned().collect()))
}

impl Answer {
    /// For JSON: `{"score": 5}`, `{"ranking": "CA=B", "order": [[2], [0, 1]]}`, `{"labels": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Answer::Score(score) => serde_json::json!({"score": score}),
            Answer::Rank { ranking, order } => serde_json::json!({"ranking": ranking, "order": order}),
            Answer::Label(labels) => serde_json::json!({"labels": labels}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(task: Task) -> Rules {
        Rules { task, scale: Scale { low: 1, high: 7 }, labels: vec!["hate".into(), "spam".into()] }
    }

    fn body(json: &str) -> AnswerBody {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn answers_are_checked_against_the_task() {
        let score = rules(Task::Score);
        assert_eq!(body(r#"{"score": 5, "comment": " fine "}"#).decision(&score, &[]), Ok(Decision::Answer { answer: Answer::Score(5.0), comment: Some("fine".into()) }));
        for bad in [r#"{"score": 8}"#, r#"{"score": 2.5}"#, r#"{"ranking": "AB"}"#, r#"{}"#, r#"{"score": 5, "skip": true}"#] {
            assert!(body(bad).decision(&score, &[]).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<AnswerBody>(r#"{"scor": 5}"#).is_err(), "unknown fields are refused");
        assert_eq!(body(r#"{"skip": true}"#).decision(&score, &[]), Ok(Decision::Skip));
        assert_eq!(body(r#"{"undo": true}"#).decision(&score, &[]), Ok(Decision::Undo));
        let long = format!(r#"{{"score": 5, "comment": "{}"}}"#, "x".repeat(MOST_COMMENT_CHARS + 1));
        assert!(body(&long).decision(&score, &[]).is_err());

        let label = rules(Task::Label);
        assert_eq!(body(r#"{"labels": ["spam", "hate", "spam"]}"#).decision(&label, &[]).unwrap(), Decision::Answer { answer: Answer::Label(vec!["hate".into(), "spam".into()]), comment: None });
        assert_eq!(body(r#"{"labels": []}"#).decision(&label, &[]).unwrap(), Decision::Answer { answer: Answer::Label(vec![]), comment: None }, "clean");
        assert!(body(r#"{"labels": ["violence"]}"#).decision(&label, &[]).is_err());
    }

    #[test]
    fn rankings_name_every_letter_once_with_ties() {
        // Shown: A = sample 2, B = sample 0, C = sample 1.
        let shown = [2, 0, 1];
        assert_eq!(ranking_answer("CAB", &shown), Ok(Answer::Rank { ranking: "CAB".into(), order: vec![vec![1], vec![2], vec![0]] }));
        assert_eq!(ranking_answer("c > a = b", &shown), Ok(Answer::Rank { ranking: "CA=B".into(), order: vec![vec![1], vec![2, 0]] }));
        assert_eq!(ranking_answer("A=B=C", &shown).unwrap(), Answer::Rank { ranking: "A=B=C".into(), order: vec![vec![2, 0, 1]] });
        for bad in ["CA", "CAAB", "CAD", "=CAB", "CAB=", "CA==B", "1 2 3", ""] {
            assert!(ranking_answer(bad, &shown).is_err(), "{bad}");
        }
    }
}
