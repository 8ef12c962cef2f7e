//! A request as callers see it: what they submit ([`GenRequest`]), what its channel yields
//! ([`Event`]), how it ended ([`Summary`]) and the handle they hold on it ([`RequestHandle`]).

use serde::Serialize;
use tokio::sync::mpsc;
use trail_llm::Sampling;

use crate::error::EngineError;
use crate::sequence::{FinishReason, SeqId, SeqState, Sequence, Timestamps};
use crate::stop::StopStrings;

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
    /// End when the decoded text holds one of these (OpenAI's `stop`; the front end cuts the
    /// text before it). Ignored under an evaluation stop, which fixes the length.
    pub stop: StopStrings,
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
            stop: StopStrings::default(),
            initial_prediction: None,
            eval_stop: None,
            arrival: None,
        }
    }

    /// Whether stop tokens are generated past: asked for, or implied by an evaluation stop
    /// (which ends the request at its profiled length, stop tokens or not).
    pub fn ignores_eos(&self) -> bool {
        self.ignore_eos || self.eval_stop.is_some()
    }

    /// The evaluation stop, checked against the cap: zero tokens or beyond `max_new_tokens` is
    /// an error.
    pub fn check_eval_stop(&self) -> Result<(), EngineError> {
        match self.eval_stop {
            Some(n) if n == 0 || n > self.max_new_tokens => Err(EngineError::EvalStop {
                eval_stop: n,
                max_new: self.max_new_tokens,
            }),
            _ => Ok(()),
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

impl Summary {
    /// The summary of an ended request, with the estimates made for it.
    pub(crate) fn of(seq: Sequence, predictions: Vec<(u32, f64)>) -> Self {
        let finish = match seq.state {
            SeqState::Finished(r) => r,
            _ => FinishReason::Aborted,
        };
        Self {
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
}

fn ser_reason<S: serde::Serializer>(r: &FinishReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_stop_lies_between_one_token_and_the_cap_and_ignores_stop_tokens() {
        let mut r = GenRequest::greedy(vec![1, 2], 8);
        assert!(r.check_eval_stop().is_ok() && !r.ignores_eos());
        for (stop, ok) in [(0, false), (1, true), (8, true), (9, false)] {
            r.eval_stop = Some(stop);
            assert_eq!(r.check_eval_stop().is_ok(), ok, "eval_stop {stop}");
            assert!(r.ignores_eos());
        }
        let err = GenRequest {
            eval_stop: Some(9),
            ..GenRequest::greedy(vec![1], 8)
        }
        .check_eval_stop()
        .unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::EvalStop {
                    eval_stop: 9,
                    max_new: 8
                }
            ),
            "{err}"
        );
    }
}
