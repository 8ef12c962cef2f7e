//! `trail bench generate --kv-compare`: the generate stage with the f16 KV cache (the default)
//! against the f32 one (the numerics before issue 23), interleaved in one run on one loaded
//! model over the same planned prompts.
//!
//! Greedy lengths differ between numerics, so free-running outputs would compare unlike work.
//! Each prompt's length is fixed first: by one free greedy pass of the bare runner with the f16
//! cache (its tokens and time are the report's bare-runner figures), or by an earlier run's
//! `requests.parquet` (`--lengths-from`, matched by request id, capped at `--max-tokens`; the
//! bare pass then runs at those lengths). Every round then runs the full stage path
//! ([`generate::write`]) with every job at its fixed length, stop tokens ignored
//! ([`Job::stop_at`](trail_llm::batch::Job::stop_at)), and checks that each request generated
//! exactly its length. Rounds come in pairs, the order alternating (f16 f32, f32 f16, …) so a
//! drift in the machine's speed falls on both; each pair gives the ratio f16 ÷ f32 in tok/s,
//! and the median of those ratios is held against [`GOAL_RATIO`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use trail_datasets::{schema, store};
use trail_llm::KvFormat;

use super::super::median;
use crate::stages::generate::{self, Prepared};

/// The f16 cache's stage tok/s over the f32 cache's that issue 23 asks for.
pub const GOAL_RATIO: f64 = 1.3;

/// One round: the stage path with one KV cache format.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// The pair it belongs to (from 0).
    pub pair: usize,
    pub kv_cache: String,
    pub kernel_id: String,
    pub secs: f64,
    pub tok_s: f64,
    pub generated_tokens: u64,
}

/// One pair of rounds, one per format.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub pair: usize,
    /// The formats in the order they ran, e.g. `f16 f32`.
    pub order: String,
    pub f16_tok_s: f64,
    pub f32_tok_s: f64,
    /// f16 ÷ f32 tok/s.
    pub ratio: f64,
}

/// The comparison's part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Where the per-prompt lengths came from.
    pub lengths_from: String,
    /// Tokens generated per round (the sum of the fixed lengths), the same for every round.
    pub tokens_per_round: u64,
    pub rounds: Vec<Round>,
    pub pairs: Vec<Pair>,
    /// Medians over the rounds of each format.
    pub f16_secs: f64,
    pub f16_tok_s: f64,
    pub f32_secs: f64,
    pub f32_tok_s: f64,
    /// Median, least and greatest of the pairs' ratios.
    pub ratio_median: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub goal_ratio: f64,
    /// Whether the median ratio reaches the goal.
    pub goal_met: bool,
}

/// What the comparison measured, for the whole report.
pub(super) struct Measured {
    /// The bare-runner pass (f16 cache): seconds and tokens.
    pub bare_secs: f64,
    pub tokens: u64,
    /// The f16 rounds: seconds and bytes written.
    pub f16_stage: Vec<(f64, u64)>,
    /// The last f16 round's run directory.
    pub f16_out: PathBuf,
    pub comparison: Comparison,
}

