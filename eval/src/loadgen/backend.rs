//! Where requests go: the [`Backend`] trait, and a fixed-delay backend for tests. The backends
//! over a real server (HTTP, the in-process engine) live with `trail eval latency`, which drives
//! them, so this crate needs neither an HTTP client nor the model.

use std::future::Future;
use std::time::Duration;

use super::{Observed, TraceRequest};

/// Sends one request and reports its timings. Errors are strings: they are recorded per
/// request, never abort a run.
pub trait Backend: Send + Sync {
    fn send(&self, req: &TraceRequest) -> impl Future<Output = Result<Observed, String>> + Send;
}

/// A backend that answers every request after fixed delays: for testing executors and the
/// accounting without a model.
#[derive(Debug, Clone)]
pub struct FixedDelayBackend {
    pub first_token: Duration,
    pub per_token: Duration,
}

impl Backend for FixedDelayBackend {
    async fn send(&self, req: &TraceRequest) -> Result<Observed, String> {
        let n = req.output_tokens.unwrap_or(1).max(1);
        let start = tokio::time::Instant::now();
        let mut obs = Observed::default();
        tokio::time::sleep(self.first_token).await;
        obs.chunk(start.elapsed(), 1);
        for _ in 1..n {
            tokio::time::sleep(self.per_token).await;
            obs.chunk(start.elapsed(), 1);
        }
        Ok(obs)
    }
}
