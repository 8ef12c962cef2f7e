//! [`Sequence`]: one request as the scheduler sees it — lengths, generated tokens, predictions,
//! status, counters and timestamps (vLLM's `Sequence` with `SequenceStatus` and `RequestMetrics`).
//!
//! Token positions: the context of a sequence is its prompt followed by the tokens generated so
//! far, `total_len() = prompt_len + generated.len()`. `computed` of those have their KV in the
//! cache. A step processes context tokens `[computed, computed + n)`; when it reaches the end of
//! the context the model samples the next token. A decode is the case `n = 1`. Preemption by
//! recompute drops the KV (`computed = 0`) and keeps the generated tokens, so on re-admission the
//! engine prefills the prompt and the generated tokens again.

/// Identifier of a request, chosen by the caller (unique among live sequences).
pub type SeqId = u64;

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqState {
    /// In the waiting queue (new or preempted).
    Waiting,
    /// Admitted: holds KV blocks and is scheduled every step.
    Running,
    /// Done; it holds no blocks.
    Finished(FinishReason),
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced a stop token.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The client went away or the request was cancelled.
    Aborted,
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Aborted => "abort",
        }
    }
}

/// Per-request timestamps, in the scheduler clock's seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timestamps {
    /// When the request was added.
    pub arrival: f64,
    /// When it was first admitted to the running set.
    pub first_scheduled: Option<f64>,
    /// When its first generated token was reported.
    pub first_token: Option<f64>,
    /// When each generated token was reported (same length as `generated`).
    pub tokens: Vec<f64>,
    /// When it finished (any reason).
    pub finish: Option<f64>,
}

/// One request.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Caller-chosen id.
    pub id: SeqId,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens generated so far (kept across preemptions).
    pub generated: Vec<u32>,
    /// Generation stops after this many tokens.
    pub max_new_tokens: usize,
    /// Context tokens whose KV is in the cache.
    pub computed: usize,
    /// Status.
    pub state: SeqState,
    /// First prediction of the total output length: from BERT on the prompt before admission, or
    /// the first prediction made at prefill (`generated + remaining` then). The limit `c` of
    /// limited preemption applies to this one.
    pub initial_prediction: Option<f64>,
    /// Latest (refined) prediction of the remaining output length.
    pub predicted_remaining: Option<f64>,
    /// Evaluation only: the profiled output length, at which the request ends (the serving
    /// shim's `GenRequest::eval_stop`). Read by the stop rule
    /// ([`Sequence::stop_len`]) and the oracle ([`Sequence::true_remaining`]), nothing else.
    pub eval_stop: Option<usize>,
    /// Times the policy took this sequence's place for a more urgent one.
    pub preemptions_policy: u32,
    /// Times it was evicted because the KV pool was exhausted.
    pub preemptions_memory: u32,
    /// KV tokens thrown away by preemptions (to be prefilled again).
    pub recomputed_tokens: usize,
    /// Cumulative seconds spent in the waiting queue (finished stints).
    pub waited: f64,
    /// When it last entered the waiting queue.
    pub waiting_since: f64,
    /// Timestamps.
    pub times: Timestamps,
}

impl Sequence {
    /// A new waiting request with `prompt_len` prompt tokens arriving at `arrival`.
    pub fn new(id: SeqId, prompt_len: usize, max_new_tokens: usize, arrival: f64) -> Self {
        Self {
            id,
            prompt_len,
            generated: Vec::new(),
            max_new_tokens,
            computed: 0,
            state: SeqState::Waiting,
            initial_prediction: None,
            predicted_remaining: None,
            eval_stop: None,
            preemptions_policy: 0,
            preemptions_memory: 0,
            recomputed_tokens: 0,
            waited: 0.0,
            waiting_since: arrival,
            times: Timestamps {
                arrival,
                ..Timestamps::default()
            },
        }
    }

    /// With a total-length prediction made before admission (BERT).
    pub fn with_initial_prediction(mut self, total: f64) -> Self {
        self.initial_prediction = Some(total);
        self
    }

    /// With an evaluation stop: the request ends after exactly `len` tokens (see
    /// [`Sequence::eval_stop`]).
    pub fn with_eval_stop(mut self, len: usize) -> Self {
        self.eval_stop = Some(len);
        self
    }

    /// Generation ends after this many tokens: the cap, or the evaluation stop when earlier.
    pub fn stop_len(&self) -> usize {
        self.eval_stop
            .map_or(self.max_new_tokens, |e| e.min(self.max_new_tokens))
    }

    /// Prompt plus generated tokens.
    pub fn total_len(&self) -> usize {
        self.prompt_len + self.generated.len()
    }

    /// Context tokens not yet in the KV cache (what a (re)admission must prefill).
    pub fn uncomputed(&self) -> usize {
        self.total_len() - self.computed
    }

    /// True once the context is in the cache except the newest sampled token: the next step is
    /// a one-token decode. (One prompt token left by a chunked prefill is still a prefill.)
    pub fn is_decoding(&self) -> bool {
        self.uncomputed() == 1 && self.computed >= self.prompt_len
    }

    /// Tokens generated so far.
    pub fn num_generated(&self) -> usize {
        self.generated.len()
    }

    /// True remaining length (the oracle's): `eval_stop − generated`, when evaluating.
    pub fn true_remaining(&self) -> Option<f64> {
        self.eval_stop
            .map(|t| t.saturating_sub(self.generated.len()) as f64)
    }

    /// Best estimate of the remaining length: the refined prediction, else the initial
    /// prediction minus what was generated; `None` without any prediction.
    pub fn estimated_remaining(&self) -> Option<f64> {
        self.predicted_remaining.or_else(|| {
            self.initial_prediction
                .map(|p| (p - self.generated.len() as f64).max(0.0))
        })
    }

    /// Total preemptions of either kind.
    pub fn preemptions(&self) -> u32 {
        self.preemptions_policy + self.preemptions_memory
    }

    /// True once finished.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, SeqState::Finished(_))
    }

    /// Seconds waited so far, counting the current stint when waiting at `now`.
    pub fn waited_at(&self, now: f64) -> f64 {
        match self.state {
            SeqState::Waiting => self.waited + (now - self.waiting_since).max(0.0),
            _ => self.waited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_estimates() {
        let mut s = Sequence::new(7, 10, 100, 0.5).with_initial_prediction(40.0);
        assert_eq!(s.total_len(), 10);
        assert_eq!(s.uncomputed(), 10);
        assert!(!s.is_decoding());
        assert_eq!(s.estimated_remaining(), Some(40.0));
        s.generated.extend([1, 2, 3]);
        s.computed = 12;
        assert!(s.is_decoding());
        assert_eq!(s.estimated_remaining(), Some(37.0));
        s.predicted_remaining = Some(5.0);
        assert_eq!(s.estimated_remaining(), Some(5.0));
        assert_eq!(s.true_remaining(), None);
        let s = s.with_eval_stop(20);
        assert_eq!(s.true_remaining(), Some(17.0));
    }

    #[test]
    fn waiting_time_counts_the_current_stint() {
        let mut s = Sequence::new(1, 4, 4, 1.0);
        assert_eq!(s.waited_at(3.0), 2.0);
        s.state = SeqState::Running;
        s.waited = 2.0;
        assert_eq!(s.waited_at(10.0), 2.0);
    }
}
