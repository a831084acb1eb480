//! What is attacked: a local model folder (batched KV-cache generation) or any
//! OpenAI-compatible `/v1/chat/completions` endpoint (concurrent requests with timeouts and
//! retries; a failed attempt is recorded, never fatal).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::suite::Attempt;
use crate::cli;
use crate::data::Message;
use crate::data::records::Prompt;
use crate::error::{Result, usage};
use crate::generate::{Generator, Sampling, chat_template, encode_prompt, sample_rng};
use crate::model::{ChatTemplate, Decoder, ModelFolder};
use crate::tokenizer::LoadedTokenizer;

/// How responses are generated, whatever the target.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
}

/// What came back for one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub response: String,
    /// Set when the attempt failed (after retries); the response is then empty.
    pub error: Option<String>,
    /// `stop`, `length`, `content_filter`…; empty on error.
    pub finish_reason: String,
    /// The prompt as the target read it (rendered chat for a local model).
    pub scored_prompt: String,
    /// The prompt was cut at the left to fit the model's context.
    pub truncated: bool,
}

impl Outcome {
    fn failed(error: String, scored_prompt: String) -> Self {
        Outcome { response: String::new(), error: Some(error), finish_reason: String::new(), scored_prompt, truncated: false }
    }
}

pub enum Target {
    Local(Box<LocalTarget>),
    Endpoint(EndpointTarget),
}

impl Target {
    pub fn name(&self) -> String {
        match self {
            Target::Local(local) => local.folder.dir.display().to_string(),
            Target::Endpoint(endpoint) => endpoint.url.clone(),
        }
    }

    /// Answer `attempts`; `done` hears of each finished (index into `attempts`, outcome) as
    /// soon as it is known, in batches, so it can be journaled.
    pub fn complete(
        &self,
        attempts: &[&Attempt],
        settings: &GenerationSettings,
        done: &mut dyn FnMut(Vec<(usize, Outcome)>) -> Result<()>,
    ) -> Result<()> {
        match self {
            Target::Local(local) => local.complete(attempts, settings, done),
            Target::Endpoint(endpoint) => endpoint.complete(attempts, settings, done),
        }
    }
}

pub struct LocalTarget {
    folder: ModelFolder,
    model: Decoder,
    tokenizer: LoadedTokenizer,
    template: Option<ChatTemplate>,
    eos: Vec<u32>,
    pad: u32,
    batch_size: usize,
}

impl LocalTarget {
    pub fn load(model: &str, batch_size: usize, device: &Device) -> Result<Self> {
        let folder = ModelFolder::open(model)?;
        if folder.config.head != crate::model::Head::CausalLm {
            return Err(crate::error::bad_input(&folder.dir, "is a classifier, not a causal language model to red-team"));
        }
        let tokenizer = folder.load_tokenizer()?;
        let template = chat_template(&folder, None)?;
        let params = folder.load_params(device)?;
        let model = Decoder::new_inference(&folder.config, &params)?;
        let mut eos = folder.eos_token_ids();
        if eos.is_empty() {
            eos.extend(tokenizer.eos_id());
        }
        let pad = folder.config.pad_token_id.or(tokenizer.eos_id()).unwrap_or(0);
        Ok(LocalTarget { folder, model, tokenizer, template, eos, pad, batch_size: batch_size.max(1) })
    }

    /// The chat rendered with the model's template; models without one read plain text.
    fn encode(&self, attempt: &Attempt, room: usize) -> Result<(String, Vec<u32>, bool)> {
        let prompt = match &self.template {
            Some(_) => {
                let mut messages = Vec::new();
                if let Some(system) = &attempt.system {
                    messages.push(Message::new("system", system));
                }
                messages.push(Message::new("user", &attempt.user));
                Prompt::Messages(messages)
            }
            None => Prompt::Text(match &attempt.system {
                Some(system) => format!("{system}\n\n{}\n", attempt.user),
                None => format!("{}\n", attempt.user),
            }),
        };
        let (text, mut ids) = encode_prompt(&prompt, &self.tokenizer, self.template.as_ref())?;
        let truncated = ids.len() > room;
        if truncated {
            // Keep the end: templates put the request (and the generation prompt) last.
            ids.drain(..ids.len() - room);
        }
        Ok((text, ids, truncated))
    }

