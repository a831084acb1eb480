//! Progress on standard error: an indicatif bar on a terminal, a plain line every few seconds
//! otherwise (CI logs), nothing with `--quiet`.

use std::fmt::Display;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);
static BARS: OnceLock<MultiProgress> = OnceLock::new();

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::SeqCst);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::SeqCst)
}

fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn bars() -> &'static MultiProgress {
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// A status line for people (never for scripts: those read files and exit codes).
pub fn log(message: impl Display) {
    if quiet() {
        return;
    }
    if on_terminal() {
        let _ = bars().println(message.to_string());
    } else {
        line(message);
    }
}

/// One line on standard error. A closed or full stderr (a log reader that went away) loses
/// the line instead of panicking, as `eprintln!` would, in a long-running stage or server.
pub fn line(message: impl Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

/// Something the user must know even with `--quiet`: data changed or left out, a model
/// altered, a risky setting. Never silent.
pub fn warn(message: impl Display) {
    if on_terminal() && !quiet() {
        let _ = bars().println(message.to_string());
    } else {
        line(message);
    }
}

/// Remove bars from the screen so an error line stands alone.
pub fn clear() {
    if let Some(bars) = BARS.get() {
        let _ = bars.clear();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    Bytes,
    Items(&'static str),
}

pub struct Progress {
    bar: ProgressBar,
    label: String,
    unit: Unit,
    plain: bool,
    last_plain: Mutex<Instant>,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: Option<u64>, unit: Unit) -> Self {
        let label = label.into();
        let plain = !quiet() && !on_terminal();
        let bar = if quiet() || plain {
            ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden())
        } else {
            let bar = bars().add(ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr()));
            bar.set_style(style(unit, total.is_some()));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        };
        bar.set_prefix(label.clone());
        Progress { bar, label, unit, plain, last_plain: Mutex::new(Instant::now()) }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.maybe_plain_line();
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
        self.maybe_plain_line();
    }

    pub fn set_message(&self, message: impl Into<String>) {
        self.bar.set_message(message.into());
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    pub fn elapsed(&self) -> Duration {
        self.bar.elapsed()
    }

    /// Units per second since the start.
    pub fn rate(&self) -> f64 {
        self.position() as f64 / self.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if self.plain {
            line(self.plain_line());
        }
    }

    fn maybe_plain_line(&self) {
        if !self.plain {
            return;
        }
        let mut last = self.last_plain.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PLAIN_EVERY {
            *last = Instant::now();
            line(self.plain_line());
        }
    }

    fn plain_line(&self) -> String {
        let position = self.position();
        let mut line = format!("{}: {}", self.label, self.amount(position));
        if let Some(total) = self.bar.length().filter(|&t| t > 0) {
            line += &format!(" / {} ({:.0}%)", self.amount(total), 100.0 * position as f64 / total as f64);
        }
        line += &format!(", {}/s", self.amount_f(self.rate()));
        if let Some(eta) = self.bar.length().filter(|&t| t > position).map(|_| self.bar.eta()) {
            line += &format!(", eta {}", HumanDuration(eta));
        }
        let message = self.bar.message();
        if !message.is_empty() {
            line += &format!(", {message}");
        }
        line
    }

    fn amount(&self, n: u64) -> String {
        self.amount_f(n as f64)
    }

    fn amount_f(&self, n: f64) -> String {
        match self.unit {
            Unit::Bytes => format!("{:.1} MB", n / 1e6),
            Unit::Items(name) => format!("{n:.0} {name}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

fn style(unit: Unit, bounded: bool) -> ProgressStyle {
    let template = match (unit, bounded) {
        (Unit::Bytes, true) => {
            "{prefix} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta} {msg}"
        }
        (Unit::Bytes, false) => "{spinner} {prefix} {decimal_bytes} {decimal_bytes_per_sec} {msg}",
        (Unit::Items(_), true) => "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        (Unit::Items(_), false) => "{spinner} {prefix} {pos} {per_sec} {msg}",
    };
    ProgressStyle::with_template(template)
        .expect("progress templates are constant and valid")
        .progress_chars("=> ")
}

/// Peak resident memory of this process in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
