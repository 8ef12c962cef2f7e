//! Llama for the runner: the decoder-only transformer of Llama 2/3 and SmolLM2 (RoPE on
//! interleaved pairs as GGUF stores q/k, grouped-query attention, RMSNorm, SiLU-gated MLP,
//! optionally tied embeddings), read from a GGUF file.
//!
//! Follows candle-transformers `models/quantized_llama.rs` (tensor names `blk.N.attn_q` …,
//! `Config` with HF field names) but owns the forward so that one step can:
//! - mix rows of different lengths: prefill chunks and one-token decode rows, each appending to
//!   its own [`KvCache`] that the caller holds as a value (drop it and prefill again to recompute);
//! - return each row's last-position logits and, for the layers in a [`LayerSet`], the residual
//!   stream of its newest token (layer `L` = after block `L`, before the final norm = HF
//!   `hidden_states[L + 1]`), keeping a running sum over prompt tokens for the prompt mean;
//! - give bit-identical results for a row whatever shares its batch, and whether its tokens came
//!   as one prefill or as a prefill plus decode steps. Everything is computed per token: the
//!   matmuls row-independently ([`QLinear`]), attention by hand over plain f32 slices per
//!   (token, head) over exactly keys `0..=pos` in a fixed order.
//!
//! References: Touvron et al. 2023 (Llama 2), Ainslie et al. 2023 (GQA), Su et al. 2021 (RoPE).

use rayon::prelude::*;

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::layers::LayerSet;
use crate::linear::{QLinear, block_format};

/// Hyper-parameters, named as in HF `LlamaConfig`, read from `llama.*` GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
}

