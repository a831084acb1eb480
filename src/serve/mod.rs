//! `serve-guard`: a model served over OpenAI's HTTP API behind input and output classifier
//! guards, with a human review queue whose verdicts become the next guard's training data.
//!
//! - [`api`]: OpenAI's request, response, chunk and error bodies.
//! - [`engine`]: the model on worker threads fed by a bounded queue, requests decoded in batches.
//! - [`guard`]: guard classifiers on their own threads, and the policy over their scores.
//! - [`review`]: the SQLite review queue, its statistics and the labeled-text export.
//! - [`metrics`]: the Prometheus page.
//! - `http` / `web`: the routes, and the server-rendered `/review` page.
//!
//! Keys (client and reviewer roles), sessions, CSRF and Origin checks and the connection
//! limits are the shared web layer's ([`crate::web`]).

pub mod api;
pub mod engine;
pub mod guard;
mod http;
pub mod metrics;
pub mod review;
mod web;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;

use crate::error::{Result, bad_input, usage};
use crate::generate::chat_template;
use crate::model::{ChatTemplate, Head, Decoder, ModelFolder};
use crate::score::ModelSettings;
use crate::tokenizer::LoadedTokenizer;
use engine::{Engine, EngineOptions};
use guard::{GuardInfo, GuardWorker, Policy};
use metrics::Metrics;
use review::ReviewDb;
use crate::web::Gate;
use crate::web::keys::{KeyFile, Role};
use crate::web::listen::ConnectionLimits;

/// The roles a serve-guard keys file holds.
pub const ROLES: &[Role] = &[Role::Client, Role::Reviewer];

/// The review page's session cookie (each server its own: browsers share cookies across ports).
const SESSION_COOKIE: &str = "serve_guard_session";

/// Everything `serve-guard serve` is told.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: String,
    pub input_guards: Vec<String>,
    pub output_guards: Vec<String>,
    pub policy: Option<PathBuf>,
    pub listen: String,
    pub db: PathBuf,
    pub keys: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub chat_template: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub queue_len: usize,
    pub max_batch: usize,
    pub workers: usize,
    pub request_timeout: Duration,
    /// Requests per minute per key (0: no limit).
    pub rate_limit: u32,
    pub log_content: bool,
    /// `/metrics` without a key.
    pub public_metrics: bool,
    pub connections: ConnectionLimits,
    pub session_lifetime: Duration,
    pub threads: usize,
    pub device: Device,
    pub seed: u64,
    pub quiet: bool,
}

/// Limits and switches the handlers read.
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub request_timeout: Duration,
    pub rate_limit: u32,
    pub log_content: bool,
    pub public_metrics: bool,
    pub quiet: bool,
}

/// A token bucket per key.
pub(crate) struct Bucket {
    pub tokens: f64,
    pub at: std::time::Instant,
}

pub(crate) struct AppState {
    pub model_id: String,
    pub created: i64,
    pub engine: Engine,
    pub tokenizer: Arc<LoadedTokenizer>,
    pub template: ChatTemplate,
    pub max_positions: usize,
    pub input_guards: Vec<Arc<GuardWorker>>,
    pub output_guards: Vec<Arc<GuardWorker>>,
    /// Every distinct guard, for `/v1/moderations`.
    pub all_guards: Vec<Arc<GuardWorker>>,
    pub policy: Policy,
    pub review: Arc<Mutex<ReviewDb>>,
    pub gate: Gate,
    pub metrics: Metrics,
    pub buckets: Mutex<HashMap<String, Bucket>>,
    pub limits: Limits,
    pub seed: u64,
}

