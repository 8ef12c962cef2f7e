//! The server of one cell: `trail serve` as a child process on an ephemeral port (the HTTP
//! backend, driven like a real client) or the engine in this process (the in-process backend).
//! Either way a fresh server per cell, so cells share no state, and on stop its step log
//! (`steps.parquet`) and final statistics (`metrics.prom`) land in the cell's directory.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use trail_checkpoints::Checkpoint;
use trail_eval::loadgen::{self, RequestResult, TraceRequest};
use trail_eval::tracesim::StepTimeModel;
use trail_llm::Runner;
use trail_serving_shim::{
    Engine, EngineConfig, PolicyKind, Recordings, SchedulerConfig, VirtualTime,
};

use super::backend::{EngineBackend, HttpBackend};
use super::client::Remote;
use crate::manifest::write_atomic;
use crate::stages::engine_args::EngineArgs;
use crate::stages::model_args::ModelArgs;

/// Which backend drives the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `trail serve` as a child process, streaming chat completions over HTTP.
    Http,
    /// The engine in this process (no HTTP, no detokenization).
    Inprocess,
    /// The engine in this process on virtual time: each step moves its clock by the step-time
    /// model fitted to the saturation burst's step log (or given, `--step-model`), and the
    /// whole trace is handed to it at
    /// once with its arrivals. Latencies depend on the schedule, not on how fast the machine
    /// happens to be while a cell runs (a shared VM can be 1.5× slower for minutes).
    Virtual,
}

impl BackendKind {
    /// The engine runs in this process (`inprocess`, `virtual`).
    pub fn in_process(self) -> bool {
        matches!(self, Self::Inprocess | Self::Virtual)
    }
}

/// Engine settings shared by every cell.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub engine: EngineArgs,
    pub c: f64,
    pub refine_every: Option<u32>,
    /// Cap on output tokens for requests that fix none.
    pub max_tokens: u32,
    /// Waiting requests the server accepts before answering 429 (set above the trace size).
    pub max_waiting: usize,
}

/// What a server needs beyond its settings.
pub struct Launch<'a> {
    pub backend: BackendKind,
    pub settings: &'a ServerSettings,
    pub model: &'a ModelArgs,
    /// The loaded model (in-process backend).
    pub runner: Option<&'a Arc<Runner>>,
    pub checkpoint_path: Option<&'a Path>,
    /// The exported BERT (`trail serve --bert-checkpoint` over HTTP).
    pub bert_checkpoint_path: Option<&'a Path>,
    /// The loaded checkpoint (in-process backend).
    pub checkpoint: Option<&'a Checkpoint>,
    /// BERT's initial predictions by prompt (in-process backend).
    pub priors: Option<&'a HashMap<String, f64>>,
    /// The step-time model of the virtual clock (`virtual` backend; without `--step-model` the
    /// saturation burst runs on the wall clock before it is fitted).
    pub step_model: Option<StepTimeModel>,
    /// Recorded requests the virtual backend's engines replay (see [`record`]).
    pub recordings: Option<Arc<Recordings>>,
    /// The server of `--base-url`, driven instead of a `trail serve` child.
    pub remote: Option<Remote>,
}

/// The in-process engine of `policy` (on virtual time when the launch has a step model and
/// the backend is `virtual`, then replaying the launch's recordings), with the predictor when
/// `with_predictor` and the checkpoint is loaded; `scheduler` adjusts the scheduler's settings.
fn start_engine(
    cx: &Launch<'_>,
    policy: PolicyKind,
    with_predictor: bool,
    scheduler: impl FnOnce(&mut SchedulerConfig),
) -> anyhow::Result<(Engine, bool)> {
    let runner = cx
        .runner
        .context("the in-process backend needs the loaded model")?;
    let mut cfg = engine_config(cx.settings, policy);
    scheduler(&mut cfg.scheduler);
    let step_model = cx.step_model.filter(|_| cx.backend == BackendKind::Virtual);
    cfg.virtual_time = step_model.map(VirtualTime::new);
    if cfg.virtual_time.is_some() {
        cfg.recordings = cx.recordings.clone();
    }
    let checkpoint = with_predictor.then(|| cx.checkpoint.cloned()).flatten();
    let engine = Engine::start(runner.clone(), checkpoint, cfg)?;
    for w in engine.warnings() {
        eprintln!("warning: {w}");
    }
    Ok((engine, step_model.is_some()))
}

