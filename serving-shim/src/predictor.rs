//! [`Predictor`]: the TRAIL length predictor in the serving loop — the checkpoint's prompt
//! predictor and its decode probe on the last prompt token give each request its first
//! remaining-length distribution at prefill; the decode probe, run on the captured layer state
//! of the same forward step, refreshes it through the Bayesian [`Filter`] every `refine_every`
//! tokens, and counts down in between. When each happens is [`schedule`]'s, shared with the
//! scorer.

use trail_checkpoints::checkpoint::g_features;
use trail_checkpoints::schedule;
use trail_checkpoints::{Checkpoint, Filter};
use trail_llm::{KvCache, LayerSet, StepOutput};

use crate::error::EngineError;

/// A loaded checkpoint, its filter and the layers the model must capture for it.
#[derive(Debug)]
pub struct Predictor {
    ckpt: Checkpoint,
    filter: Filter,
    layers: LayerSet,
}

impl Predictor {
    /// The predictor of `ckpt`, refreshing every `refine_every` tokens (the checkpoint's
    /// `refine_interval` when `None`).
    pub fn new(ckpt: Checkpoint, refine_every: Option<u32>) -> Self {
        let interval = refine_every.unwrap_or(ckpt.meta.refine_interval).max(1);
        // Its bins (v2: with the cap class, read out as each request's own cap minus g) and
        // its calibrated likelihood, where it has one.
        let filter = ckpt.meta.filter(interval);
        let mut layers = LayerSet::NONE;
        for &l in ckpt
            .meta
            .probe_layers
            .iter()
            .chain(&ckpt.meta.prompt_layers)
        {
            layers = layers.with(l);
        }
        Self {
            ckpt,
            filter,
            layers,
        }
    }

    /// Layers the forward step must capture.
    pub fn layers(&self) -> LayerSet {
        self.layers
    }

    /// The refinement filter.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The decode probe's input for `row` of a step, the request's row `g`: its probe layers
    /// concatenated, then (a v2 checkpoint that reads it) the tokens generated.
    pub fn decode_features(&self, out: &StepOutput, row: usize, g: u32, into: &mut Vec<f32>) {
        for &l in &self.ckpt.meta.probe_layers {
            let h = out
                .hidden(row, l)
                .expect("the step captured the predictor's layers");
            into.extend_from_slice(h);
        }
        if self.ckpt.meta.g_input {
            into.extend_from_slice(&g_features(g, self.ckpt.meta.bins.max()));
        }
    }

    /// The prompt predictor's input from a cache after prefill (mean over prompt tokens of the
    /// prompt layers); `None` without a prompt predictor.
    pub fn prompt_features(&self, cache: &KvCache) -> Option<Vec<f32>> {
        self.ckpt.prompt.as_ref()?;
        let (set, mean) = cache.prompt_mean()?;
        let h = self.ckpt.meta.hidden_size;
        let mut f = Vec::with_capacity(h * self.ckpt.meta.prompt_layers.len());
        for &l in &self.ckpt.meta.prompt_layers {
            let r = set.rank(l)?;
            f.extend_from_slice(&mean[r * h..(r + 1) * h]);
        }
        Some(f)
    }

    /// Bin probabilities of the decode probe for n rows of features (n×d), row by row
    /// ([`schedule::probe_rows`], as the scorer computes them).
    pub fn decode_proba(&self, features: &[f32]) -> Result<Vec<f32>, EngineError> {
        schedule::probe_rows(&self.ckpt.probe, features)
            .map_err(|e| EngineError::Predictor(e.to_string()))
    }

    /// Bin probabilities of the prompt predictor for n rows of features, row by row.
    pub fn prompt_proba(&self, features: &[f32]) -> Result<Vec<f32>, EngineError> {
        let p = self.ckpt.prompt.as_ref().ok_or_else(|| {
            EngineError::Predictor("the checkpoint has no prompt predictor".into())
        })?;
        schedule::probe_rows(p, features).map_err(|e| EngineError::Predictor(e.to_string()))
    }

    /// Classes the probes output (the length bins, and v2's cap class).
    pub fn k(&self) -> usize {
        self.ckpt.meta.bins.k()
    }
}
