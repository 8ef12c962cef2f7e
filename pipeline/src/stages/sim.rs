//! `trail sim`: queueing theory and simulation of size-based scheduling.
//!
//! * `trail sim theory --out DIR`: closed-form M/G/1 mean response times per policy and load,
//!   and versus the preemption limit c of TRAIL's limited preemption.
//! * `trail sim des --out DIR`: the same closed forms against a discrete-event simulation with
//!   batch-means 95 % intervals.
//!
//! Both write `summary.json`, `report.md`, PNG plots and `manifest.json` into `DIR`
//! atomically. (The trace-driven serving simulator will be a third subcommand, `trace`.)

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use trail_eval::plot::{self, Axes, Series};
use trail_eval::{CappedMixture, Joint, Policy, Predictions, SimConfig, Sizes};

use crate::manifest::{Manifest, write_atomic};

/// Arguments of `trail sim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: SimCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum SimCommand {
    /// Closed-form M/G/1 mean response times (FCFS, SRPT, SPRPT, limited preemption, SJF).
    Theory(TheoryArgs),
    /// Closed forms against a discrete-event simulation (batch-means 95 % intervals).
    Des(DesArgs),
}

/// The job-size law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Law {
    /// Capped log-normal like SmolLM2's Alpaca answers: median 92, 27 % at the 512 cap.
    Alpaca,
    /// Exponential with mean 1.
    Exp,
}

/// The workload and the grid of loads and preemption limits.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Workload {
    /// Parametric size law (ignored with --sizes).
    #[arg(long, value_enum, default_value = "alpaca")]
    pub law: Law,
    /// Empirical sizes: a text file with one positive length per line.
    #[arg(long)]
    pub sizes: Option<PathBuf>,
    /// Log-normal prediction error: y = x·exp(sigma·Z). Without it, predictions are exact.
    #[arg(long)]
    pub pred_sigma: Option<f64>,
    /// Loads ρ = λ·E[X].
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9,0.95")]
    pub loads: Vec<f64>,
    /// The preemption limit c of SPRPT-limited in the per-load table.
    #[arg(long, default_value_t = 0.5)]
    pub c: f64,
    /// Preemption limits for the sweep at --c-load.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.1,0.2,0.3,0.5,0.75,1,2"
    )]
    pub c_values: Vec<f64>,
    /// The load of the c sweep.
    #[arg(long, default_value_t = 0.9)]
    pub c_load: f64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `trail sim theory`.
#[derive(Debug, clap::Args, Serialize)]
pub struct TheoryArgs {
    #[command(flatten)]
    pub workload: Workload,
}

/// Arguments of `trail sim des`.
#[derive(Debug, clap::Args, Serialize)]
pub struct DesArgs {
    #[command(flatten)]
    pub workload: Workload,
    /// Measured jobs per run at loads up to 0.7; higher loads get ((1−0.7)/(1−ρ))² times as
    /// many, up to --max-jobs.
    #[arg(long, default_value_t = 2_000_000)]
    pub jobs: u64,
    #[arg(long, default_value_t = 40_000_000)]
    pub max_jobs: u64,
    /// Jobs discarded at the start of each run.
    #[arg(long, default_value_t = 50_000)]
    pub warmup: u64,
    /// Batches for the batch-means interval.
    #[arg(long, default_value_t = 40)]
    pub batches: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        SimCommand::Theory(a) => run_grid(&a.workload, None, "sim theory", &a),
        SimCommand::Des(a) => run_grid(&a.workload, Some(&a), "sim des", &a),
    }
}

/// One row: a policy at a load.
#[derive(Debug, Clone, Serialize)]
struct Row {
    policy: String,
    load: f64,
    c: Option<f64>,
    closed_form: f64,
    simulated: Option<f64>,
    ci95: Option<f64>,
    /// |closed form − simulated| / simulated.
    rel_error: Option<f64>,
    jobs: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Summary {
    workload: String,
    mean_size: f64,
    seed: Option<u64>,
    by_load: Vec<Row>,
    c_sweep: Vec<Row>,
    /// FCFS / SRPT mean response time per load (closed form, and simulated where run).
    fcfs_over_srpt: Vec<(f64, f64, Option<f64>)>,
}

fn joint(w: &Workload) -> anyhow::Result<Joint> {
    let sizes = match &w.sizes {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let mut v = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                v.push(line.parse::<f64>().with_context(|| {
                    format!("{}:{}: not a number: {line:?}", path.display(), i + 1)
                })?);
            }
            Sizes::empirical(v).with_context(|| format!("{}", path.display()))?
        }
        None => match w.law {
            Law::Alpaca => Sizes::Capped(CappedMixture::alpaca_like()),
            Law::Exp => Sizes::exponential(1.0)?,
        },
    };
    let predictions = match w.pred_sigma {
        Some(sigma) => Predictions::LogNormal { sigma },
        None => Predictions::Exact,
    };
    Ok(Joint::model(sizes, predictions)?)
}

