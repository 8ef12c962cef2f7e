//! [`Engine`]: the serving loop on its own thread. It owns the model's KV caches and the
//! [`Scheduler`]; each iteration drains commands (add, abort, shutdown), plans a step, runs one
//! batched forward over prefill chunks and decodes (capturing only the predictor's layers),
//! samples, runs the predictor batched over the rows that produced a token, reports tokens to
//! per-request channels and records a [`StepRecord`].
//!
//! Callers talk to it through [`Engine::submit`] (async) or [`Engine::submit_blocking`], which
//! answer admission errors (overload, too long) at once and otherwise return a
//! [`RequestHandle`] whose channel yields [`Event::Token`]s and one [`Event::Done`]. Dropping
//! the handle cancels the request and frees its blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use trail_checkpoints::schedule::{self, Need, RowOutputs};
use trail_checkpoints::{Checkpoint, RefineState};
use trail_llm::{KvCache, LayerSet, Row, Runner, Sampler, Sampling};

use crate::clock::{Clock, ManualClock, SystemClock, VirtualTime};
use crate::error::EngineError;
use crate::metrics::EngineStats;
use crate::policy::PolicyKind;
use crate::predictor::Predictor;
use crate::recording::{PredictorEvent, Recording, RecordingKey, Recordings, Replay};
use crate::scheduler::{PreemptKind, Scheduler, SchedulerConfig, StepResult};
use crate::sequence::{FinishReason, SeqId, SeqState, Sequence, Timestamps};
use crate::steps::StepRecord;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Scheduler settings.
    pub scheduler: SchedulerConfig,
    /// `--policy`.
    pub policy: PolicyKind,
    /// TRAIL's preemption limit (`--c`).
    pub c: f64,
    /// Refresh the refined prediction every N tokens (`--refine-every`); the checkpoint's
    /// interval when `None`.
    pub refine_every: Option<u32>,
    /// Run on virtual time instead of the wall clock (see [`VirtualTime`]).
    pub virtual_time: Option<VirtualTime>,
    /// Replay requests recorded here instead of running the model for them, and record the
    /// others (see [`crate::recording`]). Needs virtual time.
    pub recordings: Option<Arc<Recordings>>,
}

impl EngineConfig {
    /// Defaults with a KV budget and a policy.
    pub fn new(kv_budget_tokens: usize, policy: PolicyKind) -> Self {
        Self {
            scheduler: SchedulerConfig::new(kv_budget_tokens),
            policy,
            c: 0.8,
            refine_every: None,
            virtual_time: None,
            recordings: None,
        }
    }
}

/// A generation request, already tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// Prompt tokens (chat template applied).
    pub prompt: Vec<u32>,
    /// Most tokens to generate: the cap the client sent. Predictors clamp to it, and it is all
    /// any policy but the oracle knows of the request's length.
    pub max_new_tokens: usize,
    /// Greedy or seeded top-p.
    pub sampling: Sampling,
    /// Keep generating past stop tokens (benchmarks).
    pub ignore_eos: bool,
    /// Total-length prediction made before admission (BERT), if any.
    pub initial_prediction: Option<f64>,
    /// **Evaluation only**: end the request after exactly this many tokens (a profiled length),
    /// stop tokens ignored. Only the engine's stop rule and the `oracle` policy read it; the
    /// predictors, the filter's clamp and every other policy see `max_new_tokens`. At most
    /// `max_new_tokens`. Over HTTP it is `eval_output_tokens`, accepted only by a server started
    /// with `--allow-eval-output-tokens`.
    pub eval_stop: Option<usize>,
    /// Arrival on a virtual-time engine's clock, in seconds: the request reaches the scheduler
    /// when the clock does. A wall-clock engine ignores it (a request arrives when submitted).
    pub arrival: Option<f64>,
}

impl GenRequest {
    /// Greedy generation of up to `max_new_tokens` after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: Sampling::Greedy,
            ignore_eos: false,
            initial_prediction: None,
            eval_stop: None,
            arrival: None,
        }
    }
}

