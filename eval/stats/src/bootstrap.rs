//! Seeded request-level bootstrap: percentile 95 % intervals of a statistic of per-request
//! values, resampling requests with replacement from a seeded ChaCha8 stream.
//!
//! Every statistic computed with the same [`Bootstrap`] sees the same resamples, so intervals of
//! ratios between predictors (or policies) are paired. The interval ends are the 2.5 and 97.5
//! [`quantile_sorted`]s of the resampled statistic (numpy's linear definition).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::quantile::quantile_sorted;

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
        let mut draws = self.draws(stat);
        draws.sort_by(f64::total_cmp);
        Some(Interval {
            value,
            lo: quantile_sorted(&draws, 0.025).unwrap_or(value),
            hi: quantile_sorted(&draws, 0.975).unwrap_or(value),
        })
    }

    /// The finite values of the statistic over the seeded resamples, in draw order.
    fn draws(&self, stat: impl Fn(&[usize]) -> Option<f64>) -> Vec<f64> {
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
        draws
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean(xs: &[f64], idx: &[usize]) -> Option<f64> {
        (!idx.is_empty()).then(|| idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64)
    }

    #[test]
    fn seeded_and_brackets_the_value() {
        let xs: Vec<f64> = (0..50).map(|i| i as f64).collect();
        let b = Bootstrap::new(50, 500, 7);
        let iv = b.interval(|idx| mean(&xs, idx)).unwrap();
        assert_eq!(iv.value, 24.5);
        assert!(iv.lo < iv.value && iv.value < iv.hi, "{iv:?}");
        assert_eq!(b.interval(|idx| mean(&xs, idx)), Some(iv));
        assert_ne!(
            Bootstrap::new(50, 500, 8).interval(|idx| mean(&xs, idx)),
            Some(iv)
        );
    }

    #[test]
    fn undefined_statistics() {
        let b = Bootstrap::new(3, 20, 1);
        assert_eq!(b.interval(|_| None), None);
        // Defined on all requests only: the interval collapses onto the value.
        let iv = b.interval(|idx| (idx == [0, 1, 2]).then_some(2.0)).unwrap();
        assert_eq!((iv.lo, iv.value, iv.hi), (2.0, 2.0, 2.0));
    }
}
