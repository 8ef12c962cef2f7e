//! `trail eval latency`: end-to-end scheduling evaluation on the real engine, policies side by
//! side, the way a serving paper measures it.
//!
//! 1. The workload: prompts of the test split of a generated run (`--data`), each with the
//!    output length the model produced for it (the release protocol, on by default: every
//!    request generates exactly that many tokens with `ignore_eos`, so only scheduling differs).
//! 2. Saturation: a burst of requests at t = 0 under FCFS with the same `--max-running` and
//!    `--kv-budget-tokens`; completions per second is the capacity (`saturation.json`).
//! 3. Traces: for each load and seed, Poisson arrivals at `load × capacity`
//!    (`traces/load=L/seed=S/trace.jsonl`, the format `trail sim trace` replays).
//! 4. Cells: for each seed, load and policy, a fresh server (`trail serve` as a child on an
//!    ephemeral port, or the engine in process) replays the trace open-loop; the cell's
//!    requests go to `cells/policy=P/load=L/seed=S/results.parquet` (written last and
//!    atomically: a cell with that file is done and skipped on rerun) beside the server's step
//!    log `steps.parquet`, `metrics.prom` and log. Policies run in the given order for the
//!    first, third, ... seed of `--seeds` and in reverse for the second, fourth, ..., so a
//!    slow drift of the machine's speed does not favour the policies that run first.
//!    `--backend virtual` takes the machine's speed out instead: the engine runs in process
//!    on a clock that each step moves by the step-time model fitted to the saturation burst's
//!    step log (`step_model.json`), with the whole trace handed over at once, so a cell's
//!    latencies depend only on the schedule (and repeat to the bit). Its cells replay what a
//!    recording pass computed once per distinct request (tokens and predictor outputs, exact
//!    since the runner is batch-invariant; kept in `recordings.jsonl` for reruns; `--no-replay`
//!    runs the model in every cell).
//! 5. `results.parquet` (every cell merged), `summary.json`, `report.md`, plots, manifest.

pub mod backend;
mod headroom;
mod report;
mod server;
mod summary;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trail_checkpoints::Checkpoint;
use trail_checkpoints::prior::BertPrior;
use trail_datasets::schema::{RequestRow, requests_path};
use trail_datasets::split::Split;
use trail_datasets::store::read_requests;
use trail_eval::loadgen::workload::{self, Lengths, Prompt};
use trail_eval::loadgen::write_trace;
use trail_eval::loadgen::{ResultRow, TraceRequest, read_results, read_trace, write_results};
use trail_eval::tracesim::{StepSample, StepTimeModel};
use trail_serving_shim::{PolicyKind, Recording, RecordingKey, Recordings, StepRecord};

pub use server::BackendKind;

/// One seed's server step log.
type SeedLog = (u64, Vec<StepRecord>);
use server::{Launch, Server, ServerSettings};
use summary::{BootstrapSettings, EngineFigures, load_key};

use crate::manifest::{Manifest, write_atomic};
use crate::stages::engine_args::EngineArgs;
use crate::stages::model_args::ModelArgs;

