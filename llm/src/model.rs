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
//!   matmuls row-independently ([`QLinear`]), attention by hand over the cached keys and values
//!   (f16 by default, f32 as before issue 23) per (token, head) over exactly keys `0..=pos` in a fixed order.
//!
//! The parts live beside this file: the cache ([`crate::cache`]), a step's rows, output and
//! their validation ([`crate::step`]), attention (`attention.rs`) and the per-token f32
//! operations (`ops.rs`). Every loop runs on the model's SIMD path ([`Llama::simd`],
//! chosen at run time), which changes speed, never a bit.
//!
//! References: Touvron et al. 2023 (Llama 2), Ainslie et al. 2023 (GQA), Su et al. 2021 (RoPE).

use trail_kernels::SimdPath;

use crate::attention::attend;
pub use crate::cache::{KvCache, KvFormat};
use crate::cache::{LayerView, PromptSum};
pub use crate::config::Config;
use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::layers::LayerSet;
use crate::linear::{QLinear, block_format};
use crate::ops::{add, rms_norm, rope, swiglu};
use crate::rope::RopeTable;
use crate::scratch::{Scratch, zeroed};
use crate::step::validate;
pub use crate::step::{Row, StepOutput};

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
    /// The SIMD path every matmul and loop of the forward runs on.
    simd: SimdPath,
    /// The format of the caches [`Llama::new_cache`] makes (and [`Llama::step`] accepts).
    kv: KvFormat,
    /// RoPE's cos/sin per position, filled as positions are first reached.
    rope: RopeTable,
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
    /// Reads the config and every weight from `gguf`; the SIMD path is
    /// [`SimdPath::from_env`] (`TRAIL_SIMD`, else the fastest this CPU supports).
    pub fn load(gguf: &mut GgufFile) -> Result<Self> {
        let simd = SimdPath::from_env().map_err(LlmError::Simd)?;
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
            rope: RopeTable::new(cfg.head_dim, cfg.rope_theta),
            cfg,
            token_embd,
            blocks,
            output_norm,
            output,
            simd,
            kv: KvFormat::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The SIMD path the forward runs on (the bits are the same on every path).
    pub fn simd(&self) -> SimdPath {
        self.simd
    }

    /// Runs the forward on `path` from now on; an error if this CPU does not support it.
    pub fn set_simd(&mut self, path: SimdPath) -> Result<()> {
        self.simd = path.supported().map_err(LlmError::Simd)?;
        Ok(())
    }

    /// The format of the KV caches this model makes and steps (and so its attention kernel).
    pub fn kv_format(&self) -> KvFormat {
        self.kv
    }

    /// Makes and steps caches of `format` from now on (caches made before are refused by
    /// [`Llama::step`]).
    pub fn set_kv_format(&mut self, format: KvFormat) {
        self.kv = format;
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
        let eps = self.cfg.rms_norm_eps as f32;
        rms_norm(self.simd, x, &self.output_norm, eps, &mut out);
        out
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg, self.kv)
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
        validate(&self.cfg, self.kv, rows, layers)?;
        let mut scratch = Scratch::take();
        let out = self.forward_with(rows, layers, &mut scratch);
        scratch.give_back();
        Ok(out)
    }

    /// The step's forward (rows validated) on `scratch`'s buffers.
    fn forward_with(&self, rows: &mut [Row<'_>], layers: LayerSet, s: &mut Scratch) -> StepOutput {
        let (cfg, simd) = (&self.cfg, self.simd);
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim, ffn) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let toks = TokenTable::new(rows);
        let n = toks.row.len();
        let x = self.embed(rows, &toks, &mut s.x);
        self.rope.gather(&toks.pos, &mut s.cos, &mut s.sin);
        let (cos, sin) = (&s.cos, &s.sin);
        for row in rows.iter_mut() {
            row.cache.reserve(row.tokens.len());
            if row.prompt_tokens > 0 && !layers.is_empty() && row.cache.prompt.is_none() {
                row.cache.prompt = Some(PromptSum {
                    layers,
                    tokens: 0,
                    sum: vec![0f64; layers.len() * h],
                });
            }
        }

        let xn = zeroed(&mut s.xn, n * h);
        let q = zeroed(&mut s.q, n * q_dim);
        let k = zeroed(&mut s.k, n * kv_dim);
        let v = zeroed(&mut s.v, n * kv_dim);
        let att = zeroed(&mut s.att, n * q_dim);
        let o = zeroed(&mut s.o, n * h);
        let gate = zeroed(&mut s.gate, n * ffn);
        let up = zeroed(&mut s.up, n * ffn);
        let mut hidden = vec![0f32; rows.len() * layers.len() * h];
        let eps = cfg.rms_norm_eps as f32;

        for (l, b) in self.blocks.iter().enumerate() {
            rms_norm(simd, x, &b.attn_norm, eps, xn);
            QLinear::forward_group_on(
                simd,
                xn,
                n,
                &mut [
                    (&b.attn_q, &mut *q),
                    (&b.attn_k, &mut *k),
                    (&b.attn_v, &mut *v),
                ],
            );
            rope(simd, q, hd, cos, sin);
            rope(simd, k, hd, cos, sin);
            for (r, row) in rows.iter_mut().enumerate() {
                let (a, e) = (toks.row_start[r], toks.row_start[r] + row.tokens.len());
                let (ks, vs) = (&k[a * kv_dim..e * kv_dim], &v[a * kv_dim..e * kv_dim]);
                row.cache.append(l, ks, vs);
            }
            let caches: Vec<LayerView<'_>> = rows.iter().map(|r| r.cache.view(l)).collect();
            attend(simd, cfg, q, &caches, &toks.row, &toks.pos, att);
            b.attn_output.forward_on(simd, att, n, o);
            add(simd, x, o);
            rms_norm(simd, x, &b.ffn_norm, eps, xn);
            QLinear::forward_group_on(
                simd,
                xn,
                n,
                &mut [(&b.ffn_gate, &mut *gate), (&b.ffn_up, &mut *up)],
            );
            swiglu(simd, gate, up);
            b.ffn_down.forward_on(simd, gate, n, o);
            add(simd, x, o);
            if let Some(slot) = layers.rank(l) {
                capture(rows, &toks, x, layers, slot, h, &mut hidden);
            }
        }
        let logits = self.head(rows, &toks, x);

        for row in rows.iter_mut() {
            row.cache.len += row.tokens.len();
            if row.prompt_tokens > 0
                && let Some(p) = row.cache.prompt.as_mut()
            {
                p.tokens += row.prompt_tokens;
            }
        }
        StepOutput {
            rows: rows.len(),
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            layers,
            logits,
            hidden,
        }
    }

    /// The embedding of every new token (`n × hidden`, in [`TokenTable`] order), in `buf`.
    fn embed<'b>(
        &self,
        rows: &[Row<'_>],
        toks: &TokenTable,
        buf: &'b mut Vec<f32>,
    ) -> &'b mut [f32] {
        let h = self.cfg.hidden_size;
        let x = zeroed(buf, toks.row.len() * h);
        for (t, xt) in x.chunks_exact_mut(h).enumerate() {
            let row = &rows[toks.row[t]];
            let id = row.tokens[toks.pos[t] - row.cache.len];
            self.token_embd.row(id as usize, xt);
        }
        x
    }

    /// Final norm and LM head on each row's last token only: `rows × vocab_size` logits.
    fn head(&self, rows: &[Row<'_>], toks: &TokenTable, x: &[f32]) -> Vec<f32> {
        let (h, n_rows) = (self.cfg.hidden_size, rows.len());
        let mut last = vec![0f32; n_rows * h];
        for (r, row) in rows.iter().enumerate() {
            let t = toks.row_start[r] + row.tokens.len() - 1;
            last[r * h..(r + 1) * h].copy_from_slice(&x[t * h..(t + 1) * h]);
        }
        let mut last_n = vec![0f32; n_rows * h];
        let eps = self.cfg.rms_norm_eps as f32;
        rms_norm(self.simd, &last, &self.output_norm, eps, &mut last_n);
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        let mut logits = vec![0f32; n_rows * self.cfg.vocab_size];
        head.forward_on(self.simd, &last_n, n_rows, &mut logits);
        logits
    }
}

