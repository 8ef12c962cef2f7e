//! Workloads: a pool of prompts with their profiled output lengths (a generated run's test
//! split) turned into seeded traces, the requests a latency run replays.
//!
//! A trace of `n` requests at `rate` with `seed` takes its arrival times from
//! [`Arrivals::Poisson`] with that seed (or gamma gaps, [`Arrivals::Gamma`], for a bursty
//! workload), and its prompts from a seeded permutation of the pool
//! (cycled when `n` exceeds the pool; the `k`-th repeat of a request gets the id `ID#k`). The
//! prompts depend on the seed only, never on the rate, so every load of one seed replays the
//! same requests and the arrivals of two loads are the same process rescaled.
//!
//! Every request carries the client's cap (`max_tokens`, what predictors and policies see) apart
//! from its profiled length (`output_tokens`, an evaluation-only stop that only the engine's stop
//! rule and the oracle read). The cap is never taken from the profiled length, except where
//! [`Lengths::Profiled`]'s `clamp` asks for the release protocol's leak, to measure it.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::trace::{Arrivals, TraceRequest};
use crate::Error;

/// One prompt of the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub request_id: String,
    pub text: String,
    /// The output length the model produced for it when the run was generated.
    pub output_tokens: u32,
    /// Its tokens after the chat template, when known.
    pub prompt_tokens: Option<u32>,
}

/// How output lengths are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lengths {
    /// Every request generates exactly its profiled length (clipped to `clip` when given), as an
    /// evaluation-only stop. With `clamp`, its cap (`max_tokens`) is that length too: the
    /// release protocol, which lets predictors clamp to the true length (a leak; kept to measure
    /// what it was worth).
    Profiled { clip: Option<u32>, clamp: bool },
    /// The model stops where it stops (`output_tokens` left out of the trace).
    Free,
}

/// The `n` prompts of `seed`: a seeded permutation of `pool`, cycled.
pub fn sample(pool: &[Prompt], n: usize, seed: u64) -> Result<Vec<Prompt>, Error> {
    if pool.is_empty() {
        return Err(Error::EmptySample);
    }
    // Another stream than the arrivals' (same seed), so prompts and gaps are independent.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7472_6169_6c5f_7077);
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.shuffle(&mut rng);
    Ok((0..n)
        .map(|i| {
            let p = &pool[order[i % pool.len()]];
            let repeat = i / pool.len();
            let mut p = p.clone();
            if repeat > 0 {
                p.request_id = format!("{}#{repeat}", p.request_id);
            }
            p
        })
        .collect())
}

/// A trace of `n` requests with Poisson arrivals at `rate` requests per second,
/// and `max_tokens` the client's cap.
pub fn poisson_trace(
    pool: &[Prompt],
    n: usize,
    rate: f64,
    seed: u64,
    lengths: Lengths,
    max_tokens: u32,
) -> Result<Vec<TraceRequest>, Error> {
    arrivals_trace(
        pool,
        n,
        Arrivals::Poisson { rate },
        seed,
        lengths,
        max_tokens,
    )
}

/// A trace of `n` requests arriving as `arrivals` says (seeded by `seed`, like the prompts).
pub fn arrivals_trace(
    pool: &[Prompt],
    n: usize,
    arrivals: Arrivals,
    seed: u64,
    lengths: Lengths,
    max_tokens: u32,
) -> Result<Vec<TraceRequest>, Error> {
    let times = arrivals.times(n, seed)?;
    requests(pool, &times, seed, lengths, max_tokens)
}

/// A trace of `n` requests all arriving at time 0 (a saturation burst).
pub fn burst(
    pool: &[Prompt],
    n: usize,
    seed: u64,
    lengths: Lengths,
    max_tokens: u32,
) -> Result<Vec<TraceRequest>, Error> {
    requests(pool, &vec![0.0; n], seed, lengths, max_tokens)
}

