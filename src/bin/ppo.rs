//! `ppo`: optimise a policy against a reward with PPO (value model, KL to a frozen reference)
//! or GRPO (group-relative advantages); the run folder ends as the tuned policy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use lathe::generate::PromptTruncation;
use lathe::model::lora::LoraArgs;
use lathe::cli::{self, CommonArgs};
use lathe::generate::Sampling;
use lathe::rl::advantage::KlEstimator;
use lathe::rl::{Algo, RlOptions, RlSettings, RlTask};
use lathe::tokenizer::log_report;
use lathe::train::schedule::ScheduleKind;
use lathe::train::{self, RunSetup, TrainArgs};
use lathe::Result;

#[derive(Parser, Serialize)]
#[command(
    name = "ppo",
    version,
    about = "RLHF: tune a policy against a reward model or rules with PPO (or GRPO), staying close to a frozen reference",
    after_help = "Examples:\n  ppo prompts.parquet --policy runs/sft --reward-model runs/rm --updates 200 --val-fraction 0.05 -o runs/ppo\n  ppo prompts.parquet --policy runs/sft --reward-rule 'refusal:-1' --reward-rule 'length:-0.01' --algo grpo -n 4 -o runs/grpo\n  ppo prompts.parquet --policy runs/sft --reward-model runs/rm -o runs/ppo --resume\n\nOne update = sample --batch-size prompts (× -n) with the policy, score them, then --ppo-epochs passes\nof --minibatches optimizer steps over them. Rollouts are logged to RUN_DIR/rollouts/update-N.parquet."
)]
struct Args {
    /// Prompts (Parquet or JSONL: `prompt` text or chat `messages`, optional `prompt_id`).
    #[arg(value_name = "PROMPTS")]
    prompts: PathBuf,
    /// The policy to tune (a causal LM; usually the sft model).
    #[arg(long, value_name = "MODEL")]
    policy: String,
    /// The frozen reference the KL is measured against [default: the policy as it starts].
    #[arg(long, value_name = "MODEL")]
    ref_model: Option<String>,
    /// Reward model (LlamaForSequenceClassification, one label); it reads prompt + response as
    /// text with its own tokenizer, as `score --reward-model` does.
    #[arg(long, value_name = "MODEL", required_unless_present = "reward_rule")]
    reward_model: Option<String>,
    /// Programmatic reward instead, as `score --rule` (repeatable, weights add up).
    #[arg(long, value_name = "RULE", conflicts_with = "reward_model")]
    reward_rule: Vec<String>,
    /// Normalise reward-model scores with the mean/std in its config.json.
    #[arg(long, requires = "reward_model")]
    normalize_reward: bool,
    /// Value model start [default: the reward model; else the policy with a zero value head].
    #[arg(long, value_name = "MODEL")]
    value_model: Option<String>,
    /// Chat template for `messages` prompts [default: the policy's].
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// The run folder: checkpoints, metrics.jsonl, rollouts/, eval.json, curves.svg, the policy.
    #[arg(short, long, value_name = "RUN_DIR")]
    output: PathBuf,

