//! One step of the [`Worker`]: the scheduler plans it, the plan becomes rows
//! ([`row::build`]), the rows run on their executors ([`executor::run`]: the model, or the
//! recordings), what they produced is applied (tokens, stop rule, the Bayesian filter), then
//! the virtual clock moves by the step's modelled time, the scheduler takes the results,
//! tokens and finished requests go to their channels, and the statistics and the step log
//! take the step.

use std::time::Instant;

use trail_llm::LayerSet;

use super::executor::{self, ModelExecutor, Produced};
use super::row::{self, RowSpec};
use super::stats::set_gauges;
use super::worker::Worker;
use crate::error::EngineError;
use crate::metrics::EngineStats;
use crate::predictor::Predictor;
use crate::scheduler::{PreemptKind, StepPlan, StepResult};
use crate::steps::StepRecord;

/// Where a step's wall-clock time went.
struct Timing {
    step_secs: f64,
    forward_secs: f64,
    predictor_secs: f64,
}

impl Worker {
    /// Plans and runs one step.
    pub(super) fn step(&mut self) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let t = self.clock.now();
        let plan = self.sched.schedule()?;
        self.drop_recomputed_caches(&plan);
        if plan.is_empty() {
            self.sched.on_step_done(&[])?;
            return Ok(());
        }
        let filter = self.predictor.as_ref().map(Predictor::filter);
        let live = &self.live;
        let rows = row::build(
            &plan,
            &self.sched,
            |id| &live[&id].prompt,
            |id, g| live[&id].need(filter, g),
        );
        let model = ModelExecutor {
            runner: &self.runner,
            predictor: self.predictor.as_ref(),
        };
        let ran = executor::run(&model, &rows, &mut self.live)?;
        let tp = Instant::now();
        let results = self.apply(&rows, ran.produced);
        let predictor_secs = ran.probe_secs + tp.elapsed().as_secs_f64();
        self.advance_clock(&plan);
        self.sched.on_step_done(&results)?;
        for r in &results {
            let token = r.token.expect("results carry tokens");
            self.live[&r.id].send_token(token);
        }
        let timing = self.end_step(t0, ran.forward_secs, predictor_secs);
        self.log_step(&plan, t, &timing);
        Ok(())
    }

    /// Under one hold of the statistics: ends the requests the step finished, then sets the
    /// gauges and adds the step's times (it started at `t0`).
    fn end_step(&mut self, t0: Instant, forward_secs: f64, predictor_secs: f64) -> Timing {
        let stats = self.stats.clone();
        let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
        self.finish_requests(&mut st);
        let timing = Timing {
            step_secs: t0.elapsed().as_secs_f64(),
            forward_secs,
            predictor_secs,
        };
        set_gauges(&mut st, &self.sched);
        st.step_secs += timing.step_secs;
        st.predictor_secs += timing.predictor_secs;
        timing
    }

    /// Recomputed victims lose their cache; swapped ones keep it (the swap pool is this RAM).
    fn drop_recomputed_caches(&mut self, plan: &StepPlan) {
        for &(id, _) in &plan.preempted {
            if !plan.swapped_out.contains(&id)
                && let Some(l) = self.live.get_mut(&id)
            {
                l.executor.clear_cache();
            }
        }
    }

    /// The scheduler's results of the rows that produced a token, in row order: each token,
    /// whether it stops its request (a stop token or a stop string), and with a predictor the
    /// filter's remaining estimate.
    fn apply(&mut self, rows: &[RowSpec], produced: Vec<Option<Produced>>) -> Vec<StepResult> {
        let filter = self.predictor.as_ref().map(Predictor::filter);
        let runner = &self.runner;
        rows.iter()
            .zip(produced)
            .filter_map(|(row, p)| {
                let live = self.live.get_mut(&row.id).expect("present");
                Some(live.result(row, p?, filter, runner))
            })
            .collect()
    }

    /// Virtual time: the step's tokens are reported at its modelled end, the copies of the KV
    /// it swapped out and back in included.
    fn advance_clock(&self, plan: &StepPlan) {
        if let Some((clock, vt)) = &self.virtual_time {
            let secs = vt.step_secs(&self.sched.step_shape(plan));
            clock.advance(secs.max(0.0));
        }
    }

    /// Ends the requests the step finished: recorded, scored in `st`, summarised on their
    /// channels.
    fn finish_requests(&mut self, st: &mut EngineStats) {
        let with_predictor = self.predictor.is_some();
        for seq in self.sched.take_finished() {
            let live = self
                .live
                .remove(&seq.id)
                .expect("finished requests have a context");
            live.finish(seq, with_predictor, st);
        }
    }

    /// Appends the step to the step log.
    fn log_step(&mut self, plan: &StepPlan, t: f64, timing: &Timing) {
        let count = |k| plan.preempted.iter().filter(|p| p.1 == k).count();
        let layers = self
            .predictor
            .as_ref()
            .map_or(LayerSet::NONE, Predictor::layers);
        self.steps.push(StepRecord {
            step: self.steps.len() as u64,
            t,
            rows: plan.num_rows(),
            decode_rows: plan.decode.len(),
            prefill_tokens: plan.prefill_tokens(),
            kv_tokens: self.sched.kv_tokens(),
            kv_blocks: self.sched.blocks().used_blocks(),
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            layers: layers.len(),
            step_secs: timing.step_secs,
            forward_secs: timing.forward_secs,
            predictor_secs: timing.predictor_secs,
            preempted_policy: count(PreemptKind::Policy),
            preempted_memory: count(PreemptKind::Memory),
        });
    }
}
