//! Scoring a run's trained predictors ([`crate::suite`]) on its test split ([`score_suite`],
//! `trail report`), or trained predictors or an exported checkpoint on the requests of another
//! generated run ([`score`] with [`Trained`] or [`Predictors::checkpoint`], `trail eval mae`).
//!
//! The layer is chosen by the token probe's validation MAE; everything else is measured on the
//! test split: the MAE of the remaining-length estimate over every stored (request, g) pair and
//! at g = 0, and Kendall's τ-b at g = 0 between predicted and true total length, each with a
//! bootstrap 95 % interval resampling requests. Predictors (the fixed keys of `metrics.json`):
//!
//! | key | estimate of the remaining length at g |
//! |---|---|
//! | `refined` | the Bayesian filter on the schedule the server runs ([`crate::schedule`]): at g = 0 the prompt predictor times the probe on the last prompt token, then the probe every `refine_interval` tokens, counting down between |
//! | `refined_every_token` | the same refreshed at every token (only when the test rows hold every position; else `null`) |
//! | `probe_no_refine` | the probe's expectation at g |
//! | `prompt_embedding` | the prompt predictor's total, counted down |
//! | `bert_finetuned` | fine-tuned BERT's total, counted down (the paper's readout) |
//! | `bert_finetuned_conditional` | `E[L − g | L > g]` under fine-tuned BERT's bins |
//! | `bert_frozen` | frozen-BERT head's total, counted down |
//! | `constant`, `constant_conditional` | train's mean length counted down; train's mean residual life |
//!
//! Every estimate is clamped to `[0, max_new − g]`, with the run's `max_new_tokens` (the cap it
//! generated under, never a request's own length). Probes run one row at a time, as in the
//! engine ([`crate::schedule::probe_rows`]). With a multi-layer probe trained,
//! `probe_multi_layer` and `refined_multi_layer` are added.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trail_datasets::Split;

use crate::baseline::{Constant, conditional_residual, countdown};
use crate::bins::clamp_remaining;
use crate::checkpoint::Checkpoint;
use crate::metrics::{Bootstrap, ErrorSums, Interval, kendall_tau_b};
use crate::refine::Filter;
use crate::schedule::{self, RowOutputs, probe_rows};
use crate::suite::{
    BertRecord, LayerRecord, LayerRows, Run, concat_layers, layer_files, layer_val_maes,
    load_layer, read_bert_record, read_layer_record,
};
use crate::train::EpochRecord;
use crate::{Bins, Error, Result};

/// The fixed predictor keys of `metrics.json`, in report order.
pub const PREDICTORS: [&str; 9] = [
    "refined",
    "refined_every_token",
    "probe_no_refine",
    "prompt_embedding",
    "bert_finetuned",
    "bert_finetuned_conditional",
    "bert_frozen",
    "constant",
    "constant_conditional",
];

/// How to score.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreOptions {
    /// Refresh interval of `refined` (the release's 8).
    pub refine_interval: u32,
    pub bootstrap: usize,
    pub seed: u64,
    /// Width of the g buckets of the MAE-vs-g curves (0: `max_new / 16` rounded up to a
    /// multiple of 8).
    pub g_bucket: u32,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            refine_interval: 8,
            bootstrap: 1000,
            seed: 0,
            g_bucket: 0,
        }
    }
}

/// Test-split figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestMetrics {
    pub requests: usize,
    /// (request, g) pairs scored.
    pub pairs: usize,
    /// Whether the test rows hold every position (then `refined_every_token` is scored).
    pub every_position: bool,
    #[serde(rename = "mae_remaining_tokens", alias = "mae_remaining")]
    pub mae_remaining: BTreeMap<String, Option<Interval>>,
    #[serde(rename = "mae_at_start_tokens", alias = "mae_at_start")]
    pub mae_at_start: BTreeMap<String, Option<Interval>>,
    pub kendall_tau_at_start: BTreeMap<String, Option<Interval>>,
    pub ratio_bert_finetuned_over_refined: Option<Interval>,
    pub ratio_bert_finetuned_conditional_over_refined: Option<Interval>,
    /// Predictor v2 (the cap class): fine-tuned BERT on v1's bins (the paper's comparison),
    /// its MAE and its ratio to `refined`; `bert_finetuned` is then on v2's bins (like for
    /// like). Absent for a v1 suite.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "bert_finetuned_v1_bins_mae_remaining_tokens",
        alias = "bert_finetuned_v1_bins"
    )]
    pub bert_finetuned_v1_bins: Option<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_bert_finetuned_v1_bins_over_refined: Option<Interval>,
}

/// `metrics.json`'s schema: 2 since the multi-layer probe is an object (`layers`,
/// `val_mae_tokens`) rather than an unlabelled pair and every MAE key names its unit
/// (`mae_remaining_tokens`, `per_layer_val_mae_tokens`, …); a file without the key is version
/// 1, whose names are still read.
pub const METRICS_SCHEMA_VERSION: u32 = 2;

