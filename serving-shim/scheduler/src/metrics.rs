//! Engine statistics ([`EngineStats`]): gauges (waiting, running, KV blocks), the scheduler's
//! counters, finished requests by reason, and histograms of the latencies vLLM exposes (time
//! to first token, inter-token latency, time per output token, queue, prefill, decode,
//! inference and end-to-end time, with vLLM's buckets) and of the predictor's absolute error
//! against each request's true length. A finished request is observed once, when it ends
//! ([`EngineStats::observe_request`]). The Prometheus exposition of these figures is the
//! serving shim's (`trail_serving_shim::prometheus`): this crate stays free of it.

use serde::Serialize;

use crate::scheduler::Counters;
use crate::sequence::{FinishReason, Timestamps};

/// vLLM's buckets for the time to first token, in seconds.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's buckets for the time per output token and the inter-token latency, in seconds.
pub const TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// vLLM's buckets for a request's end-to-end, queue, prefill, decode and inference time, in
/// seconds.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Buckets of the predictor's absolute error, in tokens.
pub const ERROR_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// A histogram with fixed upper bounds (Prometheus `le` buckets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    /// Upper bounds, ascending (`+Inf` is implicit).
    pub bounds: Vec<f64>,
    /// Observations `≤ bounds[i]` and above `bounds[i−1]`; one more slot for `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// A histogram with these upper bounds.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// Mean of the observations (0 when none).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// `(upper bound, observations in the bucket)`, the last bound `+∞`: non-cumulative, as
    /// an exposition encoder takes them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// A snapshot of the engine, updated after every step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineStats {
    /// Policy name.
    pub policy: String,
    /// Requests waiting.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
    /// KV blocks held.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Scheduler totals.
    #[serde(skip)]
    pub counters: Counters,
    /// Seconds in model steps (forward + sampling + predictor).
    pub step_secs: f64,
    /// Seconds in the predictor (probe + filter).
    pub predictor_secs: f64,
    /// Requests that finished at a stop token or stop string.
    pub finished_stop: u64,
    /// Requests that finished at their cap.
    pub finished_length: u64,
    /// Prompt tokens of the requests that finished.
    pub prompt_tokens: u64,
    /// Arrival to first token.
    pub ttft: Histogram,
    /// Arrival to the end (end-to-end latency).
    pub latency: Histogram,
    /// Arrival to first admission (time in the waiting queue before it first ran).
    pub queue: Histogram,
    /// First admission to first token.
    pub prefill: Histogram,
    /// First token to the end.
    pub decode: Histogram,
    /// First admission to the end.
    pub inference: Histogram,
    /// Every gap between two consecutive tokens of a request.
    pub inter_token: Histogram,
    /// Per request: first token to the end over the tokens after the first.
    pub time_per_output_token: Histogram,
    /// |refined prediction − true remaining|, one per refined prediction of a finished request.
    pub refined_error: Histogram,
    /// |initial prediction − true length|, one per finished request that had one.
    pub initial_error: Histogram,
}

impl EngineStats {
    /// Empty statistics for a policy and a pool of `kv_blocks_total` blocks.
    pub fn new(policy: &str, kv_blocks_total: usize) -> Self {
        Self {
            policy: policy.to_string(),
            waiting: 0,
            running: 0,
            kv_blocks_used: 0,
            kv_blocks_total,
            counters: Counters::default(),
            step_secs: 0.0,
            predictor_secs: 0.0,
            finished_stop: 0,
            finished_length: 0,
            prompt_tokens: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            latency: Histogram::new(REQUEST_BUCKETS),
            queue: Histogram::new(REQUEST_BUCKETS),
            prefill: Histogram::new(REQUEST_BUCKETS),
            decode: Histogram::new(REQUEST_BUCKETS),
            inference: Histogram::new(REQUEST_BUCKETS),
            inter_token: Histogram::new(TOKEN_BUCKETS),
            time_per_output_token: Histogram::new(TOKEN_BUCKETS),
            refined_error: Histogram::new(ERROR_BUCKETS),
            initial_error: Histogram::new(ERROR_BUCKETS),
        }
    }