/// What a request's channel yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token (stop tokens included).
    Token(u32),
    /// The request ended; the last event.
    Done(Box<Summary>),
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Request id.
    pub id: SeqId,
    /// Why it ended.
    #[serde(serialize_with = "ser_reason")]
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (a stop token included).
    pub tokens: Vec<u32>,
    /// Timestamps (engine clock, seconds).
    #[serde(skip)]
    pub times: Timestamps,
    /// Policy preemptions.
    pub preemptions_policy: u32,
    /// Memory preemptions.
    pub preemptions_memory: u32,
    /// KV tokens recomputed.
    pub recomputed_tokens: usize,
    /// The first length prediction (total tokens).
    pub initial_prediction: Option<f64>,
    /// `(g, estimate at row g)`, one per generated token: the estimate of the tokens still to
    /// come after `g` generated, made in the step that sampled token `g + 1` (the row
    /// convention of [`trail_checkpoints::schedule`]; `trail report` scores the same values).
    pub predictions: Vec<(u32, f64)>,
}

fn ser_reason<S: serde::Serializer>(r: &FinishReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

/// What [`Engine::shutdown`] returns.
#[derive(Debug, Clone)]
pub struct EngineReport {
    /// Every step.
    pub steps: Vec<StepRecord>,
    /// Final statistics.
    pub stats: EngineStats,
}

/// A submitted request: its id and its event channel. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestHandle {
    /// Request id.
    pub id: SeqId,
    /// Tokens, then one [`Event::Done`].
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl RequestHandle {
    /// Waits for the end (blocking; not from inside an async runtime) and returns the summary.
    pub fn wait(mut self) -> Result<Summary, EngineError> {
        while let Some(ev) = self.events.blocking_recv() {
            if let Event::Done(s) = ev {
                return Ok(*s);
            }
        }
        Err(EngineError::Stopped(
            "the request's channel closed without an end".into(),
        ))
    }
}

/// A request on its way to the engine thread.
struct Add {
    id: SeqId,
    req: GenRequest,
    reply: oneshot::Sender<AddReply>,
}

enum Command {
    /// Requests admitted in the same iteration.
    Add(Vec<Add>),
    Abort(SeqId),
    Shutdown,
}

/// A handle on the engine thread.
pub struct Engine {
    tx: std_mpsc::Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    thread: Option<JoinHandle<WorkerExit>>,
    next_id: AtomicU64,
    runner: Arc<Runner>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl Engine {
    /// Starts the engine thread over `runner`, with the TRAIL predictor of `checkpoint` when
    /// given. A checkpoint made with other kernels than the runner's is a warning (kept in
    /// [`warnings`](Self::warnings)); one made for another hidden size is an error.
    pub fn start(
        runner: Arc<Runner>,
        checkpoint: Option<Checkpoint>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let mut warnings = Vec::new();
        let predictor = match checkpoint {
            Some(ck) => {
                let hidden = runner.config().hidden_size;
                let layers = runner.config().num_hidden_layers;
                if ck.meta.hidden_size != hidden {
                    return Err(EngineError::Predictor(format!(
                        "checkpoint for hidden size {}, model has {hidden}",
                        ck.meta.hidden_size
                    )));
                }
                if let Some(l) = ck
                    .meta
                    .probe_layers
                    .iter()
                    .chain(&ck.meta.prompt_layers)
                    .find(|&&l| l >= layers)
                {
                    return Err(EngineError::Predictor(format!(
                        "checkpoint reads layer {l}, model has {layers}"
                    )));
                }
                if !trail_llm::same_numerics(&ck.meta.kernel_id, runner.kernel_id()) {
                    let w = format!(
                        "the predictor was trained on hidden states of kernels {:?}, the runner's {:?} \
                         compute other bits",
                        ck.meta.kernel_id,
                        runner.kernel_id()
                    );
                    tracing::warn!("{w}");
                    warnings.push(w);
                }
                Some(Predictor::new(ck, cfg.refine_every))
            }
            None => None,
        };
        if cfg.recordings.is_some() && cfg.virtual_time.is_none() {
            return Err(EngineError::Config(
                "replaying recorded requests needs virtual time: on the wall clock, steps that \
                 run no model would be timed"
                    .into(),
            ));
        }
        let manual = cfg
            .virtual_time
            .as_ref()
            .map(|_| Arc::new(ManualClock::at(0.0)));
        let clock: Arc<dyn Clock> = match &manual {
            Some(m) => m.clone(),
            None => Arc::new(SystemClock::new()),
        };
        let virtual_time = manual.zip(cfg.virtual_time.clone());
        let policy = cfg.policy.build(cfg.c);
        let sched = Scheduler::new(cfg.scheduler.clone(), policy, clock.clone())?;
        let stats = Arc::new(Mutex::new(EngineStats::new(
            cfg.policy.as_str(),
            sched.blocks().total_blocks(),
        )));
        let (tx, rx) = std_mpsc::channel();
        let worker = Worker {
            runner: runner.clone(),
            sched,
            predictor,
            clock,
            rx,
            ctxs: HashMap::new(),
            stats: stats.clone(),
            steps: Vec::new(),
            draining: false,
            virtual_time,
            pending: Vec::new(),
            recordings: cfg.recordings.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("trail-engine".into())
            .spawn(move || worker.run_to_exit())
            .map_err(|e| EngineError::Stopped(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx,
            stats,
            thread: Some(thread),
            next_id: AtomicU64::new(0),
            runner,
            warnings,
        })
    }

    /// The runner (tokenizer, chat template).
    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// Warnings raised at start (kernel-id mismatch).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether the engine thread still runs (or ran to a clean shutdown has not been asked):
    /// `false` once it died of an error or a panic.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn send_add(
        &self,
        req: GenRequest,
    ) -> Result<(SeqId, oneshot::Receiver<AddReply>), EngineError> {
        let mut sent = self.send_adds(vec![req])?;
        Ok(sent.remove(0))
    }

    fn send_adds(
        &self,
        reqs: Vec<GenRequest>,
    ) -> Result<Vec<(SeqId, oneshot::Receiver<AddReply>)>, EngineError> {
        let mut adds = Vec::with_capacity(reqs.len());
        let mut rxs = Vec::with_capacity(reqs.len());
        for req in reqs {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (reply, rx) = oneshot::channel();
            adds.push(Add { id, req, reply });
            rxs.push((id, rx));
        }
        self.tx
            .send(Command::Add(adds))
            .map_err(|_| EngineError::Stopped("the engine thread is gone".into()))?;
        Ok(rxs)
    }

    /// Submits a request; admission errors come back at once.
    pub async fn submit(&self, req: GenRequest) -> Result<RequestHandle, EngineError> {
        let (id, rx) = self.send_add(req)?;
        let events = rx
            .await
            .map_err(|_| EngineError::Stopped("the engine thread is gone".into()))??;
        Ok(RequestHandle { id, events })
    }

    /// [`submit`](Self::submit) for callers outside an async runtime.
    pub fn submit_blocking(&self, req: GenRequest) -> Result<RequestHandle, EngineError> {
        let (id, rx) = self.send_add(req)?;
        let events = rx
            .blocking_recv()
            .map_err(|_| EngineError::Stopped("the engine thread is gone".into()))??;
        Ok(RequestHandle { id, events })
    }

    /// Submits `reqs` together, for callers outside an async runtime: the engine admits them
    /// in the same iteration, as if they all arrived at once (benchmarks). Admission errors
    /// come back per request, in order.
    pub fn submit_all_blocking(
        &self,
        reqs: Vec<GenRequest>,
    ) -> Result<Vec<Result<RequestHandle, EngineError>>, EngineError> {
        Ok(self
            .send_adds(reqs)?
            .into_iter()
            .map(|(id, rx)| {
                let events = rx
                    .blocking_recv()
                    .map_err(|_| EngineError::Stopped("the engine thread is gone".into()))??;
                Ok(RequestHandle { id, events })
            })
            .collect())
    }

    /// Cancels a request (also done by dropping its handle).
    pub fn abort(&self, id: SeqId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// Stops admitting, lets every admitted request finish, joins the thread. An engine that
    /// died is an error (its steps are lost: see [`shutdown_report`](Self::shutdown_report)).
    pub fn shutdown(self) -> Result<EngineReport, EngineError> {
        match self.shutdown_report() {
            (report, None) => Ok(report),
            (_, Some(e)) => Err(e),
        }
    }

    /// [`shutdown`](Self::shutdown) that keeps the steps run before an engine death: the
    /// report, and the error the engine thread died of, if it did.
    pub fn shutdown_report(mut self) -> (EngineReport, Option<EngineError>) {
        let _ = self.tx.send(Command::Shutdown);
        let (steps, error) = self.join();
        let report = EngineReport {
            steps,
            stats: self.stats(),
        };
        (report, error)
    }

    fn join(&mut self) -> WorkerExit {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                (
                    Vec::new(),
                    Some(EngineError::Stopped("the engine thread panicked".into())),
                )
            }),
            None => (Vec::new(), None),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.tx.send(Command::Shutdown);
            let _ = self.join();
        }
    }
}