fn schema_v1() -> u32 {
    1
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    /// [`METRICS_SCHEMA_VERSION`] when written; 1 for files without it.
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    pub best_layer: u32,
    #[serde(rename = "per_layer_val_mae_tokens", alias = "per_layer_val_mae")]
    pub per_layer_val_mae: BTreeMap<String, f64>,
    #[serde(
        rename = "per_layer_prompt_val_mae_tokens",
        alias = "per_layer_prompt_val_mae"
    )]
    pub per_layer_prompt_val_mae: BTreeMap<String, f64>,
    /// The multi-layer probe, when trained.
    pub multi_layer: Option<MultiLayer>,
    pub max_new_tokens: u32,
    pub refine_interval: u32,
    pub bootstrap_resamples: usize,
    pub test: TestMetrics,
    pub notes: Vec<String>,
}

/// The multi-layer probe: its layers and validation MAE (tokens). Schema 1 wrote it as the
/// pair `[layers, val_mae]`, still read.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MultiLayer {
    pub layers: Vec<u32>,
    #[serde(rename = "val_mae_tokens")]
    pub val_mae: f64,
}

impl<'de> Deserialize<'de> for MultiLayer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Named {
                layers: Vec<u32>,
                #[serde(alias = "val_mae")]
                val_mae_tokens: f64,
            },
            Pair(Vec<u32>, f64),
        }
        Ok(match Either::deserialize(d)? {
            Either::Named {
                layers,
                val_mae_tokens: val_mae,
            }
            | Either::Pair(layers, val_mae) => Self { layers, val_mae },
        })
    }
}

/// One predictor's MAE by tokens generated: (g bucket centre, MAE, pairs).
pub type MaeByG = Vec<(f64, f64, usize)>;

/// Probabilities by token row (keyed by row index) and by request (prompt predictor).
type Probs = (HashMap<usize, Vec<f32>>, Vec<Vec<f32>>);

/// Data behind the report's plots.
#[derive(Debug, Clone, Default)]
pub struct Details {
    /// Per predictor: (g bucket centre, MAE, pairs).
    pub mae_by_g: Vec<(String, MaeByG)>,
    /// Selected probe on test token rows: `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<f64>>,
    /// The bins `confusion` counts over (their ranges label the plot).
    pub bins: Option<Bins>,
    /// Refined estimate, binned by prediction: (mean predicted, mean actual, count).
    pub reliability: Vec<(f64, f64, usize)>,
    /// Training curves by predictor name.
    pub curves: Vec<(String, Vec<EpochRecord>)>,
    /// `refined` by request id: (g, estimate at row g) at each scored row, what the engine
    /// records for the same request ([`crate::schedule`]).
    pub refined: BTreeMap<String, Vec<(u32, f64)>>,
    /// Where the error is: per predictor, MAE of the remaining length by the request's true
    /// length (`length`, buckets of [`LENGTH_BUCKETS`], the last "ran to the cap") and by the
    /// tokens generated (`g`, buckets of [`G_BUCKETS`]): (table, bucket label, MAE, pairs).
    pub breakdown: Vec<(String, Vec<BreakdownRow>)>,
    /// `refined`'s absolute errors per test request, for paired comparisons of two reports.
    pub request_errors: Vec<RequestError>,
}

/// One test request's absolute errors of `refined` summed over its scored (request, g) pairs:
/// what a paired comparison of two reports on the same requests resamples ([`paired_ratio`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestError {
    pub request_id: String,
    pub abs_error_sum_tokens: f64,
    pub pairs: u32,
}

/// MAE of `num` ÷ MAE of `den` over the requests both scored, with a bootstrap interval that
/// resamples those requests (the pair stays together); `None` without a common request.
pub fn paired_ratio(
    num: &[RequestError],
    den: &[RequestError],
    resamples: usize,
    seed: u64,
) -> Option<Interval> {
    let by_id: HashMap<&str, &RequestError> =
        den.iter().map(|e| (e.request_id.as_str(), e)).collect();
    let common: Vec<(&RequestError, &RequestError)> = num
        .iter()
        .filter_map(|a| Some((a, *by_id.get(a.request_id.as_str())?)))
        .collect();
    let sums = |side: &[&RequestError]| ErrorSums {
        sum: side.iter().map(|e| e.abs_error_sum_tokens).collect(),
        count: side.iter().map(|e| e.pairs).collect(),
    };
    let (nums, dens): (Vec<&RequestError>, Vec<&RequestError>) = common.iter().copied().unzip();
    let (a, b) = (sums(&nums), sums(&dens));
    Bootstrap::new(common.len(), resamples, seed).interval(|idx| Some(a.mae(idx)? / b.mae(idx)?))
}

