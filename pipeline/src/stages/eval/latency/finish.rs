//! The end of a run: every finished cell of the grid asked for merged into `results.parquet`,
//! the [`Summary`] (with the step-time model and the simulated headroom) in `summary.json`,
//! `report.md` with its plots, and the manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use trail_eval::loadgen::{ResultRow, read_results, write_results};
use trail_eval::tracesim::{StepSample, StepTimeModel};
use trail_serving_shim::StepRecord;

use super::Args;
use super::cell::Cell;
use super::config::{Config, Settings, describe_lengths};
use super::grid::Grid;
use super::headroom;
use super::report;
use super::saturation::Saturation;
use super::summary::{self, BootstrapSettings, EngineFigures, Summary, SummaryFile, load_key};
use crate::manifest::{Manifest, write_atomic};
use crate::stages::step_model;

/// One seed's server step log.
type SeedLog = (u64, Vec<StepRecord>);

/// Step logs by (policy, load key).
type StepLogs = BTreeMap<(String, String), Vec<SeedLog>>;

/// What the end of a run reads.
pub struct Inputs<'a> {
    pub args: &'a Args,
    pub cfg: &'a Config,
    pub settings: &'a Settings,
    pub sat: &'a Saturation,
    pub grid: &'a Grid,
    /// The virtual clock's step-time model (`--backend virtual`).
    pub virtual_model: Option<StepTimeModel>,
    /// The in-process model's kernels.
    pub kernel_id: Option<String>,
    /// Cells this invocation ran.
    pub cells_run_now: usize,
}

/// Merges, summarises, reports and writes the manifest; returns the report's path.
pub fn finish(r: &Inputs<'_>) -> anyhow::Result<PathBuf> {
    let out = &r.args.out;
    let (rows, step_logs) = merge(r.grid, out, r.args.requests)?;
    let results_path = out.join("results.parquet");
    write_results(&results_path, &rows)?;
    let summary = summarize(r, &rows, &step_logs)?;
    let summary_path = out.join("summary.json");
    SummaryFile {
        schema_version: summary::SUMMARY_SCHEMA_VERSION,
        saturation: r.sat,
        settings: r.settings,
        policies: &r.cfg.names,
        loads: &r.args.loads,
        seeds: &r.args.seeds,
        summary: &summary,
    }
    .write(&summary_path)?;
    let plots = report::plots(out, &summary, &rows, &r.cfg.names)?;
    let report_path = out.join("report.md");
    write_atomic(
        &report_path,
        report::markdown(&summary, &report_settings(r), &plots).as_bytes(),
    )?;
    let svgs: Vec<PathBuf> = plots.iter().map(|p| p.with_extension("svg")).collect();
    let outputs: Vec<&Path> = [&results_path, &summary_path, &report_path]
        .into_iter()
        .chain(&plots)
        .chain(&svgs)
        .map(PathBuf::as_path)
        .collect();
    write_manifest(r, &outputs, &rows)?;
    Ok(report_path)
}

/// Every finished cell's rows in merge order, and the step logs beside them; a cell not
/// finished, or without one row per request of its trace, is an error.
fn merge(grid: &Grid, out: &Path, requests: usize) -> anyhow::Result<(Vec<ResultRow>, StepLogs)> {
    let mut all = Vec::new();
    let mut missing = Vec::new();
    let mut step_logs = StepLogs::new();
    for cell in grid.cells() {
        let path = cell.results(out);
        if !path.is_file() {
            missing.push(path);
            continue;
        }
        let rows = read_results(&path)?;
        let steps = path.with_file_name("steps.parquet");
        if steps.is_file() {
            step_logs
                .entry(log_key(&cell))
                .or_default()
                .push((cell.seed, trail_serving_shim::steps::read(&steps)?));
        }
        check_rows(&path, &rows, requests)?;
        all.extend(rows);
    }
    anyhow::ensure!(missing.is_empty(), "cells not finished: {missing:?}");
    Ok((all, step_logs))
}

