//! The engine options `trail serve`, `trail eval latency` and `trail sim trace` share, so the
//! simulator, the evaluation and the server are configured alike. Every number that sizes
//! memory is bounded here, with an error naming the flag.

use serde::Serialize;
use trail_serving_shim::{PreemptionMode, SchedulerConfig};

/// The largest KV or swap budget, in tokens (about 770 GB of SmolLM2 KV; the block table
/// alone is 4 MB).
pub const MAX_KV_TOKENS: usize = 1 << 24;

/// The largest batch.
pub const MAX_RUNNING: usize = 4096;

/// The largest prefill chunk, in tokens.
pub const MAX_PREFILL_CHUNK: usize = 1 << 16;

/// `--prefill-chunk`: a number of tokens, or `off` for whole prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillChunk {
    /// Whole prompts in one step.
    Off,
    /// At most this many prefill tokens per step.
    Tokens(usize),
}

impl PrefillChunk {
    /// The scheduler's `prefill_chunk`.
    pub fn tokens(self) -> Option<usize> {
        match self {
            Self::Off => None,
            Self::Tokens(n) => Some(n),
        }
    }
}

impl std::fmt::Display for PrefillChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Tokens(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for PrefillChunk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        let n = bounded(s, 1, MAX_PREFILL_CHUNK, "tokens")
            .map_err(|e| format!("{e}, or `off` for whole prompts"))?;
        Ok(Self::Tokens(n))
    }
}

/// `s` as a whole number in `min..=max` (of `unit`), or an error saying the range.
pub fn bounded(s: &str, min: usize, max: usize, unit: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("expected a whole number of {unit}"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("must be {min} to {max} {unit}"));
    }
    Ok(n)
}

fn kv_tokens(s: &str) -> Result<usize, String> {
    bounded(s, 16, MAX_KV_TOKENS, "tokens")
}

fn swap_tokens(s: &str) -> Result<usize, String> {
    bounded(s, 0, MAX_KV_TOKENS, "tokens")
}

fn running(s: &str) -> Result<usize, String> {
    bounded(s, 1, MAX_RUNNING, "requests")
}

/// Committed settings write the chunk as a number or null (whole prompts), as before `off`.
fn ser_chunk<S: serde::Serializer>(c: &Option<PrefillChunk>, s: S) -> Result<S::Ok, S::Error> {
    c.and_then(PrefillChunk::tokens).serialize(s)
}

/// The help heading of the engine options.
const HEADING: &str = "Engine";

/// `--max-running`, `--kv-budget-tokens`, `--prefill-chunk`, `--preemption`,
/// `--swap-budget-tokens`: listed under "Engine" in each subcommand's help, with that
/// subcommand's defaults (`serve` chunks prefill by 128, `eval latency` runs batch 8).
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize)]
pub struct EngineArgs {
    /// Most requests running at once (the batch), at most 4096.
    #[arg(long, help_heading = HEADING, default_value_t = 48, value_parser = running)]
    pub max_running: usize,
    /// KV-cache budget in tokens, accounted in blocks of 16; 16 to 16777216.
    #[arg(long, help_heading = HEADING, default_value_t = 16384, value_parser = kv_tokens)]
    pub kv_budget_tokens: usize,
    /// Most prefill tokens per step (chunked prefill, 1 to 65536), or `off` for whole prompts.
    /// Default: whole prompts, except `trail serve`, which chunks by 128 so one long prompt
    /// does not stall every stream (its help shows the default).
    #[arg(long, help_heading = HEADING)]
    #[serde(serialize_with = "ser_chunk")]
    pub prefill_chunk: Option<PrefillChunk>,
    /// What a preempted request's KV becomes: `swap` keeps it in a swap pool and resumes it
    /// without prefill (on a CPU the cache simply stays in RAM); `recompute` drops it and
    /// prefills prompt + generated again on re-admission (vLLM's default on GPUs; on a CPU a
    /// prefill token costs over half a decode row, so every preemption is expensive).
    #[arg(long, help_heading = HEADING, default_value = "swap")]
    pub preemption: PreemptionMode,
    /// Swap pool in tokens (default: as large as the KV budget; at most 16777216). A victim
    /// that does not fit is recomputed.
    #[arg(long, help_heading = HEADING, value_parser = swap_tokens)]
    pub swap_budget_tokens: Option<usize>,
}

impl EngineArgs {
    /// Swap pool in tokens.
    pub fn swap_tokens(&self) -> usize {
        self.swap_budget_tokens.unwrap_or(self.kv_budget_tokens)
    }

    /// These options with `chunk` as the prefill chunk when none was given (`trail serve`'s
    /// default).
    pub fn with_default_chunk(&self, chunk: PrefillChunk) -> Self {
        Self {
            prefill_chunk: Some(self.prefill_chunk.unwrap_or(chunk)),
            ..self.clone()
        }
    }

