//! Equal-width bins of the remaining output length.
//!
//! k bins over `0..max` (paper: k = 10, max = 512, width 51.2). A length `r` gets the label
//! `⌊min(r, max−1)·k / max⌋` — computed in integers so the edges are exact — so every length
//! ≥ max lands in the last bin. The point estimate is the expectation over bin midpoints,
//! clamped to `[0, max_new − g]`.

use crate::{Error, Result};

/// k equal bins over `0..max` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bins {
    k: usize,
    max: u32,
}

impl Default for Bins {
    /// The paper's bins: k = 10 over 0..512.
    fn default() -> Self {
        Self { k: 10, max: 512 }
    }
}

impl Bins {
    /// `k ≥ 1` bins over `0..max`, `max ≥ k`.
    pub fn new(k: usize, max: u32) -> Result<Self> {
        if k == 0 || (max as usize) < k {
            return Err(Error::Invalid(format!(
                "bins need 1 <= k <= max, got k={k}, max={max}"
            )));
        }
        Ok(Self { k, max })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Bin width `max / k` in tokens (51.2 for the paper's bins).
    pub fn width(&self) -> f64 {
        self.max as f64 / self.k as f64
    }

    /// The bin of a remaining length.
    pub fn label(&self, remaining: u32) -> u32 {
        let r = remaining.min(self.max - 1) as u64;
        (r * self.k as u64 / self.max as u64) as u32
    }

    /// Labels of many lengths.
    pub fn labels(&self, remaining: &[u32]) -> Vec<u32> {
        remaining.iter().map(|&r| self.label(r)).collect()
    }

    /// Midpoint of bin `i`: `(i + ½)·width`.
    pub fn midpoint(&self, i: usize) -> f64 {
        (i as f64 + 0.5) * self.width()
    }

    /// The remaining lengths bin `i` holds, as a label: `lo–hi` tokens, the last bin `lo+`
    /// (every length past `max` lands there).
    pub fn range_label(&self, i: usize) -> String {
        let (k, max) = (self.k as u64, u64::from(self.max));
        let lo = (i as u64 * max).div_ceil(k);
        if i + 1 >= self.k {
            return format!("{lo}+");
        }
        let hi = ((i as u64 + 1) * max).div_ceil(k) - 1;
        format!("{lo}–{hi}")
    }

    /// All midpoints.
    pub fn midpoints(&self) -> Vec<f64> {
        (0..self.k).map(|i| self.midpoint(i)).collect()
    }

    /// `Σ_i p_i·m_i` (probabilities need not be normalized exactly; they are used as given).
    pub fn expectation<P: Copy + Into<f64>>(&self, probs: &[P]) -> f64 {
        debug_assert_eq!(probs.len(), self.k);
        probs
            .iter()
            .enumerate()
            .map(|(i, &p)| p.into() * self.midpoint(i))
            .sum()
    }

    /// The scheduler's point estimate of the remaining length after `generated` tokens of at
    /// most `max_new`: the expectation clamped to `[0, max_new − generated]`.
    pub fn point<P: Copy + Into<f64>>(&self, probs: &[P], generated: u32, max_new: u32) -> f64 {
        clamp_remaining(self.expectation(probs), generated, max_new)
    }
}

/// Clamp an estimate of the remaining length to `[0, max_new − generated]`.
pub fn clamp_remaining(estimate: f64, generated: u32, max_new: u32) -> f64 {
    estimate.clamp(0.0, max_new.saturating_sub(generated) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_labels_hold_exactly_the_lengths_of_their_bin() {
        let b = Bins::new(10, 512).unwrap();
        assert_eq!(b.range_label(0), "0–51");
        assert_eq!(b.range_label(1), "52–102");
        assert_eq!(b.range_label(9), "461+");
        for i in 0..9 {
            let l = b.range_label(i);
            let (lo, hi) = l.split_once('–').unwrap();
            let (lo, hi): (u32, u32) = (lo.parse().unwrap(), hi.parse().unwrap());
            assert_eq!((b.label(lo), b.label(hi)), (i as u32, i as u32), "{l}");
            assert_eq!(b.label(hi + 1), i as u32 + 1, "{l}");
        }
    }

    #[test]
    fn labels_at_edges() {
        // width 64: 0 and 63 in bin 0, 64 in bin 1, 511 is the last length of bin 7,
        // 512 and 600 are past max and land in the last bin.
        let b = Bins::new(8, 512).unwrap();
        let got: Vec<u32> = [0, 63, 64, 511, 512, 600]
            .iter()
            .map(|&r| b.label(r))
            .collect();
        assert_eq!(got, vec![0, 0, 1, 7, 7, 7]);
        // The paper's width 51.2: 51 is bin 0, 52 is bin 1 (52/51.2 = 1.016), 102 is bin 1,
        // 103 is bin 2 (103/51.2 = 2.01), 460 is bin 8 (8.98), 461 is bin 9 (9.004).
        let p = Bins::default();
        let got: Vec<u32> = [0, 51, 52, 102, 103, 460, 461, 511, 512, 600]
            .iter()
            .map(|&r| p.label(r))
            .collect();
        assert_eq!(got, vec![0, 0, 1, 1, 2, 8, 9, 9, 9, 9]);
    }

    #[test]
    fn expectation_readout() {
        let b = Bins::default();
        let m = b.midpoints();
        assert!((m[0] - 25.6).abs() < 1e-12 && (m[9] - 486.4).abs() < 1e-12);
        // Half the mass on bin 0 (25.6), half on bin 2 (128.0): 76.8.
        let mut p = [0f32; 10];
        p[0] = 0.5;
        p[2] = 0.5;
        assert!((b.expectation(&p) - 76.8).abs() < 1e-9);
        // Clamped to max_new − g = 50 − 0, and to 0 once g ≥ max_new.
        assert_eq!(b.point(&p, 0, 50), 50.0);
        assert_eq!(b.point(&p, 60, 50), 0.0);
        assert!((b.point(&p, 10, 512) - 76.8).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_bins() {
        assert!(Bins::new(0, 512).is_err());
        assert!(Bins::new(10, 5).is_err());
    }
}
