//! `trail eval latency`: end-to-end scheduling evaluation, policies side by side.

use std::path::PathBuf;

use crate::stages::model_args::ModelArgs;

/// Arguments of `trail eval latency`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The exported predictor (`trail export`); needed by `trail` and `sprpt`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The exported BERT predictor; needed by `sjf-bert`.
    #[arg(long)]
    pub bert_checkpoint: Option<PathBuf>,
    /// A generated run: prompts from its test split, profiled output lengths from its
    /// requests.parquet.
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated policies, or `all`.
    #[arg(long, default_value = "fcfs,trail")]
    pub policies: String,
    /// Loads as fractions of the measured saturation throughput.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.8,0.95")]
    pub loads: Vec<f64>,
    /// Requests per (policy, load, seed).
    #[arg(long, default_value_t = 150)]
    pub requests: usize,
    /// Seeds of the arrival processes (and of the prompt samples).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 48)]
    pub max_running: usize,
    /// KV-cache budget in tokens, accounted in blocks of 16.
    #[arg(long, default_value_t = 16384)]
    pub kv_budget_tokens: usize,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("trail eval latency: under construction (this commit only registers the stage)")
}
