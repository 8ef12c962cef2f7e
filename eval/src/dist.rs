//! Job-size laws and the joint law of (true size, prediction).
//!
//! A [`Sizes`] is a law of the true job size X > 0; it may have atoms (an empirical sample, or
//! the length cap of [`CappedMixture`], where about a quarter of SmolLM2's Alpaca answers stop).
//! [`Predictions`] says how the prediction Y is drawn given X, and [`Joint`] is either such a
//! model or an empirical sample of (size, prediction) pairs from a run.

use rand::Rng;
use rand_distr::{Distribution as _, StandardNormal};

use crate::Error;

/// Standard normal cdf Φ(z), accurate to double precision in both tails.
pub fn norm_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Standard normal quantile Φ⁻¹(p) for p in (0, 1): Acklam's rational approximation refined
/// by one Halley step (relative error about 1e-15).
pub fn norm_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let low = 0.024_25;
    let x = if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Halley step on Φ(x) − p.
    let e = norm_cdf(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// A log-normal body ln X ~ N(mu, sigma²) truncated to (0, cap), plus an atom at `cap`.
///
/// This is the shape of generation lengths under a `max_new_tokens` cap: answers that would
/// have run past the cap all stop at exactly `cap` tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CappedMixture {
    pub cap: f64,
    /// Probability of the atom at `cap`.
    pub p_cap: f64,
    pub mu: f64,
    pub sigma: f64,
}

impl CappedMixture {
    pub fn new(cap: f64, p_cap: f64, mu: f64, sigma: f64) -> Result<Self, Error> {
        check_finite("cap", cap)?;
        check_finite("mu", mu)?;
        check_finite("sigma", sigma)?;
        if cap <= 0.0 || sigma <= 0.0 || !(0.0..1.0).contains(&p_cap) {
            return Err(Error::BadParameter(format!(
                "capped mixture needs cap > 0, sigma > 0, 0 <= p_cap < 1 (cap={cap}, sigma={sigma}, p_cap={p_cap})"
            )));
        }
        Ok(Self {
            cap,
            p_cap,
            mu,
            sigma,
        })
    }

    /// The censored log-normal min(L, cap) with L ~ LogNormal(ln median, sigma), sigma chosen so
    /// that P(L ≥ cap) = p_cap: median `median` and a fraction `p_cap` of jobs at the cap.
    pub fn censored(median: f64, p_cap: f64, cap: f64) -> Result<Self, Error> {
        if !(median > 0.0 && median < cap && p_cap > 0.0 && p_cap < 0.5) {
            return Err(Error::BadParameter(format!(
                "censored log-normal needs 0 < median < cap and 0 < p_cap < 0.5 (median={median}, cap={cap}, p_cap={p_cap})"
            )));
        }
        let sigma = (cap / median).ln() / norm_quantile(1.0 - p_cap);
        Self::new(cap, p_cap, median.ln(), sigma)
    }

    /// A law resembling SmolLM2-135M's answers to Alpaca prompts with a 512-token cap: median
    /// 92 tokens, 27 % at exactly 512, mean ≈ 205 (the measured mean is 208; a log-normal body
    /// with this median and atom cannot reach a higher mean).
    pub fn alpaca_like() -> Self {
        Self::censored(92.0, 0.27, 512.0).expect("valid constants")
    }

    /// P(body ≤ cap) before truncation.
    fn body_mass(&self) -> f64 {
        norm_cdf((self.cap.ln() - self.mu) / self.sigma)
    }

    /// E[Bᵏ 1{B ≤ r}] for the truncated body B, r in [0, cap].
    fn body_partial(&self, k: i32, r: f64) -> f64 {
        if r <= 0.0 {
            return 0.0;
        }
        let r = r.min(self.cap);
        let kf = f64::from(k);
        let s2 = self.sigma * self.sigma;
        (kf * self.mu + kf * kf * s2 / 2.0).exp()
            * norm_cdf((r.ln() - self.mu - kf * s2) / self.sigma)
            / self.body_mass()
    }
}

/// An empirical law: a sorted sample, each value with mass 1/n.
#[derive(Debug, Clone, PartialEq)]
pub struct Empirical {
    sorted: Vec<f64>,
    /// Prefix sums of x and x² (prefix[i] = sum over the first i values).
    prefix1: Vec<f64>,
    prefix2: Vec<f64>,
}

