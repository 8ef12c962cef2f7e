//! The predictors of one generated run, trained into `runs/NAME/models/`.
//!
//! A run directory (see `trail_datasets::store`) holds `requests.parquet` and per-layer
//! embeddings. [`train_suite`] trains, for every stored layer, the token probe (remaining
//! length from a generated token's state) and the prompt predictor (total length from the mean
//! of the prompt's states) on the train split, early-stopped on validation MAE; then the BERT
//! baselines on the prompt text (frozen sentence embedding → MLP, and fine-tuned end to end);
//! optionally a probe on the best few layers together. Files in `models/`:
//!
//! | file | what |
//! |---|---|
//! | `config.json` | the [`SuiteConfig`] |
//! | `layer=L.safetensors` | [`Checkpoint`] with the token probe and the prompt predictor of layer L |
//! | `layer=L.json` | [`LayerRecord`]: training curves, row counts, data hashes, resume key |
//! | `multi.safetensors`, `multi.json` | the multi-layer probe, same formats |
//! | `bert-frozen.safetensors`, `bert-frozen.json` | frozen MiniLM → MLP head ([`BertRecord`]) |
//! | `bert-finetuned.safetensors`, `bert-finetuned.json` | fine-tuned MiniLM with its head |
//! | `bert-finetuned-v1bins.safetensors`, `.json` | with the cap class (v2): the same BERT on v1's bins (the paper's comparison) |
//!
//! The BERT records carry their bin probabilities for every validation and test prompt, so
//! scoring needs no BERT forward. Training resumes: a predictor whose record holds the same
//! key (sha256 of its configuration and of `requests.parquet`) and whose weights load is
//! skipped. Embeddings are checked as they are read: NaN or inf, a dimension that changes
//! between files, or a row without its request is an [`Error::Data`] naming the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trail_datasets::schema::requests_path;
use trail_datasets::{Kind, RequestRow, Split, store};

use crate::bert::BertEncoder;
use crate::bert_tune::{self, Prompts, TuneConfig};
use crate::calibrate;
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::probe::concat_features;
use crate::train::{Dataset, TrainConfig, TrainReport, train_probe};
use crate::{Bins, Error, Probe, Result};

/// `runs/NAME/models`.
pub const MODELS_DIR: &str = "models";

/// Everything that decides the trained weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteConfig {
    /// Layers to train; `None`: every stored layer.
    pub layers: Option<Vec<u32>>,
    pub bins_k: usize,
    pub bins_max: u32,
    pub hidden: usize,
    pub epochs: usize,
    /// Batch of the token probes.
    pub batch: usize,
    /// Batch of the prompt predictors (one row per request: far fewer rows than the probes).
    #[serde(default = "default_prompt_batch")]
    pub prompt_batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub patience: usize,
    pub seed: u64,
    /// Train the frozen-BERT baseline (needs `bert_dir`).
    pub bert_frozen: bool,
    /// Fine-tune BERT with these settings (needs `bert_dir`); `None`: skip.
    pub bert_tune: Option<TuneConfig>,
    /// Train a probe on the best this-many layers together (0 or 1: none).
    pub multi_layer: usize,
    /// Fewest requests with embeddings each split must hold.
    pub min_requests: usize,
    /// Predictor v2: a "runs to the cap" class after the length bins ([`Bins::with_cap_class`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub cap_class: bool,
    /// Predictor v2: the token probes also read the tokens generated
    /// ([`crate::checkpoint::g_features`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub g_input: bool,
    /// Predictor v2: fit the filter's calibrated likelihood on validation ([`crate::calibrate`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub calibrate: bool,
    /// Train on at most this many training requests (a seeded subsample of the train split;
    /// validation and test untouched): the learning curve. `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_requests: Option<usize>,
    /// With the cap class, skip the fine-tuned BERT on v1's bins (the learning curve needs
    /// only the like-for-like one).
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_bert_v1_bins: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for SuiteConfig {
    fn default() -> Self {
        let t = TrainConfig::default();
        Self {
            layers: None,
            bins_k: 10,
            bins_max: 512,
            hidden: t.hidden,
            epochs: t.epochs,
            batch: t.batch,
            prompt_batch: t.batch,
            lr: t.lr,
            weight_decay: t.weight_decay,
            patience: t.patience,
            seed: 0,
            bert_frozen: true,
            bert_tune: Some(TuneConfig::default()),
            multi_layer: 3,
            min_requests: 3,
            cap_class: false,
            g_input: false,
            calibrate: false,
            train_requests: None,
            no_bert_v1_bins: false,
        }
    }
}

fn default_prompt_batch() -> usize {
    TrainConfig::default().batch
}

impl SuiteConfig {
    pub fn bins(&self) -> Result<Bins> {
        let b = Bins::new(self.bins_k, self.bins_max)?;
        Ok(if self.cap_class {
            b.with_cap_class()
        } else {
            b
        })
    }

    /// The predictor v2 settings, as a key part: empty for a v1 configuration, so v1 resume
    /// keys are what they were.
    fn v2_part(&self) -> String {
        let v2 = self.cap_class || self.g_input || self.calibrate || self.train_requests.is_some();
        if !v2 {
            return String::new();
        }
        serde_json::json!({
            "cap_class": self.cap_class, "g_input": self.g_input, "calibrate": self.calibrate,
            "train_requests": self.train_requests,
        })
        .to_string()
    }

    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            hidden: self.hidden,
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            weight_decay: self.weight_decay,
            patience: self.patience,
            seed: self.seed,
            ..TrainConfig::default()
        }
    }

    /// The predictor v2 settings a BERT baseline depends on (its classes and its data).
    fn bert_part(&self) -> String {
        if !self.cap_class && self.train_requests.is_none() {
            return String::new();
        }
        serde_json::json!({"cap_class": self.cap_class, "train_requests": self.train_requests})
            .to_string()
    }

    /// The part of the configuration a probe's weights depend on.
    fn probe_part(&self) -> String {
        let v1 = serde_json::json!({
            "bins": [self.bins_k, self.bins_max], "hidden": self.hidden, "epochs": self.epochs,
            "batch": self.batch, "prompt_batch": self.prompt_batch, "lr": self.lr, "weight_decay": self.weight_decay,
            "patience": self.patience, "seed": self.seed,
        });
        format!("{v1}{}", self.v2_part())
    }
}

