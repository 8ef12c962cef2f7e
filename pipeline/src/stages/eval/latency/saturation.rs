//! The engine's capacity ([`Saturation`], `saturation.json`): a burst of requests at t = 0
//! under FCFS with the run's `--max-running` and `--kv-budget-tokens`, completions per second;
//! or the capacity given by `--saturation-rps`. The burst's step log is what the virtual
//! backend's step-time model is fitted to (`step_model.json`).
//!
//! The saturation is always measured on the clock the cells run on. With a step model given
//! (`--step-model`, another machine's, or one already in the run's `step_model.json`), the burst
//! is not run on this machine: it is replayed on virtual time under that model
//! ([`on_virtual_time`]), and its makespan is the virtual one. On virtual time without one, the
//! burst runs here for its step log, the model is fitted to that log, and the capacity is the
//! burst replayed under the fitted model.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trail_eval::loadgen::workload;
use trail_eval::loadgen::{RequestResult, TraceRequest};
use trail_eval::tracesim::{self, Predictions, Router, SchedulerConfig, SimConfig, StepTimeModel};
use trail_serving_shim::PolicyKind;

use super::config::Config;
use super::server::{BackendKind, Launch, Server};
use super::{Args, bar};
use crate::manifest::write_atomic;
use crate::stages::step_model;

/// The measured (or given) capacity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saturation {
    /// Requests per second the engine completes when saturated.
    pub rps: f64,
    /// `measured` (a burst on this machine's clock), `virtual` (a burst replayed on virtual time
    /// under the step model the cells run on, given or fitted to a burst here) or `given`.
    pub source: String,
    pub requests: usize,
    pub completed: usize,
    pub makespan_s: f64,
    pub output_tokens_per_s: f64,
}

impl Saturation {
    /// `1.199 requests/s (measured: …)` or `1.199 requests/s (given)`.
    pub fn describe(&self) -> String {
        if self.requests == 0 {
            return format!("{:.3} requests/s ({})", self.rps, self.source);
        }
        format!(
            "{:.3} requests/s ({}: FCFS burst of {} requests, {} completed in {:.1} s, {:.1} output tok/s)",
            self.rps,
            self.source,
            self.requests,
            self.completed,
            self.makespan_s,
            self.output_tokens_per_s
        )
    }

    /// The capacity `--saturation-rps` gives.
    fn given(rps: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rps.is_finite() && rps > 0.0,
            "--saturation-rps must be positive"
        );
        Ok(Self {
            rps,
            source: "given".into(),
            requests: 0,
            completed: 0,
            makespan_s: 0.0,
            output_tokens_per_s: 0.0,
        })
    }
}

/// The run's capacity: given, or measured once into `saturation.json` (on this machine, or on
/// virtual time under `model`, the step model given) and always read back from it, so this run
/// and every rerun make the same traces.
pub fn resolve(
    args: &Args,
    cfg: &Config,
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    model: Option<&StepTimeModel>,
) -> anyhow::Result<Saturation> {
    if let Some(rps) = args.saturation_rps {
        return Saturation::given(rps);
    }
    let path = args.out.join("saturation.json");
    if !path.is_file() {
        let burst = workload::burst(
            &cfg.pool,
            cfg.saturation_requests,
            0,
            cfg.lengths,
            cfg.max_tokens,
        )?;
        let s = match (model, args.backend) {
            (Some(model), _) => on_virtual_time(&burst, &args.engine.scheduler(), model)?,
            (None, BackendKind::Virtual) => fitted_on_virtual_time(args, launch, rt, &burst)?,
            (None, _) => measure(launch, rt, &burst, &args.out.join("saturation"))?,
        };
        write_atomic(&path, serde_json::to_string_pretty(&s)?.as_bytes())?;
    }
    read_json(&path)
}

/// Virtual time with no model yet: the burst runs on this machine for its step log
/// (`saturation/steps.parquet`), the model is fitted to it (`step_model.json`), and the capacity
/// is the burst replayed on the fitted model's virtual time, the clock the cells run on.
fn fitted_on_virtual_time(
    args: &Args,
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    burst: &[TraceRequest],
) -> anyhow::Result<Saturation> {
    let mut ok = run_burst(launch, rt, burst, &args.out.join("saturation"))?;
    ok.sort_by_key(|r| r.index);
    let wall = capacity(burst.len(), &ok);
    let model = fit_burst_log(&args.out)?;
    // The lengths the burst generated (fixed already, or free and now known), its completed
    // requests only.
    let replayed: Vec<TraceRequest> = ok
        .iter()
        .map(|r| TraceRequest {
            output_tokens: Some(r.output_tokens),
            ..burst[r.index].clone()
        })
        .collect();
    let s = on_virtual_time(&replayed, &args.engine.scheduler(), &model)?;
    eprintln!(
        "saturation burst on this machine's clock: {}; on the fitted model's virtual time: \
         {:.3} requests/s",
        wall.describe(),
        s.rps
    );
    Ok(s)
}

/// Runs a burst of requests at t = 0 under FCFS on this machine and returns completions per
/// second.
fn measure(
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    trace: &[TraceRequest],
    dir: &Path,
) -> anyhow::Result<Saturation> {
    Ok(capacity(trace.len(), &run_burst(launch, rt, trace, dir)?))
}

