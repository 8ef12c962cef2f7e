//! Mean response time of the M/G/1 queue (Poisson arrivals at rate λ = ρ/E\[X\]) under FCFS,
//! SRPT, SPRPT and SPRPT with limited preemption, from the joint law of (size X, prediction Y).
//!
//! # Derivation (SOAP, with atoms)
//!
//! All four policies are SOAP policies (Scully, Harchol-Balter, Scheller-Wolf 2018) whose rank
//! never increases with the attained service a: rank(a) = y − a while a ≤ c·y, and −∞ once
//! a > c·y (never preempted again). c = ∞ is SPRPT, SRPT is SPRPT with y = x, c = 0 is
//! non-preemptive shortest-predicted-job-first; FCFS has a constant rank. Ties go to the
//! earlier arrival (FCFS), in the theory and in [`crate::des`] alike.
//!
//! For a tagged job (x, r = y) SOAP gives
//!
//! E\[T(x,r)\] = λ·Σᵢ E\[Xᵢᵒˡᵈ\[r\]²\] / (2(1 − ρ₀ᵒˡᵈ\[r\])(1 − ρⁿᵉʷ\[r\])) + ∫₀ˣ da / (1 − ρⁿᵉʷ\[r_w(a)\]).
//!
//! Because ranks only fall, an *old* job (arrived earlier) is served ahead of the tagged job
//! while its rank is **≤** r (the tie goes to the older job): all of it if y' ≤ r, otherwise
//! the rest (x' − b)⁺ after it first reaches rank ≤ r at age b = min(y' − r, c·y'). A *new*
//! job preempts only with rank **<** r (the tie goes to the tagged job): all of it if y' < r,
//! nothing otherwise. Hence, with A<(r) = E[X·1{Y<r}], A≤(r) = E[X·1{Y≤r}]:
//!
//! * ρⁿᵉʷ\[r\] = λ·A<(r),  ρ₀ᵒˡᵈ\[r\] = λ·A≤(r);
//! * S(r) = E[X²·1{Y≤r}] + E[((X − min(Y−r, c·Y))⁺)²·1{Y>r}];
//! * W(r) = λ·S(r) / (2(1 − λA≤(r))(1 − λA<(r)));
//! * R(x,r) = ∫_{r−min(x,c·r)}^{r} du / (1 − λA<(u)) + (x − c·r)⁺ (for u ≤ 0, A<(u) = 0);
//! * E\[T\] = E\[W(Y) + R(X,Y)\].
//!
//! For continuous Y, A< = A≤ and this is the paper's §4.3 (c = ∞) and §4.4 (limited
//! preemption) — §4.4 checks out, for every c ≥ 0, not only c ≤ 1 (for c ≥ 1 the min is y' − r).
//! With atoms the squared denominator (1 − ρ'_r)² is wrong: it must be (1 − λA≤)(1 − λA<), and
//! the residence integrand uses strict inequality. For SRPT (y = x) this is §4.2 with
//! ρ(x−) = λE\[X·1{X<x}\]. FCFS is Pollaczek–Khinchine: λE\[X²\]/(2(1 − ρ)) + E\[X\].
//!
//! # Numerics
//!
//! * Discrete laws (empirical sizes, empirical pairs): exact sums. A<, A≤ and E[X²·1{Y≤r}] are
//!   prefix sums over the pairs sorted by Y; the second part of S(r) is an offline 2-D
//!   dominance sum over (Y, X − Y) with a Fenwick tree (O(n log n) for all distinct r); the
//!   residence integral is exact because 1/(1 − λA<(u)) is piecewise constant.
//! * Continuous or mixed sizes with exact predictions: A, S in closed form from the partial
//!   moments of the size law ([`Sizes::partial_moment`]); the outer expectation and the
//!   residence integral by globally adaptive Gauss–Kronrod quadrature, atoms added exactly.
//! * Log-normal prediction error: the joint law is replaced by a Fibonacci rank-1 lattice of
//!   [`Options::lattice_points`] equally weighted points (u₁, u₂) ↦ (F_X⁻¹(u₁), x·e^{σΦ⁻¹(u₂)})
//!   — a 2-D quasi-Monte-Carlo quadrature — and evaluated exactly as a discrete law. Atoms of X
//!   are spread over distinct Y values, as in the continuous law; the lattice error is checked
//!   in the tests by doubling the number of points.