/// What the run's own manifest says about the model (defaults where a run has none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub model_sha256: String,
    pub kernel_id: String,
    /// `max_new_tokens` of the generation (else the longest output).
    pub max_new_tokens: u32,
    /// `--sample` of the generation (`every:8`, `all`...), when known.
    pub sample: Option<String>,
    /// sha256 of `requests.parquet`.
    pub requests_sha256: String,
}

/// A run's requests and what is known about how they were generated.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub requests: Vec<RequestRow>,
    pub index: HashMap<String, usize>,
    pub info: RunInfo,
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// sha256 of a file, hex (streamed by `trail_fs`).
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(trail_fs::sha256_file(path)?)
}

/// A run's `manifest.json`, `Null` when it is absent or unreadable (runs made by other tools).
fn read_manifest(dir: &Path) -> serde_json::Value {
    std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// The cap the run in `dir` was generated under: its manifest's `--max-new-tokens`, else the
/// longest output of `requests`.
pub fn generation_cap(dir: &Path, requests: &[RequestRow]) -> Result<u32> {
    cap_from(&read_manifest(dir), dir, requests)
}

fn cap_from(manifest: &serde_json::Value, dir: &Path, requests: &[RequestRow]) -> Result<u32> {
    match manifest["config"]["max_new_tokens"].as_u64() {
        None => Ok(requests.iter().map(|r| r.output_tokens).max().unwrap_or(0)),
        Some(n) => u32::try_from(n).map_err(|_| Error::Data {
            path: dir.join("manifest.json"),
            msg: format!("config.max_new_tokens = {n} does not fit 32 bits"),
        }),
    }
}

impl Run {
    /// Read `requests.parquet` and `manifest.json` (optional) of a run directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let requests = store::read_requests_dirs(&[dir])?;
        let index = requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.request_id.clone(), i))
            .collect();
        let manifest = read_manifest(dir);
        let info = RunInfo {
            model_sha256: manifest["results"]["model_sha256"]
                .as_str()
                .unwrap_or("unknown")
                .to_string(),
            kernel_id: manifest["kernel_id"]
                .as_str()
                .unwrap_or("unknown")
                .to_string(),
            max_new_tokens: cap_from(&manifest, dir, &requests)?,
            sample: manifest["config"]["sample"].as_str().map(str::to_string),
            requests_sha256: sha256_file(&requests_path(dir))?,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            requests,
            index,
            info,
        })
    }

    /// The stored layers.
    pub fn layers(&self) -> Result<Vec<u32>> {
        Ok(store::list_layers(&self.dir)?)
    }

    pub fn models_dir(&self) -> PathBuf {
        self.dir.join(MODELS_DIR)
    }

    /// Indices of the requests of `split`.
    pub fn split_requests(&self, split: Split) -> Vec<usize> {
        (0..self.requests.len())
            .filter(|&i| self.requests[i].split == split)
            .collect()
    }
}

/// Rows of one kind of one layer: request index, g, remaining, and features (row-major).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub request: Vec<u32>,
    pub g: Vec<u32>,
    pub remaining: Vec<u32>,
    pub dim: usize,
    pub features: Vec<f32>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.g.len()
    }

    pub fn is_empty(&self) -> bool {
        self.g.is_empty()
    }

    /// Row indices whose request is in `split`.
    pub fn of_split(&self, run: &Run, split: Split) -> Vec<usize> {
        (0..self.len())
            .filter(|&r| run.requests[self.request[r] as usize].split == split)
            .collect()
    }

    /// `max_new − g` per row.
    pub fn caps(&self, max_new: u32) -> Vec<u32> {
        self.g.iter().map(|&g| max_new.saturating_sub(g)).collect()
    }

    /// sha256 of the rows as a training set.
    pub fn sha256(&self, max_new: u32) -> String {
        let caps = self.caps(max_new);
        Dataset {
            features: &self.features,
            dim: self.dim,
            target: &self.remaining,
            cap: Some(&caps),
        }
        .sha256()
    }
}

/// One layer's token and prompt-mean rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerRows {
    pub layer: u32,
    pub token: Rows,
    pub prompt: Rows,
}

/// Read one layer of a run, checking every value (see the module docs).
pub fn load_layer(run: &Run, layer: u32) -> Result<LayerRows> {
    let parts = store::layer_parts(&run.dir, layer)?;
    if parts.is_empty() {
        return Err(Error::Data {
            path: trail_datasets::schema::layer_dir(&run.dir, layer),
            msg: "no embedding parts".into(),
        });
    }
    let mut out = LayerRows {
        layer,
        ..Default::default()
    };
    let mut dim = None;
    for part in parts {
        let t = store::read_layer_file(&part)?;
        match dim {
            None => dim = Some(t.dim),
            Some(d) if d != t.dim => {
                return Err(Error::Data {
                    path: part,
                    msg: format!("embedding dimension {}, earlier parts have {d}", t.dim),
                });
            }
            _ => {}
        }
        for i in 0..t.len() {
            let id = &t.request_ids[i];
            let row = t.row(i);
            if let Some(j) = row.iter().position(|v| !v.is_finite()) {
                return Err(Error::Data {
                    path: part,
                    msg: format!(
                        "row {i} (request {id}, {} at g = {}): embedding value {j} is {}",
                        t.kind[i], t.g[i], row[j]
                    ),
                });
            }
            let Some(&req) = run.index.get(id) else {
                return Err(Error::Data {
                    path: part,
                    msg: format!("row {i}: request {id} is not in requests.parquet"),
                });
            };
            let rows = match t.kind[i] {
                Kind::Token => &mut out.token,
                Kind::PromptMean => &mut out.prompt,
            };
            rows.request.push(req as u32);
            rows.g.push(t.g[i]);
            rows.remaining.push(t.remaining[i]);
            rows.features.extend_from_slice(row);
        }
    }
    let dim = dim.unwrap_or(0);
    out.token.dim = dim;
    out.prompt.dim = dim;
    Ok(out)
}

