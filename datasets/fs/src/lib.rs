//! trail's one file-system layer (in the manner of uv's `uv-fs`): every file trail keeps is
//! written through here, and `clippy.toml` forbids the raw `std::fs` writes everywhere else.
//!
//! - [`atomic`]: [`write_atomic`] and the streaming [`AtomicFile`]: a temporary file in the
//!   same directory (a unique name unless the caller names it), fsync, rename, fsync of the
//!   directory where the platform allows it. A reader never sees a half-written file and a crash
//!   never destroys the previous version.
//! - [`hash`]: [`sha256_file`], streaming (a file is never read whole into memory).
//! - [`binding`]: [`bind_settings`]: a run directory records the settings it was made with, and
//!   a rerun with other settings is refused with the differences named.
//! - [`portable`]: paths as a record keeps them: relative to the record, or under
//!   `$TRAIL_HOME`, never this machine's absolute paths; [`trail_home`], the cache.
//!
//! Every error carries the path it is about.

pub mod atomic;
pub mod binding;
pub mod hash;
pub mod portable;

use std::path::{Path, PathBuf};

pub use atomic::{AtomicFile, write_atomic};
pub use binding::{BindError, Difference, bind_settings};
pub use hash::{sha256_file, sha256_file_len};
pub use portable::{
    portable_json, portable_path, portable_recorded_json, recorded_absolute_paths, resolve,
    trail_home,
};

/// An I/O error and the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct Error {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl Error {
    /// Wraps `source`, naming `path`.
    pub fn new(path: &Path, source: std::io::Error) -> Self {
        Self {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<Error> for std::io::Error {
    /// An `io::Error` of the same kind whose message names the path.
    fn from(e: Error) -> Self {
        std::io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