    /// The prefill chunk in tokens (`None`: whole prompts).
    pub fn chunk_tokens(&self) -> Option<usize> {
        self.prefill_chunk.and_then(PrefillChunk::tokens)
    }

    /// The scheduler settings: these options over `SchedulerConfig::new`'s defaults.
    pub fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_running: self.max_running,
            prefill_chunk: self.chunk_tokens(),
            preemption_mode: self.preemption,
            swap_budget_tokens: self.swap_tokens(),
            ..SchedulerConfig::new(self.kv_budget_tokens)
        }
    }

    /// The same options as `trail serve` arguments (for a child server). The prefill chunk is
    /// always passed (`off` for whole prompts), so the child never falls back to its own
    /// default.
    pub fn to_cli(&self) -> Vec<String> {
        vec![
            "--max-running".to_string(),
            self.max_running.to_string(),
            "--kv-budget-tokens".to_string(),
            self.kv_budget_tokens.to_string(),
            "--preemption".to_string(),
            self.preemption.to_string(),
            "--swap-budget-tokens".to_string(),
            self.swap_tokens().to_string(),
            "--prefill-chunk".to_string(),
            self.prefill_chunk.unwrap_or(PrefillChunk::Off).to_string(),
        ]
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "max running {}, KV budget {} tokens, prefill chunk {}, preemption by {}{}",
            self.max_running,
            self.kv_budget_tokens,
            self.chunk_tokens()
                .map_or("whole prompts".into(), |c| c.to_string()),
            self.preemption,
            match self.preemption {
                PreemptionMode::Swap => format!(" (swap pool {} tokens)", self.swap_tokens()),
                _ => String::new(),
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn cli_round_trips_and_fills_the_scheduler() {
        let a = Cli::parse_from([
            "x",
            "--max-running",
            "8",
            "--kv-budget-tokens",
            "4096",
            "--prefill-chunk",
            "64",
            "--preemption",
            "recompute",
        ])
        .engine;
        let back = Cli::parse_from(std::iter::once("x".to_string()).chain(a.to_cli())).engine;
        assert_eq!(back.scheduler(), a.scheduler());
        let s = a.scheduler();
        assert_eq!(
            (s.max_running, s.kv_budget_tokens, s.prefill_chunk),
            (8, 4096, Some(64))
        );
        assert_eq!(s.preemption_mode, PreemptionMode::Recompute);
        assert_eq!(s.swap_budget_tokens, 4096);
        let d = Cli::parse_from(["x"]).engine;
        assert_eq!(d.preemption, PreemptionMode::Swap);
        assert!(Cli::try_parse_from(["x", "--preemption", "keep"]).is_err());
        // Whole prompts have a spelling, and the child gets it.
        let off = Cli::parse_from(["x", "--prefill-chunk", "off"]).engine;
        assert_eq!(off.scheduler().prefill_chunk, None);
        assert_eq!(d.scheduler(), off.scheduler());
        assert!(
            d.to_cli()
                .windows(2)
                .any(|w| w == ["--prefill-chunk", "off"])
        );
        let back = Cli::parse_from(std::iter::once("x".to_string()).chain(d.to_cli())).engine;
        assert_eq!(
            back.with_default_chunk(PrefillChunk::Tokens(128))
                .scheduler(),
            d.scheduler()
        );
        // serve's default applies only where nothing was said.
        assert_eq!(
            d.with_default_chunk(PrefillChunk::Tokens(128))
                .chunk_tokens(),
            Some(128)
        );
        assert_eq!(
            off.with_default_chunk(PrefillChunk::Tokens(128))
                .chunk_tokens(),
            None
        );
        // Settings files keep writing a number or null.
        let v = serde_json::to_value(&off).unwrap();
        assert_eq!(v["prefill_chunk"], serde_json::Value::Null);
        assert_eq!(serde_json::to_value(&a).unwrap()["prefill_chunk"], 64);
    }

    #[test]
    fn numbers_that_size_memory_are_bounded_and_the_error_names_the_flag() {
        for (flag, value) in [
            ("--kv-budget-tokens", "100000000000"),
            ("--swap-budget-tokens", "18446744073709551615"),
            ("--max-running", "0"),
            ("--max-running", "1000000"),
            ("--prefill-chunk", "0"),
            ("--prefill-chunk", "4000000000"),
            ("--prefill-chunk", "whole"),
        ] {
            let e = Cli::try_parse_from(["x", flag, value])
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains(flag), "{flag} {value}: {e}");
        }
        assert!(Cli::try_parse_from(["x", "--kv-budget-tokens", "16777216"]).is_ok());
    }
}
