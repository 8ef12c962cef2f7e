//! [`Worker`]: the engine thread. Its loop drains commands (add, abort, shutdown), releases
//! requests whose virtual arrival the clock reached, cancels requests whose caller went away,
//! and runs a [step](super::step) while anything is live; a failed step aborts the requests it
//! planned and the loop goes on.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use trail_llm::Runner;

use super::EngineConfig;
use super::executor::Executor;
use super::live::LiveRequest;
use super::stats::set_gauges;
use crate::clock::{Clock, ManualClock, SystemClock, VirtualTime};
use crate::error::EngineError;
use crate::metrics::EngineStats;
use crate::predictor::Predictor;
use crate::recording::Recordings;
use crate::request::{Event, GenRequest};
use crate::scheduler::Scheduler;
use crate::sequence::{FinishReason, SeqId, SeqState, Sequence};
use crate::steps::StepRecord;

/// A request on its way to the engine thread.
pub(super) struct Add {
    pub(super) id: SeqId,
    pub(super) req: GenRequest,
    pub(super) reply: oneshot::Sender<AddReply>,
}

/// What the engine thread is told.
pub(super) enum Command {
    /// Requests admitted in the same iteration.
    Add(Vec<Add>),
    Abort(SeqId),
    Shutdown,
}

/// The answer to an [`Add`]: the request's event channel, or why it was refused.
pub(super) type AddReply = Result<mpsc::UnboundedReceiver<Event>, EngineError>;

/// What the engine thread ends with: its steps, and the error it died of, if any.
pub(super) type WorkerExit = (Vec<StepRecord>, Option<EngineError>);

/// The engine thread's state.
pub(super) struct Worker {
    pub(super) runner: Arc<Runner>,
    pub(super) sched: Scheduler,
    pub(super) predictor: Option<Predictor>,
    pub(super) clock: Arc<dyn Clock>,
    rx: std_mpsc::Receiver<Command>,
    /// Every live request's state beyond the scheduler's.
    pub(super) live: HashMap<SeqId, LiveRequest>,
    pub(super) stats: Arc<Mutex<EngineStats>>,
    pub(super) steps: Vec<StepRecord>,
    draining: bool,
    /// The clock to move and the step cost, on virtual time.
    pub(super) virtual_time: Option<(Arc<ManualClock>, VirtualTime)>,
    /// Requests added before their virtual arrival, latest first (popped from the end).
    pending: Vec<Sequence>,
    /// Recorded requests to replay, and where to record the others.
    recordings: Option<Arc<Recordings>>,
}

impl Worker {
    /// A worker for `cfg` (already checked) reading commands from `rx`: on virtual time, a
    /// manual clock at 0; otherwise the wall clock.
    pub(super) fn new(
        runner: Arc<Runner>,
        predictor: Option<Predictor>,
        cfg: &EngineConfig,
        rx: std_mpsc::Receiver<Command>,
    ) -> Result<Self, EngineError> {
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
        Ok(Self {
            runner,
            sched,
            predictor,
            clock,
            rx,
            live: HashMap::new(),
            stats,
            steps: Vec::new(),
            draining: false,
            virtual_time,
            pending: Vec::new(),
            recordings: cfg.recordings.clone(),
        })
    }

    /// The statistics the worker keeps up to date.
    pub(super) fn stats(&self) -> Arc<Mutex<EngineStats>> {
        self.stats.clone()
    }

    /// [`run`](Self::run), catching a panic: either way the steps so far come back.
    pub(super) fn run_to_exit(mut self) -> WorkerExit {
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

    /// Admits `req` as request `id`: checked against the model's context and its cap, handed
    /// to the scheduler (or kept pending its virtual arrival), and given its executor.
    fn add(&mut self, id: SeqId, req: GenRequest) -> AddReply {
        if self.draining {
            return Err(EngineError::ShuttingDown);
        }
        self.check_context(&req)?;
        let now = self.clock.now();
        let arrival = match (&self.virtual_time, req.arrival) {
            (Some(_), Some(t)) if t.is_finite() => t.max(now),
            _ => now,
        };
        req.check_eval_stop()?;
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
        let executor = Executor::for_request(
            &req,
            &self.runner,
            self.recordings.as_ref(),
            self.predictor.is_some(),
        );
        let (live, rx) = LiveRequest::new(req, executor);
        self.live.insert(id, live);
        Ok(rx)
    }

    /// Prompt plus cap within the model's context.
    fn check_context(&self, req: &GenRequest) -> Result<(), EngineError> {
        let context = self.runner.config().max_position_embeddings;
        let fits = req
            .prompt
            .len()
            .checked_add(req.max_new_tokens)
            .is_some_and(|total| total <= context);
        if fits {
            return Ok(());
        }
        Err(EngineError::ContextExceeded {
            prompt: req.prompt.len(),
            max_new: req.max_new_tokens,
            context,
        })
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

    /// Sends an ended request's summary on its channel and drops its state.
    fn send_done(&mut self, seq: Sequence) {
        if let Some(live) = self.live.remove(&seq.id) {
            live.end(seq);
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
            .live
            .iter()
            .filter(|(_, l)| l.is_disconnected())
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
            ids = self.live.keys().copied().collect();
        }
        for id in ids {
            tracing::warn!("request {id} aborted: {e}");
            self.abort(id);
        }
    }
}
