//! `trail run`: the whole chain on the embedded defaults, fetching what it needs.
//!
//! generate (a seeded sample of the carried Alpaca) → train (every layer's probe, the prompt
//! predictors, the BERT baselines) → report → export (with the fine-tuned BERT) → a short
//! latency comparison of FCFS and TRAIL on the real engine (on virtual time by default). Every
//! stage is the same code as its own subcommand, with its arguments spelled as on the command
//! line, so each step is resumable and a rerun skips what is done.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use trail_stats::Interval;

use super::eval::latency::BackendKind;
use super::{eval, export, generate, report, train};

/// Arguments of `trail run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the run goes (generated data, models, report, checkpoint, latency results).
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Alpaca prompts to generate (a seeded sample; 80/10/10 train/val/test).
    #[arg(long, default_value_t = 300)]
    pub limit: usize,
    /// Requests per policy in the latency comparison (from the test split, repeated if needed).
    #[arg(long, default_value_t = 60)]
    pub latency_requests: usize,
    /// Load of the latency comparison, as a fraction of the measured saturation throughput.
    #[arg(long, default_value_t = 0.9)]
    pub load: f64,
    /// Batch of the latency comparison's engine. A small batch lets a queue form, which is
    /// where scheduling matters: at batch 8 on 2 cores the batch absorbs most bursts (on the
    /// quickstart's 60 requests at 0.9, FCFS and TRAIL came out equal), while batch 4 costs 4 %
    /// of the throughput (`reports/latency-smollm2/`) and there TRAIL cut TTFT 4.6×.
    #[arg(long, default_value_t = 4)]
    pub max_running: usize,
    /// Backend of the latency comparison: `virtual` (the default) runs the real engine,
    /// scheduler and predictor on a clock moved by the step-time model of its saturation
    /// burst, so the comparison does not depend on how busy the machine is while it runs;
    /// `inprocess` and `http` time it on the wall clock.
    #[arg(long, value_enum, default_value = "virtual")]
    pub backend: BackendKind,
    /// Skip the latency comparison.
    #[arg(long)]
    pub no_latency: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Parses one stage's arguments from a command line, exactly as `trail <stage> ...` would.
fn stage_args<A: clap::Args>(stage: &'static str, argv: &[String]) -> anyhow::Result<A> {
    let cmd = A::augment_args(clap::Command::new(stage).no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(argv)
        .with_context(|| format!("arguments of `trail {stage}`"))?;
    Ok(A::from_arg_matches(&matches)?)
}

fn step(i: usize, n: usize, what: &str, argv: &[String]) {
    eprintln!("\n[{i}/{n}] {what}: trail {}", argv.join(" "));
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = &args.out;
    let seed = args.seed.to_string();
    let n = if args.no_latency { 4 } else { 5 };
    let checkpoint = out.join("predictor.safetensors");
    let bert = out.join("bert.safetensors");

    let argv: Vec<String> = [
        "generate",
        "--dataset",
        "alpaca",
        "--limit",
        &args.limit.to_string(),
        "--seed",
        &seed,
        "--out",
        &path(out),
    ]
    .map(String::from)
    .to_vec();
    step(1, n, "generate", &argv);
    generate::run(stage_args("generate", &argv[1..])?)?;

    let argv: Vec<String> = ["train", "--run", &path(out), "--seed", &seed]
        .map(String::from)
        .to_vec();
    step(2, n, "train", &argv);
    train::run(stage_args("train", &argv[1..])?)?;

    let argv: Vec<String> = ["report", "--run", &path(out), "--seed", &seed]
        .map(String::from)
        .to_vec();
    step(3, n, "report", &argv);
    report::run(stage_args("report", &argv[1..])?)?;

    let argv: Vec<String> = [
        "export",
        "--run",
        &path(out),
        "--out",
        &path(&checkpoint),
        "--bert",
    ]
    .map(String::from)
    .to_vec();
    step(4, n, "export", &argv);
    export::run(stage_args("export", &argv[1..])?)?;

    let latency_dir = out.join("latency");
    if !args.no_latency {
        let backend = args
            .backend
            .to_possible_value()
            .expect("every backend has a value name");
        let argv: Vec<String> = [
            "eval",
            "latency",
            "--checkpoint",
            &path(&checkpoint),
            "--bert-checkpoint",
            &path(&bert),
            "--run",
            &path(out),
            "--policies",
            "fcfs,trail",
            "--loads",
            &args.load.to_string(),
            "--requests",
            &args.latency_requests.to_string(),
            "--seeds",
            &seed,
            "--max-running",
            &args.max_running.to_string(),
            "--backend",
            backend.get_name(),
            "--out",
            &path(&latency_dir),
        ]
        .map(String::from)
        .to_vec();
        step(5, n, "latency, FCFS vs TRAIL", &argv);
        #[derive(Parser)]
        struct EvalCli {
            #[command(subcommand)]
            eval: eval::Eval,
        }
        let cli = EvalCli::try_parse_from(&argv[..]).context("arguments of `trail eval`")?;
        eval::run(cli.eval)?;
    }

    eprintln!(
        "\ndone in {:.1} min. Report: {}  Checkpoint: {}",
        started.elapsed().as_secs_f64() / 60.0,
        out.join("report").join("report.md").display(),
        checkpoint.display()
    );
    if !args.no_latency {
        print_latency(&latency_dir.join("summary.json"))?;
        eprintln!("Latency: {}", latency_dir.join("report.md").display());
    }
    Ok(())
}

/// The latency comparison in three lines, from `trail eval latency`'s summary.json.
fn print_latency(summary: &Path) -> anyhow::Result<()> {
    let summary = eval::latency::read_summary(summary)?;
    eprintln!("\npolicy  load  mean latency (s)  mean TTFT (s)");
    let mut mean = std::collections::BTreeMap::new();
    for c in &summary.cells {
        let value = |i: Option<Interval>| i.map_or(f64::NAN, |i| i.value);
        let (lat, ttft) = (value(c.mean_latency_s), value(c.mean_ttft_s));
        eprintln!("{:<7} {:>4.2}  {lat:>16.2}  {ttft:>13.3}", c.policy, c.load);
        mean.insert(c.policy.clone(), (lat, ttft));
    }
    if let (Some(f), Some(t)) = (mean.get("fcfs"), mean.get("trail")) {
        eprintln!(
            "FCFS / TRAIL: mean latency {:.2}x, mean TTFT {:.2}x (the paper: 1.66-2.01x and \
             1.76-24x on GPUs at higher load)",
            f.0 / t.0,
            f.1 / t.1
        );
    }
    Ok(())
}
