//! One-pass attention over an f16 cache ([`crate::KvFormat::F16`]): per query head a running
//! maximum, a running sum and a running weighted sum of values, updated key by key in index
//! order (online softmax; Milakov & Gimelshein 2018, Dao et al. 2022), so each key and value is
//! read once and no score is stored.
//!
//! Per head and key `j`, always the same operations in the same order: `s = dot(q, k_j) · scale`
//! ([`dot`]'s eight lanes); if `s` exceeds the maximum `m`, the sum and every accumulator are
//! multiplied by `exp(m − s)` and `m = s`; then `p = exp(s − m)`, `sum += p`, `acc += p · v_j`
//! (a multiply, then an add: no fused multiply-add on any path). Finally `out = acc · (1/sum)`.
//! Keys and values are widened from f16 exactly (F16C where the path has it, `half` otherwise),
//! so every SIMD path, every split of the work and every batch gives the same bits.

use half::f16;
use trail_kernels::simd::Isa;
use trail_kernels::simd_dispatch;

use super::{KvHead, MAX_GROUP, dots4, wide};
use crate::ops::dot;

simd_dispatch! {
    /// Causal attention of the query heads that share one KV head (`q` holds them one after
    /// the other, `hd` wide) over `head`'s positions, on SIMD `path` (see the module docs).
    pub(crate) fn attend_group(
        q: &[f32],
        hd: usize,
        head: KvHead<'_, f16>,
        out: &mut [f32],
    ) = attend_group_body;
}

#[inline(always)]
fn attend_group_body(isa: Isa, q: &[f32], hd: usize, head: KvHead<'_, f16>, out: &mut [f32]) {
    if hd == 64 && q.len() / hd <= MAX_GROUP {
        attend_fixed(isa, q, head, out);
    } else {
        let mut kv = vec![0f32; 2 * hd];
        let (k, v) = kv.split_at_mut(hd);
        for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            attend_any(isa, qh, head, k, v, oh);
        }
    }
}

/// Folds key `s` (its scaled score) and value `v` into one head's running maximum, sum and
/// accumulator. The maximum starts at −∞ (so the first key's rescale multiplies zeros by
/// `exp(−∞) = 0`); a rescale by exactly 1 is skipped, which changes no bit.
#[inline(always)]
fn fold(max: &mut f32, sum: &mut f32, acc: &mut [f32], s: f32, v: &[f32]) {
    if s > *max {
        let c = (*max - s).exp();
        *sum *= c;
        for a in acc.iter_mut() {
            *a *= c;
        }
        *max = s;
    }
    let p = (s - *max).exp();
    *sum += p;
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += p * x;
    }
}

/// `acc · (1/sum)` into `out` (as [`attend_any`] does in place).
#[inline(always)]
fn finish(acc: &[f32], sum: f32, out: &mut [f32]) {
    let inv = 1.0 / sum;
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = a * inv;
    }
}

