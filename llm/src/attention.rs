//! Causal grouped-query attention over each sequence's cached keys and values, computed by hand
//! over plain f32 slices per (token, head) over exactly keys `0..=pos` in a fixed order, so a
//! row's result never depends on what shares its step or on how the work is split.
//!
//! [`attend`] spreads (token, KV-head group) items over rayon's threads; each item runs
//! [`attend_group`], compiled once per SIMD path ([`trail_kernels::simd_dispatch!`]) with the
//! same operations in the same order, so every path gives the same bits.
//!
//! References: Vaswani et al. 2017 (scaled dot-product attention), Ainslie et al. 2023 (GQA).

use rayon::prelude::*;
use trail_kernels::{SimdPath, simd_dispatch};

use crate::cache::LayerKv;
use crate::config::Config;
use crate::ops::dot;

/// The attention output `att` (`n × q_dim`) of the `n` new tokens of one step for one layer:
/// token `t` (row `tok_row[t]`, position `tok_pos[t]`) attends with its query heads `q`
/// (`n × q_dim`, RoPE applied) over keys and values `0..=tok_pos[t]` of `caches[tok_row[t]]`.
pub(crate) fn attend(
    path: SimdPath,
    cfg: &Config,
    q: &[f32],
    caches: &[&LayerKv],
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
        attend_group(
            path,
            &q[t * q_dim + j * item_dim..t * q_dim + (j + 1) * item_dim],
            hd,
            caches[tok_row[t]],
            tok_pos[t],
            j * heads / group * hd,
            kv_dim,
            out,
        )
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

simd_dispatch! {
    /// Causal attention of the query heads that share one KV head (`q` holds them one after the
    /// other, `hd` wide) over positions `0..=pos` of one sequence's cache; that KV head's keys
    /// and values start at `kv_off` within each cached row of width `kv_dim`. Per head a fixed
    /// order: scores, max, exp, sum, weighted values, one division. Head size 64 (SmolLM2 and
    /// most Llamas) takes a path that reads each key and value once for the whole group, with
    /// the same operations in the same order per score and per output, so its bits equal the
    /// generic path's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_group(
        q: &[f32],
        hd: usize,
        kv: &LayerKv,
        pos: usize,
        kv_off: usize,
        kv_dim: usize,
        out: &mut [f32],
    ) = attend_group_body;
}

#[inline(always)]
fn attend_group_body(
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

thread_local! {
    /// Attention scores of the head being computed on this thread (reused across calls).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `max_j s_j` after filling `scores[j] = dot(q, k_j) · scale`.
#[inline(always)]
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
#[inline(always)]
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

/// [`dot`] of `q` with four keys at once, sharing each load of `q`: per key the same eight
/// lanes (a multiply, then an add: no fused multiply-add) and the same reduction, so every
/// result has [`dot`]'s bits. Written as plain lanes that vectorize to one `ymm` (or two `xmm`)
/// accumulator per key.
#[inline(always)]
fn dots4(q: &[f32; 64], ks: [&[f32; 64]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    for c in 0..8 {
        let qc = &q[c * 8..c * 8 + 8];
        for (a, k) in acc.iter_mut().zip(ks) {
            let kc = &k[c * 8..c * 8 + 8];
            for i in 0..8 {
                a[i] += qc[i] * kc[i];
            }
        }
    }
    acc.map(|a| ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])))
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
                    for (qh, oh) in q.chunks_exact(hd).zip(generic.chunks_exact_mut(hd)) {
                        let mut s = vec![0f32; len];
                        attend_any(qh, &kv, kv_off, kv_dim, &mut s, oh);
                    }
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    for &path in &paths {
                        let mut grouped = vec![0f32; group * hd];
                        attend_group(path, &q, hd, &kv, len - 1, kv_off, kv_dim, &mut grouped);
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
