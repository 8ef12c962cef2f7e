//! The Bayesian filter that refines the remaining-length distribution as tokens are generated.
//!
//! Exactly §2.3 of the paper digest (the release's `trail_predictor.py`): the state is a
//! distribution `q` over the k remaining-length bins (a row vector). One generated token moves
//! mass one bin down with probability `p = min(1, 1/width)`: `T` is k×k row-stochastic with
//! `T[0][0] = 1`, `T[i][i] = 1 − p`, `T[i][i−1] = p`. At a refresh, `s` tokens after the last
//! one, with fresh classifier output `c`:
//!
//! ```text
//! prior = q · Tˢ;   q' ∝ max(prior ⊙ c, 1e-8)   (renormalized);   L = Σ_i q'_i·m_i
//! ```
//!
//! clamped to `[0, cap − generated]`, where `cap` is the request's cap on generated tokens as its
//! client sent it (never a profiled length). When the filter starts and refreshes, and which
//! hidden state each refresh reads, is [`crate::schedule`]'s: the same for the server and the
//! scorer. Refreshes happen every `interval` tokens (the release's `PREDICT_EVERY`, 8).
//!
//! Between refreshes §2.3 says the estimate counts down by one per generated token:
//! [`Between::CountDown`] (the default) returns `L_last − s`. [`Between::Propagate`] is offered
//! as the alternative reading, the expectation under `q·Tˢ` (it decays by about `p·m` per
//! token rather than one token per token, so it lags the count-down on long outputs).
//!
//! Predictor v2 changes two things, both off for a v1 checkpoint (the paper's filter exactly):
//! - **The cap class** ([`Bins::with_cap_class`]): `T` keeps it where it is (`T[c][c] = 1`),
//!   and the estimate reads it out as the room left before the request's cap
//!   ([`Bins::readout`] with `cap − generated`).
//! - **A calibrated likelihood** ([`Filter::with_likelihood`]): the classifier's posterior `c`
//!   carries the training label prior `π` again at every refresh; the update multiplies by
//!   `c_i · π_i^(−τ)` instead of `c_i` (τ = 1 the standard correction, posterior ÷ prior; τ
//!   fitted on validation, [`crate::calibrate`]).
//!
//! `Tˢ` for `s ≤ 64` ([`CACHED_POWERS`]) is cached at construction, built by repeated products;
//! larger `s` (an interval above 64 included) is computed by squaring, so no interval, however
//! large, sizes the filter's memory. A [`RefineState`] is `k` f64 plus a few counters; a
//! refresh with a cached power costs about `k² + 3k` multiply-adds (130 for k = 10).

use crate::bins::{Bins, clamp_remaining};

/// Powers of `T` cached at construction (`T⁰..=T⁶⁴`), whatever the interval.
pub const CACHED_POWERS: usize = 64;

/// Floor applied to the unnormalized posterior (the release's clamp).
pub const POSTERIOR_FLOOR: f64 = 1e-8;

/// What the estimate is between two refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Between {
    /// The last refreshed estimate minus the tokens generated since (§2.3).
    #[default]
    CountDown,
    /// The expectation under `q·Tˢ`.
    Propagate,
}

/// Shared, immutable filter parameters: bins, `T` and its cached powers.
#[derive(Debug, Clone)]
pub struct Filter {
    bins: Bins,
    p: f64,
    interval: u32,
    between: Between,
    /// `powers[s]` = `Tˢ`, row-major k×k, for `s = 0..=cached`.
    powers: Vec<Vec<f64>>,
    /// `π_i^(−τ)` per class, when the likelihood is calibrated.
    weights: Option<Vec<f64>>,
}

