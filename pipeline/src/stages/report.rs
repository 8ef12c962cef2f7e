//! `trail report --run runs/NAME`: score the trained predictors on the test split.
//!
//! Writes into `--out` (default `runs/NAME/report/`): `metrics.json` (fixed keys, see
//! [`trail_checkpoints::scoring`]), `report.md`, PNG plots (validation MAE per layer, MAE vs
//! tokens generated for every predictor, the selected probe's confusion matrix, reliability of
//! the refined estimate, training curves) and `manifest.json`. The layer is chosen on the
//! validation split; every other figure is on the test split with bootstrap 95 % intervals over
//! requests. `metrics.json` holds no timings: the same models give the same bytes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use trail_checkpoints::metrics::Interval;
use trail_checkpoints::scoring::{
    self, Details, Metrics, PREDICTORS, RequestError, ScoreOptions, TestMetrics,
};
use trail_checkpoints::suite::Run;
use trail_plot::{self as plot, Axes, Series};

use crate::manifest::{Manifest, write_atomic};
use crate::stages::progress::Steps;

/// Arguments of `trail report`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Args {
    /// The run directory (trained with `trail train`).
    #[arg(long)]
    pub run: PathBuf,
    /// Output directory (default: RUN/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Refresh the refined estimate every N tokens (the release's default 8).
    #[arg(long = "refine-every", alias = "refine-interval", default_value_t = 8)]
    pub refine_interval: u32,
    /// Bootstrap resamples of the 95 % intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A run holding the same test requests at every position (`trail generate --split test
    /// --sample all`, the selected layers): scores `refined_every_token` there.
    #[arg(long)]
    pub every_token: Option<PathBuf>,
    /// Another report to set beside this one, `LABEL=DIR` (DIR holds its `metrics.json` and
    /// `breakdown.json`), repeatable: v1 beside v2, or the points of a learning curve.
    #[arg(long, value_parser = parse_compare)]
    pub compare: Vec<(String, PathBuf)>,
    /// This report's label beside `--compare`'s. The reports labelled by a number (training
    /// prompts) are the points of `learning_curve.png` (refined, probe and fine-tuned BERT
    /// against it); the others (`v1`) are only set beside in the table.
    #[arg(long, default_value = "this run")]
    pub label: String,
}

/// `LABEL=DIR`.
fn parse_compare(s: &str) -> Result<(String, PathBuf), String> {
    let (label, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("--compare `{s}`: expected LABEL=DIR"))?;
    Ok((label.to_string(), PathBuf::from(dir)))
}

/// A compared report: its label, metrics and breakdown.
pub struct Compared {
    pub label: String,
    pub metrics: Metrics,
    pub breakdown: Breakdown,
    /// Its `request_errors.json` (empty when absent: an older report).
    pub request_errors: Vec<RequestError>,
}

/// [`Details::breakdown`] as `breakdown.json` holds it: one entry per predictor.
pub type Breakdown = Vec<BreakdownEntry>;

/// One predictor's rows of `breakdown.json`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct BreakdownEntry {
    pub predictor: String,
    pub rows: Vec<Row>,
}

/// One bucket of a [`BreakdownEntry`]: its table (`length`, the request's true length, or `g`,
/// the tokens generated), its label, the MAE of the remaining length there and its pairs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Row {
    pub table: String,
    pub bucket: String,
    pub mae_tokens: f64,
    pub pairs: usize,
}

/// Reads `DIR/metrics.json`, and `DIR/breakdown.json` and `DIR/request_errors.json` (empty when
/// absent: an older report).
fn read_compared(label: &str, dir: &Path) -> anyhow::Result<Compared> {
    let path = dir.join("metrics.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--compare {label}: reading {}", path.display()))?;
    let metrics = serde_json::from_str(&text)
        .with_context(|| format!("--compare {label}: {}", path.display()))?;
    let breakdown = read_optional(dir, "breakdown.json", label)?.unwrap_or_default();
    let request_errors = read_optional(dir, "request_errors.json", label)?.unwrap_or_default();
    Ok(Compared {
        label: label.to_string(),
        metrics,
        breakdown,
        request_errors,
    })
}

