//! `trail bench serve`: the serving engine's throughput against the bare runner at the same
//! batch, and the predictor's share of step time.
//!
//! The same Alpaca prompts (the first `--requests` of the carried corpus, chat template
//! applied; greedy, up to `--max-tokens` tokens) go through
//! 1. the runner's [`BatchGenerator`] at batch `--batch-size`: offline continuous batching with
//!    no scheduler, no channels, no predictor;
//! 2. the serving engine in-process (no HTTP), once per policy of `--policies`, with
//!    `max_running` = `--batch-size`, a KV budget that holds every request (no preemption), whole-prompt prefill and
//!    every request submitted at t = 0 (admitted in the same iteration); `trail` and `sprpt` run
//!    the `--checkpoint` predictor in the loop when one is given.
//!
//! Both sides honour stop tokens: the batch generator has no `ignore_eos`, and the runner is
//! batch-invariant, so with greedy decoding both generate exactly the same tokens (checked per
//! request and reported) and the ratio compares equal work. Figures are measured side by side
//! in one run; the target (engine ≥ 0.9 × bare) is reported, never asserted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use trail_checkpoints::Checkpoint;
use trail_datasets::corpus::{Corpus, Options};
use trail_llm::Runner;
use trail_llm::batch::{BatchGenerator, Job};
use trail_serving_shim::{Engine, EngineConfig, GenRequest, PolicyKind};

use super::{cpu_model, median, peak_rss_mib};
use crate::manifest::GIT_COMMIT;
use crate::stages::model_args::{ModelArgs, threads};
use crate::stages::predictor_args::PredictorArgs;

/// The throughput the engine should keep, as a fraction of the bare runner's.
const TARGET_RATIO: f64 = 0.9;

/// Arguments of `trail bench serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Requests (the first N prompts of the carried Alpaca).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Batch: rows of the batch generator, `max_running` of the engine.
    #[arg(long = "batch-size", alias = "batch", default_value_t = 16)]
    pub batch: usize,
    /// Most tokens generated per request.
    #[arg(long = "max-tokens", alias = "max-new", default_value_t = 48)]
    pub max_new: usize,
    /// Engine policies to run, comma-separated.
    #[arg(
        long = "policies",
        alias = "policy",
        value_delimiter = ',',
        default_value = "fcfs,trail"
    )]
    pub policy: Vec<PolicyKind>,
    #[command(flatten)]
    pub predictor: PredictorArgs,
    /// Repetitions of the whole comparison (medians are reported).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write `serve.json` and `serve.md` into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One side of the comparison (medians over repeats).
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `bare` or `engine`.
    pub system: String,
    /// The engine's policy.
    pub policy: Option<String>,
    /// Whether the length predictor ran in the loop.
    pub predictor: bool,
    /// Tokens generated.
    pub tokens: usize,
    /// Seconds from the first submission to the last token.
    pub secs: f64,
    pub tok_s: f64,
    /// tok/s over the bare runner's.
    pub ratio: f64,
    /// Model steps.
    pub steps: usize,
    /// Seconds in forward passes.
    pub forward_secs: f64,
    /// Seconds of whole engine steps (forward, sampling, predictor, bookkeeping).
    pub step_secs: Option<f64>,
    /// Seconds of the predictor (probe + filter).
    pub predictor_secs: Option<f64>,
    /// predictor / step seconds.
    pub predictor_share: Option<f64>,
    /// Requests whose tokens equal the bare runner's.
    pub identical: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cpu: String,
    pub threads: usize,
    pub model: String,
    pub kernel_id: String,
    pub git_commit: String,
    pub requests: usize,
    pub batch: usize,
    pub max_new: usize,
    pub repeats: usize,
    /// Prompt tokens over all requests.
    pub prompt_tokens: usize,
    /// Requests that ran to `max_new` (the rest ended at a stop token).
    pub at_max_new: usize,
    pub checkpoint: Option<String>,
    pub target_ratio: f64,
    pub runs: Vec<Run>,
    pub peak_rss_mib: Option<f64>,
}

/// What one timed run measured.
struct Sample {
    secs: f64,
    steps: usize,
    forward_secs: f64,
    step_secs: Option<f64>,
    predictor_secs: Option<f64>,
    tokens: Vec<Vec<u32>>,
}

