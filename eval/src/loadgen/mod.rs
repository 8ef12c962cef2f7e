//! Load generation for latency evaluation: an executor decides *when* requests arrive, a backend
//! decides *where* they go (huggingface/inference-benchmarker's split).
//!
//! * [`trace`]: the `trace.jsonl` format (`arrival_s`, `prompt`, `output_tokens`), shared with the
//!   simulator, and seeded arrival processes (Poisson, constant rate).
//! * [`backend`]: the [`Backend`] trait and a fixed-delay backend for tests. The backends over a
//!   real server (HTTP, the in-process engine) are `trail eval latency`'s.
//! * [`results`]: `results.parquet`, one row per request, policy, load and seed.
//! * [`workload`]: prompts with profiled lengths turned into seeded Poisson traces.
//! * [`drive`]: replays a trace against a backend in real time, every request on its own task,
//!   and returns one [`RequestResult`] per request, none lost.

pub mod backend;
pub mod results;
pub mod trace;
pub mod workload;

pub use backend::{Backend, FixedDelayBackend};
pub use results::{ResultRow, read_results, write_results};
pub use trace::{Arrivals, TraceRequest, read_trace, write_trace};

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one request measured, client side (plus what the server reported, when it does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestResult {
    /// Index of the request in its trace.
    pub index: usize,
    pub request_id: Option<String>,
    /// Scheduled arrival, seconds from the start of the run.
    pub arrival_s: f64,
    /// When it was actually sent (lateness of the client shows as `sent_s - arrival_s`).
    pub sent_s: f64,
    /// Time to first token, from the scheduled arrival; `None` when no token came.
    pub ttft_s: Option<f64>,
    /// End-to-end latency from the scheduled arrival.
    pub latency_s: f64,
    /// Time per output token after the first, as vLLM's `benchmark_serving.py` defines it:
    /// `(latency_s - ttft_s) / (output_tokens - 1)`, `None` for one token or none.
    pub tpot_s: Option<f64>,
    /// Inter-token latencies: the gaps between successive streamed chunks (one per token on a
    /// server that streams each token, as `trail serve` and llama.cpp's server do), as
    /// `benchmark_serving.py` records them; a preemption's stall shows here.
    #[serde(default)]
    pub itl_s: Vec<f64>,
    pub output_tokens: u32,
    /// Prompt tokens after the chat template, as the server reported them (`usage`), else as
    /// the trace knew them.
    #[serde(default)]
    pub prompt_tokens: Option<u32>,
    /// Server-reported time in the waiting queue before the first schedule.
    pub queue_s: Option<f64>,
    /// Server-reported preemptions.
    pub preemptions: Option<u32>,
    /// The error, when the request failed.
    pub error: Option<String>,
}

/// Timings a backend collects while one request streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Offset from the send of each chunk that carried output, in order.
    pub chunks: Vec<Duration>,
    pub output_tokens: u32,
    /// Prompt tokens, where the server or engine said.
    pub prompt_tokens: Option<u32>,
    pub queue_s: Option<f64>,
    pub preemptions: Option<u32>,
}

impl Observed {
    /// Offset of the first output chunk from the send.
    pub fn first_token(&self) -> Option<Duration> {
        self.chunks.first().copied()
    }

    /// Offset of the last output chunk from the send.
    pub fn last_token(&self) -> Option<Duration> {
        self.chunks.last().copied()
    }

    /// Records an output chunk of `tokens` tokens at `at` after the send.
    pub fn chunk(&mut self, at: Duration, tokens: u32) {
        self.chunks.push(at);
        self.output_tokens += tokens;
    }

    /// The gaps between successive chunks, seconds.
    pub fn itl_s(&self) -> Vec<f64> {
        self.chunks
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect()
    }
}

/// Time per output token after the first, exactly as vLLM's `benchmark_serving.py`
/// (`calculate_metrics`) computes it: `(e2el - ttft) / (output_len - 1)` where more than one
/// token came, with `output_len` the server's `usage.completion_tokens`; `None` otherwise (it
/// counts 0 there for goodput). The latency and TTFT share their origin, so measuring both from
/// the scheduled arrival rather than the send leaves it unchanged.
pub fn tpot(latency_s: f64, ttft_s: Option<f64>, output_tokens: u32) -> Option<f64> {
    match ttft_s {
        Some(ttft) if output_tokens > 1 => Some((latency_s - ttft) / f64::from(output_tokens - 1)),
        _ => None,
    }
}

