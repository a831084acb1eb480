//! `metrics.jsonl`: one JSON object per line, flushed as written so a crash loses nothing and
//! `tail -f` works.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::Result;

pub struct MetricsWriter {
    file: File,
}

impl MetricsWriter {
    /// Start a fresh file.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)?;
        Ok(MetricsWriter { file })
    }

    /// Continue an existing file after a resume, dropping lines logged after `step` (they
    /// will be logged again by the resumed run).
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let kept: Vec<String> = match File::open(path) {
            Ok(file) => BufReader::new(file)
                .lines()
                .map_while(|l| l.ok())
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_none_or(|s| s <= step)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut writer = Self::create(path)?;
        for line in kept {
            writeln!(writer.file, "{line}")?;
        }
        writer.file = OpenOptions::new().append(true).open(path)?;
        Ok(writer)
    }

    pub fn log(&mut self, record: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(record)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_drops_lines_after_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path).unwrap();
        for step in 1..=4 {
            w.log(json!({"step": step, "loss": 1.0}).as_object().unwrap()).unwrap();
        }
        let mut w = MetricsWriter::resume(&path, 2).unwrap();
        w.log(json!({"step": 3, "loss": 0.5}).as_object().unwrap()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
    }
}