/// One head of any size: the reference order of operations (`k`, `v`: scratch, `q.len()` wide).
#[inline(always)]
fn attend_any(
    isa: Isa,
    q: &[f32],
    head: KvHead<'_, f16>,
    k: &mut [f32],
    v: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    out.fill(0.0);
    for j in 0..head.len {
        widen(isa, head.key(j, hd), k);
        widen(isa, head.value(j, hd), v);
        fold(&mut max, &mut sum, out, dot(q, k) * scale, v);
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// [`attend_any`] for every head of a GQA group at head size 64: keys and values widened four
/// at a time and read once for the whole group, four dot products per head at once
/// ([`dots4`], [`dot`]'s bits), then each head folds the four keys in index order.
#[inline(always)]
fn attend_fixed(isa: Isa, q: &[f32], head: KvHead<'_, f16>, out: &mut [f32]) {
    let group = q.len() / 64;
    let len = head.len;
    let scale = 1.0 / (64f32).sqrt();
    let qs: Vec<&[f32; 64]> = q.chunks_exact(64).map(wide).collect();
    let mut max = [f32::NEG_INFINITY; MAX_GROUP];
    let mut sum = [0f32; MAX_GROUP];
    let mut acc = [[0f32; 64]; MAX_GROUP];
    let (mut ks, mut vs) = ([[0f32; 64]; 4], [[0f32; 64]; 4]);
    let full = len / 4 * 4;
    for j0 in (0..full).step_by(4) {
        for b in 0..4 {
            widen(isa, head.key(j0 + b, 64), &mut ks[b]);
            widen(isa, head.value(j0 + b, 64), &mut vs[b]);
        }
        for (h, qh) in qs.iter().enumerate() {
            let d = dots4(isa, qh, [&ks[0], &ks[1], &ks[2], &ks[3]]);
            for b in 0..4 {
                fold(&mut max[h], &mut sum[h], &mut acc[h], d[b] * scale, &vs[b]);
            }
        }
    }
    for j in full..len {
        widen(isa, head.key(j, 64), &mut ks[0]);
        widen(isa, head.value(j, 64), &mut vs[0]);
        for (h, qh) in qs.iter().enumerate() {
            let s = dot(*qh, &ks[0]) * scale;
            fold(&mut max[h], &mut sum[h], &mut acc[h], s, &vs[0]);
        }
    }
    for (h, oh) in out.chunks_exact_mut(64).enumerate().take(group) {
        finish(&acc[h], sum[h], oh);
    }
}

/// `src` as f32 into `dst` (exact): eight at a time with F16C on the paths that have it.
#[inline(always)]
fn widen(isa: Isa, src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        done = n / 8 * 8;
        // SAFETY: every path but scalar has F16C (`isa` proves the path), and `done` ≤ the
        // length of both slices.
        unsafe { widen_f16c(&src[..done], &mut dst[..done]) };
    }
    let _ = isa;
    for (d, s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = s.to_f32();
    }
}

/// [`widen`] with F16C, `src.len()` a multiple of 8 and at most `dst.len()`.
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: F16C and AVX per the contract; each load reads 8 halves inside `src`, each store
    // writes 8 floats inside `dst` (at least as long).
    unsafe {
        for i in (0..src.len()).step_by(8) {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::attend_any as attend_f32;
    use crate::cache::{LayerKv, to_f16};
    use crate::sampler::SplitMix64;
    use trail_kernels::SimdPath;

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// The head-size-64 path is the generic one reorganized, on every SIMD path: equal bits for
    /// every context length (tails not a multiple of four keys included), GQA group sizes and
    /// offsets, with scores spanning many orders of magnitude and maxima met late (so the
    /// rescale runs); and close to the two-pass f32 kernel on the same (rounded) keys and
    /// values.
    #[test]
    fn online_attention_is_one_order_of_operations_on_every_path() {
        let mut rng = SplitMix64(23);
        let (kv_dim, hd) = (192, 64);
        let paths = SimdPath::available();
        for len in [1usize, 2, 3, 4, 5, 7, 8, 33, 130] {
            let mut draw = |n: usize, scale: f32| -> Vec<f16> {
                (0..n)
                    .map(|i| to_f16((rng.uniform() as f32 - 0.5) * scale * (1.0 + i as f32 / 64.0)))
                    .collect()
            };
            let kv = LayerKv {
                k: draw(len * kv_dim, 1.0),
                v: draw(len * kv_dim, 2.0),
            };
            let wide_kv = LayerKv {
                k: kv.k.iter().map(|x| x.to_f32()).collect(),
                v: kv.v.iter().map(|x| x.to_f32()).collect(),
            };
            for group in [1usize, 3, 4] {
                let q: Vec<f32> = draw(group * hd, 4.0).iter().map(|x| x.to_f32()).collect();
                for off in [0, 64, 128] {
                    let head = KvHead::new(&kv, len, off, kv_dim);
                    let mut generic = vec![0f32; group * hd];
                    let (mut k, mut v) = (vec![0f32; hd], vec![0f32; hd]);
                    for (qh, oh) in q.chunks_exact(hd).zip(generic.chunks_exact_mut(hd)) {
                        attend_any(Isa::SCALAR, qh, head, &mut k, &mut v, oh);
                    }
                    for &path in &paths {
                        let mut grouped = vec![0f32; group * hd];
                        attend_group(path, &q, hd, head, &mut grouped);
                        assert_eq!(
                            bits(&generic),
                            bits(&grouped),
                            "{path}: len {len}, group {group}, offset {off}"
                        );
                    }
                    let wide_head = KvHead::new(&wide_kv, len, off, kv_dim);
                    for (qh, oh) in q.chunks_exact(hd).zip(generic.chunks_exact(hd)) {
                        let mut two_pass = vec![0f32; hd];
                        attend_f32(qh, wide_head, &mut vec![0f32; len], &mut two_pass);
                        for (a, b) in oh.iter().zip(&two_pass) {
                            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
                        }
                    }
                }
            }
        }
        eprintln!("SIMD paths exercised: {paths:?}");
    }

    /// Widening is exact on every path, whatever the length (F16C blocks and the tail).
    #[test]
    fn widening_is_exact_on_every_path() {
        let src: Vec<f16> = (0..77u16)
            .map(|i| f16::from_bits(i.wrapping_mul(853)))
            .collect();
        let want: Vec<f32> = src.iter().map(|x| x.to_f32_const()).collect();
        for path in SimdPath::available() {
            let mut got = vec![0f32; src.len()];
            widen(path.isa(), &src, &mut got);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            assert!(same, "{path}");
        }
    }
}
