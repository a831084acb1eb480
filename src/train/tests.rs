//! The engine against PyTorch: `testdata/hf-tiny/expected.json` → `training` holds ten AdamW
//! steps that transformers + torch took from `causal-lm/` on `train_batches.safetensors`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use super::*;
use crate::model::folder::{self, ModelFiles, ModelFolder};
use crate::model::{ForwardOptions, Decoder};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hf-tiny").join(name)
}

/// Next-token loss on the fixture's batches, one per step.
struct FixtureTask {
    folder: ModelFolder,
    params: Params,
    model: Decoder,
    batches: Tensor,
    next: usize,
}

impl FixtureTask {
    fn new() -> Self {
        Self::of(&fixture("causal-lm"))
    }

    /// The fixture's batches on the model in `dir`.
    fn of(dir: &Path) -> Self {
        let folder = ModelFolder::open(dir.to_str().unwrap()).unwrap();
        let (model, params) = folder.load_model(&Device::Cpu).unwrap();
        let batches = fixture_batches();
        FixtureTask { folder, params, model, batches, next: 0 }
    }
}

impl Task for FixtureTask {
    fn params(&self) -> &Params {
        &self.params
    }

    fn next_loss(&mut self) -> Result<StepLoss> {
        self.next += 1;
        next_token_loss(&self.model, &self.batches.i(self.next - 1)?)
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        Ok(None)
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        let tokenizer_json = std::fs::read_to_string(self.folder.tokenizer_path())?;
        folder::save(
            dir,
            &ModelFiles {
                config: &self.folder.config,
                params: &self.params,
                tokenizer_json: &tokenizer_json,
                tokenizer_config: &self.folder.tokenizer_config,
                chat_template: self.folder.chat_template.as_deref(),
                generation_config: self.folder.generation_config.as_ref(),
            },
        )
    }

    fn data_state(&self) -> Value {
        json!({"next": self.next})
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        self.next = state["next"].as_u64().unwrap() as usize;
        Ok(())
    }

    fn signature(&self) -> Value {
        json!({"fixture": "hf-tiny"})
    }
}

/// The token batches the fixture's training steps ran on, `[steps, batch, tokens]`.
fn fixture_batches() -> Tensor {
    candle_core::safetensors::load(fixture("train_batches.safetensors"), &Device::Cpu).unwrap()["batches"].to_dtype(DType::U32).unwrap()
}

/// Mean next-token cross-entropy of one fixture batch.
fn next_token_loss(model: &Decoder, batch: &Tensor) -> Result<StepLoss> {
    let (b, t) = batch.dims2()?;
    let (x, y) = (batch.narrow(1, 0, t - 1)?, batch.narrow(1, 1, t - 1)?);
    let hidden = model.forward(&x, ForwardOptions::default(), None)?;
    let logits = model.lm_logits(&hidden)?.reshape((b * (t - 1), ()))?;
    let loss = crate::model::ops::cross_entropy_rows(&logits, &y.flatten_all()?)?.mean_all()?;
    Ok(StepLoss { loss, tokens: (b * (t - 1)) as u64, metrics: Map::new() })
}

/// The fixture's batches on a frozen base through a LoRA adapter: only the adapter trains.
struct LoraFixtureTask {
    folder: ModelFolder,
    adapter: crate::model::lora::Adapter,
    model: Decoder,
    batches: Tensor,
    next: usize,
}

impl LoraFixtureTask {
    fn new(adapter_dir: &Path, checkpointing: bool) -> Self {
        let folder = ModelFolder::open(adapter_dir.to_str().unwrap()).unwrap();
        let adapter = folder.load_adapter(&Device::Cpu).unwrap().unwrap();
        let base = folder.load_base_params(&Device::Cpu).unwrap();
        let mut model = Decoder::with_adapter(&folder.config, &base, &adapter).unwrap();
        model.set_gradient_checkpointing(checkpointing);
        let batches = fixture_batches();
        LoraFixtureTask { folder, adapter, model, batches, next: 0 }
    }
}

impl Task for LoraFixtureTask {
    fn params(&self) -> &Params {
        &self.adapter.params
    }
    fn next_loss(&mut self) -> Result<StepLoss> {
        self.next += 1;
        next_token_loss(&self.model, &self.batches.i(self.next - 1)?)
    }
    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        Ok(None)
    }
    fn save_model(&self, dir: &Path) -> Result<()> {
        self.adapter.save(dir, &self.folder.config)
    }
    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.adapter.params.load_values(&dir.join(crate::model::lora::ADAPTER_WEIGHTS))
    }
    fn data_state(&self) -> Value {
        json!({"next": self.next})
    }
    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        self.next = state["next"].as_u64().unwrap() as usize;
        Ok(())
    }
    fn signature(&self) -> Value {
        json!({"fixture": "peft"})
    }
}