/// Arguments of `trail eval latency`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The exported predictor (`trail export`); needed by `trail` and `sprpt`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The exported fine-tuned BERT (`bert.safetensors`, `trail export --bert`); needed by
    /// `sjf-bert`, and given to `sprpt` and `trail` too (their only prediction for a request
    /// that has not been prefilled yet).
    #[arg(long)]
    pub bert_checkpoint: Option<PathBuf>,
    /// A generated run: prompts from its test split, profiled output lengths from its
    /// requests.parquet.
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated policies (fcfs, sjf-bert, sprpt, trail, oracle), or `all` (which skips,
    /// with a warning, those whose checkpoint is not given).
    #[arg(long, default_value = "fcfs,trail")]
    pub policies: String,
    /// Loads as fractions of the measured saturation throughput.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.8,0.95")]
    pub loads: Vec<f64>,
    /// Requests per (policy, load, seed); the test split is cycled when it has fewer.
    #[arg(long, default_value_t = 150)]
    pub requests: usize,
    /// Seeds of the arrivals and of the prompt samples.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub seeds: Vec<u64>,
    #[arg(long)]
    pub out: PathBuf,
    /// `http`: `trail serve` as a child process, driven over HTTP with streaming; `inprocess`:
    /// the engine in this process; `virtual`: the engine in this process on virtual time (step
    /// times from the model fitted to the saturation burst's step log, `step_model.json`).
    #[arg(long, value_enum, default_value = "http")]
    pub backend: BackendKind,
    /// `--backend virtual`: run the model in every cell. By default each distinct request runs
    /// once, in a recording pass before the cells, and the cells replay its tokens and
    /// predictor outputs (the same bits: the runner is batch-invariant), so a cell costs only
    /// its scheduling.
    #[arg(long)]
    pub no_replay: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Release protocol: each request generates exactly its profiled output length
    /// (`ignore_eos`); `--ignore-eos false` lets the model stop.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// Clip profiled output lengths to this many tokens (short runs; recorded).
    #[arg(long)]
    pub clip_output_tokens: Option<u32>,
    /// Each request's cap on output tokens, as a client sends it (`max_tokens`): what the
    /// predictors clamp to and the policies see. Default: the `--max-new-tokens` the data run was
    /// generated with (else its longest output). A profiled length is never sent as the cap
    /// (see --clamp-to-profiled-length).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// The release protocol's leak, to measure what it was worth: send each request's profiled
    /// output length as its cap (`max_tokens`), so the predictors' estimates and every policy
    /// are clamped to the true remaining length. Off by default.
    #[arg(long)]
    pub clamp_to_profiled_length: bool,
    /// TRAIL's preemption limit (fraction of the initial prediction).
    #[arg(long, default_value_t = 0.8)]
    pub c: f64,
    /// Refresh the refined prediction every N tokens (default: the checkpoint's interval).
    #[arg(long)]
    pub refine_every: Option<u32>,
    /// Requests of the saturation burst (default: 8 × --max-running, so that the tail, when
    /// fewer than --max-running remain, is a small share of it: a burst of 8 × underestimates
    /// the steady full-batch capacity by about 4 % in `sim trace`).
    #[arg(long)]
    pub saturation_requests: Option<usize>,
    /// Use this capacity (requests/s) instead of measuring it.
    #[arg(long)]
    pub saturation_rps: Option<f64>,
    /// Bootstrap resamples of the intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The measured (or given) capacity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saturation {
    /// Requests per second the engine completes when saturated.
    pub rps: f64,
    /// `measured` or `given`.
    pub source: String,
    pub requests: usize,
    pub completed: usize,
    pub makespan_s: f64,
    pub output_tokens_per_s: f64,
}

impl Saturation {
    /// `1.199 requests/s (measured: …)` or `1.199 requests/s (given)`.
    fn describe(&self) -> String {
        if self.requests == 0 {
            return format!("{:.3} requests/s ({})", self.rps, self.source);
        }
        format!(
            "{:.3} requests/s ({}: FCFS burst of {} requests, {} completed in {:.1} s, {:.1} output tok/s)",
            self.rps,
            self.source,
            self.requests,
            self.completed,
            self.makespan_s,
            self.output_tokens_per_s
        )
    }
}

/// Which policies to run; a policy whose checkpoint is missing is an error naming the flag,
/// or (with `all`) skipped with a warning.
fn policies(args: &Args) -> anyhow::Result<Vec<PolicyKind>> {
    let all = args.policies.trim() == "all";
    let asked: Vec<PolicyKind> = if all {
        PolicyKind::ALL.to_vec()
    } else {
        args.policies
            .split(',')
            .map(|p| PolicyKind::from_str(p.trim()))
            .collect::<Result<_, _>>()
            .context("--policies")?
    };
    if args.bert_checkpoint.is_none()
        && asked
            .iter()
            .any(|p| matches!(p, PolicyKind::Trail | PolicyKind::Sprpt))
    {
        eprintln!(
            "warning: without --bert-checkpoint, trail and sprpt have no prediction for a request \
             before its prefill: waiting requests are served FCFS among themselves and never \
             preempt a running one"
        );
    }
    let mut out = Vec::new();
    for (i, &p) in asked.iter().enumerate() {
        anyhow::ensure!(!asked[..i].contains(&p), "--policies names {p} twice");
        let missing = match p {
            PolicyKind::Trail | PolicyKind::Sprpt if args.checkpoint.is_none() => {
                Some("--checkpoint (the exported predictor, `trail export`)".to_string())
            }
            PolicyKind::SjfBert if args.bert_checkpoint.is_none() => {
                Some("--bert-checkpoint (bert.safetensors, `trail export --bert`)".to_string())
            }
            PolicyKind::Oracle if !args.ignore_eos => Some(
                "--ignore-eos true (the oracle knows lengths only when they are fixed)".to_string(),
            ),
            _ => None,
        };
        match missing {
            None => out.push(p),
            Some(flag) if all => eprintln!("warning: skipping policy {p}: it needs {flag}"),
            Some(flag) => anyhow::bail!("policy {p} needs {flag}"),
        }
    }
    anyhow::ensure!(!out.is_empty(), "no policy to run");
    Ok(out)
}