/// Fail unless every split holds at least `min` requests with rows.
pub fn check_splits(run: &Run, rows: &Rows, min: usize, what: &str) -> Result<()> {
    for split in [Split::Train, Split::Val, Split::Test] {
        let mut seen: Vec<bool> = vec![false; run.requests.len()];
        for &r in &rows.request {
            if run.requests[r as usize].split == split {
                seen[r as usize] = true;
            }
        }
        let n = seen.iter().filter(|&&s| s).count();
        if n < min {
            return Err(Error::Data {
                path: requests_path(&run.dir),
                msg: format!(
                    "split `{}` has {n} request(s) with {what} rows; training and scoring need at least {min}",
                    split.as_str()
                ),
            });
        }
    }
    Ok(())
}

/// What training one layer (or the multi-layer probe) produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Resume key: sha256 of the probe configuration, `requests.parquet` and the layers.
    pub key: String,
    pub layers: Vec<u32>,
    pub token: TrainReport,
    pub prompt: TrainReport,
    /// Train / validation rows.
    pub token_rows: [usize; 2],
    pub prompt_rows: [usize; 2],
    pub token_data_sha256: String,
    pub prompt_data_sha256: String,
    pub seconds: f64,
    /// The filter's calibrated likelihood fitted on validation (predictor v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<calibrate::Calibration>,
}

/// What training a BERT baseline produced, with its validation and test predictions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertRecord {
    pub key: String,
    pub report: TrainReport,
    /// Bin probabilities per request id (validation and test prompts).
    pub predictions: BTreeMap<String, Vec<f32>>,
    pub seconds: f64,
}

/// Progress of [`train_suite`].
#[derive(Debug, Clone)]
pub enum Event {
    /// Starting predictor `name` (`i` of `n`).
    Start { name: String, i: usize, n: usize },
    /// Predictor `name` was already trained with the same key.
    Skipped { name: String },
    /// Predictor `name` done; `val_mae` of its selected weights.
    Done { name: String, val_mae: f64 },
    /// A BERT fine-tuning step.
    BertStep(bert_tune::Step),
}

/// Where the BERT assets are.
#[derive(Debug, Clone)]
pub struct BertAssets {
    /// config.json, tokenizer.json, model.safetensors.
    pub dir: PathBuf,
}

/// `models/layer=L.safetensors` and `.json`.
pub fn layer_files(models: &Path, layer: u32) -> (PathBuf, PathBuf) {
    (
        models.join(format!("layer={layer}.safetensors")),
        models.join(format!("layer={layer}.json")),
    )
}

fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(trail_fs::write_atomic(path, text.as_bytes())?)
}

/// A layer record, if present and readable.
pub fn read_layer_record(path: &Path) -> Option<LayerRecord> {
    read_json(path)
}

/// A BERT record, if present and readable.
pub fn read_bert_record(path: &Path) -> Option<BertRecord> {
    read_json(path)
}

/// Validation MAE of each trained layer's token probe, from the records in `models`.
pub fn layer_val_maes(models: &Path, layers: &[u32]) -> Vec<(u32, f64)> {
    layers
        .iter()
        .filter_map(|&l| {
            read_layer_record(&layer_files(models, l).1).map(|r| (l, r.token.best_val_mae))
        })
        .collect()
}

/// The training requests `cfg` keeps: all, or its `train_requests` of them, a seeded shuffle's
/// prefix (so a smaller subsample is part of every larger one).
pub fn kept_train(run: &Run, cfg: &SuiteConfig) -> Vec<usize> {
    let mut train = run.split_requests(Split::Train);
    if let Some(n) = cfg.train_requests.filter(|&n| n < train.len()) {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        train.shuffle(&mut rng);
        train.truncate(n);
        train.sort_unstable();
    }
    train
}

impl Rows {
    /// The same rows with the tokens generated appended to each row's features
    /// ([`crate::checkpoint::g_features`]).
    pub fn with_g_input(&self, max: u32) -> Rows {
        let mut features = Vec::with_capacity(self.len() * (self.dim + 2));
        for (row, &g) in self.features.chunks_exact(self.dim.max(1)).zip(&self.g) {
            features.extend_from_slice(row);
            features.extend_from_slice(&crate::checkpoint::g_features(g, max));
        }
        Rows {
            features,
            dim: self.dim + 2,
            ..self.clone()
        }
    }
}

/// `cfg` with v1's bins (no cap class): the paper's BERT comparison.
fn v1_bins(cfg: &SuiteConfig) -> SuiteConfig {
    SuiteConfig {
        cap_class: false,
        ..cfg.clone()
    }
}

