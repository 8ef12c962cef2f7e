//! Causal grouped-query attention over each sequence's cached keys and values, computed by hand
//! over plain slices (f16 or f32 storage, f32 arithmetic) per (token, head) over exactly keys `0..=pos` in a fixed order, so a
//! row's result never depends on what shares its step or on how the work is split.
//!
//! [`attend`] spreads (token, KV-head group) items over rayon's threads; each item runs
//! [`attend_group`], whose loops are compiled once per SIMD path
//! ([`trail_kernels::simd_dispatch!`]) with the same operations in the same order, so every path
//! gives the same bits.
//!
//! This file holds the two-pass kernel over an f32 cache ([`crate::KvFormat::F32`], the numerics
//! before issue 23); [`online`] holds the one-pass kernel over an f16 cache (the default).
//!
//! References: Vaswani et al. 2017 (scaled dot-product attention), Ainslie et al. 2023 (GQA).

mod online;

use rayon::prelude::*;
use trail_kernels::simd::Isa;
use trail_kernels::{SimdPath, simd_dispatch};

use crate::cache::{LayerKv, LayerView};
use crate::config::Config;
use crate::ops::dot;

/// The attention output `att` (`n × q_dim`) of the `n` new tokens of one step for one layer:
/// token `t` (row `tok_row[t]`, position `tok_pos[t]`) attends with its query heads `q`
/// (`n × q_dim`, RoPE applied) over keys and values `0..=tok_pos[t]` of `caches[tok_row[t]]`,
/// with the kernel of that cache's format.
pub(crate) fn attend(
    path: SimdPath,
    cfg: &Config,
    q: &[f32],
    caches: &[LayerView<'_>],
    tok_row: &[usize],
    tok_pos: &[usize],
    att: &mut [f32],
) {
    let n = tok_row.len();
    let (hd, q_dim, kv_dim) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
    let n_kv_heads = cfg.num_key_value_heads;
    let group = cfg.num_attention_heads / n_kv_heads;
    // A work item is one token's query heads of one KV head (each key and value read once for
    // the group), or a single head when there are too few groups to keep every thread busy
    // (batch-1 decode: 3 groups on 2 threads).
    let heads = if n * n_kv_heads < 4 * rayon::current_num_threads() {
        1
    } else {
        group
    };
    let item_dim = heads * hd;
    let per_token = cfg.num_attention_heads / heads;
    let attend_one = |(i, out): (usize, &mut [f32])| {
        let (t, j) = (i / per_token, i % per_token);
        let (len, off) = (tok_pos[t] + 1, j * heads / group * hd);
        let q = &q[t * q_dim + j * item_dim..t * q_dim + (j + 1) * item_dim];
        match caches[tok_row[t]] {
            LayerView::F32(kv) => {
                let head = KvHead::new(kv, len, off, kv_dim);
                attend_group(path, q, hd, head, out)
            }
            LayerView::F16(kv) => {
                let head = KvHead::new(kv, len, off, kv_dim);
                online::attend_group(path, q, hd, head, out)
            }
        }
    };
    // Each head is computed alone in a fixed order (the grouped path has the single-head path's
    // bits), so neither the split nor the threads change a bit.
    let work: usize = tok_pos.iter().map(|p| p + 1).sum();
    if work * q_dim > 1 << 15 {
        att.par_chunks_mut(item_dim)
            .enumerate()
            .for_each(attend_one);
    } else {
        att.chunks_mut(item_dim).enumerate().for_each(attend_one);
    }
}

/// One KV head of one sequence's cache for one layer: keys and values of positions `0..len`,
/// starting at `off` within each cached row of `width` floats.
pub(crate) struct KvHead<'a, T = f32> {
    pub(crate) kv: &'a LayerKv<T>,
    pub(crate) len: usize,
    pub(crate) off: usize,
    pub(crate) width: usize,
}

impl<T> Clone for KvHead<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for KvHead<'_, T> {}

impl<'a, T> KvHead<'a, T> {
    pub(crate) fn new(kv: &'a LayerKv<T>, len: usize, off: usize, width: usize) -> Self {
        Self {
            kv,
            len,
            off,
            width,
        }
    }

    /// Key `j` (`hd` elements).
    #[inline(always)]
    fn key(&self, j: usize, hd: usize) -> &'a [T] {
        &self.kv.k[j * self.width + self.off..j * self.width + self.off + hd]
    }

    /// Value `j` (`hd` elements).
    #[inline(always)]
    fn value(&self, j: usize, hd: usize) -> &'a [T] {
        &self.kv.v[j * self.width + self.off..j * self.width + self.off + hd]
    }
}

/// Causal attention of the query heads that share one KV head (`q` holds them one after the
/// other, `hd` wide) over `head`'s positions, on SIMD `path`. Per head a fixed order: scores,
/// max, exp, sum, weighted values, one division. Head size 64 (SmolLM2 and most Llamas) takes a
/// path that reads each key and value once for the whole group, with the same operations in
/// the same order per score and per output, so its bits equal the generic path's.
pub(crate) fn attend_group(
    path: SimdPath,
    q: &[f32],
    hd: usize,
    head: KvHead<'_, f32>,
    out: &mut [f32],
) {
    SCORES.with_borrow_mut(|scores| attend_group_with(path, q, hd, head, scores, out))
}

