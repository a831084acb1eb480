//! `generate`: sample responses to prompts with a model, through the KV cache.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::cli::{self, CommonArgs};
use lathe::generate::{self, GenerateOptions, PromptTruncation, Sampling};
use lathe::tokenizer::log_report;
use lathe::Result;

#[derive(Parser, Serialize)]
#[command(
    name = "generate",
    version,
    about = "Sample responses to prompts (Parquet `prompt` or chat `messages`, or JSONL) with a model",
    after_help = "Examples:\n  generate prompts.parquet --model runs/tiny -n 4 --temperature 0.8 --top-p 0.95 -o responses.parquet\n  generate prompts.jsonl --model runs/tiny --temperature 0 -o -"
)]
struct Args {
    /// Prompts: Parquet with `prompt` (text) or `messages` (chat) and optional `prompt_id`,
    /// or JSONL objects with the same fields (`-` for standard input, Parquet).
    #[arg(value_name = "PROMPTS")]
    prompts: PathBuf,
    /// Model folder or hub id (in the local cache).
    #[arg(long)]
    model: String,
    /// Samples per prompt.
    #[arg(short = 'n', long = "samples", default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// A Jinja chat template to use instead of the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// A prompt too long for the model with --max-new-tokens: none refuses it, left keeps its
    /// end (counted and reported).
    #[arg(long, value_enum, default_value_t = PromptTruncation::None)]
    truncate_prompt: PromptTruncation,
    /// Generate --max-new-tokens even after an EOS (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print this many responses on the terminal when done (the prompt, a bar, the response).
    #[arg(long, default_value_t = 0)]
    show: usize,
    /// Responses Parquet to write (`-` for standard output).
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    cli::start(&args.common, || run(&args))
}

fn run(args: &Args) -> Result<()> {
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        return Err(lathe::error::usage(format!("--top-p {}: expected a number in (0, 1]", args.top_p)));
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(lathe::error::usage(format!("--temperature {}: expected a finite number >= 0 (0 is greedy)", args.temperature)));
    }
    let report = generate::generate(&GenerateOptions {
        model: args.model.clone(),
        prompts: args.prompts.clone(),
        samples: args.samples,
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p },
        seed: args.common.seed,
        batch_size: args.batch_size,
        output: args.output.clone(),
        chat_template: args.chat_template.clone(),
        ignore_eos: args.ignore_eos,
        truncate_prompt: args.truncate_prompt,
        device: lathe::model::device(&args.device)?,
        config: cli::resolved_config(args)?,
        show: args.show,
    })?;
    log_report("generated", &[
        ("prompts", report.prompts.to_string()),
        ("responses", report.responses.to_string()),
        ("new tokens", report.new_tokens.to_string()),
        ("tokens/s", format!("{:.1}", report.tokens_per_second())),
    ]);
    Ok(())
}