fn bare(runner: &Runner, prompts: &[Vec<u32>], a: &Args) -> anyhow::Result<Sample> {
    let generator = BatchGenerator::new(runner, a.batch, a.max_new);
    let mut tokens = vec![Vec::new(); prompts.len()];
    let (mut steps, mut forward_secs) = (0, 0.0);
    let jobs = prompts.iter().enumerate().map(|(id, p)| Job {
        id,
        prompt: p.clone(),
        seed: 0,
        stop_at: None,
    });
    let t0 = Instant::now();
    generator.run(
        jobs,
        |f| {
            tokens[f.id] = f.tokens;
            Ok(())
        },
        |s| {
            steps += 1;
            forward_secs += s.secs;
        },
    )?;
    Ok(Sample {
        secs: t0.elapsed().as_secs_f64(),
        steps,
        forward_secs,
        step_secs: None,
        predictor_secs: None,
        tokens,
    })
}

fn engine(
    runner: &Arc<Runner>,
    prompts: &[Vec<u32>],
    a: &Args,
    policy: PolicyKind,
    checkpoint: Option<Checkpoint>,
) -> anyhow::Result<Sample> {
    let block = trail_serving_shim::SchedulerConfig::new(1).block_size;
    let budget: usize = prompts
        .iter()
        .map(|p| (p.len() + a.max_new).div_ceil(block) * block)
        .sum();
    let mut cfg = EngineConfig::new(budget, policy);
    cfg.scheduler.max_running = a.batch;
    cfg.refine_every = a.predictor.refine_every;
    let engine = Engine::start(runner.clone(), checkpoint, cfg)?;
    for w in engine.warnings() {
        eprintln!("warning: {w}");
    }
    let reqs = prompts
        .iter()
        .map(|p| GenRequest::greedy(p.clone(), a.max_new))
        .collect();
    let t0 = Instant::now();
    let handles = engine
        .submit_all_blocking(reqs)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let mut tokens = Vec::with_capacity(handles.len());
    for h in handles {
        tokens.push(h.wait()?.tokens);
    }
    let secs = t0.elapsed().as_secs_f64();
    let report = engine.shutdown()?;
    let sum =
        |f: fn(&trail_serving_shim::StepRecord) -> f64| -> f64 { report.steps.iter().map(f).sum() };
    Ok(Sample {
        secs,
        steps: report.steps.len(),
        forward_secs: sum(|s| s.forward_secs),
        step_secs: Some(sum(|s| s.step_secs)),
        predictor_secs: Some(sum(|s| s.predictor_secs)),
        tokens,
    })
}

