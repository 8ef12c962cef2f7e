//! The `trail` command line: [`Cli`] (clap), [`run`] over the subcommands of `stages/`, and
//! [`exit_status`], the whole of the binary's main (uv's `uv::main`): the status is 0 on
//! success, 1 for a failure while running (a missing input file, a dead engine), and 2 for a
//! usage error (clap's: an unknown flag, a bad value). `--help` and `--version` exit 0.

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use crate::stages;

/// Train, evaluate and serve TRAIL-style output-length predictors for LLM scheduling.
#[derive(Debug, Parser)]
#[command(name = "trail", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job on the embedded defaults (fetches what it needs).
    Run(stages::run::Args),
    /// Fetch the default model (and other assets) into the cache.
    Fetch(stages::fetch::Args),
    /// Chat with the target model, streaming the answer and printing tok/s.
    Chat(stages::chat::Args),
    /// Run the model over a corpus: outputs, lengths and per-layer embeddings as parquet.
    Generate(stages::generate::Args),
    /// Serve the model over HTTP (OpenAI-compatible) with a pluggable scheduler.
    ///
    /// Engine defaults: --max-running 48, --kv-budget-tokens 16384, --prefill-chunk 128,
    /// --preemption swap. `trail eval latency` and `trail sim trace` share these flags with
    /// other defaults (see their --help).
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
    /// Rewrite records an earlier trail wrote (schema-1 summary.json / metrics.json, absolute
    /// paths) in today's schema, values unchanged.
    Upgrade(stages::upgrade::Args),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => stages::run::run(args),
        Command::Upgrade(args) => stages::upgrade::run(args),
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

