//! The in-process backend: each request goes straight to a serving-shim [`Engine`] in this
//! process (no HTTP, no detokenization), with the same request semantics as `trail serve`'s
//! chat endpoint: the prompt as one user message through the model's chat template, greedy,
//! capped at the trace's `max_tokens`, and a profiled output length given as the engine's
//! evaluation-only stop ([`GenRequest::eval_stop`]), which only the stop rule and the oracle read.
//!
//! On an engine running on virtual time ([`trail_serving_shim::VirtualTime`]),
//! [`EngineBackend::replay_virtual`] hands it the whole trace at once with each arrival, and reads
//! every time off the engine's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trail_eval::loadgen::{Backend, Observed, RequestResult, TraceRequest};
use trail_serving_shim::{Engine, Event, FinishReason, GenRequest, Summary};

/// Requests into an [`Engine`] of this process.
#[derive(Debug, Clone)]
pub struct EngineBackend {
    engine: Arc<Engine>,
    /// Cap on output tokens when the trace gives none.
    pub max_tokens: u32,
    /// Initial total-length predictions by prompt, made before admission (SJF on BERT's
    /// prediction); requests without one rank last, as the policy documents.
    priors: Arc<HashMap<String, f64>>,
}

impl EngineBackend {
    pub fn new(engine: Arc<Engine>, max_tokens: u32) -> Self {
        Self {
            engine,
            max_tokens,
            priors: Arc::new(HashMap::new()),
        }
    }

    /// Attaches initial total-length predictions, keyed by prompt.
    pub fn with_priors(mut self, priors: HashMap<String, f64>) -> Self {
        self.priors = Arc::new(priors);
        self
    }

    /// The engine back (to shut it down once every request has ended).
    pub fn into_engine(self) -> Arc<Engine> {
        self.engine
    }

    /// The engine request of a trace request: the chat-templated prompt, greedy, the trace's
    /// cap as `max_new_tokens`, its profiled length as the evaluation-only stop.
    pub fn gen_request(&self, req: &TraceRequest) -> Result<GenRequest, String> {
        let prompt = self
            .engine
            .runner()
            .encode_chat(&req.prompt)
            .map_err(|e| format!("encoding the prompt: {e}"))?;
        let cap = req.max_tokens.unwrap_or(self.max_tokens).max(1) as usize;
        let mut g = GenRequest::greedy(prompt, cap);
        g.ignore_eos = req.output_tokens.is_some();
        g.eval_stop = req.output_tokens.map(|n| n as usize);
        g.initial_prediction = self.priors.get(&req.prompt).copied();
        Ok(g)
    }

    /// Replays `trace` on an engine started with virtual time: every request is submitted at
    /// once with its `arrival_s`, the engine admits each when its clock reaches it, and TTFT,
    /// latency and TPOT are read off that clock. `on_done` is called per request, in trace
    /// order. Results come back in trace order, one per request.
    pub fn replay_virtual(
        &self,
        trace: &[TraceRequest],
        mut on_done: impl FnMut(&RequestResult),
    ) -> Vec<RequestResult> {
        let built: Vec<Result<GenRequest, String>> = trace
            .iter()
            .map(|r| {
                self.gen_request(r).map(|mut g| {
                    g.arrival = Some(r.arrival_s.max(0.0));
                    g
                })
            })
            .collect();
        let ok: Vec<GenRequest> = built.iter().filter_map(|b| b.clone().ok()).collect();
        let sent = ok.len();
        let handles: Vec<Result<_, String>> = match self.engine.submit_all_blocking(ok) {
            Ok(h) => h
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
            Err(e) => (0..sent).map(|_| Err(e.to_string())).collect(),
        };
        let mut handles = handles.into_iter();
        trace
            .iter()
            .zip(built)
            .enumerate()
            .map(|(index, (req, b))| {
                let obs = b.and_then(|_| {
                    let handle = handles
                        .next()
                        .ok_or("the engine answered fewer requests than were sent")??;
                    let s = handle.wait().map_err(|e| e.to_string())?;
                    virtual_observed(&s)
                });
                let done_s = obs
                    .as_ref()
                    .ok()
                    .and_then(Observed::last_token)
                    .map_or(req.arrival_s, |d| req.arrival_s + d.as_secs_f64());
                let r = RequestResult::from_observed(index, req, req.arrival_s, done_s, obs);
                on_done(&r);
                r
            })
            .collect()
    }
}

/// What the engine reported at a request's end: tokens, queue time, preemptions; an aborted
/// request is an error.
fn ended(obs: &mut Observed, s: &Summary) -> Result<(), String> {
    if s.finish == FinishReason::Aborted {
        return Err(format!(
            "request {} was aborted after {} tokens",
            s.id,
            s.tokens.len()
        ));
    }
    obs.output_tokens = s.tokens.len() as u32;
    obs.prompt_tokens = Some(s.prompt_tokens as u32);
    obs.queue_s = s.times.first_scheduled.map(|f| f - s.times.arrival);
    obs.preemptions = Some(s.preemptions_policy + s.preemptions_memory);
    Ok(())
}

/// [`Observed`] from a virtual-time engine's timestamps (offsets from the arrival): every
/// token's time, so inter-token latencies are the virtual clock's.
fn virtual_observed(s: &Summary) -> Result<Observed, String> {
    let since = |t: f64| Duration::from_secs_f64((t - s.times.arrival).max(0.0));
    let mut obs = Observed {
        chunks: s.times.tokens.iter().map(|&t| since(t)).collect(),
        ..Observed::default()
    };
    ended(&mut obs, s)?;
    Ok(obs)
}

impl Backend for EngineBackend {
    async fn send(&self, req: &TraceRequest) -> Result<Observed, String> {
        let start = Instant::now();
        let g = self.gen_request(req)?;
        let mut handle = self.engine.submit(g).await.map_err(|e| e.to_string())?;
        let mut obs = Observed::default();
        while let Some(ev) = handle.events.recv().await {
            match ev {
                Event::Token(_) => obs.chunk(start.elapsed(), 1),
                Event::Done(s) => {
                    ended(&mut obs, &s)?;
                    return Ok(obs);
                }
            }
        }
        Err("the engine closed the request's channel without an end".into())
    }
}
