//! `score`: add a numeric score (and the scorer's name) to every response.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::error::usage;
use lathe::human::merge::{MergeOptions, merge};
use lathe::human::scoring::Scale;
use lathe::human::session::Annotation;
use lathe::score::{ModelSettings, RewardScorer, ScoreOptions, Scorer, WeightedRule, import, score, score_by_hand};

/// clap waives a `requires` whose target conflicts with a flag given (the modes exclude each
/// other), so mode-specific flags also name the modes they do not belong to.
const NOT_HUMAN: [&str; 4] = ["reward_model", "rule", "import", "merge"];
const NOT_REWARD_MODEL: [&str; 4] = ["rule", "human", "import", "merge"];

#[derive(Parser, Serialize)]
#[command(
    name = "score",
    version,
    about = "Score responses with a reward model, rules, a person at the terminal or imported ratings; merge annotators; writes SPEC `scored` Parquet",
    group(ArgGroup::new("mode").args(["reward_model", "rule", "human", "import", "merge"]).multiple(false)),
    after_help = "Examples:
  score responses.parquet --reward-model runs/rm -o scored.parquet
  score responses.parquet --reward-model runs/rm --normalize -o scored.parquet
  score responses.parquet --rule 'length:-0.01' --rule 'regex:^[A-Z]:1' --rule refusal:-2 -o scored.parquet
  score responses.parquet --rule guard:runs/guard:violence:-1 -o scored.parquet
  generate prompts.parquet --model runs/sft -n 4 -o - | score - --reward-model runs/rm -o scored.parquet
  score responses.parquet --human --scale 1-5 --annotator ana -o ana.parquet
  score responses.parquet --import ratings.csv -o rated.parquet
  score --merge ana.parquet bo.parquet -o merged.parquet

Rules (NAME[:ARG][:WEIGHT], weight 1 by default; the score is the weighted sum):
  length              characters in the response
  regex:PATTERN       1 when the pattern matches
  contains:TEXT       1 when the response contains TEXT
  refusal             1 when the response opens with a refusal
  exact               1 when the response equals the `reference` column
  chrf                chrF (0..1) against the `reference` column
  guard:MODEL:LABEL   the probability (0..1) a multi-label guard (rm-train --task multilabel)
                      gives the response for LABEL; LABEL and WEIGHT are the last fields, so
                      MODEL may contain ':'

--human shows each response (prompt, response, k of N) on standard error and reads one line
per answer: a score on --scale, s (skip: null score), u (undo the latest answer, also one from
an earlier run) or q (quit). Answers come from --keys FILE, else from the terminal when the
responses come on standard input, else from standard input. Every answer is synced to the
journal (OUTPUT.journal.jsonl) before the next response shows, so nothing is lost to Ctrl-C or
a crash, and running the same command again continues. The output is written once every
response is answered or skipped; quitting before exits 130 with the journal kept.

--import reads ratings from .csv, .jsonl or .parquet with columns prompt_id, sample, the score
(--column) and optionally annotator, and joins them onto the responses.

