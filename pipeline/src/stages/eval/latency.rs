//! `trail eval latency`: end-to-end scheduling evaluation on the real engine, policies side by
//! side, the way a serving paper measures it.
//!
//! 1. The workload: prompts of the test split of a generated run (`--run`), each with the
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
//!    step log (`step_model.json`), or by another machine's model (`--step-model`, e.g. a
//!    GPU's: then the saturation burst too is replayed on virtual time, under that model), with
//!    the whole trace handed over at once, so a cell's
//!    latencies depend only on the schedule (and repeat to the bit). Its cells replay what a
//!    recording pass computed once per distinct request (tokens and predictor outputs, exact
//!    since the runner is batch-invariant; kept in `recordings.jsonl` for reruns; `--no-replay`
//!    runs the model in every cell).
//!    `--base-url URL` drives a server already running (any OpenAI-compatible one: a `trail
//!    serve`, llama.cpp's server, vLLM) with the same seeded traces instead; its profiled
//!    lengths go by `--protocol` (`eval-output-tokens` to a `trail serve`, `max-tokens` with
//!    `ignore_eos` to a server without a length predictor, each `completion_tokens` checked),
//!    recorded in `settings.json` and the report.
//! 5. `results.parquet` (every cell merged, each request's chunk gaps and prompt tokens
//!    included), `summary.json` (with `benchmark_serving.py`'s figures per cell, and goodput
//!    under `--goodput`), `report.md`, plots, manifest.
//!
//! The modules follow the run: `config` (the arguments resolved and checked, the settings a
//! run is bound to), `client` (`--base-url`, `--protocol`, `--goodput`), `saturation`, `grid`
//! (traces and the cells in run order), `record` (the virtual backend's recording pass), `cell`
//! (one cell on a fresh `server`), `finish` (merge, `summary` with `benchmark`, `report`,
//! manifest).

pub mod backend;
mod benchmark;
mod cell;
mod client;
mod config;
mod finish;
mod grid;
mod headroom;
mod models;
mod record;
mod report;
pub mod saturation;
mod server;
mod summary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use trail_datasets::schema::{RequestRow, requests_path};
use trail_datasets::split::Split;
use trail_datasets::store::read_requests;
use trail_eval::loadgen::workload::Prompt;
use trail_eval::tracesim::StepTimeModel;

pub use report::display_name;
pub use server::BackendKind;
pub use summary::{SUMMARY_SCHEMA_VERSION, Summary, read_summary};

use cell::Cell;
use config::Config;
use grid::Grid;
use models::Models;
use server::{Launch, ServerSettings};

use crate::stages::engine_args::EngineArgs;
use crate::stages::model_args::ModelArgs;

/// `--max-running` by default: the batch of the reference grid (reports/latency-smollm2/), the
/// one whose latencies its README calls trustworthy (with `--backend virtual`).
pub const REFERENCE_MAX_RUNNING: &str = "8";
use crate::stages::predictor_args::{PredictorArgs, RankingArgs};
use crate::stages::step_model;

/// Arguments of `trail eval latency`.
#[derive(Debug, clap::Args)]
#[command(mut_arg("max_running", |a| a.default_value(REFERENCE_MAX_RUNNING)))]
pub struct Args {
    #[command(flatten)]
    pub predictor: PredictorArgs,
    #[command(flatten)]
    pub ranking: RankingArgs,
    /// A generated run: prompts from its test split, profiled output lengths from its
    /// requests.parquet.
    #[arg(long = "run", alias = "data", value_name = "DIR")]
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
    /// Arrivals' burstiness, as `benchmark_serving.py --burstiness`: 1 is Poisson; otherwise
    /// gamma-distributed gaps at the same rate whose coefficient of variation is 1 / √B
    /// (0.25: bursts, gaps twice as variable as Poisson's). Recorded when not 1.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    #[arg(long)]
    pub out: PathBuf,
    /// `virtual` (the default, the reference grid's): the engine in this process on virtual
    /// time (step times from the model fitted to the saturation burst's step log,
    /// `step_model.json`), so latencies depend on the schedule only; `inprocess`: the engine in
    /// this process on the wall clock; `http`: `trail serve` as a child process, driven over
    /// HTTP with streaming.
    #[arg(long, value_enum, default_value = "virtual")]
    pub backend: BackendKind,
    /// `--backend virtual`: run the model in every cell. By default each distinct request runs
    /// once, in a recording pass before the cells, and the cells replay its tokens and
    /// predictor outputs (the same bits: the runner is batch-invariant), so a cell costs only
    /// its scheduling.
    #[arg(long)]
    pub no_replay: bool,
    /// `--backend virtual`: step by this step-time model (JSON, as `step_model.json`; e.g. a
    /// GPU's, `reports/latency-smollm2/step-models/`) instead of one fitted to a saturation
    /// burst on this machine; the capacity is then a burst replayed on virtual time under the
    /// model. Its `kv_capacity_tokens`, if any, replaces --kv-budget-tokens.
    #[arg(long)]
    pub step_model: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Let the model stop at its stop tokens. By default each request generates exactly its
    /// profiled output length (the release protocol, `ignore_eos`), so only scheduling differs;
    /// the oracle needs that.
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// The old spelling: `--ignore-eos true|false`.
    #[arg(long = "ignore-eos", hide = true, conflicts_with = "no_ignore_eos")]
    pub ignore_eos_value: Option<bool>,
    /// Clip profiled output lengths to this many tokens (short runs; recorded).
    #[arg(long)]
    pub clip_output_tokens: Option<u32>,
    /// Each request's cap on output tokens, as a client sends it (`max_tokens`): what the
    /// predictors clamp to and the policies see. Default: the `--max-tokens` the data run was
    /// generated with (else its longest output). A profiled length is never sent as the cap
    /// (see --clamp-to-profiled-length).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// The release protocol's leak, to measure what it was worth: send each request's profiled
    /// output length as its cap (`max_tokens`), so the predictors' estimates and every policy
    /// are clamped to the true remaining length. Off by default.
    #[arg(long)]
    pub clamp_to_profiled_length: bool,
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
    #[command(flatten)]
    pub client: client::ClientArgs,
}

