//! `trail eval mae` through the stage's library entry, on synthetic runs (see `train.rs`):
//! on the training run's own test split it writes exactly `trail report`'s metrics; on another
//! run it scores every request; an exported checkpoint scores the same refined estimate; and
//! predictors made for another model or hidden size are refused, naming the file.

use std::path::Path;

use trail_checkpoints::scoring::{Metrics, score_suite};
use trail_checkpoints::suite::{self, ProbeChoice, Run};
use trail_datasets::schema::{Dtype, FinishReason, Kind, RequestRow, requests_path};
use trail_datasets::split::Split;
use trail_datasets::store::{PartWriter, write_requests};
use trail_pipeline::stages::eval::mae;

use crate::train::{DIM, config, opts, synthetic_run};

fn args(
    models: Option<&Path>,
    checkpoint: Option<&Path>,
    data: &Path,
    split: &str,
    out: &Path,
) -> mae::Args {
    mae::Args {
        models: models.map(Path::to_path_buf),
        checkpoint: checkpoint.map(Path::to_path_buf),
        data: data.to_path_buf(),
        split: split.into(),
        out: out.to_path_buf(),
        refine_interval: None,
        bootstrap: opts().bootstrap,
        seed: 0,
        no_bert: true,
        bert_dir: None,
    }
}

fn metrics(out: &Path) -> Metrics {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

/// Six test requests with `dim`-wide states of layer 1, for `model_sha256`.
fn small_run(dir: &Path, dim: usize, model_sha256: &str) {
    let mut w = PartWriter::new(dir, 0, &[1], dim, Dtype::F32);
    let mut rows = Vec::new();
    for i in 0..6u32 {
        let id = format!("small-{i}");
        let total = 10 + 7 * i;
        rows.push(RequestRow {
            request_id: id.clone(),
            dataset: "small".into(),
            split: Split::Test,
            prompt: format!("prompt {i}"),
            prompt_tokens: 5,
            output: String::new(),
            output_tokens: total,
            finish_reason: FinishReason::Stop,
        });
        let state = |x: u32| vec![x as f32 / 100.0; dim];
        w.push(i as u64, &id, Kind::PromptMean, 0, total, &state(total))
            .unwrap();
        for g in (0..total).step_by(8) {
            w.push(i as u64, &id, Kind::Token, g, total - g, &state(total - g))
                .unwrap();
        }
    }
    w.finish().unwrap();
    write_requests(&requests_path(dir), &rows).unwrap();
    let manifest = serde_json::json!({
        "kernel_id": "synthetic",
        "config": {"max_new_tokens": 256, "sample": "every:8"},
        "results": {"model_sha256": model_sha256},
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

#[test]
fn eval_mae_scores_models_and_checkpoints_on_other_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    synthetic_run(&a, 90, 15, false);
    synthetic_run(&b, 60, 10, false);
    let run_a = Run::open(&a).unwrap();
    suite::train_suite(&run_a, &config(), None, "test", &mut |_| {}).unwrap();
    let models = run_a.models_dir();

    // On its own test split: exactly what `trail report` measures, byte for byte.
    let own = tmp.path().join("own");
    mae::run(args(Some(&models), None, &a, "test", &own)).unwrap();
    let (want, _) = score_suite(&run_a, &opts()).unwrap();
    assert_eq!(
        std::fs::read_to_string(own.join("metrics.json")).unwrap(),
        serde_json::to_string_pretty(&want).unwrap()
    );

    // On another run: every request, every stored position.
    let other = tmp.path().join("other");
    mae::run(args(Some(&models), None, &b, "all", &other)).unwrap();
    let m = metrics(&other);
    let run_b = Run::open(&b).unwrap();
    assert_eq!(m.test.requests, 60);
    let positions: u32 = run_b
        .requests
        .iter()
        .map(|r| r.output_tokens.div_ceil(8))
        .sum();
    assert_eq!(m.test.pairs, positions as usize);
    let mae = |m: &Metrics, p: &str| m.test.mae_remaining[p].map(|i| i.value);
    assert!(mae(&m, "refined").unwrap() < mae(&m, "constant").unwrap());
    assert!(mae(&m, "probe_multi_layer").is_some());
    assert!(mae(&m, "bert_finetuned").is_none());
    for f in [
        "metrics.json",
        "report.md",
        "manifest.json",
        "mae_vs_generated.png",
        "confusion.png",
        "reliability.png",
    ] {
        assert!(other.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(other.join("report.md")).unwrap();
    assert!(md.contains("Split `all`: 60 requests"), "{md}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("manifest.json")).unwrap())
            .unwrap();
    let inputs: Vec<&str> = manifest["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert!(inputs.contains(&"requests.parquet"), "{inputs:?}");
    assert!(inputs.contains(&"models/layer=1.safetensors"), "{inputs:?}");

    // The exported checkpoint: the same probe and prompt predictor, the same refined estimate.
    let ckpt = tmp.path().join("predictor.safetensors");
    suite::export(&run_a, &ckpt, 8, "test", None, ProbeChoice::Layer).unwrap();
    let exported = tmp.path().join("exported");
    mae::run(args(None, Some(&ckpt), &b, "all", &exported)).unwrap();
    let e = metrics(&exported);
    for p in ["refined", "probe_no_refine", "prompt_embedding"] {
        assert_eq!(mae(&e, p), mae(&m, p), "{p}");
        assert!(mae(&e, p).is_some(), "{p}");
    }
    for p in [
        "bert_finetuned",
        "bert_frozen",
        "constant",
        "constant_conditional",
    ] {
        assert!(mae(&e, p).is_none(), "{p}");
    }
    assert_eq!(e.best_layer, 1);

    // Another model's run, another hidden size: clear errors naming the checkpoint.
    let (c, d) = (tmp.path().join("c"), tmp.path().join("d"));
    small_run(&c, DIM, &"cd".repeat(32));
    small_run(&d, DIM + 4, &"ab".repeat(32));
    let err = format!(
        "{:#}",
        mae::run(args(None, Some(&ckpt), &c, "all", &tmp.path().join("e1"))).unwrap_err()
    );
    assert!(
        err.contains("predictor.safetensors") && err.contains("model sha256"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        mae::run(args(Some(&models), None, &d, "all", &tmp.path().join("e2"))).unwrap_err()
    );
    assert!(
        err.contains("layer=1.safetensors") && err.contains(&format!("hidden size {DIM}")),
        "{err}"
    );
    // Too few requests in the chosen split.
    let f = tmp.path().join("f");
    small_run(&f, DIM, &"ab".repeat(32));
    let err = format!(
        "{:#}",
        mae::run(args(None, Some(&ckpt), &f, "val", &tmp.path().join("e3"))).unwrap_err()
    );
    assert!(
        err.contains("requests.parquet") && err.contains("split `val` has 0 request(s)"),
        "{err}"
    );
}
