//! The figures vLLM's `benchmark_serving.py` reports, per policy and load (pooled over seeds),
//! computed as its `calculate_metrics` computes them (vllm-project/vllm,
//! `benchmarks/benchmark_serving.py`; the per-request timings as
//! `benchmarks/backend_request_func.py`'s `async_request_openai_chat_completions` stamps them):
//!
//! * TTFT: the first output chunk; E2EL: the end of the response; both per completed request.
//! * TPOT: `(e2el − ttft) / (output_len − 1)` per completed request with more than one token,
//!   `output_len` being the server's `usage.completion_tokens` ([`trail_eval::loadgen::tpot`]).
//! * ITL: every gap between successive chunks of every completed request, pooled.
//! * Throughputs over the duration: completed requests, output tokens, and prompt plus output
//!   tokens per second; goodput: completed requests that meet every SLO of `--goodput`
//!   (`slo ≥ value`, TPOT counted as 0 for a request of one token) per second.
//! * Mean, median and p99 with numpy's defaults (`trail_stats`, linear quantiles).
//!
//! Two differences, both stated where they are reported: TTFT and E2EL are measured from the
//! request's scheduled arrival, not its send (the open-loop convention of the rest of this
//! stage: a late client counts against the server; `sent_s − arrival_s` in `results.parquet`
//! recovers vLLM's origin, and TPOT and ITL do not depend on it), and a statistic of no sample is
//! `null` where numpy's `np.mean(x or 0)` reports 0. The duration is the sum over seeds of each
//! trace's makespan, from its origin to its last completion (vLLM's `benchmark_duration`).

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use trail_eval::loadgen::{ResultRow, tpot};

/// Service-level objectives of `--goodput`, in milliseconds as `benchmark_serving.py` takes
/// them (`ttft:MS,tpot:MS,e2el:MS`, any subset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GoodputSlo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2el_ms: Option<f64>,
}

