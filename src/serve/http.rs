//! The routes: OpenAI's endpoints, health, metrics, and the review API. Every failure answers
//! with OpenAI's error body; every request is counted and timed for `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::api::{self, ApiError, ChatRequest, CompletionRequest, Endpoint, ModerationRequest, SamplingParams};
use super::engine::{self, Event};
use super::guard::{self, Action, Direction, GuardWorker, Verdict};
use crate::web::keys::Role;
use crate::web::{Principal, Refusal};
use super::review::{NewDecision, Verdict as ReviewVerdict, Which};
use crate::data::Message;
use crate::data::records::Prompt;
use crate::generate::{Sampling, encode_prompt};

type Shared = Arc<AppState>;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/moderations", post(moderations))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/review/items", get(review_items))
        .route("/v1/review/items/{id}", post(review_item))
        .route("/review", get(super::web::page))
        .route("/review/login", post(super::web::login))
        .route("/review/{id}", post(super::web::decide))
        .route("/review/logout", post(super::web::logout))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(crate::web::refuse_cross_site))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Count, time and log every request (never its content).
async fn observe(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    state.metrics.request(&path, response.status().as_u16(), seconds);
    if !state.limits.quiet && path != "/metrics" && path != "/health" {
        crate::progress::line(format!("serve-guard: {method} {path} {} {:.1}ms", response.status().as_u16(), seconds * 1000.0));
    }
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!("Unknown request URL: {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", Some("method_not_allowed"), format!("{} is not allowed on {}", request.method(), request.uri().path()))
}

// ---- auth, limits, bodies ----

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError::new(refusal.status, "invalid_request_error", Some(refusal.code), refusal.message)
    }
}

impl AppState {
    /// Who is calling (a bearer key or the review page's session; anyone on a server without
    /// keys). Reviewer-only endpoints pass `Role::Reviewer`. Every authorised call spends one
    /// token of the key's rate limit.
    pub(crate) fn authorize(&self, headers: &HeaderMap, needs: Role) -> Result<Principal, ApiError> {
        let principal = self.gate.identify(headers)?;
        if needs == Role::Reviewer {
            principal.require(&[Role::Reviewer])?;
        }
        if let Some(caller) = &principal.caller {
            self.spend(&caller.name)?;
        }
        Ok(principal)
    }

    fn spend(&self, name: &str) -> Result<(), ApiError> {
        let rate = self.limits.rate_limit;
        if rate == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let bucket = buckets.entry(name.to_string()).or_insert(super::Bucket { tokens: rate as f64, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate as f64 / 60.0).min(rate as f64);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(ApiError::rate_limited(format!("Rate limit reached for key `{name}`: {rate} requests per minute.")));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Run `guards` over `texts`, decide, count, and queue the decision for review when the
    /// policy says so (committed before this returns).
    async fn guard_step(&self, direction: Direction, guards: &[Arc<GuardWorker>], texts: Vec<String>, request_id: &str, review_text: &str) -> Result<Verdict, ApiError> {
        if guards.is_empty() || texts.is_empty() {
            return Ok(Verdict::allowed());
        }
        let started = Instant::now();
        let scores = guard::check(guards, &texts).await.map_err(|e| ApiError::internal(format!("guard failed: {e}")))?;
        for s in &scores {
            self.metrics.guard(&s.guard, direction.name(), s.seconds);
        }
        self.metrics.guard_step(direction.name(), started.elapsed().as_secs_f64());
        let verdict = self.policy.decide(&scores);
        let hits: Vec<(String, String, String)> =
            verdict.judged.iter().filter(|j| j.hit).map(|j| (j.guard.clone(), j.category.clone(), j.action.name().to_string())).collect();
        self.metrics.decision(direction.name(), verdict.action.name(), &hits);
        let reason = self.policy.review_reason(&verdict, &mut rand::rng());
        if let Some(reason) = reason {
            let decision = NewDecision {
                request_id: request_id.to_string(),
                direction: direction.name(),
                text: review_text.to_string(),
                judged: verdict.judged.clone(),
                action: verdict.action.name(),
                reason,
                policy_version: self.policy.version.clone(),
            };
            let db = self.review.clone();
            let stored = tokio::task::spawn_blocking(move || db.lock().unwrap_or_else(|p| p.into_inner()).insert(&decision)).await;
            let ok = matches!(stored, Ok(Ok(_)));
            if !ok && !self.limits.quiet {
                crate::progress::line(format!("serve-guard: request {request_id}: could not queue the decision for review"));
            }
            self.metrics.review_queued(ok);
        }
        if !self.limits.quiet && verdict.action != Action::Allow {
            let hits: Vec<String> = verdict.judged.iter().filter(|j| j.hit).map(|j| format!("{}/{}={:.3}", j.guard, j.category, j.score)).collect();
            crate::progress::line(format!("serve-guard: request {request_id}: {} {} ({})", direction.name(), verdict.action.name(), hits.join(", ")));
        }
        Ok(verdict)
    }
}

async fn read_json<T: DeserializeOwned>(body: Body, headers: &HeaderMap, limit: usize) -> Result<T, ApiError> {
    crate::web::require_json(headers)?;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::too_large(limit))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("We could not parse the JSON body of your request: {e}")))
}

