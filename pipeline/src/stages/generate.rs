//! `trail generate`: run the target model over a corpus and write what it answered, how long,
//! and the per-layer hidden states of sampled positions, as parquet.
//!
//! The requests (deduplicated, split, sampled, sharded: [`trail_datasets::plan`]) are cut into
//! parts of `--part-size` consecutive requests. The model decodes with continuous batching over
//! all pending requests; a part is written as soon as its last request finishes: the embedding
//! files of every layer first, then `.parts/requests-NNNNN.parquet`, each atomically. A part
//! counts as done only when all of them read back, so after a kill the rerun redoes exactly the
//! unfinished parts and, greedy decoding being deterministic, ends with the same bytes as an
//! uninterrupted run. `requests.parquet` and `manifest.json` are written at the end.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use trail_datasets::corpus;
use trail_datasets::{
    Corpus, Dtype, FinishReason, Kind, PartWriter, PlanOptions, Ratios, Report, Request,
    RequestRow, Shard, SplitFilter, plan, split::PlanCounts, store,
};
use trail_llm::batch::{BatchGenerator, Finished, Job, Positions};
use trail_llm::{LayerSet, Runner, StopReason, hub};

use crate::manifest::Manifest;
use crate::stages::model_args::ModelArgs;

/// Arguments of `trail generate`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Args {
    /// `alpaca` (carried in the repository), `sharegpt` (fetched on first use),
    /// `hf:OWNER/REPO/FILE` (a dataset file through the hub), or a path (.json, .jsonl, .zst,
    /// .parquet).
    #[arg(long, default_value = "alpaca")]
    pub dataset: String,
    /// How to read a path: `alpaca`, `sharegpt`, or a field name with --prompt-field.
    /// Default: `alpaca` unless --prompt-field is given.
    #[arg(long)]
    pub format: Option<String>,
    /// The string field (JSON) or column (parquet) holding the prompt.
    #[arg(long)]
    pub prompt_field: Option<String>,
    /// Draw a seeded sample of this many requests (after the split filter).
    #[arg(long)]
    pub limit: Option<usize>,
    /// `all`, `train`, `val` or `test`.
    #[arg(long, default_value = "all")]
    #[serde(serialize_with = "display")]
    pub split: SplitFilter,
    /// Split ratios train/val/test.
    #[arg(long, default_value = "80/10/10")]
    #[serde(serialize_with = "display")]
    pub ratios: Ratios,
    /// Seed of the split hash, the sample and random position sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `i/n`, or `auto/n` to take i from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX. Give
    /// each shard its own --out; readers take several run dirs as one dataset.
    #[arg(long, default_value = "0/1")]
    #[serde(serialize_with = "display")]
    pub shard: Shard,
    /// Rows decoding together (continuous batching).
    #[arg(long = "batch-size", alias = "batch", default_value_t = 16)]
    pub batch: usize,
    /// Most tokens generated per prompt (greedy; a prompt that reaches it ends there).
    #[arg(long = "max-tokens", alias = "max-new-tokens", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Which positions: `every:K`, `random:N` or `all`.
    #[arg(long, default_value = "every:8")]
    pub sample: String,
    /// Which layers: `all`, `11`, `8-15` or `1,5,9`.
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Embedding element type.
    #[arg(long, default_value = "f16")]
    #[serde(serialize_with = "display_dtype")]
    pub dtype: Dtype,
    /// Requests per part (the unit of resumption and of files).
    #[arg(long, default_value_t = 64)]
    pub part_size: usize,
    /// Skip bad records (listed in the manifest) instead of failing on the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Output run directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(skip)]
    pub model: ModelArgs,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_dtype<S: serde::Serializer>(v: &Dtype, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

/// Parses `every:K`, `random:N`, `all`.
pub fn parse_positions(s: &str) -> anyhow::Result<Positions> {
    let bad = || anyhow::anyhow!("--sample `{s}`: expected `every:K`, `random:N` or `all`");
    match s.split_once(':') {
        None if s == "all" => Ok(Positions::All),
        Some(("every", k)) => match k.parse::<usize>() {
            Ok(k) if k > 0 => Ok(Positions::Every(k)),
            _ => Err(bad()),
        },
        Some(("random", n)) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Positions::Random { count: n }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// Parses `all`, `11`, `8-15`, `1,5,9` (and mixes like `0-3,29`) for an `n`-layer model.
pub fn parse_layers(s: &str, n: usize) -> anyhow::Result<LayerSet> {
    if s == "all" {
        return Ok(LayerSet::all(n));
    }
    let mut set = LayerSet::NONE;
    for part in s.split(',').map(str::trim) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.parse::<usize>(), part.parse::<usize>()),
        };
        let (Ok(a), Ok(b)) = (a, b) else {
            anyhow::bail!("--layers `{s}`: `{part}` is not a layer or a range");
        };
        anyhow::ensure!(
            a <= b && b < n,
            "--layers `{s}`: `{part}` is outside 0-{} of this {n}-layer model",
            n - 1
        );
        for l in a..=b {
            set = set.with(l);
        }
    }
    Ok(set)
}