/// One row of [`Details::breakdown`]: (table `length` or `g`, bucket label, MAE, pairs).
pub type BreakdownRow = (&'static str, String, f64, usize);

/// Upper ends (exclusive) of the true-length buckets of [`Details::breakdown`], as fractions of
/// the cap; a request that reached its cap is its own bucket.
pub const LENGTH_BUCKETS: [(f64, &str); 4] = [
    (0.125, "< 1/8 cap"),
    (0.25, "1/8–1/4 cap"),
    (0.5, "1/4–1/2 cap"),
    (1.0, "1/2 cap – cap−1"),
];

/// Upper ends (exclusive) of the g buckets of [`Details::breakdown`], in tokens.
pub const G_BUCKETS: [(u32, &str); 5] = [
    (1, "0"),
    (64, "1–63"),
    (128, "64–127"),
    (256, "128–255"),
    (u32::MAX, "256+"),
];

/// The length bucket of a request of `total` tokens under `cap`.
fn length_bucket(total: u32, cap: u32) -> usize {
    if total >= cap {
        return LENGTH_BUCKETS.len();
    }
    let f = f64::from(total) / f64::from(cap.max(1));
    LENGTH_BUCKETS
        .iter()
        .position(|&(hi, _)| f < hi)
        .unwrap_or(LENGTH_BUCKETS.len() - 1)
}

fn g_bucket(g: u32) -> usize {
    G_BUCKETS
        .iter()
        .position(|&(hi, _)| g < hi)
        .unwrap_or(G_BUCKETS.len() - 1)
}

/// Per-predictor accumulators.
struct Acc {
    remaining: ErrorSums,
    start: ErrorSums,
    /// Predicted total at g = 0 per request (NaN where not scored).
    start_pred: Vec<f64>,
    by_g: BTreeMap<u32, (f64, usize)>,
    /// (sum, count) by [`length_bucket`] and by [`g_bucket`].
    by_length: Vec<(f64, usize)>,
    by_g_coarse: Vec<(f64, usize)>,
}

impl Acc {
    fn new(n: usize) -> Self {
        Self {
            remaining: ErrorSums::new(n),
            start: ErrorSums::new(n),
            start_pred: vec![f64::NAN; n],
            by_g: BTreeMap::new(),
            by_length: vec![(0.0, 0); LENGTH_BUCKETS.len() + 1],
            by_g_coarse: vec![(0.0, 0); G_BUCKETS.len()],
        }
    }

    fn add(&mut self, req: usize, g: u32, est: f64, truth: u32, bucket: u32, length: usize) {
        let e = (est - truth as f64).abs();
        self.by_length[length].0 += e;
        self.by_length[length].1 += 1;
        let gb = g_bucket(g);
        self.by_g_coarse[gb].0 += e;
        self.by_g_coarse[gb].1 += 1;
        self.remaining.add(req, e);
        if g == 0 {
            self.start.add(req, e);
            self.start_pred[req] = est;
        }
        let b = self.by_g.entry(g / bucket.max(1)).or_insert((0.0, 0));
        b.0 += e;
        b.1 += 1;
    }
}

/// A request's test rows: indices into the token rows, sorted by g.
struct Request {
    run_index: usize,
    prompt_row: usize,
    token_rows: Vec<usize>,
}

/// The requests of `split` (every request with `None`) that have a prompt row and token rows.
fn test_requests(run: &Run, rows: &LayerRows, split: Option<Split>) -> Vec<Request> {
    let mut prompt_of: HashMap<u32, usize> = HashMap::new();
    for r in 0..rows.prompt.len() {
        prompt_of.entry(rows.prompt.request[r]).or_insert(r);
    }
    let mut tokens: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for r in 0..rows.token.len() {
        tokens.entry(rows.token.request[r]).or_default().push(r);
    }
    let mut out = Vec::new();
    for (req, mut trs) in tokens {
        if split.is_some_and(|s| run.requests[req as usize].split != s) {
            continue;
        }
        let Some(&p) = prompt_of.get(&req) else {
            continue;
        };
        trs.sort_by_key(|&r| rows.token.g[r]);
        out.push(Request {
            run_index: req as usize,
            prompt_row: p,
            token_rows: trs,
        });
    }
    out
}

fn gather(features: &[f32], dim: usize, rows: impl Iterator<Item = usize>) -> Vec<f32> {
    rows.flat_map(|r| features[r * dim..(r + 1) * dim].iter().copied())
        .collect()
}

/// The decode probe's inputs for token rows `idx`: the layers' states, with the tokens
/// generated appended when the checkpoint reads them (v2).
fn probe_inputs(ckpt: &Checkpoint, rows: &LayerRows, idx: &[usize]) -> Vec<f32> {
    let t = &rows.token;
    if !ckpt.meta.g_input {
        return gather(&t.features, t.dim, idx.iter().copied());
    }
    let mut x = Vec::with_capacity(idx.len() * (t.dim + 2));
    for &r in idx {
        x.extend_from_slice(&t.features[r * t.dim..(r + 1) * t.dim]);
        x.extend_from_slice(&crate::checkpoint::g_features(t.g[r], ckpt.meta.bins.max()));
    }
    x
}

/// Probabilities of `ckpt`'s probe and prompt predictor on the test rows of `reqs`:
/// (token probs by token row, prompt probs by request).
fn predict(ckpt: &Checkpoint, rows: &LayerRows, reqs: &[Request]) -> Result<Probs> {
    let k = ckpt.meta.bins.k();
    let token_idx: Vec<usize> = reqs
        .iter()
        .flat_map(|q| q.token_rows.iter().copied())
        .collect();
    let x = probe_inputs(ckpt, rows, &token_idx);
    let p = probe_rows(&ckpt.probe, &x)?;
    let token: HashMap<usize, Vec<f32>> = token_idx
        .iter()
        .zip(p.chunks_exact(k))
        .map(|(&r, c)| (r, c.to_vec()))
        .collect();
    let prompt = ckpt
        .prompt
        .as_ref()
        .ok_or_else(|| Error::Invalid("checkpoint has no prompt predictor".into()))?;
    let x = gather(
        &rows.prompt.features,
        rows.prompt.dim,
        reqs.iter().map(|q| q.prompt_row),
    );
    let pp = probe_rows(prompt, &x)?;
    Ok((token, pp.chunks_exact(k).map(<[f32]>::to_vec).collect()))
}

/// Filter estimates along one request's rows (g ascending), on the schedule the server runs
/// ([`crate::schedule`]): each row's estimate of the tokens still to come after its g.
fn refine_along(
    filter: &Filter,
    prompt: &[f32],
    steps: &[(u32, &[f32])],
    max_new: u32,
) -> Vec<f64> {
    let mut st = None;
    steps
        .iter()
        .map(|&(g, probs)| {
            let outputs = RowOutputs {
                prompt: Some(prompt),
                probe: Some(probs),
            };
            schedule::apply(&mut st, filter, g, max_new, outputs)
        })
        .collect()
}

/// The predictors [`score`] measures: one checkpoint's probe and prompt predictor (the refined
/// estimate and its parts) and, where present, the multi-layer probe and the baselines.
#[derive(Debug, Clone)]
pub struct Predictors {
    /// The checkpoint's file (named in errors).
    pub path: PathBuf,
    pub ckpt: Checkpoint,
    /// The multi-layer probe: its layers and checkpoint.
    pub multi: Option<(Vec<u32>, Checkpoint)>,
    /// The BERT baselines' bin probabilities by request id.
    pub bert_finetuned: Option<BTreeMap<String, Vec<f32>>>,
    /// Fine-tuned BERT on v1's bins, beside a v2 suite's.
    pub bert_finetuned_v1_bins: Option<BTreeMap<String, Vec<f32>>>,
    pub bert_frozen: Option<BTreeMap<String, Vec<f32>>>,
    /// Train's lengths of the run the predictors learned from.
    pub constant: Option<Constant>,
}

impl Predictors {
    /// An exported checkpoint alone: `refined`, `probe_no_refine` and `prompt_embedding`.
    pub fn checkpoint(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            ckpt: Checkpoint::load(path)?,
            multi: None,
            bert_finetuned: None,
            bert_finetuned_v1_bins: None,
            bert_frozen: None,
            constant: None,
        })
    }
}