type AddReply = Result<mpsc::UnboundedReceiver<Event>, EngineError>;

/// What the engine thread ends with: its steps, and the error it died of, if any.
type WorkerExit = (Vec<StepRecord>, Option<EngineError>);

/// Per-request state the scheduler does not know: tokens, cache, sampler, channel, filter.
struct Ctx {
    prompt: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    ignore_eos: bool,
    tx: mpsc::UnboundedSender<Event>,
    refine: Option<RefineState>,
    predictions: Vec<(u32, f64)>,
    /// The recording this request replays: no forward runs for it.
    replay: Option<Replay>,
    /// Where this request's tokens and predictor outputs will be recorded when it finishes.
    record: Option<(RecordingKey, Vec<PredictorEvent>)>,
}

struct Worker {
    runner: Arc<Runner>,
    sched: Scheduler,
    predictor: Option<Predictor>,
    clock: Arc<dyn Clock>,
    rx: std_mpsc::Receiver<Command>,
    ctxs: HashMap<SeqId, Ctx>,
    stats: Arc<Mutex<EngineStats>>,
    steps: Vec<StepRecord>,
    draining: bool,
    /// The clock to move and the step cost, on virtual time.
    virtual_time: Option<(Arc<ManualClock>, VirtualTime)>,
    /// Requests added before their virtual arrival, latest first (popped from the end).
    pending: Vec<Sequence>,
    /// Recorded requests to replay, and where to record the others.
    recordings: Option<Arc<Recordings>>,
}

