//! The command-line layer every binary shares: common flags, `--config` recipes merged under
//! command-line flags, thread set-up, signal handling and the one-line error report.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clap::parser::ValueSource;
use clap::error::ErrorKind;
use clap::{ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use serde::Serialize;

use crate::error::{Error, Result, bad_input, exit};
use crate::{output, progress};

/// Flags every stage accepts.
#[derive(clap::Args, Serialize, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Read flags from a TOML recipe; flags given on the command line win.
    /// Keys are flag names (`vocab_size = 4096`); tables group them for people: a key `k` in
    /// `[t]` sets `--t-k` if that flag exists, else `--k`. Unknown keys are refused.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Seed for every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars or log lines; errors are still printed.
    #[arg(long, short)]
    pub quiet: bool,
    /// The base model of any LoRA adapter folder given as a model, instead of the
    /// `base_model_name_or_path` in its adapter_config.json.
    #[arg(long, value_name = "MODEL")]
    pub base: Option<String>,
}

/// Parse the command line of `T`, merging the `--config` recipe under the flags given.
/// Usage errors exit 2 (clap's convention and ours); `--help`/`--version` exit 0.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match parse_from::<T>(argv) {
        Ok(parsed) => parsed,
        Err(ParseError::Clap(e)) if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(ParseError::Clap(e)) => {
            let binary = binary_name();
            report(&binary, &Error::Input(format!("{} (see {binary} --help)", clap_line(&e))));
            std::process::exit(exit::BAD_INPUT as i32)
        }
        Err(ParseError::Lathe(e)) => {
            report(&binary_name(), &e);
            std::process::exit(e.exit_code() as i32)
        }
    }
}

/// A clap error as one line: its message and tips, without the usage block.
pub fn clap_line(error: &clap::Error) -> String {
    let text = error.to_string();
    let kept: Vec<&str> = text
        .split("\n\n")
        .filter(|p| !p.starts_with("Usage:") && !p.starts_with("For more information"))
        .flat_map(str::lines)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    kept.join(" ").trim_start_matches("error: ").to_string()
}

pub enum ParseError {
    Clap(clap::Error),
    Lathe(Error),
}

impl std::fmt::Debug for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Clap(e) => write!(f, "{e}"),
            ParseError::Lathe(e) => write!(f, "{e}"),
        }
    }
}

/// The testable core of [`parse`].
pub fn parse_from<T: CommandFactory + FromArgMatches>(argv: Vec<OsString>) -> Result<T, ParseError> {
    // A flag given twice takes its last value, so scripts can append overrides.
    let command = T::command().args_override_self(true);
    // A lenient first pass (nothing required) finds the subcommand, `--config`, and which
    // flags the user typed, even when the recipe is what supplies a required argument.
    let lenient = match relax_required(command.clone()).try_get_matches_from(&argv) {
        Ok(matches) => matches,
        // Help, version and real usage errors come from the strict command, with its markers.
        Err(lenient_error) => {
            return Err(ParseError::Clap(command.try_get_matches_from(&argv).err().unwrap_or(lenient_error)));
        }
    };
    let (leaf_command, leaf_matches) = leaf(&command, &lenient);
    let config_path = leaf_matches
        .try_get_one::<PathBuf>("config")
        .ok()
        .flatten()
        .cloned();
    let (argv, recipe) = match config_path {
        Some(path) => {
            let mut injected = recipe_arguments(&path, leaf_command, leaf_matches).map_err(ParseError::Lathe)?;
            let recipe = RecipeFlags { path, keys: std::mem::take(&mut injected.keys) };
            (splice(argv, injected), Some(recipe))
        }
        None => (argv, None),
    };
    let matches = command.try_get_matches_from(&argv).map_err(|e| match recipe.as_ref().and_then(|r| r.value_error(&e)) {
        Some(refused) => ParseError::Lathe(refused),
        None => ParseError::Clap(e),
    })?;
    *RECIPE.lock().unwrap_or_else(|e| e.into_inner()) = recipe;
    T::from_arg_matches(&matches).map_err(ParseError::Clap)
}

