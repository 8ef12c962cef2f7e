//! The engine's capacity ([`Saturation`], `saturation.json`): a burst of requests at t = 0
//! under FCFS with the run's `--max-running` and `--kv-budget-tokens`, completions per second;
//! or the capacity given by `--saturation-rps`. The burst's step log is what the virtual
//! backend's step-time model is fitted to (`step_model.json`).
//!
//! With a step model given (`--step-model`, another machine's), the burst is not run on this
//! one: it is replayed on virtual time under that model ([`on_virtual_time`]), and its
//! makespan is the virtual one.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trail_eval::loadgen::TraceRequest;
use trail_eval::loadgen::workload;
use trail_eval::tracesim::{self, Predictions, Router, SchedulerConfig, SimConfig, StepTimeModel};
use trail_serving_shim::PolicyKind;

use super::config::Config;
use super::server::{Launch, Server};
use super::{Args, bar};
use crate::manifest::write_atomic;
use crate::stages::step_model;

/// The measured (or given) capacity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saturation {
    /// Requests per second the engine completes when saturated.
    pub rps: f64,
    /// `measured` (a burst on this machine), `virtual` (a burst replayed on virtual time under
    /// the given step model) or `given`.
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
        let s = match model {
            Some(model) => on_virtual_time(&burst, &args.engine.scheduler(), model)?,
            None => measure(launch, rt, &burst, &args.out.join("saturation"))?,
        };
        write_atomic(&path, serde_json::to_string_pretty(&s)?.as_bytes())?;
    }
    read_json(&path)
}

/// Runs a burst of requests at t = 0 under FCFS and returns completions per second.
fn measure(
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    trace: &[TraceRequest],
    dir: &Path,
) -> anyhow::Result<Saturation> {
    let server = Server::start(launch, PolicyKind::Fcfs, dir)?;
    let bar = bar(trace.len() as u64)?;
    bar.set_message("saturation burst (fcfs)");
    let results = server.drive(rt, trace, |_| bar.inc(1));
    bar.finish_and_clear();
    server.stop(dir)?;
    let ok: Vec<_> = results.iter().filter(|r| r.error.is_none()).collect();
    if let Some(e) = results.iter().find_map(|r| r.error.as_deref()) {
        eprintln!(
            "warning: {} of {} saturation requests failed, e.g.: {e}",
            results.len() - ok.len(),
            results.len()
        );
    }
    anyhow::ensure!(
        !ok.is_empty(),
        "every request of the saturation burst failed; see {}",
        dir.display()
    );
    let makespan = ok.iter().map(|r| r.latency_s).fold(0.0, f64::max);
    let tokens: f64 = ok.iter().map(|r| f64::from(r.output_tokens)).sum();
    Ok(Saturation {
        rps: ok.len() as f64 / makespan,
        source: "measured".into(),
        requests: trace.len(),
        completed: ok.len(),
        makespan_s: makespan,
        output_tokens_per_s: tokens / makespan,
    })
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
        let log = out.join("saturation").join("steps.parquet");
        anyhow::ensure!(
            log.is_file(),
            "--backend virtual fits its step times to the saturation burst's step log, and {} \
             is missing: measure the saturation here (without --saturation-rps)",
            log.display()
        );
        let records = trail_serving_shim::steps::read(&log)?;
        let model = StepTimeModel::fit_log(&records)
            .with_context(|| format!("fitting the step-time model to {}", log.display()))?;
        write_atomic(&path, serde_json::to_string_pretty(&model)?.as_bytes())?;
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

/// A JSON file this run wrote (or a previous run of the same settings).
fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", path.display()))
}
