//! [`Scheduler`]: iteration-level (continuous) batching with pluggable policies, chunked
//! prefill, per-token KV accounting and preemption by recompute (vLLM v0.5's scheduler with the
//! policy made a trait, as TRAIL needs).
//!
//! Each [`schedule`](Scheduler::schedule) call plans one model step:
//!
//! 1. Running requests, most urgent first, get their next tokens: one for a decode, a chunk of
//!    at most the remaining prefill budget for a prefill. When the KV pool cannot hold them, the
//!    least urgent running request (preemptible or not: memory preemption is always allowed)
//!    is preempted, possibly the request itself; so the most urgent request always progresses
//!    and no policy can deadlock the engine.
//! 2. If nothing was preempted for memory, waiting requests are admitted in the policy's order
//!    (aged by [`SchedulerConfig::aging`]) while there is room under `max_running`, KV blocks for
//!    their first chunk and prefill budget. When the head does not fit and the policy preempts,
//!    preemptible running requests ranked strictly worse than it give up their place, least
//!    urgent first, if that makes room. Admission stops at the first request that does not fit,
//!    so the order is strict.
//!
//! Preempted requests go back to the waiting queue with their generated tokens. Under
//! [`PreemptionMode::Recompute`] they lose their KV and re-admission prefills prompt + generated
//! again; under [`PreemptionMode::Swap`] their KV moves to a swap pool (vLLM's swap space) and
//! re-admission resumes where they stopped, falling back to recompute when the swap pool is
//! full. The scheduler reads time only from its [`Clock`] and knows nothing of the model.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::block::BlockManager;
use crate::clock::Clock;
use crate::error::SchedulerError;
use crate::policy::Policy;
use crate::sequence::{FinishReason, SeqId, SeqState, Sequence};
use crate::steps::StepShape;

/// What happens to a preempted request's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PreemptionMode {
    /// Drop it; prefill prompt + generated again on re-admission.
    #[default]
    Recompute,
    /// Keep it outside the KV pool, in a swap pool of
    /// [`SchedulerConfig::swap_budget_tokens`]; re-admission resumes without prefill. A
    /// victim that does not fit in the swap pool is recomputed. On a CPU engine the cache
    /// stays where it is (the KV pool and swap are the same RAM), so a swap costs nothing;
    /// on a GPU it would be a copy over the bus.
    Swap,
}

impl PreemptionMode {
    /// The `--preemption` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recompute => "recompute",
            Self::Swap => "swap",
        }
    }
}

impl std::fmt::Display for PreemptionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PreemptionMode {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "recompute" => Ok(Self::Recompute),
            "swap" => Ok(Self::Swap),
            _ => Err(SchedulerError::Config(format!(
                "unknown preemption mode {s:?}; expected recompute or swap"
            ))),
        }
    }
}

/// Why a request was preempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptKind {
    /// A more urgent waiting request took its place (the policy's decision).
    Policy,
    /// The KV pool was exhausted (always allowed; the policy only ranks the victims).
    Memory,
}

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Most requests running at once (`--max-running`).
    pub max_running: usize,
    /// KV-cache budget in tokens (`--kv-budget-tokens`), rounded down to whole blocks.
    pub kv_budget_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most prefill tokens per step over all requests (`--prefill-chunk`); `None`: whole
    /// prompts at once.
    pub prefill_chunk: Option<usize>,
    /// Most requests in the waiting queue before [`Scheduler::add`] refuses (`--max-waiting`).
    pub max_waiting: usize,
    /// Aging of the waiting order: a waiting request's rank is lowered by `aging` per second it
    /// has waited (`--aging`), so nothing waits forever. Policy preemption compares un-aged
    /// ranks, so aging cannot make two requests preempt each other in turn.
    pub aging: f64,
    /// What preemption does with the KV cache.
    pub preemption_mode: PreemptionMode,
    /// Swap pool in tokens (blocks of `block_size`) for [`PreemptionMode::Swap`].
    pub swap_budget_tokens: usize,
}