/// The flags a recipe set: (long name, the recipe's key).
struct RecipeFlags {
    path: PathBuf,
    keys: Vec<(String, String)>,
}

impl RecipeFlags {
    /// A value a flag cannot take, when the recipe supplied it: the recipe's error, with its key.
    fn value_error(&self, error: &clap::Error) -> Option<Error> {
        if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
            return None;
        }
        let Some(clap::error::ContextValue::String(arg)) = error.get(clap::error::ContextKind::InvalidArg) else { return None };
        let (_, key) = self.keys.iter().find(|(long, _)| arg.split([' ', '=']).next() == Some(&format!("--{long}")))?;
        Some(bad_input(&self.path, format!("key `{key}`: {}", clap_line(error))))
    }

    /// ` (set by `key` in r.toml)` when `message` refuses a flag whose value came from the recipe.
    fn note(&self, message: &str) -> Option<String> {
        let named = |long: &str| {
            let needle = format!("--{long}");
            message.match_indices(&needle).any(|(at, _)| {
                !message[at + needle.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        };
        let (_, key) = self.keys.iter().find(|(long, _)| named(long))?;
        Some(format!(" (set by `{key}` in {})", self.path.display()))
    }
}

/// The recipe of this process's command line, so a later refusal of a value it set can say so.
static RECIPE: std::sync::Mutex<Option<RecipeFlags>> = std::sync::Mutex::new(None);

fn relax_required(command: Command) -> Command {
    let command = command
        .mut_args(|a| a.required(false))
        .subcommand_required(false)
        .arg_required_else_help(false);
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names
        .into_iter()
        .fold(command, |c, name| c.mut_subcommand(name, relax_required))
}

fn leaf<'a>(command: &'a Command, matches: &'a ArgMatches) -> (&'a Command, &'a ArgMatches) {
    match matches.subcommand() {
        Some((name, sub_matches)) => match command.find_subcommand(name) {
            Some(sub) => leaf(sub, sub_matches),
            None => (command, matches),
        },
        None => (command, matches),
    }
}

/// Arguments a recipe contributes: flags first, then positional values; and which of its keys
/// set which flag.
struct Injected {
    flags: Vec<OsString>,
    positionals: Vec<OsString>,
    keys: Vec<(String, String)>,
}

fn recipe_arguments(path: &Path, command: &Command, matches: &ArgMatches) -> Result<Injected> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(path, format!("cannot read recipe: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad_input(path, toml_error_line(&text, &e)))?;
    let mut entries = Vec::new();
    flatten_table("", &table, &mut entries);

    let mut injected = Injected { flags: Vec::new(), positionals: Vec::new(), keys: Vec::new() };
    for (key, value) in entries {
        let find = |name: &str| {
            let id = name.replace('-', "_");
            command.get_arguments().find(|a| a.get_id().as_str() == id && id != "config")
        };
        let bare = key.rsplit('.').next().unwrap_or(&key);
        let Some(arg) = find(&key.replace('.', "_")).or_else(|| find(bare)) else {
            return Err(bad_input(path, format!("unknown key `{key}` (known keys: {})", known_keys(command))));
        };
        let id = arg.get_id().as_str().to_string();
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
        ) {
            continue; // the command line wins
        }
        let values = toml_values(&value).ok_or_else(|| {
            bad_input(path, format!("key `{key}`: expected a string, number, boolean or array of them"))
        })?;
        if arg.is_positional() {
            injected.positionals.extend(values.into_iter().map(OsString::from));
            continue;
        }
        let long = arg.get_long().unwrap_or(arg.get_id().as_str()).to_string();
        injected.keys.push((long.clone(), key.clone()));
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => match value.as_bool() {
                Some(flag_set) => {
                    let wants_flag = flag_set == matches!(arg.get_action(), ArgAction::SetTrue);
                    if wants_flag {
                        injected.flags.push(format!("--{long}").into());
                    }
                }
                None => return Err(bad_input(path, format!("key `{key}`: expected true or false"))),
            },
            _ => {
                for v in values {
                    injected.flags.push(format!("--{long}={v}").into());
                }
            }
        }
    }
    Ok(injected)
}