impl Predictors {
    /// `metrics.json` for a checkpoint scored alone: its layers and validation MAEs come from
    /// its metadata.
    pub fn checkpoint_metrics(&self, scored: Scored, opts: &ScoreOptions) -> (Metrics, Details) {
        let meta = &self.ckpt.meta;
        let key = meta
            .probe_layers
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("+");
        let metrics = Metrics {
            schema_version: METRICS_SCHEMA_VERSION,
            best_layer: meta.probe_layers.first().copied().unwrap_or(0) as u32,
            per_layer_val_mae: BTreeMap::from([(key.clone(), meta.val_mae)]),
            per_layer_prompt_val_mae: meta
                .prompt_val_mae
                .map(|v| BTreeMap::from([(key, v)]))
                .unwrap_or_default(),
            multi_layer: None,
            max_new_tokens: scored.max_new_tokens,
            refine_interval: opts.refine_interval,
            bootstrap_resamples: opts.bootstrap,
            test: scored.test,
            notes: scored.notes,
        };
        (metrics, scored.details)
    }
}

/// What a run's `models/` holds: the predictors with the records of their training.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The layer whose probe has the lowest validation MAE.
    pub best_layer: u32,
    pub records: BTreeMap<u32, LayerRecord>,
    pub multi: Option<LayerRecord>,
    pub bert_finetuned: Option<BertRecord>,
    pub bert_frozen: Option<BertRecord>,
    /// The best layer's checkpoint, the multi-layer probe, the BERT predictions of the
    /// records (validation and test prompts of the training run) and train's lengths.
    pub predictors: Predictors,
}

impl Trained {
    /// Reads `run/models` (trained with [`crate::suite::train_suite`]).
    pub fn open(run: &Run) -> Result<Self> {
        let models = run.models_dir();
        let layers = run.layers()?;
        let maes = layer_val_maes(&models, &layers);
        let (best_layer, _) = maes
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .ok_or_else(|| Error::Data {
                path: models.clone(),
                msg: "no trained layer (run `trail train` first)".into(),
            })?;
        let records: BTreeMap<u32, LayerRecord> = layers
            .iter()
            .filter_map(|&l| read_layer_record(&layer_files(&models, l).1).map(|r| (l, r)))
            .collect();
        let path = layer_files(&models, best_layer).0;
        let ckpt = Checkpoint::load(&path)?;
        let multi_path = (models.join("multi.safetensors"), models.join("multi.json"));
        let (multi_record, multi) = match (
            read_layer_record(&multi_path.1),
            Checkpoint::load(&multi_path.0),
        ) {
            (Some(rec), Ok(c)) => (Some(rec.clone()), Some((rec.layers, c))),
            _ => (None, None),
        };
        let bert_finetuned = read_bert_record(&models.join("bert-finetuned.json"));
        let bert_frozen = read_bert_record(&models.join("bert-frozen.json"));
        let train_lengths: Vec<u32> = run
            .split_requests(Split::Train)
            .into_iter()
            .map(|r| run.requests[r].output_tokens)
            .collect();
        Ok(Self {
            best_layer,
            predictors: Predictors {
                path,
                ckpt,
                multi,
                bert_finetuned: bert_finetuned.as_ref().map(|b| b.predictions.clone()),
                bert_finetuned_v1_bins: read_bert_record(
                    &models.join("bert-finetuned-v1bins.json"),
                )
                .map(|b| b.predictions),
                bert_frozen: bert_frozen.as_ref().map(|b| b.predictions.clone()),
                constant: Some(Constant::new(&train_lengths)),
            },
            records,
            multi: multi_record,
            bert_finetuned,
            bert_frozen,
        })
    }