/// The engine settings of a cell of `policy`: the in-process engine's, and what the HTTP
/// backend's child `trail serve` must arrive at from [`serve_args`].
fn engine_config(s: &ServerSettings, policy: PolicyKind) -> EngineConfig {
    let mut cfg = EngineConfig::new(s.engine.kv_budget_tokens, policy);
    cfg.c = s.c;
    cfg.refine_every = s.refine_every;
    cfg.scheduler = s.engine.scheduler();
    cfg.scheduler.max_waiting = s.max_waiting;
    cfg
}

/// The model name the HTTP backend's child serves and its requests give.
const SERVED_NAME: &str = "trail";

/// The arguments of the HTTP backend's child `trail serve` (after `serve`) for `policy` on
/// `port`, writing its step log into `dir`. Every engine setting is passed, the prefill chunk
/// included (`off` for whole prompts), so the child runs the parent's scheduler, not
/// `trail serve`'s defaults.
fn serve_args(cx: &Launch<'_>, policy: PolicyKind, port: u16, dir: &Path) -> Vec<OsString> {
    let s = cx.settings;
    let needs_checkpoint = matches!(policy, PolicyKind::Trail | PolicyKind::Sprpt);
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |a: &str, b: &str| v.extend([OsString::from(a), OsString::from(b)]);
    push("--host", "127.0.0.1");
    push("--port", &port.to_string());
    push("--served-model-name", SERVED_NAME);
    push("--policy", policy.as_str());
    push("--c", &s.c.to_string());
    for pair in s.engine.to_cli().chunks(2) {
        push(&pair[0], &pair[1]);
    }
    push("--max-waiting", &s.max_waiting.to_string());
    push("--default-max-tokens", &s.max_tokens.to_string());
    if let Some(n) = s.refine_every {
        push("--refine-every", &n.to_string());
    }
    if let Some(m) = &cx.model.model {
        push("--model", m);
    }
    if let Some(t) = cx.model.threads {
        push("--threads", &t.to_string());
    }
    push("--device", &cx.model.device.to_string());
    push("--kv-cache", cx.model.kv_cache.name());
    // Profiled lengths go as the evaluation-only stop (see `HttpBackend`).
    v.push("--allow-eval-output-tokens".into());
    let mut path = |flag: &str, p: &Path| v.extend([OsString::from(flag), p.into()]);
    path("--out", dir);
    if needs_checkpoint && let Some(p) = cx.checkpoint_path {
        path("--checkpoint", p);
    }
    if uses_prior(policy)
        && let Some(p) = cx.bert_checkpoint_path
    {
        path("--bert-checkpoint", p);
    }
    v
}

/// The virtual backend's recording pass: every request of `trace` (arrivals ignored) runs once
/// through an FCFS engine on virtual time with the predictor (when `with_predictor`), batched
/// as wide as the KV budget allows up to 16 rows, and lands in `recordings`. The cells then
/// replay each request's tokens and predictor outputs instead of running the model: the
/// runner is batch-invariant and its prefill equals its decode, so the bits are the ones the
/// cell would compute, and each cell costs only its scheduling. `on_done` runs per request.
pub fn record(
    cx: &Launch<'_>,
    with_predictor: bool,
    trace: &[TraceRequest],
    on_done: impl FnMut(&RequestResult),
) -> anyhow::Result<usize> {
    anyhow::ensure!(
        cx.backend == BackendKind::Virtual && cx.step_model.is_some() && cx.recordings.is_some(),
        "recording needs the virtual backend's step model and recordings"
    );
    let (engine, _) = start_engine(cx, PolicyKind::Fcfs, with_predictor, |s| {
        s.max_running = s.max_running.max(16);
        s.max_waiting = s.max_waiting.max(trace.len());
    })?;
    let backend = EngineBackend::new(Arc::new(engine), cx.settings.max_tokens);
    let at_zero: Vec<TraceRequest> = trace
        .iter()
        .map(|r| TraceRequest {
            arrival_s: 0.0,
            ..r.clone()
        })
        .collect();
    let results = backend.replay_virtual(&at_zero, on_done);
    let engine = Arc::try_unwrap(backend.into_engine())
        .map_err(|_| anyhow::anyhow!("the recording engine is still in use"))?;
    engine.shutdown()?;
    if let Some(e) = results.iter().find_map(|r| r.error.as_ref()) {
        anyhow::bail!("recording: a request failed: {e}");
    }
    Ok(results.len())
}

