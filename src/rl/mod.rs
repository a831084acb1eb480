//! RLHF: PPO (policy + value model, KL-shaped reward, GAE, clipped objectives) and GRPO
//! (group-relative advantages, no value model) as one [`Task`] of the training engine. Each
//! update samples a rollout with the current policy, scores it, and then the engine takes
//! `epochs × minibatches` optimizer steps over it; the rollout in progress is part of every
//! checkpoint, so `--resume` continues exactly.

pub mod advantage;
pub mod loss;
pub mod rollout;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::data::parquet_io::lathe_metadata;
use crate::data::records::{Record, ResponseRecord};
use crate::data::{Kind, ParquetSink};
use crate::error::{Result, bad_input, usage};
use crate::limits::{Footprint, Tuning};
use crate::generate::{Generator, PromptTruncation, ReadyPrompt, Sampling, chat_template, fit_prompt, read_prompts, sample_rng};
use crate::model::folder::{FolderParts, ModelFolder};
use crate::model::lora::{self, Adapter, LoraSettings};
use crate::model::{ChatTemplate, Decoder, Head, ModelConfig, Params};
use crate::train::tuned::{Start, TunedModel};
use crate::output::write_atomic;
use crate::progress;
use crate::score::{ModelSettings, RewardScorer, WeightedRule, rule_scores};
use crate::tokenizer::{LoadedTokenizer, check_same_vocabulary};
use crate::train::cursor::{EpochCursor, shuffled};
use crate::train::{Evaluation, StepLoss, Task};
use advantage::{KlController, KlEstimator};
use loss::scalar;
use rollout::{Episode, Layout, mean_entropy, unpack};

const VALUE_DIR: &str = "value_model";
const ROLLOUT: &str = "rollout.json";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Proximal policy optimisation with a learned value model (GAE advantages).
    Ppo,
    /// Group-relative policy optimisation: advantages from the other samples of the same
    /// prompt, no value model, KL to the reference in the loss.
    Grpo,
}

/// The knobs of the algorithm (names and defaults as TRL's `PPOConfig`).
#[derive(Clone, Debug, Serialize)]
pub struct RlSettings {
    pub algo: Algo,
    /// Prompts per update.
    pub prompts_per_update: usize,
    /// Responses per prompt (GRPO's group size; 1 for PPO).
    pub samples: usize,
    pub ppo_epochs: usize,
    pub minibatches: usize,
    /// Micro-batches per minibatch (the engine's gradient accumulation).
    pub grad_accum: usize,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Keep generating past EOS (fixed-length benchmarks, as TRL with no stop token).
    pub ignore_eos: bool,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub target_kl: Option<f64>,
    pub kl_horizon: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
    pub missing_eos_penalty: Option<f64>,
    /// Warn when the mean KL per sequence exceeds this.
    pub warn_kl: f64,
    /// Warn when the mean probability ratio leaves [1/x, x].
    pub warn_ratio: f64,
    /// Evaluation decoding temperature (0: greedy).
    pub eval_temperature: f64,
}

pub struct RlOptions {
    pub prompts: PathBuf,
    pub val: Option<PathBuf>,
    pub val_fraction: Option<f64>,
    pub eval_batches: usize,
    pub policy: String,
    pub ref_model: Option<String>,
    pub reward_model: Option<String>,
    pub reward_rules: Vec<String>,
    pub normalize_reward: bool,
    pub value_model: Option<String>,
    pub chat_template: Option<PathBuf>,
    /// Keep only the last N tokens of longer prompts.
    pub max_prompt_length: Option<usize>,
    /// What to do with a prompt that still leaves no room for the response.
    pub truncate_prompt: PromptTruncation,
    /// Train LoRA adapters (policy and value model) on frozen weights; the reference is the
    /// policy's base with its adapter off.
    pub lora: Option<LoraSettings>,
    pub gradient_checkpointing: bool,
    pub settings: RlSettings,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: Device,
}

/// Where rewards come from.
enum Reward {
    Model(Box<RewardScorer>),
    Rules(Vec<WeightedRule>),
}

impl Reward {
    fn load(options: &RlOptions) -> Result<Self> {
        match (&options.reward_model, options.reward_rules.is_empty()) {
            (Some(model), true) => {
                let batch = options.settings.prompts_per_update * options.settings.samples;
                Ok(Reward::Model(Box::new(RewardScorer::load(model, options.normalize_reward, batch, &options.device)?)))
            }
            (None, false) => {
                let models = ModelSettings { device: options.device.clone(), batch_size: options.settings.prompts_per_update * options.settings.samples };
                let rules = options.reward_rules.iter().map(|r| WeightedRule::parse(r, &models)).collect::<Result<Vec<_>>>()?;
                if let Some(rule) = rules.iter().find(|r| r.needs_reference()) {
                    return Err(usage(format!("--reward-rule {}: needs a `reference`, which rollouts do not have", rule.spec)));
                }
                Ok(Reward::Rules(rules))
            }
            (Some(_), false) => Err(usage("give --reward-model or --reward-rule, not both")),
            (None, true) => Err(usage("a reward is needed: --reward-model MODEL or --reward-rule RULE")),
        }
    }

    fn name(&self) -> String {
        match self {
            Reward::Model(m) => m.name().to_string(),
            Reward::Rules(rules) => format!("rules:{}", rules.iter().map(|r| r.spec.as_str()).collect::<Vec<_>>().join(",")),
        }
    }