    fn complete(
        &self,
        attempts: &[&Attempt],
        settings: &GenerationSettings,
        done: &mut dyn FnMut(Vec<(usize, Outcome)>) -> Result<()>,
    ) -> Result<()> {
        let context = self.folder.config.max_position_embeddings;
        let room = context.checked_sub(settings.max_new_tokens).filter(|&r| r > 0).ok_or_else(|| {
            usage(format!("--max-new-tokens {} leaves no room for a prompt in the model's context of {context}", settings.max_new_tokens))
        })?;
        let mut encoded = Vec::with_capacity(attempts.len());
        for attempt in attempts {
            encoded.push(self.encode(attempt, room)?);
        }
        let generator = Generator {
            model: &self.model,
            eos: self.eos.clone(),
            pad: self.pad,
            max_new_tokens: settings.max_new_tokens,
            sampling: settings.sampling,
            ignore_eos: false,
        };
        let mut order: Vec<usize> = (0..attempts.len()).collect();
        order.sort_by_key(|&i| encoded[i].1.len());
        for chunk in order.chunks(self.batch_size) {
            cli::check_interrupt()?;
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].1.clone()).collect();
            let mut rngs: Vec<_> = chunk.iter().map(|&i| sample_rng(settings.seed, attempt_key(attempts[i]), 0)).collect();
            let completions = generator.run(&prompts, &mut rngs, |_| {})?;
            let mut outcomes = Vec::with_capacity(chunk.len());
            for (&i, completion) in chunk.iter().zip(completions) {
                outcomes.push((
                    i,
                    Outcome {
                        response: self.tokenizer.decode(&completion.tokens)?,
                        error: None,
                        finish_reason: if completion.stopped { "stop" } else { "length" }.into(),
                        scored_prompt: encoded[i].0.clone(),
                        truncated: encoded[i].2,
                    },
                ));
            }
            done(outcomes)?;
        }
        Ok(())
    }
}