impl Args {
    /// Whether requests generate exactly their profiled length (stop tokens ignored): yes
    /// unless `--no-ignore-eos` (or the old `--ignore-eos false`).
    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos_value.unwrap_or(!self.no_ignore_eos)
    }
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let given_model = given_step_model(&mut args)?;
    args.client.check(args.backend, &args.policies)?;
    let cfg = Config::resolve(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let remote = args.client.remote(&rt, cfg.max_tokens)?;
    let mut settings = cfg.settings(&args)?;
    settings.client = args.client.record(args.backend, remote.as_ref());
    config::bind(&args.out, &settings)?;
    let models = Models::load(&args, &cfg)?;
    let server_settings = ServerSettings {
        engine: args.engine.clone(),
        c: args.ranking.c,
        refine_every: args.predictor.refine_every,
        max_tokens: cfg.max_tokens,
        max_waiting: args.requests.max(cfg.saturation_requests) + 16,
    };
    let mut launch = models.launch(&args, &server_settings);
    launch.remote = remote;
    let sat = saturation::resolve(&args, &cfg, &launch, &rt, given_model.as_ref())?;
    eprintln!("saturation: {}", sat.describe());
    if args.backend == BackendKind::Virtual {
        launch.step_model = Some(saturation::virtual_step_model(
            &args.out,
            given_model.as_ref(),
        )?);
    }
    let grid = Grid::new(&args, &cfg, &sat)?;
    let todo = grid.todo(&args.out);
    eprintln!(
        "{} of {} cells to run ({} done), {} requests each",
        todo.len(),
        grid.len(),
        grid.len() - todo.len(),
        args.requests
    );
    if args.backend == BackendKind::Virtual && !args.no_replay && !todo.is_empty() {
        let with_predictor = models.checkpoint.is_some() && todo.iter().any(Cell::uses_predictor);
        record::pass(&mut launch, &grid, &todo, with_predictor, &args.out)?;
    }
    run_cells(&launch, &rt, &grid, &todo, &args)?;
    let report = finish::finish(&finish::Inputs {
        args: &args,
        cfg: &cfg,
        settings: &settings,
        sat: &sat,
        grid: &grid,
        virtual_model: launch.step_model,
        kernel_id: models.kernel_id(),
        cells_run_now: todo.len(),
    })?;
    eprintln!(
        "done in {:.1} min: {}",
        started.elapsed().as_secs_f64() / 60.0,
        report.display()
    );
    Ok(())
}

/// The model that times virtual time when one is given: `--step-model`'s (which needs
/// `--backend virtual`), or the one already kept in the run's `step_model.json` (a previous run's,
/// or a copied one), its KV capacity made the engine's KV budget (see
/// [`step_model`](crate::stages::step_model)). `None`: the model is to be fitted to the saturation
/// burst here. Either way the saturation is then measured on the clock the cells run on.
fn given_step_model(args: &mut Args) -> anyhow::Result<Option<StepTimeModel>> {
    let kept = args.out.join("step_model.json");
    let path = match (&args.step_model, args.backend) {
        (Some(path), BackendKind::Virtual) => path.clone(),
        (Some(_), _) => {
            anyhow::bail!(
                "--step-model times the steps of virtual time: it needs --backend virtual"
            )
        }
        (None, BackendKind::Virtual) if kept.is_file() => kept,
        (None, _) => return Ok(None),
    };
    let model = step_model::read(&path)?;
    args.engine = step_model::engine_for(&args.engine, &model)?;
    Ok(Some(model))
}

/// Runs the cells of `todo` in order, a fresh server each, with one progress bar over their
/// requests.
fn run_cells(
    launch: &Launch<'_>,
    rt: &tokio::runtime::Runtime,
    grid: &Grid,
    todo: &[Cell],
    args: &Args,
) -> anyhow::Result<()> {
    let bar = bar((todo.len() * args.requests) as u64)?;
    for (k, cell) in todo.iter().enumerate() {
        bar.set_message(format!(
            "cell {}/{}: {}, load {:.2}, seed {}",
            k + 1,
            todo.len(),
            cell.policy,
            cell.load,
            cell.seed
        ));
        let trace = grid.trace(cell);
        let line = cell.run(launch, rt, (trace.rate, &trace.requests), &args.out, || {
            bar.inc(1)
        })?;
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// A generated run's requests, and the prompts of its test split with their profiled output
/// lengths and prompt tokens (the workload of `eval latency` and of `sim trace --run`).
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

fn sha256(path: &Path) -> anyhow::Result<String> {
    trail_llm::hub::sha256_file(path).with_context(|| format!("hashing {}", path.display()))
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
