//! `pretrain`: train a decoder (Llama, Mistral, Qwen, Gemma or Phi-3 family) from scratch (or continue one) on token Parquet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use serde::Serialize;

use lathe::cli::{self, CommonArgs};
use lathe::model::Family;
use lathe::pretrain::{ModelShape, PretrainOptions, PretrainTask};
use lathe::tokenizer::log_report;
use lathe::train::{self, RunSetup, TrainArgs};
use lathe::Result;

#[derive(Parser, Serialize)]
#[command(
    name = "pretrain",
    version,
    about = "Train a decoder (Llama, Mistral, Qwen, Gemma or Phi-3 family) on token Parquet; RUN_DIR ends as a Hugging Face model folder",
    after_help = "Examples:\n  pretrain tokens.parquet --config recipes/tiny.toml --tokenizer tokenizer.json -o runs/tiny\n  pretrain tokens.parquet --config recipes/tiny.toml --tokenizer tokenizer.json -o runs/tiny --resume"
)]
struct Args {
    /// Token Parquet files (`tokenize encode` output; `-` for standard input).
    #[arg(required = true, value_name = "TOKENS")]
    inputs: Vec<PathBuf>,
    /// The tokenizer the tokens were encoded with (tokenizer.json or a model folder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Continue from this model folder (or hub id in the local cache) instead of a new model.
    #[arg(long, value_name = "MODEL")]
    init: Option<String>,
    /// The run folder: checkpoints, metrics.jsonl, curves.svg, and the final model.
    #[arg(short, long, value_name = "RUN_DIR")]
    output: PathBuf,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Standard deviation of the initial weights.
    #[arg(long, default_value_t = 0.02)]
    init_std: f64,
    /// The model family (its `model_type`): llama, mistral, qwen2, qwen3, gemma, gemma2 or phi3.
    /// The new model gets that family's architecture with transformers' defaults and is
    /// written in its Hugging Face layout.
    #[arg(long, default_value = "llama")]
    family: String,
    #[arg(long, default_value_t = 256)]
    hidden_size: usize,
    #[arg(long, default_value_t = 688)]
    intermediate_size: usize,
    #[arg(long, default_value_t = 4)]
    num_hidden_layers: usize,
    #[arg(long, default_value_t = 4)]
    num_attention_heads: usize,
    /// Dimensions per attention head [default: hidden_size / num_attention_heads].
    #[arg(long)]
    head_dim: Option<usize>,
    /// Key/value heads (grouped-query attention) [default: num_attention_heads].
    #[arg(long)]
    num_key_value_heads: Option<usize>,
    /// [default: --seq-len]
    #[arg(long)]
    max_position_embeddings: Option<usize>,
    /// Share the embedding and the LM head.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    tie_word_embeddings: bool,
    #[arg(long, default_value_t = 10_000.0)]
    rope_theta: f64,
    #[arg(long, default_value_t = 1e-5)]
    rms_norm_eps: f64,
    #[command(flatten)]
    #[serde(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    cli::start(&args.common, || pretrain(&args))
}

fn pretrain(args: &Args) -> Result<()> {
    args.train.check()?;
    train::check_run_dir(&args.output, args.train.resume)?;
    if let Some(init) = &args.init {
        lathe::output::check_distinct(&args.output, &[std::path::Path::new(init)])?;
    }
    let device = lathe::model::device(&args.train.device)?;
    let mut task = PretrainTask::new(PretrainOptions {
        inputs: args.inputs.clone(),
        tokenizer: args.tokenizer.clone(),
        init: args.init.clone(),
        shape: ModelShape {
            family: Family::from_flag(&args.family)?,
            hidden_size: args.hidden_size,
            intermediate_size: args.intermediate_size,
            num_hidden_layers: args.num_hidden_layers,
            num_attention_heads: args.num_attention_heads,
            head_dim: args.head_dim,
            num_key_value_heads: args.num_key_value_heads,
            max_position_embeddings: args.max_position_embeddings,
            tie_word_embeddings: args.tie_word_embeddings,
            rope_theta: args.rope_theta,
            rms_norm_eps: args.rms_norm_eps,
        },
        seq_len: args.seq_len,
        batch_size: args.train.batch_size,
        init_std: args.init_std,
        seed: args.common.seed,
        val: args.train.val.clone(),
        val_fraction: args.train.val_fraction,
        eval_batches: args.train.eval_batches,
        device,
        gradient_checkpointing: args.train.gradient_checkpointing,
    })?;
    let setup = RunSetup {
        run_dir: args.output.clone(),
        config_toml: cli::resolved_config(args)?,
        seed: args.common.seed,
        threads: rayon::current_num_threads(),
    };
    let report = train::train(&mut task, &args.train, &setup)?;
    log_report("pretrained", &[
        ("steps", report.steps.to_string()),
        ("loss", format!("{:.4}", report.final_loss)),
        ("eval_loss", report.eval_loss.map_or("-".into(), |l| format!("{l:.4}"))),
        ("tokens/s", format!("{:.0}", report.tokens_per_second)),
        ("model", args.output.display().to_string()),
    ]);
    Ok(())
}