    /// Scores of responses to prompts, as `score` computes them.
    fn scores(&self, prompts: &[&str], responses: &[&str]) -> Result<Vec<f64>> {
        match self {
            Reward::Model(model) => {
                let texts: Vec<String> = prompts.iter().zip(responses).map(|(p, r)| format!("{p}{r}")).collect();
                model.score(&texts)
            }
            Reward::Rules(rules) => rule_scores(rules, responses, None),
        }
    }
}

/// A model with a one-label `score` head read at every response position.
struct ValueModel {
    tuned: TunedModel,
    parts: FolderParts,
}

/// Running sums of one update's per-micro-batch statistics.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
struct UpdateStats {
    micro_batches: u64,
    approxkl: f64,
    clipfrac: f64,
    policy_loss: f64,
    value_loss: f64,
    value_clipfrac: f64,
    entropy: f64,
    ratio: f64,
    ratio_sq: f64,
}

pub struct RlTask {
    settings: RlSettings,
    seed: u64,
    policy: TunedModel,
    policy_parts: FolderParts,
    value: Option<ValueModel>,
    all: Params,
    /// The frozen reference; `None` when it is the policy's base with the adapter off (a new
    /// LoRA adapter), which needs no second copy of the weights.
    reference: Option<Decoder>,
    reward: Reward,
    tokenizer: LoadedTokenizer,
    eos: Vec<u32>,
    pad: u32,
    prompts: Vec<ReadyPrompt>,
    val: Vec<ReadyPrompt>,
    eval_batches: usize,
    cursor: EpochCursor<usize>,
    kl: KlController,
    updates: u64,
    episodes_done: u64,
    /// Micro-batches of the current update already taken.
    position: usize,
    rollout: Option<Vec<Episode>>,
    rollout_metrics: Map<String, Value>,
    stats: UpdateStats,
    rollouts_dir: PathBuf,
    model_name: String,
    /// When the current update began, and how long its rollout took (speed figures only).
    update_started: Option<Instant>,
    rollout_seconds: f64,
    /// The KL of the last runaway warning: another comes only when it grows a quarter more.
    warned_kl: f64,
}

impl RlTask {
    pub fn new(options: RlOptions) -> Result<Self> {
        let s = &options.settings;
        check_settings(s)?;
        let folder = ModelFolder::open(&options.policy)?;
        if folder.config.head != Head::CausalLm {
            return Err(bad_input(&folder.dir, "--policy must be a causal LM (…ForCausalLM), not a classifier"));
        }
        let tokenizer = folder.load_matching_tokenizer()?;
        let template = chat_template(&folder, options.chat_template.as_deref())?;
        let limit = folder.config.max_position_embeddings;
        let mut prompts = read_ready_prompts(&options.prompts, &tokenizer, template.as_ref(), &options, limit)?;
        let val = match (&options.val, options.val_fraction) {
            (Some(path), _) => read_ready_prompts(path, &tokenizer, template.as_ref(), &options, limit)?,
            (None, Some(fraction)) => {
                if prompts.len() < 2 {
                    return Err(bad_input(&options.prompts, "too few prompts to hold some out for --val-fraction"));
                }
                prompts.split_off(prompts.len() - crate::train::held_out_count(prompts.len(), fraction))
            }
            (None, None) => Vec::new(),
        };
        if prompts.len() < s.prompts_per_update {
            return Err(bad_input(
                &options.prompts,
                format!("holds {} training prompts, fewer than --batch-size {}", prompts.len(), s.prompts_per_update),
            ));
        }

        rollout_footprint(s, &folder.config, &prompts, &Tuning::of(options.lora.as_ref(), &folder.config, options.gradient_checkpointing)?)
            .check(&options.device)?;
        let start = Start::open(&folder, options.lora.as_ref(), options.seed, &options.device)?;
        let new_adapter = options.lora.is_some();
        let policy = TunedModel::new(folder.config.clone(), start, options.gradient_checkpointing, options.seed)?;
        let reference = match &options.ref_model {
            Some(path) => {
                let ref_folder = ModelFolder::open(path)?;
                check_same_vocabulary(&tokenizer, &ref_folder.load_tokenizer()?, &ref_folder.dir, "--ref-model")?;
                let params = ref_folder.load_params(&options.device)?;
                Some(Decoder::new_inference(&ref_folder.config, &params)?)
            }
            None if new_adapter => None,
            // The policy as it starts (an adapter folder merged): what it must stay close to.
            None => Some(Decoder::new_inference(&folder.config, &folder.load_params(&options.device)?)?),
        };
        let reward = Reward::load(&options)?;
        let value = match s.algo {
            Algo::Grpo => {
                if options.value_model.is_some() {
                    return Err(usage("--algo grpo has no value model; drop --value-model"));
                }
                None
            }
            Algo::Ppo => {
                let source = options.value_model.as_deref().or(options.reward_model.as_deref()).unwrap_or(&options.policy);
                Some(load_value_model(source, &tokenizer, &options)?)
            }
        };
        let mut groups = vec![("policy.", policy.params())];
        if let Some(v) = &value {
            groups.push(("value.", v.tuned.params()));
        }
        let all = Params::union(&groups);
        let mut eos = folder.eos_token_ids();
        if eos.is_empty() {
            eos.extend(tokenizer.eos_id());
        }
        if eos.is_empty() && !s.ignore_eos {
            progress::warn("note: the policy has no EOS token; every response runs to --max-new-tokens");
        }
        let pad = policy.config.pad_token_id.or(tokenizer.eos_id()).unwrap_or(0);
        progress::log(format!(
            "{}: {} training prompts, {} held out; {} × {} episodes per update, {} epochs × {} minibatches; reward {}; {} trainable parameters",
            match s.algo { Algo::Ppo => "ppo", Algo::Grpo => "grpo" },
            prompts.len(),
            val.len(),
            s.prompts_per_update,
            s.samples,
            s.ppo_epochs,
            s.minibatches,
            reward.name(),
            all.num_elements()
        ));
        let (count, seed) = (prompts.len(), options.seed);
        Ok(RlTask {
            kl: KlController { coef: s.kl_coef, target: s.target_kl, horizon: s.kl_horizon },
            settings: options.settings.clone(),
            seed,
            policy_parts: FolderParts::of(&folder, &tokenizer)?,
            policy,
            value,
            all,
            reference,
            reward,
            tokenizer,
            eos,
            pad,
            prompts,
            val,
            eval_batches: options.eval_batches,
            cursor: EpochCursor::new(move |epoch| shuffled(count, seed, epoch)),
            updates: 0,
            episodes_done: 0,
            position: 0,
            rollout: None,
            rollout_metrics: Map::new(),
            stats: UpdateStats::default(),
            rollouts_dir: options.run_dir.join("rollouts"),
            model_name: options.policy.clone(),
            update_started: None,
            rollout_seconds: 0.0,
            warned_kl: 0.0,
        })
    }