impl Empirical {
    /// Builds the law from positive, finite sizes.
    pub fn new(mut values: Vec<f64>) -> Result<Self, Error> {
        if values.is_empty() {
            return Err(Error::EmptySample);
        }
        for &v in &values {
            check_finite("size", v)?;
            if v <= 0.0 {
                return Err(Error::BadParameter(format!("sizes must be > 0, got {v}")));
            }
        }
        values.sort_by(f64::total_cmp);
        let mut prefix1 = vec![0.0];
        let mut prefix2 = vec![0.0];
        for &v in &values {
            prefix1.push(prefix1.last().unwrap() + v);
            prefix2.push(prefix2.last().unwrap() + v * v);
        }
        Ok(Self {
            sorted: values,
            prefix1,
            prefix2,
        })
    }

    pub fn values(&self) -> &[f64] {
        &self.sorted
    }

    /// Number of values ≤ r (inclusive) or < r (strict).
    fn count(&self, r: f64, inclusive: bool) -> usize {
        if inclusive {
            self.sorted.partition_point(|&v| v <= r)
        } else {
            self.sorted.partition_point(|&v| v < r)
        }
    }
}

/// A law of true job sizes.
#[derive(Debug, Clone, PartialEq)]
pub enum Sizes {
    Exponential { mean: f64 },
    LogNormal { mu: f64, sigma: f64 },
    Capped(CappedMixture),
    Empirical(Empirical),
}

impl Sizes {
    pub fn exponential(mean: f64) -> Result<Self, Error> {
        check_finite("mean", mean)?;
        if mean <= 0.0 {
            return Err(Error::BadParameter(format!(
                "exponential mean must be > 0, got {mean}"
            )));
        }
        Ok(Self::Exponential { mean })
    }

    pub fn log_normal(mu: f64, sigma: f64) -> Result<Self, Error> {
        check_finite("mu", mu)?;
        check_finite("sigma", sigma)?;
        if sigma <= 0.0 {
            return Err(Error::BadParameter(format!(
                "log-normal sigma must be > 0, got {sigma}"
            )));
        }
        Ok(Self::LogNormal { mu, sigma })
    }

    pub fn empirical(values: Vec<f64>) -> Result<Self, Error> {
        Empirical::new(values).map(Self::Empirical)
    }

    /// A short name for reports.
    pub fn describe(&self) -> String {
        match self {
            Self::Exponential { mean } => format!("exponential(mean={mean})"),
            Self::LogNormal { mu, sigma } => format!("lognormal(mu={mu:.4}, sigma={sigma:.4})"),
            Self::Capped(m) => format!(
                "capped lognormal(cap={}, p_cap={}, mu={:.4}, sigma={:.4})",
                m.cap, m.p_cap, m.mu, m.sigma
            ),
            Self::Empirical(e) => format!("empirical(n={})", e.sorted.len()),
        }
    }

    /// E[Xᵏ 1{X ≤ r}] (`inclusive`) or E[Xᵏ 1{X < r}], for k in {0, 1, 2}. The two differ only
    /// at atoms.
    pub fn partial_moment(&self, k: i32, r: f64, inclusive: bool) -> f64 {
        if r <= 0.0 {
            return 0.0;
        }
        match self {
            Self::Exponential { mean } if r.is_infinite() => match k {
                0 => 1.0,
                1 => *mean,
                _ => 2.0 * mean * mean,
            },
            Self::Exponential { mean } => {
                let t = r / mean;
                let e = (-t).exp();
                match k {
                    0 => -(-t).exp_m1(),
                    1 => mean * (-(-t).exp_m1() - t * e),
                    _ => 2.0 * mean * mean * (-(-t).exp_m1() - e * (t + t * t / 2.0)),
                }
            }
            Self::LogNormal { mu, sigma } => {
                let kf = f64::from(k);
                (kf * mu + kf * kf * sigma * sigma / 2.0).exp()
                    * norm_cdf((r.ln() - mu - kf * sigma * sigma) / sigma)
            }
            Self::Capped(m) => {
                let body = (1.0 - m.p_cap) * m.body_partial(k, r);
                let atom = if r > m.cap || (inclusive && r == m.cap) {
                    m.p_cap * m.cap.powi(k)
                } else {
                    0.0
                };
                body + atom
            }
            Self::Empirical(e) => {
                let i = e.count(r, inclusive);
                let n = e.sorted.len() as f64;
                match k {
                    0 => i as f64 / n,
                    1 => e.prefix1[i] / n,
                    _ => e.prefix2[i] / n,
                }
            }
        }
    }

