//! `trail serve`: the continuous-batching engine with a pluggable scheduler and the TRAIL
//! predictor in the loop, behind an OpenAI-compatible HTTP API, with vLLM's flags where they
//! mean the same (`--host`, `--port`, `--served-model-name`, `--api-key`). Binds 127.0.0.1 by
//! default; SIGTERM or Ctrl-C stops admitting, finishes open responses (cut after
//! `--shutdown-timeout`) and writes the step log. Every limit a client meets is a flag with a
//! bounded default; if the engine thread dies, `/health` answers 503 and the process writes its
//! step log and exits with status 1, for a supervisor to restart it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use trail_checkpoints::Checkpoint;
use trail_serving_shim::http::HttpOptions;
use trail_serving_shim::listener::Limits;
use trail_serving_shim::{
    BertPredictor, Engine, EngineConfig, PolicyKind, http, listener, prometheus,
};

use crate::manifest::write_atomic;
use crate::stages::engine_args::{EngineArgs, PrefillChunk, bounded};
use crate::stages::model_args::ModelArgs;
use crate::stages::predictor_args::{PredictorArgs, RankingArgs};

/// `trail serve`'s prefill chunk when `--prefill-chunk` is not given. From `trail bench
/// runner`'s step table (reports/bench/runner.md): prefill runs at the same speed from 128
/// tokens up (1,009 tok/s at 128, 955 at 1,024, 954 at 4,096), and a 128-token chunk (127 ms)
/// adds less than two batch-32 decode steps (74 ms) to every running stream's inter-token
/// gap, where a whole 6,000-token prompt would hold them for seconds.
pub const SERVE_PREFILL_CHUNK: usize = 128;

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| "expected seconds".to_string())?;
    if !(v > 0.0 && v <= 3600.0) {
        return Err("must be above 0 and at most 3600 seconds".into());
    }
    Ok(Duration::from_secs_f64(v))
}

fn connections(s: &str) -> Result<usize, String> {
    bounded(s, 1, 65_536, "connections")
}

fn waiting(s: &str) -> Result<usize, String> {
    bounded(s, 0, 1 << 20, "requests")
}

fn body_bytes(s: &str) -> Result<usize, String> {
    bounded(s, 1024, 64 << 20, "bytes")
}

