//! The manifest every stage writes beside its outputs: config, seed, git commit, numerics,
//! and the sha256 of every input and output, so a run can be audited and replayed.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

/// The commit this binary was built from (`-dirty` when the work tree had changes).
pub const GIT_COMMIT: &str = env!("TRAIL_GIT_COMMIT");

/// A file named in a manifest.
#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

impl FileEntry {
    /// Hashes `path`; it is recorded relative to `base` (`../` where it lies beside it), or as
    /// `$TRAIL_HOME/…` in the cache ([`trail_fs::portable_path`]), never as an absolute path.
    pub fn of(path: &Path, base: &Path) -> anyhow::Result<Self> {
        let sha256 = trail_llm::hub::sha256_file(path)?;
        let bytes = std::fs::metadata(path)
            .with_context(|| format!("{}: cannot stat", path.display()))?
            .len();
        Ok(Self {
            path: trail_fs::portable_path(path, base),
            bytes,
            sha256,
        })
    }
}

/// A manifest under construction.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub stage: String,
    pub trail_version: &'static str,
    pub git_commit: &'static str,
    pub config: Value,
    pub seed: Option<u64>,
    /// The runner's numerics, where the stage ran or depends on the model.
    pub kernel_id: Option<String>,
    pub inputs: Vec<FileEntry>,
    pub outputs: Vec<FileEntry>,
    /// Stage-specific figures (counts, throughput, skipped records...).
    pub results: Value,
    pub started_unix_s: u64,
    pub wall_s: f64,
    #[serde(skip)]
    clock: Instant,
}

impl Manifest {
    /// Starts a manifest; `config` is the stage's full, serialised configuration.
    pub fn start(stage: &str, config: impl Serialize, seed: Option<u64>) -> anyhow::Result<Self> {
        Ok(Self {
            stage: stage.into(),
            trail_version: env!("CARGO_PKG_VERSION"),
            git_commit: GIT_COMMIT,
            config: serde_json::to_value(config)?,
            seed,
            kernel_id: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            results: Value::Object(Default::default()),
            started_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            wall_s: 0.0,
            clock: Instant::now(),
        })
    }

    pub fn input(&mut self, path: &Path, base: &Path) -> anyhow::Result<()> {
        self.inputs.push(FileEntry::of(path, base)?);
        Ok(())
    }

    pub fn output(&mut self, path: &Path, base: &Path) -> anyhow::Result<()> {
        self.outputs.push(FileEntry::of(path, base)?);
        Ok(())
    }

    /// Adds a stage-specific figure under `results.key`.
    pub fn result(&mut self, key: &str, value: impl Serialize) -> anyhow::Result<()> {
        if let Value::Object(map) = &mut self.results {
            map.insert(key.into(), serde_json::to_value(value)?);
        }
        Ok(())
    }

    /// Writes `manifest.json` into `dir` atomically and returns its path.
    pub fn finish(self, dir: &Path) -> anyhow::Result<PathBuf> {
        self.finish_as(&dir.join("manifest.json"))
    }

    /// Writes the manifest to `path` atomically (e.g. `NAME.manifest.json` beside an export);
    /// the paths in its configuration and results are recorded relative to the manifest's
    /// directory ([`trail_fs::portable_json`]).
    pub fn finish_as(mut self, path: &Path) -> anyhow::Result<PathBuf> {
        self.wall_s = self.clock.elapsed().as_secs_f64();
        let dir = path.parent().unwrap_or(Path::new("."));
        trail_fs::portable_json(&mut self.config, dir);
        trail_fs::portable_json(&mut self.results, dir);
        self.outputs.sort_by(|a, b| a.path.cmp(&b.path));
        write_atomic(path, serde_json::to_string_pretty(&self)?.as_bytes())?;
        Ok(path.to_path_buf())
    }
}

/// Writes `bytes` to `path` atomically ([`trail_fs::write_atomic`]: a unique temporary file in
/// the same directory, fsync, rename), so a reader never sees a half-written file and a crash
/// never destroys the previous version.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(trail_fs::write_atomic(path, bytes)?)
}
