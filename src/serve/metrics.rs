//! The `/metrics` page in Prometheus' text format: requests by status, latency histograms,
//! generated tokens, guard decisions by guard and category, guard latency, queue depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use crate::serve::engine::EngineStats;

const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, &bound) in BUCKETS.iter().enumerate() {
            if seconds <= bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (path, status) → requests.
    requests: BTreeMap<(String, u16), u64>,
    /// path → seconds.
    latency: BTreeMap<String, Histogram>,
    /// (guard, direction) → seconds per check.
    guard_latency: BTreeMap<(String, String), Histogram>,
    /// direction → wall seconds of the whole guard step of a request (guards run together).
    guard_step: BTreeMap<String, Histogram>,
    /// (guard, category, direction, action) → decisions.
    decisions: BTreeMap<(String, String, String, String), u64>,
    /// direction, action → requests decided.
    verdicts: BTreeMap<(String, String), u64>,
    review_queued: u64,
    review_errors: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Known paths keep their own series; anything else is counted as `other`.
fn path_label(path: &str) -> String {
    const KNOWN: [&str; 8] = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/moderations", "/health", "/metrics", "/review", "/v1/review/items"];
    KNOWN.iter().find(|k| path == **k || path.starts_with(&format!("{k}/"))).map_or("other", |k| k).to_string()
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn request(&self, path: &str, status: u16, seconds: f64) {
        let path = path_label(path);
        self.with(|m| {
            *m.requests.entry((path.clone(), status)).or_default() += 1;
            m.latency.entry(path).or_default().observe(seconds);
        });
    }

    pub fn guard(&self, guard: &str, direction: &str, seconds: f64) {
        self.with(|m| m.guard_latency.entry((guard.to_string(), direction.to_string())).or_default().observe(seconds));
    }

    pub fn guard_step(&self, direction: &str, seconds: f64) {
        self.with(|m| m.guard_step.entry(direction.to_string()).or_default().observe(seconds));
    }

    /// One decision: the action of every category hit (or `allow`/`none` when nothing was).
    pub fn decision(&self, direction: &str, action: &str, hits: &[(String, String, String)]) {
        self.with(|m| {
            *m.verdicts.entry((direction.to_string(), action.to_string())).or_default() += 1;
            for (guard, category, action) in hits {
                *m.decisions.entry((guard.clone(), category.clone(), direction.to_string(), action.clone())).or_default() += 1;
            }
        });
    }

    pub fn review_queued(&self, ok: bool) {
        self.with(|m| if ok { m.review_queued += 1 } else { m.review_errors += 1 });
    }

    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::new();
        self.with(|m| {
            out.push_str("# HELP lathe_requests_total HTTP requests by path and status.\n# TYPE lathe_requests_total counter\n");
            for ((path, status), n) in &m.requests {
                let _ = writeln!(out, "lathe_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}");
            }
            out.push_str("# HELP lathe_request_duration_seconds Request latency by path.\n# TYPE lathe_request_duration_seconds histogram\n");
            for (path, h) in &m.latency {
                h.write(&mut out, "lathe_request_duration_seconds", &format!("path=\"{path}\""));
            }
            out.push_str("# HELP lathe_guard_duration_seconds Latency of one guard's check.\n# TYPE lathe_guard_duration_seconds histogram\n");
            for ((guard, direction), h) in &m.guard_latency {
                h.write(&mut out, "lathe_guard_duration_seconds", &format!("guard=\"{}\",direction=\"{direction}\"", escape(guard)));
            }
            out.push_str("# HELP lathe_guard_step_seconds Wall time of a request's guard step (all guards, run together).\n# TYPE lathe_guard_step_seconds histogram\n");
            for (direction, h) in &m.guard_step {
                h.write(&mut out, "lathe_guard_step_seconds", &format!("direction=\"{direction}\""));
            }
            out.push_str("# HELP lathe_guard_decisions_total Categories hit, by guard, category, direction and the action of their rule.\n# TYPE lathe_guard_decisions_total counter\n");
            for ((guard, category, direction, action), n) in &m.decisions {
                let _ = writeln!(out, "lathe_guard_decisions_total{{guard=\"{}\",category=\"{}\",direction=\"{direction}\",action=\"{action}\"}} {n}", escape(guard), escape(category));
            }
            out.push_str("# HELP lathe_guard_verdicts_total Requests' guard outcomes by direction and action.\n# TYPE lathe_guard_verdicts_total counter\n");
            for ((direction, action), n) in &m.verdicts {
                let _ = writeln!(out, "lathe_guard_verdicts_total{{direction=\"{direction}\",action=\"{action}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP lathe_review_queued_total Decisions written to the review queue.\n# TYPE lathe_review_queued_total counter\nlathe_review_queued_total {}", m.review_queued);
            let _ = writeln!(out, "# HELP lathe_review_errors_total Decisions the review queue failed to store.\n# TYPE lathe_review_errors_total counter\nlathe_review_errors_total {}", m.review_errors);
        });
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        gauge(&mut out, "lathe_queue_depth", "gauge", "Requests waiting for the model.", engine.queue_depth.load(Ordering::SeqCst) as u64);
        gauge(&mut out, "lathe_engine_prompts_total", "counter", "Prompts the model was given (blocked inputs never are).", engine.prompts.load(Ordering::SeqCst));
        gauge(&mut out, "lathe_generated_tokens_total", "counter", "Tokens generated.", engine.generated_tokens.load(Ordering::Relaxed));
        gauge(&mut out, "lathe_engine_batches_total", "counter", "Batches decoded.", engine.batches.load(Ordering::Relaxed));
        gauge(&mut out, "lathe_engine_cancelled_total", "counter", "Generations stopped early (client gone, blocked, timed out).", engine.cancelled.load(Ordering::Relaxed));
        out
    }
}
