//! Data files: the Parquet kinds of SPEC's table, read and written in bounded-memory record
//! batches, with schema checks before any work and `lathe.*` key-value metadata.

pub mod parquet_io;
pub mod records;
pub mod text;

use arrow::datatypes::{DataType, Field};

pub use parquet_io::{Batch, Batches, ParquetSink, ParquetSource};
pub use records::*;

/// Key-value metadata keys every Parquet we write carries.
pub mod meta {
    /// `kind/version`, e.g. `tokens/1`.
    pub const SCHEMA: &str = "lathe.schema";
    /// `lathe-<stage> <version>`.
    pub const WRITER: &str = "lathe.writer";
    /// The resolved configuration of the writing stage (TOML).
    pub const CONFIG: &str = "lathe.config";
    /// Tokens only: SHA-256 of the tokenizer's canonical JSON, and its vocabulary size.
    pub const TOKENIZER_SHA256: &str = "lathe.tokenizer_sha256";
    pub const VOCAB_SIZE: &str = "lathe.vocab_size";
    /// Tokens only: whether an EOS id ends every row.
    pub const EOS_APPENDED: &str = "lathe.eos_appended";
    pub const EOS_ID: &str = "lathe.eos_id";
}

/// The data kinds of SPEC's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Tokens,
    Chat,
    PromptCompletion,
    Prompts,
    Responses,
    Scored,
    Preferences,
    LabeledText,
    Findings,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Text,
        Kind::Tokens,
        Kind::Chat,
        Kind::PromptCompletion,
        Kind::Prompts,
        Kind::Responses,
        Kind::Scored,
        Kind::Preferences,
        Kind::LabeledText,
        Kind::Findings,
    ];
    /// Version of the column layout this build writes and reads.
    pub const VERSION: u32 = 1;

    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Tokens => "tokens",
            Kind::Chat => "chat",
            Kind::PromptCompletion => "prompt-completion",
            Kind::Prompts => "prompts",
            Kind::Responses => "responses",
            Kind::Scored => "scored",
            Kind::Preferences => "preferences",
            Kind::LabeledText => "labeled-text",
            Kind::Findings => "findings",
        }
    }

    /// The value of `lathe.schema`.
    pub fn tag(self) -> String {
        format!("{}/{}", self.name(), Self::VERSION)
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Kinds whose rows are also valid rows of `self` (a scored file is a responses file).
    fn accepts(self, written: Kind) -> bool {
        self == written
            || matches!(
                (self, written),
                (Kind::Responses, Kind::Scored) | (Kind::Prompts, Kind::Responses) | (Kind::Prompts, Kind::Scored)
            )
    }
}

/// Column types as SPEC states them; each accepts the physical types other writers use
/// (pandas' int64, large strings, string views, dictionary-encoded strings, large lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    Str,
    Int,
    Float,
    Bool,
    IntList,
    StrList,
    Messages,
}

impl ColumnType {
    pub fn describe(self) -> &'static str {
        match self {
            ColumnType::Str => "string",
            ColumnType::Int => "integer",
            ColumnType::Float => "number",
            ColumnType::Bool => "boolean",
            ColumnType::IntList => "list<int>",
            ColumnType::StrList => "list<string>",
            ColumnType::Messages => "list<struct<role: string, content: string>>",
        }
    }

    pub fn accepts(self, data_type: &DataType) -> bool {
        match self {
            ColumnType::Str => is_string(data_type),
            ColumnType::Int => data_type.is_integer(),
            ColumnType::Float => data_type.is_floating() || data_type.is_integer(),
            ColumnType::Bool => matches!(data_type, DataType::Boolean),
            ColumnType::IntList => list_item(data_type).is_some_and(|f| f.data_type().is_integer()),
            ColumnType::StrList => list_item(data_type).is_some_and(|f| is_string(f.data_type())),
            ColumnType::Messages => list_item(data_type).is_some_and(|f| match f.data_type() {
                DataType::Struct(fields) => ["role", "content"].iter().all(|name| {
                    fields.iter().any(|sub| sub.name() == name && is_string(sub.data_type()))
                }),
                _ => false,
            }),
        }
    }
}

pub fn is_string(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, value) => is_string(value),
        _ => false,
    }
}

pub fn list_item(data_type: &DataType) -> Option<&Field> {
    match data_type {
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) | DataType::LargeListView(f) => Some(f),
        DataType::FixedSizeList(f, _) => Some(f),
        _ => None,
    }
}

/// Readable name of an Arrow type for error messages.
pub fn describe_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        t if t.is_integer() => format!("integer ({t})"),
        DataType::List(f) | DataType::LargeList(f) => format!("list<{}>", describe_type(f.data_type())),
        DataType::Struct(fields) => format!(
            "struct<{}>",
            fields
                .iter()
                .map(|f| format!("{}: {}", f.name(), describe_type(f.data_type())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}