/// One row of a step, before the caches are lent to the model.
struct RowSpec {
    id: SeqId,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    start: usize,
    produces: bool,
}

impl Worker {
    /// [`run`](Self::run), catching a panic: either way the steps so far come back.
    fn run_to_exit(mut self) -> WorkerExit {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run()));
        let error = match ran {
            Ok(()) => None,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!("the engine thread panicked: {what}");
                Some(EngineError::Stopped(format!(
                    "the engine thread panicked: {what}"
                )))
            }
        };
        (std::mem::take(&mut self.steps), error)
    }

    fn run(&mut self) {
        loop {
            // Commands: block when there is nothing to do.
            if self.sched.is_idle() && self.pending.is_empty() {
                if self.draining {
                    break;
                }
                match self.rx.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => break,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            self.release_arrivals();
            self.cancel_disconnected();
            if self.sched.is_idle() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!("engine step failed: {e}");
                self.fail_step(&e);
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Add(adds) => {
                for Add { id, req, reply } in adds {
                    let res = self.add(id, req);
                    if let Err(Ok(events)) = reply.send(res) {
                        // The caller went away before the answer: cancel.
                        drop(events);
                        self.abort(id);
                    }
                }
            }
            Command::Abort(id) => self.abort(id),
            Command::Shutdown => self.draining = true,
        }
    }

    fn add(&mut self, id: SeqId, req: GenRequest) -> AddReply {
        if self.draining {
            return Err(EngineError::ShuttingDown);
        }
        let context = self.runner.config().max_position_embeddings;
        let fits = req
            .prompt
            .len()
            .checked_add(req.max_new_tokens)
            .is_some_and(|total| total <= context);
        if !fits {
            return Err(EngineError::ContextExceeded {
                prompt: req.prompt.len(),
                max_new: req.max_new_tokens,
                context,
            });
        }
        let now = self.clock.now();
        let arrival = match (&self.virtual_time, req.arrival) {
            (Some(_), Some(t)) if t.is_finite() => t.max(now),
            _ => now,
        };
        if let Some(n) = req.eval_stop
            && (n == 0 || n > req.max_new_tokens)
        {
            return Err(EngineError::EvalStop {
                eval_stop: n,
                max_new: req.max_new_tokens,
            });
        }
        let mut seq = Sequence::new(id, req.prompt.len(), req.max_new_tokens, arrival);
        seq.initial_prediction = req.initial_prediction;
        seq.eval_stop = req.eval_stop;
        if arrival > now {
            // Latest first, so the next arrival pops from the end; ties by id.
            let at = self
                .pending
                .partition_point(|p| (p.times.arrival, p.id) > (arrival, id));
            self.pending.insert(at, seq);
        } else {
            self.sched.add(seq)?;
        }
        let (replay, record) = match &self.recordings {
            Some(recs) => {
                let key = RecordingKey::of(&req);
                match recs.get(&key, self.predictor.is_some()) {
                    Some(rec) => (Some(Replay::new(rec)), None),
                    None => (None, Some((key, Vec::new()))),
                }
            }
            None => (None, None),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.ctxs.insert(
            id,
            Ctx {
                prompt: req.prompt,
                cache: self.runner.model().new_cache(),
                sampler: Sampler::new(req.sampling),
                // An evaluation stop ends the request at its profiled length, stop tokens or not.
                ignore_eos: req.ignore_eos || req.eval_stop.is_some(),
                tx,
                refine: None,
                predictions: Vec::new(),
                replay,
                record,
            },
        );
        Ok(rx)
    }

    /// Virtual time: hands the scheduler every request whose arrival the clock has reached,
    /// first moving the clock to the next arrival when nothing else is live. A request the
    /// scheduler refuses then (queue full) ends at once as aborted.
    fn release_arrivals(&mut self) {
        let Some((clock, _)) = &self.virtual_time else {
            return;
        };
        if self.sched.is_idle()
            && let Some(next) = self.pending.last()
        {
            clock.set(next.times.arrival.max(clock.now()));
        }
        let now = clock.now();
        while self.pending.last().is_some_and(|p| p.times.arrival <= now) {
            let seq = self.pending.pop().expect("checked");
            let id = seq.id;
            if let Err(e) = self.sched.add(seq.clone()) {
                tracing::warn!("request {id} refused at its arrival: {e}");
                self.end_unscheduled(seq, now);
            }
        }
    }

    /// Ends a request the scheduler does not hold (pending its virtual arrival) as aborted.
    fn end_unscheduled(&mut self, mut seq: Sequence, now: f64) {
        seq.state = SeqState::Finished(FinishReason::Aborted);
        seq.times.finish = Some(now);
        self.send_done(seq);
    }

    /// Sends an ended request's summary on its channel and drops its context.
    fn send_done(&mut self, seq: Sequence) {
        if let Some(ctx) = self.ctxs.remove(&seq.id) {
            let _ = ctx
                .tx
                .send(Event::Done(Box::new(summary(seq, ctx.predictions))));
        }
    }

    fn abort(&mut self, id: SeqId) {
        if let Some(pos) = self.pending.iter().position(|p| p.id == id) {
            let seq = self.pending.remove(pos);
            self.end_unscheduled(seq, self.clock.now());
            return;
        }
        if let Some(seq) = self.sched.abort(id) {
            self.send_done(seq);
            self.publish_gauges();
        }
    }

    /// Running, waiting and KV gauges of `/metrics`, from the scheduler now.
    fn publish_gauges(&self) {
        set_gauges(
            &mut self.stats.lock().unwrap_or_else(|e| e.into_inner()),
            &self.sched,
        );
    }

    fn cancel_disconnected(&mut self) {
        let gone: Vec<SeqId> = self
            .ctxs
            .iter()
            .filter(|(_, c)| c.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id);
        }
    }

    /// A step failed: the requests it planned end as aborted, the others go on. A failure
    /// outside a planned step (none in flight) ends every live request, so the engine starts
    /// clean either way; the loop itself never stops for a failed step.
    fn fail_step(&mut self, e: &EngineError) {
        let mut ids = self.sched.abandon_step();
        if ids.is_empty() {
            ids = self.ctxs.keys().copied().collect();
        }
        for id in ids {
            tracing::warn!("request {id} aborted: {e}");
            self.abort(id);
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let t = self.clock.now();
        let plan = self.sched.schedule()?;
        // Recomputed victims lose their cache; swapped ones keep it (the swap pool is this RAM).
        for &(id, _) in &plan.preempted {
            if !plan.swapped_out.contains(&id)
                && let Some(c) = self.ctxs.get_mut(&id)
            {
                c.cache.clear();
            }
        }
        if plan.is_empty() {
            self.sched.on_step_done(&[])?;
            return Ok(());
        }

        // Rows: decodes, then prefill chunks of prompt + generated.
        let mut specs = Vec::with_capacity(plan.num_rows());
        for &id in &plan.decode {
            let seq = self.sched.get(id).expect("planned sequences are live");
            specs.push(RowSpec {
                id,
                tokens: vec![
                    *seq.generated
                        .last()
                        .expect("a decoding sequence has a token"),
                ],
                prompt_tokens: 0,
                start: seq.computed,
                produces: true,
            });
        }
        for c in &plan.prefill {
            let seq = self.sched.get(c.id).expect("planned sequences are live");
            let ctx = &self.ctxs[&c.id];
            let end = c.start + c.len;
            let tokens: Vec<u32> = ctx
                .prompt
                .iter()
                .chain(&seq.generated)
                .skip(c.start)
                .take(c.len)
                .copied()
                .collect();
            specs.push(RowSpec {
                id: c.id,
                tokens,
                prompt_tokens: end.min(seq.prompt_len).saturating_sub(c.start),
                start: c.start,
                produces: end == seq.total_len(),
            });
        }

        // Replayed requests run no model; the other rows share one forward step, with their
        // caches lent to it.
        let computed: Vec<usize> = (0..specs.len())
            .filter(|&r| self.ctxs[&specs[r].id].replay.is_none())
            .collect();
        let mut out_row: Vec<Option<usize>> = vec![None; specs.len()];
        for (j, &r) in computed.iter().enumerate() {
            out_row[r] = Some(j);
        }
        let model = self.runner.model();
        let mut caches: Vec<KvCache> = Vec::with_capacity(computed.len());
        for &r in &computed {
            let s = &specs[r];
            let ctx = self
                .ctxs
                .get_mut(&s.id)
                .expect("planned requests have a context");
            if ctx.cache.len() != s.start {
                return Err(EngineError::Internal(format!(
                    "request {}: cache holds {} tokens, the plan starts at {}",
                    s.id,
                    ctx.cache.len(),
                    s.start
                )));
            }
            caches.push(std::mem::replace(&mut ctx.cache, model.new_cache()));
        }
        let layers = self
            .predictor
            .as_ref()
            .map_or(LayerSet::NONE, Predictor::layers);
        let tf = Instant::now();
        let out = (!computed.is_empty()).then(|| {
            let mut rows: Vec<Row<'_>> = computed
                .iter()
                .zip(caches.iter_mut())
                .map(|(&r, c)| Row::new(c, &specs[r].tokens, specs[r].prompt_tokens))
                .collect();
            model.step(&mut rows, layers)
        });
        let forward_secs = tf.elapsed().as_secs_f64();
        for (&r, c) in computed.iter().zip(caches) {
            self.ctxs.get_mut(&specs[r].id).expect("present").cache = c;
        }
        let out = out.transpose()?;

        // Sample, or read the replayed token.
        let mut results: Vec<StepResult> = Vec::new();
        let mut produced_rows: Vec<usize> = Vec::new();
        for (r, s) in specs.iter().enumerate() {
            if !s.produces {
                continue;
            }
            let ctx = self.ctxs.get_mut(&s.id).expect("present");
            let token = match (&ctx.replay, &out, out_row[r]) {
                (Some(rp), _, _) => {
                    let generated = self
                        .sched
                        .get(s.id)
                        .expect("planned sequences are live")
                        .generated
                        .len();
                    rp.token(generated).ok_or_else(|| {
                        EngineError::Replay(format!(
                            "request {}: its recording ends at {generated} tokens",
                            s.id
                        ))
                    })?
                }
                (None, Some(out), Some(j)) => ctx.sampler.sample(out.logits(j)),
                _ => unreachable!("computed rows are in the forward step"),
            };
            let stop = !ctx.ignore_eos && self.runner.is_stop(token);
            results.push(StepResult {
                id: s.id,
                token: Some(token),
                stop,
                prediction: None,
            });
            produced_rows.push(r);
        }

        // Predict, batched over the rows that produced a token.
        let tp = Instant::now();
        if let Some(pred) = &self.predictor {
            let rows = ProducedRows {
                specs: &specs,
                produced: &produced_rows,
                out: out.as_ref(),
                out_row: &out_row,
            };
            predict(pred, &self.sched, &mut self.ctxs, &rows, &mut results)?;
        }
        let predictor_secs = tp.elapsed().as_secs_f64();

        // Virtual time: the step's tokens are reported at its modelled end.
        if let Some((clock, vt)) = &self.virtual_time {
            let kv = self.sched.context_tokens(&plan);
            let secs = vt.step_secs(plan.decode.len(), plan.prefill_tokens(), kv);
            clock.advance(secs.max(0.0));
        }
        self.sched.on_step_done(&results)?;
        for r in &results {
            let ctx = self.ctxs.get_mut(&r.id).expect("present");
            // A closed channel is noticed by `cancel_disconnected` next iteration.
            let _ = ctx
                .tx
                .send(Event::Token(r.token.expect("results carry tokens")));
        }
        let finished = self.sched.take_finished();
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        for seq in finished {
            let ctx = self
                .ctxs
                .remove(&seq.id)
                .expect("finished requests have a context");
            if let (Some(recs), Some((key, events))) = (&self.recordings, ctx.record) {
                let events = self.predictor.is_some().then_some(events);
                recs.insert(
                    key,
                    Recording {
                        tokens: seq.generated.clone(),
                        events,
                    },
                );
            }
            let sum = summary(seq, ctx.predictions);
            score(&mut st, &sum);
            let _ = ctx.tx.send(Event::Done(Box::new(sum)));
        }
        let step_secs = t0.elapsed().as_secs_f64();
        set_gauges(&mut st, &self.sched);
        st.step_secs += step_secs;
        st.predictor_secs += predictor_secs;
        drop(st);
        let count = |k| plan.preempted.iter().filter(|p| p.1 == k).count();
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
            step_secs,
            forward_secs,
            predictor_secs,
            preempted_policy: count(PreemptKind::Policy),
            preempted_memory: count(PreemptKind::Memory),
        });
        Ok(())
    }
}