/// A number from the attempt id, so sampling does not depend on batching or resumption.
fn attempt_key(attempt: &Attempt) -> u64 {
    attempt.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// An OpenAI-compatible chat endpoint.
pub struct EndpointTarget {
    pub url: String,
    /// The `model` field of requests; empty: the first model the endpoint lists.
    pub model: String,
    pub api_key: Option<String>,
    pub concurrency: usize,
    pub timeout: Duration,
    pub retries: u32,
    /// First back-off; doubled after each failed try.
    pub backoff: Duration,
}

impl EndpointTarget {
    /// `URL` may be a base (`http://host:8000` or `…/v1`) or the full chat-completions address.
    pub fn new(url: &str, model: String, api_key: Option<String>, concurrency: usize, timeout: Duration, retries: u32) -> Self {
        let url = url.trim_end_matches('/');
        let url = if url.ends_with("/chat/completions") {
            url.to_string()
        } else if url.ends_with("/v1") {
            format!("{url}/chat/completions")
        } else {
            format!("{url}/v1/chat/completions")
        };
        EndpointTarget { url, model, api_key, concurrency: concurrency.max(1), timeout, retries, backoff: Duration::from_millis(500) }
    }

    /// The request with the API key, when there is one.
    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.api_key {
            Some(key) => request.header("Authorization", &format!("Bearer {key}")),
            None => request,
        }
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// Refuse an endpoint that cannot be reached at all before any work (exit 2); one that
    /// fails later is recorded per attempt. Without a model name, ask for the first one the
    /// endpoint lists (`GET /v1/models`), else send `default`.
    pub fn preflight(&mut self) -> Result<()> {
        let models = self.url.replace("/chat/completions", "/models");
        match self.authorized(self.agent().get(&models)).call() {
            Ok(response) if response.status().as_u16() == 401 => {
                Err(usage(format!("--endpoint {}: 401 unauthorized (pass the key's variable with --api-key-env)", self.url)))
            }
            Ok(mut response) => {
                if self.model.is_empty() {
                    let listed: Option<Value> = response.body_mut().read_json().ok();
                    let first = listed.as_ref().and_then(|v| v["data"][0]["id"].as_str()).unwrap_or("default");
                    self.model = first.to_string();
                }
                Ok(())
            }
            Err(e) => Err(usage(format!("--endpoint {}: unreachable ({e})", self.url))),
        }
    }

    fn complete(
        &self,
        attempts: &[&Attempt],
        settings: &GenerationSettings,
        done: &mut dyn FnMut(Vec<(usize, Outcome)>) -> Result<()>,
    ) -> Result<()> {
        let agent = self.agent();
        let next = AtomicUsize::new(0);
        let (sender, receiver) = mpsc::channel::<(usize, Outcome)>();
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..self.concurrency.min(attempts.len()) {
                let (sender, agent, next) = (sender.clone(), agent.clone(), &next);
                scope.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= attempts.len() || cli::interrupted() {
                            break;
                        }
                        let outcome = self.ask(&agent, attempts[i], settings);
                        if sender.send((i, outcome)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(sender);
            let mut result = Ok(());
            for finished in receiver {
                // Keep draining after an error so the workers end; report the first.
                if result.is_ok() {
                    result = done(vec![finished]);
                    if result.is_err() {
                        next.store(attempts.len(), Ordering::SeqCst);
                    }
                }
            }
            result
        })?;
        cli::check_interrupt()
    }

    fn body(&self, attempt: &Attempt, settings: &GenerationSettings) -> Value {
        let mut messages = Vec::new();
        if let Some(system) = &attempt.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": attempt.user}));
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.sampling.temperature,
            "seed": settings.seed,
        });
        if settings.sampling.top_p < 1.0 {
            body["top_p"] = json!(settings.sampling.top_p);
        }
        body
    }

    /// One attempt with retries on transport errors, 429 and 5xx (honouring Retry-After up to
    /// 30 s); other statuses fail at once.
    fn ask(&self, agent: &ureq::Agent, attempt: &Attempt, settings: &GenerationSettings) -> Outcome {
        let body = self.body(attempt, settings);
        let shown = attempt.user.clone();
        let mut last_error = String::new();
        for try_number in 0..=self.retries {
            if try_number > 0 {
                std::thread::sleep(self.backoff * 2u32.saturating_pow(try_number - 1));
            }
            match self.authorized(agent.post(&self.url)).send_json(&body) {
                Err(e) => last_error = e.to_string(),
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let text = response.body_mut().read_to_string();
                    if status == 200 {
                        let text = match text {
                            Ok(text) => text,
                            // A body that stalls or never ends is the connection's fault: retried.
                            Err(e @ (ureq::Error::Timeout(_) | ureq::Error::Io(_))) => {
                                last_error = format!("HTTP 200, but reading the body failed: {e}");
                                continue;
                            }
                            Err(e) => return Outcome::failed(format!("HTTP 200, but the body could not be read: {e}"), shown),
                        };
                        return match parse_choice(&text) {
                            Ok((response, finish_reason)) => Outcome { response, error: None, finish_reason, scored_prompt: shown, truncated: false },
                            Err(why) => Outcome::failed(format!("HTTP 200, but {why}"), shown),
                        };
                    }
                    let value: Option<Value> = text.ok().and_then(|t| serde_json::from_str(&t).ok());
                    let message = value
                        .as_ref()
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "no error message".into());
                    last_error = format!("HTTP {status}: {message}");
                    if status != 429 && status < 500 {
                        return Outcome::failed(last_error, shown);
                    }
                    if let Some(seconds) = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
                        std::thread::sleep(Duration::from_secs(seconds.min(30)));
                    }
                }
            }
        }
        Outcome::failed(format!("after {} tries: {last_error}", self.retries + 1), shown)
    }
}

/// The answer and finish reason of a chat completion body, or why there is none: an answer
/// that is not a string (null, a number) is an error, never an empty answer.
fn parse_choice(body: &str) -> std::result::Result<(String, String), String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    let choice = value.get("choices").and_then(|c| c.get(0)).ok_or("the body has no choices[0]")?;
    let content = match choice.get("message").and_then(|m| m.get("content")) {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) => return Err("choices[0].message.content is null, expected the answer text".into()),
        Some(other) => return Err(format!("choices[0].message.content is {other}, expected the answer text")),
        None => return Err("the body has no choices[0].message.content".into()),
    };
    let finish_reason = choice.get("finish_reason").and_then(Value::as_str).unwrap_or("stop").to_string();
    Ok((content, finish_reason))
}