/// `DIR/NAME` parsed, `None` when the file is absent (a report older than the file).
fn read_optional<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
    label: &str,
) -> anyhow::Result<Option<T>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .with_context(|| format!("--compare {label}: {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("--compare {label}: reading {}", path.display())),
    }
}

/// This report's headline figures beside the compared ones': one row per report, with each
/// compared `refined` ÷ this one's paired over the requests both scored (`errors`: this
/// report's [`RequestError`]s; `boot`: resamples and seed).
pub fn comparison_table(
    this: &Metrics,
    label: &str,
    errors: &[RequestError],
    others: &[Compared],
    boot: (usize, u64),
) -> String {
    let mut s = String::from("## Compared\n\n");
    let _ = writeln!(
        s,
        "| report | refined | probe, no refine | BERT fine-tuned | BERT ÷ refined | BERT on v1's \
         bins ÷ refined | refined ÷ {label}'s, paired |\n|---|---|---|---|---|---|---|"
    );
    let rows = std::iter::once((label, this, None)).chain(
        others
            .iter()
            .map(|c| (c.label.as_str(), &c.metrics, Some(&c.request_errors))),
    );
    for (name, m, theirs) in rows {
        let t = &m.test;
        let get = |k: &str| fmt_iv(&t.mae_remaining.get(k).cloned().flatten(), 1);
        let paired = theirs.map_or("—".into(), |e| {
            fmt_iv(&scoring::paired_ratio(e, errors, boot.0, boot.1), 2)
        });
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {paired} |",
            get("refined"),
            get("probe_no_refine"),
            get("bert_finetuned"),
            fmt_iv(&t.ratio_bert_finetuned_over_refined, 2),
            fmt_iv(&t.ratio_bert_finetuned_v1_bins_over_refined, 2),
        );
    }
    let _ = writeln!(
        s,
        "\nEach report's intervals are its own (bootstrap over its test requests); the same test \
         requests make the rows comparable. The last column resamples the requests both reports \
         scored, each request's errors in both together (> 1: this report's `refined` is \
         better).\n"
    );
    s
}

fn fmt_iv(iv: &Option<Interval>, digits: usize) -> String {
    match iv {
        Some(i) => format!("{:.d$} [{:.d$}, {:.d$}]", i.value, i.lo, i.hi, d = digits),
        None => "—".into(),
    }
}

/// The predictors' test figures as a markdown table, with the BERT / refined ratios.
pub fn predictor_table(t: &TestMetrics) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| predictor | MAE remaining (tokens) | MAE at start | Kendall τ-b at start |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    let mut keys: Vec<&str> = PREDICTORS.to_vec();
    for extra in ["probe_multi_layer", "refined_multi_layer"] {
        if t.mae_remaining.contains_key(extra) {
            keys.push(extra);
        }
    }
    for k in keys {
        let get = |map: &std::collections::BTreeMap<String, Option<Interval>>| {
            map.get(k).cloned().flatten()
        };
        let _ = writeln!(
            s,
            "| `{k}` | {} | {} | {} |",
            fmt_iv(&get(&t.mae_remaining), 1),
            fmt_iv(&get(&t.mae_at_start), 1),
            fmt_iv(&get(&t.kendall_tau_at_start), 3)
        );
    }
    let _ = writeln!(
        s,
        "\nMAE ratio fine-tuned BERT / refined: {} (paper's readout, max(pred − g, 0)); against \
         the conditional readout E[L − g | L > g]: {}. The paper reports 2.66×.\n",
        fmt_iv(&t.ratio_bert_finetuned_over_refined, 2),
        fmt_iv(&t.ratio_bert_finetuned_conditional_over_refined, 2)
    );
    if t.bert_finetuned_v1_bins.is_some() {
        let _ = writeln!(
            s,
            "Predictor v2's bins have a \"runs to the cap\" class, so `bert_finetuned` above is \
             BERT fine-tuned on the same bins (like for like). On v1's ten bins (the paper's \
             comparison) fine-tuned BERT's MAE is {} and its ratio to refined {}.\n",
            fmt_iv(&t.bert_finetuned_v1_bins, 1),
            fmt_iv(&t.ratio_bert_finetuned_v1_bins_over_refined, 2)
        );
    }
    s
}

