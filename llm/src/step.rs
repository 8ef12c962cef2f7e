//! One step's input and output: a [`Row`] per sequence (its cache and new tokens), the
//! [`StepOutput`] (logits and captured hidden states per row), and the check of every row
//! against the model before a step touches any cache.

use crate::cache::{KvCache, KvFormat};
use crate::config::Config;
use crate::error::{LlmError, Result};
use crate::layers::LayerSet;

/// One sequence's part of a step: `tokens` are appended to `cache`; the first `prompt_tokens`
/// of them are prompt tokens (summed into the prompt mean of the captured layers).
#[derive(Debug)]
pub struct Row<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub prompt_tokens: usize,
}

impl<'a> Row<'a> {
    pub fn new(cache: &'a mut KvCache, tokens: &'a [u32], prompt_tokens: usize) -> Self {
        Self {
            cache,
            tokens,
            prompt_tokens,
        }
    }

    /// A prefill chunk: every token is a prompt token.
    pub fn prefill(cache: &'a mut KvCache, tokens: &'a [u32]) -> Self {
        Self::new(cache, tokens, tokens.len())
    }

    /// A decode row: one generated token.
    pub fn decode(cache: &'a mut KvCache, token: &'a u32) -> Self {
        Self::new(cache, std::slice::from_ref(token), 0)
    }
}

/// What a step returns: per row, logits at its last new position and the captured layers'
/// hidden states of that position. `hidden` is row-major `rows × layers.len() × hidden_size`
/// (layers ascending), so one row's states for all captured layers are one contiguous slice.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub rows: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: LayerSet,
    /// `rows × vocab_size`.
    pub logits: Vec<f32>,
    /// `rows × layers.len() × hidden_size`.
    pub hidden: Vec<f32>,
}

impl StepOutput {
    pub fn logits(&self, row: usize) -> &[f32] {
        &self.logits[row * self.vocab_size..(row + 1) * self.vocab_size]
    }

    /// All captured layers of `row`, concatenated in ascending layer order.
    pub fn row_hidden(&self, row: usize) -> &[f32] {
        let w = self.layers.len() * self.hidden_size;
        &self.hidden[row * w..(row + 1) * w]
    }

    /// Layer `layer` of `row`, if captured.
    pub fn hidden(&self, row: usize, layer: usize) -> Option<&[f32]> {
        let slot = self.layers.rank(layer)?;
        let s = (row * self.layers.len() + slot) * self.hidden_size;
        Some(&self.hidden[s..s + self.hidden_size])
    }

    /// Greedy token of `row` (lowest id on ties).
    pub fn argmax(&self, row: usize) -> u32 {
        crate::sampler::argmax(self.logits(row))
    }
}

/// Checks every row against the model and `layers` (tokens, prompt count, cache shape, context,
/// vocabulary, the model's KV format, and the same captured layers across prompt chunks), so that
/// a step that fails changes nothing.
pub(crate) fn validate(
    cfg: &Config,
    kv: KvFormat,
    rows: &[Row<'_>],
    layers: LayerSet,
) -> Result<()> {
    if layers.end() > cfg.num_hidden_layers {
        return Err(LlmError::Step(format!(
            "layer {} asked of a {}-layer model",
            layers.end() - 1,
            cfg.num_hidden_layers
        )));
    }
    for row in rows {
        if row.tokens.is_empty() {
            return Err(LlmError::Step("a row with no tokens".into()));
        }
        if row.prompt_tokens > row.tokens.len() {
            return Err(LlmError::Step(format!(
                "{} prompt tokens in a row of {}",
                row.prompt_tokens,
                row.tokens.len()
            )));
        }
        if row.cache.format() != kv {
            return Err(LlmError::Step(format!(
                "a cache in {} where the model runs {kv} (Llama::set_kv_format)",
                row.cache.format()
            )));
        }
        if row.cache.n_layers() != cfg.num_hidden_layers
            || row.cache.kv_dim != cfg.kv_dim()
            || row.cache.hidden != cfg.hidden_size
        {
            return Err(LlmError::Step("a cache made for another model".into()));
        }
        let end = row.cache.len + row.tokens.len();
        if end > cfg.max_position_embeddings {
            return Err(LlmError::ContextOverflow {
                pos: end - 1,
                max: cfg.max_position_embeddings,
            });
        }
        if let Some(&t) = row.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(LlmError::Step(format!(
                "token {t} outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        // The prompt mean covers every prompt token, so all chunks capture the same layers
        // (a chunk without them would count its tokens but add none of their states).
        let captured = row
            .cache
            .prompt
            .as_ref()
            .map_or(LayerSet::NONE, |p| p.layers);
        if row.prompt_tokens > 0 && row.cache.len > 0 && captured != layers {
            return Err(LlmError::Step(format!(
                "prompt chunks of one sequence asked for different layer sets ({} layers \
                 after {}): the prompt mean would miss tokens",
                layers.len(),
                captured.len()
            )));
        }
    }
    Ok(())
}