/// The burst's completed requests, run on this machine by a fresh FCFS server whose files
/// (its step log) go to `dir`.
fn run_burst(
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    trace: &[TraceRequest],
    dir: &Path,
) -> anyhow::Result<Vec<RequestResult>> {
    let server = Server::start(launch, PolicyKind::Fcfs, dir)?;
    let bar = bar(trace.len() as u64)?;
    bar.set_message("saturation burst (fcfs)");
    let results = server.drive(rt, trace, |_| bar.inc(1));
    bar.finish_and_clear();
    server.stop(dir)?;
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    if let Some(e) = results.iter().find_map(|r| r.error.as_deref()) {
        eprintln!(
            "warning: {failed} of {} saturation requests failed, e.g.: {e}",
            results.len()
        );
    }
    anyhow::ensure!(
        failed < results.len(),
        "every request of the saturation burst failed; see {}",
        dir.display()
    );
    Ok(results.into_iter().filter(|r| r.error.is_none()).collect())
}

/// Completions per second of a burst of `requests` whose completed ones are `ok`.
fn capacity(requests: usize, ok: &[RequestResult]) -> Saturation {
    let makespan = ok.iter().map(|r| r.latency_s).fold(0.0, f64::max);
    let tokens: f64 = ok.iter().map(|r| f64::from(r.output_tokens)).sum();
    Saturation {
        rps: ok.len() as f64 / makespan,
        source: "measured".into(),
        requests,
        completed: ok.len(),
        makespan_s: makespan,
        output_tokens_per_s: tokens / makespan,
    }
}

/// The capacity of an engine whose steps take `model`'s time: `burst` (every request at
/// t = 0, lengths fixed) replayed under FCFS on virtual time, completions over the makespan.
/// It runs in the trace simulator, which drives the engine's scheduler (`scheduler`) as the
/// engine does and times each step by the same [`StepTimeModel::step_secs`]; FCFS reads no
/// prediction, so this is the makespan the engine on virtual time would have.
pub fn on_virtual_time(
    burst: &[TraceRequest],
    scheduler: &SchedulerConfig,
    model: &StepTimeModel,
) -> anyhow::Result<Saturation> {
    anyhow::ensure!(
        burst.iter().all(|r| r.output_tokens.is_some()),
        "replaying the saturation burst on virtual time needs fixed output lengths (--ignore-eos \
         true), or give --saturation-rps"
    );
    let cfg = SimConfig {
        scheduler: scheduler.clone(),
        policy: PolicyKind::Fcfs,
        c: 0.8, // TRAIL's limit: unused by FCFS
        replicas: 1,
        router: Router::JoinShortestQueue,
        predictions: Predictions::default(),
    };
    let prompt_lens: Vec<usize> = burst.iter().map(|r| r.prompt_len(4.0)).collect();
    let r = tracesim::simulate(burst, &prompt_lens, &cfg, model)
        .context("replaying the saturation burst on virtual time")?;
    let tokens: f64 = burst
        .iter()
        .filter_map(|q| q.output_tokens)
        .map(f64::from)
        .sum();
    Ok(Saturation {
        rps: burst.len() as f64 / r.makespan,
        source: "virtual".into(),
        requests: burst.len(),
        completed: r.requests.len(),
        makespan_s: r.makespan,
        output_tokens_per_s: tokens / r.makespan,
    })
}

/// The virtual clock's step-time model, kept in `step_model.json` so every cell and every
/// rerun uses the same one: `given` (`--step-model`), or fitted to the saturation burst's step
/// log (`saturation/steps.parquet`, every batch size from full to one as the burst drains).
pub fn virtual_step_model(
    out: &Path,
    given: Option<&StepTimeModel>,
) -> anyhow::Result<StepTimeModel> {
    let path = out.join("step_model.json");
    if let (Some(model), false) = (given, path.is_file()) {
        write_atomic(&path, serde_json::to_string_pretty(model)?.as_bytes())?;
    }
    if !path.is_file() {
        fit_burst_log(out)?;
    }
    let model: StepTimeModel = read_json(&path)?;
    if let Some(given) = given {
        anyhow::ensure!(
            model == *given,
            "{} is not the model of --step-model",
            path.display()
        );
    }
    eprintln!("virtual time: {}", step_model::describe(&model));
    Ok(model)
}

/// The model fitted to the saturation burst's step log (`saturation/steps.parquet`, every batch
/// size from full to one as the burst drains), kept in `step_model.json`.
fn fit_burst_log(out: &Path) -> anyhow::Result<StepTimeModel> {
    let log = out.join("saturation").join("steps.parquet");
    anyhow::ensure!(
        log.is_file(),
        "--backend virtual fits its step times to the saturation burst's step log, and {} is \
         missing: measure the saturation here (without --saturation-rps), or give --step-model",
        log.display()
    );
    let records = trail_serving_shim::steps::read(&log)?;
    let model = StepTimeModel::fit_log(&records)
        .with_context(|| format!("fitting the step-time model to {}", log.display()))?;
    write_atomic(
        &out.join("step_model.json"),
        serde_json::to_string_pretty(&model)?.as_bytes(),
    )?;
    Ok(model)
}

/// A JSON file this run wrote (or a previous run of the same settings).
fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", path.display()))
}
