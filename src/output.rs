//! Outputs appear whole or not at all: files are written under a temporary name beside their
//! destination and renamed into place only when complete. `-` means standard output.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result, bad_input, usage};

/// Temporary files not yet committed; removed if the process is stopped by a signal.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) fn remove_pending() {
    let pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    for path in pending.iter() {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(path);
    }
}

fn register(path: &Path) {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
}

fn unregister(path: &Path) {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != path);
}

pub fn is_stdio(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Refuse an output path whose folder does not exist, before any work starts.
pub fn check_writable(path: &Path) -> Result<()> {
    if is_stdio(path) {
        return Ok(());
    }
    if path.is_dir() {
        return Err(bad_input(path, "is a directory, expected a file path for -o"));
    }
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return Err(bad_input(path, format!("cannot write: folder {} does not exist", parent.display())));
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file that becomes visible at its destination only on [`AtomicFile::commit`].
pub struct AtomicFile {
    temp: Option<tempfile::NamedTempFile>,
    destination: PathBuf,
}

impl AtomicFile {
    pub fn create(destination: &Path) -> Result<Self> {
        check_writable(destination)?;
        let name = destination.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Outputs are ordinary files once renamed: the mode `File::create` gives (0666 less the
        // umask), not the owner-only mode of a temporary file.
        let temp = tempfile::Builder::new()
            .prefix(&format!("{}{name}.", TEMP_PREFIX))
            .suffix(TEMP_SUFFIX)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(parent_dir(destination))
            .map_err(|e| bad_input(destination, format!("cannot create output: {e}")))?;
        register(temp.path());
        Ok(AtomicFile { temp: Some(temp), destination: destination.to_path_buf() })
    }

    /// The temporary path being written (for libraries that write by path).
    pub fn path(&self) -> &Path {
        self.temp.as_ref().expect("an uncommitted AtomicFile holds its temp file").path()
    }

    pub fn file(&mut self) -> &mut File {
        self.temp.as_mut().expect("an uncommitted AtomicFile holds its temp file").as_file_mut()
    }

    pub fn commit(mut self) -> Result<()> {
        let temp = self.temp.take().expect("commit runs once");
        temp.as_file().sync_all().map_err(|e| write_failed(&self.destination, e))?;
        let temp_path = temp.path().to_path_buf();
        temp.persist(&self.destination).map_err(|e| write_failed(&self.destination, e.error))?;
        unregister(&temp_path);
        Ok(())
    }

    /// The destination, for messages.
    pub fn destination(&self) -> &Path {
        &self.destination
    }
}

/// Temporary outputs are `.NAME.RANDOM.tmp` beside their destination.
const TEMP_PREFIX: &str = ".";
const TEMP_SUFFIX: &str = ".tmp";

/// Remove what a killed run left in `dir`: our temporary outputs and the `.tmpXXXXXX` files of
/// libraries that write beside their destination. Returns the names removed.
pub fn remove_leftovers(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) && name.len() > TEMP_PREFIX.len() + TEMP_SUFFIX.len();
        let library = name.starts_with(".tmp");
        if (ours || library) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path())?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// A write that failed: the file and the cause, once (`out.parquet: cannot write: No space
/// left on device (os error 28)`).
pub fn write_failed(path: &Path, cause: impl std::fmt::Display) -> Error {
    let shown = if is_stdio(path) { "standard output".to_string() } else { path.display().to_string() };
    Error::Failed(anyhow::anyhow!("{shown}: cannot write: {cause}"))
}

/// The innermost cause of an error (`External: File too large` → `File too large`).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Refuse an output that is one of the inputs (the same file or folder, by any name): writing
/// it would replace what is being read.
pub fn check_distinct(output: &Path, inputs: &[&Path]) -> Result<()> {
    if is_stdio(output) {
        return Ok(());
    }
    let Ok(out) = std::fs::metadata(output) else { return Ok(()) };
    for input in inputs.iter().filter(|p| !is_stdio(p)) {
        let Ok(read) = std::fs::metadata(input) else { continue };
        if (out.dev(), out.ino()) == (read.dev(), read.ino()) {
            return Err(bad_input(output, format!("is also an input ({}): writing it would replace what is read; choose another output", input.display())));
        }
    }
    Ok(())
}

/// Write `tensors` as a safetensors file (the layout `safetensors::serialize` makes: sorted by
/// dtype then name, header padded to 8 bytes) straight into an atomic output, one tensor at a
/// time: no second copy in memory and no library temporary file beside it.
pub fn write_safetensors<V: safetensors::View>(path: &Path, mut tensors: Vec<(&str, V)>, metadata: std::collections::HashMap<String, String>) -> Result<()> {
    tensors.sort_by(|(a, x), (b, y)| y.dtype().cmp(&x.dtype()).then(a.cmp(b)));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let end = offset + tensor.data_len();
        infos.push((name.to_string(), safetensors::tensor::TensorInfo { dtype: tensor.dtype(), shape: tensor.shape().to_vec(), data_offsets: (offset, end) }));
        offset = end;
    }
    let mut header = serde_json::to_vec(&safetensors::tensor::Metadata::new(Some(metadata), infos)?)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut file = AtomicFile::create(path)?;
    {
        let mut writer = BufWriter::with_capacity(1 << 20, file.file());
        let mut put = |bytes: &[u8]| writer.write_all(bytes).map_err(|e| write_failed(path, e));
        put(&(header.len() as u64).to_le_bytes())?;
        put(&header)?;
        for (_, tensor) in &tensors {
            put(&tensor.data())?;
        }
        writer.flush().map_err(|e| write_failed(path, e))?;
    }
    file.commit()
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            unregister(temp.path());
        }
    }
}

