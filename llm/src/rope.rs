//! RoPE's cos/sin per position and frequency pair, kept per model instead of recomputed every
//! step: [`RopeTable`] computes a position's row once, on first need (the table grows by
//! doubling), with the operations the forward always used — `θ^(−2i/d)` in f64, times the
//! position in f64, `cos`/`sin` in f64, rounded to f32 — so every value has the bits a per-step
//! computation gives.
//!
//! Reference: Su et al. 2021 (RoPE).

use std::sync::{PoisonError, RwLock};

/// cos/sin of every position below `cos.len() / half`, `half` values per position each.
#[derive(Debug, Default)]
struct CosSin {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The cos/sin table of one model's RoPE (head size `hd`, base `theta`).
#[derive(Debug)]
pub(crate) struct RopeTable {
    /// `θ^(−2i/hd)` for `i < hd/2`.
    freqs: Vec<f64>,
    rows: RwLock<CosSin>,
}

/// Positions the table holds at least, once it holds any.
const MIN_POSITIONS: usize = 64;

impl RopeTable {
    pub(crate) fn new(hd: usize, theta: f64) -> Self {
        let freqs = (0..hd / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / hd as f64))
            .collect();
        Self {
            freqs,
            rows: RwLock::default(),
        }
    }

    /// Fills `cos` and `sin` (cleared first) with the rows of `pos`, in order:
    /// `pos.len() × hd/2` values each.
    pub(crate) fn gather(&self, pos: &[usize], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let half = self.freqs.len();
        cos.clear();
        sin.clear();
        let Some(end) = pos.iter().max().map(|&p| p + 1) else {
            return;
        };
        self.grow(end);
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        for &p in pos {
            cos.extend_from_slice(&rows.cos[p * half..(p + 1) * half]);
            sin.extend_from_slice(&rows.sin[p * half..(p + 1) * half]);
        }
    }

    /// Makes the table hold positions `0..end` (at least; it grows to a power of two).
    fn grow(&self, end: usize) {
        let half = self.freqs.len();
        let held = |rows: &CosSin| rows.cos.len() / half.max(1);
        if half == 0 || held(&self.rows.read().unwrap_or_else(PoisonError::into_inner)) >= end {
            return;
        }
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        let from = held(&rows);
        if from >= end {
            return;
        }
        let to = end.next_power_of_two().max(MIN_POSITIONS);
        rows.cos.reserve((to - from) * half);
        rows.sin.reserve((to - from) * half);
        for p in from..to {
            for &freq in &self.freqs {
                let a = p as f64 * freq;
                rows.cos.push(a.cos() as f32);
                rows.sin.push(a.sin() as f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-step computation the table replaces, as the forward had it.
    fn per_step(pos: &[usize], hd: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
        let half = hd / 2;
        let mut cos = Vec::with_capacity(pos.len() * half);
        let mut sin = Vec::with_capacity(pos.len() * half);
        for &p in pos {
            for i in 0..half {
                let freq = theta.powf(-((2 * i) as f64) / hd as f64);
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn the_table_gives_the_per_step_bits_as_it_grows() {
        for (hd, theta) in [
            (64, 10_000.0),
            (64, 100_000.0),
            (128, 500_000.0),
            (6, 10_000.0),
        ] {
            let table = RopeTable::new(hd, theta);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            // Out of order, repeated, and far enough to grow the table several times.
            for pos in [
                vec![3, 0, 3, 1],
                vec![63],
                vec![64, 65, 2],
                vec![700],
                vec![8191, 0, 4000, 129],
                vec![],
            ] {
                table.gather(&pos, &mut cos, &mut sin);
                let (want_cos, want_sin) = per_step(&pos, hd, theta);
                assert_eq!(bits(&cos), bits(&want_cos), "hd {hd} θ {theta} {pos:?}");
                assert_eq!(bits(&sin), bits(&want_sin), "hd {hd} θ {theta} {pos:?}");
            }
            let held = table.rows.read().unwrap().cos.len() / (hd / 2);
            assert_eq!(held, 8192);
        }
    }
}