use crate::dist::{Joint, Predictions, Sizes};
use crate::policy::Policy;
use crate::{Error, quad};

/// Numerical options.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Options {
    /// Lattice size used for log-normal prediction errors (rounded to a Fibonacci number).
    pub lattice_points: usize,
    /// Relative tolerance of the adaptive quadrature.
    pub rel_tol: f64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lattice_points: 317_811,
            rel_tol: 1e-9,
        }
    }
}

/// Checks a load ρ: finite and in (0, 1).
pub fn check_load(load: f64) -> Result<(), Error> {
    if load.is_nan() {
        return Err(Error::NotFinite("load".into()));
    }
    if load <= 0.0 || load >= 1.0 {
        return Err(Error::BadLoad(load));
    }
    Ok(())
}

/// Mean response time E\[T\] at load ρ = λE\[X\] with default [`Options`].
pub fn mean_response(joint: &Joint, policy: Policy, load: f64) -> Result<f64, Error> {
    mean_response_with(joint, policy, load, Options::default())
}

/// Mean response time E\[T\] at load ρ = λE\[X\].
pub fn mean_response_with(
    joint: &Joint,
    policy: Policy,
    load: f64,
    opts: Options,
) -> Result<f64, Error> {
    check_load(load)?;
    policy.validate()?;
    let Some(c) = policy.limit() else {
        return Ok(fcfs(joint, load));
    };
    match joint {
        Joint::Pairs(_) => Ok(atoms_mean_response(
            &Atoms::from_joint(joint, policy, opts),
            c,
            load,
        )),
        Joint::Model { sizes, predictions } => {
            let exact = policy.uses_true_size() || *predictions == Predictions::Exact;
            match (exact, sizes) {
                (true, Sizes::Empirical(_)) | (false, _) => Ok(atoms_mean_response(
                    &Atoms::from_joint(joint, policy, opts),
                    c,
                    load,
                )),
                (true, _) => Ok(quadrature_exact(sizes, c, load, opts.rel_tol)),
            }
        }
    }
}

/// Pollaczek–Khinchine.
fn fcfs(joint: &Joint, load: f64) -> f64 {
    let (m1, m2) = match joint {
        Joint::Model { sizes, .. } => (sizes.moment(1), sizes.moment(2)),
        Joint::Pairs(p) => {
            let n = p.len() as f64;
            (
                p.iter().map(|q| q.0).sum::<f64>() / n,
                p.iter().map(|q| q.0 * q.0).sum::<f64>() / n,
            )
        }
    };
    let lambda = load / m1;
    lambda * m2 / (2.0 * (1.0 - load)) + m1
}

/// A discrete joint law: (x, y, weight) with weights summing to one.
#[derive(Debug, Clone, PartialEq)]
pub struct Atoms {
    pub points: Vec<(f64, f64, f64)>,
}

impl Atoms {
    /// The discrete law the theory evaluates for `joint` under `policy` (y replaced by x for
    /// SRPT; log-normal errors on a lattice of about `opts.lattice_points` points).
    pub fn from_joint(joint: &Joint, policy: Policy, opts: Options) -> Self {
        let exact = policy.uses_true_size();
        let points = match joint {
            Joint::Pairs(p) => {
                let w = 1.0 / p.len() as f64;
                p.iter()
                    .map(|&(x, y)| (x, if exact { x } else { y }, w))
                    .collect()
            }
            Joint::Model { sizes, predictions } => match (predictions, sizes) {
                (Predictions::LogNormal { sigma }, _) if !exact => {
                    lattice(sizes, *sigma, opts.lattice_points)
                }
                (_, Sizes::Empirical(e)) => {
                    let w = 1.0 / e.values().len() as f64;
                    e.values().iter().map(|&x| (x, x, w)).collect()
                }
                (_, _) => lattice_exact(sizes, opts.lattice_points),
            },
        };
        Self { points }
    }
}

