//! The filter schedule that a server runs and that `trail report` / `trail eval mae` score: which
//! hidden state belongs to which count of generated tokens, when the filter starts and when it
//! refreshes, and the probe's forward one row at a time. The serving engine and the scorer both
//! call [`need`] and [`apply`], so what is scored is what is served.
//!
//! # Row `g`
//! The state of row `g` is the residual stream of the newest input token after `g` generated
//! tokens were fed: `g = 0` is the last prompt token (the prefill), `g = 1` the first generated
//! token, and so on. The forward step that computes row `g` is the one that samples token
//! `g + 1`; a dump (`trail generate`) stores row `g` with `n − g` tokens still to come. An
//! estimate *at row g* is an estimate of those `n − g` tokens.
//!
//! # The schedule
//! - Row 0 (the prefill): the filter starts from the prompt predictor's distribution (uniform
//!   without one) and is refreshed at once (`s = 0`) with the probe on row 0, so both
//!   predictors of the same prefill step are used.
//! - Row `g > 0`: the filter refreshes with the probe on row `g` when `interval` tokens have
//!   passed since the last refresh, and counts down in between.
//!
//! The engine applies row `g` in the step that samples token `g + 1`, then counts the new token
//! ([`RefineState::advance`]) before it hands the scheduler its estimate.

use crate::Result;
use crate::probe::Probe;
use crate::refine::{Filter, RefineState};

/// What the filter needs to apply a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the estimate counts down.
    Nothing,
    /// The probe's output on the row (a refresh).
    Probe,
    /// The first row: the prompt predictor's output (where there is one) and the probe's.
    Start,
}

/// What `state` needs at row `g`.
pub fn need(state: Option<&RefineState>, filter: &Filter, g: u32) -> Need {
    match state {
        None => Need::Start,
        Some(st) => {
            let since = st.since() + g.saturating_sub(st.generated());
            if since >= filter.interval() {
                Need::Probe
            } else {
                Need::Nothing
            }
        }
    }
}

/// The outputs [`need`] asked for, as bin probabilities.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowOutputs<'a> {
    /// The prompt predictor's (a start only; `None` without a prompt predictor).
    pub prompt: Option<&'a [f32]>,
    /// The probe's on the row (a start or a refresh).
    pub probe: Option<&'a [f32]>,
}

/// Applies row `g` to `state` with the outputs [`need`] asked for and returns the estimate at
/// row `g` (the tokens still to come after `g`), clamped to `[0, cap − g]`. `cap` is the
/// request's cap on generated tokens as its client sent it.
///
/// # Panics
/// When an output [`need`] asked for is missing.
pub fn apply(
    state: &mut Option<RefineState>,
    filter: &Filter,
    g: u32,
    cap: u32,
    outputs: RowOutputs<'_>,
) -> f64 {
    let st = match state {
        None => {
            let k = filter.bins().k();
            let uniform = vec![1.0f32; k];
            let first = outputs.prompt.unwrap_or(&uniform);
            let mut st = RefineState::new(filter, first, cap);
            st.advance(g);
            st.refine(
                filter,
                outputs.probe.expect("a start needs the probe's output"),
            );
            st.set_initial_to_estimate();
            state.insert(st)
        }
        Some(st) => {
            let due = need(Some(st), filter, g) == Need::Probe;
            st.advance(g.saturating_sub(st.generated()));
            if due {
                st.refine(
                    filter,
                    outputs.probe.expect("a refresh needs the probe's output"),
                );
            }
            st
        }
    };
    st.remaining(filter)
}

/// Bin probabilities of `probe` for n rows of `d` features (n×d), computed one row at a time:
/// the matmul's blocking, and so its rounding, may vary with the number of rows, and a request's
/// probabilities must not depend on which other rows share its batch. The engine and the scorer
/// both call this, so they agree to the bit.
pub fn probe_rows(probe: &Probe, features: &[f32]) -> Result<Vec<f32>> {
    let d = probe.dim();
    if d == 0 || !features.len().is_multiple_of(d) {
        return Err(crate::Error::Invalid(format!(
            "{} features are not rows of {d}",
            features.len()
        )));
    }
    let mut out = Vec::with_capacity(features.len() / d * probe.k());
    for row in features.chunks(d) {
        out.extend(probe.predict_proba(row)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bins;
    use crate::refine::Between;

    /// k = 3 over 0..6 (midpoints 1, 3, 5), refresh every 2 tokens.
    fn small() -> Filter {
        Filter::new(Bins::new(3, 6).unwrap(), 2, Between::CountDown)
    }

    #[test]
    fn the_start_combines_both_predictors_of_the_prefill() {
        let f = small();
        let mut st = None;
        assert_eq!(need(None, &f, 0), Need::Start);
        let prompt = [0.2f32, 0.3, 0.5];
        let probe = [0.5f32, 0.25, 0.25];
        let est = apply(
            &mut st,
            &f,
            0,
            100,
            RowOutputs {
                prompt: Some(&prompt),
                probe: Some(&probe),
            },
        );
        // prompt ⊙ probe = [.1, .075, .125] / .3 → expectation (0.1 + 0.225 + 0.625) / 0.3.
        let want = (0.1 * 1.0 + 0.075 * 3.0 + 0.125 * 5.0) / 0.3;
        assert!((est - want).abs() < 1e-6, "{est} vs {want}");
        let s = st.as_ref().unwrap();
        assert!(
            (s.initial() - want).abs() < 1e-6,
            "the initial is the served start"
        );
    }

    #[test]
    fn refreshes_come_every_interval_rows_and_count_down_between() {
        let f = small();
        let mut st = None;
        let probe = [0.0f32, 1.0, 0.0];
        let start = RowOutputs {
            prompt: None,
            probe: Some(&probe),
        };
        let e0 = apply(&mut st, &f, 0, 100, start);
        // Rows 1 (count down), 2 (refresh), 3 (count down), as the engine walks them.
        assert_eq!(need(st.as_ref(), &f, 1), Need::Nothing);
        let e1 = apply(&mut st, &f, 1, 100, RowOutputs::default());
        assert!((e1 - (e0 - 1.0)).abs() < 1e-12);
        assert_eq!(need(st.as_ref(), &f, 2), Need::Probe);
        let e2 = apply(&mut st, &f, 2, 100, start);
        assert_eq!(st.as_ref().unwrap().since(), 0);
        assert!(
            e2 > e1 - 1.0,
            "a refresh on the same output lifts the count-down"
        );
        // Sparse rows (a dump every 2 tokens) reach the same states.
        let mut sparse = None;
        apply(&mut sparse, &f, 0, 100, start);
        assert_eq!(need(sparse.as_ref(), &f, 2), Need::Probe);
        let s2 = apply(&mut sparse, &f, 2, 100, start);
        assert_eq!(s2.to_bits(), e2.to_bits());
    }

    #[test]
    fn the_cap_clamps_and_a_missing_prompt_predictor_starts_uniform() {
        let f = small();
        let mut st = None;
        let probe = [0.0f32, 0.0, 1.0];
        let e = apply(
            &mut st,
            &f,
            0,
            3,
            RowOutputs {
                prompt: None,
                probe: Some(&probe),
            },
        );
        assert_eq!(e, 3.0, "clamped to the cap");
    }
}