impl Filter {
    /// The filter for `bins`, refreshing every `interval ≥ 1` tokens.
    pub fn new(bins: Bins, interval: u32, between: Between) -> Self {
        let k = bins.k();
        let p = (1.0 / bins.width()).min(1.0);
        let mut t = vec![0.0; k * k];
        t[0] = 1.0;
        for i in 1..bins.length_bins() {
            t[i * k + i] = 1.0 - p;
            t[i * k + i - 1] = p;
        }
        if bins.cap_class() {
            let c = bins.length_bins();
            t[c * k + c] = 1.0;
        }
        let interval = interval.max(1);
        let mut powers = Vec::with_capacity(CACHED_POWERS + 1);
        powers.push(identity(k));
        for s in 1..=CACHED_POWERS {
            let next = matmul(&powers[s - 1], &t, k);
            powers.push(next);
        }
        Self {
            bins,
            p,
            interval,
            between,
            powers,
            weights: None,
        }
    }

    /// The same filter with a calibrated likelihood: at a refresh the classifier's output `c_i`
    /// is weighted by `prior_i^(−exponent)` (`prior`: the training label frequencies, one per
    /// class, floored at [`POSTERIOR_FLOOR`]). Exponent 0 is the paper's update.
    pub fn with_likelihood(self, prior: &[f64], exponent: f64) -> Self {
        assert_eq!(prior.len(), self.bins.k(), "one prior per class");
        if exponent == 0.0 {
            return Self {
                weights: None,
                ..self
            };
        }
        let weights = prior
            .iter()
            .map(|&p| p.max(POSTERIOR_FLOOR).powf(-exponent))
            .collect();
        Self {
            weights: Some(weights),
            ..self
        }
    }

    /// `π_i^(−τ)` per class when the likelihood is calibrated.
    pub fn likelihood_weights(&self) -> Option<&[f64]> {
        self.weights.as_deref()
    }

    /// The paper's filter: 10 bins over 0..512, refresh every 8 tokens, count down between.
    pub fn paper() -> Self {
        Self::new(Bins::default(), 8, Between::CountDown)
    }

    pub fn bins(&self) -> Bins {
        self.bins
    }

    /// Probability that one token moves mass one bin down.
    pub fn p(&self) -> f64 {
        self.p
    }

    pub fn interval(&self) -> u32 {
        self.interval
    }

    pub fn between(&self) -> Between {
        self.between
    }

    /// `T` (row-major k×k).
    pub fn transition(&self) -> &[f64] {
        &self.powers[1]
    }

    /// `Tˢ` (row-major k×k): cached for small `s`, by squaring otherwise.
    pub fn power(&self, s: u32) -> std::borrow::Cow<'_, [f64]> {
        let k = self.bins.k();
        if let Some(m) = self.powers.get(s as usize) {
            return std::borrow::Cow::Borrowed(m);
        }
        let mut result = identity(k);
        let mut base = self.powers[1].clone();
        let mut e = s;
        while e > 0 {
            if e & 1 == 1 {
                result = matmul(&result, &base, k);
            }
            e >>= 1;
            if e > 0 {
                base = matmul(&base, &base, k);
            }
        }
        std::borrow::Cow::Owned(result)
    }

    /// `q·Tˢ`.
    pub fn predict(&self, q: &[f64], s: u32) -> Vec<f64> {
        let k = self.bins.k();
        let m = self.power(s);
        let mut out = vec![0.0; k];
        for (i, &qi) in q.iter().enumerate() {
            if qi == 0.0 {
                continue;
            }
            let row = &m[i * k..(i + 1) * k];
            for (o, &t) in out.iter_mut().zip(row) {
                *o += qi * t;
            }
        }
        out
    }

    /// One Bayesian update: `max(q·Tˢ ⊙ c, 1e-8)`, renormalized; with a calibrated likelihood
    /// `max(q·Tˢ ⊙ c ⊙ π^(−τ), 1e-8)`.
    pub fn posterior<C: Copy + Into<f64>>(&self, q: &[f64], s: u32, classifier: &[C]) -> Vec<f64> {
        let mut post = self.predict(q, s);
        match &self.weights {
            None => {
                for (x, &c) in post.iter_mut().zip(classifier) {
                    *x = (*x * c.into()).max(POSTERIOR_FLOOR);
                }
            }
            Some(w) => {
                for ((x, &c), &w) in post.iter_mut().zip(classifier).zip(w) {
                    *x = (*x * c.into() * w).max(POSTERIOR_FLOOR);
                }
            }
        }
        let z: f64 = post.iter().sum();
        for x in &mut post {
            *x /= z;
        }
        post
    }
}