    fn episodes_per_update(&self) -> usize {
        self.settings.prompts_per_update * self.settings.samples
    }

    /// The reference's log-probabilities: its own model, or the policy with its adapter off.
    fn reference_logprobs(&self, layout: &Layout, temperature: f64) -> Result<Tensor> {
        match &self.reference {
            Some(reference) => Ok(layout.logprobs(reference, temperature)?.0),
            None => self.policy.base(|base| Ok(layout.logprobs(base, temperature)?.0)).expect("a LoRA policy has a base"),
        }
    }

    fn micro_batches_per_update(&self) -> usize {
        self.settings.ppo_epochs * self.settings.minibatches * self.settings.grad_accum
    }

    /// Sample `samples` responses to each prompt with the current policy. Episode `i` of the
    /// run draws from its own random stream, so a resumed run samples the same tokens.
    fn sample(&self, prompts: &[(usize, &ReadyPrompt)], samples: usize, sampling: Sampling, first_episode: u64) -> Result<Vec<Episode>> {
        let jobs: Vec<(usize, &ReadyPrompt, u32)> =
            prompts.iter().flat_map(|&(index, p)| (0..samples as u32).map(move |s| (index, p, s))).collect();
        let queries: Vec<Vec<u32>> = jobs.iter().map(|(_, p, _)| p.ids.clone()).collect();
        let mut rngs: Vec<_> = (0..jobs.len()).map(|i| sample_rng(self.seed, first_episode + (i / samples) as u64, (i % samples) as u64)).collect();
        let completions = self.policy.sampling(|snapshot| {
            let generator = Generator {
                model: snapshot,
                eos: self.eos.clone(),
                pad: self.pad,
                max_new_tokens: self.settings.max_new_tokens,
                sampling,
                ignore_eos: self.settings.ignore_eos,
            };
            generator.run(&queries, &mut rngs, |_| {})
        })?;
        let mut episodes = Vec::with_capacity(jobs.len());
        for ((index, prompt, sample), completion) in jobs.into_iter().zip(completions) {
            let text = self.tokenizer.decode(&completion.tokens)?;
            let mut response = completion.tokens;
            if completion.stopped {
                response.push(self.eos[0]);
            }
            if response.is_empty() {
                // Nothing sampled at all (max_new_tokens 0 is refused): keep one pad as a no-op action.
                response.push(self.pad);
            }
            episodes.push(Episode {
                prompt: index,
                sample,
                query: prompt.ids.clone(),
                response,
                stopped: completion.stopped,
                text,
                score: 0.0,
                logprobs: Vec::new(),
                ref_logprobs: Vec::new(),
                values: Vec::new(),
                kl: Vec::new(),
                advantages: Vec::new(),
                returns: Vec::new(),
            });
        }
        Ok(episodes)
    }

    /// Scores from the reward, minus the missing-EOS penalty.
    fn score(&self, episodes: &mut [Episode], prompts: &[ReadyPrompt]) -> Result<Vec<f64>> {
        let prompt_texts: Vec<&str> = episodes.iter().map(|e| prompts[e.prompt].text.as_str()).collect();
        let responses: Vec<&str> = episodes.iter().map(|e| e.text.as_str()).collect();
        let raw = self.reward.scores(&prompt_texts, &responses)?;
        for (e, &r) in episodes.iter_mut().zip(&raw) {
            e.score = r as f32 - match (self.settings.missing_eos_penalty, e.stopped) {
                (Some(penalty), false) => penalty as f32,
                _ => 0.0,
            };
        }
        Ok(raw)
    }

