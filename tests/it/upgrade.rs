//! `trail upgrade`: schema-1 records (a latency summary from before virtual time, a `sim trace`
//! summary, a report's metrics) rewritten in today's schema in place, every value unchanged,
//! absolute paths made relative, caches and hidden folders left alone; a second pass changes
//! nothing; a record it does not know is refused with its path.

use std::path::Path;

use clap::Parser;
use serde_json::{Value, json};
use trail_checkpoints::scoring::{METRICS_SCHEMA_VERSION, Metrics};
use trail_pipeline::cli::{self, Cli};
use trail_pipeline::stages::eval::latency::read_summary;

fn upgrade(path: &Path) -> Result<(), String> {
    let cli = Cli::try_parse_from(["trail", "upgrade", &path.display().to_string()])
        .map_err(|e| e.to_string())?;
    cli::run(cli).map_err(|e| format!("{e:#}"))
}

fn write(path: &Path, v: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An early HTTP-backend `summary.json`: no `schema_version`, no `step_model_source`, and the
/// model's absolute path in its settings.
fn latency_v1(model: &Path) -> Value {
    json!({
        "saturation": {"rps": 1.25, "source": "measured", "requests": 8, "completed": 8,
                       "makespan_s": 6.4, "output_tokens_per_s": 150.5},
        "settings": {"backend": "http", "model": model.display().to_string(), "requests": 8},
        "policies": ["fcfs"],
        "loads": [0.8],
        "seeds": [1],
        "summary": {
            "cells": [],
            "comparisons": [],
            "bootstrap": {"resamples": 50, "seed": 0},
            "step_model": null,
            "simulated": []
        }
    })
}

fn metrics_v1() -> Value {
    json!({
        "best_layer": 4,
        "per_layer_val_mae": {"4": 50.25},
        "per_layer_prompt_val_mae": {"4": 60.5},
        "multi_layer": [[4, 5], 49.125],
        "max_new_tokens": 512,
        "refine_interval": 8,
        "bootstrap_resamples": 10,
        "test": {
            "requests": 2, "pairs": 3, "every_position": false,
            "mae_remaining": {"refined": {"value": 1.5, "lo": 0.5, "hi": 2.5}},
            "mae_at_start": {"refined": null},
            "kendall_tau_at_start": {},
            "ratio_bert_finetuned_over_refined": null,
            "ratio_bert_finetuned_conditional_over_refined": null
        },
        "notes": []
    })
}

fn trace_v1() -> Value {
    json!({
        "requests": 10,
        "step_model": {"base_s": 0.01, "per_decode_row_s": 0.001, "per_prefill_token_s": 0.0,
                       "per_kv_token_s": 0.0},
        "rows": [{"policy": "fcfs", "replicas": 1, "mean_latency": 2.5, "p50_latency": 2.0,
                  "p90_latency": 4.0, "p99_latency": 5.5, "mean_ttft": 0.25, "preemptions": 0,
                  "steps": 40, "makespan": 12.0}]
    })
}

#[test]
fn schema_1_records_upgrade_in_place_with_values_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("models").join("m.gguf");
    let latency = tmp.path().join("grid").join("summary.json");
    let metrics = tmp.path().join("report").join("metrics.json");
    let trace = tmp.path().join("sim").join("summary.json");
    write(&latency, &latency_v1(&model));
    write(&metrics, &metrics_v1());
    write(&trace, &trace_v1());
    // Caches (`CACHEDIR.TAG`, as cargo's `target/`) and hidden folders are not searched.
    let cached = tmp.path().join("target").join("x.json");
    let hidden = tmp.path().join(".git").join("summary.json");
    for path in [&cached, &hidden] {
        write(path, &latency_v1(&model));
    }
    std::fs::write(tmp.path().join("target").join("CACHEDIR.TAG"), "").unwrap();
    upgrade(tmp.path()).unwrap();
    for path in [&cached, &hidden] {
        assert_eq!(read(path), latency_v1(&model), "{}", path.display());
    }

    let s = read(&latency);
    assert_eq!(s["schema_version"], 2);
    assert_eq!(
        s["settings"]["model"], "../models/m.gguf",
        "relative to the file"
    );
    assert_eq!(s["saturation"], latency_v1(&model)["saturation"]);
    assert_eq!(
        s["summary"]["step_model_source"],
        "fitted to every cell's step log"
    );
    let summary = read_summary(&latency).unwrap();
    assert_eq!(summary.bootstrap.resamples, 50);

    let m = read(&metrics);
    assert_eq!(m["schema_version"], METRICS_SCHEMA_VERSION);
    assert_eq!(m["per_layer_val_mae_tokens"]["4"], 50.25);
    assert_eq!(m["multi_layer"]["val_mae_tokens"], 49.125);
    assert_eq!(m["test"]["mae_remaining_tokens"]["refined"]["value"], 1.5);
    let mut old: Metrics = serde_json::from_value(metrics_v1()).unwrap();
    old.schema_version = METRICS_SCHEMA_VERSION;
    assert_eq!(serde_json::from_value::<Metrics>(m).unwrap(), old);

    let t = read(&trace);
    assert_eq!(t["schema_version"], 2);
    let row = &t["rows"][0];
    for (key, value) in [
        ("mean_latency_s", 2.5),
        ("p50_latency_s", 2.0),
        ("p90_latency_s", 4.0),
        ("p99_latency_s", 5.5),
        ("mean_ttft_s", 0.25),
        ("makespan_s", 12.0),
    ] {
        assert_eq!(row[key], value, "{key}");
    }
    assert!(row.get("mean_latency").is_none());

    // A second pass finds every record current and writes nothing.
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    let before = [&latency, &metrics, &trace].map(|p| bytes(p));
    upgrade(tmp.path()).unwrap();
    assert_eq!([&latency, &metrics, &trace].map(|p| bytes(p)), before);
}

#[test]
fn a_summary_it_does_not_know_is_refused_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("summary.json");
    write(&path, &json!({"rows": [1], "unrelated": true}));
    let err = upgrade(tmp.path()).unwrap_err();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("neither"), "{err}");
    // A metrics file the reader cannot take is refused, not stamped current.
    let metrics = tmp.path().join("metrics.json");
    std::fs::remove_file(&path).unwrap();
    write(&metrics, &json!({"best_layer": "four"}));
    let err = upgrade(&metrics).unwrap_err();
    assert!(err.contains("metrics.json"), "{err}");
    assert_eq!(read(&metrics), json!({"best_layer": "four"}));
}
