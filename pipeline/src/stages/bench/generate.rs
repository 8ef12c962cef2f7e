//! `trail bench generate`: the generate stage's throughput against the bare runner.
//!
//! One run, one loaded model, the same planned and tokenized prompts: first the runner's
//! [`BatchGenerator`] alone (no layer captured, nothing written), then the full stage path
//! ([`generate::write`]: every layer captured at the sampled positions, parts written as
//! parquet, `requests.parquet` merged, outputs hashed into the manifest) into a temporary
//! directory. Both generate the same tokens (greedy, batch-invariant runner), which the
//! benchmark checks. Reported: tok/s of each, their ratio (target ≥ 0.9×), and the bytes on
//! disk per stored embedding row (one sampled position, or a prompt mean) for every layer.
//!
//! With `--kv-compare`, the stage rounds compare the f16 KV cache with the f32 one instead,
//! interleaved, every job at a fixed length ([`comparison`]).

pub mod comparison;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use trail_datasets::{Dtype, Ratios, Shard, SplitFilter, store};
use trail_llm::batch::BatchGenerator;

use super::{cpu_model, median, peak_rss_mib};
use crate::manifest::GIT_COMMIT;
use crate::stages::generate;
use crate::stages::model_args::{ModelArgs, threads};

/// The ratio of stage to bare-runner tok/s the stage should reach.
pub const TARGET_RATIO: f64 = 0.9;

/// Arguments of `trail bench generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Corpus, as `trail generate --dataset`.
    #[arg(long, default_value = "alpaca")]
    pub dataset: String,
    /// Prompts drawn from it (a seeded sample, as `trail generate --limit`).
    #[arg(long, default_value_t = 64)]
    pub prompts: usize,
    /// Most tokens generated per prompt, as `trail generate --max-tokens`.
    #[arg(long = "max-tokens", alias = "max-new-tokens", default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sequences decoded together, as `trail generate --batch-size`.
    #[arg(long = "batch-size", alias = "batch", default_value_t = 16)]
    pub batch: usize,
    /// Layers the stage captures.
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Positions the stage captures.
    #[arg(long, default_value = "every:8")]
    pub sample: String,
    #[arg(long, default_value = "f16")]
    pub dtype: Dtype,
    /// Rounds of (bare runner, stage); medians are reported. With --kv-compare: pairs of stage
    /// rounds (f16 and f32 cache), after one bare-runner pass.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Compare the f16 KV cache with the f32 one: the stage path with each, interleaved
    /// (f16 f32 / f32 f16 / …), every prompt at a fixed length (stop tokens ignored) from a free
    /// greedy f16 pass or --lengths-from. The goal: f16 ≥ 1.3× the f32 tok/s. --kv-cache is
    /// ignored.
    #[arg(long)]
    pub kv_compare: bool,
    /// With --kv-compare: take each prompt's length from this run's `requests.parquet`
    /// (`output_tokens`, by request id, capped at --max-tokens) instead of a free greedy pass.
    #[arg(long, value_name = "RUN_DIR", requires = "kv_compare")]
    pub lengths_from: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write `generate.json` and `generate.md` into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// On-disk size of one layer's embeddings.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBytes {
    pub layer: u32,
    /// Stored rows: sampled positions plus one prompt mean per request.
    pub rows: u64,
    pub bytes: u64,
    pub bytes_per_row: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cpu: String,
    pub threads: usize,
    pub model: String,
    pub kernel_id: String,
    pub git_commit: String,
    pub dataset: String,
    pub prompts: usize,
    pub batch: usize,
    pub max_new_tokens: usize,
    pub layers: usize,
    pub sample: String,
    pub dtype: String,
    pub repeats: usize,
    /// Tokens generated per round (the same for both sides).
    pub generated_tokens: u64,
    /// Bare runner: median seconds and tok/s.
    pub bare_secs: f64,
    pub bare_tok_s: f64,
    /// The whole stage path, from binding the run dir to the manifest: median seconds, tok/s.
    pub stage_secs: f64,
    pub stage_tok_s: f64,
    /// stage / bare tok/s.
    pub ratio: f64,
    pub target_ratio: f64,
    /// Embedding payload per row before compression (hidden size × element size).
    pub raw_bytes_per_row: usize,
    /// Mean over layers of [`LayerBytes::bytes_per_row`].
    pub bytes_per_row: f64,
    /// Every output file of the stage (requests and embeddings).
    pub total_bytes: u64,
    pub per_layer: Vec<LayerBytes>,
    pub peak_rss_mib: Option<f64>,
    /// With `--kv-compare`: the f16 vs f32 KV cache rounds. The bare-runner figures above are
    /// then its one f16 pass, the stage figures the median of its f16 rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_compare: Option<comparison::Comparison>,
}