/// Write a whole small file atomically (`-`: standard output).
pub fn write_atomic(destination: &Path, bytes: &[u8]) -> Result<()> {
    if is_stdio(destination) {
        let mut stdout = io::stdout().lock();
        stdout.write_all(bytes)?;
        return Ok(stdout.flush()?);
    }
    let mut file = AtomicFile::create(destination)?;
    file.file().write_all(bytes).map_err(|e| write_failed(destination, e))?;
    file.commit()
}

/// Print to standard output; a closed or full one is an error naming it, not a panic.
pub fn print(text: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).map_err(|e| write_failed(Path::new("-"), e))
}

/// Where a stage's main output goes: a file (atomic) or standard output.
pub enum Sink {
    File(AtomicFile, BufWriter<File>),
    Stdout(BufWriter<io::Stdout>),
}

impl Sink {
    pub fn create(path: &Path) -> Result<Self> {
        if is_stdio(path) {
            return Ok(Sink::Stdout(BufWriter::new(io::stdout())));
        }
        let mut atomic = AtomicFile::create(path)?;
        let writer = BufWriter::with_capacity(1 << 20, atomic.file().try_clone()?);
        Ok(Sink::File(atomic, writer))
    }

    pub fn commit(self) -> Result<()> {
        match self {
            Sink::File(atomic, mut writer) => {
                writer.flush().map_err(|e| write_failed(atomic.destination(), e))?;
                drop(writer);
                atomic.commit()
            }
            Sink::Stdout(mut writer) => writer.flush().map_err(|e| write_failed(Path::new("-"), e)),
        }
    }

    /// Where this sink writes (`-` for standard output), for messages.
    pub fn destination(&self) -> &Path {
        match self {
            Sink::File(atomic, _) => atomic.destination(),
            Sink::Stdout(_) => Path::new("-"),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::File(_, w) => w.write(buf),
            Sink::Stdout(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(_, w) => w.flush(),
            Sink::Stdout(w) => w.flush(),
        }
    }
}

/// An input path; `-` (standard input) is copied to a temporary file first, because Parquet
/// needs to seek to its footer.
pub struct InputFile {
    shown: PathBuf,
    data: PathBuf,
    _stdin: Option<tempfile::NamedTempFile>,
}

impl InputFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !is_stdio(path) {
            return Ok(InputFile { shown: path.to_path_buf(), data: path.to_path_buf(), _stdin: None });
        }
        let mut temp = tempfile::NamedTempFile::new()?;
        io::copy(&mut io::stdin().lock(), temp.as_file_mut())?;
        Ok(InputFile { shown: PathBuf::from("<stdin>"), data: temp.path().to_path_buf(), _stdin: Some(temp) })
    }

    /// The name to show in messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// Where the bytes are.
    pub fn data_path(&self) -> &Path {
        &self.data
    }

    /// Open for reading; bad input if missing, a folder, or unreadable.
    pub fn file(&self) -> Result<File> {
        if self.data.is_dir() {
            return Err(bad_input(&self.shown, "is a directory, expected a file"));
        }
        File::open(&self.data).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => bad_input(&self.shown, "no such file"),
            _ => bad_input(&self.shown, format!("cannot open: {e}")),
        })
    }
}

/// At most one input may be `-`.
pub fn check_single_stdin(inputs: &[PathBuf]) -> Result<()> {
    if inputs.iter().filter(|p| is_stdio(p)).count() > 1 {
        return Err(usage("`-` (standard input) may be given only once"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.file().write_all(b"half").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn committed_file_appears() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        write_atomic(&dest, b"whole").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_folder_is_bad_input() {
        let err = check_writable(Path::new("/no/such/folder/x.parquet")).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
