//! Scores of length predictors: MAE, Kendall's τ-b, and bootstrap intervals over requests.
//!
//! - [`kendall_tau_b`]: rank agreement with ties on both sides (many true lengths sit at the
//!   output cap, and a constant predictor ties everywhere: τ-b is then undefined, `None`).
//! - [`Bootstrap`]: percentile 95 % intervals of a statistic of per-request values, resampling
//!   requests with replacement from a seeded ChaCha8 stream. Every statistic computed with the
//!   same `Bootstrap` sees the same resamples, so intervals of ratios between predictors are
//!   paired.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Kendall's τ-b of paired samples; `None` when either side is constant (or n < 2).
///
/// `(n_c − n_d) / √((n₀ − n₁)(n₀ − n₂))` with `n₀ = n(n−1)/2` and `n₁`, `n₂` the pairs tied in
/// `x`, resp. `y`. O(n²): fine for the few thousand test requests of a run.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "kendall_tau_b needs paired samples");
    let n = x.len();
    let (mut s, mut tie_x, mut tie_y, mut pairs) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            pairs += 1;
            let dx = x[i].partial_cmp(&x[j])? as i64;
            let dy = y[i].partial_cmp(&y[j])? as i64;
            s += dx * dy;
            tie_x += (dx == 0) as i64;
            tie_y += (dy == 0) as i64;
        }
    }
    let denom = ((pairs - tie_x) as f64 * (pairs - tie_y) as f64).sqrt();
    (denom > 0.0).then(|| s as f64 / denom)
}

/// A point estimate with its bootstrap 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Seeded request-level bootstrap: `resamples` draws of `n` indices with replacement.
#[derive(Debug, Clone, Copy)]
pub struct Bootstrap {
    pub n: usize,
    pub resamples: usize,
    pub seed: u64,
}

impl Bootstrap {
    pub fn new(n: usize, resamples: usize, seed: u64) -> Self {
        Self { n, resamples, seed }
    }

    /// The statistic on all requests and the 2.5 / 97.5 percentiles of it over resamples.
    /// Resamples where the statistic is not finite (e.g. τ-b of all-tied draws) are dropped;
    /// `None` when the statistic on all requests is not defined.
    pub fn interval(&self, stat: impl Fn(&[usize]) -> Option<f64>) -> Option<Interval> {
        let all: Vec<usize> = (0..self.n).collect();
        let value = stat(&all).filter(|v| v.is_finite())?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut idx = vec![0usize; self.n];
        let mut draws = Vec::with_capacity(self.resamples);
        for _ in 0..self.resamples {
            for i in idx.iter_mut() {
                *i = rng.random_range(0..self.n);
            }
            if let Some(v) = stat(&idx).filter(|v| v.is_finite()) {
                draws.push(v);
            }
        }
        if draws.is_empty() {
            return Some(Interval {
                value,
                lo: value,
                hi: value,
            });
        }
        draws.sort_by(f64::total_cmp);
        Some(Interval {
            value,
            lo: percentile(&draws, 0.025),
            hi: percentile(&draws, 0.975),
        })
    }
}

/// Linear-interpolated percentile of sorted data.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    let next = sorted[(i + 1).min(sorted.len() - 1)];
    sorted[i] * (1.0 - f) + next * f
}

/// Per-request absolute errors summed, and their counts: the input of a request-level MAE.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorSums {
    pub sum: Vec<f64>,
    pub count: Vec<u32>,
}

impl ErrorSums {
    pub fn new(requests: usize) -> Self {
        Self {
            sum: vec![0.0; requests],
            count: vec![0; requests],
        }
    }

    pub fn add(&mut self, request: usize, abs_error: f64) {
        self.sum[request] += abs_error;
        self.count[request] += 1;
    }

    /// MAE over all (request, position) pairs of the requests in `idx` (repeats count twice).
    pub fn mae(&self, idx: &[usize]) -> Option<f64> {
        let (mut s, mut c) = (0f64, 0u64);
        for &i in idx {
            s += self.sum[i];
            c += self.count[i] as u64;
        }
        (c > 0).then(|| s / c as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_b_by_hand() {
        // Perfect agreement and reversal.
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[10., 20., 30.]), Some(1.0));
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[3., 2., 1.]), Some(-1.0));
        // x = 1,2,2,3; y = 1,3,2,4: pairs 6, ties in x 1, none in y; concordant 5, discordant 0
        // → 5/√(5·6).
        let t = kendall_tau_b(&[1., 2., 2., 3.], &[1., 3., 2., 4.]).unwrap();
        assert!((t - 5.0 / 30f64.sqrt()).abs() < 1e-12);
        // A constant predictor has no τ-b.
        assert_eq!(kendall_tau_b(&[5., 5., 5.], &[1., 2., 3.]), None);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_value() {
        let mut e = ErrorSums::new(50);
        for i in 0..50 {
            e.add(i, i as f64);
            e.add(i, 1.0);
        }
        let b = Bootstrap::new(50, 500, 7);
        let iv = b.interval(|idx| e.mae(idx)).unwrap();
        assert!((iv.value - (49.0 * 50.0 / 2.0 + 50.0) / 100.0).abs() < 1e-12);
        assert!(iv.lo < iv.value && iv.value < iv.hi, "{iv:?}");
        assert_eq!(b.interval(|idx| e.mae(idx)), Some(iv));
        assert_ne!(
            Bootstrap::new(50, 500, 8).interval(|idx| e.mae(idx)),
            Some(iv)
        );
    }
}
