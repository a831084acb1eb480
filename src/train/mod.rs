//! The one training engine. A stage (`pretrain`, `sft`, `rm-train`, …) contributes a [`Task`]:
//! its loss on the next micro-batch, its evaluation, its data cursor and how to write its model
//! folder. Everything else lives here: AdamW, the schedule, accumulation, clipping, the
//! non-finite and outlier guards, evaluation cadence, checkpoints, exact resume, signals,
//! `metrics.jsonl`, progress, the final model folder and `curves.svg`.

pub mod checkpoint;
pub mod cursor;
pub mod curves;
pub mod guard;
pub mod optim;
pub mod schedule;
pub mod sequences;
pub mod tuned;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::cli;
use crate::error::{Error, Result, failed, usage};
use crate::metrics::MetricsWriter;
use crate::model::Params;
use crate::output::write_atomic;
use crate::progress::{self, Progress, Unit};
use checkpoint::{BestEval, Checkpoints, TrainerState};
use guard::{OutlierGuard, Verdict};
use optim::{AdamW, AdamWConfig, Grads, clip_coefficient, grad_norm};
use schedule::{Schedule, ScheduleKind};

/// Flags every training stage shares.
#[derive(clap::Args, Serialize, Debug, Clone)]
pub struct TrainArgs {
    /// Optimizer updates to run in total.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per update (gradients are averaged).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Final learning rate of the cosine / wsd decay [default: lr / 10].
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// wsd: steps of the final decay [default: 20% of --steps].
    #[arg(long)]
    pub decay_steps: Option<u64>,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Decoupled weight decay, on tensors with two or more dimensions only.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Held-out data for evaluation (same kind as the training data).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Hold out this fraction of the training data for evaluation instead.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Also evaluate before the first update, so the curve starts from the starting model.
    #[arg(long)]
    pub eval_on_start: bool,
    /// Batches per evaluation (0: all held-out data).
    #[arg(long, default_value_t = 0)]
    pub eval_batches: usize,
    /// Write a checkpoint every N steps (0: only when stopped and at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Checkpoints kept (the newest ones; the best by eval loss is kept too).
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Skip an update whose loss or grad norm is more than Z standard deviations above the
    /// recent window (as llm.c does).
    #[arg(long, value_name = "Z")]
    pub skip_outliers: Option<f64>,
    /// Steps in the outlier window.
    #[arg(long, default_value_t = 64)]
    pub outlier_window: usize,
    /// Continue the run in -o from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Keep only each decoder layer's input and recompute its activations in the backward
    /// pass: far less memory for about one more forward pass; the same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

impl Default for TrainArgs {
    /// The command line's defaults.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            train: TrainArgs,
        }
        <Flags as clap::Parser>::parse_from(["train"]).train
    }
}

impl TrainArgs {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.schedule,
            lr: self.lr,
            min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            decay_steps: self.decay_steps.unwrap_or(self.steps / 5),
        }
    }

    pub fn optimizer(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }

    /// Refuse impossible settings before any work.
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(usage("--batch-size and --grad-accum must be at least 1"));
        }
        if self.warmup_steps > self.steps {
            return Err(usage(format!("--warmup-steps {} is longer than the run (--steps {})", self.warmup_steps, self.steps)));
        }
        if let Some(decay) = self.decay_steps.filter(|&d| d > self.steps) {
            return Err(usage(format!("--decay-steps {decay} is longer than the run (--steps {})", self.steps)));
        }
        for (flag, value) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(usage(format!("{flag} {value}: expected a number in [0, 1)")));
            }
        }
        for (flag, value) in [("--eps", self.eps), ("--weight-decay", self.weight_decay), ("--grad-clip", self.grad_clip)] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(usage(format!("{flag} {value}: expected a finite number >= 0")));
            }
        }
        if let Some(min_lr) = self.min_lr.filter(|m| !(*m >= 0.0 && m.is_finite())) {
            return Err(usage(format!("--min-lr {min_lr}: expected a finite number >= 0")));
        }
        if let Some(z) = self.skip_outliers.filter(|z| !(*z > 0.0 && z.is_finite())) {
            return Err(usage(format!("--skip-outliers {z}: expected a positive number")));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(usage(format!("--lr {}: must be a positive number", self.lr)));
        }
        if let Some(f) = self.val_fraction {
            if !(f > 0.0 && f < 1.0) {
                return Err(usage(format!("--val-fraction {f}: must be between 0 and 1")));
            }
            if self.val.is_some() {
                return Err(usage("give --val or --val-fraction, not both"));
            }
        }
        Ok(())
    }
}

