//! The model behind the API: worker threads fed by a bounded queue. A worker takes every
//! request waiting (up to the batch size) and decodes those with the same sampling settings
//! together through the KV cache, streaming each sequence's text back as it grows. A sequence
//! stops at EOS, its own token limit, a stop string, its deadline, or when its listener is gone
//! (the client disconnected, or a guard blocked the rest).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::{Result, failed};
use crate::generate::{Generator, Sampling};
use crate::model::Decoder;
use crate::tokenizer::LoadedTokenizer;

/// What a generation reports, in order: text as it grows, then one `Done` (or `Failed`).
#[derive(Debug)]
pub enum Event {
    Delta(String),
    Done { finish_reason: &'static str, completion_tokens: usize },
    /// The request's deadline passed; decoding stopped.
    TimedOut,
    Failed(String),
}

pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop: Vec<String>,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

/// Counters the metrics page reads.
#[derive(Default)]
pub struct EngineStats {
    /// Requests waiting in the queue.
    pub queue_depth: AtomicUsize,
    /// Prompts the model has been given (a blocked input never counts here).
    pub prompts: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub batches: AtomicU64,
    pub cancelled: AtomicU64,
}

pub struct Engine {
    queue: mpsc::SyncSender<Request>,
    pub stats: Arc<EngineStats>,
}

pub struct EngineOptions {
    pub workers: usize,
    pub threads: usize,
    pub queue_len: usize,
    pub max_batch: usize,
    pub eos: Vec<u32>,
    pub pad: u32,
}

/// The queue is full.
pub struct Busy;

impl Engine {
    pub fn start(model: Arc<Decoder>, tokenizer: Arc<LoadedTokenizer>, options: EngineOptions) -> Result<Self> {
        let (queue, receiver) = mpsc::sync_channel::<Request>(options.queue_len.max(1));
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        let stats = Arc::new(EngineStats::default());
        for w in 0..options.workers.max(1) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(options.threads.max(1))
                .stack_size(64 << 20)
                .thread_name(move |i| format!("engine-{w}-{i}"))
                .build()
                .map_err(|e| failed(format!("cannot start the engine's threads: {e}")))?;
            let worker = Worker {
                model: model.clone(),
                tokenizer: tokenizer.clone(),
                receiver: receiver.clone(),
                stats: stats.clone(),
                max_batch: options.max_batch.max(1),
                eos: options.eos.clone(),
                pad: options.pad,
            };
            std::thread::Builder::new()
                .name(format!("engine-{w}"))
                .spawn(move || pool.install(|| worker.run()))
                .map_err(|e| failed(format!("cannot start the engine thread: {e}")))?;
        }
        Ok(Engine { queue, stats })
    }

    /// Queue a request; `Err(Busy)` when the queue is full.
    pub fn submit(&self, request: Request) -> std::result::Result<(), Busy> {
        self.stats.queue_depth.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(request) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(Busy)
            }
        }
    }
}

struct Worker {
    model: Arc<Decoder>,
    tokenizer: Arc<LoadedTokenizer>,
    receiver: Arc<std::sync::Mutex<mpsc::Receiver<Request>>>,
    stats: Arc<EngineStats>,
    max_batch: usize,
    eos: Vec<u32>,
    pad: u32,
}

/// One sequence being decoded.
struct Live {
    request: Request,
    tokens: Vec<u32>,
    /// Characters of decoded text already sent.
    sent: String,
    finish: Option<&'static str>,
}