fn new_id(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}-{n:016x}")
}

// ---- generation ----

async fn chat(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    generate(state, Endpoint::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    generate(state, Endpoint::Completion, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// A request, parsed and checked, before the guards see it.
struct Prepared {
    params: SamplingParams,
    /// What the input guards read: the whole conversation, and each message alone.
    guard_texts: Vec<String>,
    /// The conversation as the review queue shows it.
    transcript: String,
    prompt: Prompt,
}

fn transcript(messages: &[Message]) -> String {
    messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
}

async fn prepare(state: &AppState, endpoint: Endpoint, headers: &HeaderMap, body: Body) -> Result<Prepared, ApiError> {
    let limit = state.limits.max_body_bytes;
    Ok(match endpoint {
        Endpoint::Chat => {
            let request: ChatRequest = read_json(body, headers, limit).await?;
            if request.messages.len() > state.max_positions {
                return Err(ApiError::bad_param("messages", format!("{} messages are more than this model's context of {} tokens can hold", request.messages.len(), state.max_positions)));
            }
            let messages = request.to_messages()?;
            let whole = transcript(&messages);
            let mut guard_texts = vec![whole.clone()];
            if messages.len() > 1 {
                guard_texts.extend(messages.iter().filter(|m| !m.content.trim().is_empty()).map(|m| m.content.clone()));
            }
            Prepared { params: request.params, guard_texts, transcript: whole, prompt: Prompt::Messages(messages) }
        }
        Endpoint::Completion => {
            let request: CompletionRequest = read_json(body, headers, limit).await?;
            let mut prompts = request.prompt.into_vec();
            if prompts.len() != 1 {
                return Err(ApiError::bad_param("prompt", "`prompt` must be one string (one prompt per request)"));
            }
            let prompt = prompts.remove(0);
            Prepared { params: request.params, guard_texts: vec![prompt.clone()], transcript: prompt.clone(), prompt: Prompt::Text(prompt) }
        }
    })
}

/// The checked sampling settings and token limit of a request.
fn settings(state: &AppState, params: &SamplingParams) -> Result<(Sampling, usize), ApiError> {
    if let Some(model) = &params.model {
        if model != &state.model_id {
            return Err(ApiError::model_not_found(model));
        }
    }
    if params.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_param("n", "Only n = 1 is supported"));
    }
    let temperature = params.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_param("temperature", format!("temperature {temperature} must be between 0 and 2")));
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param("top_p", format!("top_p {top_p} must be in (0, 1]")));
    }
    let max_tokens = params.max_completion_tokens.or(params.max_tokens).unwrap_or(state.limits.default_max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad_param("max_tokens", "max_tokens must be at least 1"));
    }
    if max_tokens > state.limits.max_tokens {
        return Err(ApiError::bad_param("max_tokens", format!("max_tokens {max_tokens} is more than this server allows ({})", state.limits.max_tokens)));
    }
    Ok((Sampling { temperature, top_k: 0, top_p }, max_tokens))
}

