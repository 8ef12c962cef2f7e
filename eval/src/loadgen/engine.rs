//! The in-process backend: each request goes straight to a serving-shim [`Engine`] in this
//! process (no HTTP, no detokenization), with the same request semantics as `trail serve`'s
//! chat endpoint: the prompt as one user message through the model's chat template, greedy,
//! and with a fixed output length `ignore_eos` and the true length given to the oracle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use trail_serving_shim::{Engine, Event, FinishReason, GenRequest};

use super::{Backend, Observed, TraceRequest};

/// Requests into an [`Engine`] of this process.
#[derive(Debug, Clone)]
pub struct EngineBackend {
    engine: Arc<Engine>,
    /// Cap on output tokens when the trace fixes none.
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

    fn request(&self, req: &TraceRequest) -> Result<GenRequest, String> {
        let prompt = self
            .engine
            .runner()
            .encode_chat(&req.prompt)
            .map_err(|e| format!("encoding the prompt: {e}"))?;
        let fixed = req.output_tokens;
        let max_new = fixed.unwrap_or(self.max_tokens).max(1) as usize;
        let mut g = GenRequest::greedy(prompt, max_new);
        g.ignore_eos = fixed.is_some();
        g.true_len = fixed.map(|_| max_new);
        g.initial_prediction = self.priors.get(&req.prompt).copied();
        Ok(g)
    }
}

impl Backend for EngineBackend {
    async fn send(&self, req: &TraceRequest) -> Result<Observed, String> {
        let start = Instant::now();
        let g = self.request(req)?;
        let mut handle = self.engine.submit(g).await.map_err(|e| e.to_string())?;
        let mut obs = Observed::default();
        while let Some(ev) = handle.events.recv().await {
            match ev {
                Event::Token(_) => {
                    let at = start.elapsed();
                    obs.first_token.get_or_insert(at);
                    obs.last_token = Some(at);
                    obs.output_tokens += 1;
                }
                Event::Done(s) => {
                    if s.finish == FinishReason::Aborted {
                        return Err(format!(
                            "request {} was aborted after {} tokens",
                            s.id,
                            s.tokens.len()
                        ));
                    }
                    obs.output_tokens = s.tokens.len() as u32;
                    obs.queue_s = s.times.first_scheduled.map(|f| f - s.times.arrival);
                    obs.preemptions = Some(s.preemptions_policy + s.preemptions_memory);
                    return Ok(obs);
                }
            }
        }
        Err("the engine closed the request's channel without an end".into())
    }
}
