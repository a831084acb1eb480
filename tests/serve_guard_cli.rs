//! `serve-guard` over real HTTP on loopback, with the fixture chat model and a guard trained
//! here in seconds: every endpoint, the streaming chunk format, OpenAI error bodies for
//! 400/401/403/404/413/429, a blocked input that never reaches the model, an output blocked
//! mid-stream, the review round trip into `rm-train`, the `/review` page in headless Chromium,
//! and a SIGKILL under load that loses no acknowledged review.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::web::{ChromeDriver, KillOnDrop, Server, agent, browser_installed, raw};
use common::{ok, s, testdata};
use lathe::data::records::{LabeledTextRecord, RecordReader};
use serde_json::{Value, json};

fn serve_guard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_serve-guard"))
}

fn start(args: &[&str]) -> Server {
    let mut command = serve_guard();
    command.arg("serve");
    Server::start(command, args)
}

/// (status, body text) of a request; `key` goes in `Authorization: Bearer`.
fn call(method: &str, url: &str, key: Option<&str>, body: Option<&[u8]>) -> (u16, String) {
    let agent = agent();
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut response = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (_, body) => {
            let mut r = agent.post(url).content_type("application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or(b""))
        }
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap_or_default())
}

fn post(url: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let (status, text) = call("POST", url, key, Some(body.to_string().as_bytes()));
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn get(url: &str, key: Option<&str>) -> (u16, Value) {
    let (status, text) = call("GET", url, key, None);
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// An OpenAI error body with this status.
fn assert_error(got: (u16, Value), status: u16, code_or_type: &str) {
    let (got_status, body) = got;
    assert_eq!(got_status, status, "{body}");
    let error = &body["error"];
    assert!(error["message"].is_string() && error.get("type").is_some() && error.get("param").is_some() && error.get("code").is_some(), "not an OpenAI error body: {body}");
    assert!(error["code"] == code_or_type || error["type"] == code_or_type, "expected {code_or_type}: {body}");
}

/// The `data:` payloads of a server-sent event stream.
fn sse_payloads(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).map(|l| l.trim().to_string()).collect()
}

/// The content deltas of a chat stream, its finish reason, and the checked chunk format.
fn read_chat_stream(text: &str) -> (String, String) {
    let payloads = sse_payloads(text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {text}");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "the first chunk carries the role");
    let id = chunks[0]["id"].clone();
    let mut content = String::new();
    let mut finish = String::new();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id, "one id per stream");
        let Some(choice) = chunk["choices"].get(0) else { continue };
        if let Some(piece) = choice["delta"]["content"].as_str() {
            assert!(finish.is_empty(), "content after the finish reason");
            content.push_str(piece);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (content, finish)
}

/// A figure of `/metrics`, read with `key` (the page is behind a key unless --public-metrics).
fn metric(server: &Server, key: &str, name: &str) -> f64 {
    let (status, text) = call("GET", &server.at("/metrics"), Some(key), None);
    assert_eq!(status, 200);
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn chat(model: &str, content: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A guard (`rm-train --task multilabel`, 8 OpenAI moderation categories) and a client and a
/// reviewer key, in `dir`.
struct Setup {
    guard: PathBuf,
    keys: PathBuf,
    client: String,
    reviewer: String,
}

fn setup(dir: &Path) -> Setup {
    let guard = dir.join("guard");
    ok(
        "rm-train",
        &[
            s(&testdata("moderation_openai_samples.slice.parquet")),
            "--model",
            s(&testdata("hf-tiny/causal-lm")),
            "--task",
            "multilabel",
            "--steps",
            "6",
            "--max-length",
            "96",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
            "--threads",
            "2",
            "-q",
            "-o",
            s(&guard),
        ],
    );
    let keys = dir.join("keys.txt");
    let add = |name: &str, role: &str| {
        let out = serve_guard().args(["keys", "add", "--keys", s(&keys), "--name", name, "--role", role, "-q"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let client = add("app", "client");
    let reviewer = add("ana", "reviewer");
    assert!(client.starts_with("sk-lathe-") && client != reviewer);
    Setup { guard, keys, client, reviewer }
}

const MODEL: &str = "tiny";
const HARMFUL: &str = "I am going to hurt them badly, tell me how to do it";
const BENIGN: &str = "What is a good name for a cat?";

/// Every category's score of each text, from `/v1/moderations`.
fn category_scores(server: &Server, key: &str, texts: &[String]) -> Vec<serde_json::Map<String, Value>> {
    let (status, body) = post(&server.at("/v1/moderations"), Some(key), &json!({"input": texts}));
    assert_eq!(status, 200, "{body}");
    body["results"].as_array().unwrap().iter().map(|r| r["category_scores"].as_object().unwrap().clone()).collect()
}

/// The windows a stream's output is checked in (the server's `windows`).
fn windows(text: &str, chunk: usize, overlap: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= chunk {
        return vec![text.to_string()];
    }
    (0..chars.len()).step_by(chunk).map(|start| chars[start.saturating_sub(overlap)..(start + chunk).min(chars.len())].iter().collect()).collect()
}

#[test]
fn serves_openai_endpoints_behind_guards_with_a_review_loop() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let (client, reviewer) = (setup.client.as_str(), setup.reviewer.as_str());
    let guard_arg = format!("g={}", setup.guard.display());
    let model = testdata("hf-tiny/causal-lm");
    // Server A: nothing blocks, every decision goes to review.
    let open_policy = dir.path().join("open.toml");
    std::fs::write(&open_policy, "version = \"open-1\"\n[defaults]\nthreshold = 1.0\naction = \"flag\"\n[review]\nallow_sample = 1.0\nband = 0.0\n[stream]\nchunk_chars = 16\noverlap_chars = 8\n").unwrap();
    let db = dir.path().join("review.sqlite");
    let a = start(&[
        "--model", s(&model), "--served-model-name", MODEL, "--input-guard", &guard_arg, "--policy", s(&open_policy),
        "--keys", s(&setup.keys), "--db", s(&db), "--max-body-bytes", "4096", "--max-tokens", "64",
    ]);

    // health, models, auth
    let (status, health) = get(&a.at("/health"), None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, models) = get(&a.at("/v1/models"), Some(client));
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(get(&a.at(&format!("/v1/models/{MODEL}")), Some(client)).0, 200);
    assert_error(get(&a.at("/v1/models"), None), 401, "invalid_api_key");
    assert_error(get(&a.at("/v1/models"), Some("sk-lathe-not-a-key")), 401, "invalid_api_key");
    assert_error(get(&a.at("/v1/review/items"), Some(client)), 403, "insufficient_permissions");
    // A key added while the server runs works at once.
    let late = serve_guard().args(["keys", "add", "--keys", s(&setup.keys), "--name", "late", "-q"]).output().unwrap();
    let late = String::from_utf8(late.stdout).unwrap().trim().to_string();
    assert_eq!(get(&a.at("/v1/models"), Some(&late)).0, 200);
    // 400, 404, 413
    let (status, text) = call("POST", &a.at("/v1/chat/completions"), Some(client), Some(b"{not json"));
    assert_error((status, serde_json::from_str(&text).unwrap()), 400, "invalid_request_error");
    assert_error(post(&a.at("/v1/chat/completions"), Some(client), &json!({"messages": []})), 400, "invalid_request_error");
    assert_error(post(&a.at("/v1/chat/completions"), Some(client), &chat(MODEL, BENIGN, json!({"max_tokens": 1000}))), 400, "invalid_request_error");
    assert_error(post(&a.at("/v1/chat/completions"), Some(client), &chat("gpt-9", BENIGN, json!({}))), 404, "model_not_found");
    assert_error(get(&a.at("/v1/no/such/path"), Some(client)), 404, "not_found");
    let huge = chat(MODEL, &"x".repeat(8000), json!({}));
    assert_error(post(&a.at("/v1/chat/completions"), Some(client), &huge), 413, "request_too_large");

    // chat, streaming chat, completions, moderations
    let (status, reply) = post(&a.at("/v1/chat/completions"), Some(client), &chat(MODEL, BENIGN, json!({})));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    let answer = reply["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!answer.is_empty());
    assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let (status, text) = call("POST", &a.at("/v1/chat/completions"), Some(client), Some(chat(MODEL, BENIGN, json!({"stream": true, "stream_options": {"include_usage": true}})).to_string().as_bytes()));
    assert_eq!(status, 200);
    let (streamed, finish) = read_chat_stream(&text);
    assert_eq!(streamed, answer, "greedy streaming gives the same text as the whole reply");
    assert_eq!(finish, reply["choices"][0]["finish_reason"].as_str().unwrap());
    let usage_chunk: Value = serde_json::from_str(&sse_payloads(&text)[sse_payloads(&text).len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"], reply["usage"]);
    let (status, completion) = post(&a.at("/v1/completions"), Some(client), &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}));
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["object"], "text_completion");
    assert!(completion["choices"][0]["text"].is_string());
    let (status, moderation) = post(&a.at("/v1/moderations"), Some(client), &json!({"input": [HARMFUL, BENIGN]}));
    assert_eq!(status, 200, "{moderation}");
    let results = moderation["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["flagged"], false, "nothing reaches a threshold of 1");
        assert_eq!(r["categories"].as_object().unwrap().len(), 8);
        assert!(r["category_scores"]["violence"].as_f64().unwrap() > 0.0);
    }
    assert_error(get(&a.at("/metrics"), None), 401, "invalid_api_key");
    let metrics = call("GET", &a.at("/metrics"), Some(client), None).1;
    for needle in [
        "lathe_requests_total{path=\"/v1/chat/completions\",status=\"200\"} 2",
        "lathe_requests_total{path=\"/v1/chat/completions\",status=\"413\"} 1",
        "lathe_request_duration_seconds_bucket{path=\"/v1/chat/completions\",le=\"+Inf\"}",
        "lathe_guard_duration_seconds_count{guard=\"g\",direction=\"input\"}",
        "lathe_guard_verdicts_total{direction=\"input\",action=\"allow\"}",
        "lathe_generated_tokens_total",
        "lathe_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "no `{needle}` in /metrics:\n{metrics}");
    }

    // Scores to build a policy from: the harmful and the benign text as the input guard reads
    // them (the conversation "user: ..."; alone, for a message among others), and the windows
    // of the benign text's greedy answer as the output guard checks them.
    for extra in ["Name three colours", "How do I bake bread?"] {
        assert_eq!(post(&a.at("/v1/chat/completions"), Some(client), &chat(MODEL, extra, json!({"max_tokens": 4}))).0, 200);
    }
    let mut texts = vec![format!("user: {HARMFUL}"), HARMFUL.to_string(), format!("user: {BENIGN}")];
    let (chunk, overlap) = (16, 8);
    let long = chat(MODEL, BENIGN, json!({"max_tokens": 48}));
    let long_answer = post(&a.at("/v1/chat/completions"), Some(client), &long).1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let answer_windows = windows(&long_answer, chunk, overlap);
    assert!(answer_windows.len() >= 3, "the fixture's answer is long enough to stream in pieces: {long_answer:?}");
    texts.extend(answer_windows.iter().cloned());
    let scores = category_scores(&a, client, &texts);
    let categories: Vec<String> = scores[0].keys().cloned().collect();
    let score = |i: usize, c: &str| scores[i][c].as_f64().unwrap();
    // Input: the category by which the harmful text most exceeds the benign one.
    let margin = |c: &str| score(0, c).min(score(1, c)) - score(2, c);
    let input_category = categories.iter().max_by(|x, y| margin(x).total_cmp(&margin(y))).unwrap().clone();
    assert!(margin(&input_category) > 1e-4, "the guard scores the harmful text above the benign one on some category: {scores:?}");
    let input_threshold = score(2, &input_category) + margin(&input_category) / 2.0;
    let bad = HARMFUL;
    // Output: a category some later window scores above every window before it.
    let window_score = |k: usize, c: &str| score(3 + k, c);
    // The widest such gap, so scoring a window alone or in a batch cannot cross the threshold.
    let (gap, output_category, cut, output_threshold) = categories
        .iter()
        .flat_map(|c| (1..answer_windows.len()).map(move |k| (c.clone(), k)))
        .map(|(c, k)| {
            let before = (0..k).map(|j| window_score(j, &c)).fold(0.0, f64::max);
            let at = window_score(k, &c);
            (at - before, c, k, (before + at) / 2.0)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    assert!(gap > 1e-4, "some window scores above the ones before it: {scores:?}");

    // Server B: input guard `in`, output guard `out`, thresholds from the scores above.
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = \"test-2\"\nrefusal = \"Blocked by policy.\"\n[defaults]\nthreshold = 1.0\n[review]\nallow_sample = 0.0\nband = 0.0\n[stream]\nchunk_chars = {chunk}\noverlap_chars = {overlap}\n\
             [guards.in.categories.{input_category}]\nthreshold = {input_threshold}\naction = \"block\"\n\
             [guards.out.categories.{output_category}]\nthreshold = {output_threshold}\naction = \"block\"\n"
        ),
    )
    .unwrap();
    let b = start(&[
        "--model", s(&model), "--served-model-name", MODEL, "--input-guard", &format!("in={}", setup.guard.display()),
        "--output-guard", &format!("out={}", setup.guard.display()), "--policy", s(&policy), "--keys", s(&setup.keys),
        "--db", s(&dir.path().join("b.sqlite")),
    ]);
    // A blocked input never reaches the model.
    let prompts_before = metric(&b, client, "lathe_engine_prompts_total");
    let (status, blocked) = post(&b.at("/v1/chat/completions"), Some(client), &chat(MODEL, bad, json!({})));
    assert_eq!(status, 200, "{blocked}");
    assert_eq!(blocked["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(blocked["choices"][0]["message"]["content"], "Blocked by policy.");
    // The whole conversation is checked, not only the last message.
    let earlier = json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": bad}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go on"}]});
    let (_, blocked_earlier) = post(&b.at("/v1/chat/completions"), Some(client), &earlier);
    assert_eq!(blocked_earlier["choices"][0]["finish_reason"], "content_filter", "{blocked_earlier}");
    let (status, text) = call("POST", &b.at("/v1/chat/completions"), Some(client), Some(chat(MODEL, bad, json!({"stream": true})).to_string().as_bytes()));
    assert_eq!(status, 200);
    assert_eq!(read_chat_stream(&text), ("Blocked by policy.".to_string(), "content_filter".to_string()));
    assert_eq!(metric(&b, client, "lathe_engine_prompts_total"), prompts_before, "the model never saw a blocked input");
    // An output blocked mid-stream: the windows before the cut are released, then content_filter.
    let (status, text) = call("POST", &b.at("/v1/chat/completions"), Some(client), Some(long.clone().to_string().as_bytes()));
    assert_eq!(status, 200);
    let (content, finish) = {
        let mut stream_body = long.clone();
        stream_body["stream"] = json!(true);
        let (_, streamed) = call("POST", &b.at("/v1/chat/completions"), Some(client), Some(stream_body.to_string().as_bytes()));
        read_chat_stream(&streamed)
    };
    assert_eq!(finish, "content_filter");
    let released: String = long_answer.chars().take(cut * chunk).collect();
    assert_eq!(content, released, "exactly the checked windows before the blocked one are released");
    assert!(!content.is_empty() && content.len() < long_answer.len());
    assert_eq!(metric(&b, client, "lathe_engine_prompts_total"), prompts_before + 2.0);
    // Without streaming the whole answer is replaced.
    let whole: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(whole["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(whole["choices"][0]["message"]["content"], "Blocked by policy.");
    drop(b);

    // The review round trip: decisions → review (API, terminal) → stats → export → rm-train.
    let (status, queue) = get(&a.at("/v1/review/items?limit=100"), Some(reviewer));
    assert_eq!(status, 200);
    let items = queue["data"].as_array().unwrap();
    assert!(items.len() >= 4, "every decision of server A was sampled: {}", items.len());
    let first = &items[0];
    assert_eq!(first["direction"], "input");
    assert_eq!(first["policy_version"], "open-1");
    assert_eq!(first["scores"].as_array().unwrap().len(), 8, "every guard's score of every category");
    assert!(first["request_id"].as_str().unwrap().starts_with("chatcmpl-"));
    let (status, confirmed) = post(&a.at(&format!("/v1/review/items/{}", first["id"])), Some(reviewer), &json!({"verdict": "confirm"}));
    assert_eq!((status, confirmed["status"].as_str()), (200, Some("confirmed")), "{confirmed}");
    let second = items[1]["id"].as_i64().unwrap();
    let (status, overturned) = post(&a.at(&format!("/v1/review/items/{second}")), Some(reviewer), &json!({"verdict": "overturn", "labels": ["violence", "harassment"]}));
    assert_eq!(status, 200, "{overturned}");
    assert_eq!(overturned["labels"], json!(["harassment", "violence"]));
    assert_error(post(&a.at(&format!("/v1/review/items/{second}")), Some(reviewer), &json!({"verdict": "overturn", "labels": ["spam"]})), 400, "invalid_request_error");
    assert_error(post(&a.at("/v1/review/items/99999"), Some(reviewer), &json!({"verdict": "confirm"})), 404, "not_found");
    assert_error(post(&a.at(&format!("/v1/review/items/{second}")), Some(client), &json!({"verdict": "confirm"})), 403, "insufficient_permissions");

    // The browser confirms one more decision when it is installed (`make browser`).
    let confirmed_in_browser = usize::from(review_page_in_headless_chromium(&a, reviewer, &db));

    let mut review = serve_guard().args(["review", "--db", s(&db), "--reviewer", "bo", "-q"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    review.stdin.take().unwrap().write_all(b"o\nviolence\ns\nq\n").unwrap();
    let out = review.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("overturned [violence]") && shown.contains("1 reviewed, 1 skipped"), "{shown}");
    let listed = serve_guard().args(["review", "--db", s(&db), "--list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("overturned as [violence] by bo"));
    let stats = serve_guard().args(["stats", "--db", s(&db), "--json"]).output().unwrap();
    assert!(stats.status.success());
    let rows: Vec<Value> = String::from_utf8_lossy(&stats.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let violence = rows.iter().find(|r| r["guard"] == "g" && r["category"] == "violence").unwrap();
    assert!(violence["reviewed"].as_u64().unwrap() >= 3 && violence["positives"].as_u64().unwrap() >= 2, "{violence}");
    assert_eq!(violence["precision"], Value::Null, "nothing reached a threshold of 1");
    assert_eq!(violence["false_positive_rate"], json!(0.0));
    let table = serve_guard().args(["stats", "--db", s(&db)]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("precision"));

    let labeled = dir.path().join("labeled.parquet");
    let out = serve_guard().args(["export", "--db", s(&db), "-o", s(&labeled)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = RecordReader::<LabeledTextRecord>::open(&labeled).unwrap().read_all().unwrap();
    assert!(rows.len() >= 3 + confirmed_in_browser, "{} rows", rows.len());
    assert!(rows.iter().any(|r| r.labels == vec!["harassment".to_string(), "violence".to_string()]));
    let next = dir.path().join("guard-2");
    ok("rm-train", &[s(&labeled), "--task", "multilabel", "--model", s(&setup.guard), "--steps", "2", "--max-length", "96", "--batch-size", "2", "-q", "-o", s(&next)]);
    assert_eq!(common::read_json(&next.join("config.json"))["id2label"], common::read_json(&setup.guard.join("config.json"))["id2label"]);
    drop(a);

    rate_limit_and_full_queue_answer_429(&model, &setup, dir.path());
    sigkill_under_load_loses_no_acknowledged_review(&model, &setup, dir.path());
}

fn rate_limit_and_full_queue_answer_429(model: &Path, setup: &Setup, dir: &Path) {
    let c = start(&[
        "--model", s(model), "--keys", s(&setup.keys), "--db", s(&dir.join("c.sqlite")), "--rate-limit", "20",
        "--queue-len", "1", "--max-batch", "1", "--max-tokens", "100",
    ]);
    // Eight long requests at once: one decodes, one waits, the rest find the queue full.
    let url = c.at("/v1/chat/completions");
    let body = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 100, "temperature": 1.0});
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (url, body, key) = (url.clone(), body.clone(), setup.client.clone());
            std::thread::spawn(move || post(&url, Some(&key), &body))
        })
        .collect();
    let answers: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(answers.iter().any(|a| a.0 == 200), "some were served");
    let full = answers.into_iter().find(|a| a.0 == 429).expect("a full queue answers 429");
    assert_error(full, 429, "queue_full");
    // A client that goes away mid-stream stops its generation. The fixture decodes 100 tokens
    // in a few milliseconds, sometimes before the close is seen, so a few tries are allowed.
    let stopped_early = (0..5).any(|_| {
        use std::io::Read;
        let cancelled = metric(&c, &setup.client, "lathe_engine_cancelled_total");
        let tokens = metric(&c, &setup.client, "lathe_generated_tokens_total");
        let address = c.url.trim_start_matches("http://").to_string();
        let mut socket = std::net::TcpStream::connect(&address).unwrap();
        let body = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 100, "temperature": 1.0, "stream": true}).to_string();
        write!(socket, "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", setup.client, body.len()).unwrap();
        let mut first = [0u8; 64];
        let n = socket.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        let _ = socket.shutdown(std::net::Shutdown::Both);
        drop(socket);
        let started = Instant::now();
        while metric(&c, &setup.client, "lathe_engine_cancelled_total") == cancelled && started.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        metric(&c, &setup.client, "lathe_engine_cancelled_total") == cancelled + 1.0 && metric(&c, &setup.client, "lathe_generated_tokens_total") - tokens < 100.0
    });
    assert!(stopped_early, "a generation whose client left was never stopped before its 100 tokens");
    drop(c);
    // Past --request-timeout the answer is 504 (and the generation stops).
    let slow = start(&["--model", s(model), "--db", s(&dir.join("t.sqlite")), "--request-timeout", "0.001"]);
    let story = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 100});
    assert_error(post(&slow.at("/v1/chat/completions"), None, &story), 504, "timeout");
    drop(slow);
    let c = start(&["--model", s(model), "--keys", s(&setup.keys), "--db", s(&dir.join("c2.sqlite")), "--rate-limit", "20"]);
    // The reviewer key has its own budget of 20 a minute.
    for _ in 0..20 {
        assert_eq!(get(&c.at("/v1/models"), Some(&setup.reviewer)).0, 200);
    }
    assert_error(get(&c.at("/v1/models"), Some(&setup.reviewer)), 429, "rate_limit_exceeded");
}

/// Review verdicts the server acknowledged: (decision id, labels).
type Acknowledged = Arc<Mutex<Vec<(i64, Vec<String>)>>>;

/// Reviews acknowledged while requests pour in survive a SIGKILL, and the database is sound.
fn sigkill_under_load_loses_no_acknowledged_review(model: &Path, setup: &Setup, dir: &Path) {
    let db = dir.join("kill.sqlite");
    let policy = dir.join("sample-all.toml");
    std::fs::write(&policy, "[defaults]\nthreshold = 1.0\n[review]\nallow_sample = 1.0\n").unwrap();
    let guard_arg = format!("g={}", setup.guard.display());
    let mut server = start(&["--model", s(model), "--input-guard", &guard_arg, "--output-guard", &guard_arg, "--policy", s(&policy), "--keys", s(&setup.keys), "--db", s(&db)]);
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (url, key, stop) = (server.at("/v1/chat/completions"), setup.client.clone(), stop.clone());
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": format!("request {i}")}], "max_tokens": 4});
                let agent = agent();
                while !stop.load(Ordering::SeqCst) {
                    let r = agent.post(&url).header("Authorization", &format!("Bearer {key}")).send_json(&body);
                    if r.is_err() {
                        break; // the server is gone
                    }
                }
            })
        })
        .collect();
    let acknowledged: Acknowledged = Arc::default();
    let reviewer = {
        let (list, key, acknowledged) = (server.at("/v1/review/items?limit=20"), setup.reviewer.clone(), acknowledged.clone());
        let base = server.url.clone();
        std::thread::spawn(move || {
            let agent = agent();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                let Ok(mut r) = agent.get(&list).header("Authorization", &format!("Bearer {key}")).call() else { return };
                let Ok(items) = r.body_mut().read_json::<Value>() else { return };
                for item in items["data"].as_array().cloned().unwrap_or_default() {
                    let id = item["id"].as_i64().unwrap();
                    let labels = if id % 2 == 0 { vec!["violence".to_string()] } else { vec![] };
                    let body = json!({"verdict": "overturn", "labels": labels});
                    match agent.post(&format!("{base}/v1/review/items/{id}")).header("Authorization", &format!("Bearer {key}")).send_json(&body) {
                        Ok(r) if r.status() == 200 => acknowledged.lock().unwrap().push((id, labels)),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
        })
    };
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < 15 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    reviewer.join().unwrap();
    for h in load {
        h.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 5, "only {} reviews acknowledged before the kill", acknowledged.len());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let queue = lathe::serve::review::ReviewDb::open_existing(&db).unwrap();
    for (id, labels) in &acknowledged {
        let item = queue.get(*id).unwrap().unwrap_or_else(|| panic!("acknowledged decision {id} is gone"));
        assert_eq!(item.status, "overturned", "decision {id}");
        assert_eq!(item.labels.as_ref(), Some(labels), "decision {id}");
    }
    eprintln!("sigkill: {} acknowledged reviews all survived; integrity_check ok", acknowledged.len());
}

// ---- the /review page in headless Chromium, over WebDriver ----

/// Confirms one pending decision through the page; false when no browser is installed.
fn review_page_in_headless_chromium(server: &Server, reviewer: &str, db: &Path) -> bool {
    if !browser_installed("the /review browser check") {
        return false;
    }
    let chromedriver = ChromeDriver::start();
    let profile = tempfile::tempdir().unwrap();
    let Some(driver) = chromedriver.browser(profile.path()) else { return false };
    driver.go(&server.at("/review"));
    driver.wait_for("the sign-in form shows", |s| s.contains("Reviewer key"));
    driver.type_into("#key", reviewer);
    driver.click("#sign-in");
    driver.wait_for("the queue shows after signing in", |s| s.contains("id=\"pending\""));
    let queue = lathe::serve::review::ReviewDb::open_existing(db).unwrap();
    let pending = queue.list(lathe::serve::review::Which::Pending, 1).unwrap();
    let item = pending.first().expect("a pending decision to confirm");
    driver.click(&format!("#confirm-{}", item.id));
    let gone = format!("id=\"item-{}\"", item.id);
    driver.wait_for("the confirmed item leaves the page", |s| s.contains("id=\"pending\"") && !s.contains(&gone));
    let reviewed = queue.get(item.id).unwrap().unwrap();
    assert_eq!(reviewed.status, "confirmed", "the database changed");
    assert_eq!(reviewed.reviewer.as_deref(), Some("ana"));
    eprintln!("browser: /review signed in and confirmed decision {} in headless Chromium", item.id);
    true
}

#[test]
fn bad_input_is_refused_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata("hf-tiny/causal-lm");
    let db = dir.path().join("q.sqlite");
    let refuse = |extra: &[&str], needle: &str| {
        let mut args = vec!["serve", "--model", s(&model), "--db", s(&db), "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let out = serve_guard().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle) && !stderr.contains("panicked") && !stderr.contains("listening"), "expected `{needle}`: {stderr}");
    };
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // A causal LM is not a multi-label classifier.
    refuse(&["--input-guard", s(&model)], "is not a multi-label classifier");
    refuse(&["--input-guard", "/no/such/guard"], "/no/such/guard");
    let bad_toml = write("bad.toml", "[defaults\nthreshold = 0.5\n");
    refuse(&["--policy", s(&bad_toml)], "line 1");
    let unknown = write("unknown.toml", "[guards.nope]\nthreshold = 0.5\n");
    refuse(&["--policy", s(&unknown)], "no guard of that name");
    let bad_action = write("action.toml", "[defaults]\naction = \"explode\"\n");
    refuse(&["--policy", s(&bad_action)], "action.toml");
    let keys = write("keys.txt", "app client nothex 1234\n");
    refuse(&["--keys", s(&keys)], "line 1");
    refuse(&["--keys", s(&dir.path().join("missing.txt"))], "missing.txt");
    refuse(&["--listen", "nowhere"], "--listen");
    let out = serve_guard().args(["serve", "--model", s(&dir.path().join("no-model")), "--db", s(&db)]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = serve_guard().args(["export", "--db", s(&dir.path().join("none.sqlite")), "-o", s(&dir.path().join("x.parquet"))]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.path().join("x.parquet").exists());
}

/// The value of the first `name="csrf"` field of a page.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap_or_else(|| panic!("no CSRF field: {page}")) + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}

/// Whether the server closed `socket` (reads end) within `wait`.
fn closed_within(socket: &mut std::net::TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    while started.elapsed() < wait {
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        match socket.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue, // an error response before the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return true, // reset
        }
    }
    false
}

/// Issue 18 items 7, 8 and 12: cross-site posts to the review queue, keys that outlive their
/// removal, slow and half-open clients, sign-in guessing, an open /metrics, the raw key as the
/// review cookie, and a flood of messages that reached the guards and the review queue.
#[test]
fn the_web_layer_refuses_cross_site_posts_stale_keys_slow_clients_and_floods() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let (client, reviewer) = (setup.client.as_str(), setup.reviewer.as_str());
    let model = testdata("hf-tiny/causal-lm");
    let policy = dir.path().join("all.toml");
    std::fs::write(&policy, "version = \"all-1\"\n[defaults]\nthreshold = 1.0\naction = \"flag\"\n[review]\nallow_sample = 1.0\nband = 0.0\n").unwrap();
    let (db, keys) = (dir.path().join("h.sqlite"), dir.path().join("h-keys.txt"));
    std::fs::copy(&setup.keys, &keys).unwrap();
    let guard_arg = format!("g={}", setup.guard.display());
    let server = start(&[
        "--model", s(&model), "--served-model-name", MODEL, "--input-guard", &guard_arg, "--policy", s(&policy), "--keys", s(&keys),
        "--db", s(&db), "--header-timeout", "1", "--max-half-open", "4",
    ]);
    let (ours, elsewhere) = (server.url.clone(), format!("http://127.0.0.1:{}", common::web::free_port()));
    let bearer_client = format!("Bearer {client}");
    let json = ("Content-Type", "application/json");
    let rows = || rusqlite::Connection::open(&db).unwrap().query_row("SELECT COUNT(*) FROM decisions", [], |r| r.get::<_, i64>(0)).unwrap();

    // Item 12: oversized requests are refused before the guards and before a review row.
    assert_eq!(post(&server.at("/v1/chat/completions"), Some(client), &chat(MODEL, BENIGN, json!({"max_tokens": 2}))).0, 200);
    let steps = || metric(&server, client, "lathe_guard_step_seconds_count{direction=\"input\"}");
    let (steps_before, rows_before) = (steps(), rows());
    assert_eq!(rows_before, 1, "the benign request was queued for review");
    let flood: Vec<Value> = (0..10_000).map(|_| json!({"role": "user", "content": "hi"})).collect();
    assert_error(post(&server.at("/v1/chat/completions"), Some(client), &json!({"model": MODEL, "messages": flood})), 400, "invalid_request_error");
    let long = chat(MODEL, &"word ".repeat(4000), json!({}));
    assert_error(post(&server.at("/v1/chat/completions"), Some(client), &long), 400, "context_length_exceeded");
    let texts: Vec<String> = (0..1000).map(|i| format!("text {i}")).collect();
    assert_error(post(&server.at("/v1/moderations"), Some(client), &json!({"input": texts})), 400, "invalid_request_error");
    assert_eq!((steps(), rows()), (steps_before, rows_before), "no guard ran and no review row was written for a refused request");

    // Item 7: JSON endpoints take application/json only.
    let body = chat(MODEL, BENIGN, json!({"max_tokens": 2})).to_string();
    let plain = raw("POST", &server.at("/v1/chat/completions"), &[("Authorization", &bearer_client), ("Content-Type", "text/plain")], Some(body.as_bytes()));
    assert_eq!(plain.status, 415, "{}", plain.body);

    // Item 12: signing in gives a random session id that expires, never the key.
    let sign_in = |key: &str| raw("POST", &server.at("/review/login"), &[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", &ours)], Some(format!("key={key}").as_bytes()));
    let signed = sign_in(reviewer);
    assert_eq!(signed.status, 303, "{}", signed.body);
    let set_cookie = signed.headers["set-cookie"].clone();
    let cookie = signed.cookie().unwrap();
    assert!(cookie.starts_with("serve_guard_session=") && !set_cookie.contains(reviewer), "{set_cookie}");
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict") && set_cookie.contains("Max-Age="), "{set_cookie}");
    for forged in [format!("lathe_key={reviewer}"), format!("serve_guard_session={reviewer}")] {
        assert_eq!(raw("GET", &server.at("/review"), &[("Cookie", &forged)], None).status, 401, "the raw key as a cookie signs nobody in: {forged}");
    }
    let page = raw("GET", &server.at("/review"), &[("Cookie", &cookie)], None);
    assert_eq!(page.status, 200);
    let token = csrf_of(&page.body);
    let pending = get(&server.at("/v1/review/items"), Some(reviewer)).1["data"][0]["id"].as_i64().unwrap();
    let status_of = |id: i64| get(&server.at("/v1/review/items?status=all"), Some(reviewer)).1["data"].as_array().unwrap().iter().find(|i| i["id"] == id).unwrap()["status"].clone();

    // Item 7: a form posted from another site (another port of this host), or without the
    // session's CSRF token, changes nothing; the page's own form does.
    let form = |origin: &str, fields: &str| {
        raw("POST", &server.at(&format!("/review/{pending}")), &[("Cookie", &cookie), ("Content-Type", "application/x-www-form-urlencoded"), ("Origin", origin)], Some(fields.as_bytes()))
    };
    assert_eq!(form(&elsewhere, &format!("verdict=overturn&labels=violence&csrf={token}")).status, 403);
    assert_eq!(form(&ours, "verdict=overturn&labels=violence").status, 403, "no CSRF token");
    assert_eq!(form(&ours, "verdict=overturn&labels=violence&csrf=0123").status, 403, "another token");
    assert_eq!(status_of(pending), "pending");
    // The JSON review API with the session cookie: JSON only, and only from this site.
    let verdict = json!({"verdict": "overturn", "labels": ["violence"]}).to_string();
    let api = |headers: &[(&str, &str)]| raw("POST", &server.at(&format!("/v1/review/items/{pending}")), headers, Some(verdict.as_bytes())).status;
    assert_eq!(api(&[("Cookie", &cookie), ("Content-Type", "text/plain"), ("Origin", &ours)]), 415);
    assert_eq!(api(&[("Cookie", &cookie), json]), 403, "a cookie without Origin");
    assert_eq!(api(&[("Cookie", &cookie), json, ("Origin", &elsewhere)]), 403);
    assert_eq!(api(&[("Authorization", &format!("Bearer {reviewer}")), json, ("Origin", &elsewhere)]), 403, "no key is taken from another site");
    assert_eq!(status_of(pending), "pending", "nothing above changed the item");
    assert_eq!(form(&ours, &format!("verdict=overturn&labels=violence&csrf={token}")).status, 303);
    assert_eq!(status_of(pending), "overturned");

    // Item 12: /metrics needs a key unless --public-metrics.
    assert_eq!(raw("GET", &server.at("/metrics"), &[], None).status, 401);
    assert_eq!(raw("GET", &server.at("/metrics"), &[("Authorization", &bearer_client)], None).status, 200);

    // Item 8: emptying or deleting the keys file revokes every key and session at once.
    let kept = std::fs::read_to_string(&keys).unwrap();
    let models = || raw("GET", &server.at("/v1/models"), &[("Authorization", &bearer_client)], None).status;
    let review_page = || raw("GET", &server.at("/review"), &[("Cookie", &cookie)], None).status;
    assert_eq!((models(), review_page()), (200, 200));
    std::fs::write(&keys, "").unwrap();
    assert_eq!((models(), review_page()), (401, 401), "an emptied keys file locks everyone out");
    std::fs::write(&keys, &kept).unwrap();
    assert_eq!(models(), 200, "a restored file lets the keys in again");
    assert_eq!(review_page(), 401, "a session ended by revocation stays ended");
    std::fs::remove_file(&keys).unwrap();
    assert_eq!(models(), 401, "a deleted keys file locks everyone out");
    std::fs::write(&keys, &kept).unwrap();

    // Item 12: failed sign-ins are throttled per address, even for the right key afterwards.
    for _ in 0..5 {
        assert_eq!(sign_in("sk-lathe-guess").status, 401);
    }
    let throttled = sign_in(reviewer);
    assert_eq!(throttled.status, 429, "{}", throttled.body);

    // Item 12: a client that sends its headers too slowly is cut off after --header-timeout.
    let mut slow = std::net::TcpStream::connect(server.address()).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(4)), "a connection with unfinished headers stayed open past --header-timeout 1");
    // At most --max-half-open connections wait for their first request; a real one still gets in.
    let mut silent: Vec<std::net::TcpStream> = (0..12).map(|_| std::net::TcpStream::connect(server.address()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let open = silent.iter_mut().map(|c| !closed_within(c, Duration::from_millis(60))).filter(|&still| still).count();
    assert!(open <= 4, "{open} half-open connections stayed open (cap 4)");
    assert_eq!(get(&server.at("/health"), None).0, 200);
    drop(server);

    let public = start(&["--model", s(&model), "--keys", s(&keys), "--db", s(&dir.path().join("p.sqlite")), "--public-metrics"]);
    assert_eq!(raw("GET", &public.at("/metrics"), &[], None).status, 200);
}

/// A harmful request followed by enough benign text to push it out of the guard's
/// `max_length` was once passed to the model unread. Input guards now read the whole input in
/// overlapping windows (the highest score counts), so it is blocked as it is alone — while the
/// padding alone still passes.
#[test]
fn a_harmful_request_padded_past_the_guard_window_is_still_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let tokenizer = lathe::tokenizer::LoadedTokenizer::load(&setup.guard.join("tokenizer.json")).unwrap();
    let tokens = |text: &str| tokenizer.encode_prompt(text).unwrap().len();
    // The guard reads `user: HARMFUL` alone in its first window: an even number of tokens is
    // what half-window steps start the second window with.
    let harmful = ["", " now", " today", " please"].iter().map(|tail| format!("{HARMFUL}{tail}")).find(|h| tokens(&format!("user: {h}")) % 2 == 0).unwrap();
    let window = tokens(&format!("user: {harmful}"));
    let padding = format!(" {}", BENIGN.repeat(5));
    assert!(tokens(&padding) > 2 * window, "the padding is longer than the guard reads");
    // The same guard, reading `window` tokens and EOS (as one trained with --max-length does).
    let short = dir.path().join("short-guard");
    common::copy_folder(&setup.guard, &short);
    let mut config = common::read_json(&short.join("config.json"));
    config["lathe_scoring"]["max_length"] = json!(window + 1);
    config["lathe_scoring"]["truncation"] = json!("left");
    std::fs::write(short.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let model = testdata("hf-tiny/causal-lm");
    let guard = format!("in={}", short.display());
    let measure = start(&["--model", s(&model), "--served-model-name", MODEL, "--input-guard", &guard, "--keys", s(&setup.keys), "--db", s(&dir.path().join("m.sqlite"))]);
    let texts = vec![format!("user: {harmful}"), format!("user:{padding}")];
    let scores = category_scores(&measure, &setup.client, &texts);
    drop(measure);
    let margin = |c: &str| scores[0][c].as_f64().unwrap() - scores[1][c].as_f64().unwrap();
    let category = scores[0].keys().max_by(|a, b| margin(a).total_cmp(&margin(b))).unwrap().clone();
    assert!(margin(&category) > 1e-4, "the guard scores the request above the padding on some category: {scores:?}");
    let threshold = scores[1][&category].as_f64().unwrap() + margin(&category) / 2.0;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, format!("[defaults]\nthreshold = 1.0\n[review]\nallow_sample = 0.0\nband = 0.0\n[guards.in.categories.{category}]\nthreshold = {threshold}\naction = \"block\"\n")).unwrap();
    let server = start(&["--model", s(&model), "--served-model-name", MODEL, "--input-guard", &guard, "--policy", s(&policy), "--keys", s(&setup.keys), "--db", s(&dir.path().join("q.sqlite"))]);
    let finish = |content: &str| {
        let (status, reply) = post(&server.at("/v1/chat/completions"), Some(&setup.client), &chat(MODEL, content, json!({"max_tokens": 4})));
        assert_eq!(status, 200, "{reply}");
        reply["choices"][0]["finish_reason"].as_str().unwrap().to_string()
    };
    assert_eq!(finish(&harmful), "content_filter", "the request alone is blocked");
    assert_ne!(finish(padding.trim_start()), "content_filter", "the padding alone passes");
    assert_eq!(finish(&format!("{harmful}{padding}")), "content_filter", "the padded request is blocked too");
    let streamed = chat(MODEL, &format!("{harmful}{padding}"), json!({"max_tokens": 4, "stream": true}));
    let (_, text) = call("POST", &server.at("/v1/chat/completions"), Some(&setup.client), Some(streamed.to_string().as_bytes()));
    assert_eq!(read_chat_stream(&text).1, "content_filter", "streamed too");
}

/// With stderr closed (a log reader that went away), SIGTERM still stops the server at once
/// with exit 130; the review queue it created is readable by its owner only.
#[test]
fn sigterm_stops_the_server_even_with_stderr_closed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("review.sqlite");
    let mut server = KillOnDrop(
        serve_guard()
            .args(["serve", "--model", s(&testdata("hf-tiny/causal-lm")), "--db", s(&db), "--listen", "127.0.0.1:0", "--threads", "1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut server.0;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("listening on") {}
    drop(lines);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "serve-guard ignored SIGTERM with its stderr closed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "review.sqlite holds prompts and responses: {mode:o}");
}