/// Ten LoRA steps from PEFT's own initialisation give PEFT + torch's losses, pre-clip gradient
/// norms and adapter weights; with gradient checkpointing too.
#[test]
fn ten_lora_steps_match_peft() {
    let peft = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/peft");
    let training: Value = serde_json::from_str(&std::fs::read_to_string(peft.join("training.json")).unwrap()).unwrap();
    let want = candle_core::safetensors::load(peft.join("weights_after_10_steps.safetensors"), &Device::Cpu).unwrap();
    for checkpointing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut task = LoraFixtureTask::new(&peft.join("train-init"), checkpointing);
        train(&mut task, &fixture_args(10), &setup(dir.path())).unwrap();
        for (i, record) in metrics(dir.path()).iter().enumerate() {
            let (loss, want_loss) = (record["loss"].as_f64().unwrap(), training["losses"][i].as_f64().unwrap());
            let (norm, want_norm) = (record["grad_norm"].as_f64().unwrap(), training["grad_norms_before_clip"][i].as_f64().unwrap());
            assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "step {}: loss {loss} vs {want_loss}", i + 1);
            assert!((norm - want_norm).abs() <= 1e-4 * want_norm.abs(), "step {}: grad norm {norm} vs {want_norm}", i + 1);
        }
        let ours = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(ours.len(), want.len());
        for (name, tensor) in &want {
            let diff: f32 = (&ours[name] - tensor).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(diff <= 1e-5, "checkpointing {checkpointing}: {name} differs by {diff}");
        }
    }
}

/// The optimizer of expected.json: AdamW lr 1e-3 (constant), betas (0.9, 0.95), eps 1e-8,
/// weight decay 0.1 on ≥2-dim tensors, clip 1.0.
fn fixture_args(steps: u64) -> TrainArgs {
    TrainArgs {
        steps,
        batch_size: 4,
        grad_accum: 1,
        lr: 1e-3,
        min_lr: None,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        decay_steps: None,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
        val: None,
        val_fraction: None,
        eval_every: 0,
        eval_on_start: false,
        eval_batches: 0,
        checkpoint_every: 0,
        keep_checkpoints: 2,
        skip_outliers: None,
        outlier_window: 64,
        resume: false,
        device: "cpu".into(),
        gradient_checkpointing: false,
    }
}