    #[arg(long, value_enum, default_value_t = Algo::Ppo)]
    algo: Algo,
    /// PPO updates to run.
    #[arg(long, default_value_t = 100)]
    updates: u64,
    /// Prompts per update.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Responses per prompt (GRPO's group size).
    #[arg(short = 'n', long = "samples", default_value_t = 1)]
    samples: usize,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4)]
    ppo_epochs: usize,
    /// Optimizer steps per pass.
    #[arg(long, default_value_t = 1)]
    minibatches: usize,
    /// Micro-batches per minibatch (gradients averaged).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Response length limit.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Keep only the last N tokens of longer prompts (else they are refused when prompt +
    /// --max-new-tokens exceeds the model's context).
    #[arg(long, value_name = "N")]
    max_prompt_length: Option<usize>,
    /// A prompt still too long for the policy with --max-new-tokens: none refuses it, left
    /// keeps its end (counted and reported).
    #[arg(long, value_enum, default_value_t = PromptTruncation::None)]
    truncate_prompt: PromptTruncation,
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Generate to --max-new-tokens even past EOS (fixed-length benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// KL coefficient (PPO: in the reward; GRPO: β in the loss).
    #[arg(long, default_value_t = 0.05)]
    kl_coef: f64,
    #[arg(long, value_enum, default_value_t = KlEstimator::K1)]
    kl_estimator: KlEstimator,
    /// Adapt the KL coefficient towards this KL per sequence (nats) [default: fixed].
    #[arg(long, value_name = "KL")]
    target_kl: Option<f64>,
    /// Episodes over which the adaptive coefficient moves.
    #[arg(long, default_value_t = 10000.0)]
    kl_horizon: f64,
    #[arg(long, default_value_t = 0.2)]
    cliprange: f64,
    #[arg(long, default_value_t = 0.2)]
    cliprange_value: f64,
    /// Weight of the value loss.
    #[arg(long, default_value_t = 0.1)]
    vf_coef: f64,
    #[arg(long, default_value_t = 1.0)]
    gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    lam: f64,
    /// Whiten the per-token rewards before GAE.
    #[arg(long)]
    whiten_rewards: bool,
    /// Subtract this from the score of a response that did not end with EOS.
    #[arg(long, value_name = "PENALTY")]
    missing_eos_penalty: Option<f64>,
    /// Warn when the mean KL per sequence goes beyond ±this.
    #[arg(long, default_value_t = 10.0)]
    warn_kl: f64,
    /// Warn when an update's mean probability ratio leaves [1/x, x].
    #[arg(long, default_value_t = 2.0)]
    warn_ratio: f64,
    /// Held-out prompts: mean score, KL and length of their responses at each evaluation.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Hold out this fraction of the prompts instead.
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Evaluate every N updates (0: only at the start and the end).
    #[arg(long, default_value_t = 10)]
    eval_every: u64,
    /// Batches of --batch-size prompts per evaluation (0: all held-out prompts).
    #[arg(long, default_value_t = 0)]
    eval_batches: usize,
    /// Evaluation decoding temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    eval_temperature: f64,

    /// Peak learning rate (TRL's default).
    #[arg(long, default_value_t = 3e-6)]
    lr: f64,
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    schedule: ScheduleKind,
    /// Final learning rate [default: 0 for linear, lr / 10 otherwise].
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (policy and value together) to this (0: none).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Checkpoint every N updates (0: only when stopped and at the end).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Continue the run in -o from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (policy and value model): far less memory, the same gradients.
    #[arg(long)]
    gradient_checkpointing: bool,
    #[command(flatten)]
    #[serde(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

impl Args {
    fn settings(&self) -> RlSettings {
        RlSettings {
            algo: self.algo,
            prompts_per_update: self.batch_size,
            samples: self.samples,
            ppo_epochs: self.ppo_epochs,
            minibatches: self.minibatches,
            grad_accum: self.grad_accum,
            max_new_tokens: self.max_new_tokens,
            sampling: Sampling { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p },
            ignore_eos: self.ignore_eos,
            kl_coef: self.kl_coef,
            kl_estimator: self.kl_estimator,
            target_kl: self.target_kl,
            kl_horizon: self.kl_horizon,
            cliprange: self.cliprange,
            cliprange_value: self.cliprange_value,
            vf_coef: self.vf_coef,
            gamma: self.gamma,
            lam: self.lam,
            whiten_rewards: self.whiten_rewards,
            missing_eos_penalty: self.missing_eos_penalty,
            warn_kl: self.warn_kl,
            warn_ratio: self.warn_ratio,
            eval_temperature: self.eval_temperature,
        }
    }

    /// The engine counts optimizer steps: `epochs × minibatches` per update.
    fn engine_args(&self) -> TrainArgs {
        let per_update = (self.ppo_epochs * self.minibatches) as u64;
        let min_lr = self.min_lr.unwrap_or(if self.schedule == ScheduleKind::Linear { 0.0 } else { self.lr / 10.0 });
        TrainArgs {
            steps: self.updates * per_update,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            min_lr: Some(min_lr),
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            decay_steps: None,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            val: self.val.clone(),
            val_fraction: self.val_fraction,
            eval_every: self.eval_every * per_update,
            eval_on_start: true,
            eval_batches: self.eval_batches,
            checkpoint_every: self.checkpoint_every * per_update,
            keep_checkpoints: self.keep_checkpoints,
            skip_outliers: None,
            outlier_window: 64,
            resume: self.resume,
            device: self.device.clone(),
            gradient_checkpointing: self.gradient_checkpointing,
        }
    }
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    cli::start(&args.common, || ppo(&args))
}

fn ppo(args: &Args) -> Result<()> {
    let engine = args.engine_args();
    if args.warmup_steps > engine.steps {
        return Err(lathe::error::usage(format!(
            "--warmup-steps {} is longer than the run ({} optimizer steps: --updates {} × --ppo-epochs {} × --minibatches {})",
            args.warmup_steps, engine.steps, args.updates, args.ppo_epochs, args.minibatches
        )));
    }
    engine.check()?;
    train::check_run_dir(&args.output, args.resume)?;
    let models = [Some(&args.policy), args.ref_model.as_ref(), args.reward_model.as_ref(), args.value_model.as_ref()];
    let inputs: Vec<&std::path::Path> = models.into_iter().flatten().map(std::path::Path::new).chain([args.prompts.as_path()]).collect();
    lathe::output::check_distinct(&args.output, &inputs)?;
    let mut task = RlTask::new(RlOptions {
        prompts: args.prompts.clone(),
        val: args.val.clone(),
        val_fraction: args.val_fraction,
        eval_batches: args.eval_batches,
        policy: args.policy.clone(),
        ref_model: args.ref_model.clone(),
        reward_model: args.reward_model.clone(),
        reward_rules: args.reward_rule.clone(),
        normalize_reward: args.normalize_reward,
        value_model: args.value_model.clone(),
        chat_template: args.chat_template.clone(),
        max_prompt_length: args.max_prompt_length,
        truncate_prompt: args.truncate_prompt,
        lora: args.lora.settings()?,
        gradient_checkpointing: args.gradient_checkpointing,
        settings: args.settings(),
        run_dir: args.output.clone(),
        seed: args.common.seed,
        device: lathe::model::device(&args.device)?,
    })?;
    let setup = RunSetup {
        run_dir: args.output.clone(),
        config_toml: cli::resolved_config(args)?,
        seed: args.common.seed,
        threads: rayon::current_num_threads(),
    };
    let report = train::train(&mut task, &engine, &setup)?;
    let shown = |name: &str| report.eval_metrics.get(name).and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.4}"));
    log_report(
        "tuned",
        &[
            ("updates", args.updates.to_string()),
            ("eval_score", shown("eval_score")),
            ("eval_kl", shown("eval_kl")),
            ("eval_response_length", shown("eval_response_length")),
            ("policy", args.output.display().to_string()),
        ],
    );
    Ok(())
}
