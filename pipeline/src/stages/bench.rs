//! `trail bench ...`: speed and memory benchmarks. Figures are measured side by side in one
//! run and reported as ratios; targets live here, never in timed tests.

pub mod generate;
pub mod llama_cpp;
pub mod runner;
pub mod serve;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// The runner: prefill and batched decode tok/s with no layer and every layer captured,
    /// peak RSS, a step-time table; optionally against llama.cpp on the same GGUF.
    Runner(runner::Args),
    /// The generate stage (every layer captured, parquet written) against the bare runner at
    /// the same batch on the same prompts: tok/s, ratio, bytes per stored embedding row.
    Generate(generate::Args),
    /// The serving engine (in-process, per policy, predictor in the loop) against the bare
    /// runner's batch generator at the same batch: tok/s, ratio, predictor share of step time.
    Serve(serve::Args),
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Runner(args) => runner::run(args),
        Bench::Generate(args) => generate::run(args),
        Bench::Serve(args) => serve::run(args),
    }
}

/// Prints a benchmark's report (markdown, or JSON with `json`) and, with `out`, writes
/// `NAME.json` and `NAME.md` there atomically.
pub fn emit<R: serde::Serialize>(
    name: &str,
    report: &R,
    md: &str,
    json: bool,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{md}");
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut value = serde_json::to_value(report)?;
        trail_fs::portable_json(&mut value, dir);
        crate::manifest::write_atomic(
            &dir.join(format!("{name}.json")),
            &serde_json::to_vec_pretty(&value)?,
        )?;
        crate::manifest::write_atomic(&dir.join(format!("{name}.md")), md.as_bytes())?;
    }
    Ok(())
}

/// A path as a bench report shows it: `$TRAIL_HOME/…` in the cache, else relative to `--out`
/// (or the working directory), never this machine's absolute path.
pub fn shown_path(path: &std::path::Path, out: Option<&std::path::Path>) -> String {
    trail_fs::portable_path(path, out.unwrap_or(std::path::Path::new(".")))
}

/// Peak resident set size of this process in MiB (`VmHWM`), where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets this process's peak resident set size to its current one (Linux ≥ 4.0: `5` written to
/// `/proc/self/clear_refs`), so the next [`peak_rss_mib`] is the peak since now. False where
/// the OS does not allow it.
pub fn reset_peak_rss() -> bool {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

/// The CPU's model name, where the OS reports it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Median of a non-empty sample (`trail_stats::median`, numpy's `quantile(x, 0.5)`).
pub fn median(xs: Vec<f64>) -> f64 {
    trail_stats::median(&xs).expect("a non-empty sample")
}
