//! [`KvCache`]: one sequence's keys and values per layer, a plain value the caller holds, and the
//! running sum of the captured layers over its prompt tokens (for the prompt mean).
//!
//! [`KvFormat`] names how keys and values are stored: IEEE half precision (the default, rounded
//! to nearest even once, as each token is appended, and read back exactly), or f32 as computed
//! (the kernels before issue 23, kept so that labels made with them can be reproduced).

use std::fmt;
use std::str::FromStr;

use half::f16;

use crate::config::Config;
use crate::layers::LayerSet;

/// How a [`KvCache`] stores keys and values, and so which attention reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// Half precision, attention in one pass over the keys (online softmax). Half the bytes of
    /// [`KvFormat::F32`] read per step.
    #[default]
    F16,
    /// f32, attention in two passes (scores, then values): the numerics before issue 23.
    F32,
}

impl KvFormat {
    /// Short name, as in `--kv-cache`.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F16 => "f16",
            KvFormat::F32 => "f32",
        }
    }

    /// The attention kernel's part of [`crate::Runner::kernel_id`] (`F32` keeps the id it had
    /// before the f16 cache existed, so labels made with it stay current under it).
    pub fn attention_id(self) -> &'static str {
        match self {
            KvFormat::F16 => "attn-f16kv-online-lanes8",
            KvFormat::F32 => "attn-f32-lanes8",
        }
    }

    /// Bytes per stored key or value element.
    pub fn elem_bytes(self) -> usize {
        match self {
            KvFormat::F16 => 2,
            KvFormat::F32 => 4,
        }
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" => Ok(KvFormat::F16),
            "f32" => Ok(KvFormat::F32),
            other => Err(format!("unknown KV cache format {other:?} (f16 or f32)")),
        }
    }
}

/// One layer's keys and values, `len × kv_heads × head_dim` each, RoPE applied to the keys.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LayerKv<T> {
    pub(crate) k: Vec<T>,
    pub(crate) v: Vec<T>,
}

impl<T> Default for LayerKv<T> {
    fn default() -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
        }
    }
}

/// Every layer's keys and values, in one format.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KvLayers {
    F16(Vec<LayerKv<f16>>),
    F32(Vec<LayerKv<f32>>),
}

