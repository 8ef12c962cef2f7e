//! [`Models`]: what the in-process servers run, loaded once per run: the target model, the
//! predictor checkpoint (when a policy to run needs it) and BERT's initial predictions of
//! every prompt (when a policy to run ranks by them). The HTTP backend's child servers load
//! their own, from the paths.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use trail_checkpoints::Checkpoint;
use trail_checkpoints::prior::BertPrior;
use trail_eval::loadgen::workload::Prompt;
use trail_llm::Runner;

use super::Args;
use super::config::Config;
use super::server::{self, Launch, ServerSettings};

/// The models of the in-process backends (`inprocess`, `virtual`); nothing for `http`.
pub struct Models {
    pub runner: Option<Arc<Runner>>,
    pub checkpoint: Option<Checkpoint>,
    /// BERT's total-length prediction by prompt text.
    pub priors: Option<HashMap<String, f64>>,
}

impl Models {
    /// Loads what the backend of `args` runs in process for the policies of `cfg`.
    pub fn load(args: &Args, cfg: &Config) -> anyhow::Result<Self> {
        let inprocess = args.backend.in_process();
        let runner = if inprocess {
            Some(Arc::new(args.model.load()?))
        } else {
            None
        };
        let checkpoint = match (
            &args.predictor.checkpoint,
            inprocess && cfg.needs_checkpoint(),
        ) {
            (Some(p), true) => {
                Some(Checkpoint::load(p).with_context(|| format!("loading {}", p.display()))?)
            }
            _ => None,
        };
        let priors = match &args.ranking.bert_checkpoint {
            Some(p) if inprocess && cfg.policies.iter().any(|q| server::uses_prior(*q)) => {
                let prior =
                    BertPrior::load(p).with_context(|| format!("loading {}", p.display()))?;
                Some(
                    predict_all(&prior, &cfg.pool, cfg.max_tokens)
                        .with_context(|| format!("predicting with {}", p.display()))?,
                )
            }
            _ => None,
        };
        Ok(Self {
            runner,
            checkpoint,
            priors,
        })
    }

    /// The loaded model's kernels.
    pub fn kernel_id(&self) -> Option<String> {
        self.runner.as_ref().map(|r| r.kernel_id().to_string())
    }

    /// What a server of `args` needs, with these models and `settings` (no step model or
    /// recordings yet: the saturation burst runs on the wall clock).
    pub fn launch<'a>(&'a self, args: &'a Args, settings: &'a ServerSettings) -> Launch<'a> {
        Launch {
            backend: args.backend,
            settings,
            model: &args.model,
            runner: self.runner.as_ref(),
            checkpoint_path: args.predictor.checkpoint.as_deref(),
            bert_checkpoint_path: args.ranking.bert_checkpoint.as_deref(),
            checkpoint: self.checkpoint.as_ref(),
            priors: self.priors.as_ref(),
            step_model: None,
            recordings: None,
            remote: None,
        }
    }
}

/// BERT's prediction for every prompt of `pool`, by prompt text, each capped at `cap` (the
/// `max_tokens` every request is sent with, which a v2 BERT's cap class reads out, as the
/// server's does).
fn predict_all(
    prior: &BertPrior,
    pool: &[Prompt],
    cap: u32,
) -> anyhow::Result<HashMap<String, f64>> {
    let texts: Vec<&str> = pool.iter().map(|q| q.text.as_str()).collect();
    let pred = prior.predict_capped(&texts, &vec![cap; texts.len()], 16)?;
    Ok(texts
        .iter()
        .zip(pred)
        .map(|(t, x)| (t.to_string(), x))
        .collect())
}
