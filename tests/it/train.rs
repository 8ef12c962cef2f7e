//! `trail train` → `trail report` → `trail export` on small synthetic runs (the library calls
//! behind the stages): every fixed key of `metrics.json`, the exported checkpoint round trip,
//! resumption, bit-identical weights and metrics for the same data and seed, and clear errors
//! for NaN embeddings and too few requests in a split.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trail_checkpoints::Checkpoint;
use trail_checkpoints::scoring::{PREDICTORS, ScoreOptions, score_suite};
use trail_checkpoints::suite::{self, Event, ProbeChoice, Run, SuiteConfig, layer_files};
use trail_datasets::schema::{Dtype, FinishReason, Kind, RequestRow, requests_path};
use trail_datasets::split::Split;
use trail_datasets::store::{PartWriter, write_requests};

pub(crate) const DIM: usize = 12;
const LAYERS: [u32; 3] = [0, 1, 2];
const MAX_NEW: u32 = 256;

/// A synthetic run of `n` requests (splits by index: `val` and `test` each get `n_eval`).
/// Layer 1 holds the remaining length in feature 0 and the total in feature 1 (plus noise);
/// layer 0 is noise; layer 2 holds the total only. Optionally poisons one value with NaN.
pub(crate) fn synthetic_run(dir: &Path, n: usize, n_eval: usize, nan: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut rows = Vec::new();
    let mut w = PartWriter::new(dir, 0, &LAYERS, DIM, Dtype::F32);
    for i in 0..n {
        let split = if i < n - 2 * n_eval {
            Split::Train
        } else if i < n - n_eval {
            Split::Val
        } else {
            Split::Test
        };
        let total: u32 = rng.random_range(4..=MAX_NEW);
        let id = format!("req-{i:04}");
        rows.push(RequestRow {
            request_id: id.clone(),
            dataset: "synthetic".into(),
            split,
            prompt: format!("prompt {i}"),
            prompt_tokens: 10,
            output: String::new(),
            output_tokens: total,
            finish_reason: if total == MAX_NEW {
                FinishReason::Length
            } else {
                FinishReason::Stop
            },
        });
        let state = |remaining: u32, rng: &mut ChaCha8Rng| -> Vec<f32> {
            let mut v = Vec::with_capacity(LAYERS.len() * DIM);
            for layer in LAYERS {
                for j in 0..DIM {
                    let noise: f32 = rng.random_range(-0.05..0.05);
                    let x = match (layer, j) {
                        (1, 0) => remaining as f32 / 100.0,
                        (1, 1) | (2, 0) => total as f32 / 100.0,
                        _ => 0.0,
                    };
                    v.push(x + noise);
                }
            }
            v
        };
        let s = state(total, &mut rng);
        w.push(i as u64, &id, Kind::PromptMean, 0, total, &s)
            .unwrap();
        let mut g = 0;
        while g < total {
            let mut s = state(total - g, &mut rng);
            if nan && i == 3 && g == 8 {
                s[5] = f32::NAN;
            }
            w.push(i as u64, &id, Kind::Token, g, total - g, &s)
                .unwrap();
            g += 8;
        }
    }
    w.finish().unwrap();
    write_requests(&requests_path(dir), &rows).unwrap();
    let manifest = serde_json::json!({
        "kernel_id": "synthetic",
        "config": {"max_new_tokens": MAX_NEW, "sample": "every:8"},
        "results": {"model_sha256": "ab".repeat(32)},
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

pub(crate) fn config() -> SuiteConfig {
    SuiteConfig {
        epochs: 6,
        bert_frozen: false,
        bert_tune: None,
        multi_layer: 2,
        ..SuiteConfig::default()
    }
}

pub(crate) fn opts() -> ScoreOptions {
    ScoreOptions {
        bootstrap: 200,
        ..ScoreOptions::default()
    }
}

#[test]
fn train_report_export_round_trip_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    synthetic_run(&a, 90, 15, false);
    synthetic_run(&b, 90, 15, false);
    let cfg = config();

    let run_a = Run::open(&a).unwrap();
    let t0 = std::time::Instant::now();
    let maes = suite::train_suite(&run_a, &cfg, None, "test", &mut |_| {}).unwrap();
    eprintln!(
        "trained {} layers in {:?}: {maes:?}",
        maes.len(),
        t0.elapsed()
    );
    assert_eq!(maes.len(), 3);
    let (m, details) = score_suite(&run_a, &opts()).unwrap();
    assert_eq!(
        m.best_layer, 1,
        "layer 1 holds the remaining length: {maes:?}"
    );

    // Every fixed key of metrics.json is there (BERT's null: trained without it).
    let v = serde_json::to_value(&m).unwrap();
    assert!(v["best_layer"].is_u64());
    assert_eq!(v["per_layer_val_mae_tokens"].as_object().unwrap().len(), 3);
    for table in [
        "mae_remaining_tokens",
        "mae_at_start_tokens",
        "kendall_tau_at_start",
    ] {
        for p in PREDICTORS {
            assert!(
                v["test"][table].get(p).is_some(),
                "test.{table}.{p} missing: {}",
                v["test"][table]
            );
        }
    }
    assert!(v["test"].get("ratio_bert_finetuned_over_refined").is_some());
    assert!(v["test"]["mae_remaining_tokens"]["bert_finetuned"].is_null());
    assert!(v["test"]["mae_remaining_tokens"]["refined_every_token"].is_null());
    let mae = |p: &str| m.test.mae_remaining[p].unwrap();
    eprintln!(
        "refined {:?}, probe {:?}, prompt {:?}, constant {:?}",
        mae("refined"),
        mae("probe_no_refine"),
        mae("prompt_embedding"),
        mae("constant")
    );
    assert!(mae("refined").value < mae("constant").value);
    assert!(mae("probe_no_refine").value < mae("constant_conditional").value);
    let r = mae("refined");
    assert!(r.lo <= r.value && r.value <= r.hi);
    assert_eq!(details.confusion.len(), 10);
    assert!(m.test.mae_remaining.contains_key("probe_multi_layer"));

    // Export and read back, for the right model only.
    let out = tmp.path().join("predictor.safetensors");
    let e = suite::export(&run_a, &out, 8, "test", None, ProbeChoice::Layer).unwrap();
    assert_eq!(e.layers, vec![1]);
    let c = Checkpoint::load_for(&out, &"ab".repeat(32), DIM).unwrap();
    assert_eq!(c.meta.probe_layers, vec![1]);
    assert_eq!(c.meta.kernel_id, "synthetic");
    assert_eq!(c.meta.refine_interval, 8);
    assert!(c.prompt.is_some());
    assert!(Checkpoint::load_for(&out, &"cd".repeat(32), DIM).is_err());
    assert!(Checkpoint::load_for(&out, &"ab".repeat(32), DIM + 1).is_err());

    // The multi-layer probe, and `best`: the lower validation MAE of the two.
    let multi = tmp.path().join("multi.safetensors");
    let em = suite::export(&run_a, &multi, 8, "test", None, ProbeChoice::Multi).unwrap();
    assert_eq!(em.layers.len(), 2);
    let cm = Checkpoint::load_for(&multi, &"ab".repeat(32), DIM).unwrap();
    assert_eq!(cm.meta.probe_layers.len(), 2);
    let best = tmp.path().join("best.safetensors");
    let eb = suite::export(&run_a, &best, 8, "test", None, ProbeChoice::Best).unwrap();
    let winner = if em.val_mae < e.val_mae { &em } else { &e };
    assert_eq!(eb.layers, winner.layers);

    // Resumed: nothing is retrained.
    let mut events = Vec::new();
    suite::train_suite(&run_a, &cfg, None, "test", &mut |e| events.push(e)).unwrap();
    assert!(
        events.iter().all(|e| matches!(e, Event::Skipped { .. })),
        "{events:?}"
    );

    // The same data and seed elsewhere: the same weights and the same metrics.json.
    let run_b = Run::open(&b).unwrap();
    suite::train_suite(&run_b, &cfg, None, "test", &mut |_| {}).unwrap();
    for l in LAYERS {
        let wa = Checkpoint::load(&layer_files(&run_a.models_dir(), l).0).unwrap();
        let wb = Checkpoint::load(&layer_files(&run_b.models_dir(), l).0).unwrap();
        assert_eq!(wa.probe.weights().unwrap(), wb.probe.weights().unwrap());
        assert_eq!(
            wa.prompt.unwrap().weights().unwrap(),
            wb.prompt.unwrap().weights().unwrap()
        );
    }
    let (mb, _) = score_suite(&run_b, &opts()).unwrap();
    assert_eq!(
        serde_json::to_string_pretty(&m).unwrap(),
        serde_json::to_string_pretty(&mb).unwrap()
    );
}

/// Predictor v2 end to end on a synthetic run: the suite trains the cap class, the g input and
/// the calibrated likelihood into its checkpoints (format version 2, the calibration fitted on
/// validation in the record), scores them with the filter they carry, and exports them as
/// they were trained; a subsample of the training requests trains on fewer rows only.
#[test]
fn predictor_v2_trains_scores_and_exports_its_features() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path(), 90, 15, false);
    let run = Run::open(tmp.path()).unwrap();
    let cfg = SuiteConfig {
        cap_class: true,
        g_input: true,
        calibrate: true,
        multi_layer: 0,
        ..config()
    };
    suite::train_suite(&run, &cfg, None, "test", &mut |_| {}).unwrap();
    let rec = suite::read_layer_record(&layer_files(&run.models_dir(), 1).1).unwrap();
    let cal = rec.calibration.as_ref().expect("calibrated on validation");
    assert_eq!(cal.prior.len(), 11);
    assert!((cal.prior.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    let kept = cal
        .val_mae
        .iter()
        .find(|v| v.0 == cal.exponent)
        .expect("the kept exponent was tried");
    assert!(cal.val_mae.iter().all(|v| v.1 >= kept.1), "{cal:?}");

    let (m, details) = score_suite(&run, &opts()).unwrap();
    assert_eq!(
        details.confusion.len(),
        11,
        "ten length bins and the cap class"
    );
    let refined = m.test.mae_remaining["refined"].unwrap();
    let constant = m.test.mae_remaining["constant"].unwrap();
    assert!(
        refined.value < constant.value,
        "{refined:?} vs {constant:?}"
    );

    let out = tmp.path().join("v2.safetensors");
    suite::export(&run, &out, 8, "test", None, ProbeChoice::Layer).unwrap();
    let c = Checkpoint::load_for(&out, &"ab".repeat(32), DIM).unwrap();
    assert_eq!(c.meta.format_version(), 2);
    assert!(c.meta.bins.cap_class() && c.meta.g_input);
    assert_eq!(c.probe.dim(), DIM + 2);
    assert_eq!(c.probe.k(), 11);
    assert_eq!(c.meta.label_prior.as_deref(), Some(&cal.prior[..]));
    assert_eq!(c.meta.likelihood_exponent, cal.exponent);

    // The learning curve's subsample: 30 of the 60 training requests, validation untouched.
    let half = tmp.path().join("half");
    synthetic_run(&half, 90, 15, false);
    let run_h = Run::open(&half).unwrap();
    let cfg_h = SuiteConfig {
        train_requests: Some(30),
        ..cfg.clone()
    };
    assert_eq!(suite::kept_train(&run_h, &cfg_h).len(), 30);
    suite::train_suite(&run_h, &cfg_h, None, "test", &mut |_| {}).unwrap();
    let rec_h = suite::read_layer_record(&layer_files(&run_h.models_dir(), 1).1).unwrap();
    assert!(rec_h.token_rows[0] < rec.token_rows[0]);
    assert_eq!(rec_h.token_rows[1], rec.token_rows[1]);
}

#[test]
fn nan_embeddings_are_named_by_file() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path(), 40, 8, true);
    let run = Run::open(tmp.path()).unwrap();
    let err = suite::train_suite(&run, &config(), None, "test", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer=0") && err.contains("part-00000.parquet") && err.contains("NaN"),
        "{err}"
    );
    assert!(err.contains("req-0003"), "{err}");
}