    /// `metrics.json` and the plots' data from what [`score`] measured with these predictors.
    pub fn metrics(&self, scored: Scored, opts: &ScoreOptions) -> (Metrics, Details) {
        let mut details = scored.details;
        if let Some(r) = self.records.get(&self.best_layer) {
            let l = self.best_layer;
            details
                .curves
                .push((format!("layer {l} probe"), r.token.curve.clone()));
            details
                .curves
                .push((format!("layer {l} prompt"), r.prompt.curve.clone()));
        }
        if let Some(r) = self.multi.as_ref().filter(|_| scored.multi_scored) {
            details.curves.push((
                format!("layers {:?} probe", r.layers),
                r.token.curve.clone(),
            ));
        }
        if let Some(b) = &self.bert_frozen {
            details
                .curves
                .push(("bert frozen".into(), b.report.curve.clone()));
        }
        if let Some(b) = &self.bert_finetuned {
            details
                .curves
                .push(("bert fine-tuned".into(), b.report.curve.clone()));
        }
        let metrics = Metrics {
            schema_version: METRICS_SCHEMA_VERSION,
            best_layer: self.best_layer,
            per_layer_val_mae: self
                .records
                .iter()
                .map(|(l, r)| (l.to_string(), r.token.best_val_mae))
                .collect(),
            per_layer_prompt_val_mae: self
                .records
                .iter()
                .map(|(l, r)| (l.to_string(), r.prompt.best_val_mae))
                .collect(),
            multi_layer: self
                .multi
                .as_ref()
                .filter(|_| scored.multi_scored)
                .map(|r| MultiLayer {
                    layers: r.layers.clone(),
                    val_mae: r.token.best_val_mae,
                }),
            max_new_tokens: scored.max_new_tokens,
            refine_interval: opts.refine_interval,
            bootstrap_resamples: opts.bootstrap,
            test: scored.test,
            notes: scored.notes,
        };
        (metrics, details)
    }
}

/// What [`score`] measured.
#[derive(Debug, Clone)]
pub struct Scored {
    pub test: TestMetrics,
    /// The plots' data (no training curves).
    pub details: Details,
    pub notes: Vec<String>,
    /// Whether the multi-layer probe was scored.
    pub multi_scored: bool,
    /// The data run's `max_new_tokens` (estimates are clamped to it).
    pub max_new_tokens: u32,
}

/// Rows of `layers` of `run`, side by side.
fn load_layers(run: &Run, layers: &[usize]) -> Result<LayerRows> {
    let mut parts: Vec<LayerRows> = layers
        .iter()
        .map(|&l| load_layer(run, l as u32))
        .collect::<Result<_>>()?;
    match parts.len() {
        0 => Err(Error::Invalid("a predictor that reads no layer".into())),
        1 => Ok(parts.pop().expect("one")),
        _ => concat_layers(run, &parts),
    }
}

/// Score the predictors of `run` (trained into `run/models`) on its test split.
pub fn score_suite(run: &Run, opts: &ScoreOptions) -> Result<(Metrics, Details)> {
    let trained = Trained::open(run)?;
    let scored = score(run, Some(Split::Test), &trained.predictors, opts)?;
    Ok(trained.metrics(scored, opts))
}