/// Runs the comparison: lengths, bare pass, then `repeats` pairs of stage rounds under `dir`.
/// Leaves `prep`'s runner in the f16 format (that of the report's stage figures) and its jobs
/// at their fixed lengths.
pub(super) fn measure(
    args: &super::Args,
    stage_args: &mut generate::Args,
    prep: &mut Prepared,
    dir: &Path,
    say: &dyn Fn(String),
) -> anyhow::Result<Measured> {
    prep.runner.set_kv_format(KvFormat::F16);
    let (bare_secs, lengths, lengths_from) = fix_lengths(args, stage_args, prep)?;
    let tokens: u64 = lengths.iter().map(|&l| l as u64).sum();
    say(format!(
        "lengths fixed by {lengths_from}: {tokens} tokens per round; bare runner (f16) \
         {bare_secs:.1} s"
    ));
    prep.fixed_lengths = Some(lengths);

    let mut rounds = Vec::with_capacity(2 * args.repeats);
    let mut f16_stage = Vec::with_capacity(args.repeats);
    for pair in 0..args.repeats {
        for kv in order(pair) {
            prep.runner.set_kv_format(kv);
            stage_args.out = dir.join(format!("kv-{pair}-{kv}"));
            let t = Instant::now();
            let summary = generate::write(stage_args, prep)?;
            let secs = t.elapsed().as_secs_f64();
            check_lengths(&stage_args.out, prep, kv)?;
            anyhow::ensure!(
                summary.generated_tokens == tokens,
                "pair {pair}: the {kv} cache generated {} tokens, the fixed lengths sum to \
                 {tokens}",
                summary.generated_tokens
            );
            say(format!(
                "pair {pair}: {kv} cache, stage {tokens} tokens in {secs:.1} s"
            ));
            if kv == KvFormat::F16 {
                f16_stage.push((secs, summary.bytes));
            }
            rounds.push(Round {
                pair,
                kv_cache: kv.to_string(),
                kernel_id: prep.runner.kernel_id().to_string(),
                secs,
                tok_s: tokens as f64 / secs,
                generated_tokens: summary.generated_tokens,
            });
        }
    }
    prep.runner.set_kv_format(KvFormat::F16);
    let f16_out = dir.join(format!("kv-{}-f16", args.repeats - 1));
    Ok(Measured {
        bare_secs,
        tokens,
        f16_stage,
        f16_out,
        comparison: summarize(lengths_from, tokens, rounds),
    })
}

/// The formats of pair `pair`, in the order they run.
fn order(pair: usize) -> [KvFormat; 2] {
    if pair.is_multiple_of(2) {
        [KvFormat::F16, KvFormat::F32]
    } else {
        [KvFormat::F32, KvFormat::F16]
    }
}

/// Runs the bare pass (f16 cache, nothing captured) and returns its seconds, the per-request
/// lengths (in request order) and where they came from: the pass itself, free-running, or
/// `--lengths-from`, the pass then running at those lengths and checked to generate them.
fn fix_lengths(
    args: &super::Args,
    stage_args: &generate::Args,
    prep: &mut Prepared,
) -> anyhow::Result<(f64, Vec<usize>, String)> {
    let given = match &args.lengths_from {
        Some(run) => Some(read_lengths(run, prep, args.max_new_tokens)?),
        None => None,
    };
    prep.fixed_lengths = given.clone();
    let (secs, lengths) = super::bare_pass(args, stage_args, prep)?;
    let from = match (&args.lengths_from, given) {
        (Some(run), Some(given)) => {
            anyhow::ensure!(
                lengths == given,
                "the bare runner did not generate the lengths read from {}",
                run.display()
            );
            super::super::shown_path(&schema::requests_path(run), args.out.as_deref())
        }
        _ => "a free greedy pass (f16 cache, bare runner)".to_string(),
    };
    Ok((secs, lengths, from))
}

/// Each planned request's `output_tokens` in `run`'s `requests.parquet`, capped at `cap`.
fn read_lengths(run: &Path, prep: &Prepared, cap: usize) -> anyhow::Result<Vec<usize>> {
    let path = schema::requests_path(run);
    let rows = store::read_requests(&path)
        .with_context(|| format!("--lengths-from: reading {}", path.display()))?;
    let by_id: HashMap<&str, u32> = rows
        .iter()
        .map(|r| (r.request_id.as_str(), r.output_tokens))
        .collect();
    prep.requests
        .iter()
        .map(|(r, _)| match by_id.get(r.request_id.as_str()) {
            Some(&l) if l > 0 => Ok((l as usize).min(cap)),
            Some(_) => anyhow::bail!("{}: request {} has no output", path.display(), r.request_id),
            None => anyhow::bail!(
                "{}: no request {} (plan the same requests: --dataset, --prompts, --seed)",
                path.display(),
                r.request_id
            ),
        })
        .collect()
}

