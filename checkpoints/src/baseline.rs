//! Readouts of the baselines at `g` generated tokens.
//!
//! - A total-length predictor (prompt-only, e.g. BERT) gives at `g` either the paper's readout
//!   `max(pred − g, 0)` ([`countdown`]) or the conditional residual `E[L − g | L > g]` under its
//!   predicted bin distribution ([`conditional_residual`]; lengths uniform within each bin, the
//!   last bin ending at `max`).
//! - The constant baseline ([`Constant`]) knows only the training lengths: their mean counted
//!   down, or their empirical mean residual life.

use crate::bins::Bins;

/// The paper's readout of a total-length prediction: `max(pred − g, 0)`.
pub fn countdown(pred_total: f64, generated: u32) -> f64 {
    (pred_total - generated as f64).max(0.0)
}

/// `E[L − g | L > g]` when `L` has bin probabilities `probs` and is uniform within a bin.
/// Zero when no mass lies above `g`. With a cap class its mass sits at `L = cap` (the
/// request's cap).
pub fn conditional_residual<P: Copy + Into<f64>>(
    bins: &Bins,
    probs: &[P],
    generated: u32,
    cap: u32,
) -> f64 {
    let w = bins.width();
    let g = generated as f64;
    let (mut mass, mut moment) = (0f64, 0f64);
    if let Some(&p) = probs.get(bins.length_bins()).filter(|_| bins.cap_class())
        && cap > generated
    {
        mass += p.into();
        moment += p.into() * f64::from(cap - generated);
    }
    for (i, &p) in probs[..bins.length_bins()].iter().enumerate() {
        let (a, b) = (i as f64 * w, (i + 1) as f64 * w);
        let lo = a.max(g);
        if lo >= b {
            continue;
        }
        // Mass of the bin above g, and ∫_lo^b (l − g) dl / w times p.
        let p = p.into();
        mass += p * (b - lo) / w;
        moment += p * ((b - g).powi(2) - (lo - g).powi(2)) / (2.0 * w);
    }
    if mass <= 0.0 { 0.0 } else { moment / mass }
}

/// The constant baseline from the training lengths.
#[derive(Debug, Clone)]
pub struct Constant {
    sorted: Vec<u32>,
    /// `suffix[i]` = Σ sorted[i..].
    suffix: Vec<f64>,
}

impl Constant {
    pub fn new(lengths: &[u32]) -> Self {
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let mut suffix = vec![0f64; sorted.len() + 1];
        for i in (0..sorted.len()).rev() {
            suffix[i] = suffix[i + 1] + sorted[i] as f64;
        }
        Self { sorted, suffix }
    }

    /// Mean training length.
    pub fn mean(&self) -> f64 {
        if self.sorted.is_empty() {
            0.0
        } else {
            self.suffix[0] / self.sorted.len() as f64
        }
    }

    /// The mean counted down: `max(mean − g, 0)`.
    pub fn countdown(&self, generated: u32) -> f64 {
        countdown(self.mean(), generated)
    }

    /// Empirical mean residual life `E[L − g | L > g]`; zero when no length exceeds `g`.
    pub fn residual(&self, generated: u32) -> f64 {
        let i = self.sorted.partition_point(|&l| l <= generated);
        let n = self.sorted.len() - i;
        if n == 0 {
            0.0
        } else {
            self.suffix[i] / n as f64 - generated as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_baselines() {
        // Lengths 10, 20, 60: mean 30. At g = 15: above are 20, 60 → (5 + 45)/2 = 25.
        let c = Constant::new(&[60, 10, 20]);
        assert_eq!(c.mean(), 30.0);
        assert_eq!(c.countdown(15), 15.0);
        assert_eq!(c.countdown(45), 0.0);
        assert_eq!(c.residual(0), 30.0);
        assert_eq!(c.residual(15), 25.0);
        assert_eq!(c.residual(20), 40.0);
        assert_eq!(c.residual(60), 0.0);
    }

    #[test]
    fn conditional_residual_by_hand() {
        // k = 2 over 0..100 (width 50), probs [.5, .5].
        let b = Bins::new(2, 100).unwrap();
        // g = 0: plain expectation 25·.5 + 75·.5 = 50.
        assert!((conditional_residual(&b, &[0.5, 0.5], 0, 100) - 50.0).abs() < 1e-12);
        // g = 25: bin 0 keeps half its mass, .25, mean residual 12.5; bin 1 mass .5, mean
        // residual 75 − 25 = 50 → (.25·12.5 + .5·50)/.75 = 37.5.
        assert!((conditional_residual(&b, &[0.5, 0.5], 25, 100) - 37.5).abs() < 1e-12);
        // g = 60: only bin 1 above, uniform on 60..100 → 20.
        assert!((conditional_residual(&b, &[0.5, 0.5], 60, 100) - 20.0).abs() < 1e-12);
        assert_eq!(conditional_residual(&b, &[0.5, 0.5], 100, 100), 0.0);
        assert_eq!(countdown(40.0, 50), 0.0);
        assert_eq!(countdown(40.0, 10), 30.0);
    }
}