    /// Old log-probabilities (the policy as it is now), reference log-probabilities and values,
    /// in micro-batch-sized chunks without gradients.
    fn fill_forward_figures(&self, episodes: &mut [Episode]) -> Result<()> {
        let device = self.policy.decoder.device().clone();
        let chunk = (self.episodes_per_update() / (self.settings.minibatches * self.settings.grad_accum)).max(1);
        let temperature = self.settings.sampling.temperature;
        for group in episodes.chunks_mut(chunk) {
            let refs: Vec<&Episode> = group.iter().collect();
            let layout = Layout::new(&refs, self.pad, &device)?;
            let logprobs = unpack(&self.policy.no_grad(|d| layout.logprobs(d, temperature))?.0, &refs)?;
            let ref_logprobs = unpack(&self.reference_logprobs(&layout, temperature)?, &refs)?;
            let values = match &self.value {
                Some(v) => unpack(&v.tuned.no_grad(|d| layout.values(d))?, &refs)?,
                None => refs.iter().map(|e| vec![0f32; e.response.len()]).collect(),
            };
            for (((e, lp), rlp), v) in group.iter_mut().zip(logprobs).zip(ref_logprobs).zip(values) {
                e.kl = advantage::kl_per_token(&lp, &rlp, self.settings.kl_estimator);
                (e.logprobs, e.ref_logprobs, e.values) = (lp, rlp, v);
            }
        }
        Ok(())
    }

    /// Advantages and returns: GAE over KL-shaped rewards (PPO) or group-relative scores (GRPO).
    fn fill_advantages(&self, episodes: &mut [Episode]) {
        let s = &self.settings;
        match s.algo {
            Algo::Ppo => {
                let mut rewards: Vec<Vec<f32>> =
                    episodes.iter().map(|e| advantage::shaped_rewards(&e.kl, e.score, self.kl.coef as f32)).collect();
                if s.whiten_rewards {
                    advantage::whiten(&mut rewards, true);
                }
                let mut advantages = Vec::with_capacity(episodes.len());
                for (e, r) in episodes.iter_mut().zip(&rewards) {
                    let (a, g) = advantage::gae(r, &e.values, s.gamma as f32, s.lam as f32);
                    e.returns = g;
                    advantages.push(a);
                }
                advantage::whiten(&mut advantages, false);
                for (e, a) in episodes.iter_mut().zip(advantages) {
                    e.advantages = a;
                }
            }
            Algo::Grpo => {
                let scores: Vec<f32> = episodes.iter().map(|e| e.score).collect();
                let relative = advantage::group_advantages(&scores, s.samples);
                for (e, a) in episodes.iter_mut().zip(relative) {
                    e.advantages = vec![a; e.response.len()];
                    e.returns = vec![0.0; e.response.len()];
                }
            }
        }
    }

    /// Sample, score and prepare the next update's rollout; log it to `rollouts/`.
    fn start_update(&mut self) -> Result<()> {
        let started = Instant::now();
        let picked = self.cursor.take(self.settings.prompts_per_update);
        let prompts: Vec<(usize, &ReadyPrompt)> = picked.iter().map(|&i| (i, &self.prompts[i])).collect();
        let first = self.episodes_done / self.settings.samples as u64;
        let mut episodes = self.sample(&prompts, self.settings.samples, self.settings.sampling, first)?;
        let raw_scores = self.score(&mut episodes, &self.prompts)?;
        self.fill_forward_figures(&mut episodes)?;
        self.fill_advantages(&mut episodes);
        self.updates += 1;
        self.episodes_done += episodes.len() as u64;
        self.rollout_metrics = self.rollout_metrics(&episodes);
        self.write_rollout_log(&episodes, &raw_scores)?;
        let kl = self.rollout_metrics["objective/kl"].as_f64().unwrap_or(f64::NAN);
        if kl.abs() > self.settings.warn_kl && kl.abs() > 1.25 * self.warned_kl {
            progress::warn(format!(
                "update {}: objective/kl {kl:.2} is beyond ±{}: the policy is drifting far from the reference (raise --kl-coef, set --target-kl, or lower --lr); warned again only if it grows by a quarter",
                self.updates, self.settings.warn_kl
            ));
            self.warned_kl = kl.abs();
        }
        if self.settings.algo == Algo::Ppo {
            self.kl.update(kl, episodes.len());
        }
        self.rollout = Some(episodes);
        self.update_started = Some(started);
        self.rollout_seconds = started.elapsed().as_secs_f64();
        self.position = 0;
        self.stats = UpdateStats::default();
        Ok(())
    }