async fn generate(state: Shared, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    state.authorize(&headers, Role::Client)?;
    let prepared = prepare(&state, endpoint, &headers, body).await?;
    let (sampling, max_tokens) = settings(&state, &prepared.params)?;
    let id = new_id(endpoint.id_prefix());
    let created = chrono::Utc::now().timestamp();
    let stream = prepared.params.stream;
    let include_usage = prepared.params.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if state.limits.log_content {
        crate::progress::line(format!("serve-guard: request {id} prompt: {:?}", prepared.transcript));
    }
    let reply = Reply { state: state.clone(), endpoint, id: id.clone(), created, include_usage };

    // An over-long prompt is refused before any guard runs or any review row is written.
    let (_, ids) = encode_prompt(&prepared.prompt, &state.tokenizer, Some(&state.template)).map_err(|e| match e {
        crate::Error::Input(message) => ApiError::bad_param("messages", message),
        other => ApiError::internal(other.one_line()),
    })?;
    if ids.is_empty() {
        return Err(ApiError::bad_request("The prompt is empty"));
    }
    if ids.len() >= state.max_positions {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            param: Some("messages"),
            ..ApiError::bad_request(format!("This model's maximum context length is {} tokens; the prompt has {}", state.max_positions, ids.len()))
        });
    }
    let max_tokens = max_tokens.min(state.max_positions - ids.len());
    let prompt_tokens = ids.len();

    // A blocked input never reaches the model.
    let verdict = state.guard_step(Direction::Input, &state.input_guards, prepared.guard_texts.clone(), &id, &prepared.transcript).await?;
    if verdict.action == Action::Block {
        let refusal = state.policy.refusal.clone();
        return Ok(if stream { reply.refusal_stream(&refusal) } else { reply.full(&refusal, "content_filter", 0, 0) });
    }

    let deadline = Instant::now() + state.limits.request_timeout;
    let (events_tx, events) = mpsc::unbounded_channel();
    let seed = prepared.params.seed.unwrap_or_else(|| rand::rng().random::<u64>() ^ state.seed);
    let request = engine::Request {
        prompt: ids,
        max_tokens,
        sampling,
        seed,
        stop: prepared.params.stop.clone().map(api::OneOrMany::into_vec).unwrap_or_default(),
        deadline,
        events: events_tx,
    };
    state.engine.submit(request).map_err(|_| ApiError::queue_full())?;
    if stream {
        return Ok(reply.stream(events, prompt_tokens, deadline));
    }
    let collected = tokio::time::timeout_at(deadline.into(), collect(events)).await.map_err(|_| ApiError::timeout())??;
    let (mut text, mut finish_reason, completion_tokens) = collected;
    let windows = windows(&text, state.policy.stream.chunk_chars, state.policy.stream.overlap_chars);
    let verdict = state.guard_step(Direction::Output, &state.output_guards, windows, &id, &text).await?;
    if verdict.action == Action::Block {
        text = state.policy.refusal.clone();
        finish_reason = "content_filter";
    }
    if state.limits.log_content {
        crate::progress::line(format!("serve-guard: request {id} response ({finish_reason}): {text:?}"));
    }
    Ok(reply.full(&text, finish_reason, prompt_tokens, completion_tokens))
}

async fn collect(mut events: mpsc::UnboundedReceiver<Event>) -> Result<(String, &'static str, usize), ApiError> {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Delta(d) => text.push_str(&d),
            Event::Done { finish_reason, completion_tokens } => return Ok((text, finish_reason, completion_tokens)),
            Event::TimedOut => return Err(ApiError::timeout()),
            Event::Failed(e) => return Err(ApiError::internal(format!("generation failed: {e}"))),
        }
    }
    Err(ApiError::internal("the model stopped before finishing"))
}

/// Overlapping pieces of `text` for the guards: `chunk` characters each, with `overlap`
/// characters of the piece before: the pieces a stream's output is checked in.
pub(crate) fn windows(text: &str, chunk: usize, overlap: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    crate::score::overlapping_windows(chars.len(), chunk, overlap).into_iter().map(|span| chars[span].iter().collect()).collect()
}

/// How to answer one generation request.
struct Reply {
    state: Shared,
    endpoint: Endpoint,
    id: String,
    created: i64,
    include_usage: bool,
}

