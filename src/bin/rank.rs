//! `rank`: turn scored responses into preference pairs (or per-response ranks).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::human::session::Annotation;
use lathe::rank::{Pairs, RankOptions, rank, rank_by_hand};
use lathe::tokenizer::log_report;

#[derive(Parser, Serialize)]
#[command(
    name = "rank",
    version,
    about = "Group scored responses by prompt and emit preference pairs (chosen / rejected / margin) or ranks; or let a person order them",
    after_help = "Examples:
  rank scored.parquet -o prefs.parquet
  rank scored.parquet --pairs best-worst --min-margin 0.5 -o prefs.parquet
  rank scored.parquet --listwise -o ranked.parquet
  rank responses.parquet --human --annotator ana -o prefs.parquet

Responses without a score (null or NaN, e.g. skipped by a person) are left out and counted.

--human shows each prompt's responses as A, B, C… on standard error and reads one line per
prompt: the letters best first (`CAB`), s (skip), u (undo the latest answer, also one from an
earlier run) or q (quit). The response placed p-th of k scores k − p, so a pair's margin is
how far apart the two were placed. Answers come from --keys FILE, else from the terminal when
the responses come on standard input, else from standard input; every answer is synced to the
journal (OUTPUT.journal.jsonl) before the next prompt shows, and running the same command
again continues. Quitting before the end exits 130 with the journal kept."
)]
struct Args {
    /// Scored responses (`score` output; `-` for standard input); with --human, any responses.
    #[arg(value_name = "SCORED")]
    input: PathBuf,
    /// Preference Parquet (or ranked responses with --listwise); `-` for standard output.
    #[arg(short, long)]
    output: PathBuf,
    /// The score column to order by.
    #[arg(long, default_value = "score", conflicts_with = "human")]
    by: String,
    #[arg(long, value_enum, default_value_t = Pairs::All)]
    pairs: Pairs,
    /// Leave out pairs whose scores differ by less (near-ties); they are counted.
    #[arg(long, default_value_t = 0.0)]
    min_margin: f64,
    /// Write every response with a `rank` column (1 = best, ties share a rank) instead of pairs.
    #[arg(long)]
    listwise: bool,
    /// A person orders each prompt's responses at the terminal (see below).
    #[arg(long)]
    human: bool,
    /// --human: who ranks (default: $USER).
    #[arg(long, requires = "human")]
    annotator: Option<String>,
    /// --human: read answers from this file, one per line (the end of the file quits).
    #[arg(long, value_name = "FILE", requires = "human")]
    keys: Option<PathBuf>,
    /// --human: the answers journal (default: OUTPUT.journal.jsonl).
    #[arg(long, value_name = "FILE", requires = "human")]
    journal: Option<PathBuf>,
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
    lathe::output::check_distinct(&args.output, &[&args.input])?;
    let options = RankOptions {
        input: args.input.clone(),
        by: args.by.clone(),
        pairs: args.pairs,
        min_margin: args.min_margin,
        listwise: args.listwise,
        output: args.output.clone(),
        config: cli::resolved_config(args)?,
    };
    let report = if args.human {
        let annotation = Annotation::new(args.annotator.as_deref(), args.journal.as_deref(), &args.output, args.keys.as_deref(), args.common.quiet)?;
        rank_by_hand(&options, &annotation)?
    } else {
        rank(&options)?
    };
    log_report("ranked", &[
        ("prompts", report.prompts.to_string()),
        ("responses", report.responses.to_string()),
        ("single-response prompts", report.single_response_prompts.to_string()),
        ("pairs", if args.listwise { "-".into() } else { report.pairs.to_string() }),
        ("ties dropped", report.ties_dropped.to_string()),
        ("unscored", report.unscored.to_string()),
        ("skipped prompts", report.skipped_prompts.to_string()),
    ]);
    Ok(())
}