fn policies(c: f64) -> Vec<Policy> {
    vec![
        Policy::Fcfs,
        Policy::Srpt,
        Policy::Sprpt,
        Policy::SprptLimited { c },
        Policy::SjfPredicted,
    ]
}

fn jobs_at(d: &DesArgs, load: f64) -> u64 {
    let scale = (0.3 / (1.0 - load)).powi(2).max(1.0);
    ((d.jobs as f64 * scale) as u64).min(d.max_jobs.max(d.jobs))
}

fn run_grid(
    w: &Workload,
    des: Option<&DesArgs>,
    stage: &str,
    config: &impl Serialize,
) -> anyhow::Result<()> {
    let joint = joint(w)?;
    for &l in w.loads.iter().chain([&w.c_load]) {
        trail_eval::theory::check_load(l)?;
    }
    let seed = des.map(|d| d.seed);
    let mut manifest = Manifest::start(stage, config, seed)?;
    if let Some(p) = &w.sizes {
        manifest.input(p, &w.out)?;
    }

    // Every (policy, load) to evaluate: the per-load table, then the c sweep.
    let mut cells: Vec<(Policy, f64, bool)> = Vec::new();
    for &load in &w.loads {
        cells.extend(policies(w.c).into_iter().map(|p| (p, load, false)));
    }
    for &c in &w.c_values {
        cells.push((Policy::SprptLimited { c }, w.c_load, true));
    }

    let bar = des.map(|d| {
        let total: u64 = cells.iter().map(|&(_, load, _)| jobs_at(d, load)).sum();
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg:>28} [{bar:40}] {percent:>3}% eta {eta}")
                .expect("valid template"),
        );
        bar
    });

    let mut by_load = Vec::new();
    let mut c_sweep = Vec::new();
    for (i, &(policy, load, sweep)) in cells.iter().enumerate() {
        let closed_form = trail_eval::mean_response(&joint, policy, load)?;
        let mut row = Row {
            policy: policy.name(),
            load,
            c: match policy {
                Policy::SprptLimited { c } => Some(c),
                _ => None,
            },
            closed_form,
            simulated: None,
            ci95: None,
            rel_error: None,
            jobs: None,
        };
        if let (Some(d), Some(bar)) = (des, &bar) {
            bar.set_message(format!("{} @ {load}", policy.name()));
            let cfg = SimConfig {
                load,
                jobs: jobs_at(d, load),
                warmup: d.warmup,
                batches: d.batches,
                // A stream per cell, fixed by the seed and the cell's position in the grid.
                seed: d.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
            };
            let mut seen = 0;
            let sim = trail_eval::simulate(&joint, policy, &cfg, &mut |done| {
                bar.inc(done - seen);
                seen = done;
            })?;
            bar.inc(cfg.jobs.saturating_sub(seen));
            row.simulated = Some(sim.mean);
            row.ci95 = Some(sim.ci95);
            row.rel_error = Some((closed_form - sim.mean).abs() / sim.mean);
            row.jobs = Some(sim.jobs);
        }
        if sweep {
            c_sweep.push(row)
        } else {
            by_load.push(row)
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let find = |name: &str, load: f64| by_load.iter().find(|r| r.policy == name && r.load == load);
    let fcfs_over_srpt = w
        .loads
        .iter()
        .filter_map(|&l| {
            let (f, s) = (find("fcfs", l)?, find("srpt", l)?);
            let sim = f.simulated.zip(s.simulated).map(|(a, b)| a / b);
            Some((l, f.closed_form / s.closed_form, sim))
        })
        .collect();
    let summary = Summary {
        workload: joint.describe(),
        mean_size: joint.mean_size(),
        seed,
        by_load,
        c_sweep,
        fcfs_over_srpt,
    };

    let out = &w.out;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let summary_path = out.join("summary.json");
    write_atomic(
        &summary_path,
        (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(),
    )?;
    manifest.output(&summary_path, out)?;
    let report_path = out.join("report.md");
    write_atomic(&report_path, report(&summary, w, des).as_bytes())?;
    manifest.output(&report_path, out)?;
    for path in plots(&summary, w, out)? {
        manifest.output(&path, out)?;
    }
    manifest.results = serde_json::json!({
        "cells": cells.len(),
        "max_rel_error": summary.by_load.iter().chain(&summary.c_sweep)
            .filter_map(|r| r.rel_error).fold(0.0_f64, f64::max),
    });
    let path = manifest.finish(out)?;
    println!("{}", path.display());
    Ok(())
}

fn plots(s: &Summary, w: &Workload, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let names: Vec<String> = policies(w.c).iter().map(Policy::name).collect();
    let mut series = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let rows: Vec<&Row> = s.by_load.iter().filter(|r| &r.policy == name).collect();
        series.push(
            Series::line(name, rows.iter().map(|r| (r.load, r.closed_form)).collect())
                .with_color(k),
        );
        if rows.iter().all(|r| r.simulated.is_some()) && !rows.is_empty() {
            series.push(
                Series::points(
                    "",
                    rows.iter()
                        .map(|r| (r.load, r.simulated.unwrap_or(0.0)))
                        .collect(),
                )
                .with_err(rows.iter().map(|r| r.ci95.unwrap_or(0.0)).collect())
                .with_color(k),
            );
        }
    }
    let load_path = out.join("response_vs_load.png");
    let title = "Mean response time vs load (lines: closed form; points: simulation ±95 %)";
    plot::line_chart(
        &load_path,
        &Axes::new(title, "load ρ", "mean response time").log_y(),
        &series,
    )?;

    let mut sweep = vec![
        Series::line(
            "closed form",
            s.c_sweep
                .iter()
                .map(|r| (r.c.unwrap_or(0.0), r.closed_form))
                .collect(),
        )
        .with_color(3),
    ];
    if s.c_sweep.iter().all(|r| r.simulated.is_some()) && !s.c_sweep.is_empty() {
        sweep.push(
            Series::points(
                "simulated",
                s.c_sweep
                    .iter()
                    .map(|r| (r.c.unwrap_or(0.0), r.simulated.unwrap_or(0.0)))
                    .collect(),
            )
            .with_err(s.c_sweep.iter().map(|r| r.ci95.unwrap_or(0.0)).collect())
            .with_color(3),
        );
    }
    let c_path = out.join("response_vs_c.png");
    let title = format!("SPRPT with limited preemption at load {}", w.c_load);
    plot::line_chart(
        &c_path,
        &Axes::new(&title, "preemption limit c", "mean response time"),
        &sweep,
    )?;
    Ok(vec![load_path, c_path])
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn report(s: &Summary, w: &Workload, des: Option<&DesArgs>) -> String {
    let mut md = String::new();
    md.push_str("# M/G/1 mean response time: closed form");
    md.push_str(if des.is_some() {
        " vs discrete-event simulation\n\n"
    } else {
        "\n\n"
    });
    md.push_str(&format!(
        "Workload: {} (mean size {:.4}).\n\n",
        s.workload, s.mean_size
    ));
    md.push_str(
        "Closed forms: SOAP with ties (FCFS among equal ranks), see `trail_eval::theory`. \
         SPRPT-limited(c): preemptible while attained ≤ c × prediction. ",
    );
    if let Some(d) = des {
        md.push_str(&format!(
            "Simulation: {} warm-up jobs, {} batches, seed {}; ci95 is the half-width of the \
             batch-means 95 % interval; rel error = |closed − simulated| / simulated.\n\n",
            d.warmup, d.batches, d.seed
        ));
    } else {
        md.push_str("\n\n");
    }
    md.push_str("## By load\n\n| policy | load | closed form | simulated | ci95 | ci95 % | rel error % | jobs |\n|---|---|---|---|---|---|---|---|\n");
    for r in s.by_load.iter().chain(&s.c_sweep) {
        md.push_str(&format!(
            "| {} | {} | {:.4} | {} | {} | {} | {} | {} |\n",
            r.policy,
            r.load,
            r.closed_form,
            fmt_opt(r.simulated, 4),
            fmt_opt(r.ci95, 4),
            fmt_opt(r.ci95.zip(r.simulated).map(|(c, m)| 100.0 * c / m), 2),
            fmt_opt(r.rel_error.map(|e| 100.0 * e), 2),
            r.jobs.map(|j| j.to_string()).unwrap_or_else(|| "–".into()),
        ));
    }
    md.push_str("\n## FCFS / SRPT\n\n| load | closed form | simulated |\n|---|---|---|\n");
    for (l, c, sim) in &s.fcfs_over_srpt {
        md.push_str(&format!("| {l} | {c:.3} | {} |\n", fmt_opt(*sim, 3)));
    }
    md.push_str(&format!(
        "\n(The c sweep rows are at load {}. With the rank y − a, a job past its prediction has a \
         negative rank that no arrival can beat, so every c ≥ 1 equals SPRPT.)\n\n![response vs load](response_vs_load.png)\n\n![response vs c](response_vs_c.png)\n",
        w.c_load
    ));
    md
}
