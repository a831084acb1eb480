//! `annotate` over real HTTP on loopback, on real texts (hh-rlhf answers, OpenAI moderation
//! samples): the JSON API for score, rank and label with overlap, never-twice, skip and undo;
//! exports read by `rank` and `rm-train`; the auth catalogue; two annotators working with the
//! keyboard in headless Chromium; and scripted annotators under load through a SIGKILL.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::web::{Answer, ChromeDriver, Server, agent, browser_installed, free_port, raw};
use common::{ok, s, testdata};
use lathe::data::records::{LabeledTextRecord, PreferenceRecord, RecordReader, RecordWriter, ResponseRecord, ScoredRecord};
use serde_json::{Value, json};

fn annotate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_annotate"))
}

fn add_key(keys: &Path, name: &str, role: &str) -> String {
    let out = annotate().args(["keys", "add", "--keys", s(keys), "--name", name, "--role", role, "-q"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn serve(args: &[&str]) -> Server {
    let mut command = annotate();
    command.arg("serve");
    Server::start(command, args)
}

/// `per_prompt` real answers to each of `prompts` hh-rlhf prompts: the chosen one, the
/// rejected one, then chosen answers of other prompts.
fn responses(dir: &Path, name: &str, prompts: usize, per_prompt: usize) -> PathBuf {
    let pairs = RecordReader::<PreferenceRecord>::open(&testdata("pref_hh_rlhf_harmless_base.slice.parquet")).unwrap().read_all().unwrap();
    let mut rows = Vec::new();
    for p in 0..prompts {
        let pair = &pairs[p % pairs.len()];
        for sample in 0..per_prompt {
            let response = match sample {
                0 => pair.chosen.clone(),
                1 => pair.rejected.clone(),
                k => pairs[(p + k) % pairs.len()].chosen.clone(),
            };
            rows.push(ResponseRecord {
                prompt_id: format!("hh-{p}"),
                prompt: pair.prompt.clone(),
                response,
                sample: sample as i32,
                model: "hh-rlhf".into(),
                finish_reason: "stop".into(),
                num_tokens: 1,
                logprob: 0.0,
            });
        }
    }
    let path = dir.join(name);
    let mut writer = RecordWriter::<ResponseRecord>::create(&path, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
    path
}

/// The first `n` OpenAI moderation samples, their true categories as suggestions.
fn moderation_texts(dir: &Path, n: usize) -> PathBuf {
    let rows = RecordReader::<LabeledTextRecord>::open(&testdata("moderation_openai_samples.slice.parquet")).unwrap().read_all().unwrap();
    let path = dir.join("texts.parquet");
    let mut writer = RecordWriter::<LabeledTextRecord>::create(&path, "test", vec![], vec![]).unwrap();
    writer.write(&rows[..n], vec![]).unwrap();
    writer.finish().unwrap();
    path
}

const CATEGORIES: &str = "sexual,hate,violence,harassment,self_harm,sexual_minors,hate_threatening,violence_graphic";

/// One annotator's script over the JSON API.
struct Api {
    url: String,
    auth: String,
}

impl Api {
    fn new(server: &Server, key: &str) -> Api {
        Api { url: server.url.clone(), auth: format!("Bearer {key}") }
    }

    fn get(&self, path: &str) -> Answer {
        raw("GET", &format!("{}{path}", self.url), &[("Authorization", &self.auth)], None)
    }

    /// The next item, or `None` on 204.
    fn next(&self) -> Option<Value> {
        let answer = self.get("/api/next");
        match answer.status {
            204 => None,
            200 => Some(answer.json()["item"].clone()),
            other => panic!("GET /api/next: {other} {}", answer.body),
        }
    }

    fn send(&self, id: &Value, body: Value) -> Answer {
        let body = body.to_string();
        raw("POST", &format!("{}/api/items/{id}/answer", self.url), &[("Authorization", &self.auth), ("Content-Type", "application/json")], Some(body.as_bytes()))
    }

    fn answer(&self, id: &Value, body: Value) -> Value {
        let answer = self.send(id, body);
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.json()
    }
}

fn export(db: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["export", "--db", s(db), "-o", s(out), "-q"];
    args.extend_from_slice(extra);
    let done = annotate().args(&args).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
}

fn stats(db: &Path) -> Value {
    let out = annotate().args(["stats", "--db", s(db), "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn score_rank_and_label_through_the_api_feed_rank_and_rm_train() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    let (ana, bo, cy) = (add_key(&keys, "ana", "annotator"), add_key(&keys, "bo", "annotator"), add_key(&keys, "cy", "annotator"));
    let lead = add_key(&keys, "lead", "admin");

    // ---- score: four responses, overlap 2, three annotators ----
    let items = responses(dir.path(), "score.parquet", 2, 2);
    let db = dir.path().join("score.sqlite");
    let server = serve(&[s(&items), "--task", "score", "--scale", "1-5", "--db", s(&db), "--keys", s(&keys), "--overlap", "2"]);
    let (ana_api, bo_api, cy_api) = (Api::new(&server, &ana), Api::new(&server, &bo), Api::new(&server, &cy));
    let mut given: HashMap<(String, i64), Vec<(String, f64)>> = HashMap::new();
    let mut record = |item: &Value, who: &str, score: f64| given.entry((item["prompt_id"].as_str().unwrap().to_string(), item["sample"].as_i64().unwrap())).or_default().push((who.to_string(), score));
    // ana skips her first item and answers the rest, never seeing one twice.
    let skipped = ana_api.next().unwrap();
    assert_eq!(skipped["task"], "score");
    assert_eq!(skipped["scale"], json!({"low": 1, "high": 5}));
    assert_eq!(ana_api.next().unwrap()["id"], skipped["id"], "asking again shows the item held");
    assert_eq!(ana_api.answer(&skipped["id"], json!({"skip": true}))["action"], "skipped");
    let mut seen = HashSet::from([skipped["id"].as_i64().unwrap()]);
    while let Some(item) = ana_api.next() {
        assert!(seen.insert(item["id"].as_i64().unwrap()), "ana was shown item {} twice", item["id"]);
        let score = (item["id"].as_i64().unwrap() % 5 + 1) as f64;
        ana_api.answer(&item["id"], json!({"score": score, "comment": "clear"}));
        record(&item, "ana", score);
    }
    assert_eq!(seen.len(), 4, "ana saw every item once");
    // bo answers everything; his first answer he takes back and gives again.
    let first = bo_api.next().unwrap();
    bo_api.answer(&first["id"], json!({"score": 1}));
    assert_eq!(bo_api.send(&first["id"], json!({"score": 2})).status, 409, "answered already: undo first");
    assert_eq!(bo_api.answer(&first["id"], json!({"undo": true}))["action"], "undone");
    assert_eq!(bo_api.next().unwrap()["id"], first["id"], "the undone item comes back");
    bo_api.answer(&first["id"], json!({"score": 4}));
    record(&first, "bo", 4.0);
    while let Some(item) = bo_api.next() {
        bo_api.answer(&item["id"], json!({"score": 3}));
        record(&item, "bo", 3.0);
    }
    // cy gets only the item ana skipped: every other one has its two answers.
    let only = cy_api.next().unwrap();
    assert_eq!(only["id"], skipped["id"]);
    cy_api.answer(&only["id"], json!({"score": 5}));
    record(&only, "cy", 5.0);
    assert!(cy_api.next().is_none() && ana_api.next().is_none() && bo_api.next().is_none(), "nothing left for anyone");
    let overview = Api::new(&server, &lead).get("/api/progress").json();
    assert_eq!((overview["complete"].as_u64(), overview["items"].as_u64()), (Some(4), Some(4)), "{overview}");
    assert_eq!(overview["annotators"].as_array().unwrap().len(), 3);
    let mine = cy_api.get("/api/progress").json();
    assert_eq!(mine["progress"]["answered"], 1);
    assert!(mine.get("annotators").is_none(), "an annotator sees only their own progress");
    drop(server);

    let report = stats(&db);
    assert_eq!((report["complete"].as_u64(), report["answers"].as_u64(), report["skips"].as_u64()), (Some(4), Some(8), Some(1)), "{report}");
    assert_eq!(report["agreement"]["items_rated_twice"], 4);
    let scored = dir.path().join("scored.parquet");
    export(&db, &scored, &[]);
    let rows = RecordReader::<ScoredRecord>::open(&scored).unwrap().read_all().unwrap();
    assert_eq!(rows.len(), 4);
    for row in &rows {
        let ratings = &given[&(row.response.prompt_id.clone(), row.response.sample as i64)];
        let mean = ratings.iter().map(|r| r.1).sum::<f64>() / ratings.len() as f64;
        assert!((row.score - mean).abs() < 1e-12, "{}: {} vs the answers {ratings:?}", row.response.prompt_id, row.score);
        let mut names: Vec<&str> = ratings.iter().map(|r| r.0.as_str()).collect();
        names.sort();
        let mut written: Vec<&str> = row.scorer.trim_start_matches("mean:").split(',').collect();
        written.sort();
        assert_eq!(written, names);
    }
    ok("rank", &[s(&scored), "--pairs", "all", "-q", "-o", s(&dir.path().join("from-scores.parquet"))]);

    // ---- rank: three prompts with three answers each; longest best ----
    let items = responses(dir.path(), "rank.parquet", 3, 3);
    let db = dir.path().join("rank.sqlite");
    let server = serve(&[s(&items), "--task", "rank", "--db", s(&db), "--keys", s(&keys), "--overlap", "2"]);
    let mut orders = Vec::new();
    for (key, tie) in [(&ana, false), (&bo, true)] {
        let api = Api::new(&server, key);
        while let Some(item) = api.next() {
            let mut shown: Vec<(String, usize)> = item["responses"].as_array().unwrap().iter().map(|r| (r["letter"].as_str().unwrap().to_string(), r["response"].as_str().unwrap().len())).collect();
            assert_eq!(shown.len(), 3);
            shown.sort_by_key(|r| std::cmp::Reverse(r.1));
            let letters: Vec<&str> = shown.iter().map(|r| r.0.as_str()).collect();
            // bo ties the two shorter answers.
            let ranking = if tie { format!("{}{}={}", letters[0], letters[1], letters[2]) } else { letters.concat() };
            orders.push(letters.concat());
            assert_eq!(api.send(&item["id"], json!({"ranking": "AB"})).status, 400, "every letter once");
            api.answer(&item["id"], json!({"ranking": ranking}));
        }
    }
    assert_eq!(orders.len(), 6);
    assert!(orders.iter().collect::<HashSet<_>>().len() > 1, "letters are shuffled per annotator: {orders:?}");
    drop(server);
    let prefs = dir.path().join("prefs.parquet");
    export(&db, &prefs, &[]);
    let pairs = RecordReader::<PreferenceRecord>::open(&prefs).unwrap().read_all().unwrap();
    assert_eq!(pairs.len(), 9, "three pairs per prompt");
    for pair in &pairs {
        assert!(pair.chosen.len() > pair.rejected.len(), "the longer answer is chosen");
        let margin = pair.margin.unwrap();
        assert!(margin == 1.0 || margin == 0.5, "both agree (1) or one voted and one tied (0.5): {margin}");
        assert!(pair.chosen_score.unwrap() > pair.rejected_score.unwrap());
    }
    assert_eq!(pairs.iter().filter(|p| p.margin == Some(0.5)).count(), 3, "bo's ties");
    ok("rm-train", &[s(&prefs), "--model", s(&testdata("hf-tiny/causal-lm")), "--steps", "2", "--batch-size", "2", "--max-length", "96", "--threads", "2", "-q", "-o", s(&dir.path().join("rm"))]);
    let listwise = dir.path().join("ranks.parquet");
    export(&db, &listwise, &["--listwise"]);
    let ranked = RecordReader::<ScoredRecord>::open(&listwise).unwrap().read_all().unwrap();
    assert_eq!(ranked.len(), 9);
    ok("rank", &[s(&listwise), "--pairs", "best-worst", "-q", "-o", s(&dir.path().join("best-worst.parquet"))]);

    // ---- label: six moderation samples; ana ticks the suggestions, bo adds violence ----
    let items = moderation_texts(dir.path(), 6);
    let db = dir.path().join("label.sqlite");
    let server = serve(&[s(&items), "--task", "label", "--labels", CATEGORIES, "--db", s(&db), "--keys", s(&keys)]);
    let mut labels_of: HashMap<String, Vec<String>> = HashMap::new();
    for (key, add) in [(&ana, None), (&bo, Some("violence"))] {
        let api = Api::new(&server, key);
        while let Some(item) = api.next() {
            assert_eq!(item["labels"].as_array().unwrap().len(), 8);
            let mut ticked: Vec<String> = item["suggested"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
            labels_of.insert(item["text"].as_str().unwrap().to_string(), ticked.clone());
            ticked.extend(add.map(str::to_string));
            assert_eq!(api.send(&item["id"], json!({"labels": ["spam"]})).status, 400, "an unknown label");
            api.answer(&item["id"], json!({"labels": ticked}));
        }
    }
    drop(server);
    let labeled = dir.path().join("labeled.parquet");
    export(&db, &labeled, &[]);
    let rows = RecordReader::<LabeledTextRecord>::open(&labeled).unwrap().read_all().unwrap();
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let mut expected = labels_of[&row.text].clone();
        if !expected.contains(&"violence".to_string()) {
            expected.push("violence".into()); // one of two annotators: at least half
        }
        let order: Vec<&str> = CATEGORIES.split(',').collect();
        expected.sort_by_key(|l| order.iter().position(|c| c == l));
        assert_eq!(row.labels, expected, "{}", row.text);
    }
    let report = stats(&db);
    let agreement = &report["agreement"]["labels"];
    assert_eq!(agreement.as_array().unwrap().len(), 8);
    let violence = agreement.as_array().unwrap().iter().find(|l| l["label"] == "violence").unwrap();
    assert_eq!(violence["items_rated_twice"], 6);
    ok("rm-train", &[s(&labeled), "--task", "multilabel", "--model", s(&testdata("hf-tiny/causal-lm")), "--steps", "2", "--batch-size", "2", "--max-length", "96", "--threads", "2", "-q", "-o", s(&dir.path().join("guard"))]);
}

/// Sign in at `/login`: the session cookie (`NAME=VALUE`).
fn sign_in(server: &Server, key: &str) -> String {
    let signed = raw("POST", &server.at("/login"), &[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", &server.url)], Some(format!("key={key}").as_bytes()));
    assert_eq!(signed.status, 303, "{}", signed.body);
    let set_cookie = &signed.headers["set-cookie"];
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict") && set_cookie.contains("Max-Age=") && !set_cookie.contains(key), "{set_cookie}");
    signed.cookie().unwrap()
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap_or_else(|| panic!("no CSRF field: {page}")) + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}

/// No key, a wrong key, an annotator on admin routes, another annotator's item, cross-site
/// posts, script in a response text and in a key's name: nothing gets through.
#[test]
fn the_auth_catalogue_has_no_bypass() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    let ana = add_key(&keys, "ana", "annotator");
    let bo = add_key(&keys, "bo", "annotator");
    let mallory = add_key(&keys, "<b>mallory</b>", "annotator");
    let lead = add_key(&keys, "lead", "admin");
    // Two responses whose text is markup.
    let attack = "<script>alert('x')</script>\"><img src=x onerror=alert(1)>";
    let path = dir.path().join("hostile.parquet");
    let rows: Vec<ResponseRecord> = (0..2)
        .map(|i| ResponseRecord { prompt_id: format!("p{i}"), prompt: format!("<i>prompt {i}</i>"), response: attack.into(), sample: 0, model: "m".into(), finish_reason: "stop".into(), num_tokens: 1, logprob: 0.0 })
        .collect();
    let mut writer = RecordWriter::<ResponseRecord>::create(&path, "test", vec![], vec![]).unwrap();
    writer.write(&rows, vec![]).unwrap();
    writer.finish().unwrap();
    let db = dir.path().join("a.sqlite");
    let server = serve(&[s(&path), "--task", "score", "--db", s(&db), "--keys", s(&keys), "--overlap", "1", "--max-body-bytes", "4096"]);
    let elsewhere = format!("http://127.0.0.1:{}", free_port());
    let json_type = ("Content-Type", "application/json");
    let answers = || rusqlite::Connection::open(&db).unwrap().query_row("SELECT COUNT(*) FROM decisions", [], |r| r.get::<_, i64>(0)).unwrap();

    // No key and a wrong key: nothing but the sign-in page.
    for auth in [None, Some("Bearer sk-lathe-0000")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        for path in ["/api/next", "/api/progress", "/api/report", "/admin", "/", "/guidelines"] {
            let answer = raw("GET", &server.at(path), &headers, None);
            assert_eq!(answer.status, 401, "{path} with {auth:?}: {}", answer.body);
            assert!(!answer.body.contains("prompt 0") && !answer.body.contains("alert"), "{path} shows data without a key");
        }
        let mut post_headers = headers.clone();
        post_headers.push(json_type);
        assert_eq!(raw("POST", &server.at("/api/items/1/answer"), &post_headers, Some(b"{\"score\": 5}")).status, 401);
    }
    assert_eq!(answers(), 0);
    // An annotator on admin routes.
    let ana_api = Api::new(&server, &ana);
    assert_eq!(ana_api.get("/admin").status, 403);
    assert_eq!(ana_api.get("/api/report").status, 403);
    assert_eq!(Api::new(&server, &lead).get("/api/report").status, 200);
    // Another annotator's item: with overlap 1, the item ana holds is not bo's to answer.
    let held = ana_api.next().unwrap();
    let bo_api = Api::new(&server, &bo);
    let refused = bo_api.send(&held["id"], json!({"score": 1}));
    assert_eq!((refused.status, refused.json()["error"]["code"].as_str()), (403, Some("not_assigned")), "{}", refused.body);
    assert_eq!(bo_api.send(&json!(99), json!({"score": 1})).status, 404);
    assert_ne!(bo_api.next().unwrap()["id"], held["id"], "an item held by ana is not shown to bo");
    assert_eq!(answers(), 0);
    // Bodies: JSON only, size-limited, no unknown fields.
    let auth = format!("Bearer {ana}");
    let post = |headers: &[(&str, &str)], body: &[u8]| raw("POST", &server.at(&format!("/api/items/{}/answer", held["id"])), headers, Some(body)).status;
    assert_eq!(post(&[("Authorization", &auth), ("Content-Type", "text/plain")], b"{\"score\": 5}"), 415);
    assert_eq!(post(&[("Authorization", &auth), json_type], &vec![b' '; 8192]), 413);
    assert_eq!(post(&[("Authorization", &auth), json_type], b"{\"score\": 5, \"admin\": true}"), 400);
    assert_eq!(answers(), 0);

    // The browser session: a random id, never the key; the raw key as a cookie is nobody.
    let cookie = sign_in(&server, &ana);
    assert_eq!(raw("GET", &server.at("/api/next"), &[("Cookie", &format!("annotate_session={ana}"))], None).status, 401);
    let page = raw("GET", &server.at("/"), &[("Cookie", &cookie)], None);
    assert_eq!(page.status, 200);
    // Script in the data and in a key's name is shown as text.
    assert!(page.body.contains("&lt;script&gt;alert(") && !page.body.contains("<script>alert") && !page.body.contains("<img src=x"), "{}", page.body);
    assert!(page.body.contains("&lt;i&gt;prompt") && !page.body.contains("<i>prompt"));
    let csp = &page.headers["content-security-policy"];
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let mallory_page = raw("GET", &server.at("/"), &[("Cookie", &sign_in(&server, &mallory))], None);
    assert!(mallory_page.body.contains("&lt;b&gt;mallory&lt;") && !mallory_page.body.contains("<b>mallory"), "{}", mallory_page.body);
    // Cross-site posts with the session: another port's page, no token, another token.
    let token = csrf_of(&page.body);
    let form = |origin: &str, body: &str| raw("POST", &server.at(&format!("/items/{}/answer", held["id"])), &[("Cookie", &cookie), ("Content-Type", "application/x-www-form-urlencoded"), ("Origin", origin)], Some(body.as_bytes())).status;
    assert_eq!(form(&elsewhere, &format!("score=5&csrf={token}")), 403);
    assert_eq!(form(&server.url, "score=5"), 403);
    assert_eq!(form(&server.url, "score=5&csrf=00"), 403);
    let json_post = |headers: &[(&str, &str)]| raw("POST", &server.at(&format!("/api/items/{}/answer", held["id"])), headers, Some(b"{\"score\": 5}")).status;
    assert_eq!(json_post(&[("Cookie", &cookie), json_type]), 403, "a cookie without Origin");
    assert_eq!(json_post(&[("Cookie", &cookie), json_type, ("Origin", &elsewhere)]), 403);
    assert_eq!(json_post(&[("Cookie", &cookie), ("Content-Type", "text/plain"), ("Origin", &server.url)]), 415);
    assert_eq!(raw("POST", &server.at("/undo"), &[("Cookie", &cookie), ("Content-Type", "application/x-www-form-urlencoded"), ("Origin", &elsewhere)], Some(b"")).status, 403);
    assert_eq!(answers(), 0, "no cross-site post got through");
    // The page's own form does.
    assert_eq!(form(&server.url, &format!("score=5&csrf={token}")), 303);
    assert_eq!(answers(), 1);
    // Signing out ends the session; emptying the keys file ends them all.
    let lead_cookie = sign_in(&server, &lead);
    assert_eq!(raw("GET", &server.at("/admin"), &[("Cookie", &lead_cookie)], None).status, 200);
    let logout = raw("POST", &server.at("/logout"), &[("Cookie", &cookie), ("Content-Type", "application/x-www-form-urlencoded"), ("Origin", &server.url)], Some(format!("csrf={token}").as_bytes()));
    assert_eq!(logout.status, 303);
    assert_eq!(raw("GET", &server.at("/api/next"), &[("Cookie", &cookie)], None).status, 401);
    let kept = std::fs::read_to_string(&keys).unwrap();
    std::fs::write(&keys, "").unwrap();
    assert_eq!(raw("GET", &server.at("/admin"), &[("Cookie", &lead_cookie)], None).status, 401);
    assert_eq!(Api::new(&server, &lead).get("/api/progress").status, 401);
    std::fs::write(&keys, kept).unwrap();
    // Guessing keys at the sign-in form is throttled, even for the right key afterwards.
    for _ in 0..5 {
        assert_eq!(raw("POST", &server.at("/login"), &[("Content-Type", "application/x-www-form-urlencoded")], Some(b"key=sk-lathe-guess")).status, 401);
    }
    assert_eq!(raw("POST", &server.at("/login"), &[("Content-Type", "application/x-www-form-urlencoded")], Some(format!("key={ana}").as_bytes())).status, 429);
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    add_key(&keys, "ana", "annotator");
    let items = responses(dir.path(), "r.parquet", 2, 2);
    let refuse = |args: &[&str], needle: &str| {
        let out = annotate().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(needle) && !stderr.contains("panicked") && !stderr.contains("listening"), "expected `{needle}`: {stderr}");
    };
    let db = dir.path().join("a.sqlite");
    let missing = dir.path().join("missing.parquet");
    refuse(&["serve", s(&missing), "--task", "score", "--db", s(&db), "--keys", s(&keys)], "missing.parquet");
    refuse(&["serve", s(&items), "--task", "score", "--db", s(&db), "--keys", s(&dir.path().join("nokeys.txt"))], "nokeys.txt");
    refuse(&["serve", s(&items), "--task", "score", "--scale", "5-1", "--db", s(&db), "--keys", s(&keys)], "--scale 5-1");
    refuse(&["serve", s(&items), "--task", "label", "--db", s(&db), "--keys", s(&keys)], "expected text data");
    refuse(&["serve", s(&items), "--task", "score", "--overlap", "0", "--db", s(&db), "--keys", s(&keys)], "--overlap");
    refuse(&["serve", "--task", "score", "--db", s(&db), "--keys", s(&keys), "--listen", "127.0.0.1:0"], "a new database needs the ITEMS");
    assert!(!db.exists() || rusqlite::Connection::open(&db).unwrap().query_row("SELECT COUNT(*) FROM items", [], |r| r.get::<_, i64>(0)).unwrap() == 0);
    let serve_guard_keys = dir.path().join("sg.txt");
    std::fs::write(&serve_guard_keys, std::fs::read_to_string(&keys).unwrap().replace(" annotator ", " client ")).unwrap();
    refuse(&["serve", s(&items), "--task", "score", "--db", s(&db), "--keys", s(&serve_guard_keys)], "role `client`: expected annotator, admin");
    // A database keeps its task, scale and items.
    let server = serve(&[s(&items), "--task", "score", "--db", s(&db), "--keys", s(&keys)]);
    drop(server);
    let other = responses(dir.path(), "other.parquet", 3, 2);
    refuse(&["serve", s(&items), "--task", "rank", "--db", s(&db), "--keys", s(&keys), "--listen", "127.0.0.1:0"], "holds a score task, not rank");
    refuse(&["serve", s(&items), "--task", "score", "--scale", "1-5", "--db", s(&db), "--keys", s(&keys), "--listen", "127.0.0.1:0"], "--scale 1-7, not 1-5");
    refuse(&["serve", s(&other), "--task", "score", "--db", s(&db), "--keys", s(&keys), "--listen", "127.0.0.1:0"], "holds other items");
    let again = serve(&["--task", "score", "--db", s(&db), "--keys", s(&keys)]);
    drop(again); // without ITEMS it continues the database's
    let out = dir.path().join("out.parquet");
    refuse(&["export", "--db", s(&db), "-o", s(&out)], "no item has 1 answers or more yet");
    refuse(&["export", "--db", s(&dir.path().join("none.sqlite")), "-o", s(&out)], "no such annotation database");
    refuse(&["export", "--db", s(&db), "-o", s(&out), "--listwise"], "--listwise is for rank tasks");
    assert!(!out.exists(), "no half-written output");
    refuse(&["stats", "--db", s(&dir.path().join("none.sqlite"))], "no such annotation database");
    refuse(&["keys", "add", "--keys", s(&keys), "--name", "ana"], "a key named `ana` exists already");
}

// ---- the pages in headless Chromium: two annotators, the keyboard only ----

/// A signed-in browser on `server`.
fn browser_for(chromedriver: &ChromeDriver, profile: &Path, server: &Server, key: &str) -> Option<common::web::Driver> {
    let driver = chromedriver.browser(profile)?;
    driver.go(&server.url);
    driver.wait_for("the sign-in form shows", |s| s.contains("id=\"key\""));
    driver.type_into("#key", key);
    driver.press("\n");
    driver.wait_for("the work page shows after signing in", |s| s.contains("id=\"progress\""));
    Some(driver)
}

/// The item shown, once the page shows another than `before`.
fn item_after(driver: &common::web::Driver, before: Option<i64>) -> Option<i64> {
    let source = driver.wait_for("the next item or the end shows", |s| s.contains("id=\"done\"") || item_id(s).is_some_and(|id| Some(id) != before));
    item_id(&source)
}

fn item_id(source: &str) -> Option<i64> {
    let at = source.find("data-item-id=\"")? + "data-item-id=\"".len();
    source[at..].split('"').next()?.parse().ok()
}

#[test]
fn two_annotators_score_rank_and_label_with_the_keyboard_in_headless_chromium() {
    if !browser_installed("the annotate browser test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    let (ana, bo) = (add_key(&keys, "ana", "annotator"), add_key(&keys, "bo", "annotator"));
    let chromedriver = ChromeDriver::start();
    let (ana_profile, bo_profile) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // ---- score: ana types digits and Enter, takes one back with u; bo skips one with s ----
    let items = responses(dir.path(), "score.parquet", 3, 1);
    let db = dir.path().join("score.sqlite");
    let guide = dir.path().join("guide.md");
    std::fs::write(&guide, "Rate helpfulness, 1 worst.").unwrap();
    let server = serve(&[s(&items), "--task", "score", "--scale", "1-5", "--db", s(&db), "--keys", s(&keys), "--guidelines", s(&guide)]);
    let Some(a) = browser_for(&chromedriver, ana_profile.path(), &server, &ana) else { return };
    let Some(b) = browser_for(&chromedriver, bo_profile.path(), &server, &bo) else { return };
    let mut typed: HashMap<(String, i64), i64> = HashMap::new();
    let mut current = item_after(&a, None);
    let first = current.unwrap();
    a.press("2\n");
    current = item_after(&a, current);
    a.press("u"); // take back the 2: the first item again
    current = item_after(&a, current);
    assert_eq!(current, Some(first), "undo shows the item again");
    let mut step = 0;
    while let Some(id) = current {
        let score = 3 + step % 3;
        a.press(&format!("/fine\u{1b}{score}\n")); // a comment, Escape, the score, Enter
        typed.insert(("ana".into(), id), score);
        step += 1;
        current = item_after(&a, current);
    }
    assert_eq!(typed.len(), 3, "ana answered every item once");
    assert!(a.source().contains("3 answered"));
    let mut current = item_after(&b, None);
    b.press("s"); // bo skips his first item
    let skipped = current.unwrap();
    current = item_after(&b, current);
    while let Some(id) = current {
        assert_ne!(id, skipped, "a skipped item is not shown again");
        b.press("1\n");
        typed.insert(("bo".into(), id), 1);
        current = item_after(&b, current);
    }
    b.go(&server.at("/guidelines"));
    b.wait_for("the guidelines show", |s| s.contains("Rate helpfulness"));
    drop((a, b, server)); // one browser per profile at a time
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stored: HashMap<(String, i64), i64> = HashMap::new();
    let mut statement = conn.prepare("SELECT annotator, item, score, comment FROM decisions WHERE skipped = 0").unwrap();
    for row in statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, f64>(2)?, r.get::<_, Option<String>>(3)?))).unwrap() {
        let (who, item, score, comment) = row.unwrap();
        assert_eq!(comment.is_some(), who == "ana", "ana's comments are kept");
        stored.insert((who, item), score as i64);
    }
    assert_eq!(stored, typed, "the database holds what was typed");
    let scored = dir.path().join("scored.parquet");
    export(&db, &scored, &[]);
    assert_eq!(RecordReader::<ScoredRecord>::open(&scored).unwrap().read_all().unwrap().len(), 3);

    // ---- rank: letters best first (longest answer best), = ties, Backspace corrects ----
    let items = responses(dir.path(), "rank.parquet", 2, 3);
    let db = dir.path().join("rank.sqlite");
    let server = serve(&[s(&items), "--task", "rank", "--db", s(&db), "--keys", s(&keys)]);
    let mut expected_best: HashSet<String> = HashSet::new();
    for (key, profile) in [(&ana, &ana_profile), (&bo, &bo_profile)] {
        let Some(driver) = browser_for(&chromedriver, profile.path(), &server, key) else { return };
        let mut current = item_after(&driver, None);
        while current.is_some() {
            let shown = driver.script("return Array.from(document.querySelectorAll('.response')).map(e => [e.id.slice(9), e.querySelector('.text').textContent])");
            let mut shown: Vec<(String, String)> = shown.as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string())).collect();
            shown.sort_by_key(|r| std::cmp::Reverse(r.1.len()));
            expected_best.insert(shown[0].1.clone());
            let letters: Vec<String> = shown.iter().map(|p| p.0.to_lowercase()).collect();
            // A slip corrected with Backspace, then the two shorter answers tied.
            driver.press(&format!("{}{}\u{8}{}={}\n", letters[0], letters[2], letters[1], letters[2]));
            current = item_after(&driver, current);
        }
    }
    drop(server);
    let prefs = dir.path().join("prefs.parquet");
    export(&db, &prefs, &[]);
    let pairs = RecordReader::<PreferenceRecord>::open(&prefs).unwrap().read_all().unwrap();
    assert_eq!(pairs.len(), 4, "per prompt: the best over each of the two tied");
    assert!(pairs.iter().all(|p| expected_best.contains(&p.chosen) && p.margin == Some(1.0)), "{pairs:?}");

    // ---- label: digits tick labels, Enter submits ----
    let items = moderation_texts(dir.path(), 2);
    let db = dir.path().join("label.sqlite");
    let server = serve(&[s(&items), "--task", "label", "--labels", CATEGORIES, "--db", s(&db), "--keys", s(&keys)]);
    let mut suggested_of: HashMap<String, Vec<bool>> = HashMap::new();
    for (key, profile, digit) in [(&ana, &ana_profile, "3"), (&bo, &bo_profile, "")] {
        let Some(driver) = browser_for(&chromedriver, profile.path(), &server, key) else { return };
        let mut current = item_after(&driver, None);
        while current.is_some() {
            let text = driver.script("return document.getElementById('text').textContent").as_str().unwrap().to_string();
            let ticked = driver.script("return Array.from(document.querySelectorAll('input[name=labels]')).map(e => e.checked)");
            suggested_of.insert(text, ticked.as_array().unwrap().iter().map(|t| t.as_bool().unwrap()).collect());
            driver.press(&format!("{digit}\n")); // ana toggles label 3 (violence)
            current = item_after(&driver, current);
        }
    }
    drop(server);
    let labeled = dir.path().join("labeled.parquet");
    export(&db, &labeled, &[]);
    let categories: Vec<&str> = CATEGORIES.split(',').collect();
    for row in RecordReader::<LabeledTextRecord>::open(&labeled).unwrap().read_all().unwrap() {
        let suggested = &suggested_of[&row.text];
        // bo kept the suggestions; ana flipped violence: at least half of two keeps a label either way.
        let expected: Vec<String> = categories.iter().enumerate().filter(|(i, c)| suggested[*i] || *c == &"violence").map(|(_, c)| c.to_string()).collect();
        assert_eq!(row.labels, expected, "{}", row.text);
    }
    eprintln!("browser: two annotators scored, ranked and labeled with the keyboard in headless Chromium");
}

// ---- under load, through a SIGKILL ----

/// What the scripted annotators were told was stored: (annotator, item) → score, or a skip.
type Acknowledged = Arc<Mutex<HashMap<(String, i64), Option<f64>>>>;

/// 32 annotators answer as fast as they can for `LATHE_ANNOTATE_LOAD_SECONDS` (default 8;
/// the README's figures are from 60), the server is SIGKILLed halfway and restarted on the
/// same database: no HTTP error, every acknowledged answer stored, no item shown twice to
/// one annotator, and the database sound.
#[test]
fn thirty_two_annotators_under_load_lose_nothing_to_sigkill() {
    let seconds: f64 = std::env::var("LATHE_ANNOTATE_LOAD_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(8.0);
    let clients = 32;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    let annotators: Vec<(String, String)> = (0..clients).map(|i| (format!("a{i:02}"), add_key(&keys, &format!("a{i:02}"), "annotator"))).collect();
    // Enough items that nobody runs out: 800-900 decisions a second were seen here.
    let items = responses(dir.path(), "many.parquet", (seconds * 500.0).max(1000.0) as usize, 2);
    let db = dir.path().join("load.sqlite");
    let args = [s(&items), "--task", "score", "--db", s(&db), "--keys", s(&keys), "--overlap", "2"];
    let mut server = serve(&args);
    let url = Arc::new(RwLock::new(server.url.clone()));
    let acknowledged: Acknowledged = Arc::default();
    let (errors, requests, stop) = (Arc::new(Mutex::new(Vec::<String>::new())), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let workers: Vec<_> = annotators
        .iter()
        .enumerate()
        .map(|(i, (name, key))| {
            let (name, auth) = (name.clone(), format!("Bearer {key}"));
            let (url, acknowledged, errors, requests, stop, latencies) = (url.clone(), acknowledged.clone(), errors.clone(), requests.clone(), stop.clone(), latencies.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut decided: HashSet<i64> = HashSet::new();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let base = url.read().unwrap().clone();
                    let started = Instant::now();
                    let Ok(mut got) = agent.get(&format!("{base}/api/next")).header("Authorization", &auth).call() else {
                        std::thread::sleep(Duration::from_millis(20)); // the server is down
                        continue;
                    };
                    requests.fetch_add(1, Ordering::Relaxed);
                    if got.status() == 204 {
                        break;
                    }
                    if got.status() != 200 {
                        errors.lock().unwrap().push(format!("GET /api/next: {}", got.status()));
                        continue;
                    }
                    let Ok(next) = got.body_mut().read_json::<Value>() else { continue };
                    let id = next["item"]["id"].as_i64().unwrap();
                    if decided.contains(&id) {
                        errors.lock().unwrap().push(format!("{name} was shown item {id} again"));
                    }
                    n += 1;
                    let (body, stored) = if (n + i as u64) % 10 == 0 { (json!({"skip": true}), None) } else { let score = ((id + i as i64) % 7 + 1) as f64; (json!({"score": score}), Some(score)) };
                    let Ok(done) = agent.post(&format!("{base}/api/items/{id}/answer")).header("Authorization", &auth).send_json(&body) else { continue };
                    requests.fetch_add(1, Ordering::Relaxed);
                    match done.status().as_u16() {
                        200 => {
                            latencies.lock().unwrap().push(started.elapsed().as_secs_f64());
                            decided.insert(id);
                            acknowledged.lock().unwrap().insert((name.clone(), id), stored);
                        }
                        other => errors.lock().unwrap().push(format!("POST answer: {other}")),
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds / 2.0));
    let before_kill = acknowledged.lock().unwrap().len();
    server.child.kill().unwrap(); // SIGKILL, mid-request for some of the 32
    server.child.wait().unwrap();
    let down = Instant::now();
    server = serve(&args);
    *url.write().unwrap() = server.url.clone();
    let restart = down.elapsed();
    std::thread::sleep(Duration::from_secs_f64(seconds / 2.0));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64() - restart.as_secs_f64();
    drop(server);

    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{} errors, e.g. {:?}", errors.len(), &errors[..errors.len().min(5)]);
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(before_kill > 50 && acknowledged.len() > before_kill, "too few answers: {before_kill} before the kill, {} in all", acknowledged.len());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let mut statement = conn.prepare("SELECT annotator, item, skipped, score FROM decisions").unwrap();
    let stored: HashMap<(String, i64), Option<f64>> = statement
        .query_map([], |r| Ok(((r.get::<_, String>(0)?, r.get::<_, i64>(1)?), if r.get::<_, bool>(2)? { None } else { r.get::<_, Option<f64>>(3)? })))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let lost: Vec<_> = acknowledged.iter().filter(|(k, v)| stored.get(*k) != Some(*v)).collect();
    assert!(lost.is_empty(), "{} acknowledged answers lost or changed, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    let per_item = conn.query_row("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM decisions WHERE skipped = 0 GROUP BY item)", [], |r| r.get::<_, i64>(0)).unwrap();
    assert!(per_item <= 2, "an item answered by {per_item} annotators; the overlap is 2");
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] * 1000.0;
    eprintln!(
        "load: {clients} annotators, {seconds} s, SIGKILL at {:.1} s (restart {:.2} s): {} acknowledged decisions ({:.0}/s), {} requests, 0 errors, 0 lost, integrity ok; next+answer p50 {:.1} ms, p99 {:.1} ms",
        seconds / 2.0,
        restart.as_secs_f64(),
        acknowledged.len(),
        acknowledged.len() as f64 / elapsed,
        requests.load(Ordering::Relaxed),
        at(0.5),
        at(0.99)
    );
}
