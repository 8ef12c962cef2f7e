//! The filter's calibrated likelihood (predictor v2), fitted on validation.
//!
//! The filter multiplies its prior by the probe's posterior `c`, which carries the training
//! label prior `π` again at every refresh. The standard correction divides it out,
//! `likelihood ∝ c / π`; a tempered one divides by `π^τ`. [`fit_exponent`] scores the refined
//! estimate on the validation requests, on the schedule the server runs ([`crate::schedule`]),
//! for each exponent of [`EXPONENTS`] (0 is the paper's update, 1 the standard correction) and
//! keeps the lowest MAE (the smaller exponent on a tie).

use serde::{Deserialize, Serialize};

use crate::bins::Bins;
use crate::refine::Filter;
use crate::schedule::{self, RowOutputs};

/// The exponents tried: 0 (uncorrected) to 1 (posterior ÷ prior).
pub const EXPONENTS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// What fitting chose, with the validation MAE of every exponent tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Training label frequencies, one per class.
    pub prior: Vec<f64>,
    /// The exponent kept.
    pub exponent: f64,
    /// `(exponent, refined validation MAE)` for each exponent tried.
    pub val_mae: Vec<(f64, f64)>,
}

/// Label frequencies of `rows` (add-one smoothed, so no class has zero mass): `target[r]` with
/// `room[r]` tokens left before its cap ([`Bins::label_at`]).
pub fn label_frequencies(bins: &Bins, target: &[u32], room: &[u32], rows: &[usize]) -> Vec<f64> {
    let mut counts = vec![1.0f64; bins.k()];
    for &r in rows {
        counts[bins.label_at(target[r], room[r]) as usize] += 1.0;
    }
    let n: f64 = counts.iter().sum();
    counts.iter().map(|c| c / n).collect()
}

/// One validation request: the prompt predictor's output, the probe's output at each stored
/// row (g ascending) with the true remaining length there, and the request's cap.
#[derive(Debug, Clone)]
pub struct Track {
    pub prompt: Vec<f32>,
    /// `(g, probe output at row g, true remaining at g)`.
    pub rows: Vec<(u32, Vec<f32>, u32)>,
    pub cap: u32,
}

/// Mean |refined estimate − truth| over every (request, g) row of `tracks` with `filter`.
pub fn refined_mae(filter: &Filter, tracks: &[Track]) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for t in tracks {
        let mut st = None;
        for (g, probs, truth) in &t.rows {
            let outputs = RowOutputs {
                prompt: Some(&t.prompt),
                probe: Some(probs),
            };
            let est = schedule::apply(&mut st, filter, *g, t.cap, outputs);
            sum += (est - f64::from(*truth)).abs();
            n += 1;
        }
    }
    sum / n.max(1) as f64
}