/// Check everything, load the model and guards, and serve until the process is stopped.
/// Bad input (keys, policy, models, address) is refused before the port opens.
pub fn serve(options: &ServeOptions) -> Result<()> {
    if options.max_tokens == 0 || options.default_max_tokens == 0 {
        return Err(usage("--max-tokens and --default-max-tokens must be at least 1"));
    }
    if options.queue_len == 0 || options.max_batch == 0 {
        return Err(usage("--queue-len and --max-batch must be at least 1"));
    }
    let address: SocketAddr = options
        .listen
        .parse()
        .map_err(|_| usage(format!("--listen {}: expected HOST:PORT, e.g. 127.0.0.1:8080", options.listen)))?;
    let keys = options.keys.as_deref().map(|path| KeyFile::open(path, ROLES, "serve-guard")).transpose()?;

    let folder = ModelFolder::open(&options.model)?;
    if folder.config.head != Head::CausalLm {
        return Err(bad_input(&folder.dir, "is not a causal language model (…ForCausalLM); pass guards with --input-guard / --output-guard"));
    }
    let template = match chat_template(&folder, options.chat_template.as_deref())? {
        Some(t) => t,
        None => ChatTemplate::new(crate::model::chat::CHATML, Vec::new())?,
    };
    let tokenizer = Arc::new(folder.load_tokenizer()?);

    // Guards: one worker per distinct name, shared by the input and output sides.
    let settings = ModelSettings { device: options.device.clone(), batch_size: 16 };
    let mut loaded: Vec<(String, String, crate::score::GuardModel)> = Vec::new();
    let mut sides: Vec<(bool, String)> = Vec::new();
    for (is_input, spec) in options.input_guards.iter().map(|s| (true, s)).chain(options.output_guards.iter().map(|s| (false, s))) {
        let (name, model) = guard::guard_name(spec);
        match loaded.iter().find(|(n, _, _)| *n == name) {
            Some((_, first, _)) if *first != model => {
                return Err(usage(format!("two different guards are named `{name}` ({first}, {model}); name them apart with NAME=MODEL")));
            }
            Some(_) => {}
            None => {
                let guard = crate::score::GuardModel::load(&model, &settings)?;
                loaded.push((name.clone(), model, guard));
            }
        }
        sides.push((is_input, name));
    }
    let calibrated: Vec<HashMap<String, f64>> = loaded
        .iter()
        .map(|(_, _, g)| g.thresholds.as_ref().map(|t| g.labels.iter().cloned().zip(t.iter().copied()).collect()).unwrap_or_default())
        .collect();
    let infos: Vec<GuardInfo> =
        loaded.iter().zip(&calibrated).map(|((name, _, g), thresholds)| GuardInfo { name, labels: &g.labels, thresholds }).collect();
    let policy = Policy::load(options.policy.as_deref(), &infos)?;
    let review = ReviewDb::open(&options.db)?;

    let params = folder.load_params(&options.device)?;
    let model = Arc::new(Decoder::new_inference(&folder.config, &params)?);
    drop(params);
    let mut eos = folder.eos_token_ids();
    if eos.is_empty() {
        eos.extend(tokenizer.eos_id());
    }
    let engine = Engine::start(
        model,
        tokenizer.clone(),
        EngineOptions {
            workers: options.workers,
            threads: options.threads,
            queue_len: options.queue_len,
            max_batch: options.max_batch,
            eos,
            pad: folder.config.pad_token_id.or(tokenizer.eos_id()).unwrap_or(0),
        },
    )?;
    let guard_threads = options.threads.div_ceil(loaded.len().max(1)).max(1);
    let mut workers: Vec<Arc<GuardWorker>> = Vec::new();
    for (name, _, guard) in loaded {
        workers.push(Arc::new(GuardWorker::start(name, guard, guard_threads)?));
    }
    let pick = |input: bool| -> Vec<Arc<GuardWorker>> {
        sides.iter().filter(|(i, _)| *i == input).filter_map(|(_, n)| workers.iter().find(|w| &w.name == n).cloned()).collect()
    };
    let model_id = options.served_model_name.clone().unwrap_or_else(|| {
        folder.dir.file_name().map_or_else(|| options.model.clone(), |n| n.to_string_lossy().into_owned())
    });
    let state = Arc::new(AppState {
        model_id,
        created: chrono::Utc::now().timestamp(),
        engine,
        tokenizer,
        template,
        max_positions: folder.config.max_position_embeddings,
        input_guards: pick(true),
        output_guards: pick(false),
        all_guards: workers.clone(),
        policy,
        review: Arc::new(Mutex::new(review)),
        gate: Gate::new(keys, SESSION_COOKIE, options.session_lifetime),
        metrics: Metrics::default(),
        buckets: Mutex::new(HashMap::new()),
        limits: Limits {
            max_body_bytes: options.max_body_bytes,
            max_tokens: options.max_tokens,
            default_max_tokens: options.default_max_tokens,
            request_timeout: options.request_timeout,
            rate_limit: options.rate_limit,
            log_content: options.log_content,
            public_metrics: options.public_metrics,
            quiet: options.quiet,
        },
        seed: options.seed,
    });
    if !state.gate.has_keys() && !options.quiet {
        crate::progress::warn("warning: no --keys file: every endpoint, review included, is open to anyone who can reach the address");
    }

    let guards = |side: &[Arc<GuardWorker>]| if side.is_empty() { "none".to_string() } else { side.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ") };
    let banner = (!options.quiet).then(|| {
        format!(
            "serve-guard: model {} · input guards: {} · output guards: {} · policy {} · review queue {}",
            state.model_id,
            guards(&state.input_guards),
            guards(&state.output_guards),
            state.policy.version,
            options.db.display()
        )
    });
    crate::web::listen::run("serve-guard", address, options.connections, http::router(state), banner)
}
