//! `trail bench runner`: the runner's prefill and batched-decode speed, with no layer and with
//! every layer captured, peak RSS, and a per-step timing table for the simulator's step-time
//! model (with `--out`, also `steps.parquet`, the serving engine's step-log format), and the
//! peak RSS of each decode shape. With `--vs-llama-cpp DIR`, llama.cpp's `llama-bench` and
//! `llama-batched-bench` run on the same GGUF with the same threads in the same run, and the
//! ratios are printed. `--prompt-tokens 512 --decode-steps 128` is the long-context shape
//! (`llama-batched-bench -npp 512 -ntg 128`); `--kv-cache f32` runs the numerics before issue 23.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use trail_llm::{KvCache, LayerSet, Row, Runner};
use trail_serving_shim::StepRecord;

use super::llama_cpp::{self, LlamaCpp};
use super::{cpu_model, median, peak_rss_mib, reset_peak_rss};
use crate::manifest::GIT_COMMIT;
use crate::stages::model_args::{ModelArgs, threads};

/// Arguments of `trail bench runner`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Prompt length for the prefill benchmark and the context each decoding row starts from.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 128)]
    pub decode_steps: usize,
    /// Batch sizes for decode.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Repetitions of every prefill and decode measurement; the median is reported (decode
    /// alternates which capture setting runs first).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Directory holding `llama-bench` and `llama-batched-bench`: run them side by side.
    #[arg(long)]
    pub vs_llama_cpp: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write `runner.json`, `runner.md` and the step log `steps.parquet` into this
    /// directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The timed forward steps, in the serving engine's step-log format (`steps.parquet`).