fn flatten_table(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (key, value) in table {
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(inner) => flatten_table(&name, inner, out),
            other => out.push((name, other.clone())),
        }
    }
}

fn toml_values(value: &toml::Value) -> Option<Vec<String>> {
    match value {
        toml::Value::String(s) => Some(vec![s.clone()]),
        toml::Value::Integer(i) => Some(vec![i.to_string()]),
        toml::Value::Float(f) => Some(vec![f.to_string()]),
        toml::Value::Boolean(b) => Some(vec![b.to_string()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| toml_values(item).filter(|v| v.len() == 1).map(|mut v| v.remove(0)))
            .collect(),
        _ => None,
    }
}

fn known_keys(command: &Command) -> String {
    command
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| !matches!(*id, "config" | "help" | "version"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line for a TOML syntax error: `line L, column C: message`.
pub fn toml_error_line(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", error.message())
        }
        None => error.message().to_string(),
    }
}

/// Flags go before any `--`; positional values from the recipe go after one.
fn splice(mut argv: Vec<OsString>, injected: Injected) -> Vec<OsString> {
    let separator = argv.iter().position(|a| a == "--");
    match separator {
        Some(at) => {
            let tail = argv.split_off(at);
            argv.extend(injected.flags);
            argv.extend(tail);
            argv.extend(injected.positionals);
        }
        None => {
            argv.extend(injected.flags);
            if !injected.positionals.is_empty() {
                argv.push("--".into());
                argv.extend(injected.positionals);
            }
        }
    }
    argv
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static GRACEFUL: AtomicBool = AtomicBool::new(false);
static SIGNALS_SEEN: AtomicUsize = AtomicUsize::new(0);

/// Set up threads, progress mode and signal handling for a stage. Call once, first thing.
pub fn init(common: &CommonArgs) {
    progress::set_quiet(common.quiet);
    if let Some(base) = &common.base {
        crate::model::folder::set_adapter_base(base.clone());
    }
    if let Some(threads) = common.threads.filter(|&t| t > 0) {
        // candle's matmul reads RAYON_NUM_THREADS; rayon's pool is set directly.
        // SAFETY: called at start-up, before any thread of ours reads the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    // Stage bodies run on this pool's workers (see `run`): big stacks, because candle's
    // backward pass walks the graph recursively.
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK_BYTES);
    if let Some(threads) = common.threads.filter(|&t| t > 0) {
        pool = pool.num_threads(threads);
    }
    let _ = pool.build_global();
    let threads = rayon::current_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Without it candle asks `num_cpus::get_physical()` on every matmul, which parses
        // /proc/cpuinfo each time: a third of the time of a decoding step.
        // SAFETY: start-up, before any thread of ours reads the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    tune_runtime(threads);
    let _ = ctrlc::set_handler(on_signal);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Runtime settings measured on the 2-core development machine (bench-tiny training step):
/// - candle runs elementwise ops on its own spinning thread pool, which competes with rayon's
///   (gemm, our fused kernels); running them inline on the calling thread was 7% faster.
/// - mimalloc returns freed memory to the OS after 10 ms, so every training step page-faulted
///   its large buffers back in; keeping it was another 11% (peak RSS unchanged in kind).
///
/// Values the user set in the environment win.
fn tune_runtime(threads: usize) {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && threads <= 4 {
        // SAFETY: start-up, before candle's pool is created and before our threads read it.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an allocator option is thread-safe in mimalloc.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Stages that save work on interruption (training) opt in; the rest stop at once.
pub fn set_graceful_interrupt(graceful: bool) {
    GRACEFUL.store(graceful, Ordering::SeqCst);
}

/// The signal handler's thread runs this for every SIGINT / SIGTERM. It must never panic (a
/// panic ends the thread and every later signal is ignored) and its lines must survive a
/// closed stderr; whatever happens, a stop that is due happens.
fn on_signal() {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let seen = SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst);
    let stop_now = !GRACEFUL.load(Ordering::SeqCst) || seen >= 1;
    let _ = std::panic::catch_unwind(|| {
        if stop_now {
            output::remove_pending();
            progress::line(format!("{}: interrupted", binary_name()));
        } else {
            progress::line(format!("{}: interrupt received, saving and stopping (press Ctrl-C again to stop at once)", binary_name()));
        }
    });
    if stop_now {
        std::process::exit(exit::INTERRUPTED as i32);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once a signal arrived; loops call it between units of work.
pub fn check_interrupt() -> Result<()> {
    if interrupted() { Err(Error::Interrupted) } else { Ok(()) }
}

const WORKER_STACK_BYTES: usize = 256 << 20;

/// What every binary's `main` does: set up from the common flags, run the body, exit.
pub fn start(common: &CommonArgs, body: impl FnOnce() -> Result<()> + Send) -> ExitCode {
    init(common);
    run(body)
}

/// Run a stage body and turn its result into the process exit code, printing one error line.
///
/// The body runs on a rayon worker: a parallel kernel started from a worker runs its first
/// piece itself and lets idle workers steal the rest, while one started from the main thread
/// must hand everything over and sleep. For the tiny ops of token-by-token decoding that
/// hand-over was most of the time (batch-1 generation, bench-tiny: 1,224 → 2,311 tokens/s).
pub fn run(body: impl FnOnce() -> Result<()> + Send) -> ExitCode {
    match rayon::scope(|_| body()) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            report(&binary_name(), &e);
            ExitCode::from(e.exit_code())
        }
    }
}

/// The one error line; a closed stderr loses it rather than panicking.
fn report(binary: &str, error: &Error) {
    progress::clear();
    let line = error.one_line();
    let recipe = RECIPE.lock().unwrap_or_else(|e| e.into_inner());
    let note = recipe.as_ref().filter(|_| matches!(error, Error::Input(_))).and_then(|r| r.note(&line)).unwrap_or_default();
    progress::line(format!("{binary}: error: {line}{note}"));
}

pub fn binary_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "lathe".into())
}

/// A recipe shipped with lathe (`redteam/default.toml`), found beside the installed binaries
/// rather than in the current folder: `$LATHE_RECIPES`, then `recipes/` or
/// `share/lathe/recipes/` in a folder above the executable, then the source tree it was built
/// from. `instead` is the flag that names another file.
pub fn installed_recipe(relative: &str, instead: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    let candidates = recipe_candidates(std::env::var_os("LATHE_RECIPES").map(PathBuf::from), exe.as_deref(), relative);
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        crate::error::usage(format!("recipes/{relative} was not found beside the installed lathe (looked in {}); pass {instead} or set LATHE_RECIPES", looked.join(", ")))
    })
}