--merge turns several annotators' scored files into one row per response: the mean score, the
number of annotators (`annotators`) and each one's score (`ratings`), and reports their
agreement (Krippendorff's alpha, interval; mean pairwise Spearman)."
)]
struct Args {
    /// Responses Parquet (`generate` output; `-` for standard input).
    #[arg(value_name = "RESPONSES", required_unless_present = "merge")]
    input: Option<PathBuf>,
    /// Scored Parquet (`-` for standard output).
    #[arg(short, long)]
    output: PathBuf,
    /// Score with this reward model (an `rm-train` run or any LlamaForSequenceClassification with one label).
    #[arg(long, value_name = "MODEL")]
    reward_model: Option<String>,
    /// Score with rules (repeatable; see below).
    #[arg(long, value_name = "RULE")]
    rule: Vec<String>,
    /// A person scores each response at the terminal (see below).
    #[arg(long)]
    human: bool,
    /// Join human ratings from this file (.csv, .jsonl or .parquet) onto the responses.
    #[arg(long, value_name = "RATINGS")]
    import: Option<PathBuf>,
    /// Merge the scored files of several annotators (instead of RESPONSES).
    #[arg(long, value_name = "SCORED", num_args = 2.., conflicts_with = "input")]
    merge: Vec<PathBuf>,
    /// Normalise reward-model scores with the `reward_mean`/`reward_std` in its config.json.
    #[arg(long, requires = "reward_model", conflicts_with_all = NOT_REWARD_MODEL)]
    normalize: bool,
    /// Name of the score column (also the column read by --import and --merge).
    #[arg(long, default_value = "score")]
    column: String,
    /// --human: the scores a person may give, LOW-HIGH.
    #[arg(long, default_value = "1-7", requires = "human", conflicts_with_all = NOT_HUMAN)]
    scale: String,
    /// --human: who scores (default: $USER); --import: the annotator of ratings without an `annotator` column.
    #[arg(long)]
    annotator: Option<String>,
    /// --human: read answers from this file, one per line (the end of the file quits).
    #[arg(long, value_name = "FILE", requires = "human", conflicts_with_all = NOT_HUMAN)]
    keys: Option<PathBuf>,
    /// --human: the answers journal (default: OUTPUT.journal.jsonl).
    #[arg(long, value_name = "FILE", requires = "human", conflicts_with_all = NOT_HUMAN)]
    journal: Option<PathBuf>,
    /// Sequences per model batch (reward model, guards).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
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
    lathe::output::check_writable(&args.output)?;
    let mut inputs: Vec<&Path> = args.merge.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.input.as_deref().into_iter().chain(args.import.as_deref()));
    lathe::output::check_distinct(&args.output, &inputs)?;
    if args.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    let config = cli::resolved_config(args)?;
    if !args.merge.is_empty() {
        let options = MergeOptions { inputs: args.merge.clone(), output: args.output.clone(), column: args.column.clone(), config };
        let report = merge(&options)?;
        log_merge(&report);
        return Ok(());
    }
    let input = args.input.clone().ok_or_else(|| usage("give RESPONSES (or --merge SCORED...)"))?;
    let options = ScoreOptions { input, output: args.output.clone(), column: args.column.clone(), config };
    if args.human {
        let scale: Scale = args.scale.parse()?;
        let annotation = Annotation::new(args.annotator.as_deref(), args.journal.as_deref(), &args.output, args.keys.as_deref(), args.common.quiet)?;
        score_by_hand(&options, &annotation, scale)?;
        return Ok(());
    }
    if let Some(ratings) = &args.import {
        import(&options, ratings, args.annotator.as_deref())?;
        return Ok(());
    }
    let models = ModelSettings { device: lathe::model::device(&args.device)?, batch_size: args.batch_size };
    let scorer = match &args.reward_model {
        Some(model) => Scorer::RewardModel(Box::new(RewardScorer::load(model, args.normalize, args.batch_size, &models.device)?)),
        None if !args.rule.is_empty() => Scorer::Rules(args.rule.iter().map(|r| WeightedRule::parse(r, &models)).collect::<Result<_>>()?),
        None => return Err(usage("give one of --reward-model, --rule, --human, --import or --merge")),
    };
    score(&options, &scorer)?;
    Ok(())
}

fn log_merge(report: &lathe::human::merge::MergeReport) {
    let a = &report.agreement;
    let figure = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    lathe::progress::log(format!(
        "merged {} responses from {} annotators ({}); {} without a score",
        report.responses,
        report.annotators.len(),
        report.annotators.join(", "),
        report.unrated
    ));
    lathe::progress::log(format!(
        "agreement over {} responses rated by 2 or more annotators: Krippendorff's alpha (interval) {}, mean pairwise Spearman {} ({} pairs)",
        a.items_rated_twice,
        figure(a.krippendorff_alpha),
        figure(a.mean_pairwise_spearman),
        a.spearman_pairs
    ));
}