type SseSender = mpsc::Sender<Result<SseEvent, Infallible>>;

fn sse_response(receiver: mpsc::Receiver<Result<SseEvent, Infallible>>) -> Response {
    let stream = futures_util::stream::unfold(receiver, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Sse::new(stream).into_response()
}

impl Reply {
    fn full(&self, text: &str, finish_reason: &str, prompt_tokens: usize, completion_tokens: usize) -> Response {
        let usage = api::usage(prompt_tokens, completion_tokens);
        axum::Json(api::full_response(self.endpoint, &self.id, self.created, &self.state.model_id, text, finish_reason, usage)).into_response()
    }

    fn chunk(&self, role: bool, text: Option<&str>, finish: Option<&str>) -> SseEvent {
        SseEvent::default().data(api::chunk(self.endpoint, &self.id, self.created, &self.state.model_id, role, text, finish).to_string())
    }

    fn refusal_stream(&self, refusal: &str) -> Response {
        let (tx, rx) = mpsc::channel(8);
        let mut events = Vec::new();
        if self.endpoint == Endpoint::Chat {
            events.push(self.chunk(true, Some(""), None));
        }
        events.push(self.chunk(false, Some(refusal), None));
        events.push(self.chunk(false, None, Some("content_filter")));
        if self.include_usage {
            events.push(SseEvent::default().data(api::usage_chunk(self.endpoint, &self.id, self.created, &self.state.model_id, api::usage(0, 0)).to_string()));
        }
        events.push(SseEvent::default().data("[DONE]"));
        for event in events {
            let _ = tx.try_send(Ok(event));
        }
        sse_response(rx)
    }

    fn stream(self, events: mpsc::UnboundedReceiver<Event>, prompt_tokens: usize, deadline: Instant) -> Response {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move { self.pump(events, tx, prompt_tokens, deadline).await });
        sse_response(rx)
    }

    /// Forward the model's text as chunks. With output guards, text is held back and checked
    /// in overlapping chunks before it is released; a block ends the stream with
    /// `finish_reason: "content_filter"` and stops the model. A client that goes away stops it too.
    async fn pump(self, mut events: mpsc::UnboundedReceiver<Event>, tx: SseSender, prompt_tokens: usize, deadline: Instant) {
        let state = self.state.clone();
        let guarded = !state.output_guards.is_empty();
        let (chunk_chars, overlap) = (state.policy.stream.chunk_chars, state.policy.stream.overlap_chars);
        if self.endpoint == Endpoint::Chat && tx.send(Ok(self.chunk(true, Some(""), None))).await.is_err() {
            return;
        }
        let mut full = String::new();
        // Bytes of `full` already sent.
        let mut released = 0usize;
        let mut pending_chars = 0usize;
        let finish: Option<(&'static str, usize)>;
        loop {
            let event = tokio::select! {
                _ = tx.closed() => return, // the client left: dropping `events` stops the model
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let error = ApiError::timeout().body();
                    let _ = tx.send(Ok(SseEvent::default().data(error.to_string()))).await;
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                event = events.recv() => event,
            };
            match event {
                Some(Event::Delta(delta)) => {
                    full.push_str(&delta);
                    pending_chars += delta.chars().count();
                    if !guarded {
                        released = full.len();
                        if tx.send(Ok(self.chunk(false, Some(&delta), None))).await.is_err() {
                            return;
                        }
                    } else {
                        // Whole chunks only, so the pieces checked are those `windows` makes.
                        while pending_chars >= chunk_chars {
                            let upto = full[released..].char_indices().nth(chunk_chars).map_or(full.len(), |(i, _)| released + i);
                            if !self.release(&full, upto, &mut released, overlap, &tx).await {
                                return;
                            }
                            pending_chars -= chunk_chars;
                        }
                    }
                }
                Some(Event::Done { finish_reason, completion_tokens }) => {
                    finish = Some((finish_reason, completion_tokens));
                    break;
                }
                Some(Event::TimedOut) => {
                    let _ = tx.send(Ok(SseEvent::default().data(ApiError::timeout().body().to_string()))).await;
                    finish = None;
                    break;
                }
                Some(Event::Failed(e)) => {
                    let _ = tx.send(Ok(SseEvent::default().data(ApiError::internal(format!("generation failed: {e}")).body().to_string()))).await;
                    finish = None;
                    break;
                }
                None => {
                    finish = None;
                    break;
                }
            }
        }
        if let Some((finish_reason, completion_tokens)) = finish {
            if guarded && released < full.len() && !self.release(&full, full.len(), &mut released, overlap, &tx).await {
                return;
            }
            let _ = tx.send(Ok(self.chunk(false, None, Some(finish_reason)))).await;
            if self.include_usage {
                let usage = api::usage(prompt_tokens, completion_tokens);
                let _ = tx.send(Ok(SseEvent::default().data(api::usage_chunk(self.endpoint, &self.id, self.created, &state.model_id, usage).to_string()))).await;
            }
            if state.limits.log_content {
                crate::progress::line(format!("serve-guard: request {} response ({finish_reason}): {full:?}", self.id));
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    }

    /// Check the text from `released` to `upto` (with `overlap` characters before it) and send
    /// it, or end the stream when the output guards block it. Returns whether the stream goes on.
    async fn release(&self, full: &str, upto: usize, released: &mut usize, overlap: usize, tx: &SseSender) -> bool {
        let state = &self.state;
        let mut start = *released;
        for _ in 0..overlap {
            match full[..start].char_indices().next_back() {
                Some((i, _)) => start = i,
                None => break,
            }
        }
        let window = full[start..upto].to_string();
        let verdict = match state.guard_step(Direction::Output, &state.output_guards, vec![window], &self.id, &full[..upto]).await {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(Ok(SseEvent::default().data(e.body().to_string()))).await;
                let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                return false;
            }
        };
        if verdict.action == Action::Block {
            let _ = tx.send(Ok(self.chunk(false, None, Some("content_filter")))).await;
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
            return false;
        }
        let piece = &full[*released..upto];
        *released = upto;
        piece.is_empty() || tx.send(Ok(self.chunk(false, Some(piece), None))).await.is_ok()
    }
}

// ---- models, moderations, health, metrics ----

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, Role::Client)?;
    Ok(axum::Json(json!({"object": "list", "data": [model_card(&state)]})).into_response())
}

