//! Parquet in and out: a source that checks before it streams, a sink that writes atomically.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int32Type, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, ParquetMetaData};
use parquet::file::properties::WriterProperties;

use super::records::Message;
use super::{ColumnType, Kind, describe_type, meta};
use crate::error::{Error, Result, bad_input};
use crate::output::{InputFile, Sink, root_cause, write_failed};

/// Rows per record batch when reading: bounded memory, big enough to amortise per-batch work.
pub const DEFAULT_BATCH_ROWS: usize = 4096;

/// A Parquet file opened and checked, ready to stream record batches.
pub struct ParquetSource {
    input: InputFile,
    schema: SchemaRef,
    metadata: BTreeMap<String, String>,
    file_metadata: Arc<ParquetMetaData>,
    rows: u64,
}

impl ParquetSource {
    /// Open `path` (`-` for standard input); bad input if missing, empty or not Parquet.
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_input(InputFile::open(path)?)
    }

    pub fn from_input(input: InputFile) -> Result<Self> {
        let file = input.file()?;
        if file.metadata()?.len() == 0 {
            return Err(bad_input(input.shown(), "empty file, expected a Parquet file"));
        }
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad_input(input.shown(), format!("not a readable Parquet file ({e})")))?;
        let file_metadata = builder.metadata().file_metadata();
        let metadata = file_metadata
            .key_value_metadata()
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ParquetSource {
            input,
            schema: builder.schema().clone(),
            metadata,
            rows: file_metadata.num_rows().max(0) as u64,
            file_metadata: builder.metadata().clone(),
        })
    }

    pub fn path(&self) -> &Path {
        self.input.shown()
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn num_rows(&self) -> u64 {
        self.rows
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The kind recorded by the writer, if a lathe stage wrote this file.
    pub fn written_kind(&self) -> Option<Kind> {
        self.meta(meta::SCHEMA)
            .and_then(|tag| tag.split('/').next())
            .and_then(Kind::from_name)
    }

    /// Uncompressed bytes of a top-level column (data plus offsets), from the footer.
    pub fn column_data_bytes(&self, name: &str) -> Option<u64> {
        let bytes: i64 = self
            .file_metadata
            .row_groups()
            .iter()
            .flat_map(|rg| rg.columns())
            .filter(|c| c.column_path().parts().first().is_some_and(|p| p == name))
            .map(|c| c.uncompressed_size())
            .sum();
        (bytes > 0).then_some(bytes as u64)
    }

    pub fn has_column(&self, name: &str) -> bool {
        self.schema.field_with_name(name).is_ok()
    }

    /// Bad input unless `name` exists with a type `expected` accepts.
    pub fn require(&self, name: &str, expected: ColumnType) -> Result<()> {
        match self.schema.field_with_name(name) {
            Err(_) => Err(bad_input(
                self.path(),
                format!("no column `{name}` (expected {}; columns: {})", expected.describe(), self.column_names()),
            )),
            Ok(field) if !expected.accepts(field.data_type()) => Err(bad_input(
                self.path(),
                format!(
                    "column `{name}`: expected {}, found {}",
                    expected.describe(),
                    describe_type(field.data_type())
                ),
            )),
            Ok(_) => Ok(()),
        }
    }

    /// Like [`Self::require`] for a column that may be absent.
    pub fn optional(&self, name: &str, expected: ColumnType) -> Result<bool> {
        if self.has_column(name) { self.require(name, expected).map(|_| true) } else { Ok(false) }
    }

    /// Refuse files that a lathe stage wrote as another kind, or with a newer layout.
    pub fn expect_kind(&self, kind: Kind) -> Result<()> {
        let Some(tag) = self.meta(meta::SCHEMA) else { return Ok(()) };
        let (name, version) = tag.split_once('/').unwrap_or((tag, "1"));
        let written = Kind::from_name(name);
        if written.is_some_and(|w| !kind.accepts(w)) {
            return Err(bad_input(self.path(), format!("holds {name} data ({tag}), expected {} data", kind.name())));
        }
        if version.parse::<u32>().map_or(true, |v| v > Kind::VERSION) {
            return Err(bad_input(
                self.path(),
                format!("written with layout {tag}, this lathe reads {}", kind.tag()),
            ));
        }
        Ok(())
    }

    pub fn column_names(&self) -> String {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Stream record batches of the named columns (all columns when `columns` is `None`).
    pub fn batches(&self, columns: Option<&[&str]>, batch_rows: usize) -> Result<Batches> {
        let mut builder = ParquetRecordBatchReaderBuilder::try_new(self.input.file()?)
            .map_err(|e| bad_input(self.path(), format!("not a readable Parquet file ({e})")))?
            .with_batch_size(batch_rows.max(1));
        if let Some(columns) = columns {
            let indices = columns
                .iter()
                .map(|name| {
                    self.schema
                        .index_of(name)
                        .map_err(|_| bad_input(self.path(), format!("no column `{name}` (columns: {})", self.column_names())))
                })
                .collect::<Result<Vec<_>>>()?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
            builder = builder.with_projection(mask);
        }
        Ok(Batches { reader: builder.build()?, path: Arc::from(self.path()), next_row: 0, failed: false })
    }
}

/// Record batches of one file, numbered so errors can name the row. It ends after its first
/// error: the Parquet reader behind it would repeat a decoding error forever.
pub struct Batches {
    reader: ParquetRecordBatchReader,
    path: Arc<Path>,
    next_row: u64,
    failed: bool,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.reader.next()?;
        self.failed = item.is_err();
        Some(match item {
            Ok(data) => {
                let first_row = self.next_row;
                self.next_row += data.num_rows() as u64;
                Ok(Batch { data, first_row, path: self.path.clone() })
            }
            Err(e) => Err(bad_input(
                self.path.as_ref(),
                format!("row {}: cannot decode Parquet data ({e})", self.next_row),
            )),
        })
    }
}

/// One record batch with typed, null-checked column access. Row numbers in errors count from 0
/// over the whole file, as pandas does.
pub struct Batch {
    pub data: RecordBatch,
    pub first_row: u64,
    path: Arc<Path>,
}

/// Lists of integer ids: one borrowed slice per row.
pub struct IntLists {
    offsets: OffsetBuffer<i32>,
    values: ScalarBuffer<i32>,
}

impl IntLists {
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn row(&self, i: usize) -> &[i32] {
        let (start, end) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        &self.values[start..end]
    }
}

impl Batch {
    pub fn len(&self) -> usize {
        self.data.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error at row `i` of this batch.
    pub fn error_at(&self, i: usize, column: &str, what: impl std::fmt::Display) -> Error {
        bad_input(self.path.as_ref(), format!("row {}, column `{column}`: {what}", self.first_row + i as u64))
    }

    pub fn column(&self, name: &str) -> Option<&ArrayRef> {
        self.data.column_by_name(name)
    }

    fn required_column(&self, name: &str) -> Result<&ArrayRef> {
        self.column(name)
            .ok_or_else(|| bad_input(self.path.as_ref(), format!("no column `{name}`")))
    }

    fn cast_to(&self, name: &str, array: &ArrayRef, to: &DataType, expected: ColumnType) -> Result<ArrayRef> {
        if array.data_type() == to {
            return Ok(array.clone());
        }
        cast(array, to).map_err(|e| {
            bad_input(self.path.as_ref(), format!("column `{name}`: expected {} ({e})", expected.describe()))
        })
    }

    fn no_nulls(&self, name: &str, array: &dyn Array, expected: ColumnType) -> Result<()> {
        if array.null_count() > 0 {
            let i = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
            return Err(self.error_at(i, name, format!("null, expected {}", expected.describe())));
        }
        Ok(())
    }

    /// A string column without nulls.
    pub fn strings(&self, name: &str) -> Result<StringArray> {
        let strings = self.optional_strings(name)?;
        self.no_nulls(name, &strings, ColumnType::Str)?;
        Ok(strings)
    }

    /// A string column that may hold nulls.
    pub fn optional_strings(&self, name: &str) -> Result<StringArray> {
        let array = self.cast_to(name, self.required_column(name)?, &DataType::Utf8, ColumnType::Str)?;
        Ok(array.as_string::<i32>().clone())
    }

    pub fn i64s(&self, name: &str) -> Result<Int64Array> {
        let array = self.cast_to(name, self.required_column(name)?, &DataType::Int64, ColumnType::Int)?;
        self.no_nulls(name, &array, ColumnType::Int)?;
        Ok(array.as_primitive().clone())
    }

    pub fn f64s(&self, name: &str) -> Result<Float64Array> {
        let array = self.optional_f64s(name)?;
        self.no_nulls(name, &array, ColumnType::Float)?;
        Ok(array)
    }

    pub fn optional_f64s(&self, name: &str) -> Result<Float64Array> {
        let array = self.cast_to(name, self.required_column(name)?, &DataType::Float64, ColumnType::Float)?;
        Ok(array.as_primitive().clone())
    }

    pub fn bools(&self, name: &str) -> Result<BooleanArray> {
        let array = self.optional_bools(name)?;
        self.no_nulls(name, &array, ColumnType::Bool)?;
        Ok(array)
    }

    pub fn optional_bools(&self, name: &str) -> Result<BooleanArray> {
        let array = self.cast_to(name, self.required_column(name)?, &DataType::Boolean, ColumnType::Bool)?;
        Ok(array.as_boolean().clone())
    }

    /// A column of integer lists (any integer width, list or large list) as i32 rows.
    pub fn int_lists(&self, name: &str) -> Result<IntLists> {
        let to = DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true)));
        let original = self.required_column(name)?;
        let array = self.cast_to(name, original, &to, ColumnType::IntList)?;
        self.no_nulls(name, &array, ColumnType::IntList)?;
        let list = array.as_list::<i32>();
        let values = list.values().as_primitive::<Int32Type>();
        if values.null_count() > 0 {
            let bad = (0..values.len()).find(|&i| values.is_null(i)).unwrap_or(0);
            let row = list.offsets().partition_point(|&o| o as usize <= bad).saturating_sub(1);
            return Err(self.error_at(row, name, "null or out-of-range id, expected 32-bit integers"));
        }
        Ok(IntLists { offsets: list.offsets().clone(), values: values.values().clone() })
    }

    /// Token ids: integer lists whose every id is in `0..vocab`.
    pub fn token_ids(&self, name: &str, vocab: usize) -> Result<IntLists> {
        let lists = self.int_lists(name)?;
        for i in 0..lists.len() {
            if let Some(bad) = lists.row(i).iter().find(|&&id| id < 0 || id as usize >= vocab) {
                return Err(self.error_at(i, name, format!("token id {bad} outside the vocabulary of {vocab}")));
            }
        }
        Ok(lists)
    }

    /// A column of string lists, one `Vec<String>` per row.
    pub fn string_lists(&self, name: &str) -> Result<Vec<Vec<String>>> {
        let to = DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)));
        let array = self.cast_to(name, self.required_column(name)?, &to, ColumnType::StrList)?;
        self.no_nulls(name, &array, ColumnType::StrList)?;
        let list = array.as_list::<i32>();
        let values = list.values().as_string::<i32>();
        (0..list.len())
            .map(|row| {
                let (start, end) = (list.offsets()[row] as usize, list.offsets()[row + 1] as usize);
                (start..end)
                    .map(|j| {
                        if values.is_null(j) {
                            Err(self.error_at(row, name, "null item, expected strings"))
                        } else {
                            Ok(values.value(j).to_string())
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// A chat column: `list<struct<role, content>>` (extra struct fields are ignored).
    pub fn messages(&self, name: &str) -> Result<Vec<Vec<Message>>> {
        self.optional_messages(name)?
            .into_iter()
            .enumerate()
            .map(|(row, messages)| {
                messages.ok_or_else(|| self.error_at(row, name, format!("null, expected {}", ColumnType::Messages.describe())))
            })
            .collect()
    }

    /// A chat column whose rows may be null.
    pub fn optional_messages(&self, name: &str) -> Result<Vec<Option<Vec<Message>>>> {
        let original = self.required_column(name)?;
        let expected = ColumnType::Messages;
        let item = super::list_item(original.data_type())
            .filter(|_| expected.accepts(original.data_type()))
            .ok_or_else(|| {
                bad_input(
                    self.path.as_ref(),
                    format!("column `{name}`: expected {}, found {}", expected.describe(), describe_type(original.data_type())),
                )
            })?
            .clone();
        let array = self.cast_to(name, original, &DataType::List(Arc::new(item)), expected)?;
        let list = array.as_list::<i32>();
        let items = list.values().as_struct();
        let field = |field: &str| -> Result<StringArray> {
            let column = items.column_by_name(field).expect("checked by ColumnType::Messages");
            let column = self.cast_to(name, column, &DataType::Utf8, ColumnType::Str)?;
            Ok(column.as_string::<i32>().clone())
        };
        let (roles, contents) = (field("role")?, field("content")?);
        (0..list.len())
            .map(|row| {
                if list.is_null(row) {
                    return Ok(None);
                }
                let (start, end) = (list.offsets()[row] as usize, list.offsets()[row + 1] as usize);
                (start..end)
                    .map(|j| {
                        if items.is_null(j) || roles.is_null(j) {
                            return Err(self.error_at(row, name, format!("message {}: missing role", j - start)));
                        }
                        if contents.is_null(j) {
                            return Err(self.error_at(row, name, format!("message {}: null content", j - start)));
                        }
                        Ok(Message { role: roles.value(j).to_string(), content: contents.value(j).to_string() })
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            })
            .collect()
    }
}

/// `lathe.*` metadata for a file of `kind` written by `stage`.
pub fn lathe_metadata(kind: Kind, stage: &str) -> Vec<(String, String)> {
    vec![
        (meta::SCHEMA.into(), kind.tag()),
        (meta::WRITER.into(), format!("lathe-{stage} {}", env!("CARGO_PKG_VERSION"))),
    ]
}

/// Row groups are cut at this size so writing a huge file never buffers it whole.
const ROW_GROUP_BYTES: usize = 64 << 20;

/// A Parquet output written to a temporary name and renamed into place by [`ParquetSink::finish`].
pub struct ParquetSink {
    writer: ArrowWriter<Sink>,
    schema: SchemaRef,
    rows: u64,
    destination: std::path::PathBuf,
}

impl ParquetSink {
    /// `metadata` goes in the footer and in the Arrow schema stored there, which is where
    /// pyarrow (`schema.metadata`), pandas, polars and DuckDB look for it.
    pub fn create(path: &Path, schema: SchemaRef, metadata: Vec<(String, String)>) -> Result<Self> {
        let sink = Sink::create(path)?;
        let mut schema_metadata = schema.metadata().clone();
        schema_metadata.extend(metadata.iter().cloned());
        let stored = Arc::new(schema.as_ref().clone().with_metadata(schema_metadata));
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .set_created_by(format!("lathe {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(Some(metadata.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect()))
            .build();
        let destination = sink.destination().to_path_buf();
        let writer = ArrowWriter::try_new(sink, stored, Some(properties))?;
        Ok(ParquetSink { writer, schema, rows: 0, destination })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).map_err(|e| write_failed(&self.destination, root_cause(&e)))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Write the footer and move the file into place; returns the number of rows written.
    pub fn finish(self) -> Result<u64> {
        // `into_inner` writes the footer and hands back the sink to commit.
        let destination = self.destination;
        self.writer.into_inner().map_err(|e| write_failed(&destination, root_cause(&e)))?.commit()?;
        Ok(self.rows)
    }
}