/// Score `p` on the requests of `split` of `data` (every request with `None`): the rows of
/// the layers the checkpoint reads, each predictor's estimate at every stored position.
/// A checkpoint made for another model or hidden size than `data`'s is an error naming it.
pub fn score(
    data: &Run,
    split: Option<Split>,
    preds: &Predictors,
    opts: &ScoreOptions,
) -> Result<Scored> {
    let ckpt = &preds.ckpt;
    let run = data;
    if ckpt.meta.model_sha256 != run.info.model_sha256 {
        return Err(Error::ModelMismatch {
            path: preds.path.clone(),
            expected: run.info.model_sha256.clone(),
            found: ckpt.meta.model_sha256.clone(),
        });
    }
    let mut notes = Vec::new();
    if !trail_llm::same_numerics(&ckpt.meta.kernel_id, &run.info.kernel_id) {
        notes.push(format!(
            "the predictors learned from hidden states of kernel `{}`; these rows come from `{}`, \
             which computes other bits",
            ckpt.meta.kernel_id, run.info.kernel_id
        ));
    }
    let probe_layers = &ckpt.meta.probe_layers;
    let token_rows = load_layers(run, probe_layers)?;
    let want = ckpt.meta.hidden_size * probe_layers.len();
    if token_rows.token.dim != want {
        return Err(Error::HiddenMismatch {
            path: preds.path.clone(),
            expected: token_rows.token.dim / probe_layers.len().max(1),
            found: ckpt.meta.hidden_size,
        });
    }
    let rows = if ckpt.meta.prompt_layers == *probe_layers || ckpt.meta.prompt_layers.is_empty() {
        token_rows
    } else {
        LayerRows {
            prompt: load_layers(run, &ckpt.meta.prompt_layers)?.prompt,
            ..token_rows
        }
    };
    let bins: Bins = ckpt.meta.bins;
    let max_new = run.info.max_new_tokens;
    let reqs = test_requests(run, &rows, split);
    let split_name = split.map_or("all", Split::as_str);
    if reqs.len() < 2 {
        return Err(Error::Data {
            path: trail_datasets::schema::requests_path(&run.dir),
            msg: format!(
                "split `{split_name}` has {} request(s) with embeddings; scoring needs at least 2",
                reqs.len()
            ),
        });
    }
    let n = reqs.len();
    let (token_probs, prompt_probs) = predict(ckpt, &rows, &reqs)?;
    let every_position = reqs.iter().all(|q| {
        q.token_rows
            .iter()
            .enumerate()
            .all(|(i, &r)| rows.token.g[r] == i as u32)
    });
    if !every_position {
        notes.push(format!(
            "refined_every_token is null: the test rows do not hold every position (generation sampled {}); generate with --sample all to score it",
            run.info.sample.as_deref().unwrap_or("a subset")
        ));
    }

    // Multi-layer probe, when given.
    let multi = match &preds.multi {
        Some((layers, c)) => {
            let parts: Vec<LayerRows> = layers
                .iter()
                .map(|&l| load_layer(run, l))
                .collect::<Result<_>>()?;
            let joined = concat_layers(run, &parts)?;
            let mreqs = test_requests(run, &joined, split);
            let same = mreqs.len() == n
                && mreqs.iter().zip(&reqs).all(|(a, b)| {
                    a.run_index == b.run_index && a.token_rows.len() == b.token_rows.len()
                });
            if same {
                let (tp, pp) = predict(c, &joined, &mreqs)?;
                let f = c.meta.filter(opts.refine_interval);
                Some((mreqs, tp, pp, joined.token.g, f, c.meta.bins))
            } else {
                notes.push(
                    "multi-layer probe skipped: its rows differ from the best layer's".into(),
                );
                None
            }
        }
        None => None,
    };

    // BERT predictions by request id.
    let bert_ft = preds.bert_finetuned.as_ref();
    let bert_v1 = preds.bert_finetuned_v1_bins.as_ref();
    let bert_fr = preds.bert_frozen.as_ref();
    if bert_ft.is_none() || bert_fr.is_none() {
        notes.push("a BERT baseline was not trained or not given: its keys are null".into());
    }
    if preds.constant.is_none() {
        notes
            .push("no train split to take the constant baselines from: their keys are null".into());
    }

    let filter = ckpt.meta.filter(opts.refine_interval);
    let filter_1 = ckpt.meta.filter(1);
    // The BERT baselines' bins: the checkpoint's, or without its cap class where the BERT was
    // trained with v1's bins.
    let bert_bins = |p: &[f32]| -> Bins {
        if p.len() == bins.k() {
            bins
        } else {
            Bins::new(bins.length_bins(), bins.max()).expect("the checkpoint's bins")
        }
    };
    let mut acc: BTreeMap<&str, Acc> = BTreeMap::new();
    let mut names: Vec<&str> = PREDICTORS
        .iter()
        .copied()
        .filter(|&p| every_position || p != "refined_every_token")
        .filter(|&p| bert_ft.is_some() || !p.starts_with("bert_finetuned"))
        .filter(|&p| bert_fr.is_some() || p != "bert_frozen")
        .filter(|&p| preds.constant.is_some() || !p.starts_with("constant"))
        .collect();
    if multi.is_some() {
        names.extend(["probe_multi_layer", "refined_multi_layer"]);
    }
    if bert_v1.is_some() {
        names.push("bert_finetuned_v1_bins");
    }
    for &p in &names {
        acc.insert(p, Acc::new(n));
    }
    let k = bins.k();
    let mut confusion = vec![vec![0f64; k]; k];
    let mut rel: Vec<(f64, f64)> = Vec::new();
    let bucket = match opts.g_bucket {
        0 => (max_new / 16).max(8).div_ceil(8) * 8,
        b => b,
    };
    let mut refined_by_request = BTreeMap::new();
    for (qi, q) in reqs.iter().enumerate() {
        let req = &run.requests[q.run_index];
        let steps: Vec<(u32, &[f32])> = q
            .token_rows
            .iter()
            .map(|&r| (rows.token.g[r], token_probs[&r].as_slice()))
            .collect();
        let refined = refine_along(&filter, &prompt_probs[qi], &steps, max_new);
        refined_by_request.insert(
            req.request_id.clone(),
            steps
                .iter()
                .map(|s| s.0)
                .zip(refined.iter().copied())
                .collect(),
        );
        let refined_1 =
            every_position.then(|| refine_along(&filter_1, &prompt_probs[qi], &steps, max_new));
        let prompt_total = bins.readout(&prompt_probs[qi], f64::from(max_new));
        let ft = bert_ft.and_then(|b| b.get(&req.request_id));
        let v1 = bert_v1.and_then(|b| b.get(&req.request_id));
        let fr = bert_fr.and_then(|b| b.get(&req.request_id));
        let multi_est = multi.as_ref().map(|(mreqs, tp, pp, mg, mf, mb)| {
            let msteps: Vec<(u32, &[f32])> = mreqs[qi]
                .token_rows
                .iter()
                .map(|&r| (mg[r], tp[&r].as_slice()))
                .collect();
            let ref_m = refine_along(mf, &pp[qi], &msteps, max_new);
            let probe_m: Vec<f64> = msteps
                .iter()
                .map(|&(g, p)| mb.point(p, g, max_new))
                .collect();
            (probe_m, ref_m)
        });
        for (si, &(g, probs)) in steps.iter().enumerate() {
            let r = q.token_rows[si];
            let truth = rows.token.remaining[r];
            let length = length_bucket(req.output_tokens, max_new);
            let clamp = |e: f64| clamp_remaining(e, g, max_new);
            let mut put = |name: &str, est: f64| {
                if let Some(a) = acc.get_mut(name) {
                    a.add(qi, g, est, truth, bucket, length);
                }
            };
            put("refined", refined[si]);
            if let Some(r1) = &refined_1 {
                put("refined_every_token", r1[si]);
            }
            put("probe_no_refine", bins.point(probs, g, max_new));
            put("prompt_embedding", clamp(countdown(prompt_total, g)));
            let total = |p: &[f32]| bert_bins(p).readout(p, f64::from(max_new));
            if let Some(p) = ft {
                put("bert_finetuned", clamp(countdown(total(p), g)));
                put(
                    "bert_finetuned_conditional",
                    clamp(conditional_residual(&bert_bins(p), p, g, max_new)),
                );
            }
            if let Some(p) = fr {
                put("bert_frozen", clamp(countdown(total(p), g)));
            }
            if let Some(p) = v1 {
                put("bert_finetuned_v1_bins", clamp(countdown(total(p), g)));
            }
            if let Some(c) = &preds.constant {
                put("constant", clamp(c.countdown(g)));
                put("constant_conditional", clamp(c.residual(g)));
            }
            if let Some((pm, rm)) = &multi_est {
                put("probe_multi_layer", pm[si]);
                put("refined_multi_layer", rm[si]);
            }
            let arg = probs
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0;
            confusion[bins.label_at(truth, max_new.saturating_sub(g)) as usize][arg] += 1.0;
            rel.push((refined[si], truth as f64));
        }
    }

    let boot = Bootstrap::new(n, opts.bootstrap, opts.seed);
    // τ-b is O(n²) per resample: fewer resamples for large test splits.
    let tau_boot = Bootstrap::new(
        n,
        if n > 1000 {
            opts.bootstrap.min(200)
        } else {
            opts.bootstrap
        },
        opts.seed,
    );
    let truths: Vec<f64> = reqs
        .iter()
        .map(|q| run.requests[q.run_index].output_tokens as f64)
        .collect();
    let mut mae_remaining = BTreeMap::new();
    let mut mae_at_start = BTreeMap::new();
    let mut tau = BTreeMap::new();
    for &p in PREDICTORS
        .iter()
        .chain(&["probe_multi_layer", "refined_multi_layer"])
    {
        let a = acc.get(p);
        if a.is_none() && p.ends_with("multi_layer") {
            continue;
        }
        mae_remaining.insert(
            p.to_string(),
            a.and_then(|a| boot.interval(|idx| a.remaining.mae(idx))),
        );
        mae_at_start.insert(
            p.to_string(),
            a.and_then(|a| boot.interval(|idx| a.start.mae(idx))),
        );
        tau.insert(
            p.to_string(),
            a.and_then(|a| {
                tau_boot.interval(|idx| {
                    let (x, y): (Vec<f64>, Vec<f64>) = idx
                        .iter()
                        .filter(|&&i| a.start_pred[i].is_finite())
                        .map(|&i| (a.start_pred[i], truths[i]))
                        .unzip();
                    kendall_tau_b(&x, &y)
                })
            }),
        );
    }
    let ratio = |num: &str| -> Option<Interval> {
        let (a, b) = (acc.get(num)?, acc.get("refined")?);
        boot.interval(|idx| Some(a.remaining.mae(idx)? / b.remaining.mae(idx)?))
    };
    let test = TestMetrics {
        requests: n,
        pairs: acc["refined"]
            .remaining
            .count
            .iter()
            .map(|&c| c as usize)
            .sum(),
        every_position,
        mae_remaining,
        mae_at_start,
        kendall_tau_at_start: tau,
        ratio_bert_finetuned_over_refined: ratio("bert_finetuned"),
        ratio_bert_finetuned_conditional_over_refined: ratio("bert_finetuned_conditional"),
        bert_finetuned_v1_bins: acc
            .get("bert_finetuned_v1_bins")
            .and_then(|a| boot.interval(|idx| a.remaining.mae(idx))),
        ratio_bert_finetuned_v1_bins_over_refined: ratio("bert_finetuned_v1_bins"),
    };

    // Reliability: bin by predicted remaining over the bins' edges.
    let mut rb = vec![(0f64, 0f64, 0usize); bins.length_bins()];
    for &(p, t) in &rel {
        let b = bins.label(p.round().max(0.0) as u32) as usize;
        rb[b].0 += p;
        rb[b].1 += t;
        rb[b].2 += 1;
    }
    let reliability = rb
        .into_iter()
        .filter(|b| b.2 > 0)
        .map(|(p, t, c)| (p / c as f64, t / c as f64, c))
        .collect();
    let breakdown = names
        .iter()
        .map(|&p| {
            let a = &acc[p];
            let label = |i: usize| {
                LENGTH_BUCKETS
                    .get(i)
                    .map_or("ran to the cap".to_string(), |b| b.1.to_string())
            };
            let mut rows: Vec<BreakdownRow> = a
                .by_length
                .iter()
                .enumerate()
                .filter(|(_, c)| c.1 > 0)
                .map(|(i, &(s, c))| ("length", label(i), s / c as f64, c))
                .collect();
            rows.extend(
                a.by_g_coarse
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.1 > 0)
                    .map(|(i, &(s, c))| ("g", G_BUCKETS[i].1.to_string(), s / c as f64, c)),
            );
            (p.to_string(), rows)
        })
        .collect();
    let mae_by_g = names
        .iter()
        .map(|&p| {
            let pts = acc[p]
                .by_g
                .iter()
                .map(|(&b, &(s, c))| ((b as f64 + 0.5) * bucket as f64, s / c as f64, c))
                .collect();
            (p.to_string(), pts)
        })
        .collect();
    let refined_acc = &acc["refined"];
    let request_errors = reqs
        .iter()
        .enumerate()
        .map(|(qi, q)| RequestError {
            request_id: run.requests[q.run_index].request_id.clone(),
            abs_error_sum_tokens: refined_acc.remaining.sum[qi],
            pairs: refined_acc.remaining.count[qi],
        })
        .collect();
    Ok(Scored {
        test,
        details: Details {
            mae_by_g,
            confusion,
            bins: Some(bins),
            reliability,
            curves: Vec::new(),
            refined: refined_by_request,
            breakdown,
            request_errors,
        },
        notes,
        multi_scored: multi.is_some(),
        max_new_tokens: max_new,
    })
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    #[test]
    fn the_multi_layer_probe_reads_as_an_object_or_as_schema_1_s_pair() {
        let named: MultiLayer =
            serde_json::from_str(r#"{"layers": [3, 5], "val_mae_tokens": 40.5}"#).unwrap();
        let old_named: MultiLayer =
            serde_json::from_str(r#"{"layers": [3, 5], "val_mae": 40.5}"#).unwrap();
        let pair: MultiLayer = serde_json::from_str("[[3, 5], 40.5]").unwrap();
        assert_eq!(named, pair);
        assert_eq!(old_named, pair);
        assert_eq!(
            serde_json::to_value(&named).unwrap(),
            serde_json::json!({"layers": [3, 5], "val_mae_tokens": 40.5})
        );
    }

    /// A schema-1 file (no version, MAE keys without their unit, the pair) reads, and writes
    /// back as schema 2 with every MAE key naming tokens.
    #[test]
    fn schema_1_metrics_read_and_write_back_with_units_in_the_keys() {
        let v1 = serde_json::json!({
            "best_layer": 4,
            "per_layer_val_mae": {"4": 50.0},
            "per_layer_prompt_val_mae": {"4": 60.0},
            "multi_layer": [[4, 5], 49.0],
            "max_new_tokens": 512,
            "refine_interval": 8,
            "bootstrap_resamples": 10,
            "test": {
                "requests": 2, "pairs": 3, "every_position": false,
                "mae_remaining": {"refined": {"value": 1.0, "lo": 0.5, "hi": 1.5}},
                "mae_at_start": {"refined": null},
                "kendall_tau_at_start": {},
                "ratio_bert_finetuned_over_refined": null,
                "ratio_bert_finetuned_conditional_over_refined": null,
                "bert_finetuned_v1_bins": {"value": 2.0, "lo": 1.0, "hi": 3.0}
            },
            "notes": []
        });
        let m: Metrics = serde_json::from_value(v1).unwrap();
        assert_eq!(m.schema_version, 1);
        assert_eq!(m.per_layer_val_mae["4"], 50.0);
        assert_eq!(m.multi_layer.as_ref().unwrap().val_mae, 49.0);
        assert!(m.test.bert_finetuned_v1_bins.is_some());
        let out = serde_json::to_value(&m).unwrap();
        for key in [
            "per_layer_val_mae_tokens",
            "per_layer_prompt_val_mae_tokens",
        ] {
            assert!(out.get(key).is_some(), "{key}");
        }
        for key in [
            "mae_remaining_tokens",
            "mae_at_start_tokens",
            "bert_finetuned_v1_bins_mae_remaining_tokens",
        ] {
            assert!(out["test"].get(key).is_some(), "{key}");
        }
        assert_eq!(out["multi_layer"]["val_mae_tokens"], 49.0);
        let back: Metrics = serde_json::from_value(out).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn the_paired_ratio_joins_requests_by_id_and_brackets_the_ratio() {
        let e = |id: &str, sum: f64, pairs: u32| RequestError {
            request_id: id.into(),
            abs_error_sum_tokens: sum,
            pairs,
        };
        // Twice the error on every common request; "c" and "d" are scored by one side only.
        let den: Vec<_> = (0..40)
            .map(|i| e(&format!("r{i}"), 10.0 + i as f64, 2))
            .collect();
        let mut num: Vec<_> = den
            .iter()
            .rev()
            .map(|d| e(&d.request_id, 2.0 * d.abs_error_sum_tokens, 2))
            .collect();
        num.push(e("c", 1e6, 1));
        let mut den = den;
        den.push(e("d", 1e6, 1));
        let iv = paired_ratio(&num, &den, 200, 1).unwrap();
        assert!((iv.value - 2.0).abs() < 1e-12, "{iv:?}");
        assert!((iv.lo - 2.0).abs() < 1e-12 && (iv.hi - 2.0).abs() < 1e-12);
        assert!(paired_ratio(&num[..0], &den, 200, 1).is_none());
    }
}
