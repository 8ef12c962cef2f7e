//! Equal-width bins of the remaining output length, optionally with a "runs to the cap" class.
//!
//! k bins over `0..max` (paper: k = 10, max = 512, width 51.2). A length `r` gets the label
//! `⌊min(r, max−1)·k / max⌋` — computed in integers so the edges are exact — so every length
//! ≥ max lands in the last bin. The point estimate is the expectation over bin midpoints,
//! clamped to `[0, max_new − g]`.
//!
//! Predictor v2 adds one class after the k length bins ([`Bins::with_cap_class`]): "the answer
//! runs to its cap". A row whose remaining length reaches its room (the request's cap minus the
//! tokens generated) gets that label ([`Bins::label_at`]), and the class reads out exactly the
//! room ([`Bins::readout`]): at serving time the cap the client sent, never a profiled length.
//! [`Bins::k`] counts every class (k + 1 with the cap class); [`Bins::length_bins`] the k.

use crate::{Error, Result};

/// k equal bins over `0..max` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bins {
    k: usize,
    max: u32,
    cap_class: bool,
}

impl Default for Bins {
    /// The paper's bins: k = 10 over 0..512.
    fn default() -> Self {
        Self {
            k: 10,
            max: 512,
            cap_class: false,
        }
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
        Ok(Self {
            k,
            max,
            cap_class: false,
        })
    }

    /// The same length bins plus the "runs to the cap" class (index [`Bins::length_bins`]).
    pub fn with_cap_class(self) -> Self {
        Self {
            cap_class: true,
            ..self
        }
    }

    /// Every class a predictor outputs: the length bins, plus one with the cap class.
    pub fn k(&self) -> usize {
        self.k + usize::from(self.cap_class)
    }

    /// The equal-width length bins (k of the paper).
    pub fn length_bins(&self) -> usize {
        self.k
    }

    /// Whether the last class is "runs to the cap".
    pub fn cap_class(&self) -> bool {
        self.cap_class
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

    /// The label of a remaining length with `room` tokens left before the request's cap: the
    /// cap class when there is one and the length reaches the room, else [`Bins::label`].
    pub fn label_at(&self, remaining: u32, room: u32) -> u32 {
        if self.cap_class && remaining >= room {
            self.k as u32
        } else {
            self.label(remaining)
        }
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
    /// (every length past `max` lands there), the cap class `cap`.
    pub fn range_label(&self, i: usize) -> String {
        if i >= self.k {
            return "cap".into();
        }
        let (k, max) = (self.k as u64, u64::from(self.max));
        let lo = (i as u64 * max).div_ceil(k);
        if i + 1 >= self.k {
            return format!("{lo}+");
        }
        let hi = ((i as u64 + 1) * max).div_ceil(k) - 1;
        format!("{lo}–{hi}")
    }

    /// All midpoints of the length bins.
    pub fn midpoints(&self) -> Vec<f64> {
        (0..self.k).map(|i| self.midpoint(i)).collect()
    }

    /// `Σ_i p_i·m_i` over the length bins, plus the cap class's mass times `room` (the tokens
    /// left before the request's cap). Probabilities need not be normalized exactly; they are
    /// used as given. Without a cap class `room` is unused: the paper's readout.
    pub fn readout<P: Copy + Into<f64>>(&self, probs: &[P], room: f64) -> f64 {
        debug_assert_eq!(probs.len(), self.k());
        let lengths: f64 = probs[..self.k]
            .iter()
            .enumerate()
            .map(|(i, &p)| p.into() * self.midpoint(i))
            .sum();
        match probs.get(self.k).filter(|_| self.cap_class) {
            Some(&p) => lengths + p.into() * room,
            None => lengths,
        }
    }

    /// [`Bins::readout`] with the room the bins' own `max` leaves at g = 0 (a total length
    /// under a cap of `max`); `Σ_i p_i·m_i` without a cap class.
    pub fn expectation<P: Copy + Into<f64>>(&self, probs: &[P]) -> f64 {
        self.readout(probs, f64::from(self.max))
    }

    /// The scheduler's point estimate of the remaining length after `generated` tokens of at
    /// most `max_new`: the readout with room `max_new − generated`, clamped to that room.
    pub fn point<P: Copy + Into<f64>>(&self, probs: &[P], generated: u32, max_new: u32) -> f64 {
        let room = max_new.saturating_sub(generated);
        clamp_remaining(self.readout(probs, f64::from(room)), generated, max_new)
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
    fn the_cap_class_labels_rows_that_reach_their_room_and_reads_out_the_room() {
        let b = Bins::default().with_cap_class();
        assert_eq!((b.k(), b.length_bins()), (11, 10));
        // 100 tokens left with 100 of room: runs to the cap; 99 of 100: bin 1.
        assert_eq!(b.label_at(100, 100), 10);
        assert_eq!(b.label_at(99, 100), 1);
        // A request whose client capped it at 64: 64 left at g = 0 is the cap class.
        assert_eq!(b.label_at(64, 64), 10);
        // Without the class, label_at is label.
        assert_eq!(Bins::default().label_at(100, 100), 1);
        // Half on bin 0 (25.6), half on the cap class: the room read out exactly.
        let mut p = [0f64; 11];
        p[0] = 0.5;
        p[10] = 0.5;
        assert!((b.readout(&p, 300.0) - (12.8 + 150.0)).abs() < 1e-9);
        // The point after 200 of a 264-token cap: room 64.
        assert!((b.point(&p, 200, 264) - (12.8 + 32.0)).abs() < 1e-9);
        assert_eq!(b.range_label(10), "cap");
    }

    #[test]
    fn rejects_bad_bins() {
        assert!(Bins::new(0, 512).is_err());
        assert!(Bins::new(10, 5).is_err());
    }
}
