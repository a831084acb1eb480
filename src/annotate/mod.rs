//! `annotate`: a web workbench where a team scores, ranks and labels model outputs, several
//! people at once, each item seen by `--overlap` of them for agreement, and exports SPEC
//! Parquet the trainers read directly.
//!
//! - [`items`]: what is judged, read from the ITEMS files into the database once.
//! - [`answer`]: answers and their checks (scale, every letter once, known labels).
//! - [`store`]: the SQLite database (WAL, synced before an answer is acknowledged).
//! - [`board`]: who gets which item (overlap, never twice, leases, skip, undo).
//! - [`report`]: progress, agreement and the items disagreed on most.
//! - [`export`]: scored / preferences / labeled text.
//! - `http` / `pages`: the JSON API and the server-rendered pages with keyboard shortcuts.
//!
//! Keys (annotator and admin roles), sessions, CSRF and Origin checks, sign-in throttling and
//! the connection limits are the shared web layer's ([`crate::web`]), as in serve-guard.

pub mod answer;
pub mod board;
pub mod export;
mod http;
pub mod items;
mod pages;
pub mod report;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, bad_input, usage};
use crate::human::scoring::Scale;
use crate::web::Gate;
use crate::web::keys::{KeyFile, Role};
use crate::web::listen::ConnectionLimits;
use board::Board;
use store::{Settings, Store};

/// The roles an annotate keys file holds.
pub const ROLES: &[Role] = &[Role::Annotator, Role::Admin];

/// The pages' session cookie (each server its own: browsers share cookies across ports).
const SESSION_COOKIE: &str = "annotate_session";

/// What people do with the items.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Rate each response on the scale.
    Score,
    /// Order the responses of each prompt, best first (ties allowed).
    Rank,
    /// Tick the categories that apply to each text.
    Label,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Score => "score",
            Task::Rank => "rank",
            Task::Label => "label",
        }
    }

    /// The field of an answer.
    pub fn answer_field(self) -> &'static str {
        match self {
            Task::Score => "score",
            Task::Rank => "ranking",
            Task::Label => "labels",
        }
    }
}

/// Everything `annotate serve` is told.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Empty: continue the database's items.
    pub items: Vec<PathBuf>,
    pub task: Task,
    pub db: PathBuf,
    pub keys: PathBuf,
    pub overlap: usize,
    pub scale: Scale,
    pub labels: Vec<String>,
    pub guidelines: Option<PathBuf>,
    pub listen: String,
    /// How long an item shown stays held for its annotator.
    pub lease: Duration,
    pub max_body_bytes: usize,
    pub connections: ConnectionLimits,
    pub session_lifetime: Duration,
    pub seed: u64,
    pub quiet: bool,
}

pub(crate) struct App {
    pub board: Mutex<Board>,
    pub gate: Gate,
    pub guidelines: Option<String>,
    pub max_body_bytes: usize,
    pub quiet: bool,
}

/// Check everything, prepare the database and serve until the process is stopped.
pub fn serve(options: &ServeOptions) -> Result<()> {
    if options.overlap == 0 {
        return Err(usage("--overlap must be at least 1"));
    }
    let address: SocketAddr = options.listen.parse().map_err(|_| usage(format!("--listen {}: expected HOST:PORT, e.g. 127.0.0.1:8090", options.listen)))?;
    let keys = KeyFile::open(&options.keys, ROLES, "annotate")?;
    let guidelines = match &options.guidelines {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read the guidelines: {e}")))?),
        None => None,
    };
    let items = if options.items.is_empty() { None } else { Some(items::read(options.task, &options.items)?) };
    let labels = match (&items, options.task) {
        (Some(items), Task::Label) => items::categories(&options.labels, items, &options.items[0])?,
        _ => options.labels.clone(),
    };
    let mut store = Store::open(&options.db)?;
    let settings = Settings { task: options.task, scale: options.scale.to_string(), labels, overlap: options.overlap };
    let settings = store.prepare(&settings, items.as_deref())?;
    let board = Board::open(store, settings, options.lease.as_secs_f64(), options.seed)?;
    let app = Arc::new(App {
        board: Mutex::new(board),
        gate: Gate::new(Some(keys), SESSION_COOKIE, options.session_lifetime),
        guidelines,
        max_body_bytes: options.max_body_bytes,
        quiet: options.quiet,
    });

    let banner = (!options.quiet).then(|| {
        let board = app.board.lock().unwrap_or_else(|p| p.into_inner());
        format!(
            "annotate: {} task · {} items · overlap {} · {} complete · database {}",
            board.task().name(),
            board.len(),
            board.settings.overlap,
            board.complete(),
            options.db.display()
        )
    });
    crate::web::listen::run("annotate", address, options.connections, http::router(app), banner)
}

/// `annotate stats`: the report of a database.
pub fn stats(db: &std::path::Path) -> Result<report::Report> {
    let store = Store::open_existing(db)?;
    let settings = store.settings()?.unwrap_or_else(|| unreachable!("open_existing checks the settings"));
    Ok(report::report(&settings, &store.items()?, &store.decisions()?))
}
