//! `summary.json`: per policy and load, latency and TTFT statistics pooled over seeds with
//! request-bootstrap 95 % intervals, throughput, and `benchmark_serving.py`'s figures
//! ([`BenchmarkMetrics`]); per load, FCFS over each policy in mean
//! latency and mean TTFT, and TRAIL's share of the oracle's gain over FCFS, each with a paired
//! bootstrap over the requests every policy served (same trace, same index).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use trail_eval::loadgen::ResultRow;
use trail_eval::tracesim::StepTimeModel;
use trail_serving_shim::StepRecord;
use trail_stats::{Bootstrap, Interval};

use super::benchmark::{BenchmarkMetrics, GoodputSlo};
use super::config::Settings;
use super::headroom::Headroom;
use super::saturation::Saturation;
use crate::manifest::write_atomic;

/// Bootstrap resamples and seed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BootstrapSettings {
    pub resamples: usize,
    pub seed: u64,
}

/// One policy at one load, pooled over seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellStats {
    pub policy: String,
    pub load: f64,
    pub rate_rps: f64,
    pub seeds: Vec<u64>,
    pub requests: usize,
    pub failed: usize,
    pub mean_latency_s: Option<Interval>,
    pub p50_latency_s: Option<Interval>,
    pub p90_latency_s: Option<Interval>,
    pub p99_latency_s: Option<Interval>,
    pub mean_ttft_s: Option<Interval>,
    pub p50_ttft_s: Option<Interval>,
    pub mean_tpot_s: Option<f64>,
    pub mean_queue_s: Option<f64>,
    pub mean_preemptions: Option<f64>,
    /// Completed requests per second: completions over the seeds' summed makespans (from the
    /// first arrival at 0 to the last completion).
    pub throughput_rps: f64,
    pub output_tokens_per_s: f64,
    /// What vLLM's `benchmark_serving.py` reports for these requests (absent from summaries
    /// written before it was).
    #[serde(default)]
    pub benchmark: Option<BenchmarkMetrics>,
    /// From the servers' step logs, where they were written.
    pub engine: Option<EngineFigures>,
}

/// What the servers' step logs say about one policy at one load (pooled over seeds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineFigures {
    pub steps: usize,
    pub policy_preemptions: usize,
    pub memory_preemptions: usize,
    /// Per seed, the server's speed against the step-time model fitted to every cell
    /// ([`headroom::relative_step_time`]): the same in every cell on a quiet machine; 1.03 means
    /// that server ran 3 % slower than the grid's average.
    ///
    /// [`headroom::relative_step_time`]: super::headroom::relative_step_time
    pub relative_step_time: BTreeMap<u64, f64>,
}

impl EngineFigures {
    /// From each seed's step log, with the grid's step-time model where one was fitted.
    pub fn from_steps(logs: &[(u64, Vec<StepRecord>)], model: Option<&StepTimeModel>) -> Self {
        let steps = logs.iter().flat_map(|(_, l)| l);
        Self {
            steps: steps.clone().count(),
            policy_preemptions: steps.clone().map(|s| s.preempted_policy).sum(),
            memory_preemptions: steps.map(|s| s.preempted_memory).sum(),
            relative_step_time: logs
                .iter()
                .filter_map(|(seed, l)| {
                    model
                        .and_then(|m| super::headroom::relative_step_time(l, m))
                        .map(|r| (*seed, r))
                })
                .collect(),
        }
    }
}

/// Paired comparisons at one load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub load: f64,
    /// Requests (seed, index) that every compared policy completed.
    pub paired_requests: usize,
    /// FCFS mean latency over each other policy's.
    pub fcfs_over_policy_mean_latency: BTreeMap<String, Interval>,
    /// FCFS mean TTFT over each other policy's.
    pub fcfs_over_policy_mean_ttft: BTreeMap<String, Interval>,
    /// (FCFS − TRAIL) / (FCFS − oracle) in mean latency, where the oracle's gain is clearly
    /// positive (its paired FCFS / oracle interval lies above 1); else `null`, with the reason in
    /// `trail_share_of_oracle_gain_null_because`.
    pub trail_share_of_oracle_gain: Option<Interval>,
    /// Why `trail_share_of_oracle_gain` is `null` when TRAIL and the oracle both ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trail_share_of_oracle_gain_null_because: Option<String>,
}

