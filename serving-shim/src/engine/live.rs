//! [`LiveRequest`]: what the engine holds for a live request beyond the scheduler's
//! [`Sequence`]: its prompt, its channel, its executor, its stop strings with the text they are
//! looked for in, and the Bayesian filter's state with the estimates it made. Applying a row's product (a token and the predictor's outputs) and
//! ending the request happen here.

use std::collections::HashMap;

use tokio::sync::mpsc;
use trail_checkpoints::schedule::{self, Need, RowOutputs};
use trail_checkpoints::{Filter, RefineState};
use trail_llm::Runner;

use super::executor::{Executor, Executors, Produced};
use super::row::RowSpec;
use super::stats::score;
use crate::metrics::EngineStats;
use crate::recording::PredictorEvent;
use crate::request::{Event, GenRequest, Summary};
use crate::scheduler::StepResult;
use crate::sequence::{SeqId, Sequence};
use crate::stop::StopStrings;

/// A live request's state that the scheduler does not hold.
pub(super) struct LiveRequest {
    /// Prompt tokens (prefill rows read them).
    pub(super) prompt: Vec<u32>,
    /// Stop tokens do not end it.
    ignore_eos: bool,
    /// Its stop strings and the tokens generated so far, when it has stop strings.
    stop_text: Option<StopText>,
    tx: mpsc::UnboundedSender<Event>,
    /// The filter's state, from the request's first produced row on.
    refine: Option<RefineState>,
    /// `(g, estimate at row g)`, one per produced row (see [`Summary::predictions`]).
    predictions: Vec<(u32, f64)>,
    /// Who runs its rows.
    pub(super) executor: Executor,
}

impl LiveRequest {
    /// The state of `req`, run by `executor`, and the receiving end of its channel.
    pub(super) fn new(
        req: GenRequest,
        executor: Executor,
    ) -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop_text = (!req.stop.is_empty() && req.eval_stop.is_none()).then(|| StopText {
            strings: req.stop.clone(),
            tokens: Vec::new(),
        });
        let live = Self {
            ignore_eos: req.ignores_eos(),
            stop_text,
            prompt: req.prompt,
            tx,
            refine: None,
            predictions: Vec::new(),
            executor,
        };
        (live, rx)
    }

    /// What the predictor's `filter` (if any) needs from the request's row `g`.
    pub(super) fn need(&self, filter: Option<&Filter>, g: u32) -> Need {
        filter.map_or(Need::Nothing, |f| {
            schedule::need(self.refine.as_ref(), f, g)
        })
    }

    /// The caller dropped its handle.
    pub(super) fn is_disconnected(&self) -> bool {
        self.tx.is_closed()
    }

    /// The scheduler's result of `row`, which produced `p`: the token, whether it stops the
    /// request (a stop token of `runner`'s, or a stop string completed in the text), and with
    /// a predictor (its `filter`) the remaining estimate after applying the row's outputs.
    pub(super) fn result(
        &mut self,
        row: &RowSpec,
        p: Produced,
        filter: Option<&Filter>,
        runner: &Runner,
    ) -> StepResult {
        let stop_token = !self.ignore_eos && runner.is_stop(p.token);
        let stop_string = self
            .stop_text
            .as_mut()
            .is_some_and(|s| s.push(p.token, runner));
        let stop = stop_token || stop_string;
        let prediction = filter.map(|f| self.refine(f, row, p.prompt, p.probe));
        StepResult {
            id: row.id,
            token: Some(p.token),
            stop,
            prediction,
        }
    }

    /// Applies row `row.g` to the filter on the served schedule ([`schedule`]) with the outputs
    /// it asked for, records the estimate at `g` (and the outputs, for a request being
    /// recorded), then counts the token the row produced and returns the remaining estimate.
    fn refine(
        &mut self,
        filter: &Filter,
        row: &RowSpec,
        prompt: Option<Vec<f32>>,
        probe: Option<Vec<f32>>,
    ) -> f64 {
        let outputs = RowOutputs {
            prompt: prompt.as_deref(),
            probe: probe.as_deref(),
        };
        let estimate = schedule::apply(&mut self.refine, filter, row.g, row.cap, outputs);
        self.predictions.push((row.g, estimate));
        if let (Some(recorder), Some(probs)) = (self.executor.recorder_mut(), probe) {
            recorder.push(PredictorEvent {
                generated: row.g as usize,
                probs,
                prompt,
            });
        }
        let st = self.refine.as_mut().expect("applied");
        st.advance(1);
        st.remaining(filter)
    }

    /// Sends a token on the request's channel (a closed channel is noticed by the loop's next
    /// iteration).
    pub(super) fn send_token(&self, token: u32) {
        let _ = self.tx.send(Event::Token(token));
    }

    /// The request ended outside a step (aborted): its summary goes on its channel.
    pub(super) fn end(self, seq: Sequence) {
        let _ = self
            .tx
            .send(Event::Done(Box::new(Summary::of(seq, self.predictions))));
    }

    /// The request finished in a step: a recorded one keeps its recording (with predictor
    /// outputs when `with_predictor`), its summary counts in `st` and goes on its channel.
    pub(super) fn finish(self, seq: Sequence, with_predictor: bool, st: &mut EngineStats) {
        self.executor.finish(&seq.generated, with_predictor);
        let sum = Summary::of(seq, self.predictions);
        score(st, &sum);
        let _ = self.tx.send(Event::Done(Box::new(sum)));
    }
}

/// A request's stop strings and its generated tokens, whose decoded text they are looked for in.
struct StopText {
    strings: StopStrings,
    tokens: Vec<u32>,
}

impl StopText {
    /// Adds a generated token; whether the text now holds a stop string. The whole text is
    /// decoded (a token's text depends on its neighbours), as the front end decodes it.
    fn push(&mut self, token: u32, runner: &Runner) -> bool {
        self.tokens.push(token);
        runner
            .decode(&self.tokens)
            .is_ok_and(|text| self.strings.find(&text).is_some())
    }
}

impl Executors for HashMap<SeqId, LiveRequest> {
    fn executor(&self, id: SeqId) -> &Executor {
        &self[&id].executor
    }

    fn executor_mut(&mut self, id: SeqId) -> &mut Executor {
        &mut self
            .get_mut(&id)
            .expect("planned requests are live")
            .executor
    }
}