async fn model(State(state): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    state.authorize(&headers, Role::Client)?;
    if id != state.model_id {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(axum::Json(model_card(&state)).into_response())
}

fn model_card(state: &AppState) -> Value {
    json!({"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lathe"})
}

/// Texts one moderation request may ask about (each is a guard pass).
const MOST_MODERATION_INPUTS: usize = 256;

/// OpenAI's moderation shape from the guards (the input guards, else every guard): per
/// category the highest score any guard gives and whether its rule flags or blocks it.
async fn moderations(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    state.authorize(&headers, Role::Client)?;
    let request: ModerationRequest = read_json(body, &headers, state.limits.max_body_bytes).await?;
    let inputs = request.input.into_vec();
    if inputs.is_empty() {
        return Err(ApiError::bad_param("input", "`input` must hold at least one string"));
    }
    if inputs.len() > MOST_MODERATION_INPUTS {
        return Err(ApiError::bad_param("input", format!("`input` holds {} strings; at most {MOST_MODERATION_INPUTS} per request", inputs.len())));
    }
    let guards = if state.input_guards.is_empty() { &state.all_guards } else { &state.input_guards };
    if guards.is_empty() {
        return Err(ApiError::bad_request("This server has no guards to moderate with"));
    }
    let mut results = Vec::new();
    for text in &inputs {
        let started = Instant::now();
        let scores = guard::check(guards, std::slice::from_ref(text)).await.map_err(|e| ApiError::internal(format!("guard failed: {e}")))?;
        for s in &scores {
            state.metrics.guard(&s.guard, "moderation", s.seconds);
        }
        state.metrics.guard_step("moderation", started.elapsed().as_secs_f64());
        let verdict = state.policy.decide(&scores);
        let mut categories = serde_json::Map::new();
        let mut category_scores = serde_json::Map::new();
        for j in &verdict.judged {
            let score = category_scores.get(&j.category).and_then(Value::as_f64).unwrap_or(0.0).max(j.score);
            category_scores.insert(j.category.clone(), json!(score));
            let flagged = categories.get(&j.category).and_then(Value::as_bool).unwrap_or(false) || (j.hit && j.action != Action::Allow);
            categories.insert(j.category.clone(), json!(flagged));
        }
        let hits: Vec<(String, String, String)> =
            verdict.judged.iter().filter(|j| j.hit).map(|j| (j.guard.clone(), j.category.clone(), j.action.name().to_string())).collect();
        state.metrics.decision("moderation", verdict.action.name(), &hits);
        results.push(json!({"flagged": verdict.action != Action::Allow, "categories": categories, "category_scores": category_scores}));
    }
    let model = request.model.unwrap_or_else(|| guards.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join("+"));
    Ok(axum::Json(json!({"id": new_id("modr"), "model": model, "results": results})).into_response())
}

async fn health(State(state): State<Shared>) -> Response {
    let depth = state.engine.stats.queue_depth.load(std::sync::atomic::Ordering::SeqCst);
    axum::Json(json!({"status": "ok", "model": state.model_id, "queue_depth": depth})).into_response()
}

/// Prometheus' page: any key may read it (no rate limit spent), everyone with --public-metrics.
async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !state.limits.public_metrics {
        if let Err(refusal) = state.gate.identify(&headers) {
            return ApiError::from(refusal).into_response();
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&state.engine.stats)).into_response()
}