/// The corpus behind `--dataset` and its name for request ids and the manifest.
fn corpus(args: &Args) -> anyhow::Result<(String, Corpus)> {
    let format = |path: PathBuf| -> anyhow::Result<Corpus> {
        Ok(match (args.format.as_deref(), &args.prompt_field) {
            (_, Some(field)) => Corpus::field(path, field.clone()),
            (None | Some("alpaca"), None) => Corpus::alpaca(path),
            (Some("sharegpt"), None) => Corpus::sharegpt(path),
            (Some(other), None) => {
                anyhow::bail!("--format `{other}`: expected `alpaca` or `sharegpt`")
            }
        })
    };
    Ok(match args.dataset.as_str() {
        "alpaca" => ("alpaca".into(), Corpus::carried_alpaca()),
        "sharegpt" => ("sharegpt".into(), Corpus::sharegpt(hub::SHAREGPT.ensure()?)),
        spec if spec.starts_with("hf:") => {
            let path = hub::resolve_hf(spec, hub::RepoKind::Dataset)?;
            (spec.trim_start_matches("hf:").to_string(), format(path)?)
        }
        path => {
            let p = PathBuf::from(path);
            anyhow::ensure!(
                !p.is_dir(),
                "--dataset {path}: is a directory; give one corpus file (.json, .jsonl, .zst or \
                 .parquet): a directory of parts is not read, concatenate them first"
            );
            anyhow::ensure!(p.is_file(), "--dataset {path}: no such file");
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().trim_end_matches(".jsonl").to_string())
                .unwrap_or_else(|| path.to_string());
            (name, format(p)?)
        }
    })
}

/// Where each part's requests are kept until the run ends.
fn requests_part_path(out: &Path, part: usize) -> PathBuf {
    out.join(".parts")
        .join(format!("requests-{part:05}.parquet"))
}

/// A part is done when its requests file and every layer file read back.
fn part_done(out: &Path, part: usize, layers: &[u32]) -> bool {
    let req = requests_part_path(out, part);
    store::part_complete(out, part, layers)
        && !trail_datasets::schema::tmp_path(&req).exists()
        && store::read_requests(&req).is_ok()
}

/// The configuration a run directory is bound to: a rerun must match it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct Binding {
    dataset: String,
    corpus_sha256: String,
    model_sha256: String,
    kernel_id: String,
    plan: PlanOptions,
    batch_independent: bool,
    max_new_tokens: usize,
    sample: String,
    layers: Vec<u32>,
    dtype: String,
    part_size: usize,
    /// Per-request fixed lengths ([`Prepared::fixed_lengths`]); absent in ordinary runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fixed_lengths: Option<Vec<usize>>,
}

/// What the stage did, for the manifest and the caller.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub parts: usize,
    pub parts_resumed: usize,
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    pub wall_secs: f64,
    /// Generated tokens per second of generation; `None` when every part was already done.
    pub tok_s: Option<f64>,
    pub output_tokens: LengthStats,
    pub embedding_rows: u64,
    pub bytes: u64,
}

/// Output-length statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LengthStats {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: u32,
    pub share_at_cap: f64,
}

impl LengthStats {
    pub fn of(lengths: &[u32], cap: usize) -> Self {
        if lengths.is_empty() {
            return Self::default();
        }
        let mut v = lengths.to_vec();
        v.sort_unstable();
        let sorted: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        let q = |p: f64| trail_stats::quantile_sorted(&sorted, p).expect("non-empty");
        Self {
            mean: v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64,
            p50: q(0.5),
            p90: q(0.9),
            max: *v.last().expect("non-empty"),
            share_at_cap: v.iter().filter(|&&x| x as usize >= cap).count() as f64 / v.len() as f64,
        }
    }
}

/// One part being filled.
struct OpenPart {
    writer: PartWriter,
    /// (request order, row).
    rows: Vec<(usize, RequestRow)>,
    missing: usize,
}