fn recipe_candidates(from_env: Option<PathBuf>, exe: Option<&Path>, relative: &str) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = from_env.into_iter().map(|dir| dir.join(relative)).collect();
    for dir in exe.into_iter().flat_map(Path::ancestors).skip(1) {
        candidates.push(dir.join("recipes").join(relative));
        candidates.push(dir.join("share/lathe/recipes").join(relative));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes").join(relative));
    candidates
}

/// The resolved configuration of a stage, as recorded beside its outputs.
pub fn resolved_config<T: Serialize>(args: &T) -> Result<String> {
    Ok(toml::to_string(args)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Train(TrainArgs),
    }

    #[derive(clap::Args, Debug)]
    struct TrainArgs {
        #[arg(required = true)]
        inputs: Vec<String>,
        #[arg(long, required = true)]
        vocab_size: usize,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        model_hidden_size: Option<usize>,
        #[arg(long)]
        no_eos: bool,
        #[command(flatten)]
        common: CommonArgs,
    }

    fn parse_with(recipe: &str, args: &[&str]) -> Result<TrainArgs, ParseError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, recipe).unwrap();
        let mut argv: Vec<OsString> = vec!["t".into(), "train".into(), "--config".into(), path.into()];
        argv.extend(args.iter().map(OsString::from));
        parse_from::<Cli>(argv).map(|c| match c.command {
            Cmd::Train(t) => t,
        })
    }

    #[test]
    fn recipe_fills_flags_and_command_line_wins() {
        let recipe = "vocab_size = 512\nno_eos = true\n[model]\nhidden_size = 64\n[train]\nmin_frequency = 5\n";
        let t = parse_with(recipe, &["a.txt", "--min-frequency", "3"]).unwrap();
        assert_eq!(t.vocab_size, 512);
        assert_eq!(t.min_frequency, 3);
        assert_eq!(t.model_hidden_size, Some(64));
        assert!(t.no_eos);
        assert_eq!(t.inputs, vec!["a.txt"]);
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value_and_positionals_accumulate() {
        let argv: Vec<OsString> = ["t", "train", "a", "b", "--vocab-size", "8", "--vocab-size", "9"].iter().map(OsString::from).collect();
        let Cmd::Train(t) = parse_from::<Cli>(argv).unwrap().command;
        assert_eq!(t.vocab_size, 9);
        assert_eq!(t.inputs, vec!["a", "b"]);
    }

    #[test]
    fn recipe_can_supply_positionals() {
        let t = parse_with("vocab_size = 8\ninputs = [\"x\", \"y\"]\n", &[]).unwrap();
        assert_eq!(t.inputs, vec!["x", "y"]);
    }

    #[test]
    fn unknown_recipe_key_is_bad_input() {
        match parse_with("vocab_size = 8\nvocab_sise = 9\n", &["a"]) {
            Err(ParseError::Lathe(e)) => {
                assert_eq!(e.exit_code(), 2);
                assert!(e.to_string().contains("unknown key `vocab_sise`"), "{e}");
            }
            other => panic!("expected an unknown-key error, got {other:?}"),
        }
    }

    #[test]
    fn shipped_recipes_are_found_above_the_executable_not_in_the_current_folder() {
        let dir = tempfile::tempdir().unwrap();
        let installed = dir.path().join("opt/lathe");
        std::fs::create_dir_all(installed.join("share/lathe/recipes/redteam")).unwrap();
        std::fs::create_dir_all(installed.join("bin")).unwrap();
        let candidates = recipe_candidates(None, Some(&installed.join("bin/redteam")), "redteam/default.toml");
        let shared = candidates.iter().position(|c| *c == installed.join("share/lathe/recipes/redteam/default.toml")).unwrap();
        assert_eq!(candidates[shared - 1], installed.join("recipes/redteam/default.toml"));
        assert!(candidates.last().unwrap().starts_with(env!("CARGO_MANIFEST_DIR")), "the source tree comes last");
        assert!(candidates.iter().all(|c| c.is_absolute()), "never relative to the current folder: {candidates:?}");
        let from_env = recipe_candidates(Some(dir.path().into()), None, "x.toml");
        assert_eq!(from_env[0], dir.path().join("x.toml"));
    }

    #[test]
    fn a_bad_recipe_value_names_the_recipe_and_its_key() {
        match parse_with("vocab_size = \"many\"\n", &["a"]) {
            Err(ParseError::Lathe(e)) => {
                let line = e.one_line();
                assert!(line.contains("r.toml: key `vocab_size`: invalid value 'many' for '--vocab-size"), "{line}");
            }
            other => panic!("expected a recipe error, got {other:?}"),
        }
    }

    #[test]
    fn recipe_syntax_error_names_line() {
        match parse_with("vocab_size = 8\nmin_frequency = = 2\n", &["a"]) {
            Err(ParseError::Lathe(e)) => assert!(e.to_string().contains("line 2"), "{e}"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }
}
