//! Helpers for the tests of lathe's web servers (serve-guard, annotate): a server on a free
//! loopback port, raw HTTP calls with any headers, and headless Chromium over WebDriver.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A server on a free loopback port, killed when dropped. It must print
/// `listening on http://ADDR` on standard error.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Start `command` (a binary and its subcommand, e.g. `serve-guard serve`) with `args`,
    /// on `--listen 127.0.0.1:0`.
    pub fn start(mut command: Command, args: &[&str]) -> Server {
        let mut child = command
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--threads", "2", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.split("listening on ").nth(1) {
                        let _ = tx.send(Ok(url.trim().to_string()));
                        sent = true;
                        continue;
                    }
                }
                eprintln!("[server] {line}");
                if !sent {
                    let _ = tx.send(Err(line));
                }
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(url)) => return Server { child, url },
                Ok(Err(_)) => continue,
                Err(_) => {
                    let _ = child.kill();
                    panic!("the server did not start: {:?}", child.wait());
                }
            }
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `HOST:PORT`.
    pub fn address(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// An answer to [`raw`]: status, headers (lower-case names; repeated ones joined by `\n`), body.
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::String(self.body.clone()))
    }

    /// The `NAME=VALUE` of a `Set-Cookie` header.
    pub fn cookie(&self) -> Option<String> {
        self.headers.get("set-cookie").and_then(|c| c.split(';').next()).map(str::to_string)
    }
}

/// A request with exactly these headers, redirects not followed.
pub fn raw(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).timeout_global(Some(Duration::from_secs(60))).build().into();
    let mut request = http_request(method, url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(body.unwrap_or_default().to_vec()).unwrap();
    let mut response = agent.run(request).unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let mut found: HashMap<String, String> = HashMap::new();
    for (name, value) in response.headers() {
        let value = value.to_str().unwrap_or_default().to_string();
        found.entry(name.as_str().to_string()).and_modify(|v| *v = format!("{v}\n{value}")).or_insert(value);
    }
    Answer { status: response.status().as_u16(), headers: found, body: response.body_mut().read_to_string().unwrap_or_default() }
}

fn http_request(method: &str, url: &str) -> ureq::http::request::Builder {
    ureq::http::Request::builder().method(method).uri(url)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One headless Chromium session over WebDriver (chromedriver), ended when dropped.
pub struct Driver {
    url: String,
    session: String,
    _chromedriver: std::sync::Arc<KillOnDrop>,
}

/// Chromium and ChromeDriver, if installed (`make test` installs them with scripts/install-browser.sh).
pub fn browser_installed(what: &str) -> bool {
    let found = Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists();
    if !found {
        eprintln!("SKIPPED {what}: /usr/bin/chromium or /usr/bin/chromedriver is missing (make test installs them with scripts/install-browser.sh)");
    }
    found
}

/// A running chromedriver, shared by the browser sessions of one test.
pub struct ChromeDriver {
    url: String,
    process: std::sync::Arc<KillOnDrop>,
}

impl ChromeDriver {
    pub fn start() -> ChromeDriver {
        let port = free_port();
        let process = KillOnDrop(Command::new("/usr/bin/chromedriver").arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while agent().get(&format!("{url}/status")).call().is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        ChromeDriver { url, process: std::sync::Arc::new(process) }
    }

    /// A new browser with its own profile (cookies); `None` (with a note) if Chromium will not start.
    pub fn browser(&self, profile: &Path) -> Option<Driver> {
        let args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}});
        let mut response = agent().post(&format!("{}/session", self.url)).send_json(&capabilities).unwrap();
        let created: Value = response.body_mut().read_json().unwrap();
        let Some(session) = created["value"]["sessionId"].as_str() else {
            eprintln!("SKIPPED the browser check: chromium would not start: {created}");
            return None;
        };
        Some(Driver { url: self.url.clone(), session: session.to_string(), _chromedriver: self.process.clone() })
    }
}

impl Driver {
    pub fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.url, self.session);
        let agent = agent();
        let mut r = match method {
            "GET" => agent.get(&url).call(),
            "DELETE" => agent.delete(&url).call(),
            _ => agent.post(&url).send_json(&body),
        }
        .unwrap();
        let value: Value = r.body_mut().read_json().unwrap();
        value["value"].clone()
    }

    pub fn go(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    pub fn find(&self, css: &str) -> String {
        let found = self.cmd("POST", "/element", json!({"using": "css selector", "value": css}));
        found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap_or_else(|| panic!("no element {css}: {found}")).to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.cmd("POST", &format!("/element/{element}/value"), json!({"text": text}));
    }

    pub fn click(&self, css: &str) {
        let element = self.find(css);
        self.cmd("POST", &format!("/element/{element}/click"), json!({}));
    }

    /// Keys pressed on the page itself (WebDriver actions), as a person types them; `\n` is
    /// Enter, `\u{8}` Backspace and `\u{1b}` Escape.
    pub fn press(&self, keys: &str) {
        let mut actions = Vec::new();
        for key in keys.chars() {
            let value = match key {
                '\n' => "\u{E007}".to_string(),
                '\u{8}' => "\u{E003}".to_string(),
                '\u{1b}' => "\u{E00C}".to_string(),
                other => other.to_string(),
            };
            actions.push(json!({"type": "keyDown", "value": value}));
            actions.push(json!({"type": "keyUp", "value": value}));
        }
        self.cmd("POST", "/actions", json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}));
        self.cmd("DELETE", "/actions", Value::Null);
    }

    pub fn source(&self) -> String {
        self.cmd("GET", "/source", Value::Null).as_str().unwrap_or_default().to_string()
    }

    /// Run a script in the page and return its value.
    pub fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    /// The page source once `ready` holds for it (navigation after a click takes a moment).
    pub fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let source = self.source();
            if ready(&source) {
                return source;
            }
            assert!(started.elapsed() < Duration::from_secs(15), "{what}: {source}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = agent().delete(&format!("{}/session/{}", self.url, self.session)).call();
    }
}
