//! `rank`: turn scored responses into preference pairs (or per-response ranks).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::rank::{Pairs, RankOptions, rank};
use lathe::tokenizer::log_report;

#[derive(Parser, Serialize)]
#[command(
    name = "rank",
    version,
    about = "Group scored responses by prompt and emit preference pairs (chosen / rejected / margin) or ranks",
    after_help = "Examples:\n  rank scored.parquet -o prefs.parquet\n  rank scored.parquet --pairs best-worst --min-margin 0.5 -o prefs.parquet\n  rank scored.parquet --listwise -o ranked.parquet"
)]
struct Args {
    /// Scored responses (`score` output; `-` for standard input).
    #[arg(value_name = "SCORED")]
    input: PathBuf,
    /// Preference Parquet (or ranked responses with --listwise); `-` for standard output.
    #[arg(short, long)]
    output: PathBuf,
    /// The score column to order by.
    #[arg(long, default_value = "score")]
    by: String,
    #[arg(long, value_enum, default_value_t = Pairs::All)]
    pairs: Pairs,
    /// Leave out pairs whose scores differ by less (near-ties); they are counted.
    #[arg(long, default_value_t = 0.0)]
    min_margin: f64,
    /// Write every response with a `rank` column (1 = best, ties share a rank) instead of pairs.
    #[arg(long)]
    listwise: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    cli::start(&args.common, || run(&args))
}

fn run(args: &Args) -> Result<()> {
    lathe::output::check_writable(&args.output)?;
    let report = rank(&RankOptions {
        input: args.input.clone(),
        by: args.by.clone(),
        pairs: args.pairs,
        min_margin: args.min_margin,
        listwise: args.listwise,
        output: args.output.clone(),
        config: cli::resolved_config(args)?,
    })?;
    log_report("ranked", &[
        ("prompts", report.prompts.to_string()),
        ("responses", report.responses.to_string()),
        ("single-response prompts", report.single_response_prompts.to_string()),
        ("pairs", if args.listwise { "-".into() } else { report.pairs.to_string() }),
        ("ties dropped", report.ties_dropped.to_string()),
    ]);
    Ok(())
}
