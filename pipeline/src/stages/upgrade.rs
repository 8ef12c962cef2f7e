//! `trail upgrade PATH...`: rewrites records an earlier trail wrote in today's schema, values
//! unchanged, for runs whose inputs are gone (a run that still has them is better re-summarised
//! by rerunning its stage, which resumes without redoing finished work).
//!
//! - `summary.json` of `trail eval latency`, schema 1 → 2: version 2 only added figures
//!   (`benchmark`, `goodput_slo`, `settings.step_model`), so the file gains its
//!   `schema_version` and nothing else; it is parsed with the project's reader first.
//! - `summary.json` of `trail sim trace`, schema 1 → 2: every time key gains its unit
//!   (`mean_latency` → `mean_latency_s`, …).
//! - `metrics.json` of `trail report`, schema 1 → 2: read with the project's reader (which takes
//!   the old names) and written with the new ones.
//! - Every JSON record (`*.json`: summaries, metrics, settings, manifests, bench reports):
//!   absolute paths of the machine that wrote it become relative to the file (or
//!   `$TRAIL_HOME/…`).
//!
//! Directories are searched recursively. Files are written atomically, and only when they change.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;
use trail_checkpoints::scoring::{METRICS_SCHEMA_VERSION, Metrics};

use crate::manifest::write_atomic;
use crate::stages::eval::latency::{SUMMARY_SCHEMA_VERSION, Summary};

/// Arguments of `trail upgrade`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files, or directories to search for JSON records (`*.json`).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Say what would change without writing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `sim trace`'s row keys of schema 1 and their names since schema 2.
const TRACE_RENAMES: [(&str, &str); 6] = [
    ("mean_latency", "mean_latency_s"),
    ("p50_latency", "p50_latency_s"),
    ("p90_latency", "p90_latency_s"),
    ("p99_latency", "p99_latency_s"),
    ("mean_ttft", "mean_ttft_s"),
    ("makespan", "makespan_s"),
];

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for path in &args.paths {
        collect(path, &mut files)?;
    }
    anyhow::ensure!(!files.is_empty(), "no JSON records under {:?}", args.paths);
    let mut changed = 0;
    for file in &files {
        let Some(what) = upgrade_file(file, args.dry_run)? else {
            continue;
        };
        changed += 1;
        let verb = if args.dry_run {
            "would upgrade"
        } else {
            "upgraded"
        };
        println!("{verb} {}: {what}", file.display());
    }
    println!("{changed} of {} records changed", files.len());
    Ok(())
}

/// The records at `path` (a file, or a directory searched recursively as [`searched`] says),
/// sorted.
fn collect(path: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let entries =
        std::fs::read_dir(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: cannot list", path.display()))?;
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() && searched(&p, name) {
            collect(&p, files)?;
        } else if name.ends_with(".json") {
            files.push(p);
        }
    }
    Ok(())
}

/// Whether a folder met while searching is searched: not a link (a link to `runs/` in a
/// checkout, or a loop), not hidden (`.git`), not a cache (`CACHEDIR.TAG`, as cargo's `target/`).
fn searched(dir: &Path, name: &str) -> bool {
    !dir.is_symlink() && !name.starts_with('.') && !dir.join("CACHEDIR.TAG").is_file()
}

/// Upgrades one record; what changed, or `None` when it is already current. A record whose
/// schema changes is written again (metrics in their fields' order, the rest with sorted keys as
/// trail writes them); one whose paths alone change keeps its text, those strings replaced.
fn upgrade_file(path: &Path, dry_run: bool) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", path.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut what = match name {
        "summary.json" => upgrade_summary(&mut value),
        "metrics.json" => upgrade_metrics(&mut value),
        _ => Ok(Vec::new()),
    }
    .with_context(|| format!("{}: cannot upgrade", path.display()))?;
    let mut out = if what.is_empty() {
        text.clone()
    } else {
        let mut out = pretty(name, &value)?;
        if text.ends_with('\n') {
            out.push('\n');
        }
        out
    };
    let moved = trail_fs::recorded_absolute_paths(&value, path.parent().unwrap_or(Path::new(".")));
    for (old, new) in &moved {
        out = out.replace(
            &Value::from(old.as_str()).to_string(),
            &Value::from(new.as_str()).to_string(),
        );
    }
    if !moved.is_empty() {
        what.push("absolute paths made relative".into());
    }
    if what.is_empty() {
        return Ok(None);
    }
    if !dry_run {
        write_atomic(path, out.as_bytes())?;
    }
    Ok(Some(what.join("; ")))
}