/// The largest Fibonacci pair (F_{k-1}, F_k) with F_k ≤ max(n, 89).
fn fibonacci(n: usize) -> (usize, usize) {
    let (mut a, mut b) = (34usize, 55usize);
    while a + b <= n.max(89) {
        (a, b) = (b, a + b);
    }
    (a, b)
}

/// Fibonacci lattice, shifted to cell midpoints.
fn lattice(sizes: &Sizes, sigma: f64, n: usize) -> Vec<(f64, f64, f64)> {
    let (g, m) = fibonacci(n);
    let w = 1.0 / m as f64;
    (0..m)
        .map(|i| {
            let u1 = (i as f64 + 0.5) / m as f64;
            let u2 = (((i * g) % m) as f64 + 0.5) / m as f64;
            let x = sizes.quantile(u1);
            (x, x * (sigma * crate::dist::norm_quantile(u2)).exp(), w)
        })
        .collect()
}

/// Midpoint quantile grid with y = x (used to cross-check the quadrature path in tests).
fn lattice_exact(sizes: &Sizes, n: usize) -> Vec<(f64, f64, f64)> {
    let w = 1.0 / n as f64;
    (0..n)
        .map(|i| {
            let x = sizes.quantile((i as f64 + 0.5) / n as f64);
            (x, x, w)
        })
        .collect()
}

/// A Fenwick tree of (Σw, Σw·d, Σw·d²).
struct Fenwick {
    t: Vec<[f64; 3]>,
}

impl Fenwick {
    fn new(n: usize) -> Self {
        Self {
            t: vec![[0.0; 3]; n + 1],
        }
    }
    fn add(&mut self, i: usize, v: [f64; 3]) {
        let mut i = i + 1;
        while i < self.t.len() {
            for (t, v) in self.t[i].iter_mut().zip(v) {
                *t += v;
            }
            i += i & i.wrapping_neg();
        }
    }
    /// Sum over indices < i.
    fn prefix(&self, i: usize) -> [f64; 3] {
        let mut s = [0.0; 3];
        let mut i = i;
        while i > 0 {
            for (s, t) in s.iter_mut().zip(self.t[i]) {
                *s += t;
            }
            i &= i - 1;
        }
        s
    }
}

