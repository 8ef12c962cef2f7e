//! trail-checkpoints: a probe learns a separable task, training is reproducible bit for bit,
//! checkpoints round-trip and refuse the wrong model, hidden size or a damaged file.

use std::path::Path;

use trail_checkpoints::{
    Bins, Checkpoint, CheckpointMeta, Dataset, Error, Filter, Probe, RefineState, TrainConfig,
    split_by_group, train_probe,
};

/// xorshift64*: deterministic test data without extra dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Approximately N(0, 1): sum of 12 uniforms minus 6.
    fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.unit()).sum::<f32>() - 6.0
    }
}

/// `groups` requests × `per` rows; each request has a class c in 0..k whose rows sit around a
/// class centre (radius 3, unit noise) and whose target lengths lie inside bin c.
struct Synthetic {
    features: Vec<f32>,
    target: Vec<u32>,
    ids: Vec<String>,
    dim: usize,
}

fn synthetic(bins: &Bins, dim: usize, groups: usize, per: usize, seed: u64) -> Synthetic {
    let mut rng = Rng(seed | 1);
    let k = bins.k();
    let centres: Vec<Vec<f32>> = (0..k)
        .map(|_| (0..dim).map(|_| 3.0 * rng.normal()).collect())
        .collect();
    let w = bins.width();
    let (mut features, mut target, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..groups {
        let c = (rng.next() % k as u64) as usize;
        for _ in 0..per {
            features.extend(centres[c].iter().map(|&m| m + rng.normal()));
            // Offsets 1..w−1 inside the bin: the label is c.
            let off = 1.0 + rng.unit() as f64 * (w - 2.0);
            target.push((c as f64 * w + off) as u32);
            ids.push(format!("req-{g}"));
        }
    }
    Synthetic {
        features,
        target,
        ids,
        dim,
    }
}

fn small_config(seed: u64) -> TrainConfig {
    TrainConfig {
        hidden: 32,
        epochs: 6,
        batch: 32,
        patience: 6,
        seed,
        ..TrainConfig::default()
    }
}

fn train(s: &Synthetic, bins: &Bins, seed: u64) -> (Probe, trail_checkpoints::TrainReport) {
    let data = Dataset {
        features: &s.features,
        dim: s.dim,
        target: &s.target,
        cap: None,
    };
    let (tr, va) = split_by_group(&s.ids, 0.2, 0);
    train_probe(&data, &tr, &va, bins, &small_config(seed)).unwrap()
}

#[test]
fn probe_learns_gaussian_clusters() {
    let bins = Bins::new(4, 64).unwrap();
    let s = synthetic(&bins, 12, 300, 4, 7);
    let (probe, report) = train(&s, &bins, 0);
    let last = report.curve.last().unwrap();
    assert!(report.curve.len() >= 2);
    assert!(last.val_accuracy > 0.95, "{report:?}");
    // Bins are 16 wide; a confident, correct probe is within a few tokens of the truth.
    assert!(report.best_val_mae < 8.0, "{report:?}");
    assert!(report.train_rows_per_s > 0.0);
    // Loss falls, lr follows the cosine.
    assert!(report.curve[0].train_loss > last.train_loss);
    assert_eq!(report.curve[0].lr, 0.01);
    assert!(report.curve[1].lr < 0.01);
    // Batched inference agrees with the labels.
    let p = probe.predict_proba(&s.features[..40 * s.dim]).unwrap();
    assert_eq!(p.len(), 40 * bins.k());
    let hits = p
        .chunks_exact(bins.k())
        .zip(&s.target)
        .filter(|(row, t)| {
            let arg = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            arg as u32 == bins.label(**t)
        })
        .count();
    assert!(hits >= 38, "{hits}/40");
}

#[test]
fn same_data_and_seed_give_identical_weights() {
    let bins = Bins::new(4, 64).unwrap();
    let s = synthetic(&bins, 12, 100, 4, 11);
    let (a, ra) = train(&s, &bins, 3);
    let (b, rb) = train(&s, &bins, 3);
    let (c, _) = train(&s, &bins, 4);
    let bits = |p: &Probe| -> Vec<u32> {
        p.weights()
            .unwrap()
            .iter()
            .flatten()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(ra.best_epoch, rb.best_epoch);
    assert_eq!(ra.best_val_mae.to_bits(), rb.best_val_mae.to_bits());
    assert_ne!(bits(&a), bits(&c));
}

fn meta(bins: Bins, hidden: usize) -> CheckpointMeta {
    CheckpointMeta {
        model_sha256: "ab".repeat(32),
        kernel_id: "test-kernel".into(),
        probe_layers: vec![11],
        prompt_layers: vec![11],
        hidden_size: hidden,
        bins,
        refine_interval: 8,
        train_data_sha256: "cd".repeat(32),
        val_mae: 3.5,
        prompt_val_mae: Some(7.25),
        git_commit: "0123abc".into(),
        g_input: false,
        label_prior: None,
        likelihood_exponent: 0.0,
    }
}

fn trained_checkpoint() -> (Checkpoint, Synthetic) {
    let bins = Bins::new(4, 64).unwrap();
    let s = synthetic(&bins, 8, 60, 3, 5);
    let (probe, _) = train(&s, &bins, 1);
    let (prompt, _) = train(&s, &bins, 2);
    (
        Checkpoint {
            meta: meta(bins, 8),
            probe,
            prompt: Some(prompt),
        },
        s,
    )
}

#[test]
fn checkpoint_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.safetensors");
    let (ck, s) = trained_checkpoint();
    ck.save(&path).unwrap();
    let back = Checkpoint::load_for(&path, &"ab".repeat(32), 8).unwrap();
    assert_eq!(back.meta, ck.meta);
    assert_eq!(back.probe.weights().unwrap(), ck.probe.weights().unwrap());
    assert_eq!(back.probe.standardizer, ck.probe.standardizer);
    assert_eq!(
        back.prompt.as_ref().unwrap().weights().unwrap(),
        ck.prompt.as_ref().unwrap().weights().unwrap()
    );
    let x = &s.features[..5 * s.dim];
    assert_eq!(
        back.probe.predict_proba(x).unwrap(),
        ck.probe.predict_proba(x).unwrap()
    );
    // The loaded probes drive the filter.
    let f = Filter::new(
        back.meta.bins,
        back.meta.refine_interval,
        Default::default(),
    );
    let p0 = back
        .prompt
        .as_ref()
        .unwrap()
        .predict_proba(&s.features[..s.dim])
        .unwrap();
    let mut st = RefineState::new(&f, &p0, 64);
    st.advance(8);
    assert!(st.due(&f));
    st.refine(
        &f,
        &back
            .probe
            .predict_proba(&s.features[s.dim..2 * s.dim])
            .unwrap(),
    );
    let r = st.remaining(&f);
    assert!((0.0..=56.0).contains(&r), "{r}");
}

fn assert_names(e: &Error, path: &Path) {
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn checkpoint_refuses_other_model_hidden_size_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.safetensors");
    let (ck, _) = trained_checkpoint();
    ck.save(&path).unwrap();

    let e = Checkpoint::load_for(&path, &"ef".repeat(32), 8).unwrap_err();
    assert!(matches!(e, Error::ModelMismatch { .. }), "{e}");
    assert_names(&e, &path);
    let e = Checkpoint::load_for(&path, &"ab".repeat(32), 576).unwrap_err();
    assert!(
        matches!(
            e,
            Error::HiddenMismatch {
                expected: 576,
                found: 8,
                ..
            }
        ),
        "{e}"
    );
    assert_names(&e, &path);

    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = Checkpoint::load(&cut).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &cut);

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let e = Checkpoint::load(&junk).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert_names(&e, &junk);

    let missing = dir.path().join("missing.safetensors");
    let e = Checkpoint::load(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_names(&e, &missing);

    // Metadata that disagrees with the tensors is refused on save.
    let mut bad = ck.clone();
    bad.meta.hidden_size = 9;
    assert!(bad.save(&dir.path().join("bad.safetensors")).is_err());
}

/// Rewrites one metadata key of a saved checkpoint (`None` removes it).
fn patch_meta(src: &Path, dst: &Path, key: &str, value: Option<&str>) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = header["__metadata__"].as_object_mut().unwrap();
    match value {
        Some(v) => meta.insert(key.into(), v.into()),
        None => meta.remove(key),
    };
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(&text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

/// The committed v1 checkpoint (`reports/alpaca-smollm2/previous/predictor.safetensors`, the
/// reference before predictor v2) loads as v1 and
/// drives the paper's filter; a v1 checkpoint saved by this build is still version 1 with none
/// of v2's keys; a v2 one round-trips with its cap class, g input and calibrated likelihood;
/// a newer version is refused naming it and how to re-export, and a v2 key in a v1 file is
/// damage.
#[test]
fn format_versions_1_and_2_load_and_a_newer_one_is_refused() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../reports/alpaca-smollm2/previous/predictor.safetensors");
    let v1 = Checkpoint::load(&committed).unwrap();
    assert!(!v1.meta.is_v2());
    assert_eq!(v1.meta.format_version(), 1);
    assert_eq!(v1.meta.bins, Bins::default());
    assert!(v1.meta.filter(8).likelihood_weights().is_none());

    let dir = tempfile::tempdir().unwrap();
    let (ck, s) = trained_checkpoint();
    let p1 = dir.path().join("v1.safetensors");
    ck.save(&p1).unwrap();
    let bytes = std::fs::read(&p1).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let m = header["__metadata__"].as_object().unwrap();
    assert_eq!(m["format_version"], "1");
    for key in [
        "bins_cap_class",
        "g_input",
        "label_prior",
        "likelihood_exponent",
    ] {
        assert!(!m.contains_key(key), "{key} in a v1 file");
    }

    // v2: the cap class, g as input (two more probe inputs), a calibrated likelihood.
    let bins = Bins::new(4, 64).unwrap().with_cap_class();
    let s2 = Synthetic {
        features: s
            .features
            .chunks_exact(s.dim)
            .flat_map(|r| r.iter().copied().chain([0.5, 1.0]))
            .collect(),
        dim: s.dim + 2,
        target: s.target.clone(),
        ids: s.ids.clone(),
    };
    let (probe, _) = train(&s2, &bins, 1);
    let (prompt, _) = train(&s, &bins, 2);
    let mut meta2 = meta(bins, 8);
    meta2.g_input = true;
    meta2.label_prior = Some(vec![0.1, 0.2, 0.3, 0.2, 0.2]);
    meta2.likelihood_exponent = 0.75;
    let ck2 = Checkpoint {
        meta: meta2,
        probe,
        prompt: Some(prompt),
    };
    let p2 = dir.path().join("v2.safetensors");
    ck2.save(&p2).unwrap();
    let back = Checkpoint::load(&p2).unwrap();
    assert_eq!(back.meta, ck2.meta);
    assert_eq!(back.meta.format_version(), 2);
    assert_eq!(back.probe.k(), 5);
    let w = back.meta.filter(8);
    let w = w.likelihood_weights().unwrap();
    assert!((w[0] - 0.1f64.powf(-0.75)).abs() < 1e-12);

    // A newer version: refused, naming the version and how to re-export.
    let p3 = dir.path().join("v3.safetensors");
    patch_meta(&p2, &p3, "format_version", Some("3"));
    let e = Checkpoint::load(&p3).unwrap_err().to_string();
    assert!(e.contains("version 3") && e.contains("trail export"), "{e}");
    assert_names(&Checkpoint::load(&p3).unwrap_err(), &p3);
    // A v2 key in a file that says version 1.
    let bad = dir.path().join("v1-with-cap.safetensors");
    patch_meta(&p1, &bad, "bins_cap_class", Some("true"));
    let e = Checkpoint::load(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bins_cap_class") && e.contains("version 2"),
        "{e}"
    );
    // A v2 file whose probe does not read g but says it does: a shape error.
    let lie = dir.path().join("v2-no-g.safetensors");
    patch_meta(&p2, &lie, "g_input", Some("false"));
    assert!(Checkpoint::load(&lie).is_err());
}