/// The record's text: a `metrics.json` in its fields' order, as `trail report` writes it.
fn pretty(name: &str, value: &Value) -> anyhow::Result<String> {
    Ok(if name == "metrics.json" {
        serde_json::to_string_pretty(&serde_json::from_value::<Metrics>(value.clone())?)?
    } else {
        serde_json::to_string_pretty(value)?
    })
}

/// A `summary.json` of `eval latency` or `sim trace`, by its keys.
fn upgrade_summary(value: &mut Value) -> anyhow::Result<Vec<String>> {
    let Value::Object(map) = value else {
        anyhow::bail!("not a JSON object");
    };
    if map.contains_key("schema_version") {
        return Ok(Vec::new());
    }
    if ["saturation", "settings", "summary"]
        .iter()
        .all(|k| map.contains_key(*k))
    {
        let mut what = vec![format!(
            "eval latency summary, schema 1 → {SUMMARY_SCHEMA_VERSION}"
        )];
        what.extend(step_model_source(map)?);
        // Parsed by the project's reader first: an unreadable file is not stamped current.
        serde_json::from_value::<Summary>(map["summary"].clone())
            .context("its `summary` is not a latency summary")?;
        map.insert("schema_version".into(), SUMMARY_SCHEMA_VERSION.into());
        return Ok(what);
    }
    let is_trace = map.contains_key("requests");
    if let (Some(Value::Array(rows)), true) = (map.get_mut("rows"), is_trace) {
        for row in rows.iter_mut() {
            let Value::Object(row) = row else {
                anyhow::bail!("a row of `rows` is not an object");
            };
            for (old, new) in TRACE_RENAMES {
                let v = row
                    .remove(old)
                    .with_context(|| format!("a row of `rows` has no `{old}`"))?;
                row.insert(new.into(), v);
            }
        }
        map.insert("schema_version".into(), 2.into());
        return Ok(vec![
            "sim trace summary, schema 1 → 2 (times in `_s` keys)".into(),
        ]);
    }
    anyhow::bail!("neither an `eval latency` nor a `sim trace` summary")
}

/// The earliest latency summaries (before virtual time) have no `step_model_source`: their
/// step model was always fitted to every cell's step log, which is what the key then says.
fn step_model_source(map: &mut serde_json::Map<String, Value>) -> anyhow::Result<Option<String>> {
    let Some(Value::Object(summary)) = map.get("summary") else {
        anyhow::bail!("its `summary` is not an object");
    };
    if summary.contains_key("step_model_source") {
        return Ok(None);
    }
    anyhow::ensure!(
        map["settings"]["backend"] != "virtual",
        "a virtual-time summary without `step_model_source`: not one trail wrote"
    );
    let source = "fitted to every cell's step log";
    if let Some(Value::Object(summary)) = map.get_mut("summary") {
        summary.insert("step_model_source".into(), source.into());
    }
    Ok(Some(format!("`step_model_source` recorded ({source})")))
}

/// A `metrics.json` of `trail report`: read (old names too) and written with today's.
fn upgrade_metrics(value: &mut Value) -> anyhow::Result<Vec<String>> {
    let mut metrics: Metrics =
        serde_json::from_value(value.clone()).context("not a `trail report` metrics.json")?;
    if metrics.schema_version == METRICS_SCHEMA_VERSION {
        return Ok(Vec::new());
    }
    let from = metrics.schema_version;
    metrics.schema_version = METRICS_SCHEMA_VERSION;
    let mut upgraded = serde_json::to_value(&metrics)?;
    let version = upgraded
        .as_object_mut()
        .and_then(|m| m.remove("schema_version"))
        .context("metrics serialise to an object")?;
    // Every number of the old file is kept (the reader may not drop a field it did not know).
    anyhow::ensure!(
        numbers(value) == numbers(&upgraded),
        "upgrading would change or drop values: its fields are not all the reader's"
    );
    upgraded
        .as_object_mut()
        .context("metrics serialise to an object")?
        .insert("schema_version".into(), version);
    *value = upgraded;
    Ok(vec![format!(
        "report metrics, schema {from} → {METRICS_SCHEMA_VERSION}"
    )])
}

/// Every number of `v`, sorted (their keys may be renamed; their values may not change).
fn numbers(v: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(m) => m.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out.sort();
    out
}