    /// TRL's rollout figures: sums over each sequence, means over the batch.
    fn rollout_metrics(&self, episodes: &[Episode]) -> Map<String, Value> {
        let n = episodes.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Episode) -> f64| episodes.iter().map(f).sum::<f64>() / n;
        let kl = mean(&|e| e.kl.iter().map(|&k| k as f64).sum());
        let non_score = -self.kl.coef * kl;
        let scores = mean(&|e| e.score as f64);
        let mut m = Map::new();
        m.insert("objective/kl".into(), json!(kl));
        m.insert("objective/entropy".into(), json!(mean(&|e| -e.logprobs.iter().map(|&l| l as f64).sum::<f64>())));
        m.insert("objective/non_score_reward".into(), json!(non_score));
        m.insert("objective/rlhf_reward".into(), json!(non_score + scores));
        m.insert("objective/scores".into(), json!(scores));
        m.insert("objective/kl_coef".into(), json!(self.kl.coef));
        m.insert("val/num_eos_tokens".into(), json!(episodes.iter().filter(|e| e.stopped).count()));
        m.insert("response_length".into(), json!(mean(&|e| e.response.len() as f64)));
        m.insert("episode".into(), json!(self.episodes_done));
        m
    }

    /// `rollouts/update-NNNNNN.parquet`: every episode as a scored response (so `rank` and
    /// `rm-train` read it), plus the update, its KL and whether it ended with EOS.
    fn write_rollout_log(&self, episodes: &[Episode], raw_scores: &[f64]) -> Result<()> {
        std::fs::create_dir_all(&self.rollouts_dir)?;
        let rows: Vec<ResponseRecord> = episodes
            .iter()
            .map(|e| ResponseRecord {
                prompt_id: self.prompts[e.prompt].prompt_id.clone(),
                prompt: self.prompts[e.prompt].text.clone(),
                response: e.text.clone(),
                sample: e.sample as i32,
                model: self.model_name.clone(),
                finish_reason: if e.stopped { "stop" } else { "length" }.into(),
                num_tokens: e.response.len() as i32,
                logprob: e.logprobs.iter().map(|&l| l as f64).sum(),
            })
            .collect();
        let mut fields = ResponseRecord::fields();
        fields.extend([
            Field::new("score", DataType::Float64, false),
            Field::new("scorer", DataType::Utf8, false),
            Field::new("reward_score", DataType::Float64, false),
            Field::new("kl", DataType::Float64, false),
            Field::new("ended_with_eos", DataType::Boolean, false),
            Field::new("update", DataType::Int64, false),
        ]);
        let schema = Arc::new(Schema::new(fields));
        let mut columns = ResponseRecord::to_arrays(&rows);
        let name = self.reward.name();
        columns.extend([
            Arc::new(Float64Array::from_iter_values(episodes.iter().map(|e| e.score as f64))) as ArrayRef,
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(name.as_str(), episodes.len()))),
            Arc::new(Float64Array::from(raw_scores.to_vec())),
            Arc::new(Float64Array::from_iter_values(episodes.iter().map(|e| e.kl.iter().map(|&k| k as f64).sum()))),
            Arc::new(BooleanArray::from(episodes.iter().map(|e| e.stopped).collect::<Vec<_>>())),
            Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(self.updates as i64, episodes.len()))),
        ]);
        let path = self.rollouts_dir.join(format!("update-{:06}.parquet", self.updates));
        let mut sink = ParquetSink::create(&path, schema.clone(), lathe_metadata(Kind::Scored, "ppo"))?;
        sink.write(&RecordBatch::try_new(schema, columns)?)?;
        sink.finish()?;
        Ok(())
    }

    /// The episodes of the next micro-batch: each epoch visits the rollout in a fresh order.
    fn micro_batch(&self) -> Vec<usize> {
        let s = &self.settings;
        let n = self.episodes_per_update();
        let per_epoch = s.minibatches * s.grad_accum;
        let (epoch, within) = (self.position / per_epoch, self.position % per_epoch);
        let order = shuffled(n, self.seed ^ self.updates.wrapping_mul(0x9E37_79B9_7F4A_7C15), epoch as u64);
        let size = n / per_epoch;
        order[within * size..(within + 1) * size].to_vec()
    }

    /// The update's figures, with TRL's names, once its last micro-batch is done.
    fn update_metrics(&self) -> Map<String, Value> {
        let st = &self.stats;
        let n = st.micro_batches.max(1) as f64;
        let ratio = st.ratio / n;
        let mut m = self.rollout_metrics.clone();
        m.insert("policy/approxkl_avg".into(), json!(st.approxkl / n));
        m.insert("policy/clipfrac_avg".into(), json!(st.clipfrac / n));
        m.insert("loss/policy_avg".into(), json!(st.policy_loss / n));
        m.insert("loss/value_avg".into(), json!(st.value_loss / n));
        m.insert("val/clipfrac_avg".into(), json!(st.value_clipfrac / n));
        m.insert("policy/entropy_avg".into(), json!(st.entropy / n));
        m.insert("val/ratio".into(), json!(ratio));
        m.insert("val/ratio_var".into(), json!((st.ratio_sq / n - ratio * ratio).max(0.0)));
        m.insert("update".into(), json!(self.updates));
        if let Some(started) = self.update_started {
            // A resumed update has no start time: its speed is not reported.
            let seconds = started.elapsed().as_secs_f64();
            m.insert("time/update_seconds".into(), json!(seconds));
            m.insert("time/rollout_seconds".into(), json!(self.rollout_seconds));
            m.insert("eps".into(), json!(self.episodes_per_update() as f64 / seconds));
        }
        m
    }

    /// Greedy (or `eval_temperature`) responses to held-out prompts: their mean score, KL to
    /// the reference, length and share ending with EOS.
    fn evaluate_prompts(&self, prompts: &[ReadyPrompt]) -> Result<Map<String, Value>> {
        let sampling = Sampling { temperature: self.settings.eval_temperature, ..self.settings.sampling };
        let (mut scores, mut kls, mut lengths, mut stopped) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
        let device = self.policy.decoder.device().clone();
        let temperature = self.settings.sampling.temperature;
        for (c, chunk) in prompts.chunks(self.settings.prompts_per_update).enumerate() {
            let indexed: Vec<(usize, &ReadyPrompt)> = chunk.iter().enumerate().map(|(i, p)| (c * self.settings.prompts_per_update + i, p)).collect();
            // Evaluation draws from streams of its own, far from the training episodes'.
            let mut episodes = self.sample(&indexed, 1, sampling, u64::MAX / 2 + (c * chunk.len()) as u64)?;
            let raw = self.score(&mut episodes, prompts)?;
            let refs: Vec<&Episode> = episodes.iter().collect();
            let layout = Layout::new(&refs, self.pad, &device)?;
            let lp = unpack(&self.policy.no_grad(|d| layout.logprobs(d, temperature))?.0, &refs)?;
            let rlp = unpack(&self.reference_logprobs(&layout, temperature)?, &refs)?;
            for ((e, lp), rlp) in episodes.iter().zip(lp).zip(rlp) {
                kls.push(advantage::kl_per_token(&lp, &rlp, KlEstimator::K1).iter().map(|&k| k as f64).sum::<f64>());
                lengths.push(e.response.len() as f64);
                stopped += usize::from(e.stopped);
            }
            scores.extend(raw);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut m = Map::new();
        m.insert("score".into(), json!(mean(&scores)));
        m.insert("kl".into(), json!(mean(&kls)));
        m.insert("response_length".into(), json!(mean(&lengths)));
        m.insert("eos_fraction".into(), json!(stopped as f64 / prompts.len().max(1) as f64));
        Ok(m)
    }
}