/// (row, position) of every new token of a step, rows in order, and where each row's tokens
/// start.
struct TokenTable {
    row: Vec<usize>,
    pos: Vec<usize>,
    row_start: Vec<usize>,
}

impl TokenTable {
    fn new(rows: &[Row<'_>]) -> Self {
        let mut t = TokenTable {
            row: Vec::new(),
            pos: Vec::new(),
            row_start: Vec::with_capacity(rows.len()),
        };
        for (r, row) in rows.iter().enumerate() {
            t.row_start.push(t.row.len());
            for i in 0..row.tokens.len() {
                t.row.push(r);
                t.pos.push(row.cache.len + i);
            }
        }
        t
    }
}

/// Keeps layer slot `slot` of `x` (`n × h`, after that layer): each row's newest token into
/// `hidden` (`rows × layers.len() × h`), and its prompt tokens added to the row's prompt sum.
fn capture(
    rows: &mut [Row<'_>],
    toks: &TokenTable,
    x: &[f32],
    layers: LayerSet,
    slot: usize,
    h: usize,
    hidden: &mut [f32],
) {
    for (r, row) in rows.iter_mut().enumerate() {
        let s = toks.row_start[r];
        let last = s + row.tokens.len() - 1;
        let dst = (r * layers.len() + slot) * h;
        hidden[dst..dst + h].copy_from_slice(&x[last * h..(last + 1) * h]);
        if row.prompt_tokens > 0 {
            let p = row.cache.prompt.as_mut().expect("made by forward");
            let sum = &mut p.sum[slot * h..(slot + 1) * h];
            for t in s..s + row.prompt_tokens {
                for (acc, &xv) in sum.iter_mut().zip(&x[t * h..(t + 1) * h]) {
                    *acc += xv as f64;
                }
            }
        }
    }
}
