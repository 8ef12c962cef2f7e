//! `report.md` and the plots of a latency run: mean latency and mean TTFT against load per
//! policy (with the bootstrap intervals as error bars) and latency CDFs per load.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use trail_checkpoints::metrics::Interval;
use trail_eval::loadgen::ResultRow;
use trail_plot::{self as plot, Axes, Mark, Series};

use super::benchmark::{BenchmarkMetrics, GoodputSlo};
use super::summary::{CellStats, Summary, load_key};

/// Writes the plots into `dir`, each PNG with its SVG beside it; returns their paths.
pub fn plots(
    dir: &Path,
    summary: &Summary,
    rows: &[ResultRow],
    policies: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    plot::init_font()?;
    let mut written = Vec::new();
    let by_policy = |pick: fn(&CellStats) -> Option<Interval>| -> Vec<Series> {
        policies
            .iter()
            .enumerate()
            .filter_map(|(k, p)| {
                let cells: Vec<(f64, Interval)> = summary
                    .cells
                    .iter()
                    .filter(|c| &c.policy == p)
                    .filter_map(|c| pick(c).map(|i| (c.load, i)))
                    .collect();
                (!cells.is_empty()).then(|| {
                    Series::line(
                        display_name(p),
                        cells.iter().map(|(l, i)| (*l, i.value)).collect(),
                    )
                    .with_interval(cells.iter().map(|(_, i)| (i.lo, i.hi)).collect())
                    .with_mark(Mark::LinePoints)
                    .with_color(k)
                })
            })
            .collect()
    };
    let path = dir.join("latency_vs_load.png");
    plot::line_chart(
        &path,
        &Axes::new(
            "Mean end-to-end latency (95 % bootstrap interval)",
            "load (fraction of saturation)",
            "mean latency (s)",
        ),
        &by_policy(|c| c.mean_latency_s),
    )?;
    written.push(path);
    let path = dir.join("ttft_vs_load.png");
    plot::line_chart(
        &path,
        &Axes::new(
            "Mean time to first token (95 % bootstrap interval)",
            "load (fraction of saturation)",
            "mean TTFT (s)",
        ),
        &by_policy(|c| c.mean_ttft_s),
    )?;
    written.push(path);
    if let Some(path) = headline(dir, summary)? {
        written.push(path);
    }
    let mut loads: BTreeMap<String, f64> = BTreeMap::new();
    for c in &summary.cells {
        loads.insert(load_key(c.load), c.load);
    }
    for (key, _) in loads {
        let samples: Vec<(String, Vec<f64>)> = policies
            .iter()
            .filter_map(|p| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| {
                        &r.policy == p && load_key(r.load) == key && r.result.error.is_none()
                    })
                    .map(|r| r.result.latency_s)
                    .collect();
                (!v.is_empty()).then(|| (display_name(p).to_string(), v))
            })
            .collect();
        let path = dir.join(format!("latency_cdf_load={key}.png"));
        plot::cdf_chart(
            &path,
            &Axes::new(
                &format!("Latency CDF at load {key}"),
                "end-to-end latency (s)",
                "fraction of requests",
            ),
            &samples,
        )?;
        written.push(path);
    }
    Ok(written)
}

/// The headline: FCFS's mean latency over each policy's against load, with the paired
/// bootstrap intervals as they are, and parity (1) drawn; none without a comparison.
fn headline(dir: &Path, summary: &Summary) -> anyhow::Result<Option<PathBuf>> {
    let mut by_policy: BTreeMap<&str, Vec<(f64, Interval)>> = BTreeMap::new();
    for c in &summary.comparisons {
        for (p, r) in &c.fcfs_over_policy_mean_latency {
            by_policy.entry(p.as_str()).or_default().push((c.load, *r));
        }
    }
    if by_policy.is_empty() {
        return Ok(None);
    }
    let loads: Vec<f64> = summary.comparisons.iter().map(|c| c.load).collect();
    let (lo, hi) = loads
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &l| {
            (a.min(l), b.max(l))
        });
    let mut series = vec![Series::line("parity (no gain)", vec![(lo, 1.0), (hi, 1.0)])];
    for (k, (p, pts)) in by_policy.into_iter().enumerate() {
        series.push(
            Series::line(
                display_name(p),
                pts.iter().map(|(l, i)| (*l, i.value)).collect(),
            )
            .with_interval(pts.iter().map(|(_, i)| (i.lo, i.hi)).collect())
            .with_mark(Mark::LinePoints)
            .with_color(k + 1),
        );
    }
    let path = dir.join("fcfs_over_policy_vs_load.png");
    plot::line_chart(
        &path,
        &Axes::new(
            "FCFS mean latency ÷ policy's (paired 95 % bootstrap interval)",
            "load (fraction of saturation)",
            "FCFS ÷ policy (> 1: policy faster)",
        ),
        &series,
    )?;
    Ok(Some(path))
}