simd_dispatch! {
    /// [`attend_group`] with `scores` as scratch space, compiled once per SIMD path.
    fn attend_group_with(
        q: &[f32],
        hd: usize,
        head: KvHead<'_, f32>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) = attend_group_body;
}

#[inline(always)]
fn attend_group_body(
    isa: Isa,
    q: &[f32],
    hd: usize,
    head: KvHead<'_, f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (len, group) = (head.len, q.len() / hd);
    scores.clear();
    scores.resize(group * len, 0.0);
    if hd == 64 && group <= MAX_GROUP {
        attend_group_fixed(isa, q, head, scores, out);
    } else {
        for ((qh, oh), sh) in q
            .chunks_exact(hd)
            .zip(out.chunks_exact_mut(hd))
            .zip(scores.chunks_exact_mut(len))
        {
            attend_any(qh, head, sh, oh);
        }
    }
}

/// The largest GQA group the head-size-64 path takes (query heads per KV head).
const MAX_GROUP: usize = 16;

thread_local! {
    /// Attention scores of the head being computed on this thread (reused across calls).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `max_j s_j` after filling `scores[j] = dot(q, k_j) · scale`.
#[inline(always)]
fn scores_any(q: &[f32], head: KvHead<'_>, scores: &mut [f32]) -> f32 {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot(q, head.key(j, hd)) * scale;
        max = max.max(*s);
    }
    max
}

/// Replaces every score by `exp(s − max)` and returns their sum, in index order.
#[inline(always)]
fn softmax_numerators(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// One head of any size: the reference order of operations.
#[inline(always)]
fn attend_any(q: &[f32], head: KvHead<'_>, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let max = scores_any(q, head, scores);
    let sum = softmax_numerators(scores, max);
    out.fill(0.0);
    for (j, &w) in scores.iter().enumerate() {
        for (o, &vv) in out.iter_mut().zip(head.value(j, hd)) {
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
#[inline(always)]
fn attend_group_fixed(isa: Isa, q: &[f32], head: KvHead<'_>, scores: &mut [f32], out: &mut [f32]) {
    let group = q.len() / 64;
    let len = scores.len() / group;
    let scale = 1.0 / (64f32).sqrt();
    let key = |j: usize| wide(head.key(j, 64));
    let qs: Vec<&[f32; 64]> = q
        .chunks_exact(64)
        .map(|c| c.try_into().expect("64 wide"))
        .collect();
    let mut max = [f32::NEG_INFINITY; MAX_GROUP];
    let full = len / 4 * 4;
    for j0 in (0..full).step_by(4) {
        let ks = [key(j0), key(j0 + 1), key(j0 + 2), key(j0 + 3)];
        for (h, qh) in qs.iter().enumerate() {
            for (b, d) in dots4(isa, qh, ks).into_iter().enumerate() {
                let s = d * scale;
                scores[h * len + j0 + b] = s;
                max[h] = max[h].max(s);
            }
        }
    }
    for j in full..len {
        for (h, qh) in qs.iter().enumerate() {
            let s = dot(*qh, key(j)) * scale;
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
        let vj = wide(head.value(j, 64));
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

/// A 64-float slice as an array (always converts).
#[inline(always)]
fn wide(x: &[f32]) -> &[f32; 64] {
    x.try_into().expect("64 wide")
}

/// [`dot`] of `q` with four keys at once: with AVX, per key the same eight lanes (a multiply,
/// then an add: no fused multiply-add) and the same reduction as [`dot`], sharing each load of
/// `q`, so every result has [`dot`]'s bits; without, four [`dot`]s.
#[inline(always)]
fn dots4(isa: Isa, q: &[f32; 64], ks: [&[f32; 64]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `isa` proves the CPU runs its path, and every x86 path but scalar has AVX.
        return unsafe { dots4_avx(q, ks) };
    }
    let _ = isa;
    ks.map(|k| dot(q, k))
}

/// [`dots4`] with AVX intrinsics (inlined into the copies compiled with AVX).
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots4_avx(q: &[f32; 64], ks: [&[f32; 64]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // SAFETY: AVX per the contract; every load reads 8 floats inside a 64-float array.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SplitMix64;

    /// The head-size-64 attention path is the generic one, reorganized: equal bits for every
    /// context length (including the tails that are not a multiple of four keys), GQA group
    /// sizes and offsets, and scores spanning many orders of magnitude, on every SIMD path this
    /// CPU supports.
    #[test]
    fn grouped_attention_equals_generic_bits_on_every_path() {
        let mut rng = SplitMix64(7);
        let (kv_dim, hd) = (192, 64);
        let paths = SimdPath::available();
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
                    let head = KvHead {
                        kv: &kv,
                        len,
                        off: kv_off,
                        width: kv_dim,
                    };
                    for (qh, oh) in q.chunks_exact(hd).zip(generic.chunks_exact_mut(hd)) {
                        let mut s = vec![0f32; len];
                        attend_any(qh, head, &mut s, oh);
                    }
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    for &path in &paths {
                        let mut grouped = vec![0f32; group * hd];
                        attend_group(path, &q, hd, head, &mut grouped);
                        assert_eq!(
                            bits(&generic),
                            bits(&grouped),
                            "{path}: len {len}, group {group}, offset {kv_off}"
                        );
                    }
                }
            }
        }
        eprintln!("SIMD paths exercised: {paths:?}");
    }
}