/// E\[T\] for a discrete law at load ρ under the rank y − a (a ≤ c·y), −∞ after.
pub fn atoms_mean_response(atoms: &Atoms, c: f64, load: f64) -> f64 {
    let mut pts = atoms.points.clone();
    let total_w: f64 = pts.iter().map(|p| p.2).sum();
    for p in &mut pts {
        p.2 /= total_w;
    }
    pts.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mean: f64 = pts.iter().map(|p| p.2 * p.0).sum();
    let lambda = load / mean;

    // Distinct prediction values and cumulative sums up to and including each.
    let mut v: Vec<f64> = Vec::new();
    let mut le1: Vec<f64> = Vec::new();
    let mut le2: Vec<f64> = Vec::new();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &(x, y, w) in &pts {
        s1 += w * x;
        s2 += w * x * x;
        if v.last() == Some(&y) {
            *le1.last_mut().unwrap() = s1;
            *le2.last_mut().unwrap() = s2;
        } else {
            v.push(y);
            le1.push(s1);
            le2.push(s2);
        }
    }
    let m = v.len();
    let lt1 = |k: usize| if k == 0 { 0.0 } else { le1[k - 1] };

    // Old-job remainders: Q(r) = Σ_{y>r} w ((x − min(y − r, c·y))⁺)².
    // Queries F(y > a, d > −r) of (Σw, Σw·d, Σw·d²) with d = x − y, combined as Σw(d + r)².
    let limited = c < 1.0;
    let mut queries: Vec<(f64, f64, usize, f64)> = Vec::with_capacity(2 * m);
    for (k, &r) in v.iter().enumerate() {
        queries.push((r, r, k, 1.0));
        if limited {
            queries.push((r / (1.0 - c), r, k, -1.0));
        }
    }
    queries.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut ds: Vec<f64> = pts.iter().map(|p| p.0 - p.1).collect();
    ds.sort_by(f64::total_cmp);
    ds.dedup();
    let mut fen = Fenwick::new(ds.len());
    let mut total = [0.0; 3];
    let mut q = vec![0.0; m];
    let mut next = pts.len(); // points[next..] (largest y) are inserted
    for &(a, r, k, sign) in &queries {
        while next > 0 && pts[next - 1].1 > a {
            next -= 1;
            let (x, y, w) = pts[next];
            let d = x - y;
            let idx = ds.partition_point(|&e| e < d);
            let val = [w, w * d, w * d * d];
            fen.add(idx, val);
            for j in 0..3 {
                total[j] += val[j];
            }
        }
        let idx = ds.partition_point(|&e| e <= -r);
        let pre = fen.prefix(idx);
        let s = [total[0] - pre[0], total[1] - pre[1], total[2] - pre[2]];
        q[k] += sign * (s[2] + 2.0 * r * s[1] + r * r * s[0]);
    }
    if limited {
        // Points with y > r/(1 − c) are served past c·y before reaching rank r.
        let mut suffix = vec![0.0; pts.len() + 1];
        for i in (0..pts.len()).rev() {
            let (x, y, w) = pts[i];
            let rest = (x - c * y).max(0.0);
            suffix[i] = suffix[i + 1] + w * rest * rest;
        }
        for (k, &r) in v.iter().enumerate() {
            let t = r / (1.0 - c);
            q[k] += suffix[pts.partition_point(|p| p.1 <= t)];
        }
    }

    // H(s) = ∫₀ˢ du / (1 − λA<(u)), piecewise linear with knots at v.
    let slope = |k: usize| 1.0 / (1.0 - lambda * le1[k]);
    let mut hv = vec![0.0; m];
    hv[0] = v[0];
    for k in 1..m {
        hv[k] = hv[k - 1] + (v[k] - v[k - 1]) * slope(k - 1);
    }
    let h = |s: f64| -> f64 {
        if s <= v[0] {
            return s;
        }
        let k = v.partition_point(|&e| e < s) - 1;
        hv[k] + (s - v[k]) * slope(k)
    };

    let mut out = 0.0;
    let mut k = 0;
    for &(x, y, w) in &pts {
        while v[k] != y {
            k += 1;
        }
        let wait =
            lambda * (le2[k] + q[k]) / (2.0 * (1.0 - lambda * le1[k]) * (1.0 - lambda * lt1(k)));
        let (served, tail) = if c.is_infinite() {
            (x, 0.0)
        } else {
            (x.min(c * y), (x - c * y).max(0.0))
        };
        let resid = h(y) - h(y - served) + tail;
        out += w * (wait + resid);
    }
    out
}