/// A request left out under --skip-bad because its prompt does not fit.
#[derive(Debug, Clone, Serialize)]
struct TooLong {
    record: usize,
    request_id: String,
    prompt_tokens: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let summary = generate(&args)?;
    let stats = format!(
        "output tokens mean {:.1}, p50 {}, p90 {}, {:.1} % at the {} cap; {:.1} MiB in {}",
        summary.output_tokens.mean,
        summary.output_tokens.p50,
        summary.output_tokens.p90,
        100.0 * summary.output_tokens.share_at_cap,
        args.max_new_tokens,
        summary.bytes as f64 / (1 << 20) as f64,
        args.out.display()
    );
    match summary.tok_s {
        Some(tok_s) => eprintln!(
            "{} requests ({} parts, {} already done) in {:.0} s, {:.1} tok/s; {stats}",
            summary.requests, summary.parts, summary.parts_resumed, summary.wall_secs, tok_s,
        ),
        None => eprintln!(
            "{} requests: all {} parts were already complete, nothing left to generate \
             (resumed everything); {stats}",
            summary.requests, summary.parts,
        ),
    }
    Ok(())
}

/// Runs the stage; returns its summary (also in the manifest).
pub fn generate(args: &Args) -> anyhow::Result<Summary> {
    let prepared = prepare(args)?;
    write(args, &prepared)
}

/// A run's requests, planned and tokenized, and the model that answers them: everything the
/// stage does before it generates (shared with `trail bench generate`).
pub struct Prepared {
    pub dataset: String,
    corpus: Corpus,
    report: Report,
    counts: PlanCounts,
    pub runner: Runner,
    model_sha256: String,
    /// The layers captured.
    pub layers: LayerSet,
    /// The positions captured.
    pub positions: Positions,
    /// Requests in request order with their chat-templated prompt ids.
    pub requests: Vec<(Request, Vec<u32>)>,
    /// Per request (in request order), a fixed number of tokens to generate, stop tokens
    /// ignored ([`Job::stop_at`]). `None` (what [`prepare`] gives): greedy until a stop token or
    /// `--max-tokens`. Set by `trail bench generate --kv-compare` so unlike numerics do like
    /// work; bound into the run directory.
    pub fixed_lengths: Option<Vec<usize>>,
    too_long: Vec<TooLong>,
    secs: f64,
}

impl Prepared {
    /// The jobs of `indices` (into [`Prepared::requests`]), as the stage hands them to the
    /// batch generator.
    pub fn jobs<'a>(
        &'a self,
        args: &'a Args,
        indices: impl IntoIterator<Item = usize> + 'a,
    ) -> impl Iterator<Item = Job> + 'a {
        indices.into_iter().map(move |i| Job {
            id: i,
            prompt: self.requests[i].1.clone(),
            seed: trail_datasets::split::hash64(args.seed, &self.requests[i].0.request_id),
            stop_at: self.fixed_lengths.as_ref().map(|l| l[i]),
        })
    }
}

