//! The crate's error type. I/O and format errors carry the file they concern.

use std::path::PathBuf;

/// Errors of trail-checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid trail checkpoint: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: checkpoint is for model sha256 {found}, expected {expected}")]
    ModelMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: checkpoint reads hidden size {found}, expected {expected}")]
    HiddenMismatch {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    /// Bad training or evaluation data (NaN, missing rows, too few requests...).
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error(transparent)]
    Store(#[from] trail_datasets::StoreError),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<trail_fs::Error> for Error {
    fn from(e: trail_fs::Error) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}