impl SchedulerConfig {
    /// Defaults (48 running, blocks of 16, no chunking, no aging, unbounded waiting queue,
    /// preemption by recompute; a swap pool as large as the KV pool, used once the mode is
    /// set to swap) with a KV budget of `kv_budget_tokens`.
    pub fn new(kv_budget_tokens: usize) -> Self {
        Self {
            max_running: 48,
            kv_budget_tokens,
            block_size: 16,
            prefill_chunk: None,
            max_waiting: usize::MAX,
            aging: 0.0,
            preemption_mode: PreemptionMode::Recompute,
            swap_budget_tokens: kv_budget_tokens,
        }
    }
}

/// Tokens `[start, start + len)` of a sequence's context (prompt + generated) to run this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence.
    pub id: SeqId,
    /// First context position.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
}

/// How soon a request should run: (rank, arrival, id), lower is more urgent. Ranks compare by
/// `total_cmp`, ties go to the earlier arrival, then the lower id, so the order is total.
#[derive(Debug, Clone, Copy)]
struct Urgency(f64, f64, SeqId);

impl Ord for Urgency {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .total_cmp(&other.0)
            .then(self.1.total_cmp(&other.1))
            .then(self.2.cmp(&other.2))
    }
}

impl PartialOrd for Urgency {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Urgency {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Urgency {}

/// One model step: what to run and what was preempted to make it fit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    /// Sequences decoding one token (their newest generated token).
    pub decode: Vec<SeqId>,
    /// Prefill chunks (first admissions, re-admissions after preemption, chunk continuations).
    pub prefill: Vec<Chunk>,
    /// Requests preempted while planning, with the kind.
    pub preempted: Vec<(SeqId, PreemptKind)>,
    /// Those of `preempted` whose KV was swapped out (kept): the engine must keep their
    /// caches; the others' caches are dropped.
    pub swapped_out: Vec<SeqId>,
    /// KV tokens of `swapped_out`: copied from the KV pool to the swap pool by this step.
    pub swapped_out_tokens: usize,
    /// KV tokens copied back from the swap pool by this step: the caches of requests it
    /// re-admits after a swap.
    pub swapped_in_tokens: usize,
}

impl StepPlan {
    /// Nothing to run.
    pub fn is_empty(&self) -> bool {
        self.decode.is_empty() && self.prefill.is_empty()
    }

    /// Rows in the step.
    pub fn num_rows(&self) -> usize {
        self.decode.len() + self.prefill.len()
    }

    /// Prefill tokens in the step.
    pub fn prefill_tokens(&self) -> usize {
        self.prefill.iter().map(|c| c.len).sum()
    }

    /// KV tokens the step copies between the KV pool and the swap pool, either way.
    pub fn swapped_tokens(&self) -> usize {
        self.swapped_out_tokens + self.swapped_in_tokens
    }

    /// Adds `id`'s next row: a one-token decode, or the prefill chunk `[start, start + len)`.
    /// Returns the prefill tokens it takes from the step's budget (0 for a decode).
    fn push_row(&mut self, id: SeqId, decoding: bool, start: usize, len: usize) -> usize {
        if decoding {
            self.decode.push(id);
            0
        } else {
            self.prefill.push(Chunk { id, start, len });
            len
        }
    }

    fn remove(&mut self, id: SeqId) -> usize {
        self.decode.retain(|&d| d != id);
        let mut freed = 0;
        self.prefill.retain(|c| {
            let keep = c.id != id;
            if !keep {
                freed += c.len;
            }
            keep
        });
        freed
    }
}

/// What the engine reports for one scheduled sequence after the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    /// The sequence.
    pub id: SeqId,
    /// The sampled token; present exactly when the step reached the end of its context.
    pub token: Option<u32>,
    /// The token is a stop token: the sequence is finished.
    pub stop: bool,
    /// A new prediction of the remaining length (after this token).
    pub prediction: Option<f64>,
}

impl StepResult {
    /// A sampled token, no stop, no prediction.
    pub fn token(id: SeqId, token: u32) -> Self {
        Self {
            id,
            token: Some(token),
            stop: false,
            prediction: None,
        }
    }
}

