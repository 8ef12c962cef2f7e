//! [`KvCache`]: one sequence's keys and values per layer, a plain value the caller holds, and the
//! running sum of the captured layers over its prompt tokens (for the prompt mean).

use crate::config::Config;
use crate::layers::LayerSet;

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct LayerKv {
    /// `len × kv_heads × head_dim`, RoPE applied.
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PromptSum {
    pub(crate) layers: LayerSet,
    pub(crate) tokens: usize,
    /// `layers.len() × hidden`, summed in token order.
    pub(crate) sum: Vec<f64>,
}

/// One sequence's key/value cache, a plain value: clone it, drop it, or rebuild it by
/// prefilling the same tokens again (bit-identical). Also keeps the running sum of the
/// captured layers over the prompt tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    pub(crate) len: usize,
    pub(crate) kv_dim: usize,
    pub(crate) hidden: usize,
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) prompt: Option<PromptSum>,
}

impl KvCache {
    pub fn new(cfg: &Config) -> Self {
        Self {
            len: 0,
            kv_dim: cfg.kv_dim(),
            hidden: cfg.hidden_size,
            layers: vec![LayerKv::default(); cfg.num_hidden_layers],
            prompt: None,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token (recompute preemption), keeping the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
        for l in &mut self.layers {
            l.k.clear();
            l.v.clear();
        }
        self.prompt = None;
    }

    /// Bytes of keys and values held (f32).
    pub fn bytes(&self) -> usize {
        2 * self.len * self.kv_dim * self.layers.len() * size_of::<f32>()
    }

    /// Keys of `layer`: `len × kv_heads × head_dim`, RoPE applied.
    pub fn keys(&self, layer: usize) -> &[f32] {
        &self.layers[layer].k
    }

    /// Values of `layer`: `len × kv_heads × head_dim`.
    pub fn values(&self, layer: usize) -> &[f32] {
        &self.layers[layer].v
    }

    /// Prompt tokens summed so far (0 when no layers were captured during prefill).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.tokens)
    }

    /// Mean over the prompt tokens of the layers captured while prefilling:
    /// `(layers, layers.len() × hidden)`.
    pub fn prompt_mean(&self) -> Option<(LayerSet, Vec<f32>)> {
        let p = self.prompt.as_ref().filter(|p| p.tokens > 0)?;
        let n = p.tokens as f64;
        Some((p.layers, p.sum.iter().map(|s| (s / n) as f32).collect()))
    }

    /// Makes room for `tokens` more keys and values in every layer.
    pub(crate) fn reserve(&mut self, tokens: usize) {
        for l in &mut self.layers {
            l.k.reserve(tokens * self.kv_dim);
            l.v.reserve(tokens * self.kv_dim);
        }
    }
}
