//! `trail eval ...`: evaluations of the trained predictors and of the schedulers they drive.

pub mod latency;
pub mod mae;

/// The evaluations.
#[derive(Debug, clap::Subcommand)]
pub enum Eval {
    /// End-to-end scheduling latency on the real engine: policies side by side under seeded
    /// Poisson load (results.parquet, summary.json, report.md, plots, manifest).
    ///
    /// Engine defaults (the reference grid's, reports/latency-smollm2/): --backend virtual,
    /// --max-running 8, --kv-budget-tokens 16384, --prefill-chunk off (whole prompts),
    /// --preemption swap. `trail serve` and `trail sim trace` share these flags with other
    /// defaults (see their --help).
    Latency(Box<latency::Args>),
    /// Trained predictors (`--models`) or an exported checkpoint (`--checkpoint`) scored on
    /// another generated run (`--run`) with `trail report`'s metrics (metrics.json, report.md,
    /// manifest).
    Mae(mae::Args),
}

pub fn run(eval: Eval) -> anyhow::Result<()> {
    match eval {
        Eval::Latency(args) => latency::run(*args),
        Eval::Mae(args) => mae::run(args),
    }
}