impl Task for RlTask {
    fn params(&self) -> &Params {
        &self.all
    }

    fn next_loss(&mut self) -> Result<StepLoss> {
        if self.rollout.is_none() {
            self.start_update()?;
        }
        let picked = self.micro_batch();
        let rollout = self.rollout.as_ref().expect("started above");
        let episodes: Vec<&Episode> = picked.iter().map(|&i| &rollout[i]).collect();
        let s = &self.settings;
        let layout = Layout::new(&episodes, self.pad, self.policy.decoder.device())?;
        let micro_batch = self.updates * self.micro_batches_per_update() as u64 + self.position as u64;
        self.policy.dropout_for(Some(micro_batch));
        if let Some(value) = &self.value {
            value.tuned.dropout_for(Some(micro_batch));
        }
        let (new_logprobs, entropy) = layout.logprobs(&self.policy.decoder, s.sampling.temperature)?;
        let column = |f: fn(&Episode) -> &[f32]| -> Result<Tensor> { layout.pack(&episodes.iter().map(|e| f(e)).collect::<Vec<_>>()) };
        let old_logprobs = column(|e| &e.logprobs)?;
        let advantages = column(|e| &e.advantages)?;
        let policy = loss::policy_loss(&new_logprobs, &old_logprobs, &advantages, &layout.mask, s.cliprange)?;
        let mut total = policy.loss.clone();
        let mut value_figures = (0.0, 0.0);
        match (&self.value, s.algo) {
            (Some(value), Algo::Ppo) => {
                let values = layout.values(&value.tuned.decoder)?;
                let clipped = loss::value_loss(&values, &column(|e| &e.values)?, &column(|e| &e.returns)?, &layout.mask, s.cliprange_value)?;
                value_figures = (scalar(&clipped.loss)?, clipped.clipfrac);
                total = (total + (clipped.loss * s.vf_coef)?)?;
            }
            _ if s.kl_coef > 0.0 => {
                let kl = loss::masked_mean(&loss::k3_to_reference(&new_logprobs, &column(|e| &e.ref_logprobs)?)?, &layout.mask)?;
                total = (total + (kl * s.kl_coef)?)?;
            }
            _ => {}
        }
        let diff = (new_logprobs.detach() - &old_logprobs)?;
        let ratio = diff.exp()?;
        let st = &mut self.stats;
        st.micro_batches += 1;
        st.approxkl += 0.5 * scalar(&loss::masked_mean(&diff.sqr()?, &layout.mask)?)?;
        st.clipfrac += policy.clipfrac;
        st.policy_loss += scalar(&policy.loss)?;
        st.value_loss += value_figures.0;
        st.value_clipfrac += value_figures.1;
        st.entropy += mean_entropy(&entropy, &layout.mask)?;
        let mean_ratio = scalar(&loss::masked_mean(&ratio, &layout.mask)?)?;
        st.ratio += mean_ratio;
        st.ratio_sq += mean_ratio * mean_ratio;
        let tokens = episodes.iter().map(|e| (e.query.len() + e.response.len()) as u64).sum();

        self.position += 1;
        let mut metrics = Map::new();
        if self.position == self.micro_batches_per_update() {
            metrics = self.update_metrics();
            let ratio = metrics["val/ratio"].as_f64().unwrap_or(1.0);
            let bound = self.settings.warn_ratio;
            if !(ratio <= bound && ratio >= 1.0 / bound) {
                progress::warn(format!(
                    "update {}: mean probability ratio {ratio:.3} is outside [{:.2}, {bound}]: updates are too large (lower --lr or --ppo-epochs)",
                    self.updates,
                    1.0 / bound
                ));
            }
            self.rollout = None;
            self.update_started = None;
        }
        Ok(StepLoss { loss: total, tokens, metrics })
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let limit = crate::train::eval_limit(self.eval_batches, self.settings.prompts_per_update, self.val.len());
        let metrics = self.evaluate_prompts(&self.val[..limit])?;
        let score = metrics["score"].as_f64().unwrap_or(f64::NAN);
        // The engine keeps the checkpoint of lowest loss: the best one has the highest reward.
        Ok(Some(Evaluation { loss: -score, perplexity: false, metrics }))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.policy.save(dir, &self.policy_parts)?;
        if let Some(v) = &self.value {
            v.tuned.save(&dir.join(VALUE_DIR), &v.parts)?;
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_model(dir)?;
        if let Some(episodes) = &self.rollout {
            write_atomic(&dir.join(ROLLOUT), serde_json::to_string(episodes)?.as_bytes())?;
        }
        Ok(())
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.policy.load_checkpoint(dir)?;
        if let Some(v) = &self.value {
            v.tuned.load_checkpoint(&dir.join(VALUE_DIR))?;
        }
        let path = dir.join(ROLLOUT);
        self.rollout = if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            Some(serde_json::from_str(&text).map_err(|e| bad_input(&path, format!("not a rollout ({e})")))?)
        } else {
            None
        };
        Ok(())
    }

