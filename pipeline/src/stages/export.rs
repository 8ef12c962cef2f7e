//! `trail export --run runs/NAME --out predictor.safetensors [--bert] [--probe layer|multi|best]`:
//! the selected probe (by default the lower validation MAE of the best layer and the multi-layer
//! probe) and its prompt predictor with their standardization, in one safetensors checkpoint whose
//! metadata names the model (sha256), the runner's kernel id, the layers, hidden size, bins,
//! refine interval, training-data hash, validation MAE and git commit
//! ([`trail_checkpoints::Checkpoint`]). With `--bert`, also `bert.safetensors` beside it: the
//! fine-tuned BERT with its head in f16, with its config and tokenizer in the metadata.

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;
use trail_checkpoints::Checkpoint;
use trail_checkpoints::suite::{self, BertAssets, ProbeChoice, Run};

use crate::manifest::{GIT_COMMIT, Manifest};

/// Arguments of `trail export`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Args {
    /// The run directory (trained with `trail train`).
    #[arg(long)]
    pub run: PathBuf,
    /// The checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Refresh interval recorded for the serving engine, in tokens (its `--refine-every`
    /// default).
    #[arg(long = "refine-every", alias = "refine-interval", default_value_t = 8)]
    pub refine_interval: u32,
    /// Also write bert.safetensors (the fine-tuned BERT) beside --out.
    #[arg(long)]
    pub bert: bool,
    /// all-MiniLM-L6-v2 directory (for its config and tokenizer); default: the trail cache.
    #[arg(long)]
    pub bert_dir: Option<PathBuf>,
    /// Which probe: `layer` (the single layer with the lowest validation MAE, the paper's
    /// selection), `multi` (the multi-layer probe) or `best` (the lower validation MAE of the two).
    #[arg(long, value_enum, default_value_t = Probe::Best)]
    pub probe: Probe,
}

/// `--probe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    Layer,
    Multi,
    Best,
}

impl From<Probe> for ProbeChoice {
    fn from(p: Probe) -> Self {
        match p {
            Probe::Layer => ProbeChoice::Layer,
            Probe::Multi => ProbeChoice::Multi,
            Probe::Best => ProbeChoice::Best,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let run = Run::open(&args.run).with_context(|| format!("{}", args.run.display()))?;
    let bert = if args.bert {
        Some(BertAssets {
            dir: super::train::bert_dir(args.bert_dir.as_deref())?,
        })
    } else {
        None
    };
    let mut manifest = Manifest::start("export", &args, None)?;
    manifest.kernel_id = Some(run.info.kernel_id.clone());
    let e = suite::export(
        &run,
        &args.out,
        args.refine_interval,
        GIT_COMMIT,
        bert.as_ref(),
        args.probe.into(),
    )
    .with_context(|| format!("exporting from {}", run.dir.display()))?;
    // Read it back: what the serving engine will load.
    let c = Checkpoint::load(&e.checkpoint)?;
    let base = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    manifest.output(&e.checkpoint, &base)?;
    if let Some(b) = &e.bert {
        manifest.output(b, &base)?;
    }
    manifest.result("layers", &e.layers)?;
    manifest.result("val_mae_tokens", e.val_mae)?;
    manifest.result("hidden_size", c.meta.hidden_size)?;
    let stem = args
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "predictor".into());
    manifest.finish_as(&base.join(format!("{stem}.manifest.json")))?;
    eprintln!(
        "exported the probe of layers {:?} (validation MAE {:.2} tokens, hidden {}) to {}{}",
        e.layers,
        e.val_mae,
        c.meta.hidden_size,
        e.checkpoint.display(),
        e.bert
            .as_ref()
            .map(|b| format!(" and {}", b.display()))
            .unwrap_or_default()
    );
    Ok(())
}