/// Reads the corpus, plans the requests, loads the model and tokenizes the prompts.
pub fn prepare(args: &Args) -> anyhow::Result<Prepared> {
    anyhow::ensure!(args.batch > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.part_size > 0, "--part-size must be at least 1");
    anyhow::ensure!(args.max_new_tokens > 0, "--max-tokens must be at least 1");
    let positions = parse_positions(&args.sample)?;
    let t0 = Instant::now();

    let (dataset, corpus) = corpus(args)?;
    let (records, report) = corpus
        .load(corpus::Options {
            skip_bad: args.skip_bad,
        })
        .with_context(|| format!("reading {}", corpus.path.display()))?;
    let options = plan_options(args);
    let planned = plan(&dataset, records, &options);
    anyhow::ensure!(
        !planned.requests.is_empty(),
        "no requests: {} records, {} duplicates, split `{}` and --limit leave none",
        planned.counts.records,
        planned.counts.duplicates,
        args.split
    );

    let runner = args.model.load()?;
    let model_sha256 = hub::sha256_file(runner.path())?;
    let cfg = runner.config().clone();
    let layers = parse_layers(&args.layers, cfg.num_hidden_layers)?;

    // Tokenize; prompts that cannot fit with room to generate are bad input.
    let room = cfg
        .max_position_embeddings
        .saturating_sub(args.max_new_tokens);
    let mut too_long: Vec<TooLong> = Vec::new();
    let mut requests: Vec<(Request, Vec<u32>)> = Vec::with_capacity(planned.requests.len());
    for r in planned.requests {
        let ids = runner.encode_chat(&r.prompt)?;
        if ids.len() > room {
            anyhow::ensure!(
                args.skip_bad,
                "{}: record {}: a prompt of {} tokens leaves no room for {} new tokens in the \
                 context of {} (use --skip-bad to leave it out)",
                corpus.path.display(),
                r.index,
                ids.len(),
                args.max_new_tokens,
                cfg.max_position_embeddings
            );
            too_long.push(TooLong {
                record: r.index,
                request_id: r.request_id,
                prompt_tokens: ids.len(),
            });
            continue;
        }
        requests.push((r, ids));
    }
    Ok(Prepared {
        dataset,
        corpus,
        report,
        counts: planned.counts,
        runner,
        model_sha256,
        layers,
        positions,
        requests,
        fixed_lengths: None,
        too_long,
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn plan_options(args: &Args) -> PlanOptions {
    PlanOptions {
        ratios: args.ratios,
        split_seed: args.seed,
        split: args.split,
        limit: args.limit,
        sample_seed: args.seed,
        shard: args.shard,
    }
}

/// Plain progress lines for logs (Slurm, nohup), where the progress bar is hidden: requests
/// done of the total, tok/s and ETA, every [`LOG_EVERY`].
struct LogLines {
    enabled: bool,
    started: Instant,
    last: Instant,
    /// Requests already done when this run started.
    resumed: u64,
    total: u64,
}

/// How often [`LogLines`] prints.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl LogLines {
    fn new(resumed: usize, total: usize) -> Self {
        let now = Instant::now();
        Self {
            enabled: !std::io::stderr().is_terminal(),
            started: now,
            last: now,
            resumed: resumed as u64,
            total: total as u64,
        }
    }

    fn tick(&mut self, done: u64, tokens: u64) {
        if !self.enabled || self.last.elapsed() < LOG_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let new = done.saturating_sub(self.resumed);
        let eta = if new == 0 {
            "unknown".to_string()
        } else {
            let left = secs / new as f64 * self.total.saturating_sub(done) as f64;
            format!("{:.0} min", left / 60.0)
        };
        eprintln!(
            "generate: {done}/{} requests, {:.1} tok/s, eta {eta}",
            self.total,
            tokens as f64 / secs.max(1e-9)
        );
    }
}

/// Generates what is not on disk yet under `args.out` and writes the run: parts, then
/// `requests.parquet` and `manifest.json`.
pub fn write(args: &Args, prep: &Prepared) -> anyhow::Result<Summary> {
    let t0 = Instant::now();
    let Prepared {
        dataset,
        corpus,
        report,
        counts,
        runner,
        model_sha256,
        layers: layer_set,
        positions,
        requests,
        fixed_lengths,
        too_long,
        secs: prepare_secs,
    } = prep;
    let cfg = runner.config();
    let layers: Vec<u32> = layer_set.iter().map(|l| l as u32).collect();

    std::fs::create_dir_all(args.out.join(".parts"))
        .with_context(|| format!("creating {}", args.out.display()))?;
    let binding = Binding {
        dataset: dataset.clone(),
        corpus_sha256: report.sha256.clone(),
        model_sha256: model_sha256.clone(),
        kernel_id: runner.kernel_id().to_string(),
        plan: plan_options(args),
        batch_independent: true,
        max_new_tokens: args.max_new_tokens,
        sample: args.sample.clone(),
        layers: layers.clone(),
        dtype: args.dtype.as_str().to_string(),
        part_size: args.part_size,
        fixed_lengths: fixed_lengths.clone(),
    };
    if let Some(l) = fixed_lengths {
        anyhow::ensure!(
            l.len() == requests.len(),
            "internal: {} fixed lengths for {} requests",
            l.len(),
            requests.len()
        );
    }
    bind(&args.out, &binding)?;
    let n_parts = requests.len().div_ceil(args.part_size);

    // Parts already on disk are kept; the others are cleared and redone.
    let mut pending = Vec::new();
    let mut open: BTreeMap<usize, OpenPart> = BTreeMap::new();
    let mut resumed = 0;
    for part in 0..n_parts {
        if part_done(&args.out, part, &layers) {
            resumed += 1;
            continue;
        }
        store::remove_part(&args.out, part, &layers)?;
        let _ = std::fs::remove_file(requests_part_path(&args.out, part));
        let lo = part * args.part_size;
        let hi = (lo + args.part_size).min(requests.len());
        open.insert(
            part,
            OpenPart {
                writer: PartWriter::new(&args.out, part, &layers, cfg.hidden_size, args.dtype),
                rows: Vec::with_capacity(hi - lo),
                missing: hi - lo,
            },
        );
        pending.extend(lo..hi);
    }

    let bar = ProgressBar::new(requests.len() as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} requests, {msg}, eta {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.set_position((requests.len() - pending.len()) as u64);
    bar.set_message("starting");
    let mut log = LogLines::new(requests.len() - pending.len(), requests.len());

    let generator = BatchGenerator::new(runner, args.batch, args.max_new_tokens)
        .capture(*layer_set, *positions);
    let jobs = prep.jobs(args, pending.iter().copied());
    let started = Instant::now();
    let mut new_tokens: u64 = 0;
    let mut new_prompt_tokens: u64 = 0;
    let mut step_tokens: u64 = 0;
    let finish = |f: Finished, open: &mut BTreeMap<usize, OpenPart>| -> anyhow::Result<()> {
        let (req, ids) = &requests[f.id];
        let part = f.id / args.part_size;
        let p = open
            .get_mut(&part)
            .expect("pending requests belong to open parts");
        let output_tokens = f.tokens.len() as u32;
        let text_ids: Vec<u32> = match f.stop {
            StopReason::StopToken(_) => f.tokens[..f.tokens.len() - 1].to_vec(),
            _ => f.tokens.clone(),
        };
        let order = f.id as u64;
        if let Some(mean) = &f.prompt_mean {
            p.writer.push(
                order,
                &req.request_id,
                Kind::PromptMean,
                0,
                output_tokens,
                mean,
            )?;
        }
        for s in &f.states {
            p.writer.push(
                order,
                &req.request_id,
                Kind::Token,
                s.g,
                output_tokens - s.g,
                &s.hidden,
            )?;
        }
        p.rows.push((
            f.id,
            RequestRow {
                request_id: req.request_id.clone(),
                dataset: dataset.clone(),
                split: req.split,
                prompt: req.prompt.clone(),
                prompt_tokens: ids.len() as u32,
                output: runner.decode(&text_ids)?,
                output_tokens,
                finish_reason: match f.stop {
                    StopReason::StopToken(_) => FinishReason::Stop,
                    _ => FinishReason::Length,
                },
            },
        ));
        p.missing -= 1;
        if p.missing == 0 {
            let mut p = open.remove(&part).expect("present");
            p.writer.finish()?;
            p.rows.sort_by_key(|(order, _)| *order);
            let rows: Vec<RequestRow> = p.rows.into_iter().map(|(_, r)| r).collect();
            store::write_requests(&requests_part_path(&args.out, part), &rows)?;
        }
        Ok(())
    };
    let mut failure: Option<anyhow::Error> = None;
    let result = generator.run(
        jobs,
        |f| {
            new_tokens += f.tokens.len() as u64;
            new_prompt_tokens += f.prompt_tokens as u64;
            bar.inc(1);
            finish(f, &mut open).map_err(|e| {
                let msg = format!("{e:#}");
                failure = Some(e);
                trail_llm::LlmError::Step(msg)
            })
        },
        |s| {
            step_tokens += s.decode_rows as u64 + (s.prefill_tokens > 0) as u64;
            let secs = started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "{} rows, {:.1} tok/s",
                s.rows,
                step_tokens as f64 / secs.max(1e-9)
            ));
            log.tick(bar.position(), step_tokens);
        },
    );
    if let Some(e) = failure {
        return Err(e);
    }
    result?;
    bar.finish_and_clear();
    anyhow::ensure!(open.is_empty(), "internal: {} parts left open", open.len());
    let gen_secs = started.elapsed().as_secs_f64();

    // Merge the parts' requests in request order.
    let mut rows = Vec::with_capacity(requests.len());
    for part in 0..n_parts {
        rows.extend(store::read_requests(&requests_part_path(&args.out, part))?);
    }
    let requests_file = trail_datasets::schema::requests_path(&args.out);
    store::write_requests(&requests_file, &rows)?;

    let lengths: Vec<u32> = rows.iter().map(|r| r.output_tokens).collect();
    let mut manifest = Manifest::start("generate", args, Some(args.seed))?;
    manifest.input(runner.path(), Path::new("/"))?;
    let mut outputs = vec![requests_file.clone()];
    for &l in &layers {
        outputs.extend(store::layer_parts(&args.out, l)?);
    }
    let mut bytes = 0;
    for f in &outputs {
        bytes += std::fs::metadata(f)?.len();
        manifest.output(f, &args.out)?;
    }
    let embedding_rows = count_rows(&args.out, layers[0])?;
    let summary = Summary {
        requests: rows.len(),
        parts: n_parts,
        parts_resumed: resumed,
        generated_tokens: new_tokens,
        prompt_tokens: new_prompt_tokens,
        wall_secs: prepare_secs + t0.elapsed().as_secs_f64(),
        tok_s: (!pending.is_empty()).then(|| new_tokens as f64 / gen_secs.max(1e-9)),
        output_tokens: LengthStats::of(&lengths, args.max_new_tokens),
        embedding_rows,
        bytes,
    };
    manifest.kernel_id = Some(runner.kernel_id().to_string());
    manifest.result("dataset", dataset)?;
    manifest.result("corpus", CorpusInfo::new(corpus, report))?;
    manifest.result("plan_counts", counts)?;
    manifest.result("skipped_too_long", too_long)?;
    manifest.result("model_sha256", model_sha256)?;
    manifest.result("layers", &layers)?;
    manifest.result("hidden_size", cfg.hidden_size)?;
    manifest.result("summary", &summary)?;
    manifest.finish(&args.out)?;
    Ok(summary)
}

/// The corpus as the manifest names it.
#[derive(Debug, Serialize)]
struct CorpusInfo<'a> {
    path: String,
    format: String,
    #[serde(flatten)]
    report: &'a Report,
}