/// Train a token probe and a prompt predictor on `rows` and save them.
fn train_pair(
    run: &Run,
    cfg: &SuiteConfig,
    rows: &LayerRows,
    layers: &[u32],
    key: String,
    files: (&Path, &Path),
    git_commit: &str,
) -> Result<LayerRecord> {
    let t0 = Instant::now();
    let bins = cfg.bins()?;
    let tc = cfg.train_config();
    let max_new = run.info.max_new_tokens;
    let kept = kept_train(run, cfg);
    let mut keep = vec![false; run.requests.len()];
    for &r in &kept {
        keep[r] = true;
    }
    let train_of = |r: &Rows| -> Vec<usize> {
        (0..r.len())
            .filter(|&i| keep[r.request[i] as usize])
            .collect()
    };
    let fit_with =
        |r: &Rows, tc: &TrainConfig| -> Result<(Probe, TrainReport, [usize; 2], String)> {
            let caps = r.caps(max_new);
            let data = Dataset {
                features: &r.features,
                dim: r.dim,
                target: &r.remaining,
                cap: Some(&caps),
            };
            let (train, val) = (train_of(r), r.of_split(run, Split::Val));
            let (p, rep) = train_probe(&data, &train, &val, &bins, tc)?;
            Ok((p, rep, [train.len(), val.len()], data.sha256()))
        };
    let token_rows = if cfg.g_input {
        std::borrow::Cow::Owned(rows.token.with_g_input(bins.max()))
    } else {
        std::borrow::Cow::Borrowed(&rows.token)
    };
    let (probe, token, token_rows_n, token_sha) = fit_with(&token_rows, &tc)?;
    let (prompt, prompt_rep, prompt_rows, prompt_sha) = fit_with(
        &rows.prompt,
        &TrainConfig {
            batch: cfg.prompt_batch,
            ..tc.clone()
        },
    )?;
    let mut meta = CheckpointMeta {
        model_sha256: run.info.model_sha256.clone(),
        kernel_id: run.info.kernel_id.clone(),
        probe_layers: layers.iter().map(|&l| l as usize).collect(),
        prompt_layers: layers.iter().map(|&l| l as usize).collect(),
        hidden_size: rows.token.dim / layers.len().max(1),
        bins,
        refine_interval: 8,
        train_data_sha256: token_sha.clone(),
        val_mae: token.best_val_mae,
        prompt_val_mae: Some(prompt_rep.best_val_mae),
        git_commit: git_commit.to_string(),
        g_input: cfg.g_input,
        label_prior: None,
        likelihood_exponent: 0.0,
    };
    let calibration = if cfg.calibrate {
        let caps = token_rows.caps(max_new);
        let prior = calibrate::label_frequencies(
            &bins,
            &token_rows.remaining,
            &caps,
            &train_of(&token_rows),
        );
        let tracks = val_tracks(run, &token_rows, &rows.prompt, &probe, &prompt, max_new)?;
        let cal = calibrate::fit_exponent(&meta.filter(meta.refine_interval), prior, &tracks);
        meta.label_prior = Some(cal.prior.clone());
        meta.likelihood_exponent = cal.exponent;
        Some(cal)
    } else {
        None
    };
    let ckpt = Checkpoint {
        meta,
        probe,
        prompt: Some(prompt),
    };
    ckpt.save(files.0)?;
    let record = LayerRecord {
        key,
        layers: layers.to_vec(),
        token,
        prompt: prompt_rep,
        token_rows: token_rows_n,
        prompt_rows,
        token_data_sha256: token_sha,
        prompt_data_sha256: prompt_sha,
        seconds: t0.elapsed().as_secs_f64(),
        calibration,
    };
    write_json(files.1, &record)?;
    Ok(record)
}

/// The validation requests as the filter sees them: the prompt predictor's output and the
/// probe's at each stored row, g ascending ([`calibrate::Track`]).
fn val_tracks(
    run: &Run,
    token: &Rows,
    prompt_rows: &Rows,
    probe: &Probe,
    prompt: &Probe,
    max_new: u32,
) -> Result<Vec<calibrate::Track>> {
    let mut prompt_of: HashMap<u32, usize> = HashMap::new();
    for r in prompt_rows.of_split(run, Split::Val) {
        prompt_of.entry(prompt_rows.request[r]).or_insert(r);
    }
    let mut by_req: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for r in token.of_split(run, Split::Val) {
        by_req.entry(token.request[r]).or_default().push(r);
    }
    let k = probe.k();
    let mut tracks = Vec::new();
    for (req, mut rs) in by_req {
        let Some(&p) = prompt_of.get(&req) else {
            continue;
        };
        rs.sort_by_key(|&r| token.g[r]);
        let d = token.dim;
        let x: Vec<f32> = rs
            .iter()
            .flat_map(|&r| token.features[r * d..(r + 1) * d].iter().copied())
            .collect();
        let probs = crate::schedule::probe_rows(probe, &x)?;
        let pd = prompt_rows.dim;
        let pp = crate::schedule::probe_rows(prompt, &prompt_rows.features[p * pd..(p + 1) * pd])?;
        tracks.push(calibrate::Track {
            prompt: pp,
            rows: rs
                .iter()
                .zip(probs.chunks_exact(k))
                .map(|(&r, c)| (token.g[r], c.to_vec(), token.remaining[r]))
                .collect(),
            cap: max_new,
        });
    }
    Ok(tracks)
}

/// One predictor [`train_suite`] trains, in the order it trains them.
enum Job<'a> {
    /// The token probe and prompt predictor of one layer.
    Layer(u32),
    /// The probe on the best `multi_layer` layers together (chosen once the layers are done).
    Multi,
    /// The frozen MiniLM embedding with an MLP head.
    BertFrozen,
    /// MiniLM fine-tuned end to end.
    BertTuned(&'a TuneConfig),
    /// With the cap class: MiniLM fine-tuned on v1's bins too (the paper's comparison; the
    /// like-for-like one is [`Job::BertTuned`] on the suite's bins).
    BertTunedV1Bins(&'a TuneConfig),
}

/// A job made concrete: its name, files and resume key.
struct Planned {
    name: String,
    weights: PathBuf,
    record: PathBuf,
    key: String,
    /// The layers a probe job reads (empty for BERT).
    layers: Vec<u32>,
}

/// What every job reads: the run, the configuration, and (made once, when the first BERT job
/// needs it) the prompts the BERT baselines train on.
struct Suite<'a> {
    run: &'a Run,
    cfg: &'a SuiteConfig,
    bert: Option<&'a BertAssets>,
    git_commit: &'a str,
    models: PathBuf,
    probe_cfg: String,
    layers: Vec<u32>,
    prompts: Option<BertPrompts<'a>>,
}

