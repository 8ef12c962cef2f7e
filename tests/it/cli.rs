//! The `trail` command line's exit status, from a real process (this test binary started again
//! on the ignored test [`child_trail`], which runs the binary's main, [`cli::exit_status`], and
//! exits with its status): 2 for a usage error (an unknown flag, a bad value), 1 for a failure
//! while running (a missing input file), 0 for `--help`.

use std::process::Command;

use trail_pipeline::cli;

const CHILD_ENV: &str = "TRAIL_IT_CLI_ARGS";

/// Not a test on its own: the `trail` process the test below starts. Without its environment
/// variable it has nothing to run.
#[test]
#[ignore = "the child process of the exit-status test"]
fn child_trail() {
    let Ok(argv) = std::env::var(CHILD_ENV) else {
        return;
    };
    let argv: Vec<String> = serde_json::from_str(&argv).unwrap();
    let status = cli::exit_status(std::iter::once("trail".to_string()).chain(argv));
    std::process::exit(i32::from(status));
}

/// `trail ARGV...` in a child process: its exit code and stderr.
fn trail(argv: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cli::child_trail", "--ignored", "--nocapture"])
        .env(CHILD_ENV, serde_json::to_string(argv).unwrap())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_2_and_failures_while_running_exit_1() {
    let (code, err) = trail(&["serve", "--no-such-flag"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
    let (code, err) = trail(&[
        "eval",
        "latency",
        "--run",
        "r",
        "--out",
        "o",
        "--backend",
        "gpu",
    ]);
    assert_eq!(code, Some(2), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.parquet");
    let out = dir.path().join("out");
    let (code, err) = trail(&[
        "sim",
        "trace",
        "--steps",
        &missing.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.parquet"), "{err}");

    let (code, _) = trail(&["serve", "--help"]);
    assert_eq!(code, Some(0));
}
