//! A model-free driver for scheduler tests: every request has a true output length, the "model"
//! emits token `generated.len()` and stops at the true length, and predictions come from a
//! function of the sequence.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::ManualClock;
use crate::policy::Policy;
use crate::scheduler::{Scheduler, SchedulerConfig, StepPlan, StepResult};
use crate::sequence::{SeqId, Sequence};

/// Remaining-length prediction after a token, from the sequence (before the token is appended)
/// and its true output length.
pub(crate) type Predict = fn(&Sequence, usize) -> Option<f64>;

pub(crate) struct Driver {
    pub s: Scheduler,
    pub clock: Arc<ManualClock>,
    /// True output length per request.
    pub lens: HashMap<SeqId, usize>,
    pub predict: Predict,
    /// Seconds per step.
    pub dt: f64,
    pub done: Vec<Sequence>,
    /// Tokens in each request's (modelled) KV cache, as the engine keeps it: dropped on a
    /// recompute preemption, kept on a swap.
    pub cache: HashMap<SeqId, usize>,
}

/// The exact remaining length after the token about to be appended.
pub(crate) fn exact(seq: &Sequence, true_len: usize) -> Option<f64> {
    Some(true_len.saturating_sub(seq.generated.len() + 1) as f64)
}

/// No prediction.
pub(crate) fn none(_: &Sequence, _: usize) -> Option<f64> {
    None
}

impl Driver {
    pub fn new(cfg: SchedulerConfig, policy: Box<dyn Policy>) -> Self {
        let clock = Arc::new(ManualClock::at(0.0));
        let s = Scheduler::new(cfg, policy, clock.clone()).expect("valid config");
        Self {
            s,
            clock,
            lens: HashMap::new(),
            predict: none,
            dt: 0.01,
            done: Vec::new(),
            cache: HashMap::new(),
        }
    }

    pub fn with_predict(mut self, predict: Predict) -> Self {
        self.predict = predict;
        self
    }

    /// Adds a request whose true output length is `out_len` (at most `max_new`).
    pub fn add(&mut self, seq: Sequence, out_len: usize) {
        let id = seq.id;
        self.s.add(seq).expect("add");
        self.lens.insert(id, out_len);
    }

    /// Runs one step and returns its plan; checks the invariants before and after.
    pub fn step(&mut self) -> StepPlan {
        self.s
            .check_invariants()
            .expect("invariants before the step");
        let plan = self.s.schedule().expect("schedule");
        self.s
            .check_invariants()
            .expect("invariants after planning");
        assert!(self.s.num_running() <= self.s.config().max_running);
        for &(id, _) in &plan.preempted {
            if !plan.swapped_out.contains(&id) {
                self.cache.insert(id, 0);
            }
        }
        let mut results = Vec::new();
        let chunks = plan
            .decode
            .iter()
            .map(|&id| (id, 1))
            .chain(plan.prefill.iter().map(|c| (c.id, c.len)));
        for (id, len) in chunks {
            let seq = self.s.get(id).expect("planned sequences are live");
            assert!(
                self.s.blocks().slots_of(id) >= seq.computed + len,
                "blocks for the chunk"
            );
            let cached = self.cache.entry(id).or_insert(0);
            assert_eq!(
                *cached, seq.computed,
                "request {id}: the cache holds its context"
            );
            *cached += len;
            if seq.computed + len == seq.total_len() {
                let true_len = self.lens[&id];
                let n = seq.generated.len();
                results.push(StepResult {
                    id,
                    token: Some(n as u32),
                    stop: n + 1 >= true_len,
                    prediction: (self.predict)(seq, true_len),
                });
            }
        }
        self.clock.advance(self.dt);
        self.s.on_step_done(&results).expect("on_step_done");
        self.s
            .check_invariants()
            .expect("invariants after the step");
        for s in self.s.take_finished() {
            self.cache.remove(&s.id);
            self.done.push(s);
        }
        plan
    }

    /// Steps until idle; panics after `max_steps`.
    pub fn run_to_idle(&mut self, max_steps: usize) -> usize {
        for n in 0..max_steps {
            if self.s.is_idle() {
                return n;
            }
            self.step();
        }
        panic!("not idle after {max_steps} steps: {:?}", self.s);
    }

    /// Finish order of the requests done so far.
    pub fn finish_order(&self) -> Vec<SeqId> {
        self.done.iter().map(|s| s.id).collect()
    }
}
