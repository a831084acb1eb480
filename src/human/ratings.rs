//! Human ratings from files people and annotation tools write: CSV, JSON lines or Parquet
//! (chosen by extension), one rating per row with `prompt_id`, `sample`, a score column and
//! optionally `annotator`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use serde_json::Value;

use super::ItemKey;
use crate::data::ParquetSource;
use crate::data::parquet_io::DEFAULT_BATCH_ROWS;
use crate::error::{Error, Result, bad_input};

/// One rating of one response.
#[derive(Clone, Debug, PartialEq)]
pub struct Rating {
    pub key: ItemKey,
    /// `None`: the cell was left blank (empty, null or NaN).
    pub score: Option<f64>,
    pub annotator: Option<String>,
    /// Where it is in the file: `row 3` (CSV, Parquet; from 0, as pandas counts) or `line 4`
    /// (JSON lines; from 1, as editors count).
    pub place: String,
}

/// Read every rating of `path`; `column` names the score.
pub fn read_ratings(path: &Path, column: &str) -> Result<Vec<Rating>> {
    let wanted = ["prompt_id", "sample", column, "annotator"];
    let table = Table::read(path, &wanted)?;
    let (ids, samples, scores) = (table.required("prompt_id")?, table.required("sample")?, table.required(column)?);
    let annotators = table.column("annotator");
    (0..table.rows)
        .map(|r| {
            let text = |cells| cell(cells, r);
            let prompt_id = text(ids).ok_or_else(|| table.at(r, "prompt_id", "empty, expected the response's prompt_id"))?;
            let sample = text(samples).ok_or_else(|| table.at(r, "sample", "empty, expected the response's sample number"))?;
            let sample = parse_sample(sample).ok_or_else(|| table.at(r, "sample", format!("`{sample}`, expected a whole number")))?;
            let score = match text(scores) {
                None => None,
                Some(s) => match s.parse::<f64>() {
                    Ok(v) if v.is_nan() => None,
                    Ok(v) if v.is_finite() => Some(v),
                    _ => return Err(table.at(r, column, format!("`{s}`, expected a number"))),
                },
            };
            Ok(Rating {
                key: ItemKey::response(prompt_id, sample),
                score,
                annotator: annotators.and_then(text).map(str::to_string),
                place: table.place(r),
            })
        })
        .collect()
}