/// The carried Alpaca's first `n` prompts, chat template applied.
fn prompts(runner: &Runner, n: usize, max_new: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let corpus = Corpus::carried_alpaca();
    let (records, _) = corpus
        .load(Options { skip_bad: false })
        .with_context(|| format!("reading {}", corpus.path.display()))?;
    anyhow::ensure!(
        records.len() >= n,
        "--requests {n}: the carried Alpaca has {} prompts",
        records.len()
    );
    let context = runner.config().max_position_embeddings;
    records[..n]
        .iter()
        .map(|r| {
            let p = runner.encode_chat(&r.prompt)?;
            anyhow::ensure!(
                p.len() + max_new <= context,
                "Alpaca record {}: {} prompt tokens + --max-tokens {max_new} exceed the context of {context}",
                r.index,
                p.len()
            );
            Ok(p)
        })
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(args.batch > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.max_new > 0, "--max-tokens must be at least 1");
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    anyhow::ensure!(!args.policy.is_empty(), "--policies: at least one policy");
    let runner = Arc::new(args.model.load()?);
    let load =
        |p: &PathBuf| Checkpoint::load(p).with_context(|| format!("loading {}", p.display()));
    if let Some(p) = &args.predictor.checkpoint {
        load(p)?; // fail early on a bad file
    }
    let prompts = prompts(&runner, args.requests, args.max_new)?;
    let uses_predictor = |p: PolicyKind| {
        args.predictor.checkpoint.is_some() && matches!(p, PolicyKind::Trail | PolicyKind::Sprpt)
    };

    // Every repeat runs bare, then each policy, so slow phases of a shared machine spread
    // over all of them.
    let mut bare_samples: Vec<Sample> = Vec::new();
    let mut engine_samples: Vec<Vec<Sample>> = (0..args.policy.len()).map(|_| Vec::new()).collect();
    for rep in 0..args.repeats {
        if !args.json {
            eprintln!("repeat {}/{}: bare runner …", rep + 1, args.repeats);
        }
        bare_samples.push(bare(&runner, &prompts, &args)?);
        for (i, &policy) in args.policy.iter().enumerate() {
            if !args.json {
                eprintln!("repeat {}/{}: engine, {policy} …", rep + 1, args.repeats);
            }
            let ck = match (&args.predictor.checkpoint, uses_predictor(policy)) {
                (Some(p), true) => Some(load(p)?),
                _ => None,
            };
            engine_samples[i].push(engine(&runner, &prompts, &args, policy, ck)?);
        }
    }

    let reference = &bare_samples[0].tokens;
    let summarize = |system: &str, policy: Option<PolicyKind>, samples: &[Sample]| -> Run {
        let tokens: usize = samples[0].tokens.iter().map(Vec::len).sum();
        let secs = median(samples.iter().map(|s| s.secs).collect());
        let opt = |f: fn(&Sample) -> Option<f64>| {
            samples
                .iter()
                .map(f)
                .collect::<Option<Vec<f64>>>()
                .map(median)
        };
        let step_secs = opt(|s| s.step_secs);
        let predictor = policy.is_some_and(uses_predictor);
        let predictor_secs = opt(|s| s.predictor_secs).filter(|_| predictor);
        let identical = samples
            .iter()
            .map(|s| {
                s.tokens
                    .iter()
                    .zip(reference)
                    .filter(|(a, b)| a == b)
                    .count()
            })
            .min()
            .unwrap_or(0);
        Run {
            system: system.into(),
            policy: policy.map(|p| p.to_string()),
            predictor,
            tokens,
            secs,
            tok_s: tokens as f64 / secs,
            ratio: 1.0,
            steps: samples[0].steps,
            forward_secs: median(samples.iter().map(|s| s.forward_secs).collect()),
            step_secs,
            predictor_secs,
            predictor_share: predictor_secs.zip(step_secs).map(|(p, s)| p / s),
            identical,
        }
    };
    let mut runs = vec![summarize("bare", None, &bare_samples)];
    for (policy, samples) in args.policy.iter().zip(&engine_samples) {
        runs.push(summarize("engine", Some(*policy), samples));
    }
    let bare_tok_s = runs[0].tok_s;
    for r in &mut runs {
        r.ratio = r.tok_s / bare_tok_s;
    }

    let report = Report {
        cpu: cpu_model(),
        threads: threads(),
        model: super::shown_path(runner.path(), args.out.as_deref()),
        kernel_id: runner.kernel_id().to_string(),
        git_commit: GIT_COMMIT.to_string(),
        requests: args.requests,
        batch: args.batch,
        max_new: args.max_new,
        repeats: args.repeats,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        at_max_new: reference.iter().filter(|t| t.len() == args.max_new).count(),
        checkpoint: args
            .predictor
            .checkpoint
            .as_ref()
            .map(|p| p.display().to_string()),
        target_ratio: TARGET_RATIO,
        runs,
        peak_rss_mib: peak_rss_mib(),
    };
    let md = markdown(&report);
    super::emit("serve", &report, &md, args.json, args.out.as_deref())?;
    Ok(())
}

/// The human-readable report.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# trail bench serve\n");
    let _ = writeln!(
        s,
        "CPU: {} · threads: {} · commit {}\nmodel: {}\nkernel_id: `{}`\n",
        r.cpu, r.threads, r.git_commit, r.model, r.kernel_id
    );
    let _ = writeln!(
        s,
        "{} Alpaca requests ({} prompt tokens), all at t = 0, greedy, up to {} new tokens ({} ran \
         to the cap), batch {}; median of {} repeat(s). Target: engine ≥ {:.2} × bare.\n",
        r.requests, r.prompt_tokens, r.max_new, r.at_max_new, r.batch, r.repeats, r.target_ratio
    );
    let _ = writeln!(
        s,
        "| system | policy | predictor | tokens | s | tok/s | × bare | steps | forward s | step s | predictor share | same tokens |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {:.1} | {:.3}× | {} | {:.2} | {} | {} | {}/{} |",
            x.system,
            x.policy.as_deref().unwrap_or("–"),
            if x.predictor { "yes" } else { "no" },
            x.tokens,
            x.secs,
            x.tok_s,
            x.ratio,
            x.steps,
            x.forward_secs,
            x.step_secs.map_or("–".into(), |v| format!("{v:.2}")),
            x.predictor_share
                .map_or("–".into(), |v| format!("{:.3} %", 100.0 * v)),
            x.identical,
            r.requests,
        );
    }
    if let Some(c) = &r.checkpoint {
        let _ = writeln!(s, "\npredictor: {c}");
    }
    if let Some(m) = r.peak_rss_mib {
        let _ = writeln!(s, "\npeak RSS: {m:.0} MiB");
    }
    s
}
