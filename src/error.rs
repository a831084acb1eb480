//! Errors carry the exit code SPEC assigns to them, so every stage reports failures the same way.

use std::fmt::Display;
use std::path::Path;

/// Exit codes shared by every binary (SPEC "Conventions").
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const GATE: u8 = 3;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad usage or bad input: the message names the file, the row or column, and what was expected.
    #[error("{0}")]
    Input(String),
    /// A quality gate the user set (`--min-accuracy`, `--fail-above`, …) was not met.
    #[error("{0}")]
    Gate(String),
    /// SIGINT / SIGTERM arrived; whatever could be saved was saved.
    #[error("interrupted")]
    Interrupted,
    /// Anything that went wrong while running.
    #[error("{}", cause_chain(.0))]
    Failed(anyhow::Error),
}

/// `context: cause: root` with each cause said once: libraries often repeat their source's
/// message in their own (`External: File too large` over `File too large`).
fn cause_chain(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Input(_) => exit::BAD_INPUT,
            Error::Gate(_) => exit::GATE,
            Error::Interrupted => exit::INTERRUPTED,
            Error::Failed(_) => exit::FAILED,
        }
    }

    /// The one line printed for this error: no newlines, no backtrace.
    pub fn one_line(&self) -> String {
        let text = self.to_string();
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Bad input in `file`; `what` says where (row / column) and what was expected.
pub fn bad_input(file: impl AsRef<Path>, what: impl Display) -> Error {
    Error::Input(format!("{}: {what}", file.as_ref().display()))
}

/// Bad usage that is not tied to one file.
pub fn usage(what: impl Display) -> Error {
    Error::Input(what.to_string())
}

pub fn failed(what: impl Display) -> Error {
    Error::Failed(anyhow::anyhow!("{what}"))
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<Error>() {
            Ok(inner) => inner,
            Err(e) => Error::Failed(e),
        }
    }
}

/// Errors from libraries are runtime failures unless a caller classifies them as bad input.
macro_rules! runtime_errors {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self { Error::Failed(anyhow::Error::new(e)) }
        }
    )*};
}

runtime_errors!(
    std::io::Error,
    arrow::error::ArrowError,
    parquet::errors::ParquetError,
    serde_json::Error,
    safetensors::SafeTensorError,
    minijinja::Error,
    toml::ser::Error,
);

impl From<candle_core::Error> for Error {
    /// With `RUST_BACKTRACE` set candle attaches a backtrace to its errors; the message stays
    /// one line.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Failed(anyhow::Error::new(e))
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Failed(anyhow::anyhow!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(27);
        let wrapped = parquet::errors::ParquetError::External(Box::new(io));
        let line = Error::from(wrapped).one_line();
        assert_eq!(line.matches("File too large").count(), 1, "{line}");
    }
}