/// Running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Steps planned with at least one row.
    pub steps: u64,
    /// Requests added.
    pub added: u64,
    /// Admissions to the running set (re-admissions included).
    pub admitted: u64,
    /// Policy preemptions.
    pub preemptions_policy: u64,
    /// Memory preemptions.
    pub preemptions_memory: u64,
    /// KV tokens thrown away by preemption.
    pub recomputed_tokens: u64,
    /// Preemptions that swapped the KV out instead of dropping it.
    pub swaps: u64,
    /// KV tokens swapped out.
    pub swapped_tokens: u64,
    /// Prefill tokens run.
    pub prefill_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests finished (stop or length).
    pub finished: u64,
    /// Requests aborted.
    pub aborted: u64,
}

/// The scheduler: waiting and running queues, the KV pool and the policy.
pub struct Scheduler {
    cfg: SchedulerConfig,
    policy: Box<dyn Policy>,
    clock: Arc<dyn Clock>,
    blocks: BlockManager,
    /// The swap pool ([`PreemptionMode::Swap`]): KV of preempted requests, kept.
    swap: Option<BlockManager>,
    seqs: HashMap<SeqId, Sequence>,
    /// Waiting requests in admission order. A waiting request's key does not change while it
    /// waits (its rank reads only the sequence, which does not move; aging lowers every
    /// waiting rank at the same rate), so the queue is kept sorted instead of being ranked
    /// at every step: a step costs O(admitted · log waiting), not O(waiting).
    waiting: BTreeSet<Urgency>,
    running: Vec<SeqId>,
    finished: Vec<Sequence>,
    /// Planned chunk length per sequence of the step in flight, in plan order.
    in_flight: Option<Vec<(SeqId, usize)>>,
    counters: Counters,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("policy", &self.policy.name())
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("used_blocks", &self.blocks.used_blocks())
            .finish()
    }
}