fn setup(dir: &Path) -> RunSetup {
    RunSetup { run_dir: dir.to_path_buf(), config_toml: "fixture = true\n".into(), seed: 1, threads: rayon::current_num_threads() }
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn ten_adamw_steps_match_pytorch() {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    ten_steps_match(&fixture("causal-lm"), &expected["training"], &fixture("weights_after_10_steps.safetensors"));
}

/// The same ten steps on the Qwen2 and Gemma 2 fixtures (testdata/families/F/training.json):
/// q/k/v biases, (1 + w) norms, sandwich norms, soft-caps, sliding windows and tied
/// embeddings all train as torch trains them.
#[test]
fn ten_adamw_steps_match_pytorch_for_qwen2_and_gemma2() {
    for family in ["qwen2", "gemma2"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/families").join(family);
        let training: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
        ten_steps_match(&dir.join("causal-lm"), &training, &dir.join("weights_after_10_steps.safetensors"));
    }
}

fn ten_steps_match(model: &Path, training: &Value, weights_after: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let mut task = FixtureTask::of(model);
    train(&mut task, &fixture_args(10), &setup(dir.path())).unwrap();
    let records = metrics(dir.path());
    assert_eq!(records.len(), 10);
    for (i, record) in records.iter().enumerate() {
        let (loss, want_loss) = (record["loss"].as_f64().unwrap(), training["losses"][i].as_f64().unwrap());
        let (norm, want_norm) =
            (record["grad_norm"].as_f64().unwrap(), training["grad_norms_before_clip"][i].as_f64().unwrap());
        let model = model.display();
        assert!((loss - want_loss).abs() <= 1e-4 * want_loss.abs(), "{model} step {}: loss {loss} vs {want_loss}", i + 1);
        assert!((norm - want_norm).abs() <= 1e-3 * want_norm.abs(), "{model} step {}: grad norm {norm} vs {want_norm}", i + 1);
    }

    let want = candle_core::safetensors::load(weights_after, &Device::Cpu).unwrap();
    let ours = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut worst = (0f32, String::new());
    for (name, tensor) in &want {
        let diff: f32 = (&ours[name] - tensor).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        // A key bias's lowest-frequency rotary components barely change any score (a constant
        // added to every key cancels in the softmax): their gradients are rounding noise that
        // Adam's normalised step turns into moves of up to lr. One lr step bounds them.
        if name.ends_with("k_proj.bias") {
            assert!(diff <= 1e-3, "{}: {name} differs by {diff}", model.display());
            continue;
        }
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
    }
    assert_eq!(want.len(), ours.len(), "{}: tensors saved", model.display());
    assert!(worst.0 <= 1e-4, "{}: weights differ by {} in {}", model.display(), worst.0, worst.1);
    for file in ["config.json", "model.safetensors", "tokenizer.json", "config.toml", "curves.svg", "eval.json"] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights() {
    let straight = tempfile::tempdir().unwrap();
    train(&mut FixtureTask::new(), &fixture_args(6), &setup(straight.path())).unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut first = fixture_args(6);
    first.checkpoint_every = 3;
    // Stop after step 4: the newest checkpoint is step 3, so step 4 is done twice.
    let mut four = first.clone();
    four.steps = 4;
    train(&mut FixtureTask::new(), &four, &setup(split.path())).unwrap();
    std::fs::remove_dir_all(split.path().join("checkpoints/step-4")).unwrap();
    let mut resumed = first;
    resumed.resume = true;
    train(&mut FixtureTask::new(), &resumed, &setup(split.path())).unwrap();

    let a = std::fs::read(straight.path().join("model.safetensors")).unwrap();
    let b = std::fs::read(split.path().join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from an uninterrupted run");
    let steps: Vec<u64> = metrics(split.path()).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn resuming_a_run_of_another_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    train(&mut FixtureTask::new(), &fixture_args(2), &setup(dir.path())).unwrap();
    struct OtherShape(FixtureTask);
    let mut args = fixture_args(3);
    args.resume = true;
    let mut task = FixtureTask::new();
    let mut state = task.data_state();
    state["next"] = json!(0);
    task.restore_data_state(&state).unwrap();
    let other = OtherShape(task);
    impl Task for OtherShape {
        fn params(&self) -> &Params { self.0.params() }
        fn next_loss(&mut self) -> Result<StepLoss> { self.0.next_loss() }
        fn evaluate(&mut self) -> Result<Option<Evaluation>> { Ok(None) }
        fn save_model(&self, dir: &Path) -> Result<()> { self.0.save_model(dir) }
        fn data_state(&self) -> Value { self.0.data_state() }
        fn restore_data_state(&mut self, s: &Value) -> Result<()> { self.0.restore_data_state(s) }
        fn signature(&self) -> Value { json!({"fixture": "other"}) }
    }
    let mut other = other;
    let e = train(&mut other, &args, &setup(dir.path())).err().unwrap();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--resume"), "{e}");
}

#[test]
fn a_used_run_folder_needs_resume() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(check_run_dir(dir.path(), true).unwrap_err().exit_code(), 2);
    train(&mut FixtureTask::new(), &fixture_args(1), &setup(dir.path())).unwrap();
    let e = check_run_dir(dir.path(), false).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    assert!(check_run_dir(dir.path(), true).is_ok());
}

/// The fixture task, but the loss of step `nan_at` is NaN.
struct PoisonedTask {
    inner: FixtureTask,
    nan_at: usize,
}

impl Task for PoisonedTask {
    fn params(&self) -> &Params {
        self.inner.params()
    }
    fn next_loss(&mut self) -> Result<StepLoss> {
        let mut out = self.inner.next_loss()?;
        if self.inner.next == self.nan_at {
            out.loss = (out.loss * f64::NAN)?;
        }
        Ok(out)
    }
    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        Ok(None)
    }
    fn save_model(&self, dir: &Path) -> Result<()> {
        self.inner.save_model(dir)
    }
    fn data_state(&self) -> Value {
        self.inner.data_state()
    }
    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        self.inner.restore_data_state(state)
    }
    fn signature(&self) -> Value {
        self.inner.signature()
    }
}

#[test]
fn a_nan_loss_stops_the_run_naming_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = fixture_args(8);
    args.checkpoint_every = 2;
    let mut task = PoisonedTask { inner: FixtureTask::new(), nan_at: 5 };
    let e = train(&mut task, &args, &setup(dir.path())).err().unwrap();
    assert_eq!(e.exit_code(), 1);
    let message = e.to_string();
    assert!(message.contains("step 5: loss is NaN") && message.contains("step-4"), "{message}");
    let steps: Vec<u64> = Checkpoints::new(dir.path(), 2).list().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![2, 4], "the checkpoints before the NaN are intact");
    assert!(!dir.path().join("model.safetensors").exists(), "no final model from a failed run");
}

#[test]
fn pruning_keeps_the_newest_and_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(dir.path(), 2);
    let task = FixtureTask::new();
    let mut state = TrainerState {
        step: 0,
        optimizer_steps: 0,
        tokens_seen: 0,
        learning_rate: 0.0,
        data: json!({}),
        guard: OutlierGuard::default(),
        eval_loss: None,
        eval_metrics: Default::default(),
        best: None,
        model_signature: json!({}),
        config_sha256: String::new(),
        seed: 1,
        threads: 1,
    };
    for (step, eval_loss) in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6), (50, 2.7)] {
        state.step = step;
        state.eval_loss = Some(eval_loss);
        if state.best.as_ref().is_none_or(|b| eval_loss < b.eval_loss) {
            state.best = Some(BestEval { step, eval_loss });
        }
        checkpoints.save(&state, &[], |d| task.save_model(d)).unwrap();
    }
    let kept: Vec<u64> = checkpoints.list().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(kept, vec![20, 40, 50]);
}