/// Per-request filter state, held by the serving engine.
#[derive(Debug, Clone)]
pub struct RefineState {
    q: Vec<f64>,
    since: u32,
    generated: u32,
    max_new: u32,
    /// Expectation of `q` at the last refresh (unclamped).
    estimate: f64,
    /// The first estimate of the total length, the base for the preemption limit.
    initial: f64,
}

impl RefineState {
    /// Start from the prompt predictor's bin probabilities (normalized here).
    pub fn new<C: Copy + Into<f64>>(filter: &Filter, prompt_probs: &[C], max_new: u32) -> Self {
        let mut q: Vec<f64> = prompt_probs
            .iter()
            .map(|&c| c.into().max(POSTERIOR_FLOOR))
            .collect();
        assert_eq!(q.len(), filter.bins.k(), "prompt_probs must have k entries");
        let z: f64 = q.iter().sum();
        for x in &mut q {
            *x /= z;
        }
        let estimate = filter.bins.readout(&q, f64::from(max_new));
        Self {
            q,
            since: 0,
            generated: 0,
            max_new,
            estimate,
            initial: estimate,
        }
    }

    /// Record `n` generated tokens.
    pub fn advance(&mut self, n: u32) {
        self.since += n;
        self.generated += n;
    }

    /// Whether a refresh is due (`interval` tokens since the last one).
    pub fn due(&self, filter: &Filter) -> bool {
        self.since >= filter.interval
    }

    /// Refresh with the classifier's bin probabilities for the newest token.
    pub fn refine<C: Copy + Into<f64>>(&mut self, filter: &Filter, classifier: &[C]) {
        self.q = filter.posterior(&self.q, self.since, classifier);
        self.since = 0;
        self.estimate = filter.bins.readout(&self.q, self.room());
    }

    /// The current remaining-length estimate, clamped to `[0, max_new − generated]`.
    pub fn remaining(&self, filter: &Filter) -> f64 {
        let raw = match filter.between {
            Between::CountDown => self.estimate - self.since as f64,
            Between::Propagate => filter
                .bins
                .readout(&filter.predict(&self.q, self.since), self.room()),
        };
        clamp_remaining(raw, self.generated, self.max_new)
    }

    /// Tokens left before the request's cap: what the cap class reads out.
    fn room(&self) -> f64 {
        f64::from(self.max_new.saturating_sub(self.generated))
    }

    /// The first estimate of the total length, unclamped: the expectation of the distribution
    /// the state started from, or the served start's (see [`crate::schedule::apply`]).
    pub fn initial(&self) -> f64 {
        self.initial
    }

    /// Makes the current estimate (plus the tokens generated) the initial total.
    pub(crate) fn set_initial_to_estimate(&mut self) {
        self.initial = f64::from(self.generated) + self.estimate;
    }

    /// The posterior at the last refresh.
    pub fn posterior(&self) -> &[f64] {
        &self.q
    }

    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Tokens since the last refresh.
    pub fn since(&self) -> u32 {
        self.since
    }
}

fn identity(k: usize) -> Vec<f64> {
    let mut m = vec![0.0; k * k];
    for i in 0..k {
        m[i * k + i] = 1.0;
    }
    m
}