/// The loss of one micro-batch.
pub struct StepLoss {
    /// Mean loss over the micro-batch's targets: a scalar in the graph.
    pub loss: Tensor,
    /// Tokens the micro-batch covered (for tokens/s).
    pub tokens: u64,
    /// Extra per-step metrics (TRL names), logged as they are.
    pub metrics: Map<String, Value>,
}

/// A held-out evaluation.
pub struct Evaluation {
    pub loss: f64,
    /// The loss is a mean token negative log-likelihood, so `eval_perplexity` means something.
    pub perplexity: bool,
    /// Extra metrics (TRL names), logged beside `eval_loss`.
    pub metrics: Map<String, Value>,
}

/// What a training stage contributes to the engine.
pub trait Task {
    /// The parameters the optimizer updates (the model reads the same tensors).
    fn params(&self) -> &Params;
    /// The loss of the next micro-batch; the task advances its data cursor.
    fn next_loss(&mut self) -> Result<StepLoss>;
    /// Evaluate on held-out data; `None` when there is none.
    fn evaluate(&mut self) -> Result<Option<Evaluation>>;
    /// Write the model folder (config, weights, tokenizer, …) into `dir`.
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// The data cursor (and any random state) to save in a checkpoint.
    fn data_state(&self) -> Value;
    fn restore_data_state(&mut self, state: &Value) -> Result<()>;
    /// The model's shape; resuming into a run of another shape is refused.
    fn signature(&self) -> Value;
    /// Metric names (without `eval_`) the evaluation log line shows besides the plain ones
    /// (names with a `/`, such as per-label figures, stay in metrics.jsonl otherwise).
    fn headline_metrics(&self) -> &'static [&'static str] {
        &[]
    }
    /// Facts for `eval.json` beyond the metrics (e.g. the unigram entropy of the data).
    fn summary(&self) -> Map<String, Value> {
        Map::new()
    }
    /// Write a checkpoint's model files: the model folder, plus anything else the task needs
    /// to continue exactly (PPO: its value model and the rollout in progress).
    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_model(dir)
    }
    /// Read a checkpoint written by [`Task::save_checkpoint`] back into the parameters.
    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.params().load_values(&dir.join(crate::model::folder::WEIGHTS))
    }
}

/// Where a run goes and what it was started with.
pub struct RunSetup {
    pub run_dir: PathBuf,
    /// The stage's resolved configuration (TOML), written to `config.toml`.
    pub config_toml: String,
    pub seed: u64,
    pub threads: usize,
}

/// What a finished run reports.
#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub steps: u64,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    /// The final evaluation's figures by metric name (`eval_accuracy`, …).
    pub eval_metrics: Map<String, Value>,
    pub tokens_per_second: f64,
    pub seconds: f64,
}

/// Examples an evaluation covers: `eval_batches` batches (0: all of them).
pub fn eval_limit(eval_batches: usize, batch_size: usize, available: usize) -> usize {
    match eval_batches {
        0 => available,
        n => (n * batch_size).min(available),
    }
}

/// Items held out by `--val-fraction`: at least one, and at least one left to train on.
/// Callers refuse fewer than two items first.
pub fn held_out_count(items: usize, fraction: f64) -> usize {
    ((items as f64 * fraction).ceil() as usize).clamp(1, items.saturating_sub(1).max(1))
}

/// Refuse a run folder that already holds a run, unless resuming; refuse `--resume` with
/// nothing to resume. Call before loading data or models.
pub fn check_run_dir(run_dir: &Path, resume: bool) -> Result<()> {
    if crate::output::is_stdio(run_dir) {
        return Err(usage("-o must be a folder for a training run"));
    }
    if run_dir.exists() && !run_dir.is_dir() {
        return Err(crate::error::bad_input(run_dir, "exists and is not a folder"));
    }
    let checkpoints = Checkpoints::new(run_dir, 1);
    let latest = checkpoints.latest()?;
    match (resume, latest) {
        (true, None) => Err(crate::error::bad_input(run_dir, "--resume: no checkpoint to resume from")),
        (false, Some((step, _))) => Err(crate::error::bad_input(
            run_dir,
            format!("already holds a run (checkpoint step-{step}); pass --resume to continue it or choose another -o"),
        )),
        _ => Ok(()),
    }
}

pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Run the training loop to `args.steps`, resuming if asked.
pub fn train<T: Task>(task: &mut T, args: &TrainArgs, setup: &RunSetup) -> Result<TrainReport> {
    let run_dir = &setup.run_dir;
    std::fs::create_dir_all(run_dir).map_err(|e| crate::error::bad_input(run_dir, format!("cannot create: {e}")))?;
    let checkpoints = Checkpoints::new(run_dir, args.keep_checkpoints);
    checkpoints.remove_partials()?;
    let leftovers = crate::output::remove_leftovers(run_dir)?;
    if !leftovers.is_empty() {
        progress::log(format!("removed what an interrupted write left in {}: {}", run_dir.display(), leftovers.join(", ")));
    }
    let schedule = args.schedule();
    let mut optimizer = AdamW::new(args.optimizer());
    let mut state = TrainerState {
        step: 0,
        optimizer_steps: 0,
        tokens_seen: 0,
        learning_rate: schedule.lr_at(0),
        data: task.data_state(),
        guard: OutlierGuard::default(),
        eval_loss: None,
        eval_metrics: Map::new(),
        best: None,
        model_signature: task.signature(),
        config_sha256: sha256_hex(&setup.config_toml),
        seed: setup.seed,
        threads: setup.threads,
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = if args.resume {
        state = resume(task, &mut optimizer, &checkpoints, &state)?;
        MetricsWriter::resume(&metrics_path, state.step)?
    } else {
        MetricsWriter::create(&metrics_path)?
    };
    write_atomic(&run_dir.join("config.toml"), setup.config_toml.as_bytes())?;
    cli::set_graceful_interrupt(true);

    if args.eval_on_start && state.step == 0 {
        evaluate(task, &mut state, &mut metrics)?;
    }
    let bar = Progress::new("training", Some(args.steps), Unit::Items("steps"));
    bar.set_position(state.step);
    let started = Instant::now();
    let (mut tokens_this_run, mut last_loss) = (0u64, f64::NAN);
    while state.step < args.steps {
        if cli::interrupted() {
            return stop_interrupted(task, &optimizer, &state, &checkpoints, &bar);
        }
        let step_started = Instant::now();
        // A signal inside a long accumulation stops it: the step is abandoned and the data
        // goes back to where the step began, so the checkpoint resumes exactly.
        let data_before = (args.grad_accum > 1).then(|| task.data_state());
        let Some((loss, tokens, grads, extra)) = accumulate(task, args.grad_accum)? else {
            if let Some(before) = &data_before {
                task.restore_data_state(before)?;
            }
            return stop_interrupted(task, &optimizer, &state, &checkpoints, &bar);
        };
        let lr = schedule.lr_at(state.step);
        if !loss.is_finite() {
            return Err(non_finite(&checkpoints, state.step + 1, "loss", loss));
        }
        let grad_clip = (args.grad_clip > 0.0).then_some(args.grad_clip);
        let grad_norm = grad_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(non_finite(&checkpoints, state.step + 1, "gradient norm", grad_norm));
        }
        let verdict = state.guard.judge(loss, grad_norm, args.skip_outliers, args.outlier_window);
        if verdict == Verdict::Keep {
            optimizer.step(task.params(), &grads, clip_coefficient(grad_norm, grad_clip), lr)?;
        }
        drop(grads);
        state.step += 1;
        state.optimizer_steps = optimizer.steps();
        state.tokens_seen += tokens;
        state.learning_rate = lr;
        tokens_this_run += tokens;
        last_loss = loss;
        let tokens_per_second = tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9);

        let mut record = Map::new();
        record.insert("step".into(), json!(state.step));
        record.insert("loss".into(), json!(loss));
        record.insert("learning_rate".into(), json!(lr));
        record.insert("grad_norm".into(), json!(grad_norm));
        record.insert("tokens_per_second".into(), json!(tokens_per_second));
        record.insert("tokens_seen".into(), json!(state.tokens_seen));
        if let Verdict::Skip { loss_z, grad_norm_z } = verdict {
            record.insert("skipped".into(), json!(true));
            progress::log(format!(
                "step {}: skipped (loss z {loss_z:.1}, grad norm z {grad_norm_z:.1})",
                state.step
            ));
        }
        record.extend(extra);
        metrics.log(&record)?;

        let due_eval = args.eval_every > 0 && state.step % args.eval_every == 0 && state.step < args.steps;
        if due_eval {
            evaluate(task, &mut state, &mut metrics)?;
        }
        bar.set_message(status_line(loss, state.eval_loss, tokens_per_second, lr));
        bar.set_position(state.step);
        let due_checkpoint = args.checkpoint_every > 0 && state.step % args.checkpoint_every == 0 && state.step < args.steps;
        if due_checkpoint {
            save_checkpoint(task, &optimizer, &state, &checkpoints)?;
        }
    }
    bar.finish();

    let final_eval = evaluate(task, &mut state, &mut metrics)?;
    // A final checkpoint lets a finished run be extended with --resume --steps N.
    if checkpoints.latest()?.map(|(s, _)| s) != Some(state.step) {
        save_checkpoint(task, &optimizer, &state, &checkpoints)?;
    }
    task.save_model(run_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    let report = TrainReport {
        steps: state.step,
        final_loss: last_loss,
        eval_loss: final_eval,
        eval_metrics: if final_eval.is_some() { state.eval_metrics.clone() } else { Map::new() },
        tokens_per_second: tokens_this_run as f64 / seconds.max(1e-9),
        seconds,
    };
    write_eval_json(run_dir, task, &state, &report)?;
    curves::draw(&metrics_path, &run_dir.join("curves.svg"))?;
    Ok(report)
}

