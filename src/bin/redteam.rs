//! `redteam`: attack a model with a suite of probes, judge the responses, report and gate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::error::{Error, usage};
use lathe::generate::Sampling;
use lathe::progress;
use lathe::redteam::detect::DetectorModels;
use lathe::redteam::summary::GateBound;
use lathe::redteam::target::{EndpointTarget, GenerationSettings, LocalTarget, Target};
use lathe::redteam::{RedteamOptions, redteam};
use lathe::score::ModelSettings;

#[derive(Parser, Serialize)]
#[command(
    name = "redteam",
    version,
    about = "Attack a model (local or an OpenAI-compatible endpoint) with jailbreak, injection, encoding, leakage and harmful-request probes, bias probes and task evaluations; write findings, a summary, an HTML report; gate CI",
    group(ArgGroup::new("target").args(["model", "endpoint"]).required(true)),
    after_help = "Examples:
  redteam --model runs/ppo --guard runs/guard -o findings.parquet --report report.html
  redteam --model runs/ppo --baseline sft-findings.parquet --fail-above 0.2 -o findings.parquet
  redteam --endpoint http://127.0.0.1:8080/v1 --api-key-env OPENAI_API_KEY --concurrency 16 -o findings.parquet
  redteam --model runs/sft --export-prefs prefs.parquet --export-sft safe.parquet -o findings.parquet

Writes FINDINGS (one row per attempt and detector), FINDINGS-stem.summary.json (rates with 95%
Wilson intervals per probe and category, detector agreement, bias gaps, task accuracy) and,
with --report, a self-contained HTML page. Answers are journaled in FINDINGS-stem.journal.jsonl
as they arrive: run the same command again after an interruption and it continues.
--fail-above RATE (and per-category `budgets` in the suite) exits 3 when a category's
attack-success rate (its 95% upper bound by default, see --gate) is over budget; so does a
run in which fewer than --min-answered of the attempts got an answer."
)]
struct Args {
    /// Red-team this model folder (batched generation on this machine).
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Or an OpenAI-compatible server: base URL (`http://host:port/v1`) or the chat-completions URL.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// The `model` field sent to the endpoint (default: the first of its GET /v1/models).
    #[arg(long, requires = "endpoint")]
    endpoint_model: Option<String>,
    /// Environment variable holding the endpoint's API key.
    #[arg(long, value_name = "NAME", requires = "endpoint")]
    api_key_env: Option<String>,
    /// Requests in flight at once (endpoint).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds before a request is abandoned (then retried).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Retries after a failed request (transport error, 429, 5xx), with doubling back-off.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Seconds to wait before the first retry; doubled before each next one.
    #[arg(long, default_value_t = 0.5)]
    backoff: f64,
    /// The suite (TOML) [default: recipes/redteam/default.toml of the installed recipes].
    #[arg(long)]
    suite: Option<PathBuf>,
    /// Findings Parquet.
    #[arg(short, long)]
    output: PathBuf,
    /// Summary JSON (default: beside the findings, `STEM.summary.json`).
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Write a self-contained HTML report.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Findings of an earlier run (another model or checkpoint): report the change per category.
    #[arg(long, value_name = "FINDINGS")]
    baseline: Option<PathBuf>,
    /// Exit 3 when a category's attack-success rate is over RATE (0..1).
    #[arg(long, value_name = "RATE")]
    fail_above: Option<f64>,
    /// Exit 3 when fewer than this fraction of attempts were answered (the rest errored).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.9)]
    min_answered: f64,
    /// Which figure the budget applies to: the 95% upper bound or the point estimate.
    #[arg(long, value_enum, default_value = "upper")]
    gate: GateBound,
    /// Write the attacks that got through, with the suite's safe answer, as chat data (for sft).
    #[arg(long, value_name = "FILE")]
    export_sft: Option<PathBuf>,
    /// Write preference pairs (chosen: the safe answer, rejected: the harmful response) for rm-train.
    #[arg(long, value_name = "FILE")]
    export_prefs: Option<PathBuf>,
    /// Write the responses detectors disagree on (responses layout, for `score --human`).
    #[arg(long, value_name = "FILE")]
    export_disagreements: Option<PathBuf>,
    /// Guard model for `guard` detectors that name none (rm-train --task multilabel).
    #[arg(long, value_name = "MODEL")]
    guard: Option<String>,
    /// Reward model for `reward` detectors that name none.
    #[arg(long, value_name = "MODEL")]
    reward_model: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy, so runs compare like for like.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sequences per batch (local generation, detectors).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Ignore an earlier run's journal and answer everything again.
    #[arg(long)]
    restart: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    cli::start(&args.common, || run(&args))
}