/// The whole summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub cells: Vec<CellStats>,
    pub comparisons: Vec<Comparison>,
    pub bootstrap: BootstrapSettings,
    /// `--goodput`'s SLOs, where given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goodput_slo: Option<GoodputSlo>,
    /// Step time fitted to every cell's step log (the grid's average engine), where the servers
    /// wrote logs; on virtual time, the virtual clock's model.
    pub step_model: Option<StepTimeModel>,
    /// Where `step_model` comes from, as the report says it.
    pub step_model_source: String,
    /// Per load, the simulator on the grid's traces with `step_model` (lengths fixed only).
    pub simulated: Vec<Headroom>,
}

/// `summary.json`'s schema: 2 since each cell has `benchmark_serving.py`'s figures
/// (`benchmark`) and the summary `--goodput`'s SLOs; a file without the key is version 1, which
/// [`read_summary`] reads the same.
pub const SUMMARY_SCHEMA_VERSION: u32 = 2;

/// `summary.json`: the summary, with the capacity, the settings and the grid it is of.
#[derive(Debug, Serialize)]
pub struct SummaryFile<'a> {
    /// [`SUMMARY_SCHEMA_VERSION`].
    pub schema_version: u32,
    pub saturation: &'a Saturation,
    pub settings: &'a Settings,
    pub policies: &'a [String],
    pub loads: &'a [f64],
    pub seeds: &'a [u64],
    pub summary: &'a Summary,
}

impl SummaryFile<'_> {
    /// Writes the file atomically. It goes through a JSON value, whose keys sort (as in every
    /// `summary.json` written so far), whatever the order of the fields here; its paths are
    /// recorded relative to the file's directory ([`trail_fs::portable_json`]).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut value = serde_json::to_value(self)?;
        trail_fs::portable_json(&mut value, path.parent().unwrap_or(Path::new(".")));
        write_atomic(path, serde_json::to_string_pretty(&value)?.as_bytes())
    }
}

/// The summary of a `summary.json` that `trail eval latency` wrote.
pub fn read_summary(path: &Path) -> anyhow::Result<Summary> {
    #[derive(Deserialize)]
    struct File {
        summary: Summary,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: File =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.summary)
}

fn mean(xs: &[f64], idx: &[usize]) -> Option<f64> {
    (!idx.is_empty()).then(|| idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64)
}

fn quantile(xs: &[f64], idx: &[usize], q: f64) -> Option<f64> {
    let v: Vec<f64> = idx.iter().map(|&i| xs[i]).collect();
    trail_stats::quantile(&v, q)
}

fn plain_mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Load keys compare by value; loads are printed with 2 decimals everywhere.
pub fn load_key(load: f64) -> String {
    format!("{load:.2}")
}

fn cell_stats(
    policy: &str,
    load: f64,
    rows: &[&ResultRow],
    boot: BootstrapSettings,
    slo: Option<&GoodputSlo>,
) -> CellStats {
    let ok: Vec<&ResultRow> = rows
        .iter()
        .copied()
        .filter(|r| r.result.error.is_none())
        .collect();
    let lat: Vec<f64> = ok.iter().map(|r| r.result.latency_s).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.result.ttft_s).collect();
    let b_lat = Bootstrap::new(lat.len(), boot.resamples, boot.seed);
    let b_ttft = Bootstrap::new(ttft.len(), boot.resamples, boot.seed);
    let mut seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    // Makespan per seed: from 0 (the trace's origin) to the last completion.
    let mut makespan: BTreeMap<u64, f64> = BTreeMap::new();
    for r in rows {
        let end = r.result.arrival_s + r.result.latency_s;
        let m = makespan.entry(r.seed).or_insert(0.0);
        *m = m.max(end);
    }
    let span: f64 = makespan.values().sum();
    let tokens: f64 = ok.iter().map(|r| f64::from(r.result.output_tokens)).sum();
    CellStats {
        policy: policy.to_string(),
        load,
        rate_rps: rows.first().map_or(0.0, |r| r.rate_rps),
        seeds,
        requests: rows.len(),
        failed: rows.len() - ok.len(),
        mean_latency_s: b_lat.interval(|i| mean(&lat, i)),
        p50_latency_s: b_lat.interval(|i| quantile(&lat, i, 0.50)),
        p90_latency_s: b_lat.interval(|i| quantile(&lat, i, 0.90)),
        p99_latency_s: b_lat.interval(|i| quantile(&lat, i, 0.99)),
        mean_ttft_s: b_ttft.interval(|i| mean(&ttft, i)),
        p50_ttft_s: b_ttft.interval(|i| quantile(&ttft, i, 0.50)),
        mean_tpot_s: plain_mean(ok.iter().filter_map(|r| {
            trail_eval::loadgen::tpot(r.result.latency_s, r.result.ttft_s, r.result.output_tokens)
        })),
        mean_queue_s: plain_mean(ok.iter().filter_map(|r| r.result.queue_s)),
        mean_preemptions: plain_mean(
            ok.iter()
                .filter_map(|r| r.result.preemptions.map(f64::from)),
        ),
        throughput_rps: if span > 0.0 {
            ok.len() as f64 / span
        } else {
            0.0
        },
        output_tokens_per_s: if span > 0.0 { tokens / span } else { 0.0 },
        benchmark: Some(BenchmarkMetrics::of(rows, slo)),
        engine: None,
    }
}

