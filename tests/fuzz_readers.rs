//! Every reader against damaged files: a seeded loop truncates and flips bytes of the Parquet,
//! JSON, JSONL, TOML (and safetensors) files in testdata/ and recipes/, and feeds each one to
//! every reader that takes that kind of file. A reader may accept the file or refuse it with
//! an error; it must never panic. Failures print the seed and mutation that reproduce them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::Device;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use lathe::data::ParquetSource;
use lathe::human::scoring::ScoreAnswer;
use lathe::data::records::*;
use lathe::model::ModelFolder;
use lathe::tokenizer::LoadedTokenizer;

const SEED: u64 = 18;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One damaged copy: what was done, for the failure message.
struct Mutant {
    what: String,
    bytes: Vec<u8>,
}

/// `count` damaged copies of `original`: truncations, byte flips anywhere, byte flips in the
/// last 1 KB (Parquet's footer, JSON's closing structure), and structural characters dropped in.
fn mutants(original: &[u8], count: usize, rng: &mut StdRng) -> Vec<Mutant> {
    let len = original.len();
    (0..count)
        .map(|i| {
            let mut bytes = original.to_vec();
            let what = match i % 4 {
                0 => {
                    let at = rng.random_range(0..len);
                    bytes.truncate(at);
                    format!("truncated to {at} bytes")
                }
                1 | 2 => {
                    let from = if i % 4 == 2 { len.saturating_sub(1024) } else { 0 };
                    let flips = rng.random_range(1..=4);
                    let mut done = Vec::new();
                    for _ in 0..flips {
                        let at = rng.random_range(from..len);
                        let mask = rng.random_range(1..=255u8);
                        bytes[at] ^= mask;
                        done.push(format!("{at}^{mask:#04x}"));
                    }
                    format!("flipped {}", done.join(", "))
                }
                _ => {
                    let at = rng.random_range(0..len);
                    let structural = b"{}[]\":,=\n-.e9\0";
                    let c = structural[rng.random_range(0..structural.len())];
                    bytes[at] = c;
                    format!("byte {at} set to {c:#04x}")
                }
            };
            Mutant { what, bytes }
        })
        .collect()
}

/// A named reader of one kind of file.
type Reader<'a> = (&'static str, Box<dyn Fn(&Path) + 'a>);

/// Run every reader of a file kind on each mutant of `original`, counting panics.
struct Fuzz {
    dir: tempfile::TempDir,
    panics: Mutex<Vec<String>>,
    runs: Mutex<usize>,
}

impl Fuzz {
    fn new() -> Self {
        Fuzz { dir: tempfile::tempdir().unwrap(), panics: Mutex::new(Vec::new()), runs: Mutex::new(0) }
    }

    /// `readers` get the path of each mutant, written as `name` in a fresh folder.
    fn run(&self, original: &Path, count: usize, name: &str, readers: &[Reader]) {
        let bytes = std::fs::read(original).unwrap();
        let seed = SEED ^ original.to_string_lossy().bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = StdRng::seed_from_u64(seed);
        for (i, mutant) in mutants(&bytes, count, &mut rng).into_iter().enumerate() {
            let folder = self.dir.path().join(format!("{seed:x}-{i}"));
            std::fs::create_dir_all(&folder).unwrap();
            let path = folder.join(name);
            std::fs::write(&path, &mutant.bytes).unwrap();
            for (reader, read) in readers {
                *self.runs.lock().unwrap() += 1;
                if catch_unwind(AssertUnwindSafe(|| read(&path))).is_err() {
                    self.panics.lock().unwrap().push(format!("{reader} panicked on {} {} (seed {seed:#x}, mutant {i})", original.display(), mutant.what));
                }
            }
            let _ = std::fs::remove_dir_all(&folder);
        }
    }

    fn check(self, at_least: usize) {
        let panics = self.panics.into_inner().unwrap();
        let runs = self.runs.into_inner().unwrap();
        assert!(panics.is_empty(), "{} panics in {runs} reads:\n{}", panics.len(), panics.join("\n"));
        assert!(runs >= at_least, "only {runs} reads");
    }
}