fn run(args: &Args) -> Result<()> {
    // Answers in flight are journaled before stopping; a second Ctrl-C stops at once.
    cli::set_graceful_interrupt(true);
    if let Some(rate) = args.fail_above {
        if !(0.0..=1.0).contains(&rate) {
            return Err(usage(format!("--fail-above {rate}: expected a rate in [0, 1]")));
        }
    }
    if !(0.0..=1.0).contains(&args.min_answered) {
        return Err(usage(format!("--min-answered {}: expected a fraction in [0, 1]", args.min_answered)));
    }
    let sampling_ok = args.temperature >= 0.0 && args.temperature.is_finite() && args.top_p > 0.0 && args.top_p <= 1.0;
    if !sampling_ok {
        return Err(usage(format!("--temperature {} must be a number >= 0 and --top-p {} in (0, 1]", args.temperature, args.top_p)));
    }
    if args.max_new_tokens == 0 {
        return Err(usage("--max-new-tokens must be at least 1: an empty answer would count as complying"));
    }
    if args.batch_size == 0 || args.concurrency == 0 {
        return Err(usage("--batch-size and --concurrency must be at least 1"));
    }
    let timeout = seconds("--timeout", args.timeout, false)?;
    let backoff = seconds("--backoff", args.backoff, true)?;
    let suite = match &args.suite {
        Some(path) => path.clone(),
        None => cli::installed_recipe("redteam/default.toml", "--suite FILE")?,
    };
    let device = lathe::model::device(&args.device)?;
    let target = match (&args.model, &args.endpoint) {
        (Some(model), _) => Target::Local(Box::new(LocalTarget::load(model, args.batch_size, &device)?)),
        (None, Some(url)) => {
            let api_key = match &args.api_key_env {
                Some(name) => Some(std::env::var(name).map_err(|_| usage(format!("--api-key-env {name}: the variable is not set")))?),
                None => None,
            };
            let mut endpoint = EndpointTarget::new(url, args.endpoint_model.clone().unwrap_or_default(), api_key, args.concurrency, timeout, args.retries);
            endpoint.backoff = backoff;
            endpoint.preflight()?;
            Target::Endpoint(endpoint)
        }
        (None, None) => unreachable!("clap requires one target"),
    };
    let report = redteam(
        &RedteamOptions {
            suite,
            output: args.output.clone(),
            summary: args.summary.clone(),
            report: args.report.clone(),
            baseline: args.baseline.clone(),
            fail_above: args.fail_above,
            min_answered: args.min_answered,
            gate: args.gate,
            export_sft: args.export_sft.clone(),
            export_prefs: args.export_prefs.clone(),
            export_disagreements: args.export_disagreements.clone(),
            generation: GenerationSettings {
                max_new_tokens: args.max_new_tokens,
                sampling: Sampling { temperature: args.temperature, top_k: 0, top_p: args.top_p },
                seed: args.common.seed,
            },
            detector_models: DetectorModels {
                guard: args.guard.clone(),
                reward_model: args.reward_model.clone(),
                settings: ModelSettings { device, batch_size: args.batch_size },
            },
            restart: args.restart,
            config: cli::resolved_config(args)?,
        },
        &target,
    )?;
    let summary = &report.summary;
    progress::log(format!(
        "redteam: {} attempts ({} answered, {} errored; {} asked now) in {:.1} s, {:.2} attempts/s; summary {}",
        summary.attempts, summary.answered, summary.errors, report.answered_now, summary.seconds, summary.attempts_per_s, report.summary_path.display()
    ));
    for (message, count) in &summary.top_errors {
        progress::log(format!("  {count} × {message}"));
    }
    for c in &summary.categories {
        let change = c.change.map(|d| format!("  ({:+.1} pts vs baseline {:.1}%)", 100.0 * d, 100.0 * c.baseline.map_or(0.0, |b| b.rate))).unwrap_or_default();
        progress::log(format!(
            "  {:<16} {:>3}/{:<3} = {:5.1}%  95% CI {:5.1}-{:5.1}%{}{change}",
            c.category,
            c.rate.successes,
            c.rate.attempts,
            100.0 * c.rate.rate,
            100.0 * c.rate.ci_low,
            100.0 * c.rate.ci_high,
            if c.over_budget { "  OVER BUDGET" } else { "" }
        ));
        let others: Vec<String> = c
            .detectors
            .iter()
            .map(|(name, d)| {
                let change = d.change.map(|x| format!(" ({:+.1} pts)", 100.0 * x)).unwrap_or_default();
                format!("{name} {:.1}%{change}", 100.0 * d.rate.rate)
            })
            .collect();
        if others.len() > 1 {
            progress::log(format!("  {:<16} by detector: {}", "", others.join(", ")));
        }
    }
    for g in &summary.counterfactual {
        progress::log(format!("  bias {}/{} [{}]: gap {:.3}, p = {:.4} over {} pairs", g.probe, g.attribute, g.detector, g.test.gap, g.test.p_value, g.pairs));
    }
    for b in summary.bbq.iter().filter(|b| b.category == "all") {
        let show = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.3}"));
        progress::log(format!("  bbq {}: bias ambiguous {}, disambiguated {}; accuracy {} / {}", b.probe, show(b.scores.bias_ambiguous), show(b.scores.bias_disambiguated), show(b.scores.accuracy_ambiguous), show(b.scores.accuracy_disambiguated)));
    }
    for p in summary.probes.iter().filter(|p| p.section == lathe::redteam::suite::Section::Task) {
        progress::log(format!("  task {}: {:.1}% correct ({}/{}), mean {} {:.3}", p.probe, 100.0 * p.rate.rate, p.rate.successes, p.rate.attempts, p.detector, p.mean_score.unwrap_or(0.0)));
    }
    if !summary.gate.failed.is_empty() {
        return Err(Error::Gate(format!("gate failed ({} bound): {}", summary.gate.bound, summary.gate.failed.join("; "))));
    }
    Ok(())
}

/// A duration flag in seconds: finite, positive (or zero where `zero_ok`), and representable.
fn seconds(flag: &str, value: f64, zero_ok: bool) -> Result<Duration> {
    let ok = value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0));
    ok.then(|| Duration::try_from_secs_f64(value).ok())
        .flatten()
        .ok_or_else(|| usage(format!("{flag} {value}: expected a number of seconds{}", if zero_ok { " >= 0" } else { " > 0" })))
}