/// One layer of a cache, borrowed for attention.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LayerView<'a> {
    F16(&'a LayerKv<f16>),
    F32(&'a LayerKv<f32>),
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
    pub(crate) layers: KvLayers,
    pub(crate) prompt: Option<PromptSum>,
}

impl KvCache {
    pub fn new(cfg: &Config, format: KvFormat) -> Self {
        let n = cfg.num_hidden_layers;
        Self {
            len: 0,
            kv_dim: cfg.kv_dim(),
            hidden: cfg.hidden_size,
            layers: match format {
                KvFormat::F16 => KvLayers::F16(vec![LayerKv::default(); n]),
                KvFormat::F32 => KvLayers::F32(vec![LayerKv::default(); n]),
            },
            prompt: None,
        }
    }

    /// How keys and values are stored.
    pub fn format(&self) -> KvFormat {
        match self.layers {
            KvLayers::F16(_) => KvFormat::F16,
            KvLayers::F32(_) => KvFormat::F32,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layers held.
    pub fn n_layers(&self) -> usize {
        match &self.layers {
            KvLayers::F16(l) => l.len(),
            KvLayers::F32(l) => l.len(),
        }
    }

    /// Forgets every token (recompute preemption), keeping the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
        match &mut self.layers {
            KvLayers::F16(ls) => ls.iter_mut().for_each(|l| {
                l.k.clear();
                l.v.clear();
            }),
            KvLayers::F32(ls) => ls.iter_mut().for_each(|l| {
                l.k.clear();
                l.v.clear();
            }),
        }
        self.prompt = None;
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        2 * self.len * self.kv_dim * self.n_layers() * self.format().elem_bytes()
    }

    /// Keys of `layer` as f32 (exact): `len × kv_heads × head_dim`, RoPE applied.
    pub fn keys(&self, layer: usize) -> Vec<f32> {
        match &self.layers {
            KvLayers::F16(ls) => ls[layer].k.iter().map(|x| x.to_f32()).collect(),
            KvLayers::F32(ls) => ls[layer].k.clone(),
        }
    }

    /// Values of `layer` as f32 (exact): `len × kv_heads × head_dim`.
    pub fn values(&self, layer: usize) -> Vec<f32> {
        match &self.layers {
            KvLayers::F16(ls) => ls[layer].v.iter().map(|x| x.to_f32()).collect(),
            KvLayers::F32(ls) => ls[layer].v.clone(),
        }
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

    /// Makes room for `tokens` more keys and values in every layer, growing each to a whole
    /// number of [`GROW_TOKENS`] blocks (not by doubling: a long sequence then holds at most a
    /// block of spare room per layer, not up to its own size again).
    pub(crate) fn reserve(&mut self, tokens: usize) {
        let (len, kv_dim) = (self.len, self.kv_dim);
        let target = (len + tokens).next_multiple_of(GROW_TOKENS) * kv_dim;
        match &mut self.layers {
            KvLayers::F16(ls) => ls.iter_mut().for_each(|l| {
                grow(&mut l.k, target);
                grow(&mut l.v, target);
            }),
            KvLayers::F32(ls) => ls.iter_mut().for_each(|l| {
                grow(&mut l.k, target);
                grow(&mut l.v, target);
            }),
        }
    }

    /// Appends keys `k` and values `v` (whole tokens, `kv_dim` each) to `layer`, rounded to the
    /// cache's format ([`to_f16`]).
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        match &mut self.layers {
            KvLayers::F16(ls) => {
                let l = &mut ls[layer];
                l.k.extend(k.iter().map(|&x| to_f16(x)));
                l.v.extend(v.iter().map(|&x| to_f16(x)));
            }
            KvLayers::F32(ls) => {
                ls[layer].k.extend_from_slice(k);
                ls[layer].v.extend_from_slice(v);
            }
        }
    }

    /// Layer `layer`, borrowed for attention.
    pub(crate) fn view(&self, layer: usize) -> LayerView<'_> {
        match &self.layers {
            KvLayers::F16(ls) => LayerView::F16(&ls[layer]),
            KvLayers::F32(ls) => LayerView::F32(&ls[layer]),
        }
    }
}

/// Tokens a cache's layers grow by at once.
pub(crate) const GROW_TOKENS: usize = 64;

/// Makes `v`'s capacity at least `target`, exactly `target` when it grows.
fn grow<T>(v: &mut Vec<T>, target: usize) {
    if v.capacity() < target {
        v.reserve_exact(target - v.len());
    }
}

/// `x` rounded to the nearest half (ties to even, overflow to infinity): IEEE 754's default,
/// the same bits whichever instructions `half` picks at run time (F16C or its software path;
/// a unit test checks them against the software conversion).
#[inline]
pub(crate) fn to_f16(x: f32) -> f16 {
    f16::from_f32(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SplitMix64;

    /// The run-time conversion (F16C where the CPU has it) rounds as the software one: to
    /// nearest, ties to even, on random values of every magnitude, halfway cases, subnormals
    /// and overflow.
    #[test]
    fn f16_rounding_is_the_software_round_to_nearest_even() {
        let mut rng = SplitMix64(23);
        let mut xs: Vec<f32> = (0..200_000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .filter(|x| !x.is_nan())
            .collect();
        // Exactly halfway between two halves (1 + 2⁻¹¹ lies between 1 and 1 + 2⁻¹⁰), in the
        // subnormal range, and at the overflow threshold.
        xs.extend([
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            2f32.powi(-25),
            3.0 * 2f32.powi(-25),
            65_504.0,
            65_519.99,
            65_520.0,
            -65_520.0,
            0.0,
            -0.0,
        ]);
        for x in xs {
            assert_eq!(
                to_f16(x).to_bits(),
                f16::from_f32_const(x).to_bits(),
                "{x:e}"
            );
            assert_eq!(to_f16(x).to_f32(), f16::from_f32_const(x).to_f32_const());
        }
        assert_eq!(to_f16(1.0 + 2f32.powi(-11)).to_f32(), 1.0, "ties to even");
        assert_eq!(to_f16(65_520.0), f16::INFINITY);
    }

    #[test]
    fn a_cache_counts_its_bytes_in_its_format() {
        let cfg = Config {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            max_position_embeddings: 64,
            vocab_size: 300,
        };
        for (format, elem) in [(KvFormat::F16, 2), (KvFormat::F32, 4)] {
            let mut c = KvCache::new(&cfg, format);
            let kv = vec![0.5f32; 2 * cfg.kv_dim()];
            for l in 0..cfg.num_hidden_layers {
                c.append(l, &kv, &kv);
            }
            c.len = 2;
            assert_eq!(c.format(), format);
            assert_eq!(
                c.bytes(),
                2 * 2 * cfg.kv_dim() * cfg.num_hidden_layers * elem
            );
            assert_eq!(c.keys(0), kv);
            c.clear();
            assert!(c.is_empty() && c.keys(0).is_empty());
        }
    }
}
