//! The Prometheus exposition of the engine's statistics ([`render`], text format 0.0.4, encoded
//! by `prometheus-client` from a snapshot at each scrape): vLLM's names where the meaning is the
//! same, so dashboards built on vLLM's metrics read trail's, and trail's own figures beside
//! them. Every series carries the labels `model_name` (the served name) and `policy`.
//!
//! vLLM's names (as scraped), and what each is here:
//! - `vllm:num_requests_running`, `vllm:num_requests_waiting`: the scheduler's queues (waiting
//!   includes preempted requests);
//! - `vllm:kv_cache_usage_perc`: KV blocks held over the pool, 0 to 1 (a fraction, as vLLM's);
//! - `vllm:num_preemptions_total`: preemptions, by the policy and for memory;
//! - `vllm:prompt_tokens_total`: prompt tokens of the requests that finished;
//!   `vllm:generation_tokens_total`: tokens generated;
//! - `vllm:request_success_total{finished_reason}`: requests ended, `stop`, `length` or `abort`;
//! - `vllm:time_to_first_token_seconds`: arrival to first token;
//! - `vllm:inter_token_latency_seconds`: every gap between two tokens of a request, and
//!   `vllm:time_per_output_token_seconds` the same gaps (vLLM's older name for them);
//! - `vllm:request_time_per_output_token_seconds`: per request, (end − first token) /
//!   (tokens − 1);
//! - `vllm:e2e_request_latency_seconds`: arrival to the end;
//! - `vllm:request_queue_time_seconds`: arrival to first admission;
//! - `vllm:request_prefill_time_seconds`, `vllm:request_decode_time_seconds`,
//!   `vllm:request_inference_time_seconds`: first admission to first token, first token to the
//!   end, first admission to the end.
//!
//! The latency histograms are observed when a request finishes at a stop or its cap (not when
//! it is aborted), with vLLM's buckets. trail's own: `trail_kv_blocks_used` and
//! `trail_kv_blocks_total`, `trail_preemptions_total{kind}` (`policy`, `memory`),
//! `trail_recomputed_tokens_total`, `trail_swapped_tokens_total`, `trail_prefill_tokens_total`
//! (recomputation included), `trail_steps_total`, `trail_step_seconds_total`,
//! `trail_predictor_seconds_total`, and the predictor's absolute error against each finished
//! request's true length, `trail_predictor_abs_error_tokens{estimate}` (`refined`: every
//! refined estimate of the remaining tokens; `initial`: the first prediction of the total), a
//! histogram whose `_sum` and `_count` counters give the error over any window:
//! `rate(…_sum[5m]) / rate(…_count[5m])`.

use std::borrow::Cow;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::metrics::{EngineStats, Histogram};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The exposition of `stats` for the model served as `model_name`.
pub fn render(stats: &EngineStats, model_name: &str) -> String {
    let labels: [(Cow<'static, str>, Cow<'static, str>); 2] = [
        ("model_name".into(), model_name.to_string().into()),
        ("policy".into(), stats.policy.clone().into()),
    ];
    let mut registry = Registry::with_labels(labels.into_iter());
    registry.register_collector(Box::new(Snapshot(stats.clone())));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).expect("encoding into a String cannot fail");
    out
}

/// The statistics of one scrape.
#[derive(Debug)]
struct Snapshot(EngineStats);

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        self.vllm(&mut e)?;
        self.trail(&mut e)
    }
}

