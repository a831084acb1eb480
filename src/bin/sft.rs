//! `sft`: supervised fine-tuning on chat or prompt/completion data, loss on the answers only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::model::ModelFolder;
use lathe::model::lora::LoraArgs;
use lathe::sft::{SftOptions, SftTask};
use lathe::tokenizer::log_report;
use lathe::train::sequences::Truncation;
use lathe::train::{self, RunSetup, TrainArgs};

#[derive(Parser, Serialize)]
#[command(
    name = "sft",
    version,
    about = "Instruction-tune a causal LM on chat (`messages`) or `prompt`/`completion` Parquet; loss on the answers only",
    after_help = "Examples:\n  sft testdata/sft_alpaca_messages.parquet --model runs/tiny --config recipes/sft-tiny.toml -o runs/sft\n  sft chats.parquet --model Qwen/Qwen2.5-0.5B-Instruct --packing --max-length 512 --val-fraction 0.05 -o runs/sft\n  sft chats.parquet --model runs/tiny -o runs/sft --resume"
)]
struct Args {
    /// Chat or prompt/completion Parquet files (`-` for standard input).
    #[arg(required = true, value_name = "DATA")]
    inputs: Vec<PathBuf>,
    /// The model to tune: a folder (or hub id in the local cache) with a causal LM.
    #[arg(long, value_name = "MODEL")]
    model: String,
    /// The run folder: checkpoints, metrics.jsonl, curves.svg, and the final model.
    #[arg(short, long, value_name = "RUN_DIR")]
    output: PathBuf,
    /// A Jinja chat template to render conversations with instead of the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Render prompt/completion rows as a user turn and an assistant turn with the chat template.
    #[arg(long)]
    as_chat: bool,
    /// Train on every token, not only the answers.
    #[arg(long)]
    train_on_prompt: bool,
    /// Longest sequence in tokens [default: 1024, or the model's max_position_embeddings if shorter].
    #[arg(long)]
    max_length: Option<usize>,
    /// What to do with longer sequences: right keeps the start, left keeps the end, drop leaves them out.
    #[arg(long, value_enum, default_value_t = Truncation::Right)]
    truncation: Truncation,
    /// Pack several samples into each row of --max-length tokens (they never attend to each other).
    #[arg(long)]
    packing: bool,
    #[command(flatten)]
    #[serde(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    #[serde(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    cli::start(&args.common, || sft(&args))
}

fn sft(args: &Args) -> Result<()> {
    args.train.check()?;
    train::check_run_dir(&args.output, args.train.resume)?;
    lathe::output::check_distinct(&args.output, &[std::path::Path::new(&args.model)])?;
    let mut task = SftTask::new(SftOptions {
        inputs: args.inputs.clone(),
        model: args.model.clone(),
        chat_template: args.chat_template.clone(),
        prompt_completion_as_chat: args.as_chat,
        train_on_prompt: args.train_on_prompt,
        max_length: ModelFolder::open(&args.model)?.fit_max_length("sft", args.max_length, 1024)?,
        truncation: args.truncation,
        packing: args.packing,
        batch_size: args.train.batch_size,
        seed: args.common.seed,
        val: args.train.val.clone(),
        val_fraction: args.train.val_fraction,
        eval_batches: args.train.eval_batches,
        device: lathe::model::device(&args.train.device)?,
        lora: args.lora.settings()?,
        gradient_checkpointing: args.train.gradient_checkpointing,
    })?;
    let setup = RunSetup {
        run_dir: args.output.clone(),
        config_toml: cli::resolved_config(args)?,
        seed: args.common.seed,
        threads: rayon::current_num_threads(),
    };
    let report = train::train(&mut task, &args.train, &setup)?;
    let figure = |name: &str| report.eval_metrics.get(name).and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.4}"));
    log_report("fine-tuned", &[
        ("steps", report.steps.to_string()),
        ("loss", format!("{:.4}", report.final_loss)),
        ("eval_loss", figure("eval_loss")),
        ("eval_mean_token_accuracy", figure("eval_mean_token_accuracy")),
        ("tokens/s", format!("{:.0}", report.tokens_per_second)),
        ("model", args.output.display().to_string()),
    ]);
    Ok(())
}
