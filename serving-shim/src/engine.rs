//! [`Engine`]: the serving loop on its own thread. It owns the model's KV caches and the
//! [`Scheduler`](crate::scheduler::Scheduler); each iteration drains commands (add, abort,
//! shutdown), plans a step, builds its rows, runs them on their executors (the model: one
//! batched forward over prefill chunks and decodes, capturing only the predictor's layers,
//! sampling and the predictor's probes; or a recording replayed), applies what they produced
//! (tokens, the Bayesian filter), reports tokens to per-request channels and records a
//! [`StepRecord`].
//!
//! Callers talk to it through [`Engine::submit`] (async) or [`Engine::submit_blocking`], which
//! answer admission errors (overload, too long) at once and otherwise return a
//! [`RequestHandle`] whose channel yields [`Event::Token`]s and one [`Event::Done`]. Dropping
//! the handle cancels the request and frees its blocks.
//!
//! Inside (private modules):
//! - `worker`: the engine thread's state, its loop, admission, arrivals and aborts.
//! - `step`: one step: plan → rows → executors → results → clock, statistics, step log.
//! - `row`: a step's rows, built from the scheduler's plan.
//! - `executor`: who runs a request's rows: the model, or its recording.
//! - `live`: a live request's state that the scheduler does not hold.
//! - `stats`: the engine's statistics from its requests and its scheduler.

mod executor;
mod live;
mod row;
mod stats;
mod step;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use trail_checkpoints::Checkpoint;
use trail_llm::Runner;

use crate::clock::VirtualTime;
use crate::error::EngineError;
use crate::metrics::EngineStats;
use crate::policy::PolicyKind;
use crate::predictor::Predictor;
use crate::recording::Recordings;
use crate::scheduler::SchedulerConfig;
use crate::sequence::SeqId;
use crate::steps::StepRecord;
use worker::{Add, AddReply, Command, Worker, WorkerExit};

pub use crate::request::{Event, GenRequest, RequestHandle, Summary};

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

    /// Settings that cannot run together are an [`EngineError::Config`].
    fn check(&self) -> Result<(), EngineError> {
        if self.recordings.is_some() && self.virtual_time.is_none() {
            return Err(EngineError::Config(
                "replaying recorded requests needs virtual time: on the wall clock, steps that \
                 run no model would be timed"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What [`Engine::shutdown`] returns.
#[derive(Debug, Clone)]
pub struct EngineReport {
    /// Every step.
    pub steps: Vec<StepRecord>,
    /// Final statistics.
    pub stats: EngineStats,
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

/// The predictor of `ck` over `runner`'s model: one made for another hidden size or reading a
/// layer the model lacks is an error; one made with other kernels is a warning (pushed to
/// `warnings`).
fn load_predictor(
    runner: &Runner,
    ck: Checkpoint,
    refine_every: Option<u32>,
    warnings: &mut Vec<String>,
) -> Result<Predictor, EngineError> {
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
    Ok(Predictor::new(ck, refine_every))
}

impl Engine {
    /// Starts the engine thread over `runner`, with the TRAIL predictor of `checkpoint` when
    /// given. A checkpoint made with other kernels than the runner's is a warning (kept in
    /// [`warnings`](Self::warnings)); one made for another hidden size is an error, and so are
    /// settings that cannot run together ([`EngineError::Config`]).
    pub fn start(
        runner: Arc<Runner>,
        checkpoint: Option<Checkpoint>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let mut warnings = Vec::new();
        let predictor = checkpoint
            .map(|ck| load_predictor(&runner, ck, cfg.refine_every, &mut warnings))
            .transpose()?;
        cfg.check()?;
        let (tx, rx) = std_mpsc::channel();
        let worker = Worker::new(runner.clone(), predictor, &cfg, rx)?;
        let stats = worker.stats();
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