/// Save a checkpoint of the last finished step and stop with exit 130.
fn stop_interrupted<T: Task>(task: &mut T, optimizer: &AdamW, state: &TrainerState, checkpoints: &Checkpoints, bar: &Progress) -> Result<TrainReport> {
    save_checkpoint(task, optimizer, state, checkpoints)?;
    bar.finish();
    progress::log(format!("stopped at step {}; checkpoint saved, continue with --resume", state.step));
    Err(Error::Interrupted)
}

type Accumulated = (f64, u64, Grads, Map<String, Value>);

/// Gradients of `accum` micro-batches, averaged: (mean loss, tokens, grads, metrics); `None`
/// when a signal came between micro-batches.
fn accumulate<T: Task>(task: &mut T, accum: usize) -> Result<Option<Accumulated>> {
    let mut grads = Grads::new();
    let (mut loss_sum, mut tokens) = (0f64, 0u64);
    let mut extra = Map::new();
    for micro_batch in 0..accum {
        if micro_batch > 0 && cli::interrupted() {
            return Ok(None);
        }
        let out = task.next_loss()?;
        let value = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let store = crate::model::recompute::backward(&(out.loss / accum as f64)?)?;
        for (name, var) in task.params().iter() {
            if let Some(grad) = store.get(var.as_tensor()) {
                match grads.get_mut(name) {
                    Some(sum) => *sum = (&*sum + grad)?,
                    // Made contiguous once here (a weight's gradient comes as a transposed
                    // view) rather than by both the gradient norm and the optimizer.
                    None => {
                        grads.insert(name.to_string(), grad.contiguous()?);
                    }
                }
            }
        }
        loss_sum += value;
        tokens += out.tokens;
        extra = out.metrics;
    }
    Ok(Some((loss_sum / accum as f64, tokens, grads, extra)))
}

fn evaluate<T: Task>(task: &mut T, state: &mut TrainerState, metrics: &mut MetricsWriter) -> Result<Option<f64>> {
    let Some(evaluation) = task.evaluate()? else { return Ok(None) };
    let mut record = Map::new();
    record.insert("step".into(), json!(state.step));
    record.insert("eval_loss".into(), json!(evaluation.loss));
    if evaluation.perplexity {
        record.insert("eval_perplexity".into(), json!(evaluation.loss.exp()));
    }
    for (k, v) in &evaluation.metrics {
        record.insert(format!("eval_{k}"), v.clone());
    }
    metrics.log(&record)?;
    progress::log(format!("step {}: {}", state.step, describe_eval(&record, task.headline_metrics())));
    state.eval_loss = Some(evaluation.loss);
    state.eval_metrics = record;
    if state.best.as_ref().is_none_or(|b| evaluation.loss < b.eval_loss) {
        state.best = Some(BestEval { step: state.step, eval_loss: evaluation.loss });
    }
    Ok(Some(evaluation.loss))
}

fn save_checkpoint<T: Task>(task: &mut T, optimizer: &AdamW, state: &TrainerState, checkpoints: &Checkpoints) -> Result<()> {
    let mut state = state.clone();
    state.data = task.data_state();
    checkpoints.save(&state, &optimizer.state_tensors(), |dir| task.save_checkpoint(dir))?;
    Ok(())
}