impl Snapshot {
    /// The figures under vLLM's names.
    fn vllm(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let (s, c) = (&self.0, &self.0.counters);
        gauge(
            e,
            "vllm:num_requests_running",
            "Number of requests in the running set.",
            s.running,
        )?;
        gauge(
            e,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be scheduled.",
            s.waiting,
        )?;
        gauge(
            e,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage: 1 means 100 percent usage.",
            s.kv_usage(),
        )?;
        counter(
            e,
            "vllm:num_preemptions",
            "Cumulative number of preemptions.",
            c.preemptions_policy + c.preemptions_memory,
        )?;
        counter(
            e,
            "vllm:prompt_tokens",
            "Prompt tokens of the requests that finished.",
            s.prompt_tokens,
        )?;
        counter(
            e,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            c.generated_tokens,
        )?;
        let reasons = [
            ("stop", s.finished_stop),
            ("length", s.finished_length),
            ("abort", c.aborted),
        ];
        let help = "Count of successfully processed requests, by finish reason.";
        let mut m = e.encode_descriptor("vllm:request_success", help, None, MetricType::Counter)?;
        for (reason, n) in reasons {
            ConstCounter::new(n).encode(m.encode_family(&[("finished_reason", reason)])?)?;
        }
        for (name, help, h) in [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &s.ttft,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &s.inter_token,
            ),
            (
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (the inter-token latency, as vLLM).",
                &s.inter_token,
            ),
            (
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time per output token in seconds, per request.",
                &s.time_per_output_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of end-to-end request latency in seconds.",
                &s.latency,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in the waiting queue before first admission, in seconds.",
                &s.queue,
            ),
            (
                "vllm:request_prefill_time_seconds",
                "Histogram of time from first admission to first token, in seconds.",
                &s.prefill,
            ),
            (
                "vllm:request_decode_time_seconds",
                "Histogram of time from first token to the end, in seconds.",
                &s.decode,
            ),
            (
                "vllm:request_inference_time_seconds",
                "Histogram of time from first admission to the end, in seconds.",
                &s.inference,
            ),
        ] {
            histogram(e, name, help, h)?;
        }
        Ok(())
    }

    /// trail's own figures.
    fn trail(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let (s, c) = (&self.0, &self.0.counters);
        gauge(
            e,
            "trail_kv_blocks_used",
            "KV blocks held by running requests.",
            s.kv_blocks_used,
        )?;
        gauge(
            e,
            "trail_kv_blocks_total",
            "KV blocks in the pool.",
            s.kv_blocks_total,
        )?;
        let mut m = e.encode_descriptor(
            "trail_preemptions",
            "Preemptions by kind.",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in [
            ("policy", c.preemptions_policy),
            ("memory", c.preemptions_memory),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        counter(
            e,
            "trail_recomputed_tokens",
            "KV tokens dropped by preemption and prefilled again.",
            c.recomputed_tokens,
        )?;
        counter(
            e,
            "trail_swapped_tokens",
            "KV tokens swapped out by preemption and resumed without prefill.",
            c.swapped_tokens,
        )?;
        counter(
            e,
            "trail_prefill_tokens",
            "Prefill tokens run (recomputation included).",
            c.prefill_tokens,
        )?;
        counter(e, "trail_steps", "Model steps.", c.steps)?;
        counter(
            e,
            "trail_step_seconds",
            "Seconds in model steps.",
            s.step_secs,
        )?;
        counter(
            e,
            "trail_predictor_seconds",
            "Seconds in the length predictor.",
            s.predictor_secs,
        )?;
        let help = "Absolute error of the length predictor against each finished request's true \
                    length, in tokens (refined: remaining tokens; initial: total).";
        let mut m = e.encode_descriptor(
            "trail_predictor_abs_error_tokens",
            help,
            None,
            MetricType::Histogram,
        )?;
        for (estimate, h) in [("refined", &s.refined_error), ("initial", &s.initial_error)] {
            m.encode_family(&[("estimate", estimate)])?
                .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets(), None)?;
        }
        Ok(())
    }
}

fn gauge<N>(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: N) -> fmt::Result
where
    N: prometheus_client::encoding::EncodeGaugeValue,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter: `_total` is added to `name`.
fn counter<N>(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: N) -> fmt::Result
where
    N: prometheus_client::encoding::EncodeCounterValue,
{
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn histogram(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_once_with_the_model_and_policy_labels() {
        let mut st = EngineStats::new("trail", 64);
        st.kv_blocks_used = 16;
        st.running = 3;
        st.ttft.observe(0.3);
        st.refined_error.observe(10.0);
        st.refined_error.observe(20.0);
        st.finished_stop = 2;
        let text = render(&st, "smollm2");
        for family in [
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm:num_preemptions_total",
            "vllm:request_success_total",
            "vllm:time_to_first_token_seconds",
            "vllm:e2e_request_latency_seconds",
            "trail_preemptions_total",
            "trail_predictor_abs_error_tokens",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family}\n{text}"
            );
        }
        let l = "model_name=\"smollm2\",policy=\"trail\"";
        for line in [
            format!("vllm:num_requests_running{{{l}}} 3\n"),
            format!("vllm:kv_cache_usage_perc{{{l}}} 0.25\n"),
            format!("vllm:request_success_total{{{l},finished_reason=\"stop\"}} 2\n"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.25\"}} 0\n"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.5\"}} 1\n"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 1\n"),
            format!("trail_predictor_abs_error_tokens_sum{{{l},estimate=\"refined\"}} 30.0\n"),
            format!("trail_predictor_abs_error_tokens_count{{{l},estimate=\"refined\"}} 2\n"),
        ] {
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }
}