/// Arguments of `trail serve`.
#[derive(Debug, clap::Args)]
#[command(mut_arg("prefill_chunk", |a| a.default_value("128")))]
pub struct Args {
    /// Host or address to listen on (vLLM's `--host`; loopback by default: the API is open to
    /// anyone who can reach it unless `--api-key` is set).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The old spelling of `--host` and `--port` together (`HOST:PORT`).
    #[arg(long, hide = true, conflicts_with_all = ["host", "port"])]
    pub addr: Option<SocketAddr>,
    /// Names a request may give as its `model` (vLLM's; the first is answered when a request
    /// names none, and listed first by `/v1/models`). Default: the GGUF's file name without
    /// its extension.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Every `/v1` request must carry `Authorization: Bearer KEY` (401 otherwise), as with
    /// vLLM's `--api-key`; `/health` and `/metrics` stay open.
    #[arg(long, env = "TRAIL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// `fcfs`, `sjf-bert`, `sprpt`, `trail` or `oracle`.
    #[arg(long, default_value = "fcfs")]
    pub policy: PolicyKind,
    #[command(flatten)]
    pub predictor: PredictorArgs,
    #[command(flatten)]
    pub ranking: RankingArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Waiting requests beyond this get 429 with Retry-After (at most 1048576).
    #[arg(long, default_value_t = 1024, value_parser = waiting)]
    pub max_waiting: usize,
    /// Lower a waiting request's rank by this much per second waited (anti-starvation).
    #[arg(long, default_value_t = 0.0)]
    pub aging: f64,
    /// `max_tokens` when a request gives none (at most the model's context, as is any
    /// request's `max_tokens`: beyond it is 400).
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: usize,
    /// Accept `eval_output_tokens` in requests: an evaluation-only stop at a profiled output
    /// length, read by the engine's stop rule and the `oracle` policy and by nothing else
    /// (`trail eval latency --backend http` starts its server with it). Without this flag such
    /// a request is refused with 400; `max_tokens` is always the client's cap.
    #[arg(long)]
    pub allow_eval_output_tokens: bool,
    /// A connection must send a request's headers within this many seconds (idle kept-alive
    /// connections included), or it is closed.
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this many seconds of its headers (408 beyond).
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub body_read_timeout: Duration,
    /// Most bytes in a request body (413 beyond); 1024 to 67108864.
    #[arg(long, default_value_t = 2 << 20, value_parser = body_bytes)]
    pub max_body_bytes: usize,
    /// Most connections open at once (1 to 65536); more wait in the listen backlog.
    #[arg(long, default_value_t = 256, value_parser = connections)]
    pub max_connections: usize,
    /// After SIGTERM or Ctrl-C, open responses may finish for this many seconds; then they are
    /// cut, the step log is written and the process exits.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub shutdown_timeout: Duration,
    /// Origins (`scheme://host[:port]`, comma-separated, `*` for any) whose browser pages may
    /// call the API. Default: none; a request with another `Origin` header is refused (403).
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Write the step log (`steps.parquet`) and final statistics (`metrics.prom`) here on
    /// shutdown.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runner = Arc::new(args.model.load()?);
    let checkpoint = args
        .predictor
        .checkpoint
        .as_ref()
        .map(|p| Checkpoint::load(p).with_context(|| format!("loading {}", p.display())))
        .transpose()?;
    let bert = args
        .ranking
        .bert_checkpoint
        .as_ref()
        .map(|w| {
            BertPredictor::load(w)
                .map(Arc::new)
                .with_context(|| format!("loading the BERT predictor {}", w.display()))
        })
        .transpose()?;
    if bert.is_none() && args.policy == PolicyKind::SjfBert {
        eprintln!("warning: sjf-bert without --bert-checkpoint orders waiting requests FCFS");
    }
    let context = runner.config().max_position_embeddings;
    anyhow::ensure!(
        (1..=context).contains(&args.default_max_tokens),
        "--default-max-tokens {}: must be 1 to the model's context of {context} tokens",
        args.default_max_tokens
    );
    let cfg = engine_config(&args);
    let engine_args = args
        .engine
        .with_default_chunk(PrefillChunk::Tokens(SERVE_PREFILL_CHUNK));
    let name = runner
        .path()
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let engine = Arc::new(Engine::start(runner.clone(), checkpoint, cfg)?);
    for w in engine.warnings() {
        eprintln!("warning: {w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let limits = Limits {
        header_read_timeout: args.header_read_timeout,
        max_connections: args.max_connections,
        shutdown_timeout: args.shutdown_timeout,
    };
    let opts = HttpOptions {
        bert: bert.clone(),
        allowed_origins: args.allowed_origins.clone(),
        max_body_bytes: args.max_body_bytes,
        body_read_timeout: args.body_read_timeout,
        allow_eval_stop: args.allow_eval_output_tokens,
        served_model_names: args.served_model_name.clone(),
        api_key: args.api_key.clone(),
        ..HttpOptions::new(args.default_max_tokens)
    };
    let addr = args.socket_addr()?;
    rt.block_on(async {
        let listener = http::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr().unwrap_or(addr);
        let served = args.served_model_name.first().unwrap_or(&name);
        eprintln!(
            "serving {name} as {served:?} on http://{bound} (policy {}, {}, kernel {})",
            args.policy,
            engine_args.describe(),
            runner.kernel_id()
        );
        let router = http::router_with_options(engine.clone(), &name, opts);
        let stop = stop_signal(engine.clone());
        let stopped = listener::serve(router, listener, limits, stop).await?;
        if stopped.cut > 0 {
            eprintln!(
                "cut {} connections still open {} s after the shutdown signal",
                stopped.cut,
                limits.shutdown_timeout.as_secs_f64()
            );
        }
        anyhow::Ok(())
    })?;
    // Connection tasks may still hold the router (and its engine handle) for a moment after
    // the graceful shutdown returns: shutting the runtime down drops them.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    let engine = Arc::try_unwrap(engine)
        .map_err(|_| anyhow::anyhow!("the engine is still in use after the server stopped"))?;
    let (report, died) = engine.shutdown_report();
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        trail_serving_shim::steps::write(&dir.join("steps.parquet"), &report.steps)?;
        let served = args.served_model_name.first().unwrap_or(&name);
        write_atomic(
            &dir.join("metrics.prom"),
            prometheus::render(&report.stats, served).as_bytes(),
        )?;
    }
    if let Some(e) = died {
        anyhow::bail!("the engine died ({e}); the step log was written");
    }
    Ok(())
}

impl Args {
    /// The address to bind: `--addr`, or `--host` and `--port` (a host name resolved, its
    /// first address taken).
    pub fn socket_addr(&self) -> anyhow::Result<SocketAddr> {
        if let Some(a) = self.addr {
            return Ok(a);
        }
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("--host {}: cannot resolve", self.host))?
            .next()
            .with_context(|| format!("--host {}: no address", self.host))
    }
}

/// The engine settings of `args`, as `trail serve` runs them (chunked prefill by default).
pub fn engine_config(args: &Args) -> EngineConfig {
    let mut cfg = EngineConfig::new(args.engine.kv_budget_tokens, args.policy);
    cfg.c = args.ranking.c;
    cfg.refine_every = args.predictor.refine_every;
    cfg.scheduler = args
        .engine
        .with_default_chunk(PrefillChunk::Tokens(SERVE_PREFILL_CHUNK))
        .scheduler();
    cfg.scheduler.max_waiting = args.max_waiting;
    cfg.scheduler.aging = args.aging;
    cfg
}

/// Resolves on SIGTERM, Ctrl-C, or the engine thread's death (then the server stops too, so
/// the process exits non-zero instead of answering 503 forever).
async fn stop_signal(engine: Arc<Engine>) {
    let died = async {
        while engine.is_alive() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        () = shutdown_signal() => {},
        () = died => eprintln!("the engine stopped: shutting the server down"),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: no new requests; finishing open responses");
}
