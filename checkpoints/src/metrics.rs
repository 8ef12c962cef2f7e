//! Scores of length predictors: request-level MAE sums, and the statistics of `trail-stats`
//! they are reported with (Kendall's τ-b, seeded bootstrap intervals), re-exported here.
//!
//! - [`ErrorSums`]: per-request absolute errors and counts, the input of a request-level MAE
//!   whose bootstrap resamples requests (a request's positions stay together).
//! - [`kendall_tau_b`], [`Bootstrap`], [`Interval`]: from `trail_stats`, the one definition the
//!   scheduling reports use too.

pub use trail_stats::{Bootstrap, Interval, kendall_tau_b};

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