impl Worker {
    fn run(self) {
        loop {
            let batch = {
                let Ok(receiver) = self.receiver.lock() else { return };
                let Ok(first) = receiver.recv() else { return };
                let mut batch = vec![first];
                while batch.len() < self.max_batch {
                    match receiver.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                batch
            };
            self.stats.queue_depth.fetch_sub(batch.len(), Ordering::SeqCst);
            // Requests whose client left while queued are dropped unseen.
            let mut batch: Vec<Request> = batch.into_iter().filter(|r| !r.events.is_closed()).collect();
            // Sequences decoded together share one sampling setting.
            while !batch.is_empty() {
                let key = sampling_key(&batch[0].sampling);
                let (group, rest): (Vec<Request>, Vec<Request>) = batch.into_iter().partition(|r| sampling_key(&r.sampling) == key);
                batch = rest;
                self.decode(group);
            }
        }
    }

    fn decode(&self, group: Vec<Request>) {
        self.stats.prompts.fetch_add(group.len() as u64, Ordering::SeqCst);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let sampling = group[0].sampling;
        let max_new_tokens = group.iter().map(|r| r.max_tokens).max().unwrap_or(1).max(1);
        let prompts: Vec<Vec<u32>> = group.iter().map(|r| r.prompt.clone()).collect();
        let mut rngs: Vec<StdRng> = group.iter().map(|r| StdRng::seed_from_u64(r.seed)).collect();
        let mut live: Vec<Live> = group.into_iter().map(|request| Live { request, tokens: Vec::new(), sent: String::new(), finish: None }).collect();
        let generator = Generator { model: &self.model, eos: self.eos.clone(), pad: self.pad, max_new_tokens, sampling, ignore_eos: false };
        let result = generator.run_observed(&prompts, &mut rngs, |chosen, done| {
            for (i, token) in chosen.iter().enumerate() {
                let Some(token) = *token else { continue };
                let seq = &mut live[i];
                if seq.finish.is_some() {
                    done[i] = true;
                    continue;
                }
                if done[i] {
                    seq.finish = Some("stop"); // EOS
                    continue;
                }
                seq.tokens.push(token);
                self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                if let Err(finish) = self.advance(seq) {
                    seq.finish = Some(finish);
                } else if seq.tokens.len() >= seq.request.max_tokens {
                    seq.finish = Some("length");
                }
                if seq.finish.is_some() {
                    done[i] = true;
                }
            }
        });
        match result {
            Ok(_) => {
                for seq in live {
                    if matches!(seq.finish, Some("cancelled" | "timeout")) {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        if seq.finish == Some("timeout") {
                            let _ = seq.request.events.send(Event::TimedOut);
                        }
                        continue;
                    }
                    let finish_reason = seq.finish.unwrap_or("length");
                    self.flush(&seq);
                    let _ = seq.request.events.send(Event::Done { finish_reason, completion_tokens: seq.tokens.len() });
                }
            }
            Err(e) => {
                for seq in live {
                    let _ = seq.request.events.send(Event::Failed(e.one_line()));
                }
            }
        }
    }

    /// Send whatever text was held back (a possible stop-string start, a partial character).
    fn flush(&self, seq: &Live) {
        let Ok(text) = self.tokenizer.decode(&seq.tokens) else { return };
        let end = seq.request.stop.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
        let text = &text[..end];
        if text.len() > seq.sent.len() && text.starts_with(seq.sent.as_str()) {
            let _ = seq.request.events.send(Event::Delta(text[seq.sent.len()..].to_string()));
        }
    }

    /// Send the text the new token completes. `Err(reason)` ends the sequence.
    fn advance(&self, seq: &mut Live) -> std::result::Result<(), &'static str> {
        if seq.request.events.is_closed() {
            return Err("cancelled");
        }
        if Instant::now() >= seq.request.deadline {
            return Err("timeout");
        }
        let text = self.tokenizer.decode(&seq.tokens).map_err(|_| "stop")?;
        // A token ending inside a UTF-8 character decodes to U+FFFD; wait for the rest.
        if text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        let (text, stopped) = match seq.request.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text, false),
        };
        // Hold back a tail that may be the start of a stop string.
        let hold = if stopped {
            0
        } else {
            seq.request
                .stop
                .iter()
                .map(|s| (1..s.len()).rev().find(|&k| text.ends_with(&s[..k]) && s.is_char_boundary(k)).unwrap_or(0))
                .max()
                .unwrap_or(0)
        };
        let ready = &text[..text.len() - hold];
        if ready.len() > seq.sent.len() && ready.starts_with(seq.sent.as_str()) {
            let delta = ready[seq.sent.len()..].to_string();
            seq.sent = ready.to_string();
            if seq.request.events.send(Event::Delta(delta)).is_err() {
                return Err("cancelled");
            }
        }
        if stopped { Err("stop") } else { Ok(()) }
    }
}

fn sampling_key(s: &Sampling) -> (u64, usize, u64) {
    (s.temperature.to_bits(), s.top_k, s.top_p.to_bits())
}
