//! What the trace-driven simulator says about a latency grid, on the grid's own traces with a
//! step-time model fitted to every cell's step log (one model: the grid's average engine):
//!
//! - the oracle's headroom at each load: FCFS's simulated mean latency over the oracle's, the
//!   most any policy can gain over FCFS on this engine and batch (with a batch of 8 at load 0.5
//!   the batch absorbs every burst and there is nothing to gain);
//! - FCFS's sensitivity to the engine's speed: how much its mean latency grows when every step
//!   takes 5 % longer. Near saturation this is large, so cells that ran while the machine was a
//!   few percent slower or faster (other work on the host) differ by that much whatever the
//!   policy; each cell's speed against the model is its relative step time (a stretch of
//!   other work on the cores during one cell shows there as well).

use serde::{Deserialize, Serialize};
use trail_eval::loadgen::TraceRequest;
use trail_eval::tracesim::{
    self, PolicyKind, Predictions, Router, SchedulerConfig, SimConfig, StepTimeModel,
};
use trail_serving_shim::StepRecord;

/// Slowdown of every step for the sensitivity figure.
pub const SLOWDOWN: f64 = 0.05;

/// Simulated figures at one load, over the traces of every seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Headroom {
    pub load: f64,
    /// Requests simulated (every seed's trace).
    pub requests: usize,
    pub fcfs_mean_latency_s: f64,
    pub oracle_mean_latency_s: f64,
    /// FCFS over the oracle in mean latency.
    pub fcfs_over_oracle: f64,
    /// FCFS's mean latency with every step [`SLOWDOWN`] longer, over its mean latency, minus 1.
    pub fcfs_sensitivity_to_slower_steps: f64,
}

/// Simulates FCFS and the oracle on `traces` (one per seed, lengths fixed) with `model`, and
/// FCFS again with every step [`SLOWDOWN`] slower.
pub fn simulate(
    load: f64,
    traces: &[Vec<TraceRequest>],
    scheduler: &SchedulerConfig,
    model: &StepTimeModel,
) -> anyhow::Result<Headroom> {
    anyhow::ensure!(!traces.is_empty(), "no traces to simulate at load {load}");
    let mean = |policy: PolicyKind, model: &StepTimeModel| -> anyhow::Result<f64> {
        let cfg = SimConfig {
            scheduler: scheduler.clone(),
            policy,
            c: 0.8, // TRAIL's limit: unused by FCFS and the oracle
            replicas: 1,
            router: Router::JoinShortestQueue,
            predictions: Predictions::default(),
        };
        let (mut sum, mut n) = (0.0, 0usize);
        for trace in traces {
            let lens: Vec<usize> = trace.iter().map(|r| r.prompt_len(4.0)).collect();
            let r = tracesim::simulate(trace, &lens, &cfg, model)?;
            sum += r.mean_latency * trace.len() as f64;
            n += trace.len();
        }
        Ok(sum / n as f64)
    };
    let fcfs = mean(PolicyKind::Fcfs, model)?;
    let oracle = mean(PolicyKind::Oracle, model)?;
    let slower = mean(PolicyKind::Fcfs, &model.scaled(1.0 + SLOWDOWN))?;
    Ok(Headroom {
        load,
        requests: traces.iter().map(Vec::len).sum(),
        fcfs_mean_latency_s: fcfs,
        oracle_mean_latency_s: oracle,
        fcfs_over_oracle: fcfs / oracle,
        fcfs_sensitivity_to_slower_steps: slower / fcfs - 1.0,
    })
}

/// A server's speed against `model`: its decode-only steps' measured seconds over their
/// modelled seconds, summed (1.0: as fast as the grid's average; 1.05: 5 % slower). A sum, not a
/// median, so a few minutes of other work on the cores show even when most steps were quiet.
pub fn relative_step_time(log: &[StepRecord], model: &StepTimeModel) -> Option<f64> {
    let (measured, modelled) = log
        .iter()
        .filter(|s| s.prefill_tokens == 0 && s.decode_rows > 0)
        .fold((0.0, 0.0), |(m, p), s| {
            (
                m + s.step_secs,
                p + model.predict(s.decode_rows, 0, s.kv_tokens),
            )
        });
    (modelled > 0.0).then(|| measured / modelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(model: &StepTimeModel, slower: f64) -> Vec<StepRecord> {
        (0..40)
            .map(|i| {
                let (rows, prefill, kv) = (1 + i % 8, if i % 5 == 0 { 30 } else { 0 }, 100 * i);
                let secs = slower * model.predict(rows, prefill, kv);
                StepRecord {
                    step: i as u64,
                    t: 0.02 * i as f64,
                    rows,
                    decode_rows: rows,
                    prefill_tokens: prefill,
                    kv_tokens: kv,
                    kv_blocks: kv.div_ceil(16),
                    running: rows,
                    waiting: 0,
                    layers: 1,
                    preempted_policy: 0,
                    preempted_memory: 0,
                    step_secs: secs,
                    forward_secs: secs,
                    predictor_secs: 0.0,
                }
            })
            .collect()
    }

    #[test]
    fn relative_step_time_is_the_slowdown_of_decode_steps() {
        let model = StepTimeModel::linear(0.006, 0.001, 0.001, 6e-6);
        let same = relative_step_time(&log(&model, 1.0), &model).unwrap();
        assert!((same - 1.0).abs() < 1e-12, "{same}");
        let slow = relative_step_time(&log(&model, 1.1), &model).unwrap();
        assert!((slow - 1.1).abs() < 1e-12, "{slow}");
        // Prefill steps do not count; a log without decode steps has no figure.
        let prefill_only: Vec<StepRecord> = log(&model, 1.0)
            .into_iter()
            .filter(|s| s.prefill_tokens > 0)
            .map(|s| StepRecord {
                decode_rows: 0,
                ..s
            })
            .collect();
        assert_eq!(relative_step_time(&prefill_only, &model), None);
    }

    #[test]
    fn slower_steps_never_help_fcfs_and_the_oracle_never_loses() {
        let model = StepTimeModel::linear(0.01, 0.002, 0.001, 0.0);
        // A burst of long and short requests on 2 slots: the oracle runs the short ones first.
        let trace: Vec<TraceRequest> = (0..12)
            .map(|i| {
                let mut r = TraceRequest::new(
                    0.01 * i as f64,
                    "p".into(),
                    Some(if i % 3 == 0 { 200 } else { 10 }),
                );
                r.prompt_tokens = Some(8);
                r
            })
            .collect();
        let mut cfg = SchedulerConfig::new(4096);
        cfg.max_running = 2;
        let h = simulate(0.9, &[trace.clone(), trace], &cfg, &model).unwrap();
        assert_eq!(h.requests, 24);
        assert!(h.fcfs_over_oracle > 1.2, "{h:?}");
        assert!(h.fcfs_sensitivity_to_slower_steps > 0.0, "{h:?}");
        assert!(
            (h.fcfs_over_oracle - h.fcfs_mean_latency_s / h.oracle_mean_latency_s).abs() < 1e-12
        );
    }
}