/// The exponent of [`EXPONENTS`] with the lowest refined MAE on `tracks` for `filter` (the
/// uncalibrated filter) with label frequencies `prior`.
pub fn fit_exponent(filter: &Filter, prior: Vec<f64>, tracks: &[Track]) -> Calibration {
    let val_mae: Vec<(f64, f64)> = EXPONENTS
        .iter()
        .map(|&e| {
            let f = filter.clone().with_likelihood(&prior, e);
            (e, refined_mae(&f, tracks))
        })
        .collect();
    let exponent = val_mae
        .iter()
        .fold(
            (0.0, f64::INFINITY),
            |best, &(e, m)| {
                if m < best.1 { (e, m) } else { best }
            },
        )
        .0;
    Calibration {
        prior,
        exponent,
        val_mae,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refine::Between;

    /// The calibrated update on a hand-made case: k = 3 over 0..6 (midpoints 1, 3, 5), prior
    /// π = [.5, .25, .25], τ = 1. A start at g = 0 from prompt [.2, .3, .5] with probe output
    /// [.5, .25, .25] equal to π carries no evidence: the posterior is the prompt's, 3.6.
    #[test]
    fn the_calibrated_filter_matches_a_direct_computation() {
        let f = Filter::new(Bins::new(3, 6).unwrap(), 2, Between::CountDown);
        let prior = [0.5, 0.25, 0.25];
        let cal = f.clone().with_likelihood(&prior, 1.0);
        let mut st = None;
        let probe = [0.5f32, 0.25, 0.25];
        let prompt = [0.2f32, 0.3, 0.5];
        let out = RowOutputs {
            prompt: Some(&prompt),
            probe: Some(&probe),
        };
        let e0 = schedule::apply(&mut st, &cal, 0, 100, out);
        assert!((e0 - 3.6).abs() < 1e-6, "{e0}");
        // Uncalibrated, the same rows count π twice: [.1, .075, .125]/.3 → 3.1667.
        let mut raw = None;
        let r0 = schedule::apply(&mut raw, &f, 0, 100, out);
        assert!((r0 - (0.1 + 0.225 + 0.625) / 0.3).abs() < 1e-6, "{r0}");
        // Two tokens later a refresh with c = [.1, .6, .3]: prior q·T² from q = [.2,.3,.5]
        // (T² = [[1,0,0],[.75,.25,0],[.25,.5,.25]]) is [.55, .325, .125]; times c/π =
        // [.2, 2.4, 1.2]: [.11, .78, .15] / 1.04. The estimate reads it out (1, 3, 5).
        let c = [0.1f32, 0.6, 0.3];
        let e2 = schedule::apply(
            &mut st,
            &cal,
            2,
            100,
            RowOutputs {
                prompt: None,
                probe: Some(&c),
            },
        );
        let want = (0.11 * 1.0 + 0.78 * 3.0 + 0.15 * 5.0) / 1.04;
        assert!((e2 - want).abs() < 1e-6, "{e2} vs {want}");
        // Tempered, τ = ½: weights π^(−½) = [√2, 2, 2].
        let half = f.clone().with_likelihood(&prior, 0.5);
        let w = half.likelihood_weights().unwrap();
        assert!((w[0] - 2f64.sqrt()).abs() < 1e-12 && (w[1] - 2.0).abs() < 1e-12);
        // τ = 0 is the paper's update exactly.
        assert!(
            f.with_likelihood(&prior, 0.0)
                .likelihood_weights()
                .is_none()
        );
    }

    #[test]
    fn fitting_keeps_the_exponent_with_the_lowest_validation_mae() {
        let f = Filter::new(Bins::new(3, 6).unwrap(), 1, Between::CountDown);
        let prior = vec![0.8, 0.1, 0.1];
        // The probe always says "like the prior" and the answers are long (5 at g = 0): the
        // uncalibrated filter is pulled to bin 0, the calibrated one is not.
        let tracks = vec![Track {
            prompt: vec![0.1, 0.1, 0.8],
            rows: vec![
                (0, vec![0.8, 0.1, 0.1], 5),
                (1, vec![0.8, 0.1, 0.1], 4),
                (2, vec![0.8, 0.1, 0.1], 3),
            ],
            cap: 100,
        }];
        let cal = fit_exponent(&f, prior.clone(), &tracks);
        assert_eq!(cal.val_mae.len(), EXPONENTS.len());
        assert_eq!(cal.exponent, 1.0, "{:?}", cal.val_mae);
        assert!(cal.val_mae[4].1 < cal.val_mae[0].1);
        // Label frequencies with add-one smoothing, the cap class where a target fills its room.
        let b = Bins::new(3, 6).unwrap().with_cap_class();
        let freq = label_frequencies(&b, &[0, 1, 5, 6], &[6, 6, 6, 6], &[0, 1, 2, 3]);
        assert_eq!(freq, vec![3.0 / 8.0, 1.0 / 8.0, 2.0 / 8.0, 2.0 / 8.0]);
    }
}