impl RequestResult {
    /// The result of request `index` of a trace, sent at `sent_s` and ended at `done_s`
    /// (seconds from the start of the run), from what its backend observed or the error it
    /// met; every time is measured from the request's scheduled arrival.
    pub fn from_observed(
        index: usize,
        req: &TraceRequest,
        sent_s: f64,
        done_s: f64,
        obs: Result<Observed, String>,
    ) -> Self {
        let (obs, error) = match obs {
            Ok(o) => (o, None),
            Err(e) => (Observed::default(), Some(e)),
        };
        let ttft_s = obs
            .first_token()
            .map(|d| sent_s + d.as_secs_f64() - req.arrival_s);
        let latency_s = done_s - req.arrival_s;
        Self {
            index,
            request_id: req.request_id.clone(),
            arrival_s: req.arrival_s,
            sent_s,
            ttft_s,
            latency_s,
            tpot_s: tpot(latency_s, ttft_s, obs.output_tokens),
            itl_s: obs.itl_s(),
            output_tokens: obs.output_tokens,
            prompt_tokens: obs.prompt_tokens.or(req.prompt_tokens),
            queue_s: obs.queue_s,
            preemptions: obs.preemptions,
            error,
        }
    }
}

/// Replays `trace` against `backend` in real time: request `i` is sent at `trace[i].arrival_s`
/// after the call, on its own task, whatever the others are doing (an open-loop client, so a
/// slow server builds a queue instead of slowing the arrivals). `on_done` is called as each
/// request ends (for a progress bar). Results come back in trace order, one per request.
pub async fn drive<B: Backend + 'static>(
    backend: std::sync::Arc<B>,
    trace: &[TraceRequest],
    mut on_done: impl FnMut(&RequestResult),
) -> Vec<RequestResult> {
    let start = tokio::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (index, req) in trace.iter().cloned().enumerate() {
        let backend = backend.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(req.arrival_s.max(0.0))).await;
            let sent = tokio::time::Instant::now();
            let sent_s = (sent - start).as_secs_f64();
            let obs = backend.send(&req).await;
            let done_s = sent_s + sent.elapsed().as_secs_f64();
            let _ = tx.send(RequestResult::from_observed(
                index, &req, sent_s, done_s, obs,
            ));
        });
    }
    drop(tx);
    let mut results: Vec<Option<RequestResult>> = vec![None; trace.len()];
    while let Some(r) = rx.recv().await {
        on_done(&r);
        let i = r.index;
        results[i] = Some(r);
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                // A task that panicked still leaves its request accounted for.
                RequestResult::from_observed(
                    i,
                    &trace[i],
                    trace[i].arrival_s,
                    trace[i].arrival_s,
                    Err("the client task died".into()),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn every_request_is_accounted_for_and_timed_from_its_arrival() {
        let trace: Vec<TraceRequest> = Arrivals::Poisson { rate: 20.0 }
            .times(50, 7)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, t)| TraceRequest::new(t, format!("prompt {i}"), Some(4 + i as u32 % 3)))
            .collect();
        let backend = Arc::new(FixedDelayBackend {
            first_token: Duration::from_millis(30),
            per_token: Duration::from_millis(10),
        });
        let mut seen = 0;
        let results = drive(backend, &trace, |_| seen += 1).await;
        assert_eq!(seen, trace.len());
        assert_eq!(results.len(), trace.len());
        for (i, (r, t)) in results.iter().zip(&trace).enumerate() {
            assert_eq!(r.index, i);
            assert!(r.error.is_none());
            // Paused time: the client is never late, so timings are exact.
            assert!((r.sent_s - t.arrival_s).abs() < 1e-3, "{r:?}");
            let ttft = r.ttft_s.unwrap();
            assert!((ttft - 0.030).abs() < 1e-3, "{r:?}");
            let n = t.output_tokens.unwrap();
            assert_eq!(r.output_tokens, n);
            let expect = 0.030 + 0.010 * f64::from(n - 1);
            assert!((r.latency_s - expect).abs() < 1e-3, "{r:?}");
            assert!((r.tpot_s.unwrap() - 0.010).abs() < 1e-6, "{r:?}");
            assert_eq!(r.itl_s.len(), n as usize - 1);
            assert!(r.itl_s.iter().all(|g| (g - 0.010).abs() < 1e-6), "{r:?}");
        }
    }
}