    fn data_state(&self) -> Value {
        json!({
            "cursor": self.cursor.state(),
            // Bits, not a decimal: the coefficient shapes every later reward.
            "kl_coef_bits": self.kl.coef.to_bits(),
            "updates": self.updates,
            "episodes": self.episodes_done,
            "position": self.position,
            "stats": self.stats,
            "rollout_metrics": self.rollout_metrics,
        })
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        let bad = |what: &str| crate::error::failed(format!("checkpoint data state: {what}"));
        self.cursor.restore(&state["cursor"])?;
        self.kl.coef = f64::from_bits(state["kl_coef_bits"].as_u64().ok_or_else(|| bad("kl_coef_bits"))?);
        let updates = state["updates"].as_u64().ok_or_else(|| bad("updates"))?;
        if updates < self.updates {
            // A step abandoned inside its accumulation had started this rollout: it goes too.
            self.rollout = None;
            self.update_started = None;
        }
        self.updates = updates;
        self.episodes_done = state["episodes"].as_u64().ok_or_else(|| bad("episodes"))?;
        self.position = state["position"].as_u64().ok_or_else(|| bad("position"))? as usize;
        self.stats = serde_json::from_value(state["stats"].clone()).map_err(|_| bad("stats"))?;
        self.rollout_metrics = state["rollout_metrics"].as_object().cloned().unwrap_or_default();
        // A finished update leaves its position at the end and its rollout gone.
        if self.rollout.is_none() && self.position > 0 && self.position < self.micro_batches_per_update() {
            return Err(bad("an update in progress but no rollout.json"));
        }
        Ok(())
    }

    fn signature(&self) -> Value {
        let c = &self.policy.config;
        let s = &self.settings;
        json!({
            "algo": s.algo, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "value_model": self.value.as_ref().map(|v| v.tuned.config.hidden_size),
            "lora": self.policy.adapter().map(|a| a.settings.r), "prompts_per_update": s.prompts_per_update,
            "samples": s.samples, "ppo_epochs": s.ppo_epochs, "minibatches": s.minibatches, "grad_accum": s.grad_accum,
            "prompts": self.prompts.len(),
        })
    }

    fn summary(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("algo".into(), json!(self.settings.algo));
        out.insert("reward".into(), json!(self.reward.name()));
        out.insert("prompts".into(), json!(self.prompts.len()));
        out.insert("held_out".into(), json!(self.val.len()));
        out.insert("updates".into(), json!(self.updates));
        out.insert("episodes".into(), json!(self.episodes_done));
        out.insert("kl_coef".into(), json!(self.kl.coef));
        out
    }
}

/// One update's memory: every episode decoded at once through the KV cache and kept with its
/// per-token figures, the reference model beside the policy, and a micro-batch trained on.
fn rollout_footprint(s: &RlSettings, config: &ModelConfig, prompts: &[ReadyPrompt], tuning: &Tuning) -> Footprint {
    let episodes = s.prompts_per_update.saturating_mul(s.samples);
    let length = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0).saturating_add(s.max_new_tokens);
    let micro_batch = episodes / s.minibatches.saturating_mul(s.grad_accum).max(1);
    // Token, log-probabilities (policy, reference), KL, value, advantage, return.
    let per_token = 7 * 4;
    Footprint::new(format!("--batch-size {} × -n {} × --max-new-tokens {}", s.prompts_per_update, s.samples, s.max_new_tokens))
        .training(config, micro_batch, length, tuning)
        .add("the reference model", crate::limits::parameters(config).saturating_mul(4))
        .decoding(config, episodes, length)
        .add("the rollout", crate::limits::elements(&[episodes, length]).saturating_mul(per_token))
}