    /// E\[Xᵏ\], k in {0, 1, 2}.
    pub fn moment(&self, k: i32) -> f64 {
        self.partial_moment(k, f64::INFINITY, true)
    }

    pub fn mean(&self) -> f64 {
        self.moment(1)
    }

    /// The u-quantile, u in (0, 1) (for atoms: the smallest x with F(x) ≥ u).
    pub fn quantile(&self, u: f64) -> f64 {
        match self {
            Self::Exponential { mean } => -mean * (-u).ln_1p(),
            Self::LogNormal { mu, sigma } => (mu + sigma * norm_quantile(u)).exp(),
            Self::Capped(m) => {
                if u >= 1.0 - m.p_cap {
                    m.cap
                } else {
                    let v = u / (1.0 - m.p_cap) * m.body_mass();
                    (m.mu + m.sigma * norm_quantile(v)).exp().min(m.cap)
                }
            }
            Self::Empirical(e) => {
                let n = e.sorted.len();
                let i = ((u * n as f64).ceil() as usize).clamp(1, n) - 1;
                e.sorted[i]
            }
        }
    }

    /// Draws one size.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        match self {
            Self::Empirical(e) => e.sorted[rng.random_range(0..e.sorted.len())],
            _ => {
                // Open interval (0, 1).
                let u = (rng.random::<u64>() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
                    + 0.5 / (1u64 << 53) as f64;
                self.quantile(u)
            }
        }
    }
}

/// How a prediction Y is drawn given the true size X.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Predictions {
    /// Y = X.
    Exact,
    /// Y = X·exp(sigma·Z), Z ~ N(0, 1): multiplicative, median-unbiased log-normal error.
    LogNormal { sigma: f64 },
}

/// The joint law of (true size, prediction).
#[derive(Debug, Clone, PartialEq)]
pub enum Joint {
    Model {
        sizes: Sizes,
        predictions: Predictions,
    },
    /// An empirical sample of (size, prediction) pairs, each with mass 1/n.
    Pairs(Vec<(f64, f64)>),
}

impl Joint {
    /// A model law, validating the prediction parameters.
    pub fn model(sizes: Sizes, predictions: Predictions) -> Result<Self, Error> {
        if let Predictions::LogNormal { sigma } = predictions {
            check_finite("prediction sigma", sigma)?;
            if sigma <= 0.0 {
                return Err(Error::BadParameter(format!(
                    "prediction sigma must be > 0 (use Exact for exact predictions), got {sigma}"
                )));
            }
        }
        Ok(Self::Model { sizes, predictions })
    }

    /// An empirical law from (size, prediction) pairs: sizes > 0, predictions ≥ 0, all finite.
    pub fn pairs(pairs: Vec<(f64, f64)>) -> Result<Self, Error> {
        if pairs.is_empty() {
            return Err(Error::EmptySample);
        }
        for &(x, y) in &pairs {
            check_finite("size", x)?;
            check_finite("prediction", y)?;
            if x <= 0.0 || y < 0.0 {
                return Err(Error::BadParameter(format!(
                    "pairs need size > 0 and prediction >= 0, got ({x}, {y})"
                )));
            }
        }
        Ok(Self::Pairs(pairs))
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Model { sizes, predictions } => {
                let p = match predictions {
                    Predictions::Exact => "exact predictions".to_string(),
                    Predictions::LogNormal { sigma } => {
                        format!("predictions x·exp({sigma}·Z)")
                    }
                };
                format!("{}, {p}", sizes.describe())
            }
            Self::Pairs(p) => format!("empirical pairs(n={})", p.len()),
        }
    }

    pub fn mean_size(&self) -> f64 {
        match self {
            Self::Model { sizes, .. } => sizes.mean(),
            Self::Pairs(p) => p.iter().map(|q| q.0).sum::<f64>() / p.len() as f64,
        }
    }

    /// Draws one (size, prediction).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> (f64, f64) {
        match self {
            Self::Model { sizes, predictions } => {
                let x = sizes.sample(rng);
                let y = match predictions {
                    Predictions::Exact => x,
                    Predictions::LogNormal { sigma } => {
                        let z: f64 = StandardNormal.sample(rng);
                        x * (sigma * z).exp()
                    }
                };
                (x, y)
            }
            Self::Pairs(p) => p[rng.random_range(0..p.len())],
        }
    }
}

pub(crate) fn check_finite(what: &str, v: f64) -> Result<(), Error> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::NotFinite(what.to_string()))
    }
}
