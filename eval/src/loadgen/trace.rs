//! `trace.jsonl`: one request a line (`arrival_s`, `prompt`, optional `output_tokens`,
//! `max_tokens`, `request_id` and `prompt_tokens`), written by `trail eval latency` and replayed
//! by the simulator; and the seeded arrival processes that make traces.

use std::io::{BufRead, Write};
use std::path::Path;

use rand::SeedableRng;
use rand_distr::{Distribution, Exp, Gamma};
use serde::{Deserialize, Serialize};

use crate::Error;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Seconds from the start of the run.
    pub arrival_s: f64,
    pub prompt: String,
    /// The profiled output length, when the run fixes lengths: **evaluation only**. The request
    /// ends after exactly this many tokens; only the engine's stop rule and the `oracle` policy
    /// see it (`eval_output_tokens` over HTTP), never a predictor or another policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u32>,
    /// The client's cap on generated tokens (`max_tokens`), what predictors clamp to and
    /// policies see. Never defaulted from `output_tokens`; absent, the backend's cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Prompt tokens after the chat template, when known (what the simulator prefills; without
    /// it, the text's length is an estimate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
}

impl TraceRequest {
    pub fn new(arrival_s: f64, prompt: String, output_tokens: Option<u32>) -> Self {
        Self {
            arrival_s,
            prompt,
            output_tokens,
            max_tokens: None,
            request_id: None,
            prompt_tokens: None,
        }
    }

    /// Prompt tokens a simulator prefills for this request: `prompt_tokens` where the trace has
    /// it, else the text's characters over `chars_per_token`, rounded up (an estimate that misses
    /// the chat template); at least 1.
    pub fn prompt_len(&self, chars_per_token: f64) -> usize {
        match self.prompt_tokens {
            Some(n) => (n as usize).max(1),
            None => ((self.prompt.chars().count() as f64 / chars_per_token).ceil() as usize).max(1),
        }
    }
}

/// An arrival process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Poisson arrivals: exponential gaps with mean `1 / rate` (requests per second).
    Poisson { rate: f64 },
    /// Evenly spaced arrivals, `rate` per second.
    Constant { rate: f64 },
    /// Gamma-distributed gaps with mean `1 / rate` and shape `burstiness`, as vLLM's
    /// `benchmark_serving.py --burstiness`: the gaps' coefficient of variation is
    /// 1 / √burstiness, so below 1 arrivals come in bursts, above 1 more evenly than Poisson.
    Gamma { rate: f64, burstiness: f64 },
}

impl Arrivals {
    /// `--burstiness` at `rate`: Poisson at 1 (the same times as [`Arrivals::Poisson`], so a
    /// Poisson trace stays what it was), gamma gaps otherwise.
    pub fn with_burstiness(rate: f64, burstiness: f64) -> Result<Self, Error> {
        if !burstiness.is_finite() || burstiness <= 0.0 {
            return Err(Error::BadParameter(format!(
                "burstiness must be a positive number (1: Poisson), got {burstiness}"
            )));
        }
        Ok(if burstiness == 1.0 {
            Arrivals::Poisson { rate }
        } else {
            Arrivals::Gamma { rate, burstiness }
        })
    }

    /// The first `n` arrival times, starting at the first gap after 0. Same seed, same times on
    /// any machine (ChaCha8, a portable generator).
    pub fn times(&self, n: usize, seed: u64) -> Result<Vec<f64>, Error> {
        let rate = match *self {
            Arrivals::Poisson { rate }
            | Arrivals::Constant { rate }
            | Arrivals::Gamma { rate, .. } => rate,
        };
        if !rate.is_finite() || rate <= 0.0 {
            return Err(Error::BadParameter(format!(
                "arrival rate must be a positive number of requests per second, got {rate}"
            )));
        }
        Ok(match *self {
            Arrivals::Poisson { rate } => {
                cumulative(Exp::new(rate).expect("checked positive"), n, seed)
            }
            Arrivals::Constant { rate } => (1..=n).map(|i| i as f64 / rate).collect(),
            Arrivals::Gamma { rate, burstiness } => {
                let gamma = Gamma::new(burstiness, 1.0 / (rate * burstiness))
                    .map_err(|e| Error::BadParameter(format!("burstiness {burstiness}: {e}")))?;
                cumulative(gamma, n, seed)
            }
        })
    }
}

/// `n` arrival times whose gaps are drawn from `gaps` with the seed's ChaCha8 stream.
fn cumulative(gaps: impl Distribution<f64>, n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += gaps.sample(&mut rng);
            t
        })
        .collect()
}

