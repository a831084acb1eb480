//! `rm-train`: train reward models (Bradley–Terry on preference pairs, regression on scores) and
//! multi-label guard classifiers; the run folder ends as a `LlamaForSequenceClassification`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::cli::{self, CommonArgs};
use lathe::model::ModelFolder;
use lathe::model::lora::LoraArgs;
use lathe::reward::{Objective, RewardOptions, RewardTask};
use lathe::tokenizer::log_report;
use lathe::train::sequences::Truncation;
use lathe::train::{self, RunSetup, TrainArgs};
use lathe::{Error, Result};

#[derive(Parser, Serialize)]
#[command(
    name = "rm-train",
    version,
    about = "Train a reward model or a multi-label guard classifier (…ForSequenceClassification, in the base model's family) from a causal LM or an earlier classifier",
    after_help = "Examples:\n  rm-train prefs.parquet --model runs/sft --val-fraction 0.1 --min-accuracy 0.6 -o runs/rm\n  rm-train ratings.parquet --model runs/sft --task regression --score-column score -o runs/rm-reg\n  rm-train testdata/moderation_openai_samples.slice.parquet --model runs/tiny --task multilabel --val-fraction 0.25 -o runs/guard\n  rm-train reviewed.parquet --model runs/guard --task multilabel -o runs/guard-2"
)]
struct Args {
    /// Preference, scored-text or labeled-text Parquet files (`-` for standard input).
    #[arg(required = true, value_name = "DATA")]
    inputs: Vec<PathBuf>,
    /// The starting model: a causal LM (its LM head is dropped) or a sequence classifier.
    #[arg(long, value_name = "MODEL")]
    model: String,
    /// The run folder: checkpoints, metrics.jsonl, eval.json, curves.svg, and the final model.
    #[arg(short, long, value_name = "RUN_DIR")]
    output: PathBuf,
    #[arg(long, value_enum, default_value_t = Objective::Preference)]
    task: Objective,
    /// multilabel: the labels, in order [default: the model's, else the data's].
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// regression: the numeric target column.
    #[arg(long, default_value = "score")]
    score_column: String,
    /// preference: add COEF · mean((r_chosen + r_rejected)²) to keep rewards centred on zero.
    #[arg(long, value_name = "COEF")]
    center_rewards: Option<f64>,
    /// multilabel: choose each label's threshold as the lowest reaching this held-out precision
    /// [default: the threshold of best F1].
    #[arg(long, value_name = "P")]
    target_precision: Option<f64>,
    /// preference: exit 3 when the final held-out accuracy is below X.
    #[arg(long, value_name = "X")]
    min_accuracy: Option<f64>,
    /// Longest sequence in tokens [default: 512, or the model's max_position_embeddings if shorter].
    #[arg(long)]
    max_length: Option<usize>,
    /// Over-long sequences: left keeps the end (the response and EOS), right keeps the start, drop leaves the example out.
    #[arg(long, value_enum, default_value_t = Truncation::Left)]
    truncation: Truncation,
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
    cli::start(&args.common, || rm_train(&args))
}

fn rm_train(args: &Args) -> Result<()> {
    args.train.check()?;
    if let Some(x) = args.min_accuracy {
        if !(0.0..=1.0).contains(&x) {
            return Err(lathe::error::usage(format!("--min-accuracy {x}: expected an accuracy in [0, 1]")));
        }
        if args.task != Objective::Preference {
            return Err(lathe::error::usage("--min-accuracy applies to --task preference"));
        }
        if args.train.val.is_none() && args.train.val_fraction.is_none() {
            return Err(lathe::error::usage(format!("--min-accuracy {x} needs held-out data: give --val FILE or --val-fraction F")));
        }
    }
    train::check_run_dir(&args.output, args.train.resume)?;
    lathe::output::check_distinct(&args.output, &[std::path::Path::new(&args.model)])?;
    let mut task = RewardTask::new(RewardOptions {
        inputs: args.inputs.clone(),
        model: args.model.clone(),
        objective: args.task,
        labels: args.labels.clone(),
        score_column: args.score_column.clone(),
        center_rewards: args.center_rewards,
        target_precision: args.target_precision,
        max_length: ModelFolder::open(&args.model)?.fit_max_length("rm-train", args.max_length, 512)?,
        truncation: args.truncation,
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
    let figure = |name: &str| report.eval_metrics.get(name).and_then(|v| v.as_f64());
    let shown = |name: &str| figure(name).map_or("-".into(), |v| format!("{v:.4}"));
    let headline: &[&str] = match args.task {
        Objective::Preference => &["eval_accuracy", "eval_margin"],
        Objective::Regression => &["eval_mse", "eval_pearson"],
        Objective::Multilabel => &["eval_macro_f1", "eval_macro_auroc"],
    };
    let mut fields = vec![("steps", report.steps.to_string()), ("loss", format!("{:.4}", report.final_loss)), ("eval_loss", shown("eval_loss"))];
    fields.extend(headline.iter().map(|name| (*name, shown(name))));
    fields.push(("model", args.output.display().to_string()));
    log_report("trained", &fields);
    if let Some(minimum) = args.min_accuracy {
        let accuracy = figure("eval_accuracy").unwrap_or(f64::NAN);
        if !(accuracy >= minimum) {
            return Err(Error::Gate(format!("held-out accuracy {accuracy:.4} is below --min-accuracy {minimum}")));
        }
    }
    Ok(())
}