/// Read every row of a Parquet file as record kind `R`.
fn records<R: Record>(path: &Path) {
    if let Ok(reader) = RecordReader::<R>::open(path) {
        let _ = reader.read_all();
    }
}

/// The fixture model's tokenizer and chat template, which prompt readers encode with.
struct Encoding {
    tokenizer: LoadedTokenizer,
    template: Option<lathe::model::ChatTemplate>,
}

impl Encoding {
    fn fixture() -> Self {
        let folder = ModelFolder::open(root().join("testdata/hf-tiny/causal-lm").to_str().unwrap()).unwrap();
        Encoding { tokenizer: folder.load_tokenizer().unwrap(), template: folder.chat().unwrap() }
    }
}

/// Readers of text-bearing rows in Parquet and JSONL alike: prompts (encoded), text inputs
/// (the `column` field), imported ratings.
fn row_readers<'a>(encoding: &'a Encoding, text: &'a lathe::data::text::TextOptions) -> Vec<Reader<'a>> {
    vec![
        ("generate prompts", Box::new(|p: &Path| drop(lathe::generate::read_prompts(p, &encoding.tokenizer, encoding.template.as_ref())))),
        ("text inputs", Box::new(|p: &Path| {
            if let Ok(inputs) = lathe::data::text::open_inputs(&[p.to_path_buf()], text) {
                for input in &inputs {
                    if let Ok(batches) = input.batches(1 << 16) {
                        batches.for_each(drop);
                    }
                }
            }
        })),
        ("ratings", Box::new(|p: &Path| drop(lathe::human::ratings::read_ratings(p, "score")))),
    ]
}

#[test]
fn parquet_readers_never_panic() {
    let fuzz = Fuzz::new();
    let encoding = Encoding::fixture();
    let text_options = lathe::data::text::TextOptions { column: "text".into(), paragraphs: false, carry: None };
    let mut readers: Vec<Reader> = vec![
        ("ParquetSource", Box::new(|p: &Path| {
            if let Ok(source) = ParquetSource::open(p) {
                if let Ok(batches) = source.batches(None, 256) {
                    batches.for_each(drop);
                }
            }
        })),
        ("text", Box::new(records::<TextRecord>)),
        ("tokens", Box::new(records::<TokensRecord>)),
        ("chat", Box::new(records::<ChatRecord>)),
        ("prompt-completion", Box::new(records::<PromptCompletionRecord>)),
        ("prompts", Box::new(records::<PromptRecord>)),
        ("responses", Box::new(records::<ResponseRecord>)),
        ("scored", Box::new(records::<ScoredRecord>)),
        ("preferences", Box::new(records::<PreferenceRecord>)),
        ("labeled-text", Box::new(records::<LabeledTextRecord>)),
        ("findings", Box::new(records::<FindingRecord>)),
        ("tokenize inspect", Box::new(|p: &Path| drop(lathe::tokenizer::inspect(p)))),
    ];
    readers.extend(row_readers(&encoding, &text_options));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("testdata")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    files.sort();
    for file in &files {
        let small = std::fs::metadata(file).unwrap().len() < 100_000;
        fuzz.run(file, if small { 64 } else { 16 }, "data.parquet", &readers);
    }
    fuzz.check(files.len() * 16 * readers.len());
}