fn matmul(a: &[f64], b: &[f64], k: usize) -> Vec<f64> {
    let mut c = vec![0.0; k * k];
    for i in 0..k {
        for l in 0..k {
            let x = a[i * k + l];
            if x == 0.0 {
                continue;
            }
            for j in 0..k {
                c[i * k + j] += x * b[l * k + j];
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// k = 3 over 0..6: width 2, p = 1/2, midpoints 1, 3, 5.
    /// T = [[1, 0, 0], [.5, .5, 0], [0, .5, .5]].
    fn small() -> Filter {
        Filter::new(Bins::new(3, 6).unwrap(), 2, Between::CountDown)
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn transition_matrix() {
        let f = Filter::paper();
        assert!((f.p() - 1.0 / 51.2).abs() < 1e-15);
        let t = small();
        assert_eq!(
            t.transition(),
            &[1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5]
        );
    }

    #[test]
    fn posterior_by_hand_one_step() {
        let f = small();
        // q = [.2, .3, .5]; q·T = [.2 + .15, .15 + .25, .25] = [.35, .40, .25].
        let q = [0.2, 0.3, 0.5];
        assert!(close(&f.predict(&q, 1), &[0.35, 0.40, 0.25], 1e-15));
        // c = [.1, .6, .3]: prior ⊙ c = [.035, .24, .075], sum .35
        // → [.1, 24/35, 3/14]; expectation .1·1 + 24/35·3 + 3/14·5 = 3.228571…
        let post = f.posterior(&q, 1, &[0.1f32, 0.6, 0.3]);
        // c is f32: compare at f32 precision.
        assert!(
            close(&post, &[0.1, 24.0 / 35.0, 3.0 / 14.0], 1e-7),
            "{post:?}"
        );
        let e = f.bins().expectation(&post);
        assert!((e - (0.1 + 72.0 / 35.0 + 15.0 / 14.0)).abs() < 1e-6);
    }

    #[test]
    fn posterior_by_hand_two_steps_and_floor() {
        let f = small();
        // T² = [[1,0,0],[.75,.25,0],[.25,.5,.25]]; q·T² with q = [.2,.3,.5]:
        // [.2 + .225 + .125, .075 + .25, .125] = [.55, .325, .125].
        assert!(close(
            f.power(2).as_ref(),
            &[1.0, 0.0, 0.0, 0.75, 0.25, 0.0, 0.25, 0.5, 0.25],
            1e-15
        ));
        let q = [0.2, 0.3, 0.5];
        assert!(close(&f.predict(&q, 2), &[0.55, 0.325, 0.125], 1e-15));
        // c = [0, 1, 0]: prior ⊙ c = [0, .325, 0] → floor → [1e-8, .325, 1e-8] / (.325 + 2e-8).
        let post = f.posterior(&q, 2, &[0.0f64, 1.0, 0.0]);
        let z = 0.325 + 2e-8;
        assert!(
            close(&post, &[1e-8 / z, 0.325 / z, 1e-8 / z], 1e-18),
            "{post:?}"
        );
    }

    /// The cap class stays where it is under `T` and reads out the room left before the
    /// request's own cap: q = [0, 0, 0, 1] over k = 3 length bins (0..6) and the cap class.
    #[test]
    fn the_cap_class_is_kept_by_the_transition_and_reads_out_the_room() {
        let f = Filter::new(
            Bins::new(3, 6).unwrap().with_cap_class(),
            2,
            Between::CountDown,
        );
        let t = f.transition();
        assert_eq!(&t[12..16], &[0.0, 0.0, 0.0, 1.0], "cap row: identity");
        assert_eq!(
            &t[8..12],
            &[0.0, 0.5, 0.5, 0.0],
            "length bins drain as before"
        );
        assert_eq!(
            f.predict(&[0.0, 0.0, 0.0, 1.0], 50),
            vec![0.0, 0.0, 0.0, 1.0]
        );
        // Half the mass runs to a cap of 40, half in bin 0 (midpoint 1): 20.5 at g = 0.
        let mut st = RefineState::new(&f, &[0.5f64, 0.0, 0.0, 0.5], 40);
        assert!((st.remaining(&f) - 20.5).abs() < 1e-6);
        // Two tokens and a refresh that agrees: the room is 38 now.
        st.advance(2);
        st.refine(&f, &[1.0f64, 1.0, 1.0, 1.0]);
        let q = st.posterior().to_vec();
        let want = q[0] * 1.0 + q[1] * 3.0 + q[2] * 5.0 + q[3] * 38.0;
        assert!((st.remaining(&f) - want).abs() < 1e-9);
        assert!(
            (q[3] - 0.5).abs() < 1e-6,
            "the cap mass did not drain: {q:?}"
        );
        // Another client's cap of 10: the same distribution reads 5.5.
        let other = RefineState::new(&f, &[0.5f64, 0.0, 0.0, 0.5], 10);
        assert!((other.remaining(&f) - 5.5).abs() < 1e-6);
    }

    #[test]
    fn cached_powers_equal_repeated_products() {
        let f = Filter::paper();
        let k = 10;
        let t = f.transition().to_vec();
        let mut m = identity(k);
        for s in 0..=200u32 {
            let p = f.power(s);
            if s <= 64 {
                // Cached entries are built by the same repeated products: bitwise equal.
                assert_eq!(p.as_ref(), &m[..], "s = {s}");
            } else {
                // Squaring reorders the sums: equal up to rounding.
                assert!(close(p.as_ref(), &m, 1e-12), "s = {s}");
            }
            // Rows stay stochastic.
            for i in 0..k {
                let row: f64 = p[i * k..(i + 1) * k].iter().sum();
                assert!((row - 1.0).abs() < 1e-12);
            }
            m = matmul(&m, &t, k);
        }
    }

    #[test]
    fn a_huge_interval_costs_no_memory_and_squares_its_power() {
        // 4·10⁹ cached powers would be 3.2 TB; the filter holds 65 and squares the rest.
        let f = Filter::new(Bins::default(), 4_000_000_000, Between::CountDown);
        assert_eq!(f.interval(), 4_000_000_000);
        assert_eq!(f.powers.len(), CACHED_POWERS + 1);
        let p = f.power(4_000_000_000);
        // Every row has drained into bin 0: (1 − 1/51.2)^(4·10⁹) underflows.
        for i in 0..10 {
            assert!(
                (p[i * 10] - 1.0).abs() < 1e-12,
                "row {i}: {:?}",
                &p[i * 10..i * 10 + 10]
            );
        }
        let mut st = RefineState::new(&f, &[0.1f64; 10], u32::MAX);
        st.advance(1);
        assert!(!st.due(&f));
    }

    #[test]
    fn state_refreshes_and_counts_down() {
        let f = small();
        // Prompt probs [.2,.3,.5]: initial = .2 + .9 + 2.5 = 3.6.
        let mut st = RefineState::new(&f, &[0.2f64, 0.3, 0.5], 100);
        assert!((st.initial() - 3.6).abs() < 1e-12);
        assert!((st.remaining(&f) - 3.6).abs() < 1e-12);
        st.advance(1);
        assert!(!st.due(&f));
        // Count-down between refreshes.
        assert!((st.remaining(&f) - 2.6).abs() < 1e-12);
        st.advance(1);
        assert!(st.due(&f));
        st.refine(&f, &[0.0f64, 1.0, 0.0]);
        let z = 0.325 + 2e-8;
        let want = (1e-8 + 0.325 * 3.0 + 5e-8) / z;
        assert!((st.remaining(&f) - want).abs() < 1e-9);
        assert_eq!(st.since(), 0);
        assert_eq!(st.generated(), 2);
        // Clamp at max_new − g.
        let mut capped = RefineState::new(&f, &[0.0f64, 0.0, 1.0], 4);
        capped.advance(1);
        assert_eq!(capped.remaining(&f), 3.0);
        // Propagate reads q·Tˢ instead: q = [0,0,1] after one token is [0,.5,.5] → 4.
        let fp = Filter::new(Bins::new(3, 6).unwrap(), 2, Between::Propagate);
        let mut pr = RefineState::new(&fp, &[0.0f64, 0.0, 1.0], 100);
        pr.advance(1);
        assert!((pr.remaining(&fp) - 4.0).abs() < 1e-6);
    }
}