/// The BERT baselines' data: prompt texts, total lengths, splits, the base model's hash.
struct BertPrompts<'a> {
    assets: &'a BertAssets,
    texts: Vec<&'a str>,
    totals: Vec<u32>,
    train: Vec<usize>,
    val: Vec<usize>,
    /// Validation then test requests: the rows whose predictions the record keeps.
    scored: Vec<usize>,
    sha: String,
}

/// Train every predictor of `run` into `run/models/` (see the module docs); returns the
/// per-layer validation MAEs.
pub fn train_suite(
    run: &Run,
    cfg: &SuiteConfig,
    bert: Option<&BertAssets>,
    git_commit: &str,
    progress: &mut dyn FnMut(Event),
) -> Result<Vec<(u32, f64)>> {
    let models = run.models_dir();
    std::fs::create_dir_all(&models).map_err(|e| io_err(&models, e))?;
    write_json(&models.join("config.json"), cfg)?;
    let mut suite = Suite {
        run,
        cfg,
        bert,
        git_commit,
        models,
        probe_cfg: cfg.probe_part(),
        layers: suite_layers(run, cfg)?,
        prompts: None,
    };
    let jobs = suite.jobs();
    for (i, job) in jobs.iter().enumerate() {
        let plan = suite.plan(job)?;
        if suite.fresh(job, &plan) {
            progress(Event::Skipped { name: plan.name });
            continue;
        }
        progress(Event::Start {
            name: plan.name.clone(),
            i: i + 1,
            n: jobs.len(),
        });
        let val_mae = suite.train(job, &plan, progress)?;
        progress(Event::Done {
            name: plan.name,
            val_mae,
        });
    }
    Ok(layer_val_maes(&suite.models, &suite.layers))
}

/// The layers to train: the configured ones (each must be stored) or every stored layer.
fn suite_layers(run: &Run, cfg: &SuiteConfig) -> Result<Vec<u32>> {
    let stored = run.layers()?;
    let no_layer = |msg: String| Error::Data {
        path: run.dir.join(trail_datasets::schema::EMBEDDINGS_DIR),
        msg,
    };
    let layers = match &cfg.layers {
        None => stored,
        Some(want) => {
            if let Some(l) = want.iter().find(|l| !stored.contains(l)) {
                return Err(no_layer(format!(
                    "layer {l} is not stored (stored: {stored:?})"
                )));
            }
            want.clone()
        }
    };
    if layers.is_empty() {
        return Err(no_layer("no stored layers".into()));
    }
    Ok(layers)
}