/// E[T] for continuous or mixed sizes with exact predictions, by adaptive quadrature.
fn quadrature_exact(sizes: &Sizes, c: f64, load: f64, rel_tol: f64) -> f64 {
    let m2 = sizes.moment(2);
    let lambda = load / sizes.mean();
    let pm = |k: i32, r: f64, incl: bool| sizes.partial_moment(k, r, incl);
    let q = |r: f64| -> f64 {
        if c >= 1.0 {
            r * r * (1.0 - pm(0, r, true))
        } else {
            let t = r / (1.0 - c);
            r * r * (pm(0, t, true) - pm(0, r, true)) + (1.0 - c).powi(2) * (m2 - pm(2, t, true))
        }
    };
    let wait = |r: f64| -> f64 {
        lambda * (pm(2, r, true) + q(r))
            / (2.0 * (1.0 - lambda * pm(1, r, true)) * (1.0 - lambda * pm(1, r, false)))
    };
    let resid = |x: f64| -> f64 {
        let served = if c >= 1.0 { x } else { c * x };
        let inner = quad::integrate(
            |u| 1.0 / (1.0 - lambda * pm(1, u, false)),
            x - served,
            x,
            rel_tol,
            0.0,
            200,
        );
        inner + (x - c * x).max(0.0)
    };
    let g = |x: f64| wait(x) + resid(x);
    let outer =
        |f: &dyn Fn(f64) -> f64, a: f64, b: f64| quad::integrate(f, a, b, rel_tol, 0.0, 400);
    match sizes {
        Sizes::Exponential { mean } => {
            let dens = |x: f64| (-x / mean).exp() / mean * g(x);
            [0.0, 1.0, 3.0, 10.0, 45.0]
                .windows(2)
                .map(|w| outer(&dens, w[0] * mean, w[1] * mean))
                .sum()
        }
        Sizes::LogNormal { mu, sigma } => {
            let dens = |z: f64| phi(z) * g((mu + sigma * z).exp());
            outer(&dens, -10.0, 0.0) + outer(&dens, 0.0, 10.0 + 2.0 * sigma)
        }
        Sizes::Capped(cm) => {
            let zc = (cm.cap.ln() - cm.mu) / cm.sigma;
            let body_mass = crate::dist::norm_cdf(zc);
            let dens = |z: f64| phi(z) * g((cm.mu + cm.sigma * z).exp().min(cm.cap));
            let lo = (-10.0_f64).min(zc - 1.0);
            let mid = 0.0_f64.min(zc - 0.5);
            let body = outer(&dens, lo, mid) + outer(&dens, mid, zc);
            (1.0 - cm.p_cap) * body / body_mass + cm.p_cap * g(cm.cap)
        }
        Sizes::Empirical(_) => unreachable!("empirical sizes are evaluated as exact sums"),
    }
}