/// The rows of a step that produced a token, and where the forward step's output is.
struct ProducedRows<'a> {
    specs: &'a [RowSpec],
    /// Indices into `specs`, in the order of the step's results.
    produced: &'a [usize],
    /// The forward step (absent when every row was replayed).
    out: Option<&'a trail_llm::StepOutput>,
    /// Each spec's row in `out` (`None` for replayed requests).
    out_row: &'a [Option<usize>],
}

/// Runs the predictor for the rows that produced a token, on the served schedule
/// ([`trail_checkpoints::schedule`]): a row `g` (tokens generated before this step) starts the
/// filter (prompt predictor and probe of the prefill) or refreshes it when due, each kind of
/// predictor in one call over the rows that need it (a replayed request reads its recorded
/// outputs instead). Each row records its estimate at `g`, then counts the token it produced and
/// reports the remaining estimate to the scheduler. Requests being recorded keep each output.
fn predict(
    pred: &Predictor,
    sched: &Scheduler,
    ctxs: &mut HashMap<SeqId, Ctx>,
    rows: &ProducedRows<'_>,
    results: &mut [StepResult],
) -> Result<(), EngineError> {
    let filter = pred.filter();
    let seq = |id: SeqId| sched.get(id).expect("planned sequences are live");
    let mut wants: Vec<Want> = Vec::with_capacity(rows.produced.len());
    let (mut prompt_feats, mut prompt_of) = (Vec::new(), Vec::new());
    let (mut probe_feats, mut probe_of) = (Vec::new(), Vec::new());
    for (i, &r) in rows.produced.iter().enumerate() {
        let id = rows.specs[r].id;
        let g = u32::try_from(seq(id).generated.len()).unwrap_or(u32::MAX);
        let ctx = ctxs.get_mut(&id).expect("present");
        let need = schedule::need(ctx.refine.as_ref(), filter, g);
        let mut want = Want {
            result: i,
            g,
            prompt: None,
            probe: None,
        };
        if need != Need::Nothing {
            if let Some(rp) = ctx.replay.as_mut() {
                let ev = rp
                    .next_event(g as usize)
                    .map_err(|e| EngineError::Replay(format!("request {id}: {e}")))?;
                want.prompt = ev.prompt.clone();
                want.probe = Some(ev.probs.clone());
            } else {
                let (Some(out), Some(row)) = (rows.out, rows.out_row[r]) else {
                    unreachable!("computed rows are in the forward step");
                };
                if need == Need::Start
                    && let Some(f) = pred.prompt_features(&ctx.cache)
                {
                    prompt_feats.extend(f);
                    prompt_of.push(wants.len());
                }
                pred.decode_features(out, row, &mut probe_feats);
                probe_of.push(wants.len());
            }
        }
        wants.push(want);
    }
    let k = pred.k();
    if !prompt_of.is_empty() {
        let probs = pred.prompt_proba(&prompt_feats)?;
        for (w, p) in prompt_of.iter().zip(probs.chunks_exact(k)) {
            wants[*w].prompt = Some(p.to_vec());
        }
    }
    if !probe_of.is_empty() {
        let probs = pred.decode_proba(&probe_feats)?;
        for (w, p) in probe_of.iter().zip(probs.chunks_exact(k)) {
            wants[*w].probe = Some(p.to_vec());
        }
    }
    for w in wants {
        let id = results[w.result].id;
        let cap = u32::try_from(seq(id).max_new_tokens).unwrap_or(u32::MAX);
        let ctx = ctxs.get_mut(&id).expect("present");
        let outputs = RowOutputs {
            prompt: w.prompt.as_deref(),
            probe: w.probe.as_deref(),
        };
        let estimate = schedule::apply(&mut ctx.refine, filter, w.g, cap, outputs);
        ctx.predictions.push((w.g, estimate));
        if let (Some((_, events)), Some(probs)) = (ctx.record.as_mut(), w.probe) {
            events.push(PredictorEvent {
                generated: w.g as usize,
                probs,
                prompt: w.prompt,
            });
        }
        let st = ctx.refine.as_mut().expect("applied");
        st.advance(1);
        results[w.result].prediction = Some(st.remaining(filter));
    }
    Ok(())
}