impl<'a> Suite<'a> {
    /// Every job of the configuration, in training order.
    fn jobs(&self) -> Vec<Job<'a>> {
        let cfg = self.cfg;
        let mut jobs: Vec<Job<'a>> = self.layers.iter().map(|&l| Job::Layer(l)).collect();
        if cfg.multi_layer >= 2 && self.layers.len() >= 2 {
            jobs.push(Job::Multi);
        }
        if self.bert.is_some() {
            if cfg.bert_frozen {
                jobs.push(Job::BertFrozen);
            }
            if let Some(tune) = &cfg.bert_tune {
                jobs.push(Job::BertTuned(tune));
                if cfg.cap_class && !cfg.no_bert_v1_bins {
                    jobs.push(Job::BertTunedV1Bins(tune));
                }
            }
        }
        jobs
    }

    /// Names, files and resume key of `job` (the multi-layer job picks its layers here, from
    /// the records of the layers trained before it).
    fn plan(&mut self, job: &Job<'a>) -> Result<Planned> {
        let requests = self.run.info.requests_sha256.clone();
        let models = self.models.clone();
        let m = |stem: &str| {
            (
                models.join(format!("{stem}.safetensors")),
                models.join(format!("{stem}.json")),
            )
        };
        let (name, (weights, record), key, layers) = match job {
            Job::Layer(l) => (
                format!("layer {l}"),
                layer_files(&self.models, *l),
                key_of(&[&self.probe_cfg, &requests, &l.to_string()]),
                vec![*l],
            ),
            Job::Multi => {
                let top = self.best_layers();
                (
                    format!("layers {top:?}"),
                    m("multi"),
                    key_of(&[&self.probe_cfg, &requests, &format!("{top:?}")]),
                    top,
                )
            }
            Job::BertFrozen => {
                let sha = self.prompts()?.sha.clone();
                // The head trains at the prompt predictors' batch (one row per request).
                let parts = [&self.probe_cfg, &requests, &sha, "frozen-prompt-batch"];
                (
                    "bert frozen".into(),
                    m("bert-frozen"),
                    key_of(&parts),
                    vec![],
                )
            }
            Job::BertTuned(tune) | Job::BertTunedV1Bins(tune) => {
                let sha = self.prompts()?.sha.clone();
                let tune_cfg =
                    serde_json::to_string(tune).map_err(|e| Error::Invalid(e.to_string()))?;
                let v1 = matches!(job, Job::BertTunedV1Bins(_));
                let cfg = if v1 {
                    v1_bins(self.cfg)
                } else {
                    self.cfg.clone()
                };
                let bins = format!(
                    "{:?}{}",
                    [cfg.bins_k, cfg.bins_max as usize],
                    cfg.bert_part()
                );
                let parts = [tune_cfg.as_str(), &bins, &requests, &sha, "finetuned"];
                let (name, stem) = if v1 {
                    ("bert fine-tuned, v1 bins", "bert-finetuned-v1bins")
                } else {
                    ("bert fine-tuned", "bert-finetuned")
                };
                (name.into(), m(stem), key_of(&parts), vec![])
            }
        };
        Ok(Planned {
            name,
            weights,
            record,
            key,
            layers,
        })
    }

    /// The `multi_layer` layers of lowest validation MAE, in layer order.
    fn best_layers(&self) -> Vec<u32> {
        let mut ranked = layer_val_maes(&self.models, &self.layers);
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let mut top: Vec<u32> = ranked
            .iter()
            .take(self.cfg.multi_layer)
            .map(|m| m.0)
            .collect();
        top.sort_unstable();
        top
    }

    /// Whether `plan`'s record holds its key and its weights load as what the job writes.
    fn fresh(&self, job: &Job<'a>, plan: &Planned) -> bool {
        let key = match job {
            Job::Layer(_) | Job::Multi => read_layer_record(&plan.record).map(|r| r.key),
            Job::BertFrozen | Job::BertTuned(_) | Job::BertTunedV1Bins(_) => {
                read_bert_record(&plan.record).map(|r| r.key)
            }
        };
        key.as_deref() == Some(plan.key.as_str())
            && match job {
                Job::BertTuned(_) | Job::BertTunedV1Bins(_) => safetensors_readable(&plan.weights),
                _ => Checkpoint::load(&plan.weights).is_ok(),
            }
    }

    /// Trains `job` into `plan`'s files; the validation MAE of the selected weights.
    fn train(
        &mut self,
        job: &Job<'a>,
        plan: &Planned,
        progress: &mut dyn FnMut(Event),
    ) -> Result<f64> {
        let files = (plan.weights.as_path(), plan.record.as_path());
        let (run, cfg, commit) = (self.run, self.cfg, self.git_commit);
        match job {
            Job::Layer(_) | Job::Multi => {
                let rows = match job {
                    Job::Layer(_) => {
                        let rows = load_layer(run, plan.layers[0])?;
                        check_splits(run, &rows.token, cfg.min_requests, "token")?;
                        check_splits(run, &rows.prompt, cfg.min_requests, "prompt_mean")?;
                        rows
                    }
                    _ => {
                        let parts: Vec<LayerRows> = plan
                            .layers
                            .iter()
                            .map(|&l| load_layer(run, l))
                            .collect::<Result<_>>()?;
                        concat_layers(run, &parts)?
                    }
                };
                let key = plan.key.clone();
                let rec = train_pair(run, cfg, &rows, &plan.layers, key, files, commit)?;
                Ok(rec.token.best_val_mae)
            }
            Job::BertFrozen => {
                let data = self.prompts()?;
                train_bert_frozen(run, cfg, data, plan, commit)
            }
            Job::BertTuned(tune) => {
                let data = self.prompts()?;
                train_bert_tuned(run, cfg, tune, data, plan, commit, progress)
            }
            Job::BertTunedV1Bins(tune) => {
                let v1 = v1_bins(cfg);
                let data = self.prompts()?;
                train_bert_tuned(run, &v1, tune, data, plan, commit, progress)
            }
        }
    }

    /// The BERT baselines' data, made on first use; an error when a split is too small.
    fn prompts(&mut self) -> Result<&BertPrompts<'a>> {
        if self.prompts.is_none() {
            let assets = self
                .bert
                .ok_or_else(|| Error::Invalid("a BERT baseline needs the BERT assets".into()))?;
            self.prompts = Some(BertPrompts::new(self.run, self.cfg, assets)?);
        }
        Ok(self.prompts.as_ref().expect("made above"))
    }
}

impl<'a> BertPrompts<'a> {
    fn new(run: &'a Run, cfg: &SuiteConfig, assets: &'a BertAssets) -> Result<Self> {
        let (train, val, test) = (
            kept_train(run, cfg),
            run.split_requests(Split::Val),
            run.split_requests(Split::Test),
        );
        let min = train.len().min(val.len()).min(test.len());
        if min < cfg.min_requests {
            return Err(Error::Data {
                path: requests_path(&run.dir),
                msg: format!(
                    "a split has {min} request(s); the BERT baselines need at least {}",
                    cfg.min_requests
                ),
            });
        }
        Ok(BertPrompts {
            assets,
            texts: run.requests.iter().map(|r| r.prompt.as_str()).collect(),
            totals: run.requests.iter().map(|r| r.output_tokens).collect(),
            scored: val.iter().chain(&test).copied().collect(),
            train,
            val,
            sha: sha256_file(&assets.dir.join("model.safetensors"))?,
        })
    }
}

/// Whether `path` is a readable safetensors file (the fine-tuned BERT's weights).
fn safetensors_readable(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .is_some_and(|bytes| safetensors::SafeTensors::deserialize(&bytes).is_ok())
}

