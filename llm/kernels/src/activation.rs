//! Activations quantized once per step into Q8 blocks of 32 (ggml `Q8_1`-like: f32 scale, the
//! integer block sum, and `d · sum` for formats with a minimum).

use crate::SimdPath;
use crate::format::QK;

/// `n × in_features` activations quantized to int8 blocks of 32, reusable across every matrix
/// that shares the input (q/k/v, gate/up).
#[derive(Debug, Clone)]
pub struct QActivations {
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// `n × k` quants in `[-127, 127]`, row-major.
    pub(crate) qs: Vec<i8>,
    /// Per block scale `d = amax / 127`, `n × k/32`.
    pub(crate) d: Vec<f32>,
    /// Per block integer sum of the quants.
    pub(crate) isum: Vec<i32>,
    /// Per block `d · (isum as f32)` (used by `Q4_1`'s minimum).
    pub(crate) s: Vec<f32>,
}

impl QActivations {
    /// Quantizes `x` (`n × in_features`, row-major) on [`SimdPath::selected`]. Panics if
    /// `in_features` is not a multiple of 32 or `x` is too short.
    pub fn quantize(x: &[f32], n: usize, in_features: usize) -> Self {
        Self::quantize_on(SimdPath::selected(), x, n, in_features)
    }

    /// Quantizes on a given path (every path gives the same bits; AVX2 runs the scalar code
    /// compiled with AVX2). Per block: `d = amax / 127`, `q = round_ties_even(x · (1/d))`, as
    /// ggml's SIMD code does. Panics if this CPU does not support `path`.
    pub fn quantize_on(path: SimdPath, x: &[f32], n: usize, in_features: usize) -> Self {
        assert!(
            in_features.is_multiple_of(QK),
            "in_features must be a multiple of 32"
        );
        assert!(
            x.len() >= n * in_features,
            "x holds fewer than n × in_features values"
        );
        let nb = n * in_features / QK;
        let mut a = QActivations {
            n,
            k: in_features,
            qs: vec![0i8; n * in_features],
            d: vec![0f32; nb],
            isum: vec![0i32; nb],
            s: vec![0f32; nb],
        };
        let x = &x[..n * in_features];
        path.assert_supported();
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports the path (asserted above), which includes AVX-512F.
            SimdPath::Avx512Vnni => unsafe { x86::blocks_avx512(x, &mut a) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports the path (asserted above): AVX2, FMA, F16C.
            SimdPath::Avx2 => unsafe { x86::blocks_avx2(x, &mut a) },
            _ => blocks(x, &mut a, block_scalar),
        }
        a
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// The quantized activations as f32 (`q · d`), `n × in_features` (for references).
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(QK)
            .zip(&self.d)
            .flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }

    /// Input features per row.
    pub fn in_features(&self) -> usize {
        self.k
    }
}

/// Quantizes every block of `x` into `a` with `block`, which returns `(d, Σq)` and writes
/// the quants. Inlined into each path's copy.
#[inline(always)]
fn blocks(x: &[f32], a: &mut QActivations, block: impl Fn(&[f32], &mut [i8]) -> (f32, i32)) {
    for (bi, (xb, qb)) in x
        .chunks_exact(QK)
        .zip(a.qs.chunks_exact_mut(QK))
        .enumerate()
    {
        let (db, sum) = block(xb, qb);
        a.d[bi] = db;
        a.isum[bi] = sum;
        a.s[bi] = db * sum as f32;
    }
}

/// One block: returns `(d, Σq)` and writes the quants.
#[inline(always)]
fn block_scalar(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        *q = r;
        sum += r as i32;
    }
    (d, sum)
}

/// The x86 copies of the block loop, each compiled with its path's features.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QActivations, block_scalar, blocks};
    use crate::format::QK;

    /// The scalar block code compiled with AVX2 (same operations, so the same bits).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn blocks_avx2(x: &[f32], a: &mut QActivations) {
        blocks(x, a, block_scalar);
    }

    /// Every block with [`block_avx512`].
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn blocks_avx512(x: &[f32], a: &mut QActivations) {
        // SAFETY: AVX-512F is enabled here; `blocks` passes 32-value blocks.
        blocks(x, a, |xb, qb| unsafe { block_avx512(xb, qb) });
    }

    /// AVX-512 version of [`block_scalar`] (same operations, so the same bits).
    ///
    /// # Safety
    /// The CPU must support AVX-512F (it runs inside [`blocks_avx512`]); `xb` and `qb` hold 32
    /// values.
    #[inline(always)]
    unsafe fn block_avx512(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
        use std::arch::x86_64::*;
        debug_assert!(xb.len() == QK && qb.len() == QK);
        // SAFETY: 32 f32 are read from `xb` and 32 i8 written to `qb` (lengths per the contract).
        unsafe {
            let x0 = _mm512_loadu_ps(xb.as_ptr());
            let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
            // max is exact and order-free, so this equals the scalar fold (for non-NaN input).
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm512_set1_ps(id);
            let lo = _mm512_set1_ps(-127.0);
            let hi = _mm512_set1_ps(127.0);
            const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let r0 = _mm512_roundscale_ps::<RNE>(_mm512_mul_ps(x0, idv));
            let r1 = _mm512_roundscale_ps::<RNE>(_mm512_mul_ps(x1, idv));
            let q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r0, lo), hi));
            let q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r1, lo), hi));
            _mm_storeu_si128(qb.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(
                qb.as_mut_ptr().add(16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q1),
            );
            (d, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)))
        }
    }
}
