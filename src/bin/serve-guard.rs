//! `serve-guard`: serve a model over OpenAI's API behind classifier guards, and run the human
//! review loop over the guards' decisions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::web::WebArgs;
use lathe::web::keys::{KeysAddArgs, Role};
use lathe::serve::review::{self, ReviewDb, Which};
use lathe::serve::{ServeOptions, serve};

#[derive(Parser, Serialize)]
#[command(
    name = "serve-guard",
    version,
    about = "Serve a model over an OpenAI-compatible HTTP API behind input and output classifier guards, with a human review queue",
    after_help = "Examples:
  serve-guard keys add --keys keys.txt --name app            # prints a client key once
  serve-guard keys add --keys keys.txt --name ana --role reviewer
  serve-guard serve --model runs/sft --input-guard runs/guard --output-guard runs/guard \\
      --policy recipes/guard/policy.toml --keys keys.txt --db review.sqlite
  serve-guard review --db review.sqlite                      # confirm or overturn at the terminal
  serve-guard stats --db review.sqlite                       # precision, false-positive rate, thresholds
  serve-guard export --db review.sqlite -o labeled.parquet
  rm-train labeled.parquet --task multilabel --model runs/guard -o runs/guard-2"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Serialize)]
enum Command {
    /// Serve the model (POST /v1/chat/completions, /v1/completions, /v1/moderations; GET /v1/models, /health, /metrics, /review).
    Serve(Box<ServeArgs>),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Review pending guard decisions at the terminal (or list the queue with --list).
    Review(ReviewArgs),
    /// Per guard and category: precision, false-positive rate and a suggested threshold, from reviewed decisions.
    Stats(StatsArgs),
    /// Write the reviewed decisions as SPEC labeled text (`text`, `labels`) for `rm-train --task multilabel`.
    Export(ExportArgs),
}

#[derive(clap::Args, Serialize)]
#[command(after_help = "Example:
  serve-guard serve --model runs/sft --input-guard runs/guard --output-guard runs/guard --keys keys.txt

Guards are NAME=MODEL or MODEL (named after its folder); the policy's [guards.NAME] tables refer
to those names. The server prints `listening on http://ADDR` on standard error once it accepts
connections (--listen 127.0.0.1:0 picks a free port).")]
struct ServeArgs {
    /// The model to serve (a causal LM folder or hub id).
    #[arg(long)]
    model: String,
    /// A guard that checks the conversation before the model sees it (repeatable).
    #[arg(long, value_name = "[NAME=]MODEL")]
    input_guard: Vec<String>,
    /// A guard that checks the response before the user sees it (repeatable).
    #[arg(long, value_name = "[NAME=]MODEL")]
    output_guard: Vec<String>,
    /// Thresholds, actions, refusal text and review sampling (see recipes/guard/policy.toml).
    #[arg(long, value_name = "FILE.toml")]
    policy: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The review queue (SQLite; created if missing).
    #[arg(long, default_value = "review.sqlite")]
    db: PathBuf,
    /// API keys file (`serve-guard keys add`); without it every endpoint is open.
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// The model id clients name (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// A chat template file instead of the model's own.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Largest max_tokens a request may ask for (400 above).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// max_tokens of requests that do not say.
    #[arg(long, default_value_t = 128)]
    default_max_tokens: usize,
    /// Requests waiting for the model at most (429 when full).
    #[arg(long, default_value_t = 256)]
    queue_len: usize,
    /// Requests decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Model worker threads (each decodes its own batches).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Seconds a request may take (504 after; a stream ends with an error).
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Requests per minute per key (0: no limit; 429 above).
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Log prompts and responses (off by default: logs carry no content).
    #[arg(long)]
    log_content: bool,
    /// Serve /metrics without a key (by default any key of the keys file may read it).
    #[arg(long)]
    public_metrics: bool,
    #[command(flatten)]
    #[serde(flatten)]
    web: WebArgs,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
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
    /// Calls the OpenAI endpoints.
    #[default]
    Client,
    /// Reviews guard decisions (/review, /v1/review/...), and may call the API too.
    Reviewer,
}

impl From<KeyRole> for Role {
    fn from(role: KeyRole) -> Role {
        match role {
            KeyRole::Client => Role::Client,
            KeyRole::Reviewer => Role::Reviewer,
        }
    }
}