/// The frozen-BERT baseline: MiniLM sentence embeddings → an MLP head.
fn train_bert_frozen(
    run: &Run,
    cfg: &SuiteConfig,
    data: &BertPrompts<'_>,
    plan: &Planned,
    git_commit: &str,
) -> Result<f64> {
    let t0 = Instant::now();
    let bins = cfg.bins()?;
    let enc = BertEncoder::load(&data.assets.dir, 256)?;
    let features = enc.embed_batched(&data.texts, 32)?;
    let caps = vec![run.info.max_new_tokens; data.totals.len()];
    let set = Dataset {
        features: &features,
        dim: enc.hidden(),
        target: &data.totals,
        cap: Some(&caps),
    };
    // One row per request, like the prompt predictors: their batch.
    let tc = TrainConfig {
        batch: cfg.prompt_batch,
        ..cfg.train_config()
    };
    let (probe, report) = train_probe(&set, &data.train, &data.val, &bins, &tc)?;
    let picked: Vec<f32> = data
        .scored
        .iter()
        .flat_map(|&r| set.features[r * set.dim..(r + 1) * set.dim].to_vec())
        .collect();
    let probs = probe.predict_proba(&picked)?;
    let predictions = by_request(run, &data.scored, &probs, bins.k());
    Checkpoint {
        meta: CheckpointMeta {
            model_sha256: data.sha.clone(),
            kernel_id: "all-MiniLM-L6-v2 mean pooling, L2 normalized".into(),
            probe_layers: vec![0],
            prompt_layers: vec![],
            hidden_size: enc.hidden(),
            bins,
            refine_interval: 0,
            train_data_sha256: set.sha256(),
            val_mae: report.best_val_mae,
            prompt_val_mae: None,
            git_commit: git_commit.to_string(),
            g_input: false,
            label_prior: None,
            likelihood_exponent: 0.0,
        },
        probe,
        prompt: None,
    }
    .save(&plan.weights)?;
    write_bert_record(plan, report, predictions, t0)
}

/// The fine-tuned BERT baseline: MiniLM and its head trained end to end.
fn train_bert_tuned(
    run: &Run,
    cfg: &SuiteConfig,
    tune: &TuneConfig,
    data: &BertPrompts<'_>,
    plan: &Planned,
    git_commit: &str,
    progress: &mut dyn FnMut(Event),
) -> Result<f64> {
    let t0 = Instant::now();
    let bins = cfg.bins()?;
    let pick = |ix: &[usize]| -> (Vec<&str>, Vec<u32>) {
        (
            ix.iter().map(|&r| data.texts[r]).collect(),
            ix.iter().map(|&r| data.totals[r]).collect(),
        )
    };
    let (tr_t, tr_y) = pick(&data.train);
    let (va_t, va_y) = pick(&data.val);
    let (tuned, report) = bert_tune::fine_tune(
        &data.assets.dir,
        Prompts {
            texts: &tr_t,
            target: &tr_y,
        },
        Prompts {
            texts: &va_t,
            target: &va_y,
        },
        &bins,
        tune,
        &mut |s| progress(Event::BertStep(s)),
    )?;
    let sc: Vec<&str> = data.scored.iter().map(|&r| data.texts[r]).collect();
    let probs = tuned.predict_proba(&sc, 32)?;
    let predictions = by_request(run, &data.scored, &probs, bins.k());
    let meta: HashMap<String, String> = [
        ("base_model_sha256", data.sha.clone()),
        ("bins_k", cfg.bins_k.to_string()),
        ("bins_max", cfg.bins_max.to_string()),
        ("bins_cap_class", cfg.cap_class.to_string()),
        ("head_hidden", tune.head_hidden.to_string()),
        ("max_len", tune.max_len.to_string()),
        ("val_mae", report.best_val_mae.to_string()),
        ("git_commit", git_commit.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    tuned.save(&plan.weights, candle_core::DType::F32, meta)?;
    write_bert_record(plan, report, predictions, t0)
}

/// Writes a BERT job's record; its validation MAE.
fn write_bert_record(
    plan: &Planned,
    report: TrainReport,
    predictions: BTreeMap<String, Vec<f32>>,
    t0: Instant,
) -> Result<f64> {
    let val_mae = report.best_val_mae;
    let record = BertRecord {
        key: plan.key.clone(),
        report,
        predictions,
        seconds: t0.elapsed().as_secs_f64(),
    };
    write_json(&plan.record, &record)?;
    Ok(val_mae)
}

/// Bin probabilities by request id.
pub type ByRequest = BTreeMap<String, Vec<f32>>;

/// The BERT baselines trained into `models` (with `cfg`, its `config.json`) run on the prompts
/// of `requests`: (fine-tuned, frozen), each `None` where that baseline was not trained.
pub fn predict_bert(
    models: &Path,
    cfg: &SuiteConfig,
    assets: &BertAssets,
    requests: &[RequestRow],
) -> Result<(Option<ByRequest>, Option<ByRequest>)> {
    let texts: Vec<&str> = requests.iter().map(|r| r.prompt.as_str()).collect();
    let by_id = |probs: Vec<f32>, k: usize| -> ByRequest {
        requests
            .iter()
            .zip(probs.chunks_exact(k))
            .map(|(r, p)| (r.request_id.clone(), p.to_vec()))
            .collect()
    };
    let k = cfg.bins()?.k();
    let w = models.join("bert-finetuned.safetensors");
    let finetuned = match &cfg.bert_tune {
        Some(tune) if w.is_file() => {
            let tuned = bert_tune::TunedBert::load(
                &w,
                &assets.dir.join("config.json"),
                &assets.dir.join("tokenizer.json"),
                k,
                tune.head_hidden,
                tune.max_len,
            )?;
            Some(by_id(tuned.predict_proba(&texts, 32)?, k))
        }
        _ => None,
    };
    let w = models.join("bert-frozen.safetensors");
    let frozen = if cfg.bert_frozen && w.is_file() {
        let head = Checkpoint::load(&w)?;
        let enc = BertEncoder::load(&assets.dir, 256)?;
        let features = enc.embed_batched(&texts, 32)?;
        Some(by_id(
            head.probe.predict_proba(&features)?,
            head.meta.bins.k(),
        ))
    } else {
        None
    };
    Ok((finetuned, frozen))
}

/// A models directory's `config.json`.
pub fn read_suite_config(models: &Path) -> Result<SuiteConfig> {
    let path = models.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Data {
        path,
        msg: e.to_string(),
    })
}

fn by_request(run: &Run, rows: &[usize], probs: &[f32], k: usize) -> BTreeMap<String, Vec<f32>> {
    rows.iter()
        .zip(probs.chunks_exact(k))
        .map(|(&r, p)| (run.requests[r].request_id.clone(), p.to_vec()))
        .collect()
}

/// Several layers' rows side by side (features concatenated in the order given); the rows
/// must be the same positions in the same order.
pub fn concat_layers(run: &Run, parts: &[LayerRows]) -> Result<LayerRows> {
    let first = parts
        .first()
        .ok_or_else(|| Error::Invalid("no layers to concatenate".into()))?;
    let join = |pick: fn(&LayerRows) -> &Rows| -> Result<Rows> {
        let a = pick(first);
        for p in &parts[1..] {
            let b = pick(p);
            if b.request != a.request || b.g != a.g {
                return Err(Error::Data {
                    path: trail_datasets::schema::layer_dir(&run.dir, p.layer),
                    msg: format!(
                        "rows differ from layer {}'s; layers cannot be read together",
                        first.layer
                    ),
                });
            }
        }
        let tables: Vec<(&[f32], usize)> = parts
            .iter()
            .map(|p| (pick(p).features.as_slice(), pick(p).dim))
            .collect();
        Ok(Rows {
            request: a.request.clone(),
            g: a.g.clone(),
            remaining: a.remaining.clone(),
            dim: tables.iter().map(|t| t.1).sum(),
            features: concat_features(&tables)?,
        })
    };
    Ok(LayerRows {
        layer: first.layer,
        token: join(|p| &p.token)?,
        prompt: join(|p| &p.prompt)?,
    })
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    pub checkpoint: PathBuf,
    /// The exported probe's layers (one, or the multi-layer probe's).
    pub layers: Vec<u32>,
    pub val_mae: f64,
    pub bert: Option<PathBuf>,
}

/// The layer with the lowest validation MAE among the trained ones.
pub fn best_layer(run: &Run) -> Result<(u32, f64)> {
    let models = run.models_dir();
    layer_val_maes(&models, &run.layers()?)
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .ok_or_else(|| Error::Data {
            path: models,
            msg: "no trained layer (run `trail train` first)".into(),
        })
}

/// Which trained probe [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeChoice {
    /// The single layer with the lowest validation MAE (the paper's selection).
    Layer,
    /// The multi-layer probe (`trail train --multi-layer N`).
    Multi,
    /// Whichever of the two has the lower validation MAE.
    #[default]
    Best,
}

