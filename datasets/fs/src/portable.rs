//! Paths as a record keeps them: relative to the directory of the file that names them, or under
//! `$TRAIL_HOME` (trail's cache), never an absolute path of the machine that wrote them, so a
//! committed report or a run copied to another machine still reads right.
//!
//! - [`trail_home`]: the cache, `$TRAIL_HOME`, else `$XDG_CACHE_HOME/trail`, else
//!   `~/.cache/trail`.
//! - [`portable_path`]: one path, written `$TRAIL_HOME/…` when it lies in the cache, else
//!   relative to a base directory (`../alpaca-3600/models`).
//! - [`portable_json`]: the same for every string of a freshly made JSON value that names a path:
//!   an absolute path, or a relative one (from the working directory) with a `/` that exists.
//!   [`portable_recorded_json`] rewrites only the absolute ones of a value read back from disk
//!   (its relative paths are already relative to the record); [`recorded_absolute_paths`]
//!   lists them with their replacements.
//! - [`resolve`]: a recorded path read back (`$TRAIL_HOME/…` expanded, a relative one joined to
//!   the base).

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// How a recorded path under the cache begins.
pub const TRAIL_HOME_VAR: &str = "$TRAIL_HOME";

/// The trail cache: `$TRAIL_HOME`, else `$XDG_CACHE_HOME/trail`, else `~/.cache/trail`.
pub fn trail_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TRAIL_HOME") {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("trail")
}

/// `path` as a record in `base` keeps it: `$TRAIL_HOME/…` under the cache, else relative to
/// `base` (both made absolute against the working directory and normalised lexically first).
pub fn portable_path(path: &Path, base: &Path) -> String {
    let path = absolute(path);
    if let Ok(rest) = path.strip_prefix(absolute(&trail_home())) {
        return format!("{TRAIL_HOME_VAR}/{}", rest.display());
    }
    let base = absolute(base);
    match pathdiff::diff_paths(&path, &base) {
        Some(rel) if rel.as_os_str().is_empty() => ".".into(),
        Some(rel) => rel.display().to_string(),
        None => path.display().to_string(),
    }
}

/// Rewrites, in place, every string of a freshly made `value` that names a path (see the module
/// header) with [`portable_path`] against `base`. Keys, numbers and other strings are left as
/// they are.
pub fn portable_json(value: &mut Value, base: &Path) {
    rewrite(value, base, &names_path);
}

/// Rewrites, in place, the absolute paths of a `value` read back from a record in `base` (one
/// written before paths were portable); its relative paths are left as they are.
pub fn portable_recorded_json(value: &mut Value, base: &Path) {
    rewrite(value, base, &recorded_absolute);
}

/// What [`portable_recorded_json`] would rewrite in `value`: each absolute path among its
/// strings with what replaces it, sorted, once each (to edit a record's text in place).
pub fn recorded_absolute_paths(value: &Value, base: &Path) -> Vec<(String, String)> {
    fn walk(v: &Value, base: &Path, out: &mut Vec<(String, String)>) {
        match v {
            Value::String(s) if recorded_absolute(s) => {
                out.push((s.clone(), portable_path(Path::new(s), base)));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, base, out)),
            Value::Object(map) => map.values().for_each(|v| walk(v, base, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, base, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Whether a string read back from a record is an absolute path (and no URL).
fn recorded_absolute(s: &str) -> bool {
    !s.contains("://") && Path::new(s).is_absolute()
}

fn rewrite(value: &mut Value, base: &Path, is_path: &dyn Fn(&str) -> bool) {
    match value {
        Value::String(s) if is_path(s) => *s = portable_path(Path::new(s), base),
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, base, is_path)),
        Value::Object(map) => map.values_mut().for_each(|v| rewrite(v, base, is_path)),
        _ => {}
    }
}

/// A recorded path read back: `$TRAIL_HOME/…` under today's cache, a relative one below `base`.
pub fn resolve(recorded: &str, base: &Path) -> PathBuf {
    match recorded.strip_prefix(TRAIL_HOME_VAR) {
        Some(rest) => trail_home().join(rest.trim_start_matches('/')),
        None => absolute(&base.join(recorded)),
    }
}

/// Whether a JSON string names a path: absolute (and no URL), or relative with a separator and
/// present on disk (so `fcfs` or `a/b` that is not a file stay text).
fn names_path(s: &str) -> bool {
    if s.is_empty() || s.contains('\n') || s.contains("://") || s.starts_with(TRAIL_HOME_VAR) {
        return false;
    }
    let p = Path::new(s);
    p.is_absolute() || (s.contains('/') && p.exists())
}

/// `path` made absolute against the working directory, `.` and `..` folded lexically.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    normalise(&joined)
}

/// Folds `.` and `..` components without touching the file system.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_path_beside_the_run_is_relative_and_reads_back() {
        let base = Path::new("/data/runs/latency");
        let p = Path::new("/data/runs/alpaca-3600/export/predictor.safetensors");
        let rec = portable_path(p, base);
        assert_eq!(rec, "../alpaca-3600/export/predictor.safetensors");
        assert_eq!(resolve(&rec, base), p);
        assert_eq!(portable_path(base, base), ".");
        assert_eq!(portable_path(&base.join("./a/../cells"), base), "cells");
    }

    #[test]
    fn a_path_in_the_cache_names_the_cache() {
        let home = trail_home();
        let p = home.join("models/m.gguf");
        let rec = portable_path(&p, Path::new("/elsewhere/run"));
        assert_eq!(rec, "$TRAIL_HOME/models/m.gguf");
        assert_eq!(resolve(&rec, Path::new("/elsewhere/run")), p);
    }

    #[test]
    fn json_rewrites_paths_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("run");
        let data = dir.path().join("data");
        let mut v = json!({
            "data": data.display().to_string(),
            "policies": ["fcfs", "trail"],
            "url": "http://127.0.0.1:8000/v1",
            "nested": { "out": base.join("cells").display().to_string(), "n": 3 },
            "missing_relative": "no/such/thing",
        });
        portable_json(&mut v, &base);
        assert_eq!(v["data"], "../data");
        assert_eq!(v["nested"]["out"], "cells");
        assert_eq!(v["policies"], json!(["fcfs", "trail"]));
        assert_eq!(v["url"], "http://127.0.0.1:8000/v1");
        assert_eq!(v["missing_relative"], "no/such/thing");
        // Read back, only absolute paths move: the relative ones already are the record's.
        let mut recorded =
            json!({ "data": "../data", "model": data.join("m.gguf").display().to_string() });
        portable_recorded_json(&mut recorded, &base);
        assert_eq!(
            recorded,
            json!({ "data": "../data", "model": "../data/m.gguf" })
        );
    }
}