/// Per (seed, index): (latency, ttft) of one policy's completed requests.
type Paired = HashMap<(u64, usize), (f64, Option<f64>)>;

fn paired(rows: &[&ResultRow]) -> Paired {
    rows.iter()
        .filter(|r| r.result.error.is_none())
        .map(|r| {
            (
                (r.seed, r.result.index),
                (r.result.latency_s, r.result.ttft_s),
            )
        })
        .collect()
}

fn comparison(
    load: f64,
    by_policy: &BTreeMap<String, Vec<&ResultRow>>,
    boot: BootstrapSettings,
) -> Option<Comparison> {
    let fcfs = paired(by_policy.get("fcfs")?);
    let others: BTreeMap<&str, Paired> = by_policy
        .iter()
        .filter(|(p, _)| p.as_str() != "fcfs")
        .map(|(p, rows)| (p.as_str(), paired(rows)))
        .collect();
    // Requests every policy completed with a first token, in a fixed order.
    let keys: BTreeSet<(u64, usize)> = fcfs
        .iter()
        .filter(|(k, v)| {
            v.1.is_some()
                && others
                    .values()
                    .all(|o| o.get(k).is_some_and(|x| x.1.is_some()))
        })
        .map(|(k, _)| *k)
        .collect();
    if keys.is_empty() {
        return None;
    }
    let column = |m: &Paired, ttft: bool| -> Vec<f64> {
        keys.iter()
            .map(|k| {
                let v = m[k];
                if ttft { v.1.unwrap_or(f64::NAN) } else { v.0 }
            })
            .collect()
    };
    let b = Bootstrap::new(keys.len(), boot.resamples, boot.seed);
    let ratio = |num: &[f64], den: &[f64]| b.interval(|i| Some(mean(num, i)? / mean(den, i)?));
    let (f_lat, f_ttft) = (column(&fcfs, false), column(&fcfs, true));
    let mut lat = BTreeMap::new();
    let mut ttft = BTreeMap::new();
    for (p, m) in &others {
        if let Some(x) = ratio(&f_lat, &column(m, false)) {
            lat.insert(p.to_string(), x);
        }
        if let Some(x) = ratio(&f_ttft, &column(m, true)) {
            ttft.insert(p.to_string(), x);
        }
    }
    let (share, share_null_because) = match (others.get("trail"), others.get("oracle")) {
        (Some(t), Some(o)) => match lat.get("oracle") {
            Some(gain) if gain.lo > 1.0 => {
                let (t, o) = (column(t, false), column(o, false));
                let share = b.interval(|i| {
                    let f = mean(&f_lat, i)?;
                    let gain = f - mean(&o, i)?;
                    let trail = mean(&t, i)?;
                    (gain != 0.0).then(|| (f - trail) / gain)
                });
                (share, None)
            }
            gain => (None, Some(no_clear_gain(gain))),
        },
        _ => (None, None),
    };
    Some(Comparison {
        load,
        paired_requests: keys.len(),
        fcfs_over_policy_mean_latency: lat,
        fcfs_over_policy_mean_ttft: ttft,
        trail_share_of_oracle_gain: share,
        trail_share_of_oracle_gain_null_because: share_null_because,
    })
}

/// Why the share of the oracle's gain is not reported, given FCFS / oracle in mean latency.
fn no_clear_gain(gain: Option<&Interval>) -> String {
    match gain {
        Some(g) => format!(
            "the oracle's gain over FCFS is not clearly positive: FCFS / oracle in mean latency is \
             {:.3} [{:.3}, {:.3}], an interval that does not lie above 1",
            g.value, g.lo, g.hi
        ),
        None => "no paired FCFS / oracle ratio".into(),
    }
}

