//! `dpo`: direct preference optimisation (DPO, cDPO, robust, hinge, IPO, SimPO, KTO) of a causal
//! LM on preference pairs or judged answers; the run folder ends as the tuned model.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::dpo::loss::{Loss, LossSettings};
use lathe::dpo::{DpoOptions, DpoTask, Sampling};
use lathe::model::folder::ModelFolder;
use lathe::model::lora::LoraArgs;
use lathe::tokenizer::log_report;
use lathe::train::{self, RunSetup, TrainArgs};

#[derive(Parser, Serialize)]
#[command(
    name = "dpo",
    version,
    about = "Tune a causal LM on preference pairs (DPO, cDPO, robust, hinge, IPO, SimPO) or judged answers (KTO), with TRL's losses and metric names",
    after_help = "Examples:\n  dpo prefs.parquet --model runs/sft --config recipes/dpo-tiny.toml --val-fraction 0.1 -o runs/dpo\n  dpo prefs.parquet --model runs/sft --loss ipo --beta 0.5 --max-length 512 --max-prompt-length 256 -o runs/ipo\n  dpo judged.parquet --model runs/sft --loss kto --undesirable-weight 1.33 -o runs/kto\n  dpo prefs.parquet --model runs/sft -o runs/dpo --resume"
)]
struct Args {
    /// Preference Parquet: `prompt`, `chosen`, `rejected` as text (SPEC) or chat messages (TRL's
    /// conversational form); for --loss kto also `prompt`, `completion`, `label` rows.
    #[arg(required = true, value_name = "PREFS")]
    inputs: Vec<PathBuf>,
    /// The model to tune: a folder (or hub id in the local cache) with a causal LM.
    #[arg(long, value_name = "MODEL")]
    model: String,
    /// The reference model [default: the model as it starts]. Its log-probabilities are computed
    /// once before training and kept in the run folder.
    #[arg(long, value_name = "MODEL")]
    ref_model: Option<String>,
    /// The run folder: checkpoints, metrics.jsonl, curves.svg, reference_logps.json, and the final model.
    #[arg(short, long, value_name = "RUN_DIR")]
    output: PathBuf,
    #[arg(long, value_enum, default_value_t = Loss::Sigmoid)]
    loss: Loss,
    /// How far from the reference the policy may move (higher: closer); IPO's τ.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// sigmoid: cDPO's label smoothing; robust: the probability a label is flipped; simpo: its smoothing.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// simpo: the target reward margin γ.
    #[arg(long, default_value_t = 0.5)]
    simpo_gamma: f64,
    /// RPO: add α × the mean negative log-likelihood of the chosen answers' tokens.
    #[arg(long, value_name = "A")]
    rpo_alpha: Option<f64>,
    /// kto: weight of the desirable answers' losses.
    #[arg(long, default_value_t = 1.0)]
    desirable_weight: f64,
    /// kto: weight of the undesirable answers' losses.
    #[arg(long, default_value_t = 1.0)]
    undesirable_weight: f64,
    /// Longest prompt + answer in tokens [default: 1024, or the model's max_position_embeddings
    /// if shorter]; answers are cut at the end to fit, pairs whose prompt alone fills it are
    /// left out (counted).
    #[arg(long)]
    max_length: Option<usize>,
    /// Keep only the last N tokens of longer prompts.
    #[arg(long, value_name = "N")]
    max_prompt_length: Option<usize>,
    /// A Jinja chat template for conversational data instead of the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Batch order: random (a new shuffle every epoch; KTO's batches are drawn once, keeping
    /// their KL pairs) or sequential (file order, as KTOTrainer defaults to).
    #[arg(long, value_enum, default_value_t = Sampling::Random)]
    sampling: Sampling,
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
    cli::start(&args.common, || dpo(&args))
}

fn dpo(args: &Args) -> Result<()> {
    args.train.check()?;
    train::check_run_dir(&args.output, args.train.resume)?;
    let models: Vec<&std::path::Path> = std::iter::once(&args.model).chain(&args.ref_model).map(std::path::Path::new).collect();
    lathe::output::check_distinct(&args.output, &models)?;
    let mut task = DpoTask::new(DpoOptions {
        inputs: args.inputs.clone(),
        model: args.model.clone(),
        ref_model: args.ref_model.clone(),
        chat_template: args.chat_template.clone(),
        settings: LossSettings {
            loss: args.loss,
            beta: args.beta,
            label_smoothing: args.label_smoothing,
            simpo_gamma: args.simpo_gamma,
            rpo_alpha: args.rpo_alpha,
            desirable_weight: args.desirable_weight,
            undesirable_weight: args.undesirable_weight,
        },
        max_length: ModelFolder::open(&args.model)?.fit_max_length("dpo", args.max_length, 1024)?,
        max_prompt_length: args.max_prompt_length,
        sampling: args.sampling,
        batch_size: args.train.batch_size,
        seed: args.common.seed,
        val: args.train.val.clone(),
        val_fraction: args.train.val_fraction,
        eval_batches: args.train.eval_batches,
        device: lathe::model::device(&args.train.device)?,
        lora: args.lora.settings()?,
        gradient_checkpointing: args.train.gradient_checkpointing,
        run_dir: args.output.clone(),
    })?;
    let setup = RunSetup {
        run_dir: args.output.clone(),
        config_toml: cli::resolved_config(args)?,
        seed: args.common.seed,
        threads: rayon::current_num_threads(),
    };
    let report = train::train(&mut task, &args.train, &setup)?;
    let shown = |name: &str| report.eval_metrics.get(name).and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.4}"));
    log_report("tuned", &[
        ("steps", report.steps.to_string()),
        ("loss", format!("{:.4}", report.final_loss)),
        ("eval_loss", shown("eval_loss")),
        ("eval_rewards/accuracies", shown("eval_rewards/accuracies")),
        ("eval_rewards/margins", shown("eval_rewards/margins")),
        ("tokens/s", format!("{:.0}", report.tokens_per_second)),
        ("model", args.output.display().to_string()),
    ]);
    Ok(())
}
