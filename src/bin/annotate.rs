//! `annotate`: a web workbench where a team scores, ranks and labels model outputs, and the
//! export of their answers as SPEC Parquet.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use lathe::Result;
use lathe::annotate::export::{ExportOptions, export};
use lathe::annotate::{self, ROLES, ServeOptions, Task, report};
use lathe::cli::{self, CommonArgs};
use lathe::error::usage;
use lathe::human::scoring::Scale;
use lathe::web::WebArgs;
use lathe::web::keys::{KeysAddArgs, Role};

#[derive(Parser, Serialize)]
#[command(
    name = "annotate",
    version,
    about = "A web workbench where a team scores, ranks and labels model outputs, with overlap and agreement; exports SPEC Parquet",
    after_help = "Examples:
  annotate keys add --keys keys.txt --name ana                # prints an annotator key once
  annotate keys add --keys keys.txt --name lead --role admin
  annotate serve responses.parquet --task rank --db annotate.sqlite --keys keys.txt --overlap 2
  annotate stats --db annotate.sqlite
  annotate export --db annotate.sqlite -o prefs.parquet      # rank → preference pairs
  rm-train prefs.parquet --model runs/sft -o runs/rm"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Serialize)]
enum Command {
    /// Serve the workbench (pages at /, the JSON API at /api/..., /admin for admins).
    Serve(Box<ServeArgs>),
    /// Write the answers as SPEC Parquet: scored (score), preferences (rank), labeled text (label).
    Export(ExportArgs),
    /// Progress per annotator, agreement, and the items disagreed on most.
    Stats(StatsArgs),
    /// Manage keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(clap::Args, Serialize)]
#[command(after_help = "Example:
  annotate serve responses.parquet --task score --scale 1-7 --db annotate.sqlite --keys keys.txt --overlap 2

ITEMS are read once into the database; serving the same database again continues where
everyone was (ITEMS may then be left out). Keys: score 1-9 (0 for 10), rank letters (= ties),
label digits, Enter submits, s skips, u undoes, / comments. The server prints
`listening on http://ADDR` on standard error once it accepts connections.")]
struct ServeArgs {
    /// Responses (score, rank) or texts with optional `labels` suggestions (label).
    #[arg(value_name = "ITEMS")]
    items: Vec<PathBuf>,
    #[arg(long, value_enum)]
    task: Task,
    /// The database of items and answers (SQLite; created if missing).
    #[arg(long, default_value = "annotate.sqlite")]
    db: PathBuf,
    /// Keys file (`annotate keys add`).
    #[arg(long, value_name = "FILE")]
    keys: PathBuf,
    /// Different annotators each item is shown to.
    #[arg(long, default_value_t = 2)]
    overlap: usize,
    /// score: the scale, LOW-HIGH.
    #[arg(long, default_value = "1-7")]
    scale: String,
    /// label: the categories, comma-separated (default: those the items suggest).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// A text file of guidelines, linked from every page.
    #[arg(long, value_name = "FILE")]
    guidelines: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Minutes an item shown stays held for its annotator before it may go to someone else.
    #[arg(long, default_value_t = 30.0)]
    lease_minutes: f64,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 64 << 10)]
    max_body_bytes: usize,
    #[command(flatten)]
    #[serde(flatten)]
    web: WebArgs,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Serialize)]
struct ExportArgs {
    #[arg(long, default_value = "annotate.sqlite")]
    db: PathBuf,
    /// Parquet (`-` for standard output).
    #[arg(short, long)]
    output: PathBuf,
    /// Leave out items with fewer answers.
    #[arg(long, default_value_t = 1)]
    min_annotators: usize,
    /// rank: each response with its rank and mean Borda points instead of pairs.
    #[arg(long)]
    listwise: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Serialize)]
struct StatsArgs {
    #[arg(long, default_value = "annotate.sqlite")]
    db: PathBuf,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(Subcommand, Serialize)]
enum KeysCommand {
    /// Add a key and print it once (only its salted hash is stored).
    Add(KeysAddArgs<KeyRole>),
}

#[derive(Clone, Copy, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum KeyRole {
    /// Answers items.
    #[default]
    Annotator,
    /// Sees everyone's progress, agreement and answers (/admin), and may annotate too.
    Admin,
}

impl From<KeyRole> for Role {
    fn from(role: KeyRole) -> Role {
        match role {
            KeyRole::Annotator => Role::Annotator,
            KeyRole::Admin => Role::Admin,
        }
    }
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    let common = match &args.command {
        Command::Serve(a) => &a.common,
        Command::Export(a) => &a.common,
        Command::Stats(a) => &a.common,
        Command::Keys(KeysCommand::Add(a)) => &a.common,
    };
    cli::start(common, || run(&args))
}

fn run(args: &Args) -> Result<()> {
    match &args.command {
        Command::Serve(a) => {
            if !(a.lease_minutes > 0.0 && a.lease_minutes.is_finite()) {
                return Err(usage("--lease-minutes must be a positive number"));
            }
            annotate::serve(&ServeOptions {
                items: a.items.clone(),
                task: a.task,
                db: a.db.clone(),
                keys: a.keys.clone(),
                overlap: a.overlap,
                scale: a.scale.parse::<Scale>()?,
                labels: a.labels.clone(),
                guidelines: a.guidelines.clone(),
                listen: a.listen.clone(),
                lease: Duration::from_secs_f64(a.lease_minutes * 60.0),
                max_body_bytes: a.max_body_bytes,
                connections: a.web.limits()?,
                session_lifetime: a.web.session_lifetime()?,
                seed: a.common.seed,
                quiet: a.common.quiet,
            })
        }
        Command::Export(a) => {
            lathe::output::check_writable(&a.output)?;
            let done = export(&ExportOptions { db: a.db.clone(), output: a.output.clone(), min_annotators: a.min_annotators, listwise: a.listwise, config: cli::resolved_config(args)? })?;
            if !a.common.quiet {
                let even = if done.even_pairs > 0 { format!("; {} pairs with even votes left out", done.even_pairs) } else { String::new() };
                eprintln!(
                    "annotate: exported {} rows from {} {} items to {} ({} items with fewer than {} answers left out{even})",
                    done.rows,
                    done.items,
                    done.task,
                    a.output.display(),
                    done.left_out,
                    a.min_annotators
                );
            }
            Ok(())
        }
        Command::Stats(a) => {
            let report = annotate::stats(&a.db)?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report::table(&report));
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Add(a)) => a.run("annotate", ROLES),
    }
}