/// Load the newest checkpoint into the task and optimizer.
fn resume<T: Task>(task: &mut T, optimizer: &mut AdamW, checkpoints: &Checkpoints, fresh: &TrainerState) -> Result<TrainerState> {
    let (_, path) = checkpoints
        .latest()?
        .ok_or_else(|| crate::error::bad_input(checkpoints.dir(), "--resume: no checkpoint to resume from"))?;
    let device = task
        .params()
        .iter()
        .next()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let restored = checkpoint::restore(&path, &device)?;
    if restored.state.model_signature != fresh.model_signature {
        return Err(crate::error::bad_input(
            &path,
            format!(
                "--resume: the run was made with another model shape ({}); resume with the same shape",
                differences(&restored.state.model_signature, &fresh.model_signature)
            ),
        ));
    }
    if restored.state.threads != fresh.threads {
        progress::log(format!(
            "note: the run used {} threads, this one {}: results may differ in the last bits",
            restored.state.threads, fresh.threads
        ));
    }
    task.load_checkpoint(&path)?;
    optimizer.load_state(restored.optimizer, restored.state.optimizer_steps)?;
    task.restore_data_state(&restored.state.data)?;
    progress::log(format!("resuming from {} (step {})", path.display(), restored.state.step));
    Ok(TrainerState { threads: fresh.threads, ..restored.state })
}

/// `key: run value → this value` for every key that differs.
fn differences(run: &Value, now: &Value) -> String {
    let keys: std::collections::BTreeSet<&String> =
        run.as_object().into_iter().chain(now.as_object()).flat_map(|o| o.keys()).collect();
    keys.into_iter()
        .filter(|k| run.get(*k) != now.get(*k))
        .map(|k| format!("{k}: {} → {}", run.get(k).unwrap_or(&Value::Null), now.get(k).unwrap_or(&Value::Null)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn non_finite(checkpoints: &Checkpoints, step: u64, what: &str, value: f64) -> Error {
    let last = checkpoints.latest().ok().flatten();
    let advice = match last {
        Some((s, path)) => format!("the last good checkpoint is {} (step {s}); lower --lr or raise --grad-clip and --resume", path.display()),
        None => "no checkpoint was written yet; lower --lr".to_string(),
    };
    failed(format!("step {step}: {what} is {value}; stopped without updating the weights; {advice}"))
}

/// `eval_loss 0.6931, eval_accuracy 0.5, …`: the scalar eval figures of a record.
fn describe_eval(record: &Map<String, Value>, headline: &[&str]) -> String {
    let shown = |k: &str| k.strip_prefix("eval_").is_some_and(|name| !name.contains('/') || headline.contains(&name));
    record
        .iter()
        // Per-label and per-bucket figures (`eval_f1/violence`) stay in metrics.jsonl.
        .filter(|(k, v)| shown(k) && v.is_number())
        .map(|(k, v)| match v.as_u64() {
            Some(count) => format!("{k} {count}"),
            None => format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn status_line(loss: f64, eval_loss: Option<f64>, tokens_per_second: f64, lr: f64) -> String {
    let eval = eval_loss.map_or(String::new(), |e| format!(" eval {e:.3}"));
    format!("loss {loss:.3}{eval} | {tokens_per_second:.0} tok/s | lr {lr:.2e}")
}

fn write_eval_json<T: Task>(run_dir: &Path, task: &T, state: &TrainerState, report: &TrainReport) -> Result<()> {
    let mut out = task.summary();
    out.insert("step".into(), json!(state.step));
    out.insert("train_loss".into(), json!(report.final_loss));
    out.insert("eval_loss".into(), json!(report.eval_loss));
    for (k, v) in state.eval_metrics.iter().filter(|(k, _)| k.starts_with("eval_")) {
        out.insert(k.clone(), v.clone());
    }
    out.insert("best".into(), json!(state.best));
    out.insert("tokens_seen".into(), json!(state.tokens_seen));
    out.insert("tokens_per_second".into(), json!(report.tokens_per_second));
    out.insert("seconds".into(), json!(report.seconds));
    out.insert("peak_rss_mb".into(), json!(progress::peak_rss_mb()));
    write_atomic(&run_dir.join("eval.json"), (serde_json::to_string_pretty(&Value::Object(out))? + "\n").as_bytes())
}

#[cfg(test)]
mod tests;