/// What the rounds measured.
struct Rounds {
    /// Bare runner: seconds per round.
    bare: Vec<f64>,
    /// Stage path (the default cache): seconds and bytes written per round.
    stage: Vec<(f64, u64)>,
    /// Tokens generated per round.
    generated: u64,
    kv_compare: Option<comparison::Comparison>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = measure(&args)?;
    let md = markdown(&report);
    super::emit("generate", &report, &md, args.json, args.out.as_deref())?;
    Ok(())
}

/// Runs the benchmark and returns its report.
pub fn measure(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.prompts > 0, "--prompts must be at least 1");
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    let tmp = tempfile::Builder::new()
        .prefix("trail-bench-generate-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut stage_args = generate::Args {
        dataset: args.dataset.clone(),
        format: None,
        prompt_field: None,
        limit: Some(args.prompts),
        split: SplitFilter::All,
        ratios: Ratios::default(),
        seed: args.seed,
        shard: Shard::default(),
        batch: args.batch,
        max_new_tokens: args.max_new_tokens,
        sample: args.sample.clone(),
        layers: args.layers.clone(),
        dtype: args.dtype,
        part_size: 64,
        skip_bad: false,
        out: tmp.path().join("run-0"),
        model: args.model.clone(),
    };
    let say = |msg: String| {
        if !args.json {
            eprintln!("{msg}");
        }
    };
    let mut prep = generate::prepare(&stage_args)?;
    let n = prep.requests.len();
    say(format!(
        "{n} prompts of {}, batch {}, up to {} new tokens",
        prep.dataset, args.batch, args.max_new_tokens
    ));

    let rounds = if args.kv_compare {
        let m = comparison::measure(args, &mut stage_args, &mut prep, tmp.path(), &say)?;
        stage_args.out = m.f16_out;
        Rounds {
            bare: vec![m.bare_secs],
            stage: m.f16_stage,
            generated: m.tokens,
            kv_compare: Some(m.comparison),
        }
    } else {
        bare_and_stage(args, &mut stage_args, &prep, tmp.path(), &say)?
    };
    let generated = rounds.generated;
    let (bare, stage) = (rounds.bare, rounds.stage);

    let mut per_layer = Vec::new();
    for l in prep.layers.iter() {
        let l = l as u32;
        let (mut rows, mut bytes) = (0, 0);
        for p in store::layer_parts(&stage_args.out, l)? {
            rows += store::row_count(&p)?;
            bytes += std::fs::metadata(&p)
                .with_context(|| format!("{}: cannot stat", p.display()))?
                .len();
        }
        per_layer.push(LayerBytes {
            layer: l,
            rows,
            bytes,
            bytes_per_row: bytes as f64 / rows.max(1) as f64,
        });
    }
    let element = match args.dtype {
        Dtype::F16 => 2,
        Dtype::F32 => 4,
    };
    let bare_secs = median(bare);
    let stage_secs = median(stage.iter().map(|s| s.0).collect());
    let report = Report {
        cpu: cpu_model(),
        threads: threads(),
        model: super::shown_path(prep.runner.path(), args.out.as_deref()),
        kernel_id: prep.runner.kernel_id().to_string(),
        git_commit: GIT_COMMIT.to_string(),
        dataset: prep.dataset.clone(),
        prompts: n,
        batch: args.batch,
        max_new_tokens: args.max_new_tokens,
        layers: per_layer.len(),
        sample: args.sample.clone(),
        dtype: args.dtype.as_str().to_string(),
        repeats: args.repeats,
        generated_tokens: generated,
        bare_secs,
        bare_tok_s: generated as f64 / bare_secs,
        stage_secs,
        stage_tok_s: generated as f64 / stage_secs,
        ratio: bare_secs / stage_secs,
        target_ratio: TARGET_RATIO,
        raw_bytes_per_row: prep.runner.config().hidden_size * element,
        bytes_per_row: per_layer.iter().map(|l| l.bytes_per_row).sum::<f64>()
            / per_layer.len().max(1) as f64,
        total_bytes: stage.last().map_or(0, |s| s.1),
        per_layer,
        peak_rss_mib: peak_rss_mib(),
        kv_compare: rounds.kv_compare,
    };
    Ok(report)
}