    /// Observes a request that ended in a step, for `finish` (stop or length), with
    /// `prompt_tokens` and its timestamps (one per generated token).
    pub fn observe_request(&mut self, finish: FinishReason, prompt_tokens: usize, t: &Timestamps) {
        match finish {
            FinishReason::Stop => self.finished_stop += 1,
            FinishReason::Length => self.finished_length += 1,
            FinishReason::Aborted => {}
        }
        self.prompt_tokens += prompt_tokens as u64;
        let since =
            |from: Option<f64>, to: Option<f64>| from.zip(to).map(|(a, b)| (b - a).max(0.0));
        let arrival = Some(t.arrival);
        for (h, v) in [
            (&mut self.ttft, since(arrival, t.first_token)),
            (&mut self.latency, since(arrival, t.finish)),
            (&mut self.queue, since(arrival, t.first_scheduled)),
            (&mut self.prefill, since(t.first_scheduled, t.first_token)),
            (&mut self.decode, since(t.first_token, t.finish)),
            (&mut self.inference, since(t.first_scheduled, t.finish)),
        ] {
            if let Some(v) = v {
                h.observe(v);
            }
        }
        for w in t.tokens.windows(2) {
            self.inter_token.observe((w[1] - w[0]).max(0.0));
        }
        if let (Some(decode), n @ 2..) = (since(t.first_token, t.finish), t.tokens.len()) {
            self.time_per_output_token.observe(decode / (n - 1) as f64);
        }
    }

    /// Online MAE of the refined predictions (tokens), when any were scored.
    pub fn refined_mae(&self) -> Option<f64> {
        (self.refined_error.count > 0).then(|| self.refined_error.mean())
    }

    /// Online MAE of the initial predictions (tokens), when any were scored.
    pub fn initial_mae(&self) -> Option<f64> {
        (self.initial_error.count > 0).then(|| self.initial_error.mean())
    }

    /// The predictor's share of step time.
    pub fn predictor_share(&self) -> f64 {
        if self.step_secs > 0.0 {
            self.predictor_secs / self.step_secs
        } else {
            0.0
        }
    }

    /// The share of the KV pool held, 0 to 1 (vLLM's `kv_cache_usage_perc`).
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_their_own_observations_and_end_at_infinity() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        assert_eq!(h.buckets(), vec![(1.0, 2), (2.0, 1), (f64::INFINITY, 1)]);
        assert_eq!((h.sum, h.count, h.mean()), (6.0, 4, 1.5));
    }

    #[test]
    fn a_finished_request_is_observed_in_every_latency_once() {
        let mut st = EngineStats::new("fcfs", 64);
        let t = Timestamps {
            arrival: 1.0,
            first_scheduled: Some(1.5),
            first_token: Some(2.0),
            tokens: vec![2.0, 2.1, 2.3, 2.6],
            finish: Some(2.6),
        };
        st.observe_request(FinishReason::Stop, 7, &t);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(st.ttft.sum, 1.0) && close(st.latency.sum, 1.6));
        assert!(close(st.queue.sum, 0.5) && close(st.prefill.sum, 0.5));
        assert!(close(st.decode.sum, 0.6) && close(st.inference.sum, 1.1));
        assert_eq!(st.inter_token.count, 3);
        assert!(close(st.inter_token.sum, 0.6));
        assert_eq!(st.time_per_output_token.count, 1);
        assert!(close(st.time_per_output_token.sum, 0.2));
        assert_eq!(
            (st.finished_stop, st.finished_length, st.prompt_tokens),
            (1, 0, 7)
        );
        // One token: no gap, no time per output token.
        let one = Timestamps {
            tokens: vec![2.0],
            ..t
        };
        st.observe_request(FinishReason::Length, 3, &one);
        assert_eq!(
            (st.inter_token.count, st.time_per_output_token.count),
            (3, 1)
        );
        assert_eq!((st.finished_length, st.ttft.count), (1, 2));
    }

    #[test]
    fn the_online_mae_is_the_mean_absolute_error() {
        let mut st = EngineStats::new("trail", 64);
        assert_eq!(st.refined_mae(), None);
        for e in [1.0, 2.0, 3.0, 4.0] {
            st.refined_error.observe(e);
        }
        assert_eq!(st.refined_mae(), Some(2.5));
        st.kv_blocks_used = 16;
        assert_eq!(st.kv_usage(), 0.25);
    }
}
