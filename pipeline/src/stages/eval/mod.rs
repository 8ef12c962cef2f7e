//! `trail eval ...`: evaluations of the trained predictors and of the schedulers they drive.

pub mod latency;

/// The evaluations.
#[derive(Debug, clap::Subcommand)]
pub enum Eval {
    /// End-to-end scheduling latency on the real engine: policies side by side under seeded
    /// Poisson load (results.parquet, summary.json, report.md, plots, manifest).
    Latency(latency::Args),
}

pub fn run(eval: Eval) -> anyhow::Result<()> {
    match eval {
        Eval::Latency(args) => latency::run(args),
    }
}