// ---- the review API (reviewer keys) ----

#[derive(serde::Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn review_items(State(state): State<Shared>, headers: HeaderMap, Query(query): Query<ListQuery>) -> Result<Response, ApiError> {
    state.authorize(&headers, Role::Reviewer)?;
    let which = match query.status.as_deref().unwrap_or("pending") {
        "pending" => Which::Pending,
        "reviewed" => Which::Reviewed,
        "all" => Which::All,
        other => return Err(ApiError::bad_param("status", format!("status `{other}`: expected pending, reviewed or all"))),
    };
    let limit = query.limit.unwrap_or(100).min(10_000);
    let db = state.review.clone();
    let items = tokio::task::spawn_blocking(move || db.lock().unwrap_or_else(|p| p.into_inner()).list(which, limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.one_line()))?;
    Ok(axum::Json(json!({"object": "list", "data": items})).into_response())
}

#[derive(serde::Deserialize)]
struct ReviewBody {
    verdict: String,
    #[serde(default)]
    labels: Vec<String>,
}

async fn review_item(State(state): State<Shared>, headers: HeaderMap, Path(id): Path<i64>, body: Body) -> Result<Response, ApiError> {
    let principal = state.authorize(&headers, Role::Reviewer)?;
    state.gate.check_json(&principal, &headers)?;
    let body: ReviewBody = read_json(body, &headers, state.limits.max_body_bytes).await?;
    let verdict = match body.verdict.as_str() {
        "confirm" => ReviewVerdict::Confirm,
        "overturn" => ReviewVerdict::Overturn(body.labels),
        other => return Err(ApiError::bad_param("verdict", format!("verdict `{other}`: expected confirm or overturn"))),
    };
    let item = record_review(&state, id, verdict, principal.name()).await?;
    Ok(axum::Json(item).into_response())
}

/// Commit a verdict (synced before this returns, so an acknowledged review is never lost).
pub(crate) async fn record_review(state: &AppState, id: i64, verdict: ReviewVerdict, reviewer: String) -> Result<super::review::Item, ApiError> {
    let db = state.review.clone();
    tokio::task::spawn_blocking(move || db.lock().unwrap_or_else(|p| p.into_inner()).review(id, &verdict, &reviewer))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e {
            crate::Error::Input(message) if message.starts_with("no decision") => ApiError::not_found(message),
            crate::Error::Input(message) => ApiError::bad_param("labels", message),
            other => ApiError::internal(other.one_line()),
        })
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_overlap_and_cover_the_text() {
        assert_eq!(windows("abc", 4, 2), vec!["abc"]);
        let w = windows("abcdefghij", 4, 2);
        assert_eq!(w, vec!["abcd", "cdefgh", "ghij"]);
        assert!(windows("", 4, 2).is_empty());
    }
}