fn requests(
    pool: &[Prompt],
    times: &[f64],
    seed: u64,
    lengths: Lengths,
    max_tokens: u32,
) -> Result<Vec<TraceRequest>, Error> {
    let prompts = sample(pool, times.len(), seed)?;
    Ok(times
        .iter()
        .zip(prompts)
        .map(|(&t, p)| {
            // A request stops at its cap, as it would for a real client: the profiled length
            // never raises the cap (a per-request cap would carry the length).
            let fixed = match lengths {
                Lengths::Profiled { clip, .. } => Some(
                    clip.map_or(p.output_tokens, |c| p.output_tokens.min(c))
                        .min(max_tokens)
                        .max(1),
                ),
                Lengths::Free => None,
            };
            let cap = match (lengths, fixed) {
                (Lengths::Profiled { clamp: true, .. }, Some(n)) => n,
                _ => max_tokens,
            };
            TraceRequest {
                arrival_s: t,
                prompt: p.text,
                output_tokens: fixed,
                max_tokens: Some(cap),
                request_id: Some(p.request_id),
                prompt_tokens: p.prompt_tokens,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Vec<Prompt> {
        (0..n)
            .map(|i| Prompt {
                request_id: format!("r{i}"),
                text: format!("prompt {i}"),
                output_tokens: 3 + i as u32,
                prompt_tokens: None,
            })
            .collect()
    }

    #[test]
    fn prompts_depend_on_the_seed_only_and_cycle_with_repeat_ids() {
        let pool = pool(5);
        let profiled = Lengths::Profiled {
            clip: Some(6),
            clamp: false,
        };
        let a = poisson_trace(&pool, 12, 2.0, 9, profiled, 64).unwrap();
        let b = poisson_trace(&pool, 12, 8.0, 9, profiled, 64).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.prompt, y.prompt);
            assert_eq!(x.request_id, y.request_id);
            // Same process, rescaled by the rate.
            assert!((x.arrival_s - 4.0 * y.arrival_s).abs() < 1e-9);
            assert!(x.output_tokens.unwrap() <= 6);
            assert_eq!(
                x.max_tokens,
                Some(64),
                "the client's cap, not the profiled length"
            );
        }
        // Every prompt of the pool once per cycle.
        let mut first: Vec<_> = a[..5].iter().map(|r| r.prompt.clone()).collect();
        first.sort();
        assert_eq!(
            first,
            (0..5).map(|i| format!("prompt {i}")).collect::<Vec<_>>()
        );
        assert!(a[5].request_id.as_deref().unwrap().ends_with("#1"));
        assert!(a[10].request_id.as_deref().unwrap().ends_with("#2"));
        let clamped = Lengths::Profiled {
            clip: None,
            clamp: true,
        };
        for r in burst(&pool, 5, 1, clamped, 64).unwrap() {
            assert_eq!(r.max_tokens, r.output_tokens, "the release protocol's cap");
        }
        // A cap below some profiled lengths (3..=7) stops those requests at the cap; it is the
        // same cap for every request.
        let honest = Lengths::Profiled {
            clip: None,
            clamp: false,
        };
        for r in burst(&pool, 5, 1, honest, 5).unwrap() {
            assert_eq!(r.max_tokens, Some(5));
            assert!(r.output_tokens.unwrap() <= 5);
        }
        let c = poisson_trace(&pool, 12, 2.0, 10, Lengths::Free, 64).unwrap();
        assert_ne!(
            a.iter().map(|r| &r.prompt).collect::<Vec<_>>(),
            c.iter().map(|r| &r.prompt).collect::<Vec<_>>()
        );
        assert!(c.iter().all(|r| r.output_tokens.is_none()));
        assert!(
            burst(&pool, 4, 1, Lengths::Free, 64)
                .unwrap()
                .iter()
                .all(|r| r.arrival_s == 0.0)
        );
        assert!(matches!(sample(&[], 3, 0), Err(Error::EmptySample)));
    }
}
