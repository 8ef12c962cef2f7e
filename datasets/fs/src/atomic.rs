//! Atomic files: written under a temporary name in the destination's directory, synced, then
//! renamed over the destination, and the directory synced where the platform allows it.
//!
//! The temporary name is unique per process and file (`.NAME.PID-N.tmp.EXT`: the extension is
//! kept last, for writers that pick a format by it), so two writers of one destination never
//! share a temporary file; the last rename wins whole. A caller whose resume logic looks for a
//! leftover temporary file names it itself ([`AtomicFile::create_named`]). An [`AtomicFile`]
//! dropped before [`AtomicFile::commit`] removes its temporary file; a crash leaves it behind,
//! and the destination keeps its previous version.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Temporary files made by this process so far (the `N` of their names).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically, creating its directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .map_err(|e| Error::new(f.temp_path(), e))?;
    f.commit()
}

/// A file being written under a temporary name; [`AtomicFile::commit`] puts it in place.
///
/// It implements [`Write`], so a streaming writer (a parquet `ArrowWriter`, a `BufWriter`) can
/// own it and hand it back for the commit. A library that writes to a path itself (plotters)
/// writes to [`AtomicFile::temp_path`] instead.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Starts `path` under a unique temporary name beside it, creating the directory.
    pub fn create(path: &Path) -> Result<Self> {
        create_parent(path)?;
        loop {
            let temp = unique_temp(path);
            match OpenOptions::new().write(true).create_new(true).open(&temp) {
                Ok(file) => return Ok(Self::new(path, temp, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::new(&temp, e)),
            }
        }
    }

    /// Starts `path` under the caller's temporary name `temp` (same directory; truncated if it
    /// exists), creating the directory.
    pub fn create_named(path: &Path, temp: &Path) -> Result<Self> {
        create_parent(path)?;
        let file = File::create(temp).map_err(|e| Error::new(temp, e))?;
        Ok(Self::new(path, temp.to_path_buf(), file))
    }

    fn new(path: &Path, temp: PathBuf, file: File) -> Self {
        Self {
            path: path.to_path_buf(),
            temp,
            file: Some(file),
        }
    }

    /// Where the file is until the commit.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Where the file goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file, renames it over the destination and syncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("an uncommitted file");
        file.sync_all().map_err(|e| Error::new(&self.temp, e))?;
        drop(file);
        std::fs::rename(&self.temp, &self.path).map_err(|e| Error::new(&self.path, e))?;
        sync_dir(&self.path);
        Ok(())
    }

    fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("an uncommitted file")
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The directory `path` goes into (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn create_parent(path: &Path) -> Result<()> {
    let dir = parent(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::new(dir, e))
}

/// `.NAME.PID-N.tmp.EXT` (or `.NAME.PID-N.tmp` without an extension) beside `path`.
fn unique_temp(path: &Path) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!(".{stem}.{pid}-{n}.tmp.{}", ext.to_string_lossy()),
        None => format!(".{stem}.{pid}-{n}.tmp"),
    };
    parent(path).join(name)
}

/// Makes a rename in `path`'s directory durable where the platform allows it (not on Windows,
/// where a directory cannot be opened as a file).
fn sync_dir(path: &Path) {
    if let Ok(d) = File::open(parent(path)) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_replace_whole_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(names(&dir.path().join("sub")), ["out.json"]);
    }

    #[test]
    fn temporaries_are_unique_keep_the_extension_and_vanish_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plot.png");
        let (mut a, b) = (
            AtomicFile::create(&p).unwrap(),
            AtomicFile::create(&p).unwrap(),
        );
        assert_ne!(a.temp_path(), b.temp_path());
        assert!(a.temp_path().to_string_lossy().ends_with(".tmp.png"));
        a.write_all(b"a").unwrap();
        drop(b);
        assert_eq!(names(dir.path()).len(), 1, "the dropped one is gone");
        a.commit().unwrap();
        assert_eq!(names(dir.path()), ["plot.png"]);
        assert_eq!(std::fs::read(&p).unwrap(), b"a");
    }

    #[test]
    fn a_named_temporary_is_used_and_the_destination_kept_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part.parquet");
        write_atomic(&p, b"old").unwrap();
        let temp = dir.path().join("part.parquet.tmp");
        let mut f = AtomicFile::create_named(&p, &temp).unwrap();
        f.write_all(b"new").unwrap();
        assert!(temp.is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        f.commit().unwrap();
        assert!(!temp.exists());
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        write_atomic(&blocker, b"x").unwrap();
        let err = write_atomic(&blocker.join("below"), b"y").unwrap_err();
        assert_eq!(err.path, blocker);
    }
}
