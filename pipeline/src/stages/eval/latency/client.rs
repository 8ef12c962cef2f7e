//! The client's side of `trail eval latency` over HTTP: `--base-url` to drive a server that is
//! already running (any OpenAI-compatible one) with the same seeded traces instead of starting
//! `trail serve`, the [`Protocol`] its profiled lengths go by, and `--goodput`'s SLOs.

use serde::Serialize;

use super::backend::HttpBackend;
use super::backend::http::Protocol;
use super::benchmark::GoodputSlo;
use super::server::BackendKind;

/// The flags of the client.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Client (HTTP)")]
pub struct ClientArgs {
    /// Drive the OpenAI-compatible server at this URL (e.g. `http://127.0.0.1:8080`, a
    /// `trail serve`, llama.cpp's `llama-server`, vLLM) instead of starting `trail serve` per
    /// cell; needs `--backend http` and one policy in `--policies`, the label of its cells (the
    /// server schedules as it was started). The saturation burst goes to it too.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// With `--base-url`: sent as a bearer token (never recorded).
    #[arg(long, value_name = "KEY", requires = "base_url")]
    pub api_key: Option<String>,
    /// With `--base-url`: the model name the requests give.
    #[arg(
        long,
        value_name = "NAME",
        requires = "base_url",
        default_value = "trail"
    )]
    pub served_model_name: String,
    /// How profiled output lengths reach the server: `eval-output-tokens` (a `trail serve`:
    /// the evaluation-only field, never seen by a predictor) or `max-tokens` (a server without
    /// a length predictor: `max_tokens` = the profiled length with `ignore_eos`, each response's
    /// `completion_tokens` checked equal to it). Default: `eval-output-tokens` for the `trail
    /// serve` this command starts; with `--base-url`, inferred from `/v1/models` (a model
    /// `owned_by` trail means a `trail serve`).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Goodput SLOs in milliseconds, as `benchmark_serving.py --goodput` takes them:
    /// `ttft:MS,tpot:MS,e2el:MS` (any subset).
    #[arg(long, value_name = "ttft:MS,tpot:MS,e2el:MS")]
    pub goodput: Option<GoodputSlo>,
}

/// A server driven over `--base-url`.
#[derive(Debug, Clone)]
pub struct Remote {
    pub backend: HttpBackend,
}

/// What `settings.json` records of the client: absent (as before it existed) unless the
/// backend is HTTP.
#[derive(Debug, Clone, Serialize)]
pub struct ClientRecord {
    /// `--base-url`, where given; else the `trail serve` this command starts.
    pub base_url: Option<String>,
    pub protocol: Protocol,
}

impl ClientArgs {
    /// Checks the flags against the backend and the policies.
    pub fn check(&self, backend: BackendKind, policies: &str) -> anyhow::Result<()> {
        if self.base_url.is_none() {
            anyhow::ensure!(
                matches!(self.protocol, None | Some(Protocol::EvalOutputTokens)),
                "--protocol max-tokens would send the profiled length as the cap of the `trail \
                 serve` this command starts, where its predictor reads it; it is for a server \
                 without one (--base-url)"
            );
            return Ok(());
        }
        anyhow::ensure!(
            backend == BackendKind::Http,
            "--base-url drives a server over HTTP: add --backend http"
        );
        anyhow::ensure!(
            !policies.contains(',') && policies.trim() != "all",
            "--base-url: give the one policy the server runs as --policies (the label of its \
             cells); the server schedules as it was started"
        );
        Ok(())
    }

    /// The server of `--base-url` with its protocol (given, or inferred from it), capped at
    /// `max_tokens`.
    pub fn remote(
        &self,
        rt: &tokio::runtime::Runtime,
        max_tokens: u32,
    ) -> anyhow::Result<Option<Remote>> {
        let Some(url) = &self.base_url else {
            return Ok(None);
        };
        let backend = HttpBackend::new(url.as_str(), self.served_model_name.as_str(), max_tokens)
            .with_api_key(self.api_key.clone());
        let inferred = rt.block_on(Protocol::infer(&backend));
        let protocol = match (self.protocol, inferred) {
            (Some(Protocol::MaxTokens), Ok(Protocol::EvalOutputTokens)) => anyhow::bail!(
                "{url} is a `trail serve`: --protocol max-tokens would send the profiled length \
                 as the cap its predictor reads; use eval-output-tokens"
            ),
            (Some(p), _) => p,
            (None, Ok(p)) => p,
            (None, Err(e)) => anyhow::bail!("inferring --protocol from {url}: {e}"),
        };
        eprintln!("{url}: protocol {protocol:?}: {}", protocol.describe());
        Ok(Some(Remote {
            backend: backend.with_protocol(protocol),
        }))
    }

    /// The record of the client for `settings.json`, when the backend is HTTP.
    pub fn record(&self, backend: BackendKind, remote: Option<&Remote>) -> Option<ClientRecord> {
        (backend == BackendKind::Http).then(|| ClientRecord {
            base_url: self.base_url.clone(),
            protocol: remote.map_or(Protocol::EvalOutputTokens, |r| r.backend.protocol),
        })
    }
}