/// A generated run's requests, and the prompts of its test split with their profiled output
/// lengths and prompt tokens (the workload of `eval latency` and of `sim trace --data`).
pub fn test_prompts(data: &Path) -> anyhow::Result<(Vec<RequestRow>, Vec<Prompt>)> {
    let req_path = requests_path(data);
    let rows = read_requests(&req_path).with_context(|| format!("{}", req_path.display()))?;
    let pool: Vec<Prompt> = rows
        .iter()
        .filter(|r| r.split == Split::Test)
        .map(|r| Prompt {
            request_id: r.request_id.clone(),
            text: r.prompt.clone(),
            output_tokens: r.output_tokens,
            prompt_tokens: Some(r.prompt_tokens),
        })
        .collect();
    anyhow::ensure!(
        !pool.is_empty(),
        "{}: no request in the test split",
        req_path.display()
    );
    Ok((rows, pool))
}

fn cell_dir(out: &Path, policy: &str, load: f64, seed: u64) -> PathBuf {
    out.join("cells")
        .join(format!("policy={policy}"))
        .join(format!("load={}", load_key(load)))
        .join(format!("seed={seed}"))
}

fn trace_path(out: &Path, load: f64, seed: u64) -> PathBuf {
    out.join("traces")
        .join(format!("load={}", load_key(load)))
        .join(format!("seed={seed}"))
        .join("trace.jsonl")
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    trail_llm::hub::sha256_file(path).with_context(|| format!("hashing {}", path.display()))
}

/// Settings every finished cell depends on: written once, and a rerun with other values is
/// refused (it would mix incomparable cells).
fn check_settings(out: &Path, settings: &Value) -> anyhow::Result<()> {
    let Value::Object(settings) = settings else {
        anyhow::bail!("settings must be a JSON object");
    };
    Ok(trail_fs::bind_settings(
        &out.join("settings.json"),
        settings,
    )?)
}

/// A progress bar over requests (hidden when stderr is not a terminal).
fn bar(total: u64) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} requests, {msg}, eta {eta}",
        )?
        .progress_chars("=> "),
    );
    Ok(bar)
}

/// The virtual backend's recordings, kept in `recordings.jsonl` (a line per request: its key
/// and recording, as JSON, which round-trips f32 exactly), so a resumed run records only the
/// requests it has not seen. `settings.json` pins the model, checkpoint and refresh interval
/// they depend on.
fn load_recordings(path: &Path) -> anyhow::Result<Recordings> {
    let recs = Recordings::new();
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let (key, rec): (RecordingKey, Recording) = serde_json::from_str(line)
                .with_context(|| format!("{}: line {}: not a recording", path.display(), i + 1))?;
            recs.insert(key, rec);
        }
    }
    Ok(recs)
}

