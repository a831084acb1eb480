//! Text documents from Parquet (`text` column or another), `.txt` (one document per line, or
//! blank-line-separated paragraphs) and `.jsonl`, streamed in batches of bounded size.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef};
use arrow::datatypes::Field;

use super::ColumnType;
use super::parquet_io::{Batches, ParquetSource};
use crate::error::{Result, bad_input, usage};
use crate::output::{self, InputFile};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFormat {
    Parquet,
    Lines,
    Paragraphs,
    Jsonl,
}

/// How text inputs are read.
#[derive(Clone, Debug)]
pub struct TextOptions {
    /// Column (Parquet) or field (JSONL) holding the text.
    pub column: String,
    /// `.txt`: blank-line-separated paragraphs instead of one document per line.
    pub paragraphs: bool,
    /// Column carried through to the output when present (Parquet inputs).
    pub carry: Option<String>,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions { column: "text".into(), paragraphs: false, carry: Some("id".into()) }
    }
}

/// Documents read so far, and the matching rows of the carried column.
pub struct DocBatch {
    pub texts: Vec<String>,
    pub carried: Option<ArrayRef>,
    pub bytes: u64,
}

/// Where an input's documents come from.
enum Source {
    Parquet(ParquetSource),
    Lines(InputFile),
}

/// One checked input.
pub struct TextInput {
    shown: PathBuf,
    format: TextFormat,
    source: Source,
    options: TextOptions,
    carried: Option<Field>,
    size: u64,
}

const PARQUET_MAGIC: &[u8; 4] = b"PAR1";

/// Open and check every input before any work starts; all must agree on the carried column.
pub fn open_inputs(paths: &[PathBuf], options: &TextOptions) -> Result<Vec<TextInput>> {
    if paths.is_empty() {
        return Err(usage("no input files given"));
    }
    output::check_single_stdin(paths)?;
    let inputs = paths
        .iter()
        .map(|p| TextInput::open(p, options))
        .collect::<Result<Vec<_>>>()?;
    if let Some(first) = inputs.first() {
        for other in &inputs[1..] {
            let same = match (&first.carried, &other.carried) {
                (Some(a), Some(b)) => a.data_type() == b.data_type(),
                (None, None) => true,
                _ => false,
            };
            if !same {
                let column = options.carry.as_deref().unwrap_or("id");
                return Err(bad_input(
                    &other.shown,
                    format!(
                        "column `{column}` is {} here but {} in {}; inputs written to one output must agree",
                        describe_carried(&other.carried),
                        describe_carried(&first.carried),
                        first.shown.display()
                    ),
                ));
            }
        }
    }
    Ok(inputs)
}

fn describe_carried(field: &Option<Field>) -> String {
    field.as_ref().map_or("absent".into(), |f| format!("{}", f.data_type()))
}

impl TextInput {
    pub fn open(path: &Path, options: &TextOptions) -> Result<Self> {
        let input = InputFile::open(path)?;
        let shown = input.shown().to_path_buf();
        let size = input.file()?.metadata()?.len();
        if size == 0 {
            return Err(bad_input(&shown, "empty file, expected text (Parquet, .txt or .jsonl)"));
        }
        let format = detect_format(&input, options.paragraphs)?;
        if format != TextFormat::Parquet {
            return Ok(TextInput { shown, format, source: Source::Lines(input), options: options.clone(), carried: None, size });
        }
        let source = ParquetSource::from_input(input)?;
        source.expect_kind(super::Kind::Text)?;
        source.require(&options.column, ColumnType::Str)?;
        if source.num_rows() == 0 {
            return Err(bad_input(&shown, "no rows"));
        }
        let carried = options
            .carry
            .as_ref()
            .filter(|c| *c != &options.column)
            .and_then(|c| source.schema().field_with_name(c).ok().cloned());
        Ok(TextInput { shown, format, source: Source::Parquet(source), options: options.clone(), carried, size })
    }

    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// The carried column's field, when this input has one.
    pub fn carried_field(&self) -> Option<&Field> {
        self.carried.as_ref()
    }

    /// Roughly how many text bytes this input holds (for progress and ETA).
    pub fn text_bytes(&self) -> u64 {
        match &self.source {
            Source::Parquet(source) => source.column_data_bytes(&self.options.column).unwrap_or(self.size),
            Source::Lines(_) => self.size,
        }
    }

    /// Stream documents in batches of about `target_bytes` of text.
    pub fn batches(&self, target_bytes: usize) -> Result<Box<dyn Iterator<Item = Result<DocBatch>> + Send + '_>> {
        match &self.source {
            Source::Parquet(source) => {
                let mut columns = vec![self.options.column.as_str()];
                if let Some(field) = &self.carried {
                    columns.push(field.name());
                }
                let rows = rows_for_bytes(source, &self.options.column, target_bytes);
                let batches = source.batches(Some(&columns), rows)?;
                Ok(Box::new(ParquetDocs { batches, column: self.options.column.clone(), carried: self.carried.clone() }))
            }
            Source::Lines(input) => {
                Ok(Box::new(LineDocs {
                    reader: BufReader::with_capacity(1 << 20, input.file()?),
                    shown: self.shown.clone(),
                    format: self.format,
                    field: self.options.column.clone(),
                    line_number: 0,
                    target_bytes,
                    done: false,
                }))
            }
        }
    }
}