struct StepLog {
    start: Instant,
    steps: Vec<StepRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prefill {
    pub tokens: usize,
    pub none_tok_s: f64,
    pub all_tok_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decode {
    pub batch: usize,
    pub context: usize,
    pub steps: usize,
    /// Medians over the repetitions.
    pub none_tok_s: f64,
    pub all_tok_s: f64,
    /// Every repetition's tok/s, in run order.
    pub none_runs: Vec<f64>,
    pub all_runs: Vec<f64>,
    /// 1 − all/none: the throughput lost to capturing every layer.
    pub capture_cost: f64,
    /// Peak RSS of the process while this shape ran (weights, the prefilled caches and each
    /// repetition's copy included; rows are prefilled one per step; `None` where the OS cannot
    /// reset or report it).
    pub peak_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cpu: String,
    pub threads: usize,
    pub model: String,
    pub kernel_id: String,
    /// The KV cache format (`f16`, or `f32`: the numerics before issue 23).
    pub kv_cache: String,
    pub git_commit: String,
    pub layers: usize,
    pub prefill: Prefill,
    pub decode: Vec<Decode>,
    pub peak_rss_mib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llama_cpp: Option<LlamaCpp>,
    /// trail / llama.cpp (with every layer captured): `prefill`, `decode_bN`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ratios: std::collections::BTreeMap<String, f64>,
    /// Every timed step (also written as `steps.parquet` with `--out`).
    pub steps: Vec<StepRecord>,
}

/// Deterministic benchmark prompts: the chat-templated text of a fixed instruction, cycled to
/// `n` tokens, shifted per row so rows differ.
fn prompt(runner: &Runner, n: usize, row: usize) -> anyhow::Result<Vec<u32>> {
    let base = runner
        .encode_chat("Give three tips for staying healthy, then explain each of them in detail.")?;
    Ok((0..n).map(|i| base[(i + row) % base.len()]).collect())
}

fn timed_step(
    runner: &Runner,
    rows: &mut [Row<'_>],
    layers: LayerSet,
    log: &mut StepLog,
) -> anyhow::Result<(f64, trail_llm::StepOutput)> {
    let prefill_tokens = rows.iter().map(|r| r.prompt_tokens).sum();
    let decode_rows = rows.iter().filter(|r| r.prompt_tokens == 0).count();
    let held = |r: &Row<'_>| r.cache.len() + r.tokens.len();
    let kv_tokens = rows.iter().map(held).sum();
    // Blocks as the serving engine accounts them: per row, in blocks of its default size.
    let block = trail_serving_shim::SchedulerConfig::new(1).block_size;
    let kv_blocks = rows.iter().map(|r| held(r).div_ceil(block)).sum();
    let t = log.start.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let out = runner.model().step(rows, layers)?;
    let secs = t0.elapsed().as_secs_f64();
    log.steps.push(StepRecord {
        step: log.steps.len() as u64,
        t,
        rows: rows.len(),
        decode_rows,
        prefill_tokens,
        kv_tokens,
        kv_blocks,
        running: rows.len(),
        waiting: 0,
        layers: layers.len(),
        preempted_policy: 0,
        preempted_memory: 0,
        step_secs: secs,
        forward_secs: secs,
        predictor_secs: 0.0,
    });
    Ok((secs, out))
}

/// Decodes `steps` greedy steps on every cache; returns tok/s over all rows.
fn decode(
    runner: &Runner,
    caches: &mut [KvCache],
    first: &[u32],
    steps: usize,
    layers: LayerSet,
    log: &mut StepLog,
    bar: &ProgressBar,
) -> anyhow::Result<f64> {
    let mut toks = first.to_vec();
    let mut total = 0.0;
    for _ in 0..steps {
        let mut rows: Vec<Row<'_>> = caches
            .iter_mut()
            .zip(&toks)
            .map(|(c, t)| Row::decode(c, t))
            .collect();
        let (secs, out) = timed_step(runner, &mut rows, layers, log)?;
        total += secs;
        for (r, t) in toks.iter_mut().enumerate() {
            *t = out.argmax(r);
        }
        bar.inc(1);
    }
    Ok((caches.len() * steps) as f64 / total)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    let runner = args.model.load()?;
    let cfg = runner.config().clone();
    anyhow::ensure!(
        args.prompt_tokens + args.decode_steps < cfg.max_position_embeddings,
        "--prompt-tokens + --decode-steps must fit the context of {}",
        cfg.max_position_embeddings
    );
    let all = LayerSet::all(cfg.num_hidden_layers);
    let mut steps = StepLog {
        start: Instant::now(),
        steps: Vec::new(),
    };

    let work = 2 * args.repeats as u64
        + args
            .batches
            .iter()
            .map(|&b| b as u64 + 2 * (args.repeats * args.decode_steps) as u64)
            .sum::<u64>();
    let bar = ProgressBar::new(work).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} steps, eta {eta}")?
            .progress_chars("=> "),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    bar.set_message("prefill");
    let p = prompt(&runner, args.prompt_tokens, 0)?;
    let rate = |layers: LayerSet, steps: &mut StepLog| -> anyhow::Result<f64> {
        let mut samples = Vec::new();
        for _ in 0..args.repeats {
            let mut cache = runner.model().new_cache();
            let (secs, _) =
                timed_step(&runner, &mut [Row::prefill(&mut cache, &p)], layers, steps)?;
            samples.push(p.len() as f64 / secs);
            bar.inc(1);
        }
        Ok(median(samples))
    };
    let prefill = Prefill {
        tokens: p.len(),
        none_tok_s: rate(LayerSet::NONE, &mut steps)?,
        all_tok_s: rate(all, &mut steps)?,
    };

    let mut decodes = Vec::new();
    for &b in &args.batches {
        anyhow::ensure!(b > 0, "batch sizes must be at least 1");
        bar.set_message(format!("decode b{b}"));
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|r| prompt(&runner, args.prompt_tokens, r))
            .collect::<anyhow::Result<_>>()?;
        // Each row prefilled in its own step, as the generate stage admits prompts, so the
        // shape's peak RSS is its caches (the prefilled ones and each repetition's copy) and
        // one prompt's activations, not a 32-prompt prefill's.
        let reset = reset_peak_rss();
        let mut caches: Vec<KvCache> = (0..b).map(|_| runner.model().new_cache()).collect();
        let mut first = Vec::with_capacity(b);
        for (c, p) in caches.iter_mut().zip(&prompts) {
            let (_, out) = timed_step(
                &runner,
                &mut [Row::prefill(c, p)],
                LayerSet::NONE,
                &mut steps,
            )?;
            first.push(out.argmax(0));
            bar.inc(1);
        }
        let (mut none_runs, mut all_runs) = (Vec::new(), Vec::new());
        for rep in 0..args.repeats {
            let order = if rep % 2 == 0 {
                [LayerSet::NONE, all]
            } else {
                [all, LayerSet::NONE]
            };
            for layers in order {
                let mut run = caches.clone();
                let rate = decode(
                    &runner,
                    &mut run,
                    &first,
                    args.decode_steps,
                    layers,
                    &mut steps,
                    &bar,
                )?;
                if layers.is_empty() {
                    none_runs.push(rate);
                } else {
                    all_runs.push(rate);
                }
            }
        }
        let none = median(none_runs.clone());
        let with_all = median(all_runs.clone());
        decodes.push(Decode {
            batch: b,
            context: args.prompt_tokens,
            steps: args.decode_steps,
            none_tok_s: none,
            all_tok_s: with_all,
            none_runs,
            all_runs,
            capture_cost: 1.0 - with_all / none,
            peak_rss_mib: peak_rss_mib().filter(|_| reset),
        });
    }
    bar.finish_and_clear();

    let mut report = Report {
        cpu: cpu_model(),
        threads: threads(),
        model: super::shown_path(runner.path(), args.out.as_deref()),
        kernel_id: runner.kernel_id().to_string(),
        kv_cache: runner.model().kv_format().to_string(),
        git_commit: GIT_COMMIT.to_string(),
        layers: cfg.num_hidden_layers,
        prefill,
        decode: decodes,
        peak_rss_mib: peak_rss_mib(),
        llama_cpp: None,
        ratios: Default::default(),
        steps: steps.steps,
    };

    if let Some(dir) = &args.vs_llama_cpp {
        if !args.json {
            eprintln!("running llama.cpp from {} …", dir.display());
        }
        let lc = llama_cpp::run(
            dir,
            runner.path(),
            report.threads,
            args.prompt_tokens,
            args.decode_steps,
            &args.batches,
        )?;
        report.ratios.insert(
            "prefill".into(),
            report.prefill.all_tok_s / lc.prefill_tok_s,
        );
        for d in &report.decode {
            if let Some(x) = lc.decode_tok_s(d.batch) {
                report
                    .ratios
                    .insert(format!("decode_b{}", d.batch), d.all_tok_s / x);
            }
        }
        report.llama_cpp = Some(lc);
    }

    let md = markdown(&report);
    super::emit("runner", &report, &md, args.json, args.out.as_deref())?;
    if let Some(dir) = &args.out {
        trail_serving_shim::steps::write(&dir.join("steps.parquet"), &report.steps)?;
    }
    Ok(())
}

/// The human-readable report: summary tables and the step table aggregated by shape.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# trail bench runner\n");
    let _ = writeln!(
        s,
        "CPU: {} · threads: {} · commit {} · KV cache {}\nmodel: {}\nkernel_id: `{}`\n",
        r.cpu, r.threads, r.git_commit, r.kv_cache, r.model, r.kernel_id
    );
    let lc = r.llama_cpp.as_ref();
    let _ = writeln!(
        s,
        "| | no layer | all {} layers | capture cost | llama.cpp | trail (all) / llama.cpp | \
         peak RSS MiB |",
        r.layers
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let ratio = |k: &str| r.ratios.get(k).map_or("–".into(), |x| format!("{x:.2}×"));
    let _ = writeln!(
        s,
        "| prefill {} tok, tok/s | {:.0} | {:.0} | {:.1} % | {} | {} | – |",
        r.prefill.tokens,
        r.prefill.none_tok_s,
        r.prefill.all_tok_s,
        100.0 * (1.0 - r.prefill.all_tok_s / r.prefill.none_tok_s),
        lc.map_or("–".into(), |l| format!("{:.0}", l.prefill_tok_s)),
        ratio("prefill"),
    );
    let range = |runs: &[f64]| {
        let (lo, hi) = runs
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        if runs.len() > 1 {
            format!(" ({lo:.0}–{hi:.0})")
        } else {
            String::new()
        }
    };
    for d in &r.decode {
        let _ = writeln!(
            s,
            "| decode batch {}, tok/s | {:.0}{} | {:.0}{} | {:.1} % | {} | {} | {} |",
            d.batch,
            d.none_tok_s,
            range(&d.none_runs),
            d.all_tok_s,
            range(&d.all_runs),
            100.0 * d.capture_cost,
            lc.and_then(|l| l.decode_tok_s(d.batch))
                .map_or("–".into(), |x| format!("{x:.0}")),
            ratio(&format!("decode_b{}", d.batch)),
            d.peak_rss_mib.map_or("–".into(), |m| format!("{m:.0}")),
        );
    }
    if let Some(m) = r.peak_rss_mib {
        let _ = writeln!(s, "\npeak RSS: {m:.0} MiB");
    }
    let context = r.decode.first().map_or(0, |d| d.context);
    let _ = writeln!(
        s,
        "\nDecode rows start from a {context}-token context; tok/s counts every row's tokens; \
         each figure is the median of {} runs (range in brackets).",
        r.decode.first().map_or(0, |d| d.all_runs.len())
    );
    if let Some(l) = lc {
        let _ = writeln!(
            s,
            "llama.cpp's batch-1 figure is `llama-bench` tg{} from the same {context}-token \
             context (`-d {context}`); from an empty cache it reads {:.0} tok/s.",
            r.decode.first().map_or(0, |d| d.steps),
            l.decode_b1_depth0_tok_s
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## Step times (median per shape)\n");
    let _ = writeln!(
        s,
        "| batch | prefill tokens | layers | steps | mean KV tokens | median ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let mut groups: std::collections::BTreeMap<(usize, usize, usize), Vec<&StepRecord>> =
        Default::default();
    for t in &r.steps {
        groups
            .entry((t.rows, t.prefill_tokens, t.layers))
            .or_default()
            .push(t);
    }
    for ((b, p, l), ts) in groups {
        let kv = ts.iter().map(|t| t.kv_tokens as f64).sum::<f64>() / ts.len() as f64;
        let ms = median(ts.iter().map(|t| t.step_secs * 1e3).collect());
        let _ = writeln!(s, "| {b} | {p} | {l} | {} | {kv:.0} | {ms:.2} |", ts.len());
    }
    s
}