/// How a paper names a policy.
pub fn display_name(policy: &str) -> &str {
    match policy {
        "fcfs" => "FCFS",
        "trail" => "TRAIL",
        "sprpt" => "SPRPT",
        "sjf-bert" => "SJF (BERT)",
        "oracle" => "Oracle (true lengths)",
        other => other,
    }
}

fn iv(i: Option<Interval>) -> String {
    match i {
        Some(i) => format!("{:.2} [{:.2}, {:.2}]", i.value, i.lo, i.hi),
        None => "–".into(),
    }
}

fn val(i: Option<Interval>) -> String {
    i.map_or("–".into(), |i| format!("{:.2}", i.value))
}

/// The settings block of the report: one `key: value` line each.
pub type Settings = Vec<(String, String)>;

/// The figures `benchmark_serving.py` prints, one row per policy (cells summarised before
/// they existed have none).
fn benchmark_table(md: &mut String, cells: &[&CellStats], slo: Option<&GoodputSlo>) {
    let rows: Vec<(&str, &BenchmarkMetrics)> = cells
        .iter()
        .filter_map(|c| Some((c.policy.as_str(), c.benchmark.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let goodput = slo.map_or(String::new(), |s| {
        format!("; goodput under {}", s.describe())
    });
    let _ = writeln!(
        md,
        "
As vLLM's `benchmark_serving.py` reports them (ms; TPOT and ITL as it defines them;          TTFT and E2EL from the scheduled arrival{goodput}):
"
    );
    let _ = writeln!(
        md,
        "| policy | completed | duration (s) | req/s | output tok/s | total tok/s | goodput (req/s) \
         | TTFT mean / median / p99 | TPOT mean / median / p99 | ITL mean / median / p99 | E2EL \
         mean / median / p99 |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |x: Option<f64>| x.map_or("–".into(), |x| format!("{:.1}", 1e3 * x));
    let three = |a, b, c| format!("{} / {} / {}", ms(a), ms(b), ms(c));
    for (p, b) in rows {
        let _ = writeln!(
            md,
            "| {p} | {} | {:.1} | {:.3} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            b.completed,
            b.duration_s,
            b.request_throughput_rps,
            b.output_throughput_tokens_per_s,
            b.total_token_throughput_tokens_per_s,
            b.request_goodput_rps
                .map_or("–".into(), |g| format!("{g:.3}")),
            three(b.mean_ttft_s, b.median_ttft_s, b.p99_ttft_s),
            three(b.mean_tpot_s, b.median_tpot_s, b.p99_tpot_s),
            three(b.mean_itl_s, b.median_itl_s, b.p99_itl_s),
            three(b.mean_e2el_s, b.median_e2el_s, b.p99_e2el_s),
        );
    }
}

/// `report.md`.
pub fn markdown(summary: &Summary, settings: &Settings, plots: &[PathBuf]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Latency: policies side by side on the real engine\n");
    let _ = writeln!(md, "## Settings\n");
    for (k, v) in settings {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "\nIntervals are 95 % request-bootstrap intervals ({} resamples); requests are pooled \
         over seeds. Latency and TTFT are measured from each request's scheduled arrival. Queue \
         time and preemptions per request are the server's figures (\"–\" where the backend \
         reported none). The step-log columns come from each cell's servers: the preemptions they \
         planned, and per seed the relative step time: the server's decode steps took that many \
         times the seconds a step-time model fitted to every cell's log gives them. On a quiet \
         machine it is the same in every cell; where it is not, the machine's speed changed \
         between cells (other work on the host) and the comparison is confounded by it: the \
         simulated sensitivity under each load says by how much. On virtual time (`--backend \
         virtual`) it is \"–\": every step takes the step-time model's seconds by construction.\n",
        summary.bootstrap.resamples
    );
    let mut loads: Vec<f64> = summary.cells.iter().map(|c| c.load).collect();
    loads.dedup_by(|a, b| load_key(*a) == load_key(*b));
    for load in loads {
        let key = load_key(load);
        let cells: Vec<&CellStats> = summary
            .cells
            .iter()
            .filter(|c| load_key(c.load) == key)
            .collect();
        let rate = cells.first().map_or(0.0, |c| c.rate_rps);
        let _ = writeln!(md, "## Load {key} ({rate:.3} requests/s)\n");
        let _ = writeln!(
            md,
            "| policy | requests | failed | mean latency (s) | p50 | p90 | p99 | mean TTFT (s) | \
             p50 TTFT | mean TPOT (ms) | mean queue (s) | preemptions/request | throughput (req/s) | \
             preemptions policy/memory (step log) | relative step time per seed (step log) |"
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in &cells {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {} | {} |",
                c.policy,
                c.requests,
                c.failed,
                iv(c.mean_latency_s),
                val(c.p50_latency_s),
                val(c.p90_latency_s),
                val(c.p99_latency_s),
                iv(c.mean_ttft_s),
                val(c.p50_ttft_s),
                c.mean_tpot_s
                    .map_or("–".into(), |t| format!("{:.1}", t * 1e3)),
                c.mean_queue_s.map_or("–".into(), |t| format!("{t:.2}")),
                c.mean_preemptions.map_or("–".into(), |t| format!("{t:.2}")),
                c.throughput_rps,
                c.engine.as_ref().map_or("–".into(), |e| format!(
                    "{}/{}",
                    e.policy_preemptions, e.memory_preemptions
                )),
                c.engine
                    .as_ref()
                    .filter(|e| !e.relative_step_time.is_empty())
                    .map_or("–".into(), |e| e
                        .relative_step_time
                        .values()
                        .map(|r| format!("{r:.3}"))
                        .collect::<Vec<_>>()
                        .join(", ")),
            );
        }
        benchmark_table(&mut md, &cells, summary.goodput_slo.as_ref());
        if let Some(cmp) = summary.comparisons.iter().find(|c| load_key(c.load) == key) {
            let _ = writeln!(
                md,
                "\nFCFS over each policy, paired on the {} requests all of them completed \
                 (> 1: the policy is faster):\n",
                cmp.paired_requests
            );
            let _ = writeln!(md, "| policy | mean latency ratio | mean TTFT ratio |");
            let _ = writeln!(md, "|---|---|---|");
            for (p, r) in &cmp.fcfs_over_policy_mean_latency {
                let _ = writeln!(
                    md,
                    "| {p} | {} | {} |",
                    iv(Some(*r)),
                    iv(cmp.fcfs_over_policy_mean_ttft.get(p).copied())
                );
            }
            if let Some(s) = cmp.trail_share_of_oracle_gain {
                let _ = writeln!(
                    md,
                    "\nTRAIL's share of the oracle's gain over FCFS in mean latency, (FCFS − \
                     TRAIL) / (FCFS − oracle): {} (goal ≥ 0.90; meaningful only where the \
                     oracle beats FCFS).",
                    iv(Some(s))
                );
            } else if let Some(why) = &cmp.trail_share_of_oracle_gain_null_because {
                let _ = writeln!(
                    md,
                    "\nTRAIL's share of the oracle's gain over FCFS is not reported: {why}."
                );
            }
        }
        if let Some(h) = summary.simulated.iter().find(|h| load_key(h.load) == key) {
            let _ = writeln!(
                md,
                "\nSimulated on the same traces ({} requests) with the step-time model ({}; \
                 `trail sim trace`'s scheduler): FCFS {:.2} s, oracle {:.2} s in mean latency, so \
                 no policy can gain more than {:.2}× over FCFS here. With every step {:.0} % \
                 slower, FCFS's mean latency grows {:.1} %.",
                h.requests,
                summary.step_model_source,
                h.fcfs_mean_latency_s,
                h.oracle_mean_latency_s,
                h.fcfs_over_oracle,
                100.0 * super::headroom::SLOWDOWN,
                100.0 * h.fcfs_sensitivity_to_slower_steps
            );
        }
        let _ = writeln!(md);
    }
    if let Some(m) = &summary.step_model {
        let _ = writeln!(
            md,
            "Step-time model ({}): {:.2} ms + {:.3} ms per decode row + {:.3} ms per prefill \
             token + {:.2} µs per KV token.\n",
            summary.step_model_source,
            1e3 * m.base_s,
            1e3 * m.per_decode_row_s,
            1e3 * m.per_prefill_token_s,
            1e6 * m.per_kv_token_s
        );
    }
    let _ = writeln!(
        md,
        "## For scale\n\nThe paper reports 1.66–2.01× lower mean latency and 1.76–24× lower mean \
         TTFT for TRAIL than FCFS (vLLM, Llama-3-8B on A100). In an M/G/1 queue with SmolLM2's \
         Alpaca output lengths, even oracle SRPT is only 1.83× better than FCFS at load 0.8 and \
         2.25× at 0.95 (issue 7).\n"
    );
    if !plots.is_empty() {
        let _ = writeln!(md, "## Plots\n");
        for p in plots {
            if let Some(name) = p.file_name() {
                let name = name.to_string_lossy();
                let _ = writeln!(md, "![{name}]({name})");
            }
        }
    }
    md
}