/// [`Details::breakdown`] with owned labels (what `breakdown.json` holds).
pub fn owned_breakdown(d: &Details) -> Breakdown {
    d.breakdown
        .iter()
        .map(|(k, rows)| BreakdownEntry {
            predictor: k.clone(),
            rows: rows
                .iter()
                .map(|r| Row {
                    table: r.0.to_string(),
                    bucket: r.1.clone(),
                    mae_tokens: r.2,
                    pairs: r.3,
                })
                .collect(),
        })
        .collect()
}

/// Where the error is: each predictor's MAE by the request's true length and by the tokens
/// generated ([`Details::breakdown`]), as markdown tables (predictors as columns), with each
/// compared report's `refined` beside.
pub fn breakdown_tables(b: &Breakdown, others: &[Compared]) -> String {
    let keys = [
        "refined",
        "probe_no_refine",
        "bert_finetuned",
        "constant_conditional",
    ];
    let mut cols: Vec<(String, &Vec<Row>)> = b
        .iter()
        .filter(|e| keys.contains(&e.predictor.as_str()))
        .map(|e| (e.predictor.clone(), &e.rows))
        .collect();
    for c in others {
        if let Some(e) = c.breakdown.iter().find(|e| e.predictor == "refined") {
            cols.push((format!("refined, {}", c.label), &e.rows));
        }
    }
    let Some(&(_, first)) = cols.first() else {
        return String::new();
    };
    let mut s = String::from("## Where the error is\n\n");
    for (table, title) in [("length", "true length"), ("g", "tokens generated g")] {
        let _ = write!(s, "| MAE by {title} | pairs |");
        for (k, _) in &cols {
            let _ = write!(s, " `{k}` |");
        }
        let _ = writeln!(s, "\n|---|---|{}", "---|".repeat(cols.len()));
        for row in first.iter().filter(|r| r.table == table) {
            let _ = write!(s, "| {} | {} |", row.bucket, row.pairs);
            for (_, rows) in &cols {
                let v = rows
                    .iter()
                    .find(|r| r.table == row.table && r.bucket == row.bucket);
                let _ = write!(
                    s,
                    " {} |",
                    v.map_or("—".into(), |r| format!("{:.1}", r.mae_tokens))
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
    }
    s
}

/// `report.md` from the metrics.
pub fn markdown(run: &Run, out: &Path, m: &Metrics) -> String {
    let t = &m.test;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Length predictors of `{}`\n",
        trail_fs::portable_path(&run.dir, out)
    );
    let _ = writeln!(
        s,
        "Model sha256 `{}`, kernel `{}`; max_new_tokens {}; positions sampled: {}.\n",
        run.info.model_sha256,
        run.info.kernel_id,
        m.max_new_tokens,
        run.info.sample.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        s,
        "Layer selected on validation: **{}** (token-probe MAE {:.2} tokens). Test split: {} \
         requests, {} (request, g) pairs; 95 % intervals from {} bootstrap resamples of \
         requests. Refined = Bayesian filter refreshed every {} tokens, counting down between.\n",
        m.best_layer,
        m.per_layer_val_mae
            .get(&m.best_layer.to_string())
            .copied()
            .unwrap_or(f64::NAN),
        t.requests,
        t.pairs,
        m.bootstrap_resamples,
        m.refine_interval
    );
    s.push_str(&predictor_table(t));
    if let Some(ml) = &m.multi_layer {
        let _ = writeln!(
            s,
            "Multi-layer probe on layers {:?}: validation MAE {:.2} tokens.\n",
            ml.layers, ml.val_mae
        );
    }
    let _ = writeln!(s, "## Validation MAE per layer\n");
    let _ = writeln!(s, "| layer | token probe | prompt predictor |");
    let _ = writeln!(s, "|---|---|---|");
    let mut layers: Vec<(u32, f64)> = m
        .per_layer_val_mae
        .iter()
        .filter_map(|(l, v)| Some((l.parse().ok()?, *v)))
        .collect();
    layers.sort_by_key(|x| x.0);
    for (l, v) in layers {
        let p = m
            .per_layer_prompt_val_mae
            .get(&l.to_string())
            .copied()
            .unwrap_or(f64::NAN);
        let _ = writeln!(s, "| {l} | {v:.2} | {p:.2} |");
    }
    let _ = writeln!(
        s,
        "\n## Plots\n\n![validation MAE per layer](val_mae_by_layer.png)\n\n\
         ![MAE vs tokens generated](mae_vs_generated.png)\n\n\
         ![confusion matrix](confusion.png)\n\n![reliability](reliability.png)\n\n\
         ![training curves](training_curves.png)\n"
    );
    if !m.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &m.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// How a paper names a predictor of `metrics.json` (its key where it has no other name).
pub fn display_name(key: &str) -> &str {
    match key {
        "refined" => "TRAIL (probe, refined)",
        "probe_no_refine" => "probe, not refined",
        "refined_every_token" => "TRAIL, refined every token",
        "probe_multi_layer" => "multi-layer probe",
        "refined_multi_layer" => "multi-layer probe, refined",
        "prompt_embedding" => "prompt embedding",
        "bert_finetuned" => "BERT fine-tuned",
        "bert_finetuned_conditional" => "BERT fine-tuned, E[L − g | L > g]",
        "bert_frozen" => "BERT frozen",
        "constant" => "constant",
        "constant_conditional" => "constant, E[L − g | L > g]",
        other => other,
    }
}

/// Every PNG of the report (each with its SVG beside it); returns their paths.
pub fn plots(out: &Path, m: &Metrics, d: &Details) -> anyhow::Result<Vec<PathBuf>> {
    plot::init_font()?;
    let mut files = Vec::new();
    let layer_series = |map: &std::collections::BTreeMap<String, f64>| {
        let mut v: Vec<(f64, f64)> = map
            .iter()
            .filter_map(|(l, x)| Some((l.parse::<f64>().ok()?, *x)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let p = out.join("val_mae_by_layer.png");
    plot::line_chart(
        &p,
        &Axes::new("Validation MAE per layer", "layer", "MAE (tokens)"),
        &[
            Series::line(
                "token probe (remaining)",
                layer_series(&m.per_layer_val_mae),
            )
            .with_mark(plot::Mark::LinePoints),
            Series::line(
                "prompt predictor (total)",
                layer_series(&m.per_layer_prompt_val_mae),
            )
            .with_mark(plot::Mark::LinePoints),
        ],
    )?;
    files.push(p);
    files.extend(test_plots(out, m, d)?);
    let p = out.join("training_curves.png");
    let series: Vec<Series> = d
        .curves
        .iter()
        .map(|(name, c)| {
            Series::line(
                &format!("{} (val MAE)", display_name(name)),
                c.iter().map(|r| (r.epoch as f64, r.val_mae)).collect(),
            )
            .with_mark(plot::Mark::LinePoints)
        })
        .collect();
    plot::line_chart(
        &p,
        &Axes::new("Training curves", "epoch", "validation MAE (tokens)"),
        &series,
    )?;
    files.push(p);
    Ok(files)
}

/// The learning curve's points: this report and the compared ones whose label is a number
/// (training prompts), in order; the others (`v1` beside `v2`) are not points.
fn curve_points<'a>(
    label: &str,
    this: &'a Metrics,
    others: &'a [Compared],
) -> Vec<(f64, &'a Metrics)> {
    let mut points: Vec<(f64, &Metrics)> = std::iter::once((label, this))
        .chain(others.iter().map(|c| (c.label.as_str(), &c.metrics)))
        .filter_map(|(l, m)| Some((l.parse::<f64>().ok()?, m)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// `learning_curve.png`: refined, probe and fine-tuned BERT test MAE against the training
/// prompts, over the reports labelled by a number ([`curve_points`]); `None` below two points.
fn learning_curve(
    out: &Path,
    label: &str,
    this: &Metrics,
    others: &[Compared],
) -> anyhow::Result<Option<PathBuf>> {
    let points = curve_points(label, this, others);
    if points.len() < 2 {
        return Ok(None);
    }
    let series = ["refined", "probe_no_refine", "bert_finetuned"]
        .iter()
        .map(|&k| {
            let pts = points
                .iter()
                .filter_map(|(x, m)| Some((*x, m.test.mae_remaining.get(k)?.as_ref()?.value)))
                .collect();
            Series::line(display_name(k), pts).with_mark(plot::Mark::LinePoints)
        })
        .collect::<Vec<_>>();
    plot::init_font()?;
    let p = out.join("learning_curve.png");
    plot::line_chart(
        &p,
        &Axes::new(
            "Learning curve (test split)",
            "training prompts",
            "MAE remaining (tokens)",
        ),
        &series,
    )?;
    Ok(Some(p))
}

/// The figures of the scored split (also `trail eval mae`'s): MAE vs tokens generated per
/// predictor, the selected probe's confusion matrix, the refined estimate's reliability.
pub fn test_plots(out: &Path, m: &Metrics, d: &Details) -> anyhow::Result<Vec<PathBuf>> {
    plot::init_font()?;
    let mut files = Vec::new();
    let p = out.join("mae_vs_generated.png");
    let series: Vec<Series> = d
        .mae_by_g
        .iter()
        .map(|(name, pts)| {
            Series::line(
                display_name(name),
                pts.iter().map(|&(g, e, _)| (g, e)).collect(),
            )
            .with_mark(plot::Mark::LinePoints)
        })
        .collect();
    plot::line_chart(
        &p,
        &Axes::new(
            "Test MAE of the remaining length vs tokens generated",
            "tokens generated g",
            "MAE (tokens)",
        ),
        &series,
    )?;
    files.push(p);
    let p = out.join("confusion.png");
    let k = d.confusion.len();
    let labels: Vec<String> = (0..k)
        .map(|i| d.bins.map_or_else(|| i.to_string(), |b| b.range_label(i)))
        .collect();
    plot::heatmap(
        &p,
        &Axes::new(
            &format!(
                "Layer {} probe on test rows (bins of the remaining length)",
                m.best_layer
            ),
            "predicted bin (argmax), remaining tokens",
            "true bin, remaining tokens",
        ),
        &labels,
        &labels,
        &d.confusion,
    )?;
    files.push(p);
    let p = out.join("reliability.png");
    plot::reliability(
        &p,
        &Axes::new(
            "Refined estimate: mean actual vs mean predicted remaining",
            "predicted remaining (tokens)",
            "actual remaining (tokens)",
        ),
        "refined (binned by prediction)",
        &d.reliability
            .iter()
            .map(|&(p, a, _)| (p, a))
            .collect::<Vec<_>>(),
    )?;
    files.push(p);
    Ok(files)
}

/// Scores `refined_every_token` on `dir`, a regeneration of `run`'s test requests with every
/// position stored, and puts it into `metrics` with a note.
fn every_token(
    run: &Run,
    dir: &Path,
    opts: &ScoreOptions,
    metrics: &mut Metrics,
    manifest: &mut Manifest,
) -> anyhow::Result<()> {
    use std::collections::BTreeSet;
    use trail_datasets::split::Split;

    let data = Run::open(dir).with_context(|| format!("--every-token {}", dir.display()))?;
    // The same requests with the same output lengths (the same kernels made both).
    let ids = |r: &Run| -> BTreeSet<(String, u32)> {
        r.requests
            .iter()
            .filter(|q| q.split == Split::Test)
            .map(|q| (q.request_id.clone(), q.output_tokens))
            .collect()
    };
    anyhow::ensure!(
        ids(&data) == ids(run),
        "--every-token {}: its test requests or their output lengths are not {}'s",
        dir.display(),
        run.dir.display()
    );
    let mut trained = scoring::Trained::open(run)
        .with_context(|| format!("reading {}", run.models_dir().display()))?;
    // Only the selected layer's `refined_every_token` is taken from this scoring, so the
    // regeneration needs only that layer: the multi-layer probe's other layers may be missing.
    trained.predictors.multi = None;
    eprintln!("scoring refined_every_token on {}", dir.display());
    let scored = scoring::score(&data, Some(Split::Test), &trained.predictors, opts)
        .with_context(|| format!("scoring on {}", dir.display()))?;
    let (m, _) = trained.metrics(scored, opts);
    anyhow::ensure!(
        m.test.every_position,
        "--every-token {}: the test rows do not hold every position (generate with --sample all)",
        dir.display()
    );
    const KEY: &str = "refined_every_token";
    for (to, from) in [
        (&mut metrics.test.mae_remaining, &m.test.mae_remaining),
        (&mut metrics.test.mae_at_start, &m.test.mae_at_start),
        (
            &mut metrics.test.kendall_tau_at_start,
            &m.test.kendall_tau_at_start,
        ),
    ] {
        to.insert(KEY.to_string(), from.get(KEY).cloned().flatten());
    }
    metrics.notes.retain(|n| !n.starts_with(KEY));
    let on_pairs = |k: &str| fmt_iv(&m.test.mae_remaining.get(k).cloned().flatten(), 1);
    metrics.notes.push(format!(
        "{KEY} is scored on `{}`: the same {} test requests regenerated with every position \
         stored ({} (request, g) pairs; every output length equal to this run's). On those \
         pairs, refined every {} tokens: {}; every token: {}.",
        dir.display(),
        m.test.requests,
        m.test.pairs,
        opts.refine_interval,
        on_pairs("refined"),
        on_pairs(KEY),
    ));
    manifest.input(&trail_datasets::schema::requests_path(dir), dir)?;
    let mut layers = vec![trained.best_layer];
    if let Some((l, _)) = &trained.predictors.multi {
        layers.extend(l);
    }
    layers.sort_unstable();
    layers.dedup();
    for l in layers {
        for part in trail_datasets::store::layer_parts(dir, l)? {
            manifest.input(&part, dir)?;
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let run = Run::open(&args.run).with_context(|| format!("{}", args.run.display()))?;
    let out = args.out.clone().unwrap_or_else(|| run.dir.join("report"));
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut manifest = Manifest::start("report", &args, Some(args.seed))?;
    manifest.kernel_id = Some(run.info.kernel_id.clone());
    let opts = ScoreOptions {
        refine_interval: args.refine_interval,
        bootstrap: args.bootstrap,
        seed: args.seed,
        ..ScoreOptions::default()
    };
    let steps = Steps::new();
    steps.step(format!(
        "scoring the predictors of {} on its test split",
        run.dir.display()
    ));
    let (mut metrics, details) = scoring::score_suite(&run, &opts)
        .with_context(|| format!("scoring {}", run.dir.display()))?;
    if let Some(dir) = &args.every_token {
        steps.step(format!("scoring every token of {}", dir.display()));
        every_token(&run, dir, &opts, &mut metrics, &mut manifest)?;
    }
    steps.step("writing metrics.json, report.md and the plots");
    let models = run.models_dir();
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&models)
        .with_context(|| format!("{}: cannot list", models.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    for p in &inputs {
        manifest.input(p, &run.dir)?;
    }
    let metrics_path = out.join("metrics.json");
    write_atomic(
        &metrics_path,
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let md = out.join("report.md");
    let compared = args
        .compare
        .iter()
        .map(|(l, d)| read_compared(l, d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let breakdown = owned_breakdown(&details);
    let mut text = markdown(&run, &out, &metrics);
    if !compared.is_empty() {
        let boot = (args.bootstrap, args.seed);
        text += &comparison_table(
            &metrics,
            &args.label,
            &details.request_errors,
            &compared,
            boot,
        );
    }
    text += &breakdown_tables(&breakdown, &compared);
    write_atomic(&md, text.as_bytes())?;
    let breakdown_path = out.join("breakdown.json");
    write_atomic(
        &breakdown_path,
        serde_json::to_string_pretty(&breakdown)?.as_bytes(),
    )?;
    let errors_path = out.join("request_errors.json");
    write_atomic(
        &errors_path,
        serde_json::to_string_pretty(&details.request_errors)?.as_bytes(),
    )?;
    let mut files = vec![
        metrics_path.clone(),
        md.clone(),
        breakdown_path,
        errors_path,
    ];
    if let Some(p) = learning_curve(&out, &args.label, &metrics, &compared)? {
        text += "![learning curve](learning_curve.png)\n";
        write_atomic(&md, text.as_bytes())?;
        files.push(p);
    }
    files.extend(plots(&out, &metrics, &details)?);
    for f in &files {
        manifest.output(f, &out)?;
    }
    manifest.result("best_layer", metrics.best_layer)?;
    manifest.result(
        "ratio_bert_finetuned_over_refined",
        metrics.test.ratio_bert_finetuned_over_refined,
    )?;
    manifest.finish(&out)?;
    drop(steps);
    let refined = metrics.test.mae_remaining.get("refined").cloned().flatten();
    eprintln!(
        "best layer {}; refined test MAE {}; BERT fine-tuned / refined {}",
        metrics.best_layer,
        fmt_iv(&refined, 1),
        fmt_iv(&metrics.test.ratio_bert_finetuned_over_refined, 2)
    );
    eprintln!("report: {}", md.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(refined: f64) -> Metrics {
        serde_json::from_value(serde_json::json!({
            "best_layer": 0, "per_layer_val_mae_tokens": {}, "per_layer_prompt_val_mae_tokens": {},
            "multi_layer": null, "max_new_tokens": 512, "refine_interval": 8,
            "bootstrap_resamples": 0, "notes": [],
            "test": {
                "requests": 1, "pairs": 1, "every_position": false,
                "mae_remaining_tokens": {"refined": {"value": refined, "lo": refined, "hi": refined}},
                "mae_at_start_tokens": {}, "kendall_tau_at_start": {},
                "ratio_bert_finetuned_over_refined": null,
                "ratio_bert_finetuned_conditional_over_refined": null
            }
        }))
        .unwrap()
    }

    fn compared(label: &str, refined: f64) -> Compared {
        Compared {
            label: label.into(),
            metrics: metrics(refined),
            breakdown: Vec::new(),
            request_errors: Vec::new(),
        }
    }

    #[test]
    fn the_learning_curve_takes_the_numbered_reports_in_order_and_skips_the_others() {
        let this = metrics(50.0);
        let others = [
            compared("2000", 52.0),
            compared("v1", 60.0),
            compared("500", 58.0),
        ];
        let refined = |pts: Vec<(f64, &Metrics)>| -> Vec<(f64, f64)> {
            pts.into_iter()
                .map(|(x, m)| (x, m.test.mae_remaining["refined"].unwrap().value))
                .collect()
        };
        assert_eq!(
            refined(curve_points("v2", &this, &others)),
            [(500.0, 58.0), (2000.0, 52.0)]
        );
        assert_eq!(
            refined(curve_points("2880", &this, &others)),
            [(500.0, 58.0), (2000.0, 52.0), (2880.0, 50.0)]
        );
        assert!(curve_points("v2", &this, &others[1..2]).is_empty());
    }

    #[test]
    fn breakdown_json_labels_every_field_and_reads_back() {
        let details = Details {
            breakdown: vec![(
                "refined".into(),
                vec![
                    ("length", "< 1/8 cap".into(), 12.5, 40),
                    ("g", "0".into(), 80.0, 3),
                ],
            )],
            ..Details::default()
        };
        let b = owned_breakdown(&details);
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            v[0],
            serde_json::json!({"predictor": "refined", "rows": [
                {"table": "length", "bucket": "< 1/8 cap", "mae_tokens": 12.5, "pairs": 40},
                {"table": "g", "bucket": "0", "mae_tokens": 80.0, "pairs": 3}
            ]})
        );
        let back: Breakdown = serde_json::from_value(v).unwrap();
        assert_eq!(back, b);
        let md = breakdown_tables(&b, &[]);
        assert!(md.contains("| < 1/8 cap | 40 | 12.5 |"), "{md}");
    }
}