/// Writes every recording to `path` (sorted lines, atomically).
fn save_recordings(path: &Path, recs: &Recordings) -> anyhow::Result<()> {
    let mut lines = recs
        .entries()
        .iter()
        .map(|(k, r)| serde_json::to_string(&(k, &**r)))
        .collect::<Result<Vec<String>, _>>()?;
    lines.sort();
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// The virtual clock's step-time model: fitted to the saturation burst's step log
/// (`saturation/steps.parquet`, every batch size from full to one as the burst drains) and kept
/// in `step_model.json`, so every cell and every rerun uses the same one.
fn virtual_step_model(out: &Path) -> anyhow::Result<StepTimeModel> {
    let path = out.join("step_model.json");
    if !path.is_file() {
        let log = out.join("saturation").join("steps.parquet");
        anyhow::ensure!(
            log.is_file(),
            "--backend virtual fits its step times to the saturation burst's step log, and {} \
             is missing: measure the saturation here (without --saturation-rps)",
            log.display()
        );
        let records = trail_serving_shim::steps::read(&log)?;
        let model = StepTimeModel::fit_log(&records)
            .with_context(|| format!("fitting the step-time model to {}", log.display()))?;
        write_atomic(&path, serde_json::to_string_pretty(&model)?.as_bytes())?;
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", path.display()))
}

/// Runs a burst of requests at t = 0 under FCFS and returns completions per second.
fn measure_saturation(
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    trace: &[TraceRequest],
    dir: &Path,
) -> anyhow::Result<Saturation> {
    let server = Server::start(launch, PolicyKind::Fcfs, dir)?;
    let bar = bar(trace.len() as u64)?;
    bar.set_message("saturation burst (fcfs)");
    let results = server.drive(rt, trace, |_| bar.inc(1));
    bar.finish_and_clear();
    server.stop(dir)?;
    let ok: Vec<_> = results.iter().filter(|r| r.error.is_none()).collect();
    if let Some(e) = results.iter().find_map(|r| r.error.as_deref()) {
        eprintln!(
            "warning: {} of {} saturation requests failed, e.g.: {e}",
            results.len() - ok.len(),
            results.len()
        );
    }
    anyhow::ensure!(
        !ok.is_empty(),
        "every request of the saturation burst failed; see {}",
        dir.display()
    );
    let makespan = ok.iter().map(|r| r.latency_s).fold(0.0, f64::max);
    let tokens: f64 = ok.iter().map(|r| f64::from(r.output_tokens)).sum();
    Ok(Saturation {
        rps: ok.len() as f64 / makespan,
        source: "measured".into(),
        requests: trace.len(),
        completed: ok.len(),
        makespan_s: makespan,
        output_tokens_per_s: tokens / makespan,
    })
}

/// The report's line on output lengths and caps.
fn describe_lengths(lengths: Lengths, max_tokens: u32) -> String {
    match lengths {
        Lengths::Profiled { clip, clamp } => {
            let clip = clip.map_or(String::new(), |c| format!(" clipped to {c}"));
            let cap = if clamp {
                "cap = the profiled length (the release protocol's clamp: predictions see the \
                 true length)"
                    .to_string()
            } else {
                format!("cap {max_tokens} (the client's; predictors never see the profiled length)")
            };
            format!("profiled output length{clip} as an evaluation-only stop; {cap}")
        }
        Lengths::Free => format!("model stops freely, at most {max_tokens}"),
    }
}

/// The trace of (load, seed): regenerated from the seed, checked against the file a previous
/// run wrote (cells already run replayed that file), written when new.
fn trace_for(
    out: &Path,
    pool: &[Prompt],
    n: usize,
    (load, seed): (f64, u64),
    sat: &Saturation,
    lengths: Lengths,
    max_tokens: u32,
) -> anyhow::Result<(f64, Vec<TraceRequest>)> {
    let rate = load * sat.rps;
    let trace = workload::poisson_trace(pool, n, rate, seed, lengths, max_tokens)
        .with_context(|| format!("load {load}, seed {seed}"))?;
    let path = trace_path(out, load, seed);
    if path.is_file() {
        // Arrival times went through JSON text: equal up to the last bit of the decimal.
        let old = read_trace(&path)?;
        let same = old.len() == trace.len()
            && old.iter().zip(&trace).all(|(a, b)| {
                (a.arrival_s - b.arrival_s).abs() <= 1e-9 * b.arrival_s.abs().max(1.0)
                    && a.prompt == b.prompt
                    && a.output_tokens == b.output_tokens
                    && a.max_tokens == b.max_tokens
                    && a.request_id == b.request_id
            });
        anyhow::ensure!(
            same,
            "{} differs from the trace these settings make now; use another --out",
            path.display()
        );
    } else {
        write_trace(&path, &trace)?;
    }
    Ok((rate, trace))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let policies = policies(&args)?;
    let names: Vec<String> = policies.iter().map(|p| p.as_str().to_string()).collect();
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(!args.seeds.is_empty(), "--seeds is empty");
    anyhow::ensure!(!args.loads.is_empty(), "--loads is empty");
    for &l in &args.loads {
        anyhow::ensure!(
            l.is_finite() && l > 0.0,
            "--loads: {l} is not a positive fraction of saturation"
        );
    }
    let out = args.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;

    // The workload.
    let req_path = requests_path(&args.data);
    let (rows, pool) = test_prompts(&args.data)?;
    let lengths = if args.ignore_eos {
        Lengths::Profiled {
            clip: args.clip_output_tokens,
            clamp: args.clamp_to_profiled_length,
        }
    } else {
        anyhow::ensure!(
            !args.clamp_to_profiled_length,
            "--clamp-to-profiled-length needs profiled lengths (--ignore-eos true)"
        );
        Lengths::Free
    };
    let max_tokens = args
        .max_tokens
        .unwrap_or(trail_checkpoints::suite::generation_cap(&args.data, &rows)?)
        .min(args.clip_output_tokens.unwrap_or(u32::MAX))
        .max(1);
    let saturation_requests = args
        .saturation_requests
        .unwrap_or(8 * args.engine.max_running);
    anyhow::ensure!(
        saturation_requests > 0,
        "--saturation-requests must be at least 1"
    );

    let model_path = args.model.path()?;
    let checkpoint_sha = args.checkpoint.as_deref().map(sha256).transpose()?;
    let bert_sha = args.bert_checkpoint.as_deref().map(sha256).transpose()?;
    let settings = json!({
        "data_requests_sha256": sha256(&req_path)?,
        "requests": args.requests,
        "ignore_eos": args.ignore_eos,
        "clip_output_tokens": args.clip_output_tokens,
        "max_tokens": max_tokens,
        "clamp_to_profiled_length": args.clamp_to_profiled_length,
        "backend": args.backend,
        "engine": args.engine,
        "c": args.c,
        "refine_every": args.refine_every,
        "checkpoint_sha256": checkpoint_sha,
        "bert_checkpoint_sha256": bert_sha,
        "model": model_path.display().to_string(),
        "model_sha256": sha256(&model_path)?,
        "saturation_requests": saturation_requests,
        "saturation_rps": args.saturation_rps,
    });
    check_settings(&out, &settings)?;

    // What the servers need.
    let needs_checkpoint = policies
        .iter()
        .any(|p| matches!(p, PolicyKind::Trail | PolicyKind::Sprpt));
    let inprocess = args.backend.in_process();
    let runner = if inprocess {
        Some(Arc::new(args.model.load()?))
    } else {
        None
    };
    let kernel_id = runner.as_ref().map(|r| r.kernel_id().to_string());
    let checkpoint = match (&args.checkpoint, inprocess && needs_checkpoint) {
        (Some(p), true) => {
            Some(Checkpoint::load(p).with_context(|| format!("loading {}", p.display()))?)
        }
        _ => None,
    };
    let priors: Option<HashMap<String, f64>> = match &args.bert_checkpoint {
        Some(p) if inprocess && policies.iter().any(|q| server::uses_prior(*q)) => {
            let prior = BertPrior::load(p).with_context(|| format!("loading {}", p.display()))?;
            let texts: Vec<&str> = pool.iter().map(|q| q.text.as_str()).collect();
            let pred = prior
                .predict(&texts, 16)
                .with_context(|| format!("predicting with {}", p.display()))?;
            Some(
                texts
                    .iter()
                    .zip(pred)
                    .map(|(t, x)| (t.to_string(), x))
                    .collect(),
            )
        }
        _ => None,
    };
    let max_trace = args.requests.max(saturation_requests);
    let server_settings = ServerSettings {
        engine: args.engine.clone(),
        c: args.c,
        refine_every: args.refine_every,
        max_tokens,
        max_waiting: max_trace + 16,
    };
    let mut launch = Launch {
        backend: args.backend,
        settings: &server_settings,
        model: &args.model,
        runner: runner.as_ref(),
        checkpoint_path: args.checkpoint.as_deref(),
        bert_checkpoint_path: args.bert_checkpoint.as_deref(),
        checkpoint: checkpoint.as_ref(),
        priors: priors.as_ref(),
        step_model: None,
        recordings: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Saturation.
    let sat_path = out.join("saturation.json");
    let sat: Saturation = if let Some(rps) = args.saturation_rps {
        anyhow::ensure!(
            rps.is_finite() && rps > 0.0,
            "--saturation-rps must be positive"
        );
        Saturation {
            rps,
            source: "given".into(),
            requests: 0,
            completed: 0,
            makespan_s: 0.0,
            output_tokens_per_s: 0.0,
        }
    } else {
        if !sat_path.is_file() {
            let burst = workload::burst(&pool, saturation_requests, 0, lengths, max_tokens)?;
            let s = measure_saturation(&launch, &rt, &burst, &out.join("saturation"))?;
            write_atomic(&sat_path, serde_json::to_string_pretty(&s)?.as_bytes())?;
        }
        // Always the value as read back, so this run and every rerun make the same traces.
        let text = std::fs::read_to_string(&sat_path)
            .with_context(|| format!("{}: cannot read", sat_path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", sat_path.display()))?
    };
    eprintln!("saturation: {}", sat.describe());
    if args.backend == BackendKind::Virtual {
        let model = virtual_step_model(&out)?;
        eprintln!(
            "virtual time: {:.2} ms + {:.3} ms per decode row + {:.3} ms per prefill token + {:.2} µs per KV token",
            model.base_s * 1e3,
            model.per_decode_row_s * 1e3,
            model.per_prefill_token_s * 1e3,
            model.per_kv_token_s * 1e6
        );
        launch.step_model = Some(model);
    }

    // Traces, then the cells not done yet: seed outermost, so a partial run holds every
    // policy of the (load, seed) pairs it reached.
    let mut traces: BTreeMap<(u64, String), (f64, Vec<TraceRequest>)> = BTreeMap::new();
    for &seed in &args.seeds {
        for &load in &args.loads {
            let t = trace_for(
                &out,
                &pool,
                args.requests,
                (load, seed),
                &sat,
                lengths,
                max_tokens,
            )?;
            traces.insert((seed, load_key(load)), t);
        }
    }
    // Every other seed runs the policies in reverse (see the module doc).
    let mut todo = Vec::new();
    for (k, &seed) in args.seeds.iter().enumerate() {
        let mut order = policies.clone();
        if k % 2 == 1 {
            order.reverse();
        }
        for &load in &args.loads {
            for &p in &order {
                if !cell_dir(&out, p.as_str(), load, seed)
                    .join("results.parquet")
                    .is_file()
                {
                    todo.push((seed, load, p));
                }
            }
        }
    }
    let total_cells = args.seeds.len() * args.loads.len() * policies.len();
    eprintln!(
        "{} of {total_cells} cells to run ({} done), {} requests each",
        todo.len(),
        total_cells - todo.len(),
        args.requests
    );
    if args.backend == BackendKind::Virtual && !args.no_replay && !todo.is_empty() {
        // Every distinct request of the cells to run, once.
        let mut seen = HashSet::new();
        let mut distinct = Vec::new();
        for &(seed, load, _) in &todo {
            for r in &traces[&(seed, load_key(load))].1 {
                if seen.insert((r.prompt.as_str(), r.output_tokens, r.max_tokens)) {
                    distinct.push(r.clone());
                }
            }
        }
        let with_predictor = checkpoint.is_some()
            && todo
                .iter()
                .any(|(_, _, p)| matches!(p, PolicyKind::Trail | PolicyKind::Sprpt));
        let path = out.join("recordings.jsonl");
        let recs = Arc::new(load_recordings(&path)?);
        launch.recordings = Some(recs.clone());
        let t0 = Instant::now();
        let bar = bar(distinct.len() as u64)?;
        bar.set_message("recording each distinct request once");
        let n = server::record(&launch, with_predictor, &distinct, |_| bar.inc(1))?;
        bar.finish_and_clear();
        save_recordings(&path, &recs)?;
        eprintln!(
            "recording pass: {n} distinct requests ({} already in {}) in {:.0} s; the cells \
             replay them",
            recs.hits(),
            path.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    let bar = bar((todo.len() * args.requests) as u64)?;
    for (k, &(seed, load, policy)) in todo.iter().enumerate() {
        let (rate, trace) = &traces[&(seed, load_key(load))];
        let dir = cell_dir(&out, policy.as_str(), load, seed);
        bar.set_message(format!(
            "cell {}/{}: {policy}, load {load:.2}, seed {seed}",
            k + 1,
            todo.len()
        ));
        let t0 = Instant::now();
        let server = Server::start(&launch, policy, &dir)?;
        let results = server.drive(&rt, trace, |_| bar.inc(1));
        server.stop(&dir)?;
        let rows: Vec<ResultRow> = results
            .into_iter()
            .zip(trace)
            .map(|(result, req)| ResultRow {
                policy: policy.as_str().to_string(),
                load,
                rate_rps: *rate,
                seed,
                target_tokens: req.output_tokens,
                result,
            })
            .collect();
        let failed = rows.iter().filter(|r| r.result.error.is_some()).count();
        write_results(&dir.join("results.parquet"), &rows)?;
        let mean = rows.iter().map(|r| r.result.latency_s).sum::<f64>() / rows.len() as f64;
        let line = format!(
            "{policy:>8} load {load:.2} seed {seed}: {} requests ({failed} failed), mean latency \
             {mean:.2} s, {:.0} s",
            rows.len(),
            t0.elapsed().as_secs_f64()
        );
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }
    bar.finish_and_clear();

    // Merge every finished cell of the grid asked for.
    let mut all = Vec::new();
    let mut missing = Vec::new();
    let mut step_logs: BTreeMap<(String, String), Vec<SeedLog>> = BTreeMap::new();
    for &seed in &args.seeds {
        for &load in &args.loads {
            for &p in &policies {
                let path = cell_dir(&out, p.as_str(), load, seed).join("results.parquet");
                if !path.is_file() {
                    missing.push(path);
                    continue;
                }
                let rows = read_results(&path)?;
                let steps = path.with_file_name("steps.parquet");
                if steps.is_file() {
                    step_logs
                        .entry((p.as_str().to_string(), load_key(load)))
                        .or_default()
                        .push((seed, trail_serving_shim::steps::read(&steps)?));
                }
                let mut seen = vec![false; args.requests];
                for r in &rows {
                    if let Some(s) = seen.get_mut(r.result.index) {
                        *s = true;
                    }
                }
                anyhow::ensure!(
                    rows.len() == args.requests && seen.iter().all(|s| *s),
                    "{}: {} rows, expected one per request of the trace ({})",
                    path.display(),
                    rows.len(),
                    args.requests
                );
                all.extend(rows);
            }
        }
    }
    anyhow::ensure!(missing.is_empty(), "cells not finished: {missing:?}");
    let results_path = out.join("results.parquet");
    write_results(&results_path, &all)?;
    let boot = BootstrapSettings {
        resamples: args.bootstrap,
        seed: 0,
    };
    let mut summary = summary::summarize(&all, &names, boot);
    let samples: Vec<StepSample> = step_logs
        .values()
        .flatten()
        .flat_map(|(_, log)| log.iter().map(StepSample::from))
        .collect();
    // On virtual time the cells' latencies follow the virtual clock's model, so the simulated
    // headroom uses it too (the logs' wall-clock step times only say how busy the machine was).
    summary.step_model_source = if launch.step_model.is_some() {
        "the virtual clock's, fitted to the saturation burst's step log".into()
    } else {
        "fitted to every cell's step log".into()
    };
    summary.step_model = if let Some(m) = launch.step_model {
        Some(m)
    } else if samples.is_empty() {
        None
    } else {
        Some(StepTimeModel::fit(&samples).context("fitting the step-time model to the step logs")?)
    };
    // A virtual cell's wall-clock step times are those of replaying, not of the machine's speed:
    // no relative step time there.
    let machine_model = summary
        .step_model
        .as_ref()
        .filter(|_| launch.step_model.is_none());
    for c in &mut summary.cells {
        if let Some(logs) = step_logs.get(&(c.policy.clone(), load_key(c.load))) {
            c.engine = Some(EngineFigures::from_steps(logs, machine_model));
        }
    }
    if let Some(model) = &summary.step_model {
        for &load in &args.loads {
            let per_seed: Vec<Vec<TraceRequest>> = args
                .seeds
                .iter()
                .map(|&seed| traces[&(seed, load_key(load))].1.clone())
                .collect();
            // Without fixed lengths the simulator has nothing to replay.
            if per_seed.iter().flatten().all(|r| r.output_tokens.is_some()) {
                let h = headroom::simulate(load, &per_seed, &args.engine.scheduler(), model)
                    .with_context(|| format!("simulating the traces of load {load}"))?;
                summary.simulated.push(h);
            }
        }
    }
    let summary_path = out.join("summary.json");
    write_atomic(
        &summary_path,
        serde_json::to_string_pretty(&json!({
            "saturation": sat,
            "settings": settings,
            "policies": names,
            "loads": args.loads,
            "seeds": args.seeds,
            "summary": summary,
        }))?
        .as_bytes(),
    )?;
    let plots = report::plots(&out, &summary, &all, &names)?;
    let mut report_settings: report::Settings = vec![
        (
            "data".into(),
            format!(
                "{} (test split: {} prompts)",
                args.data.display(),
                pool.len()
            ),
        ),
        (
            "requests".into(),
            format!(
                "{} per (policy, load, seed); seeds {:?}",
                args.requests, args.seeds
            ),
        ),
        ("lengths".into(), describe_lengths(lengths, max_tokens)),
        ("saturation".into(), sat.describe()),
        (
            "engine".into(),
            format!(
                "{}, TRAIL c {}, refine every {}",
                args.engine.describe(),
                args.c,
                args.refine_every
                    .map_or("checkpoint's interval".into(), |n| n.to_string())
            ),
        ),
        (
            "backend".into(),
            format!("{:?}", args.backend).to_lowercase(),
        ),
        ("model".into(), model_path.display().to_string()),
        (
            "threads".into(),
            args.model
                .threads
                .map_or("every core".into(), |t| t.to_string()),
        ),
    ];
    if let Some(k) = &kernel_id {
        report_settings.push(("kernel".into(), k.clone()));
    }
    if let Some(p) = &args.checkpoint {
        report_settings.push(("checkpoint".into(), p.display().to_string()));
    }
    if let Some(p) = &args.bert_checkpoint {
        report_settings.push(("BERT checkpoint".into(), p.display().to_string()));
    }
    let report_path = out.join("report.md");
    write_atomic(
        &report_path,
        report::markdown(&summary, &report_settings, &plots).as_bytes(),
    )?;

    // The manifest.
    let config = json!({
        "checkpoint": args.checkpoint,
        "bert_checkpoint": args.bert_checkpoint,
        "data": args.data,
        "policies": names,
        "loads": args.loads,
        "requests": args.requests,
        "seeds": args.seeds,
        "out": args.out,
        "backend": args.backend,
        "engine": args.engine,
        "ignore_eos": args.ignore_eos,
        "clip_output_tokens": args.clip_output_tokens,
        "max_tokens": max_tokens,
        "clamp_to_profiled_length": args.clamp_to_profiled_length,
        "c": args.c,
        "refine_every": args.refine_every,
        "saturation_requests": saturation_requests,
        "saturation_rps": args.saturation_rps,
        "bootstrap": args.bootstrap,
        "model": args.model.model,
        "threads": args.model.threads,
    });
    let mut manifest = Manifest::start("eval latency", &config, args.seeds.first().copied())?;
    manifest.kernel_id = kernel_id;
    manifest.input(&req_path, &args.data)?;
    for p in [&args.checkpoint, &args.bert_checkpoint]
        .into_iter()
        .flatten()
    {
        manifest.input(p, &out)?;
    }
    for p in [&results_path, &summary_path, &report_path]
        .into_iter()
        .chain(&plots)
    {
        manifest.output(p, &out)?;
    }
    if sat_path.is_file() {
        manifest.output(&sat_path, &out)?;
    }
    for (seed, key) in traces.keys() {
        let load = args
            .loads
            .iter()
            .copied()
            .find(|l| &load_key(*l) == key)
            .unwrap_or_default();
        manifest.output(&trace_path(&out, load, *seed), &out)?;
    }
    manifest.result("saturation_rps", sat.rps)?;
    manifest.result("requests_total", all.len())?;
    manifest.result(
        "failed_total",
        all.iter().filter(|r| r.result.error.is_some()).count(),
    )?;
    manifest.result("cells_run_now", todo.len())?;
    manifest.finish(&out)?;
    eprintln!(
        "done in {:.1} min: {}",
        started.elapsed().as_secs_f64() / 60.0,
        report_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_with_a_float_read_back_equal_so_a_rerun_resumes() {
        let dir = tempfile::tempdir().unwrap();
        // serde_json's default float parser reads this one back one ulp off.
        let settings = serde_json::json!({ "saturation_rps": 1.1985825176004705_f64 });
        check_settings(dir.path(), &settings).unwrap();
        check_settings(dir.path(), &settings).unwrap();
        let other = serde_json::json!({ "saturation_rps": 1.2 });
        let err = check_settings(dir.path(), &other).unwrap_err().to_string();
        assert!(err.contains("saturation_rps"), "{err}");
    }
}