fn log_key(cell: &Cell) -> (String, String) {
    (cell.policy.as_str().to_string(), load_key(cell.load))
}

/// A cell's results hold one row per request of its trace.
fn check_rows(path: &Path, rows: &[ResultRow], requests: usize) -> anyhow::Result<()> {
    let mut seen = vec![false; requests];
    for r in rows {
        if let Some(s) = seen.get_mut(r.result.index) {
            *s = true;
        }
    }
    anyhow::ensure!(
        rows.len() == requests && seen.iter().all(|s| *s),
        "{}: {} rows, expected one per request of the trace ({})",
        path.display(),
        rows.len(),
        requests
    );
    Ok(())
}

/// The summary of `rows`, with the step-time model, each cell's engine figures and the
/// simulated headroom at each load.
fn summarize(r: &Inputs<'_>, rows: &[ResultRow], logs: &StepLogs) -> anyhow::Result<Summary> {
    let boot = BootstrapSettings {
        resamples: r.args.bootstrap,
        seed: 0,
    };
    let mut summary = summary::summarize(rows, &r.cfg.names, boot, r.args.client.goodput);
    // On virtual time the cells' latencies follow the virtual clock's model, so the simulated
    // headroom uses it too (the logs' wall-clock step times only say how busy the machine was).
    summary.step_model_source = match (&r.virtual_model, &r.args.step_model) {
        (Some(_), Some(path)) => format!(
            "the virtual clock's, given ({})",
            trail_fs::portable_path(path, &r.args.out)
        ),
        (Some(_), None) if r.args.out.join("saturation/steps.parquet").is_file() => {
            "the virtual clock's, fitted to the saturation burst's step log".into()
        }
        (Some(_), None) => "the virtual clock's, kept in step_model.json".into(),
        (None, _) => "fitted to every cell's step log".into(),
    };
    summary.step_model = step_model(r.virtual_model, logs)?;
    // A virtual cell's wall-clock step times are those of replaying, not of the machine's speed:
    // no relative step time there.
    let machine_model = summary
        .step_model
        .as_ref()
        .filter(|_| r.virtual_model.is_none());
    for c in &mut summary.cells {
        if let Some(logs) = logs.get(&(c.policy.clone(), load_key(c.load))) {
            c.engine = Some(EngineFigures::from_steps(logs, machine_model));
        }
    }
    if let Some(model) = &summary.step_model {
        summary.simulated = simulate(r, model)?;
    }
    Ok(summary)
}

/// The virtual clock's model, or one fitted to every cell's step log (none without logs).
fn step_model(
    virtual_model: Option<StepTimeModel>,
    logs: &StepLogs,
) -> anyhow::Result<Option<StepTimeModel>> {
    if virtual_model.is_some() {
        return Ok(virtual_model);
    }
    let samples: Vec<StepSample> = logs
        .values()
        .flatten()
        .flat_map(|(_, log)| log.iter().map(StepSample::from))
        .collect();
    if samples.is_empty() {
        return Ok(None);
    }
    let model =
        StepTimeModel::fit(&samples).context("fitting the step-time model to the step logs")?;
    Ok(Some(model))
}

/// The simulator on each load's traces with `model`, where lengths are fixed (without them it
/// has nothing to replay).
fn simulate(r: &Inputs<'_>, model: &StepTimeModel) -> anyhow::Result<Vec<headroom::Headroom>> {
    let mut simulated = Vec::new();
    for &load in &r.args.loads {
        let per_seed = r.grid.traces_at(load);
        if per_seed.iter().flatten().all(|q| q.output_tokens.is_some()) {
            let h = headroom::simulate(load, &per_seed, &r.args.engine.scheduler(), model)
                .with_context(|| format!("simulating the traces of load {load}"))?;
            simulated.push(h);
        }
    }
    Ok(simulated)
}

/// How the traces' arrivals come, as the report says it.
fn describe_arrivals(burstiness: f64) -> String {
    if burstiness == 1.0 {
        return "Poisson".into();
    }
    format!(
        "gamma gaps, burstiness {burstiness} (their coefficient of variation {:.2}; Poisson's is 1)",
        1.0 / burstiness.sqrt()
    )
}