/// Parses `args` (the program name first), runs the command and returns the exit status,
/// printing an error to stderr.
pub fn exit_status<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return u8::try_from(e.exit_code()).unwrap_or(2);
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::stages::engine_args::PrefillChunk;
    use crate::stages::eval::Eval;
    use crate::stages::eval::latency::BackendKind;

    fn parse(argv: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("trail").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    #[test]
    fn old_spellings_parse_as_hidden_aliases_of_the_new() {
        for (new, old) in [
            (
                &[
                    "generate",
                    "--out",
                    "o",
                    "--batch-size",
                    "4",
                    "--max-tokens",
                    "9",
                ][..],
                &[
                    "generate",
                    "--out",
                    "o",
                    "--batch",
                    "4",
                    "--max-new-tokens",
                    "9",
                ][..],
            ),
            (
                &["chat", "hi", "--max-tokens", "9"],
                &["chat", "hi", "--max-new-tokens", "9"],
            ),
            (
                &["predict", "--checkpoint", "c", "hi", "--max-tokens", "9"],
                &[
                    "predict",
                    "--checkpoint",
                    "c",
                    "hi",
                    "--max-new-tokens",
                    "9",
                ],
            ),
            (
                &[
                    "bench",
                    "generate",
                    "--batch-size",
                    "4",
                    "--max-tokens",
                    "9",
                ],
                &["bench", "generate", "--batch", "4", "--max-new-tokens", "9"],
            ),
            (
                &[
                    "bench",
                    "serve",
                    "--batch-size",
                    "4",
                    "--max-tokens",
                    "9",
                    "--policies",
                    "fcfs",
                ],
                &[
                    "bench",
                    "serve",
                    "--batch",
                    "4",
                    "--max-new",
                    "9",
                    "--policy",
                    "fcfs",
                ],
            ),
            (
                &[
                    "sim",
                    "trace",
                    "--steps",
                    "s",
                    "--out",
                    "o",
                    "--policies",
                    "fcfs",
                    "--run",
                    "r",
                ],
                &[
                    "sim", "trace", "--steps", "s", "--out", "o", "--policy", "fcfs", "--data", "r",
                ],
            ),
            (
                &[
                    "eval",
                    "mae",
                    "--models",
                    "m",
                    "--run",
                    "r",
                    "--out",
                    "o",
                    "--refine-every",
                    "4",
                ],
                &[
                    "eval",
                    "mae",
                    "--models",
                    "m",
                    "--data",
                    "r",
                    "--out",
                    "o",
                    "--refine-interval",
                    "4",
                ],
            ),
            (
                &["report", "--run", "r", "--refine-every", "4"],
                &["report", "--run", "r", "--refine-interval", "4"],
            ),
            (
                &["export", "--run", "r", "--out", "o", "--refine-every", "4"],
                &[
                    "export",
                    "--run",
                    "r",
                    "--out",
                    "o",
                    "--refine-interval",
                    "4",
                ],
            ),
        ] {
            assert_eq!(
                format!("{:?}", parse(new)),
                format!("{:?}", parse(old)),
                "{old:?}"
            );
        }
        let latency = |argv: &[&str]| match parse(argv).command {
            Command::Eval(Eval::Latency(a)) => a,
            c => panic!("{c:?}"),
        };
        let new = latency(&[
            "eval",
            "latency",
            "--run",
            "r",
            "--out",
            "o",
            "--no-ignore-eos",
        ]);
        let old = latency(&[
            "eval",
            "latency",
            "--data",
            "r",
            "--out",
            "o",
            "--ignore-eos",
            "false",
        ]);
        assert_eq!(
            (new.data.clone(), new.ignore_eos()),
            (old.data.clone(), old.ignore_eos())
        );
        assert!(!new.ignore_eos());
        let serve = |argv: &[&str]| match parse(argv).command {
            Command::Serve(a) => a.socket_addr().unwrap(),
            c => panic!("{c:?}"),
        };
        assert_eq!(
            serve(&["serve", "--host", "0.0.0.0", "--port", "9"]),
            serve(&["serve", "--addr", "0.0.0.0:9"])
        );
        assert!(
            Cli::try_parse_from(["trail", "serve", "--addr", "0.0.0.0:9", "--port", "8"]).is_err()
        );
    }

    #[test]
    fn help_shows_the_new_names_and_each_subcommands_engine_defaults() {
        let mut cmd = Cli::command();
        let help = |cmd: &mut clap::Command, path: &[&str]| {
            let mut c = cmd.clone();
            for p in path {
                c = c.find_subcommand(p).unwrap().clone();
            }
            c.render_long_help().to_string()
        };
        let serve = help(&mut cmd, &["serve"]);
        for want in [
            "--host",
            "--port",
            "--served-model-name",
            "--api-key",
            "[default: 128]",
        ] {
            assert!(serve.contains(want), "serve --help lacks {want}");
        }
        assert!(!serve.contains("--addr"), "a hidden alias is not listed");
        let latency = help(&mut cmd, &["eval", "latency"]);
        assert!(latency.contains("--run <DIR>"), "{latency}");
        assert!(latency.contains("Engine:"));
        assert!(latency.contains("--no-ignore-eos"));
        assert!(!latency.contains("--data") && !latency.contains("--ignore-eos "));
        assert!(latency.contains("[default: virtual]"));
        let model = help(&mut cmd, &["chat"]);
        assert!(model.contains("CPU-only in this build"), "{model}");
    }

    #[test]
    fn eval_latency_defaults_to_the_reference_grid_and_serve_chunks_prefill() {
        let Command::Eval(Eval::Latency(a)) =
            parse(&["eval", "latency", "--run", "r", "--out", "o"]).command
        else {
            unreachable!()
        };
        assert_eq!((a.backend, a.engine.max_running), (BackendKind::Virtual, 8));
        assert!(a.ignore_eos());
        let Command::Serve(s) = parse(&["serve"]).command else {
            unreachable!()
        };
        assert_eq!(s.engine.max_running, 48);
        assert_eq!(s.engine.prefill_chunk, Some(PrefillChunk::Tokens(128)));
        assert_eq!(s.socket_addr().unwrap(), "127.0.0.1:8000".parse().unwrap());
        let Command::Sim(sim) = parse(&["sim", "trace", "--steps", "s", "--out", "o"]).command
        else {
            unreachable!()
        };
        let crate::stages::sim::SimCommand::Trace(t) = sim.command else {
            unreachable!()
        };
        assert_eq!((t.engine.max_running, t.engine.prefill_chunk), (48, None));
    }

    #[test]
    fn a_usage_error_exits_2_and_a_failure_while_running_exits_1() {
        assert_eq!(exit_status(["trail", "serve", "--no-such-flag"]), 2);
        assert_eq!(exit_status(["trail", "serve", "--port", "many"]), 2);
        assert_eq!(exit_status(["trail", "--version"]), 0);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.parquet");
        let status = exit_status([
            "trail".as_ref(),
            "sim".as_ref(),
            "trace".as_ref(),
            "--steps".as_ref(),
            missing.as_os_str(),
            "--out".as_ref(),
            dir.path().as_os_str(),
        ]);
        assert_eq!(status, 1);
    }
}