fn check_settings(s: &RlSettings) -> Result<()> {
    let positive = [
        (s.prompts_per_update, "--batch-size"),
        (s.samples, "-n"),
        (s.ppo_epochs, "--ppo-epochs"),
        (s.minibatches, "--minibatches"),
        (s.grad_accum, "--grad-accum"),
        (s.max_new_tokens, "--max-new-tokens"),
    ];
    if let Some((_, flag)) = positive.iter().find(|(v, _)| *v == 0) {
        return Err(usage(format!("{flag} must be at least 1")));
    }
    let episodes = s.prompts_per_update * s.samples;
    if episodes % (s.minibatches * s.grad_accum) != 0 {
        return Err(usage(format!(
            "{episodes} episodes per update do not split into --minibatches {} × --grad-accum {}",
            s.minibatches, s.grad_accum
        )));
    }
    if s.algo == Algo::Grpo && s.samples < 2 {
        return Err(usage("--algo grpo compares the samples of a prompt: give -n 2 or more"));
    }
    if s.sampling.temperature <= 0.0 {
        return Err(usage("--temperature must be above 0: PPO needs sampled responses and their probabilities"));
    }
    let at_least_zero = [
        ("--kl-coef", s.kl_coef),
        ("--vf-coef", s.vf_coef),
        ("--temperature", s.sampling.temperature),
        ("--eval-temperature", s.eval_temperature),
        ("--warn-kl", s.warn_kl),
        ("--kl-horizon", s.kl_horizon),
    ];
    if let Some((flag, value)) = at_least_zero.iter().find(|(_, v)| !(*v >= 0.0 && v.is_finite())) {
        return Err(usage(format!("{flag} {value}: expected a finite number >= 0")));
    }
    for (flag, value) in [("--gamma", s.gamma), ("--lam", s.lam), ("--top-p", s.sampling.top_p)] {
        if !(0.0..=1.0).contains(&value) {
            return Err(usage(format!("{flag} {value}: expected a number in [0, 1]")));
        }
    }
    if !(s.warn_ratio >= 1.0 && s.warn_ratio.is_finite()) {
        return Err(usage(format!("--warn-ratio {}: expected a finite number >= 1", s.warn_ratio)));
    }
    if let Some(penalty) = s.missing_eos_penalty.filter(|p| !p.is_finite()) {
        return Err(usage(format!("--missing-eos-penalty {penalty}: expected a finite number")));
    }
    if !(s.cliprange > 0.0 && s.cliprange_value > 0.0) {
        return Err(usage("--cliprange and --cliprange-value must be above 0"));
    }
    if let Some(t) = s.target_kl.filter(|t| !(*t > 0.0)) {
        return Err(usage(format!("--target-kl {t}: must be above 0")));
    }
    Ok(())
}

/// Prompts, left-truncated to `--max-prompt-length`, each checked to leave room for the
/// response (and cut at the left to make it with `--truncate-prompt left`).
fn read_ready_prompts(path: &Path, tokenizer: &LoadedTokenizer, template: Option<&ChatTemplate>, options: &RlOptions, limit: usize) -> Result<Vec<ReadyPrompt>> {
    let mut prompts = read_prompts(path, tokenizer, template)?;
    let mut cut = 0;
    for p in &mut prompts {
        let before = p.ids.len();
        if let Some(keep) = options.max_prompt_length.filter(|&k| p.ids.len() > k) {
            p.ids.drain(..p.ids.len() - keep);
        }
        fit_prompt(&mut p.ids, options.settings.max_new_tokens, limit, options.truncate_prompt)
            .map_err(|why| bad_input(path, format!("row {}: {why}", p.row)))?;
        if p.ids.len() < before {
            p.text = tokenizer.decode(&p.ids)?;
            cut += 1;
        }
    }
    if cut > 0 {
        crate::progress::warn(format!("ppo: {}: {cut} of {} prompts were cut at the left to fit", path.display(), prompts.len()));
    }
    Ok(prompts)
}

/// The value model: a one-label sequence classifier (a reward model) as it is, or a causal LM
/// with its LM head replaced by a zero `score` head (values start at 0). With LoRA it trains
/// an adapter of its own, its head in full.
fn load_value_model(source: &str, policy_tokenizer: &LoadedTokenizer, options: &RlOptions) -> Result<ValueModel> {
    let device = &options.device;
    let folder = ModelFolder::open(source)?;
    let tokenizer = folder.load_tokenizer()?;
    check_same_vocabulary(policy_tokenizer, &tokenizer, &folder.dir, "the value model (--value-model, else --reward-model)")?;
    let mut config = folder.config.clone();
    // An adapter folder is merged: the value model starts from what it scores with.
    let mut params = folder.load_params(device)?;
    let head = match config.head {
        Head::SequenceClassification { num_labels: 1 } => params.remove("score.weight").map(|v| v.as_tensor().clone()),
        Head::SequenceClassification { num_labels } => {
            return Err(bad_input(&folder.dir, format!("has {num_labels} labels; a value model needs one scalar (a reward model)")));
        }
        Head::CausalLm => {
            params.remove("lm_head.weight");
            config.head = Head::SequenceClassification { num_labels: 1 };
            config.raw.insert("num_labels".into(), json!(1));
            config.raw.insert("id2label".into(), json!({"0": "LABEL_0"}));
            config.raw.insert("label2id".into(), json!({"LABEL_0": 0}));
            None
        }
    };
    let head = match head {
        Some(head) => head,
        None => Tensor::zeros((1, config.hidden_size), DType::F32, device)?,
    };
    let start = match &options.lora {
        None => {
            params.insert("score.weight", head)?;
            Start::Full(params)
        }
        Some(settings) => {
            let base = std::fs::canonicalize(&folder.dir).unwrap_or(folder.dir.clone()).display().to_string();
            let mut adapter = Adapter::new(settings.clone(), &config, &base, options.seed ^ 0x7A1E, device)?;
            adapter.params.insert(lora::SCORE, head)?;
            Start::Lora { base: params, adapter }
        }
    };
    let tuned = TunedModel::new(config, start, options.gradient_checkpointing, options.seed ^ 0x7A1E)?;
    Ok(ValueModel { parts: FolderParts::of(&folder, &tokenizer)?, tuned })
}

#[cfg(test)]
mod tests;
