//! Engine statistics and their Prometheus text exposition: gauges (waiting, running, KV
//! blocks), counters (preemptions by kind, tokens), histograms (TTFT, latency) and the online
//! MAE of the predictor, measured against each request's true length when it finishes.

use std::fmt::Write;

use serde::Serialize;

use crate::scheduler::Counters;

/// A cumulative histogram with fixed upper bounds (Prometheus `le` buckets).
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

    /// Seconds, from 10 ms to 10 min.
    pub fn seconds() -> Self {
        Self::new(&[
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ])
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

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
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
    /// Time to first token of finished requests.
    pub ttft: Histogram,
    /// End-to-end latency of finished requests.
    pub latency: Histogram,
    /// Sum of |refined prediction − true remaining| over predictions of finished requests.
    pub refined_abs_err: f64,
    /// Number of refined predictions scored.
    pub refined_count: u64,
    /// Sum of |initial prediction − true length| over finished requests.
    pub initial_abs_err: f64,
    /// Requests with a scored initial prediction.
    pub initial_count: u64,
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
            ttft: Histogram::seconds(),
            latency: Histogram::seconds(),
            refined_abs_err: 0.0,
            refined_count: 0,
            initial_abs_err: 0.0,
            initial_count: 0,
        }
    }

    /// Online MAE of the refined predictions (tokens), when any were scored.
    pub fn refined_mae(&self) -> Option<f64> {
        (self.refined_count > 0).then(|| self.refined_abs_err / self.refined_count as f64)
    }

    /// Online MAE of the initial predictions (tokens), when any were scored.
    pub fn initial_mae(&self) -> Option<f64> {
        (self.initial_count > 0).then(|| self.initial_abs_err / self.initial_count as f64)
    }

    /// The predictor's share of step time.
    pub fn predictor_share(&self) -> f64 {
        if self.step_secs > 0.0 {
            self.predictor_secs / self.step_secs
        } else {
            0.0
        }
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let c = &self.counters;
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        gauge(
            &mut o,
            "trail_requests_waiting",
            "Requests in the waiting queue.",
            self.waiting as f64,
        );
        gauge(
            &mut o,
            "trail_requests_running",
            "Requests running.",
            self.running as f64,
        );
        gauge(
            &mut o,
            "trail_kv_blocks_used",
            "KV blocks held by running requests.",
            self.kv_blocks_used as f64,
        );
        gauge(
            &mut o,
            "trail_kv_blocks_total",
            "KV blocks in the pool.",
            self.kv_blocks_total as f64,
        );
        let _ = writeln!(
            o,
            "# HELP trail_preemptions_total Preemptions by kind.\n# TYPE trail_preemptions_total counter\n\
             trail_preemptions_total{{kind=\"policy\"}} {}\ntrail_preemptions_total{{kind=\"memory\"}} {}",
            c.preemptions_policy, c.preemptions_memory
        );
        counter(
            &mut o,
            "trail_recomputed_tokens_total",
            "KV tokens dropped by preemption and prefilled again.",
            c.recomputed_tokens as f64,
        );
        counter(
            &mut o,
            "trail_swapped_tokens_total",
            "KV tokens swapped out by preemption and resumed without prefill.",
            c.swapped_tokens as f64,
        );
        counter(
            &mut o,
            "trail_prefill_tokens_total",
            "Prefill tokens run.",
            c.prefill_tokens as f64,
        );
        counter(
            &mut o,
            "trail_generated_tokens_total",
            "Tokens generated.",
            c.generated_tokens as f64,
        );
        counter(
            &mut o,
            "trail_requests_finished_total",
            "Requests finished.",
            c.finished as f64,
        );
        counter(
            &mut o,
            "trail_requests_aborted_total",
            "Requests aborted.",
            c.aborted as f64,
        );
        counter(&mut o, "trail_steps_total", "Model steps.", c.steps as f64);
        counter(
            &mut o,
            "trail_step_seconds_total",
            "Seconds in model steps.",
            self.step_secs,
        );
        counter(
            &mut o,
            "trail_predictor_seconds_total",
            "Seconds in the length predictor.",
            self.predictor_secs,
        );
        self.ttft
            .render(&mut o, "trail_ttft_seconds", "Time to first token.");
        self.latency.render(
            &mut o,
            "trail_latency_seconds",
            "End-to-end request latency.",
        );
        if let Some(m) = self.refined_mae() {
            gauge(
                &mut o,
                "trail_predictor_mae_tokens",
                "Online MAE of refined remaining-length predictions.",
                m,
            );
        }
        if let Some(m) = self.initial_mae() {
            gauge(
                &mut o,
                "trail_predictor_initial_mae_tokens",
                "Online MAE of initial length predictions.",
                m,
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"));
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"));
        assert!(s.contains("x_sum 6\nx_count 4\n"));
    }

    #[test]
    fn exposition_names_every_family_once() {
        let mut st = EngineStats::new("trail", 64);
        st.refined_abs_err = 10.0;
        st.refined_count = 4;
        let text = st.render_prometheus();
        for fam in [
            "trail_requests_waiting",
            "trail_kv_blocks_used",
            "trail_preemptions_total",
            "trail_ttft_seconds",
            "trail_latency_seconds",
            "trail_predictor_mae_tokens",
        ] {
            assert_eq!(text.matches(&format!("# TYPE {fam} ")).count(), 1, "{fam}");
        }
        assert!(text.contains("trail_predictor_mae_tokens 2.5\n"));
    }
}