#[test]
fn too_few_requests_in_a_split_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path(), 30, 1, false);
    let run = Run::open(tmp.path()).unwrap();
    let err = suite::train_suite(&run, &config(), None, "test", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("requests.parquet") && err.contains("split `val` has 1 request"),
        "{err}"
    );
}

#[test]
fn kendall_tau_b_and_paired_bootstrap() {
    use trail_checkpoints::metrics::{Bootstrap, ErrorSums, kendall_tau_b};
    // x = 1,2,2,3; y = 1,3,2,4: 6 pairs, 1 tied in x, 5 concordant → 5/√30.
    let t = kendall_tau_b(&[1., 2., 2., 3.], &[1., 3., 2., 4.]).unwrap();
    assert!((t - 5.0 / 30f64.sqrt()).abs() < 1e-12);
    assert_eq!(kendall_tau_b(&[5., 5., 5.], &[1., 2., 3.]), None);
    let mut e = ErrorSums::new(40);
    for i in 0..40 {
        e.add(i, i as f64);
    }
    let b = Bootstrap::new(40, 300, 1);
    let iv = b.interval(|idx| e.mae(idx)).unwrap();
    assert!((iv.value - 19.5).abs() < 1e-12 && iv.lo < 19.5 && 19.5 < iv.hi);
    assert_eq!(b.interval(|idx| e.mae(idx)), Some(iv));
}