/// One pass of the bare runner ([`BatchGenerator`], nothing captured or written) over every
/// planned job: its seconds and each request's generated length, in request order.
fn bare_pass(
    args: &Args,
    stage_args: &generate::Args,
    prep: &generate::Prepared,
) -> anyhow::Result<(f64, Vec<usize>)> {
    let n = prep.requests.len();
    let mut lengths = vec![0; n];
    let t = Instant::now();
    BatchGenerator::new(&prep.runner, args.batch, args.max_new_tokens).run(
        prep.jobs(stage_args, 0..n),
        |f| {
            lengths[f.id] = f.tokens.len();
            Ok(())
        },
        |_| {},
    )?;
    Ok((t.elapsed().as_secs_f64(), lengths))
}

/// `repeats` rounds of (bare runner, stage path), checking they generate the same tokens.
fn bare_and_stage(
    args: &Args,
    stage_args: &mut generate::Args,
    prep: &generate::Prepared,
    dir: &Path,
    say: &dyn Fn(String),
) -> anyhow::Result<Rounds> {
    let mut bare = Vec::new();
    let mut stage = Vec::new();
    let mut generated = None;
    for round in 0..args.repeats {
        let (secs, lengths) = bare_pass(args, stage_args, prep)?;
        let tokens: u64 = lengths.iter().map(|&l| l as u64).sum();
        say(format!(
            "round {round}: bare runner {tokens} tokens in {secs:.1} s"
        ));
        bare.push(secs);

        stage_args.out = dir.join(format!("run-{round}"));
        let t = Instant::now();
        let summary = generate::write(stage_args, prep)?;
        let secs = t.elapsed().as_secs_f64();
        say(format!(
            "round {round}: stage {} tokens in {secs:.1} s",
            summary.generated_tokens
        ));
        anyhow::ensure!(
            summary.generated_tokens == tokens,
            "the stage generated {} tokens and the bare runner {tokens}: the runs differ",
            summary.generated_tokens
        );
        anyhow::ensure!(
            generated.is_none_or(|g| g == tokens),
            "round {round} generated {tokens} tokens, an earlier round {generated:?}"
        );
        generated = Some(tokens);
        stage.push((secs, summary.bytes));
    }
    Ok(Rounds {
        bare,
        stage,
        generated: generated.expect("at least one round"),
        kv_compare: None,
    })
}

/// The human-readable report.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# trail bench generate\n");
    let _ = writeln!(
        s,
        "CPU: {} · threads: {} · commit {}\nmodel: {}\nkernel_id: `{}`\n",
        r.cpu, r.threads, r.git_commit, r.model, r.kernel_id
    );
    let rounds = match &r.kv_compare {
        Some(_) => format!(
            "bare runner: the one f16 pass; stage: median of the {} f16 round(s) below",
            r.repeats
        ),
        None => format!("median of {} round(s)", r.repeats),
    };
    let _ = writeln!(
        s,
        "{} prompts of {}, batch {}, up to {} new tokens: {} tokens generated per run; {rounds}.\n",
        r.prompts, r.dataset, r.batch, r.max_new_tokens, r.generated_tokens
    );
    let _ = writeln!(s, "| | seconds | tok/s | vs bare runner |");
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(
        s,
        "| bare runner (`BatchGenerator`, no capture, nothing written) | {:.1} | {:.1} | 1.00× |",
        r.bare_secs, r.bare_tok_s
    );
    let verdict = if r.ratio >= r.target_ratio {
        "meets"
    } else {
        "misses"
    };
    let _ = writeln!(
        s,
        "| `trail generate` path ({} layers, {}, {}, parquet + manifest) | {:.1} | {:.1} | {:.2}× ({verdict} the {:.2}× target) |",
        r.layers, r.sample, r.dtype, r.stage_secs, r.stage_tok_s, r.ratio, r.target_ratio
    );
    let _ = writeln!(
        s,
        "\nEmbeddings on disk: {:.0} bytes per stored row on average over {} layers ({} bytes \
         raw); {:.1} MiB of outputs in all.\n",
        r.bytes_per_row,
        r.layers,
        r.raw_bytes_per_row,
        r.total_bytes as f64 / (1 << 20) as f64
    );
    let _ = writeln!(s, "| layer | rows | bytes | bytes per row |");
    let _ = writeln!(s, "|---|---|---|---|");
    for l in &r.per_layer {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} |",
            l.layer, l.rows, l.bytes, l.bytes_per_row
        );
    }
    if let Some(c) = &r.kv_compare {
        comparison::markdown(c, &mut s);
    }
    if let Some(m) = r.peak_rss_mib {
        let _ = writeln!(s, "\npeak RSS: {m:.0} MiB");
    }
    s
}
