//! `tokenize`: train a byte-level BPE tokenizer, encode text to token ids, decode, inspect.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use lathe::cli::{self, CommonArgs};
use lathe::data::text::TextOptions;
use lathe::tokenizer::{self, DecodeOptions, EncodeOptions, TrainOptions, log_report};
use lathe::Result;

#[derive(Parser)]
#[command(name = "tokenize", version, about = "Train, apply and inspect byte-level BPE tokenizers (Hugging Face tokenizer.json)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a byte-level BPE tokenizer on text (Parquet `text` column, .txt or .jsonl).
    #[command(after_help = "Example:\n  tokenize train shakespeare.parquet --vocab-size 4096 -o tokenizer.json")]
    Train(TrainArgs),
    /// Encode text to token ids (Parquet `input_ids`), appending EOS to every document.
    #[command(after_help = "Example:\n  tokenize encode shakespeare.parquet --tokenizer tokenizer.json -o tokens.parquet")]
    Encode(EncodeArgs),
    /// Decode token ids back to text (Parquet `text`).
    #[command(after_help = "Example:\n  tokenize decode tokens.parquet --tokenizer tokenizer.json -o text.parquet")]
    Decode(DecodeArgs),
    /// Summarise a tokenizer.json, a model folder's tokenizer, or any Parquet file.
    #[command(after_help = "Examples:\n  tokenize inspect tokenizer.json\n  tokenize inspect tokens.parquet --json")]
    Inspect(InspectArgs),
}

/// How text inputs are read.
#[derive(Args, Serialize)]
struct TextArgs {
    /// Parquet column (or JSONL field) holding the text.
    #[arg(long, default_value = "text")]
    column: String,
    /// For .txt inputs: documents are blank-line-separated paragraphs, not lines.
    #[arg(long)]
    paragraphs: bool,
}

impl TextArgs {
    fn options(&self) -> TextOptions {
        TextOptions { column: self.column.clone(), paragraphs: self.paragraphs, ..TextOptions::default() }
    }
}

#[derive(Args, Serialize)]
struct TrainArgs {
    /// Text files: Parquet, .txt or .jsonl (`-` for standard input).
    #[arg(required = true, value_name = "TEXT")]
    inputs: Vec<PathBuf>,
    /// Vocabulary size, including the 256 byte tokens and 4 special tokens.
    #[arg(long, required = true)]
    vocab_size: usize,
    /// Merges must occur at least this often.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    #[command(flatten)]
    #[serde(flatten)]
    text: TextArgs,
    /// Where to write tokenizer.json.
    #[arg(short, long, required = true)]
    output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(Args, Serialize)]
struct EncodeArgs {
    /// Text files: Parquet, .txt or .jsonl (`-` for standard input).
    #[arg(required = true, value_name = "TEXT")]
    inputs: Vec<PathBuf>,
    /// tokenizer.json, or a model folder holding one.
    #[arg(long, required = true)]
    tokenizer: PathBuf,
    /// Do not append the EOS token to each document.
    #[arg(long)]
    no_eos: bool,
    #[command(flatten)]
    #[serde(flatten)]
    text: TextArgs,
    /// Token Parquet to write (`-` for standard output).
    #[arg(short, long, required = true)]
    output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(Args, Serialize)]
struct DecodeArgs {
    /// Token Parquet (`input_ids`; `-` for standard input).
    #[arg(value_name = "TOKENS")]
    input: PathBuf,
    /// The tokenizer.json the tokens were encoded with (or a model folder).
    #[arg(long, required = true)]
    tokenizer: PathBuf,
    /// Text Parquet to write (`-` for standard output).
    #[arg(short, long, required = true)]
    output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(Args, Serialize)]
struct InspectArgs {
    /// tokenizer.json, a model folder, or a Parquet file.
    file: PathBuf,
    /// Print one JSON object instead of lines for people.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let parsed: Cli = cli::parse();
    match parsed.command {
        Command::Train(args) => cli::start(&args.common, || train(&args)),
        Command::Encode(args) => cli::start(&args.common, || encode(&args)),
        Command::Decode(args) => cli::start(&args.common, || decode(&args)),
        Command::Inspect(args) => cli::start(&args.common, || inspect(&args)),
    }
}

/// `paths` as the path slices [`lathe::output::check_distinct`] takes.
fn refs(paths: &[PathBuf]) -> Vec<&Path> {
    paths.iter().map(PathBuf::as_path).collect()
}

fn train(args: &TrainArgs) -> Result<()> {
    lathe::output::check_distinct(&args.output, &refs(&args.inputs))?;
    let report = tokenizer::train(&TrainOptions {
        inputs: args.inputs.clone(),
        text: args.text.options(),
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        output: args.output.clone(),
    })?;
    log_report("trained", &[
        ("documents", report.documents.to_string()),
        ("MB", format!("{:.2}", report.bytes as f64 / 1e6)),
        ("vocab", report.vocab_size.to_string()),
        ("seconds", format!("{:.2}", report.seconds)),
        ("wrote", args.output.display().to_string()),
    ]);
    Ok(())
}

fn encode(args: &EncodeArgs) -> Result<()> {
    let mut inputs = refs(&args.inputs);
    inputs.push(&args.tokenizer);
    lathe::output::check_distinct(&args.output, &inputs)?;
    let report = tokenizer::encode(&EncodeOptions {
        inputs: args.inputs.clone(),
        text: args.text.options(),
        tokenizer: args.tokenizer.clone(),
        append_eos: !args.no_eos,
        output: args.output.clone(),
        config: cli::resolved_config(args)?,
    })?;
    log_report("encoded", &[
        ("documents", report.documents.to_string()),
        ("tokens", report.tokens.to_string()),
        ("MB/s", format!("{:.2}", report.megabytes_per_second())),
        ("seconds", format!("{:.2}", report.seconds)),
    ]);
    Ok(())
}

fn decode(args: &DecodeArgs) -> Result<()> {
    lathe::output::check_distinct(&args.output, &[&args.input, &args.tokenizer])?;
    let report = tokenizer::decode(&DecodeOptions {
        input: args.input.clone(),
        tokenizer: args.tokenizer.clone(),
        output: args.output.clone(),
        config: cli::resolved_config(args)?,
    })?;
    log_report("decoded", &[("rows", report.rows.to_string()), ("tokens", report.tokens.to_string())]);
    Ok(())
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let summary = tokenizer::inspect(&args.file)?;
    if args.json {
        lathe::output::print(&format!("{}\n", serde_json::to_string(&summary)?))
    } else {
        lathe::output::print(&tokenizer::render_inspection(&summary))
    }
}