/// A running server.
pub enum Server {
    Http {
        child: Child,
        backend: Arc<HttpBackend>,
        log: PathBuf,
    },
    /// A server this command did not start (`--base-url`): no log, no step log.
    Remote { backend: Arc<HttpBackend> },
    InProcess {
        backend: Arc<EngineBackend>,
        /// On virtual time.
        virtual_time: bool,
    },
}

impl Server {
    /// Starts a server for `policy`; `dir` receives its log and, on [`stop`](Self::stop), its
    /// step log.
    pub fn start(cx: &Launch<'_>, policy: PolicyKind, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let needs_checkpoint = matches!(policy, PolicyKind::Trail | PolicyKind::Sprpt);
        if let Some(remote) = &cx.remote {
            return Ok(Self::Remote {
                backend: Arc::new(remote.backend.clone()),
            });
        }
        match cx.backend {
            BackendKind::Inprocess | BackendKind::Virtual => {
                let (engine, virtual_time) = start_engine(cx, policy, needs_checkpoint, |_| {})?;
                let mut backend = EngineBackend::new(Arc::new(engine), cx.settings.max_tokens);
                if uses_prior(policy)
                    && let Some(p) = cx.priors
                {
                    backend = backend.with_priors(p.clone());
                }
                Ok(Self::InProcess {
                    backend: Arc::new(backend),
                    virtual_time,
                })
            }
            BackendKind::Http => {
                let port = free_port()?;
                let exe = std::env::current_exe().context("locating the trail binary")?;
                let s = cx.settings;
                let mut cmd = Command::new(&exe);
                cmd.arg("serve").args(serve_args(cx, policy, port, dir));
                let log = dir.join("server.log");
                #[allow(clippy::disallowed_methods)] // a log the child streams into, not an output
                let out = std::fs::File::create(&log)
                    .with_context(|| format!("{}: cannot create", log.display()))?;
                let err = out.try_clone()?;
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
                    .with_context(|| format!("starting {} serve", exe.display()))?;
                let base = format!("http://127.0.0.1:{port}");
                let backend = Arc::new(HttpBackend::new(base.clone(), SERVED_NAME, s.max_tokens));
                let mut server = Self::Http {
                    child,
                    backend,
                    log,
                };
                server.wait_ready(port)?;
                Ok(server)
            }
        }
    }