fn phi(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::CappedMixture;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs()
    }

    #[test]
    fn mm1_fcfs_and_srpt_match_known_values() {
        let j = Joint::model(Sizes::exponential(1.0).unwrap(), Predictions::Exact).unwrap();
        for rho in [0.3, 0.8] {
            let t = mean_response(&j, Policy::Fcfs, rho).unwrap();
            assert!(rel(t, 1.0 / (1.0 - rho)) < 1e-12);
        }
        // Schrage–Miller for exponential sizes at ρ = 0.8 (also the paper's §4.2 check).
        let t = mean_response(&j, Policy::Srpt, 0.8).unwrap();
        assert!((t - 2.3528).abs() < 1e-3, "{t}");
    }

    #[test]
    fn quadrature_agrees_with_exact_sums_on_a_fine_quantile_grid() {
        let j = Joint::model(
            Sizes::Capped(CappedMixture::alpaca_like()),
            Predictions::Exact,
        )
        .unwrap();
        let opts = Options {
            lattice_points: 100_000,
            ..Options::default()
        };
        for (policy, c) in [
            (Policy::Srpt, f64::INFINITY),
            (Policy::SprptLimited { c: 0.5 }, 0.5),
            (Policy::SjfPredicted, 0.0),
        ] {
            let quad = mean_response(&j, policy, 0.9).unwrap();
            let sums = atoms_mean_response(&Atoms::from_joint(&j, policy, opts), c, 0.9);
            assert!(rel(quad, sums) < 1e-5, "{policy:?}: {quad} vs {sums}");
        }
    }

    #[test]
    fn atoms_need_the_tie_aware_denominator() {
        // Two sizes with large atoms: SRPT by the tie-aware formula, checked by hand.
        // X = 1 or 3 with probability 1/2, λ = ρ/2.
        let j = Joint::model(
            Sizes::empirical(vec![1.0, 3.0]).unwrap(),
            Predictions::Exact,
        )
        .unwrap();
        let rho: f64 = 0.6;
        let l = rho / 2.0;
        // x = 1: old ahead = sizes ≤ 1 in full + r² for larger jobs; new preempting: sizes < 1.
        let w1 = l * (0.5 * 1.0 + 0.5 * 1.0) / (2.0 * (1.0 - l * 0.5) * 1.0);
        let r1 = 1.0;
        // x = 3: all old jobs in full; new jobs of size 1 preempt.
        let w3 = l * (0.5 * 1.0 + 0.5 * 9.0) / (2.0 * (1.0 - rho) * (1.0 - l * 0.5));
        let r3 = 1.0 + 2.0 / (1.0 - l * 0.5);
        let expect = 0.5 * (w1 + r1) + 0.5 * (w3 + r3);
        let t = mean_response(&j, Policy::Srpt, rho).unwrap();
        assert!(rel(t, expect) < 1e-12, "{t} vs {expect}");
    }

    #[test]
    fn limited_preemption_spans_sjf_to_sprpt() {
        let j = Joint::model(
            Sizes::exponential(1.0).unwrap(),
            Predictions::LogNormal { sigma: 0.8 },
        )
        .unwrap();
        let opts = Options {
            lattice_points: 50_000,
            ..Options::default()
        };
        let at = |p| mean_response_with(&j, p, 0.8, opts).unwrap();
        let sprpt = at(Policy::Sprpt);
        // With predictions below the truth, c > 1 still limits preemption; c huge = SPRPT.
        assert!(rel(at(Policy::SprptLimited { c: 1e9 }), sprpt) < 1e-12);
        assert_eq!(
            at(Policy::SprptLimited { c: 0.0 }),
            at(Policy::SjfPredicted)
        );
        // Non-preemptive predicted SJF, the textbook form: E[λE[X²]/(2(1−ρ_<y)(1−ρ_≤y))] + E[X].
        let atoms = Atoms::from_joint(&j, Policy::SjfPredicted, opts);
        let lambda = 0.8;
        let mut pts = atoms.points.clone();
        pts.sort_by(|a, b| a.1.total_cmp(&b.1));
        let m2: f64 = pts.iter().map(|p| p.2 * p.0 * p.0).sum();
        let (mut cum, mut sjf) = (0.0, 0.0);
        for &(x, _, w) in &pts {
            let before = cum;
            cum += w * x;
            sjf += w * (lambda * m2 / (2.0 * (1.0 - lambda * before) * (1.0 - lambda * cum)) + x);
        }
        // The real mean of the lattice sizes differs from 1 slightly; compare loosely.
        assert!(
            rel(at(Policy::SjfPredicted), sjf) < 2e-3,
            "{} vs {sjf}",
            at(Policy::SjfPredicted)
        );
        // Predictions help: SRPT ≤ SPRPT ≤ c=0.5 ≤ SJF ≤ FCFS here.
        let srpt = at(Policy::Srpt);
        let mid = at(Policy::SprptLimited { c: 0.5 });
        assert!(srpt < sprpt && sprpt < mid && mid < at(Policy::SjfPredicted));
        assert!(at(Policy::SjfPredicted) < at(Policy::Fcfs));
    }

    #[test]
    fn lattice_converges() {
        let j = Joint::model(
            Sizes::Capped(CappedMixture::alpaca_like()),
            Predictions::LogNormal { sigma: 0.5 },
        )
        .unwrap();
        let a = mean_response_with(
            &j,
            Policy::Sprpt,
            0.9,
            Options {
                lattice_points: 100_000,
                ..Options::default()
            },
        )
        .unwrap();
        let b = mean_response(&j, Policy::Sprpt, 0.9).unwrap();
        assert!(rel(a, b) < 1e-3, "{a} vs {b}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        let j = Joint::model(Sizes::exponential(1.0).unwrap(), Predictions::Exact).unwrap();
        for load in [0.0, 1.0, 1.5, -0.1] {
            assert!(matches!(
                mean_response(&j, Policy::Fcfs, load),
                Err(Error::BadLoad(_))
            ));
        }
        assert!(matches!(
            mean_response(&j, Policy::Srpt, f64::NAN),
            Err(Error::NotFinite(_))
        ));
        assert!(matches!(
            mean_response(&j, Policy::SprptLimited { c: -0.5 }, 0.5),
            Err(Error::BadParameter(_))
        ));
        assert!(matches!(Sizes::empirical(vec![]), Err(Error::EmptySample)));
        assert!(matches!(Joint::pairs(vec![]), Err(Error::EmptySample)));
        assert!(matches!(
            Joint::pairs(vec![(1.0, f64::NAN)]),
            Err(Error::NotFinite(_))
        ));
        assert!(Sizes::exponential(f64::NAN).is_err());
    }
}