/// Summarizes every row; `policies` fixes the order of the cells; goodput under `slo` where
/// given.
pub fn summarize(
    rows: &[ResultRow],
    policies: &[String],
    boot: BootstrapSettings,
    slo: Option<GoodputSlo>,
) -> Summary {
    let mut loads: Vec<f64> = rows.iter().map(|r| r.load).collect();
    loads.sort_by(f64::total_cmp);
    loads.dedup_by(|a, b| load_key(*a) == load_key(*b));
    let mut cells = Vec::new();
    let mut comparisons = Vec::new();
    for &load in &loads {
        let mut by_policy: BTreeMap<String, Vec<&ResultRow>> = BTreeMap::new();
        for r in rows.iter().filter(|r| load_key(r.load) == load_key(load)) {
            by_policy.entry(r.policy.clone()).or_default().push(r);
        }
        for p in policies {
            if let Some(rs) = by_policy.get(p) {
                cells.push(cell_stats(p, load, rs, boot, slo.as_ref()));
            }
        }
        comparisons.extend(comparison(load, &by_policy, boot));
    }
    Summary {
        cells,
        comparisons,
        bootstrap: boot,
        goodput_slo: slo,
        step_model: None,
        step_model_source: String::new(),
        simulated: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trail_eval::loadgen::RequestResult;

    fn row(policy: &str, seed: u64, index: usize, latency: f64, ttft: f64) -> ResultRow {
        ResultRow {
            policy: policy.into(),
            load: 0.8,
            rate_rps: 2.0,
            seed,
            target_tokens: Some(10),
            result: RequestResult {
                index,
                request_id: None,
                arrival_s: index as f64,
                sent_s: index as f64,
                ttft_s: Some(ttft),
                latency_s: latency,
                tpot_s: Some(0.01),
                itl_s: vec![0.01; 9],
                output_tokens: 10,
                prompt_tokens: Some(5),
                queue_s: Some(0.0),
                preemptions: Some(0),
                error: None,
            },
        }
    }

    #[test]
    fn ratios_and_the_oracle_share_are_computed_on_paired_requests() {
        let mut rows = Vec::new();
        for seed in [1, 2] {
            for i in 0..20 {
                let base = 1.0 + i as f64 * 0.1;
                rows.push(row("fcfs", seed, i, 4.0 * base, 2.0 * base));
                rows.push(row("trail", seed, i, 2.5 * base, 0.5 * base));
                rows.push(row("oracle", seed, i, 2.0 * base, 0.4 * base));
            }
        }
        // A failed FCFS request is left out of the pairing.
        rows[0].result.error = Some("boom".into());
        let policies = ["fcfs", "trail", "oracle"].map(String::from).to_vec();
        let boot = BootstrapSettings {
            resamples: 200,
            seed: 0,
        };
        let s = summarize(&rows, &policies, boot, None);
        assert_eq!(s.cells.len(), 3);
        assert_eq!(s.cells[0].policy, "fcfs");
        assert_eq!(s.cells[0].failed, 1);
        assert_eq!(s.cells[0].seeds, vec![1, 2]);
        let c = &s.comparisons[0];
        assert_eq!(c.paired_requests, 39);
        let r = c.fcfs_over_policy_mean_latency["trail"];
        assert!((r.value - 1.6).abs() < 1e-9, "{r:?}");
        assert!(r.lo <= r.value && r.value <= r.hi);
        assert!((c.fcfs_over_policy_mean_ttft["trail"].value - 4.0).abs() < 1e-9);
        // (4 − 2.5) / (4 − 2) = 0.75 on every resample: the latencies are proportional.
        let share = c.trail_share_of_oracle_gain.unwrap();
        assert!((share.value - 0.75).abs() < 1e-9, "{share:?}");
        assert!((share.lo - 0.75).abs() < 1e-9 && (share.hi - 0.75).abs() < 1e-9);
        assert!(c.trail_share_of_oracle_gain_null_because.is_none());
    }

    #[test]
    fn the_oracle_share_is_null_with_its_reason_where_the_oracle_gains_nothing() {
        let mut rows = Vec::new();
        for i in 0..20 {
            let base = 1.0 + i as f64 * 0.1;
            // Both slower than FCFS (preemption by recompute): the ratio would read 2.33.
            rows.push(row("fcfs", 1, i, 4.0 * base, 2.0 * base));
            rows.push(row("trail", 1, i, 6.0 * base, 0.5 * base));
            rows.push(row("oracle", 1, i, 4.6 * base, 0.4 * base));
        }
        let policies = ["fcfs", "trail", "oracle"].map(String::from).to_vec();
        let boot = BootstrapSettings {
            resamples: 100,
            seed: 0,
        };
        let c = &summarize(&rows, &policies, boot, None).comparisons[0];
        assert!(c.trail_share_of_oracle_gain.is_none());
        let why = c
            .trail_share_of_oracle_gain_null_because
            .as_deref()
            .unwrap();
        assert!(why.contains("not clearly positive"), "{why}");
    }

    /// `trail run` reads `summary.json` back through the typed summary: every figure comes
    /// back (floats to the bit), and the file's keys sort as before.
    #[test]
    fn summary_json_reads_back_as_the_summary_it_was_written_from() {
        use crate::stages::engine_args::EngineArgs;
        use trail_serving_shim::PreemptionMode;

        let mut rows = Vec::new();
        for i in 0..20 {
            let base = 1.0 + i as f64 * 0.137;
            rows.push(row("fcfs", 3, i, 4.0 * base, 2.0 * base));
            rows.push(row("trail", 3, i, 2.5 * base, 0.5 * base));
            rows.push(row("oracle", 3, i, 2.0 * base, 0.4 * base));
        }
        let policies = ["fcfs", "trail", "oracle"].map(String::from).to_vec();
        let boot = BootstrapSettings {
            resamples: 50,
            seed: 0,
        };
        let mut s = summarize(&rows, &policies, boot, None);
        s.step_model = Some(StepTimeModel::constant(0.1));
        s.step_model_source = "given".into();
        s.cells[0].engine = Some(EngineFigures {
            steps: 7,
            policy_preemptions: 1,
            memory_preemptions: 2,
            relative_step_time: BTreeMap::from([(3, 1.0 / 3.0)]),
        });
        s.simulated.push(Headroom {
            load: 0.8,
            requests: 20,
            fcfs_mean_latency_s: 1.5,
            oracle_mean_latency_s: 1.25,
            fcfs_over_oracle: 1.2,
            fcfs_sensitivity_to_slower_steps: 0.1,
        });
        let engine = EngineArgs {
            max_running: 8,
            kv_budget_tokens: 16384,
            prefill_chunk: None,
            preemption: PreemptionMode::Swap,
            swap_budget_tokens: None,
        };
        let settings = Settings {
            common: super::super::config::Common {
                requests: 20,
                ignore_eos: true,
                clip_output_tokens: None,
                max_tokens: 512,
                clamp_to_profiled_length: false,
                backend: super::super::BackendKind::Virtual,
                engine,
                c: 0.8,
                refine_every: None,
                saturation_requests: 64,
                saturation_rps: None,
                burstiness: 1.0,
            },
            data_requests_sha256: "00".into(),
            checkpoint_sha256: None,
            bert_checkpoint_sha256: Some("11".into()),
            model: "model.gguf".into(),
            model_sha256: "22".into(),
            step_model: None,
            step_model_sha256: None,
            client: None,
        };
        let sat = Saturation {
            rps: 0.5668665776748135,
            source: "measured".into(),
            requests: 64,
            completed: 64,
            makespan_s: 112.9,
            output_tokens_per_s: 131.66804860038968,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        SummaryFile {
            schema_version: SUMMARY_SCHEMA_VERSION,
            saturation: &sat,
            settings: &settings,
            policies: &policies,
            loads: &[0.8],
            seeds: &[3],
            summary: &s,
        }
        .write(&path)
        .unwrap();
        let back = read_summary(&path).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&s).unwrap()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  \"") && l.contains("\":"))
            .map(|l| l.trim().split('"').nth(1).unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "loads",
                "policies",
                "saturation",
                "schema_version",
                "seeds",
                "settings",
                "summary"
            ]
        );
        assert!(
            text.contains("\"bootstrap\": {")
                && text.find("\"bootstrap\"") < text.find("\"cells\"")
                && text.find("\"backend\"") < text.find("\"bert_checkpoint_sha256\""),
            "nested keys sort too"
        );
    }

    #[test]
    fn without_fcfs_there_is_no_comparison() {
        let rows: Vec<ResultRow> = (0..5).map(|i| row("trail", 1, i, 1.0, 0.5)).collect();
        let s = summarize(
            &rows,
            &["trail".to_string()],
            BootstrapSettings {
                resamples: 10,
                seed: 0,
            },
            None,
        );
        assert_eq!(s.cells.len(), 1);
        assert!(s.comparisons.is_empty());
        assert!((s.cells[0].mean_latency_s.unwrap().value - 1.0).abs() < 1e-12);
    }
}