impl<'a> CorpusInfo<'a> {
    fn new(corpus: &Corpus, report: &'a Report) -> Self {
        Self {
            path: corpus.path.display().to_string(),
            format: corpus.format.to_string(),
            report,
        }
    }
}

fn count_rows(out: &Path, layer: u32) -> anyhow::Result<u64> {
    let mut n = 0;
    for p in store::layer_parts(out, layer)? {
        n += store::row_count(&p)?;
    }
    Ok(n)
}

/// Records the run's binding on first use; later runs must match it (`trail_fs::bind_settings`).
fn bind(out: &Path, binding: &Binding) -> anyhow::Result<()> {
    let serde_json::Value::Object(settings) = serde_json::to_value(binding)? else {
        unreachable!("a struct serializes to an object");
    };
    Ok(trail_fs::bind_settings(
        &out.join(".parts").join("binding.json"),
        &settings,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_layers_parse() {
        assert_eq!(parse_positions("every:8").unwrap(), Positions::Every(8));
        assert_eq!(
            parse_positions("random:16").unwrap(),
            Positions::Random { count: 16 }
        );
        assert_eq!(parse_positions("all").unwrap(), Positions::All);
        for bad in ["every:0", "every", "sometimes:3", "random:x"] {
            assert!(parse_positions(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_layers("all", 30).unwrap(), LayerSet::all(30));
        let l: Vec<usize> = parse_layers("8-10,29", 30).unwrap().iter().collect();
        assert_eq!(l, vec![8, 9, 10, 29]);
        assert!(parse_layers("30", 30).is_err());
        assert!(parse_layers("5-3", 30).is_err());
        assert!(parse_layers("x", 30).is_err());
    }

    #[test]
    fn a_dataset_directory_is_named_a_directory() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().to_string_lossy().into_owned();
        let args = Cli::parse_from(["x", "--dataset", &spec, "--out", &spec]).args;
        let refused = |args: &Args| match corpus(args) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        let e = refused(&args);
        assert!(e.contains("is a directory") && e.contains(&spec), "{e}");
        let missing = dir.path().join("nope.jsonl").to_string_lossy().into_owned();
        let args = Cli::parse_from(["x", "--dataset", &missing, "--out", &spec]).args;
        assert!(refused(&args).contains("no such file"));
    }

    #[test]
    fn length_stats() {
        let s = LengthStats::of(&[1, 2, 3, 512, 512], 512);
        assert_eq!(s.p50, 3.0);
        assert_eq!(s.p90, 512.0);
        assert_eq!(s.max, 512);
        // numpy's linear quantile, not the nearest rank: halfway between 2 and 3.
        assert_eq!(LengthStats::of(&[4, 1, 3, 2], 512).p50, 2.5);
        assert!((s.share_at_cap - 0.4).abs() < 1e-12);
        assert!((s.mean - 206.0).abs() < 1e-12);
    }
}