fn detect_format(input: &InputFile, paragraphs: bool) -> Result<TextFormat> {
    let mut magic = [0u8; 4];
    let read = input.file()?.read(&mut magic).unwrap_or(0);
    let extension = input.shown().extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if (read == 4 && &magic == PARQUET_MAGIC) || extension == "parquet" || extension == "pq" {
        return Ok(TextFormat::Parquet);
    }
    if matches!(extension.as_str(), "jsonl" | "ndjson") {
        return Ok(TextFormat::Jsonl);
    }
    Ok(if paragraphs { TextFormat::Paragraphs } else { TextFormat::Lines })
}

fn rows_for_bytes(source: &ParquetSource, column: &str, target_bytes: usize) -> usize {
    let rows = source.num_rows().max(1);
    let bytes = source.column_data_bytes(column).unwrap_or(rows * 256);
    let per_row = (bytes / rows).max(1);
    (target_bytes as u64 / per_row).clamp(16, 65_536) as usize
}

struct ParquetDocs {
    batches: Batches,
    column: String,
    carried: Option<Field>,
}

impl Iterator for ParquetDocs {
    type Item = Result<DocBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = match self.batches.next()? {
            Ok(batch) => batch,
            Err(e) => return Some(Err(e)),
        };
        Some(batch.strings(&self.column).map(|strings| {
            let texts: Vec<String> = (0..strings.len()).map(|i| strings.value(i).to_string()).collect();
            let bytes = texts.iter().map(|t| t.len() as u64).sum();
            let carried = self.carried.as_ref().and_then(|f| batch.column(f.name()).cloned());
            DocBatch { texts, carried, bytes }
        }))
    }
}

struct LineDocs {
    reader: BufReader<File>,
    shown: PathBuf,
    format: TextFormat,
    field: String,
    line_number: u64,
    target_bytes: usize,
    done: bool,
}

impl LineDocs {
    /// The next line without its line ending, or `None` at the end of the file.
    fn next_line(&mut self, buffer: &mut Vec<u8>) -> Result<Option<String>> {
        buffer.clear();
        let read = self.reader.read_until(b'\n', buffer)?;
        if read == 0 {
            return Ok(None);
        }
        self.line_number += 1;
        if buffer.last() == Some(&b'\n') {
            buffer.pop();
            if buffer.last() == Some(&b'\r') {
                buffer.pop();
            }
        }
        match std::str::from_utf8(buffer) {
            Ok(line) => Ok(Some(line.to_string())),
            Err(e) => Err(bad_input(
                &self.shown,
                format!("line {}, byte {}: not valid UTF-8, expected text", self.line_number, e.valid_up_to() + 1),
            )),
        }
    }

    fn jsonl_text(&self, line: &str) -> Result<String> {
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad_input(&self.shown, format!("line {}: not a JSON object ({e})", self.line_number)))?;
        match value.get(&self.field) {
            Some(serde_json::Value::String(text)) => Ok(text.clone()),
            Some(other) => Err(bad_input(
                &self.shown,
                format!("line {}, field `{}`: expected a string, found {other}", self.line_number, self.field),
            )),
            None => Err(bad_input(&self.shown, format!("line {}: no field `{}`", self.line_number, self.field))),
        }
    }

    fn fill(&mut self) -> Result<DocBatch> {
        let mut texts = Vec::new();
        let mut bytes = 0u64;
        let mut buffer = Vec::new();
        let mut paragraph: Option<String> = None;
        loop {
            let Some(line) = self.next_line(&mut buffer)? else {
                self.done = true;
                break;
            };
            bytes += buffer.len() as u64 + 1;
            match self.format {
                TextFormat::Paragraphs if line.trim().is_empty() => {
                    if let Some(text) = paragraph.take() {
                        texts.push(text);
                        if bytes as usize >= self.target_bytes {
                            break;
                        }
                    }
                }
                TextFormat::Paragraphs => match paragraph.as_mut() {
                    Some(text) => {
                        text.push('\n');
                        text.push_str(&line);
                    }
                    None => paragraph = Some(line),
                },
                TextFormat::Jsonl if line.trim().is_empty() => {}
                TextFormat::Jsonl => texts.push(self.jsonl_text(&line)?),
                _ if line.trim().is_empty() => {}
                _ => texts.push(line),
            }
            if self.format != TextFormat::Paragraphs && bytes as usize >= self.target_bytes {
                break;
            }
        }
        texts.extend(paragraph);
        Ok(DocBatch { texts, carried: None, bytes })
    }
}

impl Iterator for LineDocs {
    type Item = Result<DocBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.fill() {
            Ok(batch) if batch.texts.is_empty() && self.done => None,
            Ok(batch) => Some(Ok(batch)),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(content: &str, name: &str, paragraphs: bool) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let options = TextOptions { paragraphs, ..TextOptions::default() };
        let input = TextInput::open(&path, &options).unwrap();
        input
            .batches(8)
            .unwrap()
            .flat_map(|b| b.unwrap().texts)
            .collect()
    }

    #[test]
    fn lines_skip_blank_lines_and_strip_endings() {
        assert_eq!(docs("a b\r\n\nc\n", "x.txt", false), vec!["a b", "c"]);
    }

    #[test]
    fn paragraphs_join_lines() {
        assert_eq!(
            docs("l1\nl2\n\n\nl3\n  \nl4", "x.txt", true),
            vec!["l1\nl2", "l3", "l4"]
        );
    }

    #[test]
    fn jsonl_reads_the_field() {
        assert_eq!(docs("{\"text\": \"a\"}\n\n{\"text\": \"b\\n\"}\n", "x.jsonl", false), vec!["a", "b\n"]);
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::write(&path, b"ok\nbad \xff here\n").unwrap();
        let input = TextInput::open(&path, &TextOptions::default()).unwrap();
        let err = input.batches(1 << 20).unwrap().find_map(|b| b.err()).unwrap();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }
}
