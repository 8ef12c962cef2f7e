//! `trail serve`: the continuous-batching engine with a pluggable scheduler and the TRAIL
//! predictor in the loop, behind an OpenAI-compatible HTTP API. Binds 127.0.0.1 by default;
//! SIGTERM or Ctrl-C stops admitting, finishes open responses and writes the step log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use trail_checkpoints::Checkpoint;
use trail_serving_shim::{BertPredictor, Engine, EngineConfig, PolicyKind, http};

use crate::manifest::write_atomic;
use crate::stages::engine_args::EngineArgs;
use crate::stages::model_args::ModelArgs;

/// Arguments of `trail serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// `fcfs`, `sjf-bert`, `sprpt`, `trail` or `oracle`.
    #[arg(long, default_value = "fcfs")]
    pub policy: PolicyKind,
    /// The exported predictor (`trail export`); needed by `trail` and `sprpt`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The fine-tuned BERT (`bert.safetensors` of `trail export --bert`): predicts each
    /// request's length from its prompt on arrival (batched, off the engine thread);
    /// `sjf-bert`, `sprpt` and `trail` order waiting requests by it.
    #[arg(long)]
    pub bert_checkpoint: Option<PathBuf>,
    /// TRAIL's limit: preemptible only while generated ≤ c × the initial prediction.
    #[arg(long, default_value_t = 0.8)]
    pub c: f64,
    /// Refresh the refined prediction every N tokens (default: the checkpoint's interval).
    #[arg(long)]
    pub refine_every: Option<u32>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Waiting requests beyond this get 429 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Lower a waiting request's rank by this much per second waited (anti-starvation).
    #[arg(long, default_value_t = 0.0)]
    pub aging: f64,
    /// `max_tokens` when a request gives none.
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: usize,
    /// Accept `eval_output_tokens` in requests: an evaluation-only stop at a profiled output
    /// length, read by the engine's stop rule and the `oracle` policy and by nothing else
    /// (`trail eval latency --backend http` starts its server with it). Without this flag such
    /// a request is refused with 400; `max_tokens` is always the client's cap.
    #[arg(long)]
    pub allow_eval_output_tokens: bool,
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
        .checkpoint
        .as_ref()
        .map(|p| Checkpoint::load(p).with_context(|| format!("loading {}", p.display())))
        .transpose()?;
    let bert = args
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
    let mut cfg = EngineConfig::new(args.engine.kv_budget_tokens, args.policy);
    cfg.c = args.c;
    cfg.refine_every = args.refine_every;
    cfg.scheduler = args.engine.scheduler();
    cfg.scheduler.max_waiting = args.max_waiting;
    cfg.scheduler.aging = args.aging;
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
    rt.block_on(async {
        let listener = http::bind(args.addr)
            .await
            .with_context(|| format!("binding {}", args.addr))?;
        eprintln!(
            "serving {name} on http://{} (policy {}, {}, kernel {})",
            args.addr,
            args.policy,
            args.engine.describe(),
            runner.kernel_id()
        );
        let router = http::router_with_options(
            engine.clone(),
            &name,
            args.default_max_tokens,
            bert.clone(),
            args.allow_eval_output_tokens,
        );
        http::serve(router, listener, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Connection tasks may still hold the router (and its engine handle) for a moment after
    // the graceful shutdown returns: shutting the runtime down drops them.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    let engine = Arc::try_unwrap(engine)
        .map_err(|_| anyhow::anyhow!("the engine is still in use after the server stopped"))?;
    let report = engine.shutdown()?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        trail_serving_shim::steps::write(&dir.join("steps.parquet"), &report.steps)?;
        write_atomic(
            &dir.join("metrics.prom"),
            report.stats.render_prometheus().as_bytes(),
        )?;
    }
    Ok(())
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