#[test]
fn jsonl_readers_never_panic() {
    let fuzz = Fuzz::new();
    let encoding = Encoding::fixture();
    let text_options = lathe::data::text::TextOptions { column: "prompt".into(), paragraphs: false, carry: None };
    // A human answers journal to damage, written through its own API.
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = journal_dir.path().join("answers.journal.jsonl");
    let settings = lathe::human::journal::Settings { task: "score".into(), annotator: "ana".into(), scale: Some("1-5".into()) };
    {
        let (mut open, _) = lathe::human::journal::Journal::open::<ScoreAnswer>(&journal, &settings, "responses.parquet", 3, |_, _, _| Ok(())).unwrap();
        for (i, score) in [4.0, 2.0].into_iter().enumerate() {
            open.answer(&lathe::human::ItemKey::response(&format!("p{i}"), 0), &ScoreAnswer { score }, "shown text").unwrap();
        }
        open.skip(&lathe::human::ItemKey::response("p2", 0), "shown text").unwrap();
    }
    let mut readers = row_readers(&encoding, &text_options);
    readers.push(
        ("answers journal", Box::new(|p: &Path| drop(lathe::human::journal::Journal::open::<ScoreAnswer>(p, &settings, "responses.parquet", 3, |_, _, _| Ok(()))))),
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("testdata")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect();
    files.push(journal.clone());
    for file in &files {
        fuzz.run(file, 128, "data.jsonl", &readers);
    }
    fuzz.check(files.len() * 128 * readers.len());
}

/// Model folders: each JSON file of the fixture (and its weights) damaged in turn, read the
/// way every stage opens a model; and a damaged tokenizer.json alone.
#[test]
fn model_folder_readers_never_panic() {
    let fuzz = Fuzz::new();
    let fixture = root().join("testdata/hf-tiny/causal-lm");
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"] {
        let open = |damaged: &Path| {
            let folder = damaged.parent().unwrap();
            for entry in std::fs::read_dir(&fixture).unwrap() {
                let entry = entry.unwrap();
                if !folder.join(entry.file_name()).exists() {
                    std::fs::copy(entry.path(), folder.join(entry.file_name())).unwrap();
                }
            }
            if let Ok(model) = ModelFolder::open(folder.to_str().unwrap()) {
                let _ = model.load_tokenizer();
                let _ = model.chat();
                if let Ok(params) = model.load_params(&Device::Cpu) {
                    let _ = lathe::model::Decoder::new_inference(&model.config, &params);
                }
            }
            if damaged.file_name().is_some_and(|n| n == "tokenizer.json") {
                let _ = LoadedTokenizer::load(damaged);
            }
        };
        let count = if name == "model.safetensors" { 64 } else { 128 };
        fuzz.run(&fixture.join(name), count, name, &[("model folder", Box::new(open) as Box<dyn Fn(&Path)>)]);
    }
    fuzz.check(4 * 128 + 64);
}

/// Flags of a stage, to parse damaged recipes with (unknown keys are refused like any stage).
#[derive(Parser, Debug)]
struct RecipeArgs {
    #[arg(long)]
    vocab_size: Option<usize>,
    #[arg(long)]
    hidden_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[command(flatten)]
    train: lathe::train::TrainArgs,
    #[command(flatten)]
    common: lathe::cli::CommonArgs,
}

#[test]
fn toml_readers_never_panic() {
    let fuzz = Fuzz::new();
    // Suites name their data relative to themselves: damaged copies sit where the original does
    // relative to testdata/.
    let mirror = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root().join("testdata"), mirror.path().join("testdata")).unwrap();
    let labels = vec!["sexual".to_string(), "violence".to_string(), "harassment".to_string()];
    let thresholds = std::collections::HashMap::new();
    let guards = [lathe::serve::guard::GuardInfo { name: "guard", labels: &labels, thresholds: &thresholds }];
    let recipe = |p: &Path| {
        let argv = ["stage", "--config", p.to_str().unwrap()].iter().map(std::ffi::OsString::from).collect();
        let _ = lathe::cli::parse_from::<RecipeArgs>(argv);
    };
    let suite = |p: &Path| {
        let placed = mirror.path().join("recipes/redteam");
        std::fs::create_dir_all(&placed).unwrap();
        let at = placed.join(p.file_name().unwrap());
        std::fs::copy(p, &at).unwrap();
        if let Ok(suite) = lathe::redteam::suite::Suite::load(&at) {
            let _ = suite.attempts(1);
        }
    };
    let policy = |p: &Path| drop(lathe::serve::guard::Policy::load(Some(p), &guards));
    let readers: Vec<Reader> = vec![("--config recipe", Box::new(recipe)), ("redteam suite", Box::new(suite)), ("serve-guard policy", Box::new(policy))];
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("recipes")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
    files.extend([root().join("recipes/redteam/default.toml"), root().join("recipes/guard/policy.toml")]);
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        fuzz.run(file, 64, &name, &readers);
    }
    fuzz.check(files.len() * 64 * readers.len());
}
