//! `trail eval mae`: trained predictors scored on another generated run (another corpus, or
//! prompts held out) with the metrics of `trail report`.
//!
//! `--models runs/NAME/models` scores everything `trail train` left there: the layer selected
//! on NAME's validation split, the multi-layer probe, the BERT baselines (run on the new
//! prompts) and the constant baselines (NAME's train lengths). `--checkpoint F` scores an
//! exported checkpoint alone: `refined`, `probe_no_refine`, `prompt_embedding` (the other keys
//! are null). Writes `metrics.json` (the keys of `trail report`'s), `report.md`, the plots of
//! the scored requests (`mae_vs_generated.png`, `confusion.png`, `reliability.png`) and
//! `manifest.json` into `--out`. Predictors made for another model or hidden size than the
//! data's are refused, naming the file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use trail_checkpoints::scoring::{self, Predictors, ScoreOptions, Trained};
use trail_checkpoints::suite::{self, BertAssets, Run};
use trail_datasets::{SplitFilter, store};

use crate::manifest::{Manifest, write_atomic};
use crate::stages::progress::Steps;
use crate::stages::report::{predictor_table, test_plots};
use crate::stages::train::bert_dir;

/// Arguments of `trail eval mae`.
#[derive(Debug, Clone, clap::Args, Serialize)]
#[command(group(clap::ArgGroup::new("predictors").required(true).args(["models", "checkpoint"])))]
pub struct Args {
    /// A trained run's models directory (`runs/NAME/models`).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// An exported checkpoint (`trail export`) instead of a models directory.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The generated run to score on.
    #[arg(long = "run", alias = "data", value_name = "DIR")]
    pub data: PathBuf,
    /// Which of its requests: `all`, `train`, `val` or `test`.
    #[arg(long, default_value = "all")]
    pub split: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Refresh the refined estimate every N tokens (default: the checkpoint's, else 8).
    #[arg(long = "refine-every", alias = "refine-interval")]
    pub refine_interval: Option<u32>,
    /// Bootstrap resamples of the 95 % intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Leave the BERT baselines out (their keys are null).
    #[arg(long)]
    pub no_bert: bool,
    /// all-MiniLM-L6-v2's directory (default: the cache, fetched on first use).
    #[arg(long)]
    pub bert_dir: Option<PathBuf>,
}

/// The run a models directory belongs to (`RUN/models`).
fn training_run(models: &Path) -> anyhow::Result<Run> {
    let dir = models
        .parent()
        .filter(|_| models.file_name().is_some_and(|n| n == suite::MODELS_DIR))
        .with_context(|| {
            format!(
                "--models {}: expected a trained run's `{}` directory",
                models.display(),
                suite::MODELS_DIR
            )
        })?;
    Run::open(dir).with_context(|| format!("{}: the run the models learned from", dir.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let split = match args
        .split
        .parse::<SplitFilter>()
        .map_err(|e| anyhow::anyhow!("--split `{}`: {e}", args.split))?
    {
        SplitFilter::All => None,
        SplitFilter::Only(s) => Some(s),
    };
    let data = Run::open(&args.data).with_context(|| format!("{}", args.data.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let mut manifest = Manifest::start("eval-mae", &args, Some(args.seed))?;
    manifest.kernel_id = Some(data.info.kernel_id.clone());

    let mut opts = ScoreOptions {
        bootstrap: args.bootstrap,
        seed: args.seed,
        ..ScoreOptions::default()
    };
    let steps = Steps::new();
    let (source, metrics, details, mut read_layers) = match (&args.models, &args.checkpoint) {
        (Some(models), None) => {
            let train = training_run(models)?;
            let mut trained =
                Trained::open(&train).with_context(|| format!("reading {}", models.display()))?;
            let has_bert = trained.bert_finetuned.is_some() || trained.bert_frozen.is_some();
            let (ft, fr) = if args.no_bert || !has_bert {
                (None, None)
            } else {
                let cfg = suite::read_suite_config(models)?;
                let assets = BertAssets {
                    dir: bert_dir(args.bert_dir.as_deref())?,
                };
                let scored: Vec<_> = data
                    .requests
                    .iter()
                    .filter(|r| split.is_none_or(|s| r.split == s))
                    .cloned()
                    .collect();
                steps.step(format!(
                    "running the BERT baselines on {} prompts",
                    scored.len()
                ));
                suite::predict_bert(models, &cfg, &assets, &scored)
                    .with_context(|| format!("BERT baselines of {}", models.display()))?
            };
            trained.predictors.bert_finetuned = ft;
            trained.predictors.bert_frozen = fr;
            // Its predictions are the training run's prompts': not these.
            trained.predictors.bert_finetuned_v1_bins = None;
            opts.refine_interval = args.refine_interval.unwrap_or(8);
            steps.step(format!("scoring the predictors on {}", data.dir.display()));
            let scored =
                scoring::score(&data, split, &trained.predictors, &opts).with_context(|| {
                    format!("scoring {} on {}", models.display(), data.dir.display())
                })?;
            for p in models_files(models)? {
                manifest.input(&p, &train.dir)?;
            }
            let source = format!(
                "the predictors of `{}` (layer {} selected on its validation split)",
                trail_fs::portable_path(models, &args.out),
                trained.best_layer
            );
            let mut layers = vec![trained.best_layer];
            if let Some((l, _)) = &trained.predictors.multi {
                layers.extend(l);
            }
            let (metrics, details) = trained.metrics(scored, &opts);
            (source, metrics, details, layers)
        }
        (None, Some(path)) => {
            let preds = Predictors::checkpoint(path)?;
            let interval = preds.ckpt.meta.refine_interval;
            opts.refine_interval =
                args.refine_interval
                    .unwrap_or(if interval > 0 { interval } else { 8 });
            steps.step(format!(
                "scoring {} on {}",
                path.display(),
                data.dir.display()
            ));
            let scored = scoring::score(&data, split, &preds, &opts)
                .with_context(|| format!("scoring {} on {}", path.display(), data.dir.display()))?;
            manifest.input(path, &args.out)?;
            let source = format!(
                "the exported checkpoint `{}` (probe on layers {:?}, validation MAE {:.2})",
                trail_fs::portable_path(path, &args.out),
                preds.ckpt.meta.probe_layers,
                preds.ckpt.meta.val_mae
            );
            let meta = &preds.ckpt.meta;
            let layers = meta
                .probe_layers
                .iter()
                .chain(&meta.prompt_layers)
                .map(|&l| l as u32)
                .collect();
            let (metrics, details) = preds.checkpoint_metrics(scored, &opts);
            (source, metrics, details, layers)
        }
        _ => anyhow::bail!("give either --models or --checkpoint"),
    };
    manifest.input(&trail_datasets::schema::requests_path(&data.dir), &data.dir)?;
    read_layers.sort_unstable();
    read_layers.dedup();
    for l in read_layers {
        for part in store::layer_parts(&data.dir, l)? {
            manifest.input(&part, &data.dir)?;
        }
    }

    steps.step("writing metrics.json, report.md and the plots");
    let split_name = split.map_or("all", |s| s.as_str());
    let metrics_path = args.out.join("metrics.json");
    write_atomic(
        &metrics_path,
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let md = markdown(&source, &data, &args.out, split_name, &metrics);
    let md_path = args.out.join("report.md");
    write_atomic(&md_path, md.as_bytes())?;
    let plots = test_plots(&args.out, &metrics, &details)?;
    for f in [&metrics_path, &md_path].into_iter().chain(&plots) {
        manifest.output(f, &args.out)?;
    }
    manifest.result("split", split_name)?;
    manifest.result("requests", metrics.test.requests)?;
    manifest.result(
        "mae_remaining_refined_tokens",
        metrics.test.mae_remaining.get("refined"),
    )?;
    manifest.finish(&args.out)?;
    drop(steps);
    let refined = metrics.test.mae_remaining.get("refined").cloned().flatten();
    eprintln!(
        "{} requests of {} (split {split_name}): refined MAE {}",
        metrics.test.requests,
        data.dir.display(),
        refined.map_or("—".into(), |i| format!(
            "{:.1} [{:.1}, {:.1}]",
            i.value, i.lo, i.hi
        ))
    );
    eprintln!("report: {}", md_path.display());
    Ok(())
}

/// Every file of a models directory, sorted.
fn models_files(models: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(models)
        .with_context(|| format!("{}: cannot list", models.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// `report.md`: what was scored on what, and `trail report`'s predictor table.
fn markdown(
    source: &str,
    data: &Run,
    out: &Path,
    split: &str,
    m: &trail_checkpoints::scoring::Metrics,
) -> String {
    use std::fmt::Write as _;
    let t = &m.test;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Length predictors scored on `{}`\n",
        trail_fs::portable_path(&data.dir, out)
    );
    let _ = writeln!(s, "Predictors: {source}.\n");
    let _ = writeln!(
        s,
        "Data: model sha256 `{}`, kernel `{}`; max_new_tokens {}; positions sampled: {}. \
         Split `{split}`: {} requests, {} (request, g) pairs; 95 % intervals from {} bootstrap \
         resamples of requests. Refined = Bayesian filter refreshed every {} tokens, counting \
         down between.\n",
        data.info.model_sha256,
        data.info.kernel_id,
        m.max_new_tokens,
        data.info.sample.as_deref().unwrap_or("unknown"),
        t.requests,
        t.pairs,
        m.bootstrap_resamples,
        m.refine_interval
    );
    s.push_str(&predictor_table(t));
    let _ = writeln!(
        s,
        "\n![MAE vs tokens generated](mae_vs_generated.png)\n\n\
         ![Confusion matrix of the probe](confusion.png)\n\n\
         ![Reliability of the refined estimate](reliability.png)\n"
    );
    if !m.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &m.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}
