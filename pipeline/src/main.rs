//! `trail`: the staged command-line tool.
//!
//! A thin main in the style of ripgrep and uv: set up logging, then [`cli::exit_status`]
//! parses the arguments, runs the subcommand and maps the result to the exit status (0, 1 for a
//! failure while running, 2 for a usage error). Every subcommand lives in its own file under
//! `stages/`, exposing a `clap::Args` struct and a `run(args) -> anyhow::Result<()>`.

use std::process::ExitCode;

use trail_pipeline::cli;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRAIL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    ExitCode::from(cli::exit_status(std::env::args_os()))
}