impl FromStr for GoodputSlo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut slo = Self::default();
        for part in s.split(',').map(str::trim) {
            let (name, ms) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}` is not NAME:MS (ttft, tpot or e2el)"))?;
            let ms: f64 = ms
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: {ms} is not a number of milliseconds"))?;
            if !(ms.is_finite() && ms >= 0.0) {
                return Err(format!("`{part}`: an SLO is a non-negative number of ms"));
            }
            let slot = match name.trim() {
                "ttft" => &mut slo.ttft_ms,
                "tpot" => &mut slo.tpot_ms,
                "e2el" => &mut slo.e2el_ms,
                other => return Err(format!("unknown SLO `{other}`: ttft, tpot or e2el")),
            };
            if slot.replace(ms).is_some() {
                return Err(format!("SLO `{}` given twice", name.trim()));
            }
        }
        Ok(slo)
    }
}

impl GoodputSlo {
    /// Whether a request with these timings (seconds; TPOT 0 for one token) meets every SLO.
    fn met(&self, ttft_s: f64, tpot_s: f64, e2el_s: f64) -> bool {
        let ok = |slo_ms: Option<f64>, v: f64| slo_ms.is_none_or(|ms| ms / 1000.0 >= v);
        ok(self.ttft_ms, ttft_s) && ok(self.tpot_ms, tpot_s) && ok(self.e2el_ms, e2el_s)
    }

    /// `ttft:MS,tpot:MS,e2el:MS` as given.
    pub fn describe(&self) -> String {
        [
            ("ttft", self.ttft_ms),
            ("tpot", self.tpot_ms),
            ("e2el", self.e2el_ms),
        ]
        .iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n}:{v}")))
        .collect::<Vec<_>>()
        .join(",")
    }
}

/// `benchmark_serving.py`'s `BenchmarkMetrics` in seconds (its `_ms` figures over 1000), for
/// one policy at one load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkMetrics {
    pub completed: usize,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub duration_s: f64,
    pub request_throughput_rps: f64,
    pub output_throughput_tokens_per_s: f64,
    pub total_token_throughput_tokens_per_s: f64,
    /// With `--goodput`: completed requests meeting every SLO, per second.
    pub request_goodput_rps: Option<f64>,
    pub good_requests: Option<usize>,
    pub mean_ttft_s: Option<f64>,
    pub median_ttft_s: Option<f64>,
    pub p99_ttft_s: Option<f64>,
    pub mean_tpot_s: Option<f64>,
    pub median_tpot_s: Option<f64>,
    pub p99_tpot_s: Option<f64>,
    pub mean_itl_s: Option<f64>,
    pub median_itl_s: Option<f64>,
    pub p99_itl_s: Option<f64>,
    pub mean_e2el_s: Option<f64>,
    pub median_e2el_s: Option<f64>,
    pub p99_e2el_s: Option<f64>,
}

/// Mean, median and p99 of a sample (numpy's), `None` when empty.
fn spread(xs: &[f64]) -> [Option<f64>; 3] {
    let mean = (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
    [
        mean,
        trail_stats::quantile(xs, 0.5),
        trail_stats::quantile(xs, 0.99),
    ]
}

impl BenchmarkMetrics {
    /// The figures of one policy at one load from its rows (every seed), with goodput under
    /// `slo` where given. A request counts as completed when it did not fail and streamed a
    /// first token.
    pub fn of(rows: &[&ResultRow], slo: Option<&GoodputSlo>) -> Self {
        let mut makespan: BTreeMap<u64, f64> = BTreeMap::new();
        for r in rows {
            let m = makespan.entry(r.seed).or_insert(0.0);
            *m = m.max(r.result.arrival_s + r.result.latency_s);
        }
        let duration_s: f64 = makespan.values().sum();
        let ok: Vec<_> = rows
            .iter()
            .map(|r| &r.result)
            .filter(|r| r.error.is_none() && r.ttft_s.is_some())
            .collect();
        let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
        let e2el: Vec<f64> = ok.iter().map(|r| r.latency_s).collect();
        // TPOT recomputed from the row's latency and TTFT, so files written before TPOT took
        // benchmark_serving.py's definition summarise the same way.
        let all_tpot: Vec<f64> = ok
            .iter()
            .map(|r| tpot(r.latency_s, r.ttft_s, r.output_tokens).unwrap_or(0.0))
            .collect();
        let tpots: Vec<f64> = ok
            .iter()
            .filter_map(|r| tpot(r.latency_s, r.ttft_s, r.output_tokens))
            .collect();
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect();
        let input: u64 = ok
            .iter()
            .filter_map(|r| r.prompt_tokens)
            .map(u64::from)
            .sum();
        let output: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let good = slo.map(|slo| {
            (0..ok.len())
                .filter(|&i| slo.met(ttft[i], all_tpot[i], e2el[i]))
                .count()
        });
        let [mean_ttft_s, median_ttft_s, p99_ttft_s] = spread(&ttft);
        let [mean_tpot_s, median_tpot_s, p99_tpot_s] = spread(&tpots);
        let [mean_itl_s, median_itl_s, p99_itl_s] = spread(&itl);
        let [mean_e2el_s, median_e2el_s, p99_e2el_s] = spread(&e2el);
        Self {
            completed: ok.len(),
            total_input_tokens: input,
            total_output_tokens: output,
            duration_s,
            request_throughput_rps: per_s(ok.len() as f64),
            output_throughput_tokens_per_s: per_s(output as f64),
            total_token_throughput_tokens_per_s: per_s((input + output) as f64),
            request_goodput_rps: good.map(|g| per_s(g as f64)),
            good_requests: good,
            mean_ttft_s,
            median_ttft_s,
            p99_ttft_s,
            mean_tpot_s,
            median_tpot_s,
            p99_tpot_s,
            mean_itl_s,
            median_itl_s,
            p99_itl_s,
            mean_e2el_s,
            median_e2el_s,
            p99_e2el_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trail_eval::loadgen::RequestResult;

    fn row(seed: u64, index: usize, ttft: f64, itl: &[f64]) -> ResultRow {
        let latency = ttft + itl.iter().sum::<f64>();
        let n = itl.len() as u32 + 1;
        ResultRow {
            policy: "fcfs".into(),
            load: 0.5,
            rate_rps: 1.0,
            seed,
            target_tokens: Some(n),
            result: RequestResult {
                index,
                request_id: None,
                arrival_s: index as f64,
                sent_s: index as f64,
                ttft_s: Some(ttft),
                latency_s: latency,
                tpot_s: tpot(latency, Some(ttft), n),
                itl_s: itl.to_vec(),
                output_tokens: n,
                prompt_tokens: Some(10),
                queue_s: None,
                preemptions: None,
                error: None,
            },
        }
    }

    #[test]
    fn slos_parse_as_benchmark_serving_takes_them() {
        let slo: GoodputSlo = "ttft:500,e2el:2000".parse().unwrap();
        assert_eq!(
            slo,
            GoodputSlo {
                ttft_ms: Some(500.0),
                tpot_ms: None,
                e2el_ms: Some(2000.0)
            }
        );
        assert_eq!(slo.describe(), "ttft:500,e2el:2000");
        for bad in ["ttft", "itl:3", "ttft:x", "ttft:1,ttft:2", "tpot:-1"] {
            assert!(bad.parse::<GoodputSlo>().is_err(), "{bad}");
        }
    }

    #[test]
    fn figures_follow_calculate_metrics() {
        let rows = [
            row(1, 0, 0.2, &[0.1, 0.1, 0.4]),
            row(1, 1, 0.5, &[]),
            row(2, 0, 0.3, &[0.2]),
        ];
        let mut failed = row(2, 1, 0.1, &[0.1]);
        failed.result.error = Some("boom".into());
        let refs: Vec<&ResultRow> = rows.iter().chain([&failed]).collect();
        let slo = GoodputSlo {
            ttft_ms: Some(400.0),
            tpot_ms: Some(150.0),
            e2el_ms: None,
        };
        let m = BenchmarkMetrics::of(&refs, Some(&slo));
        assert_eq!(m.completed, 3);
        // Makespans: seed 1 ends at 1.5 (index 1 arrives at 1, 0.5 s), seed 2 at 1.2 (failed).
        assert!((m.duration_s - 2.7).abs() < 1e-12, "{}", m.duration_s);
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (30, 7));
        // TPOT: 0.6 / 3 and 0.2 / 1; the one-token request has none (0 for goodput).
        assert!((m.mean_tpot_s.unwrap() - 0.2).abs() < 1e-12);
        // ITL pooled: 0.1, 0.1, 0.4, 0.2.
        assert!((m.mean_itl_s.unwrap() - 0.2).abs() < 1e-12);
        assert!((m.median_itl_s.unwrap() - 0.15).abs() < 1e-12);
        // Good: TTFT ≤ 0.4 and TPOT ≤ 0.15: not the first (TPOT 0.2), the second (TTFT 0.5)
        // fails, the third has TPOT 0.2: none; loosen TPOT and two pass.
        assert_eq!(m.good_requests, Some(0));
        let loose = GoodputSlo {
            tpot_ms: Some(250.0),
            ..slo
        };
        let m2 = BenchmarkMetrics::of(&refs, Some(&loose));
        assert_eq!(m2.good_requests, Some(2));
        assert!((m2.request_goodput_rps.unwrap() - 2.0 / 2.7).abs() < 1e-12);
        assert!((m.total_token_throughput_tokens_per_s - 37.0 / 2.7).abs() < 1e-12);
    }
}
