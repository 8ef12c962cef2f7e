//! Run-directory binding: a directory records, in a JSON file, the settings every output in it
//! depends on; a later run into it must have the same settings, or it would mix incomparable
//! results. A refusal names each setting that differs.
//!
//! Every key of the new settings is compared with the recorded one (a key the code no longer
//! writes is ignored, so a run made before a setting was dropped still resumes).

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::portable::{portable_json, portable_recorded_json};

/// Why a run directory cannot be bound to the settings.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Io(#[from] crate::Error),
    #[error("{}: unreadable ({reason}); remove the run directory", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "{} holds a run with other settings ({}); use another output directory or remove it",
        dir.display(),
        join(differences)
    )]
    Differs {
        dir: PathBuf,
        differences: Vec<Difference>,
    },
}

/// One setting that differs: its value in the recorded settings (`None`: absent) and now.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub key: String,
    pub then: Option<Value>,
    pub now: Value,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.then {
            Some(then) => write!(f, "{}: was {then}, now {}", self.key, self.now),
            None => write!(f, "{}: absent, now {}", self.key, self.now),
        }
    }
}

fn join(differences: &[Difference]) -> String {
    let parts: Vec<String> = differences.iter().map(Difference::to_string).collect();
    parts.join("; ")
}

/// Binds the run directory of `path` (its parent) to `settings`, a JSON object: records them
/// in `path` (atomically) on first use; afterwards checks them against the record. Paths are
/// recorded and compared portably ([`crate::portable`]: relative to the run, or under
/// `$TRAIL_HOME`), so a record made with absolute paths still binds the same files.
pub fn bind_settings(path: &Path, settings: &Map<String, Value>) -> Result<(), BindError> {
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut settings = Value::Object(settings.clone());
    portable_json(&mut settings, &dir);
    if !path.is_file() {
        let text = serde_json::to_string_pretty(&settings).expect("JSON values serialize");
        return Ok(crate::write_atomic(path, text.as_bytes())?);
    }
    let mut recorded = Value::Object(read_object(path)?);
    portable_recorded_json(&mut recorded, &dir);
    let (Value::Object(settings), Value::Object(recorded)) = (settings, recorded) else {
        unreachable!("objects stay objects");
    };
    let differences: Vec<Difference> = settings
        .iter()
        .filter(|(k, v)| !recorded.get(*k).is_some_and(|then| same(then, v, &dir)))
        .map(|(k, v)| Difference {
            key: k.clone(),
            then: recorded.get(k).cloned(),
            now: v.clone(),
        })
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(BindError::Differs { dir, differences })
}

/// Whether a recorded value and a new one agree: equal (both portable), or a recorded string
/// that, read relative to the working directory (as records made before paths were portable
/// hold them), names the path the new one does.
fn same(then: &Value, now: &Value, dir: &Path) -> bool {
    match (then, now) {
        (Value::String(t), Value::String(n)) if t != n => {
            crate::portable::absolute(Path::new(t)) == crate::portable::resolve(n, dir)
        }
        _ => then == now,
    }
}

fn read_object(path: &Path) -> Result<Map<String, Value>, BindError> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::new(path, e))?;
    let unreadable = |reason: String| BindError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    match serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))? {
        Value::Object(map) => Ok(map),
        _ => Err(unreadable("not a JSON object".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        }
    }

    #[test]
    fn records_then_accepts_the_same_and_names_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/settings.json");
        // A float that a parser without round-trip precision reads back one ulp off.
        let s = object(json!({ "saturation_rps": 1.1985825176004705_f64, "seed": 1 }));
        bind_settings(&path, &s).unwrap();
        bind_settings(&path, &s).unwrap();
        let other = object(json!({ "saturation_rps": 1.2, "seed": 1, "batch": 4 }));
        let err = bind_settings(&path, &other).unwrap_err();
        let BindError::Differs { differences, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(differences.len(), 2);
        let msg = err.to_string();
        assert!(msg.contains("batch: absent, now 4"), "{msg}");
        assert!(
            msg.contains("saturation_rps: was 1.1985825176004705, now 1.2"),
            "{msg}"
        );
        // A recorded key no longer written is ignored.
        bind_settings(&path, &object(json!({ "seed": 1 }))).unwrap();
    }

    #[test]
    fn paths_are_recorded_relative_and_an_absolute_record_still_binds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/settings.json");
        let data = dir.path().join("data").display().to_string();
        bind_settings(&path, &object(json!({ "data": data }))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"../data\""), "{text}");
        assert!(!text.contains(&dir.path().display().to_string()), "{text}");
        // A record written before paths were portable.
        crate::write_atomic(&path, json!({ "data": data }).to_string().as_bytes()).unwrap();
        bind_settings(&path, &object(json!({ "data": data }))).unwrap();
        // One relative to the working directory (this crate's, under `cargo test`).
        crate::write_atomic(&path, br#"{"data": "src/binding.rs"}"#).unwrap();
        bind_settings(&path, &object(json!({ "data": "src/binding.rs" }))).unwrap();
        crate::write_atomic(&path, json!({ "data": data }).to_string().as_bytes()).unwrap();
        let other = dir.path().join("other").display().to_string();
        let err = bind_settings(&path, &object(json!({ "data": other }))).unwrap_err();
        assert!(
            err.to_string()
                .contains("data: was \"../data\", now \"../other\""),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("binding.json");
        crate::write_atomic(&path, b"[1, 2]").unwrap();
        let err = bind_settings(&path, &Map::new()).unwrap_err();
        assert!(matches!(err, BindError::Unreadable { .. }), "{err}");
    }
}