    /// Polls `/health` until the child answers; its exit or two minutes of silence is an error
    /// naming its log.
    fn wait_ready(&mut self, port: u16) -> anyhow::Result<()> {
        let Self::Http { child, log, .. } = self else {
            return Ok(());
        };
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "trail serve exited ({status}) before answering; see {}",
                    log.display()
                );
            }
            if health_ok(port) {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "trail serve did not answer on port {port} within 120 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Replays `trace` in real time (open loop) and returns one result per request.
    pub fn drive(
        &self,
        rt: &tokio::runtime::Runtime,
        trace: &[TraceRequest],
        on_done: impl FnMut(&RequestResult),
    ) -> Vec<RequestResult> {
        match self {
            Self::Http { backend, .. } | Self::Remote { backend } => {
                rt.block_on(loadgen::drive(backend.clone(), trace, on_done))
            }
            Self::InProcess {
                backend,
                virtual_time: true,
            } => backend.replay_virtual(trace, on_done),
            Self::InProcess { backend, .. } => {
                rt.block_on(loadgen::drive(backend.clone(), trace, on_done))
            }
        }
    }

    /// Stops the server: the child gets SIGTERM and writes its step log into the cell's
    /// directory; the in-process engine is shut down and its step log written there.
    pub fn stop(self, dir: &Path) -> anyhow::Result<()> {
        match self {
            Self::Remote { .. } => Ok(()),
            Self::Http { mut child, log, .. } => {
                let pid = child.id().to_string();
                let _ = Command::new("kill").args(["-TERM", &pid]).status();
                let started = Instant::now();
                loop {
                    if let Some(status) = child.try_wait()? {
                        anyhow::ensure!(
                            status.success(),
                            "trail serve exited with {status}; see {}",
                            log.display()
                        );
                        return Ok(());
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        let _ = child.kill();
                        let _ = child.wait();
                        anyhow::bail!(
                            "trail serve did not stop within 60 s of SIGTERM (killed); see {}",
                            log.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Self::InProcess { backend, .. } => {
                let backend = Arc::try_unwrap(backend)
                    .map_err(|_| anyhow::anyhow!("the in-process backend is still in use"))?;
                let engine = Arc::try_unwrap(backend.into_engine())
                    .map_err(|_| anyhow::anyhow!("the engine is still in use"))?;
                let report = engine.shutdown()?;
                trail_serving_shim::steps::write(&dir.join("steps.parquet"), &report.steps)?;
                write_atomic(
                    &dir.join("metrics.prom"),
                    trail_serving_shim::prometheus::render(&report.stats, SERVED_NAME).as_bytes(),
                )?;
                Ok(())
            }
        }
    }
}

/// Whether a policy ranks waiting requests by an initial prediction made before admission:
/// sjf-bert by definition; sprpt and trail too, since a request that has not been prefilled has
/// no probe prediction yet (without one, waiting requests are served FCFS among themselves).
pub fn uses_prior(policy: PolicyKind) -> bool {
    matches!(
        policy,
        PolicyKind::SjfBert | PolicyKind::Sprpt | PolicyKind::Trail
    )
}

/// `GET /health` answered 200.
fn health_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// A port the OS says is free now (bound and released; the child binds it right after).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::engine_args::PrefillChunk;
    use clap::Parser;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: crate::stages::serve::Args,
    }

    /// The child `trail serve` of the HTTP backend, parsed from the arguments the parent
    /// passes, runs the parent's engine settings: whole prompts stay whole though `trail
    /// serve` chunks by default, and a chunk, a budget or a policy setting carries over.
    #[test]
    fn the_child_servers_scheduler_settings_equal_the_parents() {
        let model = ModelArgs {
            model: Some("model.gguf".into()),
            device: Default::default(),
            threads: Some(2),
            kv_cache: Default::default(),
        };
        let cli = |extra: &[&str]| {
            #[derive(Parser)]
            struct Parent {
                #[command(flatten)]
                engine: EngineArgs,
            }
            Parent::parse_from(std::iter::once("x").chain(extra.iter().copied())).engine
        };
        for engine in [
            cli(&[]),
            cli(&["--prefill-chunk", "off", "--max-running", "4"]),
            cli(&["--prefill-chunk", "64", "--kv-budget-tokens", "4096"]),
            cli(&["--preemption", "recompute", "--swap-budget-tokens", "0"]),
        ] {
            let settings = ServerSettings {
                engine,
                c: 0.6,
                refine_every: Some(4),
                max_tokens: 300,
                max_waiting: 5000,
            };
            let cx = Launch {
                backend: BackendKind::Http,
                settings: &settings,
                model: &model,
                runner: None,
                checkpoint_path: None,
                bert_checkpoint_path: None,
                checkpoint: None,
                priors: None,
                step_model: None,
                recordings: None,
                remote: None,
            };
            for policy in [PolicyKind::Fcfs, PolicyKind::Trail] {
                let argv = serve_args(&cx, policy, 8123, Path::new("/tmp/cell"));
                let child =
                    Serve::parse_from(std::iter::once(OsString::from("serve")).chain(argv)).args;
                let (theirs, ours) = (
                    crate::stages::serve::engine_config(&child),
                    engine_config(&settings, policy),
                );
                assert_eq!(theirs.scheduler, ours.scheduler, "{:?}", settings.engine);
                assert_eq!(
                    (theirs.policy, theirs.c, theirs.refine_every),
                    (ours.policy, ours.c, ours.refine_every)
                );
                assert_eq!(child.default_max_tokens, 300);
                assert_eq!(
                    child.socket_addr().unwrap(),
                    "127.0.0.1:8123".parse().unwrap()
                );
                assert_eq!(child.served_model_name, [SERVED_NAME]);
            }
        }
        // The default would differ without the explicit `off`.
        let unset = cli(&[]);
        assert_ne!(
            unset
                .with_default_chunk(PrefillChunk::Tokens(128))
                .scheduler(),
            unset.scheduler()
        );
    }
}