/// Write the chosen probe and its prompt predictor to `out` with the run's metadata;
/// with `bert`, also `bert.safetensors` beside it: the fine-tuned BERT with its head in f16,
/// its `config.json` and `tokenizer.json` in the header metadata.
pub fn export(
    run: &Run,
    out: &Path,
    refine_interval: u32,
    git_commit: &str,
    bert: Option<&BertAssets>,
    choice: ProbeChoice,
) -> Result<Exported> {
    let models = run.models_dir();
    let (layer, layer_mae) = best_layer(run)?;
    let multi_files = (models.join("multi.safetensors"), models.join("multi.json"));
    let multi_mae = read_layer_record(&multi_files.1)
        .filter(|_| multi_files.0.is_file())
        .map(|r| r.token.best_val_mae);
    let use_multi = match (choice, multi_mae) {
        (ProbeChoice::Layer, _) => false,
        (ProbeChoice::Multi, None) => {
            return Err(Error::Data {
                path: multi_files.0,
                msg: "no multi-layer probe (train with --multi-layer 2 or more)".into(),
            });
        }
        (ProbeChoice::Multi, Some(_)) => true,
        (ProbeChoice::Best, m) => m.is_some_and(|m| m < layer_mae),
    };
    let ((w, j), val_mae) = match multi_mae.filter(|_| use_multi) {
        Some(m) => (multi_files, m),
        None => (layer_files(&models, layer), layer_mae),
    };
    let mut c = Checkpoint::load(&w)?;
    let rec = read_layer_record(&j).ok_or_else(|| Error::Data {
        path: j.clone(),
        msg: "missing or unreadable".into(),
    })?;
    c.meta.model_sha256 = run.info.model_sha256.clone();
    c.meta.kernel_id = run.info.kernel_id.clone();
    c.meta.refine_interval = refine_interval;
    c.meta.train_data_sha256 = rec.token_data_sha256;
    c.meta.val_mae = val_mae;
    c.meta.git_commit = git_commit.to_string();
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    c.save(out)?;
    let bert_out = match bert {
        None => None,
        Some(assets) => {
            let src = models.join("bert-finetuned.safetensors");
            let tensors =
                candle_core::safetensors::load(&src, &candle_core::Device::Cpu).map_err(|e| {
                    Error::Data {
                        path: src.clone(),
                        msg: format!("{e} (train with --bert-epochs > 0 first)"),
                    }
                })?;
            let mut named: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let (_, header) = {
                let bytes = std::fs::read(&src).map_err(|e| io_err(&src, e))?;
                let (n, m) =
                    safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Data {
                        path: src.clone(),
                        msg: e.to_string(),
                    })?;
                (n, m)
            };
            let mut meta = header.metadata().clone().unwrap_or_default();
            for (key, file) in [
                ("config_json", "config.json"),
                ("tokenizer_json", "tokenizer.json"),
            ] {
                let p = assets.dir.join(file);
                meta.insert(
                    key.into(),
                    std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?,
                );
            }
            meta.insert("format".into(), "trail-bert".into());
            meta.insert("git_commit".into(), git_commit.to_string());
            let path = out.with_file_name("bert.safetensors");
            bert_tune::save_tensors(&path, &named, candle_core::DType::F16, meta)?;
            Some(path)
        }
    };
    Ok(Exported {
        checkpoint: out.to_path_buf(),
        layers: c.meta.probe_layers.iter().map(|&l| l as u32).collect(),
        val_mae,
        bert: bert_out,
    })
}
