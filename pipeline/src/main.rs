//! `trail`: the staged command-line tool.
//!
//! A thin main in the style of ripgrep and uv: parse the arguments, call [`run`], map the
//! result to an exit code. Every subcommand lives in its own file under `stages/`, exposing a
//! `clap::Args` struct and a `run(args) -> anyhow::Result<()>`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trail_pipeline::stages;

/// Train, evaluate and serve TRAIL-style output-length predictors for LLM scheduling.
#[derive(Debug, Parser)]
#[command(name = "trail", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job on the embedded defaults (fetches what it needs).
    Run(stages::run::Args),
    /// Fetch the default model (and other assets) into the cache.
    Fetch(stages::fetch::Args),
    /// Chat with the target model, streaming the answer and printing tok/s.
    Chat(stages::chat::Args),
    /// Run the model over a corpus: outputs, lengths and per-layer embeddings as parquet.
    Generate(stages::generate::Args),
    /// Serve the model over HTTP (OpenAI-compatible) with a pluggable scheduler.
    Serve(stages::serve::Args),
    /// Benchmarks (runner, generate, serve).
    #[command(subcommand)]
    Bench(stages::bench::Bench),
    /// Queueing theory and simulation of size-based scheduling.
    Sim(stages::sim::Args),
    /// Train every length predictor of a generated run (probes per layer, BERT baselines).
    Train(stages::train::Args),
    /// Score the trained predictors on the test split: metrics.json, report.md, plots.
    Report(stages::report::Args),
    /// Export the selected probe (and optionally the fine-tuned BERT) as safetensors.
    Export(stages::export::Args),
    /// Answer a prompt and print the exported predictor's remaining-length estimate as it goes.
    Predict(stages::predict::Args),
    /// Evaluations (scheduling latency on the real engine, predictor error).
    #[command(subcommand)]
    Eval(stages::eval::Eval),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => stages::run::run(args),
        Command::Fetch(args) => stages::fetch::run(args),
        Command::Chat(args) => stages::chat::run(args),
        Command::Generate(args) => stages::generate::run(args),
        Command::Serve(args) => stages::serve::run(args),
        Command::Bench(bench) => stages::bench::run(bench),
        Command::Sim(args) => stages::sim::run(args),
        Command::Train(args) => stages::train::run(args),
        Command::Report(args) => stages::report::run(args),
        Command::Export(args) => stages::export::run(args),
        Command::Predict(args) => stages::predict::run(args),
        Command::Eval(eval) => stages::eval::run(eval),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRAIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
