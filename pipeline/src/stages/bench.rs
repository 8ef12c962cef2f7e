//! `trail bench ...`: speed and memory benchmarks. Figures are ratios measured side by side.

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {}
}