/// Checks that every request of the run in `out` generated its fixed length.
fn check_lengths(out: &Path, prep: &Prepared, kv: KvFormat) -> anyhow::Result<()> {
    let rows = store::read_requests(&schema::requests_path(out))?;
    let fixed = prep.fixed_lengths.as_deref().unwrap_or_default();
    anyhow::ensure!(
        rows.len() == prep.requests.len(),
        "the {kv} run wrote {} requests of {}",
        rows.len(),
        prep.requests.len()
    );
    for ((row, (req, _)), &want) in rows.iter().zip(&prep.requests).zip(fixed) {
        anyhow::ensure!(
            row.request_id == req.request_id && row.output_tokens as usize == want,
            "the {kv} cache generated {} tokens for {} (request {}), its fixed length is {want}",
            row.output_tokens,
            row.request_id,
            req.request_id
        );
    }
    Ok(())
}

/// Pairs the rounds and takes the medians.
fn summarize(lengths_from: String, tokens: u64, rounds: Vec<Round>) -> Comparison {
    let of = |kv: &str| -> Vec<&Round> { rounds.iter().filter(|r| r.kv_cache == kv).collect() };
    let (f16, f32) = (of("f16"), of("f32"));
    let pairs: Vec<Pair> = f16
        .iter()
        .zip(&f32)
        .map(|(a, b)| Pair {
            pair: a.pair,
            order: order(a.pair).map(|k| k.name()).join(" "),
            f16_tok_s: a.tok_s,
            f32_tok_s: b.tok_s,
            ratio: a.tok_s / b.tok_s,
        })
        .collect();
    let ratios: Vec<f64> = pairs.iter().map(|p| p.ratio).collect();
    let secs = |rs: &[&Round]| median(rs.iter().map(|r| r.secs).collect());
    let (f16_secs, f32_secs) = (secs(&f16), secs(&f32));
    let ratio_median = median(ratios.clone());
    Comparison {
        lengths_from,
        tokens_per_round: tokens,
        f16_secs,
        f16_tok_s: tokens as f64 / f16_secs,
        f32_secs,
        f32_tok_s: tokens as f64 / f32_secs,
        ratio_median,
        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        goal_ratio: GOAL_RATIO,
        goal_met: ratio_median >= GOAL_RATIO,
        pairs,
        rounds,
    }
}

/// The comparison's section of the markdown report.
pub fn markdown(c: &Comparison, s: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "\n## f16 vs f32 KV cache, interleaved\n\nThe stage path with each cache, every job at \
         a fixed length (stop tokens ignored) from {}: {} tokens per round; {} pairs, the order \
         alternating.\n",
        c.lengths_from,
        c.tokens_per_round,
        c.pairs.len()
    );
    for kv in [KvFormat::F16, KvFormat::F32] {
        if let Some(r) = c.rounds.iter().find(|r| r.kv_cache == kv.name()) {
            let _ = writeln!(s, "- {kv}: kernel_id `{}`", r.kernel_id);
        }
    }
    let _ = writeln!(s, "\n| pair | cache | seconds | tok/s |");
    let _ = writeln!(s, "|---|---|---|---|");
    for r in &c.rounds {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} |",
            r.pair, r.kv_cache, r.secs, r.tok_s
        );
    }
    let _ = writeln!(s, "\n| pair | order | f16 tok/s | f32 tok/s | f16 ÷ f32 |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for p in &c.pairs {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.2}× |",
            p.pair, p.order, p.f16_tok_s, p.f32_tok_s, p.ratio
        );
    }
    let verdict = if c.goal_met { "met" } else { "not met" };
    let _ = writeln!(
        s,
        "\nf16 ÷ f32: median {:.2}× [{:.2}, {:.2}] over {} pairs (medians {:.1} vs {:.1} tok/s): \
         the {:.1}× goal is {verdict}.",
        c.ratio_median,
        c.ratio_min,
        c.ratio_max,
        c.pairs.len(),
        c.f16_tok_s,
        c.f32_tok_s,
        c.goal_ratio
    );
}
