//! `score`: add a numeric score (and the scorer's name) to every response.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::Result;
use lathe::cli::{self, CommonArgs};
use lathe::score::{RewardScorer, ScoreOptions, Scorer, WeightedRule, score};

#[derive(Parser, Serialize)]
#[command(
    name = "score",
    version,
    about = "Score responses with a reward model or programmatic rules; writes SPEC `scored` Parquet",
    after_help = "Examples:\n  score responses.parquet --reward-model runs/rm -o scored.parquet\n  score responses.parquet --reward-model runs/rm --normalize -o scored.parquet\n  score responses.parquet --rule 'length:-0.01' --rule 'regex:^[A-Z]:1' --rule refusal:-2 -o scored.parquet\n  generate prompts.parquet --model runs/sft -n 4 -o - | score - --reward-model runs/rm -o scored.parquet\n\nRules (NAME[:ARG][:WEIGHT], weight 1 by default; the score is the weighted sum):\n  length            characters in the response\n  regex:PATTERN     1 when the pattern matches\n  contains:TEXT     1 when the response contains TEXT\n  refusal           1 when the response opens with a refusal\n  exact             1 when the response equals the `reference` column\n  chrf              chrF (0..1) against the `reference` column"
)]
struct Args {
    /// Responses Parquet (`generate` output; `-` for standard input).
    #[arg(value_name = "RESPONSES")]
    input: PathBuf,
    /// Scored Parquet (`-` for standard output).
    #[arg(short, long)]
    output: PathBuf,
    /// Score with this reward model (an `rm-train` run or any LlamaForSequenceClassification with one label).
    #[arg(long, value_name = "MODEL", conflicts_with = "rule", required_unless_present = "rule")]
    reward_model: Option<String>,
    /// Score with rules (repeatable; see below).
    #[arg(long, value_name = "RULE")]
    rule: Vec<String>,
    /// Normalise reward-model scores with the `reward_mean`/`reward_std` in its config.json.
    #[arg(long, requires = "reward_model")]
    normalize: bool,
    /// Name of the score column.
    #[arg(long, default_value = "score")]
    column: String,
    /// Sequences per reward-model batch.
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
    let scorer = match &args.reward_model {
        Some(model) => {
            let device = lathe::model::device(&args.device)?;
            Scorer::RewardModel(Box::new(RewardScorer::load(model, args.normalize, args.batch_size, &device)?))
        }
        None => Scorer::Rules(args.rule.iter().map(|r| WeightedRule::parse(r)).collect::<Result<_>>()?),
    };
    score(
        &ScoreOptions { input: args.input.clone(), output: args.output.clone(), column: args.column.clone(), config: cli::resolved_config(args)? },
        &scorer,
    )?;
    Ok(())
}