/// Writes a trace atomically (`trail_fs`).
pub fn write_trace(path: &Path, trace: &[TraceRequest]) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = trail_fs::AtomicFile::create(path)?;
    {
        let mut w = std::io::BufWriter::new(&mut tmp);
        for r in trace {
            serde_json::to_writer(&mut w, r).map_err(|e| io(e.into()))?;
            w.write_all(b"\n").map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    Ok(tmp.commit()?)
}

/// Reads a trace; a bad line is an error naming the file and line.
pub fn read_trace(path: &Path) -> Result<Vec<TraceRequest>, Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let req: TraceRequest = serde_json::from_str(&line)
            .map_err(|e| Error::BadParameter(format!("{}:{}: {e}", path.display(), i + 1)))?;
        if !req.arrival_s.is_finite() || req.arrival_s < 0.0 {
            return Err(Error::BadParameter(format!(
                "{}:{}: arrival_s must be a finite number ≥ 0",
                path.display(),
                i + 1
            )));
        }
        out.push(req);
    }
    if out.is_empty() {
        return Err(Error::BadParameter(format!(
            "{}: empty trace",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    /// Gamma gaps keep the rate and have the coefficient of variation 1 / √burstiness; at 1 the
    /// times are exactly Poisson's; a non-positive burstiness is refused.
    #[test]
    fn burstiness_sets_the_gaps_variation_at_the_same_rate() {
        let (n, rate) = (40_000, 2.0);
        for burstiness in [0.25, 4.0] {
            let t = Arrivals::with_burstiness(rate, burstiness)
                .unwrap()
                .times(n, 3)
                .unwrap();
            let gaps: Vec<f64> = std::iter::once(t[0])
                .chain(t.windows(2).map(|w| w[1] - w[0]))
                .collect();
            let mean = gaps.iter().sum::<f64>() / n as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
            let cv = var.sqrt() / mean;
            assert!(
                (mean * rate - 1.0).abs() < 0.03,
                "{burstiness}: mean gap {mean}"
            );
            let want = 1.0 / burstiness.sqrt();
            assert!(
                (cv / want - 1.0).abs() < 0.05,
                "{burstiness}: cv {cv}, want {want}"
            );
        }
        assert_eq!(
            Arrivals::with_burstiness(rate, 1.0)
                .unwrap()
                .times(50, 7)
                .unwrap(),
            Arrivals::Poisson { rate }.times(50, 7).unwrap()
        );
        for bad in [0.0, -1.0, f64::NAN] {
            assert!(Arrivals::with_burstiness(rate, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn poisson_times_follow_the_exponential_law() {
        let n = 20_000;
        let rate = 4.0;
        let t = Arrivals::Poisson { rate }.times(n, 1).unwrap();
        assert!(t.windows(2).all(|w| w[1] > w[0]));
        let mut gaps: Vec<f64> = std::iter::once(t[0])
            .chain(t.windows(2).map(|w| w[1] - w[0]))
            .collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean * rate - 1.0).abs() < 0.03, "mean gap {mean}");
        // Kolmogorov–Smirnov against Exp(rate), 1 % critical value.
        gaps.sort_by(f64::total_cmp);
        let d = gaps
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let f = 1.0 - (-rate * g).exp();
                (f - i as f64 / n as f64)
                    .abs()
                    .max(((i + 1) as f64 / n as f64 - f).abs())
            })
            .fold(0.0, f64::max);
        assert!(d < 1.63 / (n as f64).sqrt(), "KS distance {d}");
        // Same seed, same times; another seed, other times.
        assert_eq!(t, Arrivals::Poisson { rate }.times(n, 1).unwrap());
        assert_ne!(t, Arrivals::Poisson { rate }.times(n, 2).unwrap());
    }

    #[test]
    fn bad_rates_and_bad_lines_are_named() {
        assert!(Arrivals::Poisson { rate: 0.0 }.times(3, 0).is_err());
        assert!(Arrivals::Constant { rate: f64::NAN }.times(3, 0).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        std::fs::write(&path, "{\"arrival_s\": 0.5, \"prompt\": \"a\"}\nnot json\n").unwrap();
        let err = read_trace(&path).unwrap_err().to_string();
        assert!(err.contains("trace.jsonl:2"), "{err}");
        std::fs::write(&path, "").unwrap();
        assert!(read_trace(&path).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn traces_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t/trace.jsonl");
        let trace = vec![
            TraceRequest::new(0.25, "hello".into(), Some(12)),
            TraceRequest::new(1.5, "wörld \"quoted\"".into(), None),
        ];
        write_trace(&path, &trace).unwrap();
        assert_eq!(read_trace(&path).unwrap(), trace);
    }

    #[test]
    fn prompt_length_is_the_known_count_or_an_estimate() {
        let mut r = TraceRequest::new(0.0, "wörld".into(), None);
        assert_eq!(r.prompt_len(4.0), 2); // 5 characters, not 6 bytes
        assert_eq!(r.prompt_len(100.0), 1);
        r.prompt_tokens = Some(37);
        assert_eq!(r.prompt_len(4.0), 37);
        r.prompt_tokens = Some(0);
        assert_eq!(r.prompt_len(4.0), 1);
    }
}