#[derive(clap::Args, Serialize)]
#[command(after_help = "Answers are read one per line: c (confirm: the guards were right), o (overturn; then the
true labels, comma-separated, empty for clean), s (skip), q (quit). Each answer is committed
before the next decision shows.")]
struct ReviewArgs {
    #[arg(long, default_value = "review.sqlite")]
    db: PathBuf,
    /// Print the queue (pending and reviewed) instead of reviewing.
    #[arg(long)]
    list: bool,
    /// Who reviews (default: $USER).
    #[arg(long)]
    reviewer: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Serialize)]
struct StatsArgs {
    #[arg(long, default_value = "review.sqlite")]
    db: PathBuf,
    /// One JSON object per guard and category instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Serialize)]
struct ExportArgs {
    #[arg(long, default_value = "review.sqlite")]
    db: PathBuf,
    /// Labeled-text Parquet (`-` for standard output).
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    let common = match &args.command {
        Command::Serve(a) => &a.common,
        Command::Keys(KeysCommand::Add(a)) => &a.common,
        Command::Review(a) => &a.common,
        Command::Stats(a) => &a.common,
        Command::Export(a) => &a.common,
    };
    cli::start(common, || run(&args.command))
}

fn run(command: &Command) -> Result<()> {
    match command {
        Command::Serve(a) => {
            if !(a.request_timeout > 0.0 && a.request_timeout.is_finite()) {
                return Err(lathe::error::usage("--request-timeout must be a positive number of seconds"));
            }
            let threads = a.common.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            serve(&ServeOptions {
                model: a.model.clone(),
                input_guards: a.input_guard.clone(),
                output_guards: a.output_guard.clone(),
                policy: a.policy.clone(),
                listen: a.listen.clone(),
                db: a.db.clone(),
                keys: a.keys.clone(),
                served_model_name: a.served_model_name.clone(),
                chat_template: a.chat_template.clone(),
                max_body_bytes: a.max_body_bytes,
                max_tokens: a.max_tokens,
                default_max_tokens: a.default_max_tokens,
                queue_len: a.queue_len,
                max_batch: a.max_batch,
                workers: a.workers,
                request_timeout: Duration::from_secs_f64(a.request_timeout),
                rate_limit: a.rate_limit,
                log_content: a.log_content,
                public_metrics: a.public_metrics,
                connections: a.web.limits()?,
                session_lifetime: a.web.session_lifetime()?,
                threads,
                device: lathe::model::device(&a.device)?,
                seed: a.common.seed,
                quiet: a.common.quiet,
            })
        }
        Command::Keys(KeysCommand::Add(a)) => a.run("serve-guard", lathe::serve::ROLES),
        Command::Review(a) => {
            let db = ReviewDb::open_existing(&a.db)?;
            if a.list {
                let items = db.list(Which::All, usize::MAX >> 1)?;
                let counts = db.counts()?;
                println!("review queue {}: {}", a.db.display(), counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
                for item in &items {
                    println!("{}", review::describe(item));
                }
                return Ok(());
            }
            let reviewer = a.reviewer.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "reviewer".into());
            let stdin = std::io::stdin();
            let (reviewed, skipped) = review::review_terminal(&db, &reviewer, &mut stdin.lock(), &mut std::io::stderr())?;
            eprintln!("serve-guard: {reviewed} reviewed, {skipped} skipped");
            Ok(())
        }
        Command::Stats(a) => {
            let db = ReviewDb::open_existing(&a.db)?;
            let stats = db.stats()?;
            if a.json {
                for s in &stats {
                    println!("{}", serde_json::to_string(s)?);
                }
            } else if stats.is_empty() {
                println!("no reviewed decisions yet");
            } else {
                print!("{}", review::stats_table(&stats));
            }
            Ok(())
        }
        Command::Export(a) => {
            lathe::output::check_writable(&a.output)?;
            let db = ReviewDb::open_existing(&a.db)?;
            let rows = db.export(&a.output)?;
            if !a.common.quiet {
                eprintln!("serve-guard: exported {rows} reviewed decisions to {}", a.output.display());
            }
            Ok(())
        }
    }
}
