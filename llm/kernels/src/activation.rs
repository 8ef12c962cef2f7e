//! Activations quantized once per step into Q8 blocks of 32 (ggml `Q8_1`-like: f32 scale, the
//! integer block sum, and `d · sum` for formats with a minimum).

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
    /// Quantizes `x` (`n × in_features`, row-major). Panics if `in_features` is not a multiple
    /// of 32 or `x` is too short.
    pub fn quantize(x: &[f32], n: usize, in_features: usize) -> Self {
        assert!(
            in_features.is_multiple_of(QK),
            "in_features must be a multiple of 32"
        );
        assert!(
            x.len() >= n * in_features,
            "x holds fewer than n × in_features values"
        );
        let nb = n * in_features / QK;
        let mut qs = vec![0i8; n * in_features];
        let mut d = vec![0f32; nb];
        let mut isum = vec![0i32; nb];
        let mut s = vec![0f32; nb];
        for (bi, (xb, qb)) in x[..n * in_features]
            .chunks_exact(QK)
            .zip(qs.chunks_exact_mut(QK))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let db = amax / 127.0;
            let id = if db != 0.0 { 1.0 / db } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                let r = (v * id).round().clamp(-127.0, 127.0) as i8;
                *q = r;
                sum += r as i32;
            }
            d[bi] = db;
            isum[bi] = sum;
            s[bi] = db * sum as f32;
        }
        QActivations {
            n,
            k: in_features,
            qs,
            d,
            isum,
            s,
        }
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