/// The report's settings section.
fn report_settings(r: &Inputs<'_>) -> report::Settings {
    let a = r.args;
    let shown = |p: &Path| trail_fs::portable_path(p, &a.out);
    let mut s: report::Settings = vec![
        (
            "data".into(),
            format!(
                "{} (test split: {} prompts)",
                shown(&a.data),
                r.cfg.pool.len()
            ),
        ),
        (
            "requests".into(),
            format!(
                "{} per (policy, load, seed); seeds {:?}",
                a.requests, a.seeds
            ),
        ),
        (
            "lengths".into(),
            describe_lengths(r.cfg.lengths, r.cfg.max_tokens),
        ),
        ("saturation".into(), r.sat.describe()),
        ("arrivals".into(), describe_arrivals(a.burstiness)),
        (
            "engine".into(),
            format!(
                "{}, TRAIL c {}, refine every {}",
                a.engine.describe(),
                a.ranking.c,
                a.predictor
                    .refine_every
                    .map_or("checkpoint's interval".into(), |n| n.to_string())
            ),
        ),
        ("backend".into(), format!("{:?}", a.backend).to_lowercase()),
        ("client".into(), describe_client(r)),
    ];
    if let (Some(path), Some(m)) = (&a.step_model, &r.virtual_model) {
        s.push((
            "step model".into(),
            format!("{} ({})", shown(path), step_model::describe(m)),
        ));
    }
    s.extend([
        ("model".into(), shown(&r.cfg.model_path)),
        (
            "threads".into(),
            a.model
                .threads
                .map_or("every core".into(), |t| t.to_string()),
        ),
    ]);
    if let Some(k) = &r.kernel_id {
        s.push(("kernel".into(), k.clone()));
    }
    if let Some(p) = &a.predictor.checkpoint {
        s.push(("checkpoint".into(), shown(p)));
    }
    if let Some(p) = &a.ranking.bert_checkpoint {
        s.push(("BERT checkpoint".into(), shown(p)));
    }
    s
}

/// Which server the cells ran against and under which protocol their lengths went.
fn describe_client(r: &Inputs<'_>) -> String {
    match &r.settings.client {
        None => "in process (no HTTP)".into(),
        Some(c) => format!(
            "{}; protocol `{}`: {}",
            c.base_url.as_deref().map_or(
                "a `trail serve` per cell, started by this command".into(),
                |u| { format!("the server at {u} (--base-url)") }
            ),
            serde_json::to_value(c.protocol)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            c.protocol.describe()
        ),
    }
}

/// The manifest: the configuration, the inputs, `outputs`, `saturation.json` and the traces,
/// and the run's totals.
fn write_manifest(r: &Inputs<'_>, outputs: &[&Path], rows: &[ResultRow]) -> anyhow::Result<()> {
    let (a, out) = (r.args, &r.args.out);
    let mut manifest =
        Manifest::start("eval latency", r.cfg.manifest(a), a.seeds.first().copied())?;
    manifest.kernel_id = r.kernel_id.clone();
    manifest.input(&r.cfg.req_path, &a.data)?;
    for p in [
        &a.step_model,
        &a.predictor.checkpoint,
        &a.ranking.bert_checkpoint,
    ]
    .into_iter()
    .flatten()
    {
        manifest.input(p, out)?;
    }
    for p in outputs {
        manifest.output(p, out)?;
    }
    let sat_path = out.join("saturation.json");
    if sat_path.is_file() {
        manifest.output(&sat_path, out)?;
    }
    for p in r.grid.trace_files(out) {
        manifest.output(&p, out)?;
    }
    manifest.result("saturation_rps", r.sat.rps)?;
    manifest.result("requests_total", rows.len())?;
    manifest.result(
        "failed_total",
        rows.iter().filter(|x| x.result.error.is_some()).count(),
    )?;
    manifest.result("cells_run_now", r.cells_run_now)?;
    manifest.finish(out)?;
    Ok(())
}