/// The text of a cell; `None` when null or blank.
fn cell(cells: &[Option<String>], row: usize) -> Option<&str> {
    cells[row].as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A whole number, also as pandas writes integers in a column with gaps (`3.0`).
fn parse_sample(text: &str) -> Option<i32> {
    text.parse::<i32>().ok().or_else(|| text.parse::<f64>().ok().filter(|v| v.fract() == 0.0 && v.abs() <= i32::MAX as f64).map(|v| v as i32))
}

/// Ratings by response; a second rating of one response is refused.
pub fn by_response(path: &Path, ratings: Vec<Rating>) -> Result<HashMap<ItemKey, Rating>> {
    let mut by_key: HashMap<ItemKey, Rating> = HashMap::with_capacity(ratings.len());
    for rating in ratings {
        if let Some(first) = by_key.get(&rating.key) {
            return Err(bad_input(
                path,
                format!(
                    "{}: a second rating of prompt_id `{}` sample {} (the first is at {}); to combine annotators, import each into its own file and use score --merge",
                    rating.place, rating.key.prompt_id, rating.key.sample.unwrap_or_default(), first.place
                ),
            ));
        }
        by_key.insert(rating.key.clone(), rating);
    }
    Ok(by_key)
}

/// The requested columns of a ratings file as text cells, whatever its format.
struct Table {
    path: PathBuf,
    rows: usize,
    names: Vec<String>,
    columns: HashMap<String, Vec<Option<String>>>,
    /// JSON lines: the line of each row.
    lines: Option<Vec<usize>>,
}

impl Table {
    fn read(path: &Path, wanted: &[&str]) -> Result<Self> {
        let extension = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        let mut table = Table { path: path.to_path_buf(), rows: 0, names: Vec::new(), columns: HashMap::new(), lines: None };
        match extension.as_str() {
            "csv" => table.read_csv(wanted)?,
            "jsonl" | "ndjson" => table.read_jsonl(wanted)?,
            "parquet" | "pq" => table.read_parquet(wanted)?,
            _ => return Err(bad_input(path, "unknown ratings format: expected a .csv, .jsonl or .parquet file")),
        }
        Ok(table)
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path).map_err(|e| bad_input(&self.path, format!("cannot read the ratings: {e}")))
    }

    fn read_csv(&mut self, wanted: &[&str]) -> Result<()> {
        let format = arrow::csv::reader::Format::default().with_header(true);
        let path = self.path.clone();
        let csv_error = |e: arrow::error::ArrowError| bad_input(&path, format!("not readable as CSV ({e})"));
        let (header, _) = format.infer_schema(self.open()?, Some(0)).map_err(csv_error)?;
        // Spreadsheets save CSV with a byte-order mark before the first name.
        self.names = header.fields().iter().map(|f| f.name().trim_start_matches('\u{feff}').to_string()).collect();
        // Every column as text: types are decided per column below, with the row named.
        let schema = Schema::new(self.names.iter().map(|n| Field::new(n, DataType::Utf8, true)).collect::<Vec<_>>());
        let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema)).with_format(format).build(self.open()?).map_err(csv_error)?;
        for batch in reader {
            let batch = batch.map_err(csv_error)?;
            self.add_rows(wanted, batch.num_rows(), |name| batch.column_by_name(name).cloned())?;
        }
        Ok(())
    }

    fn read_parquet(&mut self, wanted: &[&str]) -> Result<()> {
        let source = ParquetSource::open(&self.path)?;
        self.names = source.schema().fields().iter().map(|f| f.name().clone()).collect();
        let present: Vec<&str> = wanted.iter().copied().filter(|w| source.has_column(w)).collect();
        for batch in source.batches(Some(&present), DEFAULT_BATCH_ROWS)? {
            let batch = batch?;
            self.add_rows(wanted, batch.len(), |name| batch.column(name).cloned())?;
        }
        Ok(())
    }

    fn add_rows(&mut self, wanted: &[&str], rows: usize, column: impl Fn(&str) -> Option<ArrayRef>) -> Result<()> {
        for name in wanted {
            let Some(array) = column(name) else { continue };
            let text = cast(&array, &DataType::Utf8).map_err(|e| bad_input(&self.path, format!("column `{name}`: cannot read as text ({e})")))?;
            let text = text.as_string::<i32>();
            let cells = self.columns.entry(name.to_string()).or_default();
            cells.extend((0..text.len()).map(|i| text.is_valid(i).then(|| text.value(i).to_string())));
        }
        self.rows += rows;
        Ok(())
    }

    fn read_jsonl(&mut self, wanted: &[&str]) -> Result<()> {
        let mut lines = Vec::new();
        for (i, line) in BufReader::new(self.open()?).lines().enumerate() {
            let line = line.map_err(|e| bad_input(&self.path, format!("line {}: cannot read ({e})", i + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            let object: serde_json::Map<String, Value> = serde_json::from_str(&line)
                .map_err(|e| bad_input(&self.path, format!("line {}: not a JSON object ({e})", i + 1)))?;
            for key in object.keys() {
                if !self.names.contains(key) {
                    self.names.push(key.clone());
                }
            }
            for name in wanted {
                let cell = match object.get(*name) {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    Some(_) => return Err(bad_input(&self.path, format!("line {}, field `{name}`: expected a string or a number", i + 1))),
                };
                self.columns.entry(name.to_string()).or_default().push(cell);
            }
            lines.push(i + 1);
        }
        // A field no line had is absent, as a column a CSV header lacks.
        self.columns.retain(|name, _| self.names.contains(name));
        self.rows = lines.len();
        self.lines = Some(lines);
        Ok(())
    }

    fn column(&self, name: &str) -> Option<&[Option<String>]> {
        self.columns.get(name).map(Vec::as_slice)
    }

    fn required(&self, name: &str) -> Result<&[Option<String>]> {
        self.column(name).ok_or_else(|| bad_input(&self.path, format!("no column `{name}` (columns: {})", self.names.join(", "))))
    }

    fn place(&self, row: usize) -> String {
        match &self.lines {
            Some(lines) => format!("line {}", lines[row]),
            None => format!("row {row}"),
        }
    }

    fn at(&self, row: usize, column: &str, what: impl std::fmt::Display) -> Error {
        bad_input(&self.path, format!("{}, column `{column}`: {what}", self.place(row)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, text: &str, column: &str) -> Result<Vec<Rating>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        read_ratings(&path, column)
    }

    #[test]
    fn csv_and_jsonl_give_the_same_ratings() {
        let csv = read("r.csv", "\u{feff}prompt_id,sample,score,annotator\na,0,5,ana\na,1,,ana\n7,2.0,3.5,bo\n", "score").unwrap();
        let jsonl = read(
            "r.jsonl",
            "{\"prompt_id\":\"a\",\"sample\":0,\"score\":5,\"annotator\":\"ana\"}\n\n{\"prompt_id\":\"a\",\"sample\":1,\"score\":null,\"annotator\":\"ana\"}\n{\"prompt_id\":7,\"sample\":2,\"score\":3.5,\"annotator\":\"bo\"}\n",
            "score",
        )
        .unwrap();
        let values = |r: &[Rating]| r.iter().map(|r| (r.key.clone(), r.score, r.annotator.clone())).collect::<Vec<_>>();
        assert_eq!(values(&csv), values(&jsonl));
        assert_eq!(csv[1].score, None, "a blank cell is no rating");
        assert_eq!(csv[2].key, ItemKey::response("7", 2));
        assert_eq!((csv[2].place.as_str(), jsonl[2].place.as_str()), ("row 2", "line 4"));
    }

    #[test]
    fn bad_cells_and_duplicates_name_their_place() {
        let e = read("r.csv", "prompt_id,sample,rating\na,0,good\n", "rating").unwrap_err();
        assert!(e.to_string().contains("row 0, column `rating`: `good`, expected a number"), "{e}");
        let e = read("r.csv", "prompt_id,sample\na,0\n", "score").unwrap_err();
        assert!(e.to_string().contains("no column `score` (columns: prompt_id, sample)"), "{e}");
        let e = read("r.jsonl", "{\"prompt_id\":\"a\",\"sample\":[1],\"score\":1}\n", "score").unwrap_err();
        assert!(e.to_string().contains("line 1, field `sample`"), "{e}");
        assert!(read("r.txt", "x", "score").is_err());
        let ratings = read("r.csv", "prompt_id,sample,score\na,0,1\nb,0,2\na,0,3\n", "score").unwrap();
        let e = by_response(Path::new("r.csv"), ratings).unwrap_err();
        assert!(e.to_string().contains("row 2: a second rating of prompt_id `a` sample 0 (the first is at row 0)"), "{e}");
    }
}