impl Scheduler {
    /// A scheduler with `policy`, reading time from `clock`.
    pub fn new(
        cfg: SchedulerConfig,
        policy: Box<dyn Policy>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SchedulerError> {
        if cfg.max_running == 0 {
            return Err(SchedulerError::Config(
                "max_running must be at least 1".into(),
            ));
        }
        if cfg.prefill_chunk == Some(0) {
            return Err(SchedulerError::Config(
                "prefill_chunk must be at least 1".into(),
            ));
        }
        if !(cfg.aging.is_finite() && cfg.aging >= 0.0) {
            return Err(SchedulerError::Config(format!(
                "aging must be finite and non-negative, got {}",
                cfg.aging
            )));
        }
        let blocks = BlockManager::from_tokens(cfg.kv_budget_tokens, cfg.block_size)?;
        let swap = match cfg.preemption_mode {
            PreemptionMode::Swap if cfg.swap_budget_tokens >= cfg.block_size => Some(
                BlockManager::from_tokens(cfg.swap_budget_tokens, cfg.block_size)?,
            ),
            _ => None,
        };
        Ok(Self {
            cfg,
            policy,
            clock,
            blocks,
            swap,
            seqs: HashMap::new(),
            waiting: BTreeSet::new(),
            running: Vec::new(),
            finished: Vec::new(),
            in_flight: None,
            counters: Counters::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The policy.
    pub fn policy(&self) -> &dyn Policy {
        self.policy.as_ref()
    }

    /// The KV pool.
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// The swap pool, under [`PreemptionMode::Swap`].
    pub fn swap(&self) -> Option<&BlockManager> {
        self.swap.as_ref()
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Running totals.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// A live (waiting or running) sequence.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Requests waiting.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting ids, most urgent first (the order admission takes them in).
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().map(|k| k.2)
    }

    /// Running ids.
    pub fn running_ids(&self) -> &[SeqId] {
        &self.running
    }

    /// No live request.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// KV tokens the rows of `plan` attend: each row's context once it has run (a decode's
    /// computed tokens + 1, a prefill chunk's end). Call before [`on_step_done`](Self::on_step_done).
    /// The step-time feature of the simulator and of the engine on virtual time.
    pub fn context_tokens(&self, plan: &StepPlan) -> usize {
        let decode: usize = plan
            .decode
            .iter()
            .map(|id| self.seqs[id].computed + 1)
            .sum();
        let prefill: usize = plan.prefill.iter().map(|c| c.start + c.len).sum();
        decode + prefill
    }

    /// The shape of `plan` that its time depends on: its rows, [`context_tokens`](Self::context_tokens)
    /// and the tokens it swaps. Call before [`on_step_done`](Self::on_step_done). What the
    /// simulator and the engine on virtual time time a step by.
    pub fn step_shape(&self, plan: &StepPlan) -> StepShape {
        StepShape {
            decode_rows: plan.decode.len(),
            prefill_tokens: plan.prefill_tokens(),
            kv_tokens: self.context_tokens(plan),
            swapped_tokens: plan.swapped_tokens(),
        }
    }

    /// KV tokens held by running requests (computed context).
    pub fn kv_tokens(&self) -> usize {
        self.running.iter().map(|id| self.seqs[id].computed).sum()
    }

    /// Takes the sequences finished (stop or length) since the last call.
    pub fn take_finished(&mut self) -> Vec<Sequence> {
        std::mem::take(&mut self.finished)
    }

    /// Queues a new request. Refuses when the waiting queue is full, the request could not
    /// run alone in the KV pool, or its id is taken.
    pub fn add(&mut self, mut seq: Sequence) -> Result<(), SchedulerError> {
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(SchedulerError::Overloaded {
                max_waiting: self.cfg.max_waiting,
            });
        }
        if seq.prompt_len == 0 {
            return Err(SchedulerError::EmptyPrompt(seq.id));
        }
        if seq.max_new_tokens == 0 {
            return Err(SchedulerError::NoNewTokens(seq.id));
        }
        // Client numbers meet lengths here: saturate rather than wrap.
        let tokens = seq.prompt_len.saturating_add(seq.max_new_tokens);
        if tokens > self.blocks.capacity_tokens() {
            return Err(SchedulerError::TooLong {
                tokens,
                budget: self.blocks.capacity_tokens(),
            });
        }
        if self.seqs.contains_key(&seq.id) {
            return Err(SchedulerError::DuplicateId(seq.id));
        }
        seq.state = SeqState::Waiting;
        seq.computed = 0;
        seq.waiting_since = self.clock.now();
        self.counters.added += 1;
        let id = seq.id;
        self.seqs.insert(id, seq);
        self.enqueue(id);
        Ok(())
    }

    /// Cancels a live request (client gone): its blocks go back to the pool. Returns it,
    /// finished with [`FinishReason::Aborted`]; `None` when the id is not live.
    pub fn abort(&mut self, id: SeqId) -> Option<Sequence> {
        if self.seqs.get(&id)?.state == SeqState::Waiting {
            self.dequeue(id);
        }
        let mut seq = self.seqs.remove(&id).expect("checked above");
        self.running.retain(|&r| r != id);
        self.blocks.free(id);
        if let Some(swap) = self.swap.as_mut() {
            swap.free(id);
        }
        if let Some(plan) = self.in_flight.as_mut() {
            plan.retain(|&(p, _)| p != id);
        }
        let now = self.clock.now();
        if seq.state == SeqState::Waiting {
            seq.waited += (now - seq.waiting_since).max(0.0);
        }
        seq.state = SeqState::Finished(FinishReason::Aborted);
        seq.times.finish = Some(now);
        self.counters.aborted += 1;
        Some(seq)
    }

    /// Forgets the step in flight after the engine failed to run it, and returns the sequences
    /// it planned (still live): the caller aborts them, so their blocks go back to the pool and
    /// the next [`schedule`](Self::schedule) plans afresh. Empty when no step is in flight.
    pub fn abandon_step(&mut self) -> Vec<SeqId> {
        self.in_flight
            .take()
            .map(|plan| plan.into_iter().map(|(id, _)| id).collect())
            .unwrap_or_default()
    }

    /// Admission key of a waiting sequence: its policy rank, aged by the time it has waited,
    /// minus the common `aging × now` (so the key does not change while it waits).
    fn waiting_key(&self, id: SeqId) -> Urgency {
        let s = &self.seqs[&id];
        let mut rank = self.policy.waiting_rank(s);
        if self.cfg.aging > 0.0 && rank.is_finite() {
            rank -= self.cfg.aging * (s.waited - s.waiting_since);
        }
        Urgency(rank, s.times.arrival, id)
    }

    /// Puts waiting sequence `id` in the queue.
    fn enqueue(&mut self, id: SeqId) {
        let key = self.waiting_key(id);
        self.waiting.insert(key);
    }

    /// Takes waiting sequence `id` out of the queue.
    fn dequeue(&mut self, id: SeqId) {
        let key = self.waiting_key(id);
        if !self.waiting.remove(&key) {
            // A policy whose rank moved while the request waited: find it by id.
            self.waiting.retain(|k| k.2 != id);
        }
    }

    /// Urgency of a running sequence.
    fn running_key(&self, id: SeqId) -> Urgency {
        let s = &self.seqs[&id];
        Urgency(self.policy.running_rank(s), s.times.arrival, id)
    }

    fn preempt(&mut self, id: SeqId, kind: PreemptKind, now: f64, plan: &mut StepPlan) -> usize {
        let freed_budget = plan.remove(id);
        self.running.retain(|&r| r != id);
        self.blocks.free(id);
        let seq = self.seqs.get_mut(&id).expect("a running sequence is live");
        // The chunk just planned for it was taken out of the plan: what is in the cache is
        // `computed` tokens.
        let swapped = seq.computed > 0
            && self
                .swap
                .as_mut()
                .is_some_and(|swap| swap.allocate(id, seq.computed).is_ok());
        if swapped {
            self.counters.swaps += 1;
            self.counters.swapped_tokens += seq.computed as u64;
            plan.swapped_out.push(id);
            plan.swapped_out_tokens += seq.computed;
        } else {
            seq.recomputed_tokens += seq.computed;
            self.counters.recomputed_tokens += seq.computed as u64;
            seq.computed = 0;
        }
        seq.state = SeqState::Waiting;
        seq.waiting_since = now;
        match kind {
            PreemptKind::Policy => {
                seq.preemptions_policy += 1;
                self.counters.preemptions_policy += 1;
            }
            PreemptKind::Memory => {
                seq.preemptions_memory += 1;
                self.counters.preemptions_memory += 1;
            }
        }
        plan.preempted.push((id, kind));
        freed_budget
    }

    /// Plans the next step. Call [`on_step_done`](Self::on_step_done) after running it (also
    /// when the plan is empty).
    pub fn schedule(&mut self) -> Result<StepPlan, SchedulerError> {
        if self.in_flight.is_some() {
            return Err(SchedulerError::StepInFlight);
        }
        let now = self.clock.now();
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.prefill_chunk.unwrap_or(usize::MAX);
        let mut preempted_now: Vec<SeqId> = Vec::new();

        // 1. Running requests, most urgent first.
        let mut order: Vec<Urgency> = self
            .running
            .iter()
            .map(|&id| self.running_key(id))
            .collect();
        order.sort_unstable();
        let mut queue: std::collections::VecDeque<SeqId> = order.into_iter().map(|k| k.2).collect();
        let mut memory_pressure = false;
        while let Some(id) = queue.pop_front() {
            let (decoding, computed, uncomputed) = {
                let s = &self.seqs[&id];
                (s.is_decoding(), s.computed, s.uncomputed())
            };
            let want = if decoding { 1 } else { uncomputed.min(budget) };
            if want == 0 {
                continue; // no prefill budget left this step
            }
            loop {
                let room = self.blocks.max_tokens_for(id).saturating_sub(computed);
                if room >= 1 {
                    let n = want.min(room);
                    self.blocks
                        .append_slots(id, computed + n)
                        .expect("room was checked");
                    budget = budget.saturating_sub(plan.push_row(id, decoding, computed, n));
                    break;
                }
                memory_pressure = true;
                let victim = queue.pop_back().unwrap_or(id);
                self.preempt(victim, PreemptKind::Memory, now, &mut plan);
                preempted_now.push(victim);
                if victim == id {
                    break;
                }
            }
        }

        // 2. Admission (not after a memory preemption: the pool is tight, admitting now would
        //    only cause more preemption; nor into a full batch that the policy never preempts).
        //    Most urgent first, from the sorted queue: admission stops at the first request
        //    that does not fit, so a long queue costs nothing per step (overloaded simulations).
        let room = self.running.len() < self.cfg.max_running || self.policy.preempts();
        if !memory_pressure && room {
            let mut admitted_now: Vec<SeqId> = Vec::new();
            while let Some(&key) = self.waiting.first() {
                let id = key.2;
                // A request swapped out while decoding resumes with a decode; any other
                // admission prefills (from what its swapped KV already holds).
                let (decoding, computed, uncomputed) = {
                    let s = &self.seqs[&id];
                    (s.is_decoding(), s.computed, s.uncomputed())
                };
                if budget == 0 && !decoding {
                    break;
                }
                let want = if decoding { 1 } else { uncomputed.min(budget) };
                let need = self.blocks.blocks_for(computed + want);
                let mut fits =
                    self.running.len() < self.cfg.max_running && self.blocks.free_blocks() >= need;
                if !fits && self.policy.preempts() {
                    let victims = self.policy_victims(id, need, &admitted_now);
                    if let Some(victims) = victims {
                        for v in victims {
                            let back = self.preempt(v, PreemptKind::Policy, now, &mut plan);
                            if budget != usize::MAX {
                                budget += back;
                            }
                            preempted_now.push(v);
                        }
                        fits = true;
                    }
                }
                if !fits {
                    break;
                }
                self.waiting.pop_first();
                self.blocks
                    .allocate(id, computed + want)
                    .expect("free blocks were checked");
                // A waiting request holds computed tokens only in the swap pool: they come back.
                plan.swapped_in_tokens += computed;
                if let Some(swap) = self.swap.as_mut() {
                    swap.free(id);
                }
                let s = self.seqs.get_mut(&id).expect("waiting sequences are live");
                s.state = SeqState::Running;
                s.waited += (now - s.waiting_since).max(0.0);
                s.times.first_scheduled.get_or_insert(now);
                self.counters.admitted += 1;
                budget = budget.saturating_sub(plan.push_row(id, decoding, computed, want));
                self.running.push(id);
                admitted_now.push(id);
            }
        }
        for id in preempted_now {
            self.enqueue(id);
        }

        let lens: Vec<(SeqId, usize)> = plan
            .decode
            .iter()
            .map(|&id| (id, 1))
            .chain(plan.prefill.iter().map(|c| (c.id, c.len)))
            .collect();
        if !plan.is_empty() {
            self.counters.steps += 1;
            self.counters.prefill_tokens += plan.prefill_tokens() as u64;
        }
        self.in_flight = Some(lens);
        Ok(plan)
    }

    /// The running requests to preempt so that waiting request `cand` fits (`need` blocks and
    /// a running slot), least urgent first; `None` when the preemptible requests ranked
    /// strictly worse than it do not make enough room.
    fn policy_victims(
        &self,
        cand: SeqId,
        need: usize,
        admitted_now: &[SeqId],
    ) -> Option<Vec<SeqId>> {
        let cand_rank = self.policy.waiting_rank(&self.seqs[&cand]);
        let mut eligible: Vec<Urgency> = self
            .running
            .iter()
            .filter(|id| !admitted_now.contains(id))
            .filter(|id| self.policy.preemptible(&self.seqs[id]))
            .map(|&id| self.running_key(id))
            .filter(|k| k.0 > cand_rank)
            .collect();
        eligible.sort_unstable_by(|a, b| b.cmp(a));
        let mut slots = self.running.len();
        let mut free = self.blocks.free_blocks();
        let mut victims = Vec::new();
        for Urgency(_, _, id) in eligible {
            if slots < self.cfg.max_running && free >= need {
                break;
            }
            slots -= 1;
            free += self.blocks.blocks_of(id);
            victims.push(id);
        }
        (slots < self.cfg.max_running && free >= need).then_some(victims)
    }

    /// Applies the results of the step planned last: advances each planned sequence by its
    /// chunk, appends sampled tokens, records predictions and finishes sequences that stopped
    /// or reached `max_new_tokens` or their evaluation stop (their blocks go back to the pool). Results of sequences
    /// aborted since the plan are ignored.
    pub fn on_step_done(&mut self, results: &[StepResult]) -> Result<(), SchedulerError> {
        let plan = self
            .in_flight
            .as_ref()
            .ok_or(SchedulerError::NoStepInFlight)?;
        let mut by_id: HashMap<SeqId, &StepResult> = HashMap::with_capacity(results.len());
        for r in results {
            if !plan.iter().any(|&(p, _)| p == r.id) {
                if self.seqs.contains_key(&r.id) {
                    return Err(SchedulerError::Unscheduled(r.id));
                }
                continue; // aborted since the plan
            }
            by_id.insert(r.id, r);
        }
        for &(id, len) in plan {
            let s = &self.seqs[&id];
            let completes = s.computed + len == s.total_len();
            let has_token = by_id.get(&id).is_some_and(|r| r.token.is_some());
            if completes && !has_token {
                return Err(SchedulerError::MissingToken(id));
            }
            if !completes && has_token {
                return Err(SchedulerError::UnexpectedToken(id));
            }
        }
        let plan = self.in_flight.take().expect("checked above");
        let now = self.clock.now();
        for (id, len) in plan {
            let s = self.seqs.get_mut(&id).expect("planned sequences are live");
            s.computed += len;
            let Some(r) = by_id.get(&id) else { continue };
            let Some(token) = r.token else { continue };
            s.generated.push(token);
            s.times.tokens.push(now);
            s.times.first_token.get_or_insert(now);
            self.counters.generated_tokens += 1;
            if let Some(p) = r.prediction {
                // The first prediction's total: tokens generated (this one included) + remaining.
                s.initial_prediction
                    .get_or_insert(s.generated.len() as f64 + p);
                s.predicted_remaining = Some(p);
            }
            let reason = if r.stop {
                Some(FinishReason::Stop)
            } else if s.generated.len() >= s.stop_len() {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let mut s = self.seqs.remove(&id).expect("present");
                s.state = SeqState::Finished(reason);
                s.times.finish = Some(now);
                self.blocks.free(id);
                self.running.retain(|&r| r != id);
                self.counters.finished += 1;
                self.finished.push(s);
            }
        }
        Ok(())
    }

    /// Checks the scheduler's invariants: the pool is consistent, every block is held by a
    /// running request that needs it, waiting requests hold none, queues are disjoint and
    /// complete, and `max_running` holds.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.blocks.check()?;
        if self.running.len() > self.cfg.max_running {
            return Err(format!(
                "{} running > max_running {}",
                self.running.len(),
                self.cfg.max_running
            ));
        }
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            return Err(format!(
                "{} running + {} waiting != {} live",
                self.running.len(),
                self.waiting.len(),
                self.seqs.len()
            ));
        }
        let mut held = 0;
        for id in &self.running {
            let s = self.seqs.get(id).ok_or(format!("running {id} not live"))?;
            if s.state != SeqState::Running {
                return Err(format!("running {id} is {:?}", s.state));
            }
            let b = self.blocks.blocks_of(*id);
            if b < self.blocks.blocks_for(s.computed) {
                return Err(format!("{id} holds {b} blocks for {} tokens", s.computed));
            }
            held += b;
        }
        let mut swapped = 0;
        for key in &self.waiting {
            let id = &key.2;
            let s = self.seqs.get(id).ok_or(format!("waiting {id} not live"))?;
            let in_swap = self.swap.as_ref().map_or(0, |p| p.blocks_of(*id));
            if self.waiting_key(*id) != *key {
                return Err(format!("waiting {id}: its queue key moved while it waited"));
            }
            if s.state != SeqState::Waiting || in_swap != self.blocks.blocks_for(s.computed) {
                return Err(format!(
                    "waiting {id}: {:?}, computed {}, {in_swap} swap blocks",
                    s.state, s.computed
                ));
            }
            swapped += in_swap;
            if self.blocks.blocks_of(*id) != 0 {
                return Err(format!("waiting {id} holds blocks"));
            }
            if self.running.contains(id) {
                return Err(format!("{id} both waiting and running"));
            }
        }
        if let Some(swap) = &self.swap {
            swap.check()?;
            if swapped != swap.used_blocks() {
                return Err(format!(
                    "waiting requests hold {swapped} swap blocks, the swap pool says {} used",
                    swap.used_blocks()
                ));
            }
        }
        if held != self.blocks.used_blocks() {
            return Err(format!(
                "running requests hold {held} blocks, the pool says {} used",
                self.blocks.used_blocks()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod driver;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
