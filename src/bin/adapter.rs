//! `adapter`: LoRA adapters — `merge` one into its base, `inspect` one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::tokenizer::log_report;

#[derive(Parser, Serialize)]
#[command(
    name = "adapter",
    version,
    about = "LoRA adapters (PEFT's format): merge one into its base model, or inspect one",
    after_help = "Examples:
  adapter merge runs/sft-lora -o runs/sft-merged
  adapter merge runs/sft-lora --base Qwen/Qwen2.5-0.5B -o merged    # another copy of the base
  adapter inspect runs/sft-lora
  adapter inspect runs/sft-lora --json

An adapter folder is a model to every stage (generate, score, redteam, serve-guard, sft, ppo):
its base comes from base_model_name_or_path in adapter_config.json (relative to the adapter
folder, absolute, or a hub id in the local cache), or from --base."
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Serialize)]
enum Command {
    /// Write W + scale·B·A for every adapted layer as a plain model folder, in the base's
    /// family layout and dtype (transformers loads it without PEFT).
    Merge(MergeArgs),
    /// Print an adapter's rank, scale, targets, parameter count and base.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Serialize)]
struct MergeArgs {
    /// The adapter folder.
    adapter: String,
    /// The model folder to write.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Serialize)]
struct InspectArgs {
    /// The adapter folder.
    adapter: String,
    /// One JSON object instead of lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    let common = match &args.command {
        Command::Merge(a) => &a.common,
        Command::Inspect(a) => &a.common,
    };
    cli::start(common, || run(&args.command))
}

fn run(command: &Command) -> Result<()> {
    match command {
        Command::Merge(a) => {
            let report = lathe::adapter::merge(&a.adapter, &a.output)?;
            log_report("merged", &[
                ("base", report.base),
                ("model", format!("{} ({}, {} parameters)", a.output.display(), report.architecture, report.parameters)),
                ("dtype", report.dtype),
            ]);
            Ok(())
        }
        Command::Inspect(a) => {
            let i = lathe::adapter::inspect(&a.adapter)?;
            if a.json {
                return lathe::output::print(&(serde_json::to_string_pretty(&i)? + "\n"));
            }
            let lines = [
                format!("adapter      {} ({})", i.adapter, i.task_type),
                format!("rank         r {}, alpha {}, scale {:.4}{}", i.r, i.lora_alpha, i.scale, if i.use_rslora { " (rsLoRA)" } else { "" }),
                format!("dropout      {}", i.lora_dropout),
                format!("targets      {} → {} modules", i.target_modules.join(", "), i.modules),
                format!("parameters   {} ({:.3}% of the base's {})", i.parameters, 100.0 * i.parameters as f64 / i.base_parameters.max(1) as f64, i.base_parameters),
                format!("base         {} ({})", i.base, i.base_architecture),
            ];
            lathe::output::print(&(lines.join("\n") + "\n"))
        }
    }
}