/// A produced row's predictor outputs, gathered before the filter applies them.
struct Want {
    /// Index into the step's results.
    result: usize,
    /// The row: tokens generated before this step.
    g: u32,
    prompt: Option<Vec<f32>>,
    probe: Option<Vec<f32>>,
}

/// The gauges and counters of `st` from the scheduler's state now.
fn set_gauges(st: &mut EngineStats, sched: &Scheduler) {
    st.waiting = sched.num_waiting();
    st.running = sched.num_running();
    st.kv_blocks_used = sched.blocks().used_blocks();
    st.counters = sched.counters();
}

fn summary(seq: Sequence, predictions: Vec<(u32, f64)>) -> Summary {
    let finish = match seq.state {
        crate::sequence::SeqState::Finished(r) => r,
        _ => FinishReason::Aborted,
    };
    Summary {
        id: seq.id,
        finish,
        prompt_tokens: seq.prompt_len,
        tokens: seq.generated,
        times: seq.times,
        preemptions_policy: seq.preemptions_policy,
        preemptions_memory: seq.preemptions_memory,
        recomputed_tokens: seq.recomputed_tokens,
        initial_prediction: seq.initial_prediction,
        predictions,
    }
}

/// Adds a finished request to the latency histograms and the online predictor MAE.
fn score(st: &mut EngineStats, s: &Summary) {
    let t = &s.times;
    if let Some(ft) = t.first_token {
        st.ttft.observe(ft - t.arrival);
    }
    if let Some(f) = t.finish {
        st.latency.observe(f - t.arrival);
    }
    let len = s.tokens.len() as f64;
    if let Some(p) = s.initial_prediction {
        st.initial_abs_err += (p - len).abs();
        st.initial_count += 1;
    }
    for &(g, p) in &s.predictions {
        st.refined_abs_err += (p - (len - f64::from(g))).abs();
        st.refined_count += 1;
    }
}