impl Config {
    /// Reads the `llama.*` keys. `head_count_kv` and `rope.freq_base` are optional in the GGUF
    /// spec (defaults: `head_count`, 10000); the others are required.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.architecture()?;
        if arch != "llama" {
            return Err(LlmError::Architecture {
                path: gguf.path().to_path_buf(),
                found: arch.to_string(),
            });
        }
        let hidden_size = gguf.count("llama.embedding_length")?;
        let num_attention_heads = gguf.count("llama.attention.head_count")?;
        let num_key_value_heads = if gguf.has("llama.attention.head_count_kv") {
            gguf.count("llama.attention.head_count_kv")?
        } else {
            num_attention_heads
        };
        let bad = |key: &str, reason: String| LlmError::BadKey {
            path: gguf.path().to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if !hidden_size.is_multiple_of(num_attention_heads) {
            return Err(bad(
                "llama.attention.head_count",
                format!("{num_attention_heads} heads do not divide {hidden_size}"),
            ));
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(bad(
                "llama.attention.head_count_kv",
                format!("{num_key_value_heads} kv heads do not divide {num_attention_heads}"),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;
        if head_dim % 2 != 0 {
            return Err(bad(
                "llama.embedding_length",
                format!("odd head dim {head_dim}"),
            ));
        }
        if gguf.has("llama.rope.dimension_count") {
            let rope = gguf.count("llama.rope.dimension_count")?;
            if rope != head_dim {
                return Err(bad(
                    "llama.rope.dimension_count",
                    format!("partial RoPE ({rope} of {head_dim}) is not supported"),
                ));
            }
        }
        let rope_theta = if gguf.has("llama.rope.freq_base") {
            gguf.float("llama.rope.freq_base")?
        } else {
            10_000.0
        };
        let vocab_size = gguf.tensor_info("token_embd.weight")?.shape.dims()[0];
        Ok(Self {
            hidden_size,
            intermediate_size: gguf.count("llama.feed_forward_length")?,
            num_hidden_layers: gguf.count("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: gguf.float("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta,
            max_position_embeddings: gguf.count("llama.context_length")?,
            vocab_size,
        })
    }

    fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
}

/// One decoder block.
#[derive(Debug)]
struct Block {
    attn_norm: Vec<f32>,
    attn_q: QLinear,
    attn_k: QLinear,
    attn_v: QLinear,
    attn_output: QLinear,
    ffn_norm: Vec<f32>,
    ffn_gate: QLinear,
    ffn_up: QLinear,
    ffn_down: QLinear,
}

/// The model: weights only; all per-sequence state lives in [`KvCache`]s.
#[derive(Debug)]
pub struct Llama {
    cfg: Config,
    token_embd: QLinear,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `None`: tied to `token_embd`.
    output: Option<QLinear>,
}

fn matrix(gguf: &mut GgufFile, name: &str, out: usize, inp: usize) -> Result<QLinear> {
    let m = QLinear::load(gguf, name)?;
    if (m.out_features(), m.in_features()) != (out, inp) {
        return Err(gguf.bad_tensor(
            name,
            format!(
                "shape {}×{} where the config implies {out}×{inp}",
                m.out_features(),
                m.in_features()
            ),
        ));
    }
    Ok(m)
}

impl Llama {
    /// Reads the config and every weight from `gguf`.
    pub fn load(gguf: &mut GgufFile) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        let h = cfg.hidden_size;
        let token_embd = matrix(gguf, "token_embd.weight", cfg.vocab_size, h)?;
        let output = if gguf.has_tensor("output.weight") {
            Some(matrix(gguf, "output.weight", cfg.vocab_size, h)?)
        } else {
            None
        };
        let output_norm = QLinear::load_vector(gguf, "output_norm.weight", h)?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: QLinear::load_vector(gguf, &format!("{p}.attn_norm.weight"), h)?,
                attn_q: matrix(gguf, &format!("{p}.attn_q.weight"), cfg.q_dim(), h)?,
                attn_k: matrix(gguf, &format!("{p}.attn_k.weight"), cfg.kv_dim(), h)?,
                attn_v: matrix(gguf, &format!("{p}.attn_v.weight"), cfg.kv_dim(), h)?,
                attn_output: matrix(gguf, &format!("{p}.attn_output.weight"), h, cfg.q_dim())?,
                ffn_norm: QLinear::load_vector(gguf, &format!("{p}.ffn_norm.weight"), h)?,
                ffn_gate: matrix(
                    gguf,
                    &format!("{p}.ffn_gate.weight"),
                    cfg.intermediate_size,
                    h,
                )?,
                ffn_up: matrix(
                    gguf,
                    &format!("{p}.ffn_up.weight"),
                    cfg.intermediate_size,
                    h,
                )?,
                ffn_down: matrix(
                    gguf,
                    &format!("{p}.ffn_down.weight"),
                    h,
                    cfg.intermediate_size,
                )?,
            });
        }
        Ok(Self {
            cfg,
            token_embd,
            blocks,
            output_norm,
            output,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The distinct weight formats, e.g. `["q4_1", "q8_0"]`, sorted; a format trail-kernels
    /// runs that falls back to candle's kernels (rows not whole blocks) is `FORMAT@candle`.
    pub fn weight_formats(&self) -> Vec<String> {
        let mut all = vec![&self.token_embd];
        all.extend(self.output.iter());
        for b in &self.blocks {
            for m in [
                &b.attn_q,
                &b.attn_k,
                &b.attn_v,
                &b.attn_output,
                &b.ffn_gate,
                &b.ffn_up,
                &b.ffn_down,
            ] {
                all.push(m);
            }
        }
        let mut names: Vec<String> = all
            .into_iter()
            .map(|m| {
                let d = m.dtype();
                let name = format!("{d:?}").to_lowercase();
                if block_format(d).is_some() && !m.is_fast() {
                    format!("{name}@candle")
                } else {
                    name
                }
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The final RMSNorm applied to one hidden state (layer `n_layers − 1` normed is HF's last
    /// `hidden_states` entry and the LM head's input).
    pub fn final_norm(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        rms_norm(x, &self.output_norm, self.cfg.rms_norm_eps as f32, &mut out);
        out
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg)
    }

    /// Prefills `tokens` (all prompt tokens) into `cache`, which may already hold a prefix
    /// (chunked prefill). The output has one row.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        layers: LayerSet,
    ) -> Result<StepOutput> {
        self.step(&mut [Row::prefill(cache, tokens)], layers)
    }

    /// One decode step: `tokens[i]` is appended to `caches[i]`.
    pub fn decode(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
        layers: LayerSet,
    ) -> Result<StepOutput> {
        if caches.len() != tokens.len() {
            return Err(LlmError::Step(format!(
                "{} caches for {} tokens",
                caches.len(),
                tokens.len()
            )));
        }
        let mut rows: Vec<Row<'_>> = caches
            .iter_mut()
            .zip(tokens)
            .map(|(c, t)| Row::decode(c, t))
            .collect();
        self.step(&mut rows, layers)
    }

    /// One forward step over rows of any lengths (prefill chunks and decode tokens mixed).
    /// Each row appends its tokens to its cache; the output holds each row's logits at its
    /// last new position and, for `layers`, the hidden state of that position. Nothing is
    /// changed when an error is returned.
    pub fn step(&self, rows: &mut [Row<'_>], layers: LayerSet) -> Result<StepOutput> {
        // The whole step runs on one of rayon's threads: its ~4 parallel regions per layer then
        // fork and join between the pool's own threads, which spin briefly between regions,
        // instead of parking the calling thread on a lock and waking it for every region.
        // Which thread runs what never changes a bit (every split is fixed in advance).
        if rayon::current_thread_index().is_some() {
            self.forward(rows, layers)
        } else {
            rayon::scope(|_| self.forward(rows, layers))
        }
    }

    fn forward(&self, rows: &mut [Row<'_>], layers: LayerSet) -> Result<StepOutput> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim, ffn) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        if layers.end() > cfg.num_hidden_layers {
            return Err(LlmError::Step(format!(
                "layer {} asked of a {}-layer model",
                layers.end() - 1,
                cfg.num_hidden_layers
            )));
        }
        // Validate everything before touching any cache.
        for row in rows.iter() {
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
            if row.cache.layers.len() != cfg.num_hidden_layers
                || row.cache.kv_dim != kv_dim
                || row.cache.hidden != h
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

        // Token table: (row, position) of every new token, rows in order.
        let mut tok_row = Vec::new();
        let mut tok_pos = Vec::new();
        let mut row_start = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            row_start.push(tok_row.len());
            for i in 0..row.tokens.len() {
                tok_row.push(r);
                tok_pos.push(row.cache.len + i);
            }
        }
        let n = tok_row.len();
        let n_rows = rows.len();
        let n_layers_out = layers.len();

        let mut x = vec![0f32; n * h];
        for (t, xt) in x.chunks_exact_mut(h).enumerate() {
            let row = &rows[tok_row[t]];
            let id = row.tokens[tok_pos[t] - row.cache.len];
            self.token_embd.row(id as usize, xt);
        }
        let (cos, sin) = rope_table(&tok_pos, hd, cfg.rope_theta);
        for row in rows.iter_mut() {
            row.cache.reserve(row.tokens.len());
            if row.prompt_tokens > 0 && !layers.is_empty() && row.cache.prompt.is_none() {
                row.cache.prompt = Some(PromptSum {
                    layers,
                    tokens: 0,
                    sum: vec![0f64; n_layers_out * h],
                });
            }
        }

        let mut xn = vec![0f32; n * h];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut att = vec![0f32; n * q_dim];
        let mut o = vec![0f32; n * h];
        let mut gate = vec![0f32; n * ffn];
        let mut up = vec![0f32; n * ffn];
        let mut hidden = vec![0f32; n_rows * n_layers_out * h];
        let eps = cfg.rms_norm_eps as f32;

        for (l, b) in self.blocks.iter().enumerate() {
            rms_norm(&x, &b.attn_norm, eps, &mut xn);
            QLinear::forward_group(
                &xn,
                n,
                &mut [
                    (&b.attn_q, &mut q),
                    (&b.attn_k, &mut k),
                    (&b.attn_v, &mut v),
                ],
            );
            rope(&mut q, hd, &cos, &sin);
            rope(&mut k, hd, &cos, &sin);
            for (r, row) in rows.iter_mut().enumerate() {
                let s = row_start[r];
                let e = s + row.tokens.len();
                let kv = &mut row.cache.layers[l];
                kv.k.extend_from_slice(&k[s * kv_dim..e * kv_dim]);
                kv.v.extend_from_slice(&v[s * kv_dim..e * kv_dim]);
            }
            {
                let caches: Vec<&LayerKv> = rows.iter().map(|r| &r.cache.layers[l]).collect();
                let n_kv_heads = cfg.num_key_value_heads;
                let group = cfg.num_attention_heads / n_kv_heads;
                // A work item is one token's query heads of one KV head (each key and value
                // read once for the group), or a single head when there are too few groups to
                // keep every thread busy (batch-1 decode: 3 groups on 2 threads).
                let heads = if n * n_kv_heads < 4 * rayon::current_num_threads() {
                    1
                } else {
                    group
                };
                let item_dim = heads * hd;
                let per_token = cfg.num_attention_heads / heads;
                let attend_one = |(i, out): (usize, &mut [f32])| {
                    let (t, j) = (i / per_token, i % per_token);
                    attend_group(
                        &q[t * q_dim + j * item_dim..t * q_dim + (j + 1) * item_dim],
                        hd,
                        caches[tok_row[t]],
                        tok_pos[t],
                        j * heads / group * hd,
                        kv_dim,
                        out,
                    )
                };
                // Each head is computed alone in a fixed order (the grouped path has the
                // single-head path's bits), so neither the split nor the threads change a bit.
                let work: usize = tok_pos.iter().map(|p| p + 1).sum();
                if work * q_dim > 1 << 15 {
                    att.par_chunks_mut(item_dim)
                        .enumerate()
                        .for_each(attend_one);
                } else {
                    att.chunks_mut(item_dim).enumerate().for_each(attend_one);
                }
            }
            b.attn_output.forward(&att, n, &mut o);
            add(&mut x, &o);
            rms_norm(&x, &b.ffn_norm, eps, &mut xn);
            QLinear::forward_group(
                &xn,
                n,
                &mut [(&b.ffn_gate, &mut gate), (&b.ffn_up, &mut up)],
            );
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = silu(*g) * u;
            }
            b.ffn_down.forward(&gate, n, &mut o);
            add(&mut x, &o);

            if let Some(slot) = layers.rank(l) {
                for (r, row) in rows.iter_mut().enumerate() {
                    let s = row_start[r];
                    let last = s + row.tokens.len() - 1;
                    let dst = (r * n_layers_out + slot) * h;
                    hidden[dst..dst + h].copy_from_slice(&x[last * h..(last + 1) * h]);
                    if row.prompt_tokens > 0 {
                        let p = row.cache.prompt.as_mut().expect("made above");
                        let sum = &mut p.sum[slot * h..(slot + 1) * h];
                        for t in s..s + row.prompt_tokens {
                            for (acc, &xv) in sum.iter_mut().zip(&x[t * h..(t + 1) * h]) {
                                *acc += xv as f64;
                            }
                        }
                    }
                }
            }
        }

        // Final norm and LM head on each row's last token only.
        let mut last = vec![0f32; n_rows * h];
        for (r, row) in rows.iter().enumerate() {
            let t = row_start[r] + row.tokens.len() - 1;
            last[r * h..(r + 1) * h].copy_from_slice(&x[t * h..(t + 1) * h]);
        }
        let mut last_n = vec![0f32; n_rows * h];
        rms_norm(&last, &self.output_norm, eps, &mut last_n);
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        let mut logits = vec![0f32; n_rows * cfg.vocab_size];
        head.forward(&last_n, n_rows, &mut logits);

        for row in rows.iter_mut() {
            row.cache.len += row.tokens.len();
            if row.prompt_tokens > 0
                && let Some(p) = row.cache.prompt.as_mut()
            {
                p.tokens += row.prompt_tokens;
            }
        }
        Ok(StepOutput {
            rows: n_rows,
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            layers,
            logits,
            hidden,
        })
    }
}

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

#[derive(Clone, Debug, Default, PartialEq)]
struct LayerKv {
    /// `len × kv_heads × head_dim`, RoPE applied.
    k: Vec<f32>,
    v: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
struct PromptSum {
    layers: LayerSet,
    tokens: usize,
    /// `layers.len() × hidden`, summed in token order.
    sum: Vec<f64>,
}

/// One sequence's key/value cache, a plain value: clone it, drop it, or rebuild it by
/// prefilling the same tokens again (bit-identical). Also keeps the running sum of the
/// captured layers over the prompt tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    len: usize,
    kv_dim: usize,
    hidden: usize,
    layers: Vec<LayerKv>,
    prompt: Option<PromptSum>,
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

    fn reserve(&mut self, tokens: usize) {
        for l in &mut self.layers {
            l.k.reserve(tokens * self.kv_dim);
            l.v.reserve(tokens * self.kv_dim);
        }
    }
}

/// cos/sin per token and frequency pair, in f64 then rounded: `n × head_dim/2` each.
fn rope_table(pos: &[usize], hd: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(pos.len() * half);
    let mut sin = Vec::with_capacity(pos.len() * half);
    for &p in pos {
        for i in 0..half {
            let freq = theta.powf(-((2 * i) as f64) / hd as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotates interleaved pairs `(2i, 2i+1)` of every head of every token (GGUF llama layout).
fn rope(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    let n = cos.len() / half;
    let width = x.len() / n;
    for (t, xt) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in xt.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c[i] - b * s[i];
                head[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

/// Causal attention of the query heads that share one KV head (`q` holds them one after the
/// other, `hd` wide) over positions `0..=pos` of one sequence's cache; that KV head's keys and
/// values start at `kv_off` within each cached row of width `kv_dim`. Per head a fixed order:
/// scores, max, exp, sum, weighted values, one division. Head size 64 (SmolLM2 and most Llamas)
/// takes a path that reads each key and value once for the whole group, with the same
/// operations in the same order per score and per output, so its bits equal the generic path's.
fn attend_group(
    q: &[f32],
    hd: usize,
    kv: &LayerKv,
    pos: usize,
    kv_off: usize,
    kv_dim: usize,
    out: &mut [f32],
) {
    let (len, group) = (pos + 1, q.len() / hd);
    SCORES.with_borrow_mut(|scores| {
        scores.clear();
        scores.resize(group * len, 0.0);
        if hd == 64 && group <= MAX_GROUP {
            attend_group_fixed(q, kv, kv_off, kv_dim, scores, out);
        } else {
            for ((qh, oh), sh) in q
                .chunks_exact(hd)
                .zip(out.chunks_exact_mut(hd))
                .zip(scores.chunks_exact_mut(len))
            {
                attend_any(qh, kv, kv_off, kv_dim, sh, oh);
            }
        }
    })
}

/// The largest GQA group the head-size-64 path takes (query heads per KV head).
const MAX_GROUP: usize = 16;

/// `max_j s_j` after filling `scores[j] = dot(q, k_j) · scale`.
fn scores_any(q: &[f32], kv: &LayerKv, kv_off: usize, kv_dim: usize, scores: &mut [f32]) -> f32 {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let kj = &kv.k[j * kv_dim + kv_off..j * kv_dim + kv_off + hd];
        *s = dot(q, kj) * scale;
        max = max.max(*s);
    }
    max
}

/// Replaces every score by `exp(s − max)` and returns their sum, in index order.
fn softmax_numerators(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

fn attend_any(
    q: &[f32],
    kv: &LayerKv,
    kv_off: usize,
    kv_dim: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let max = scores_any(q, kv, kv_off, kv_dim, scores);
    let sum = softmax_numerators(scores, max);
    out.fill(0.0);
    for (j, &w) in scores.iter().enumerate() {
        let vj = &kv.v[j * kv_dim + kv_off..j * kv_dim + kv_off + hd];
        for (o, &vv) in out.iter_mut().zip(vj) {
            *o += w * vv;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// [`attend_any`] for every head of a GQA group at head size 64: four keys' dot products
/// advance together for each head ([`dots4`]), and each value row, read once, is added into
/// every head's local accumulator.
fn attend_group_fixed<'a>(
    q: &[f32],
    kv: &'a LayerKv,
    kv_off: usize,
    kv_dim: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let group = q.len() / 64;
    let len = scores.len() / group;
    let scale = 1.0 / (64f32).sqrt();
    let row = |x: &'a [f32], j: usize| -> &'a [f32; 64] {
        // A 64-float slice always converts.
        x[j * kv_dim + kv_off..j * kv_dim + kv_off + 64]
            .try_into()
            .expect("64 wide")
    };
    let qs: Vec<&[f32; 64]> = q
        .chunks_exact(64)
        .map(|c| c.try_into().expect("64 wide"))
        .collect();
    let mut max = [f32::NEG_INFINITY; MAX_GROUP];
    let full = len / 4 * 4;
    for j0 in (0..full).step_by(4) {
        let ks = [
            row(&kv.k, j0),
            row(&kv.k, j0 + 1),
            row(&kv.k, j0 + 2),
            row(&kv.k, j0 + 3),
        ];
        for (h, qh) in qs.iter().enumerate() {
            for (b, d) in dots4(qh, ks).into_iter().enumerate() {
                let s = d * scale;
                scores[h * len + j0 + b] = s;
                max[h] = max[h].max(s);
            }
        }
    }
    for j in full..len {
        for (h, qh) in qs.iter().enumerate() {
            let s = dot(*qh, row(&kv.k, j)) * scale;
            scores[h * len + j] = s;
            max[h] = max[h].max(s);
        }
    }
    let mut sum = [0f32; MAX_GROUP];
    for (h, sh) in scores.chunks_exact_mut(len).enumerate() {
        sum[h] = softmax_numerators(sh, max[h]);
    }
    let mut acc = [[0f32; 64]; MAX_GROUP];
    for j in 0..len {
        let vj = row(&kv.v, j);
        for (h, a) in acc[..group].iter_mut().enumerate() {
            let w = scores[h * len + j];
            for (o, &vv) in a.iter_mut().zip(vj) {
                *o += w * vv;
            }
        }
    }
    for (h, oh) in out.chunks_exact_mut(64).enumerate() {
        let inv = 1.0 / sum[h];
        for (o, a) in oh.iter_mut().zip(acc[h]) {
            *o = a * inv;
        }
    }
}

/// [`dot`] of `q` with four keys at once: per key the same eight lanes (a multiply, then an
/// add: no fused multiply-add) and the same reduction, so every result has [`dot`]'s bits.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
fn dots4(q: &[f32; 64], ks: [&[f32; 64]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // SAFETY: AVX is enabled at compile time (cfg above); every load reads 8 floats inside a
    // 64-float array.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in 0..8 {
            let qc = _mm256_loadu_ps(q.as_ptr().add(c * 8));
            for (a, k) in acc.iter_mut().zip(&ks) {
                let kc = _mm256_loadu_ps(k.as_ptr().add(c * 8));
                *a = _mm256_add_ps(*a, _mm256_mul_ps(qc, kc));
            }
        }
        acc.map(|a| {
            // [a0+a4, a1+a5, a2+a6, a3+a7], then (v0+v1) + (v2+v3).
            let v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let h = _mm_hadd_ps(v, v);
            _mm_cvtss_f32(_mm_hadd_ps(h, h))
        })
    }
}

/// Portable [`dots4`].
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
fn dots4(q: &[f32; 64], ks: [&[f32; 64]; 4]) -> [f32; 4] {
    ks.map(|k| dot(q, k))
}

thread_local! {
    /// Attention scores of the head being computed on this thread (reused across calls).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Dot product with eight fixed lanes (vectorizes; the order never depends on the caller).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// RMSNorm of every row of `x` (width `w.len()`) into `out`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = dot(xr, xr) / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SplitMix64;

    /// The head-size-64 attention path is the generic one, reorganized: equal bits for every
    /// context length (including the tails that are not a multiple of four keys), GQA group
    /// sizes and offsets, and scores spanning many orders of magnitude.
    #[test]
    fn grouped_attention_equals_generic_bits() {
        let mut rng = SplitMix64(7);
        let (kv_dim, hd) = (192, 64);
        for len in [1usize, 2, 3, 4, 5, 7, 8, 33, 130] {
            let mut draw = |n: usize, scale: f32| -> Vec<f32> {
                (0..n)
                    .map(|_| (rng.uniform() as f32 - 0.5) * scale)
                    .collect()
            };
            let kv = LayerKv {
                k: draw(len * kv_dim, 6.0),
                v: draw(len * kv_dim, 2.0),
            };
            for group in [1usize, 3, 4] {
                let q = draw(group * hd, 4.0);
                for kv_off in [0, 64, 128] {
                    let mut generic = vec![0f32; group * hd];
                    for (qh, oh) in q.chunks_exact(hd).zip(generic.chunks_exact_mut(hd)) {
                        let mut s = vec![0f32; len];
                        attend_any(qh, &kv, kv_off, kv_dim, &mut s, oh);
                    }
                    let mut grouped = vec![0f32; group * hd];
                    attend_group(&q, hd, &kv, len - 1, kv_off, kv_dim, &mut grouped);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&generic),
                        bits(&grouped),
                        "len {len}, group {group}, offset {kv_off}"
                    );
                }
            }
        }
    }
}
