//! The engine options `trail serve`, `trail eval latency` and `trail sim trace` share, so the
//! simulator, the evaluation and the server are configured alike.

use serde::Serialize;
use trail_serving_shim::{PreemptionMode, SchedulerConfig};

/// `--max-running`, `--kv-budget-tokens`, `--prefill-chunk`, `--preemption`,
/// `--swap-budget-tokens`.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize)]
pub struct EngineArgs {
    /// Most requests running at once (the batch).
    #[arg(long, default_value_t = 48)]
    pub max_running: usize,
    /// KV-cache budget in tokens, accounted in blocks of 16.
    #[arg(long, default_value_t = 16384)]
    pub kv_budget_tokens: usize,
    /// Most prefill tokens per step (chunked prefill); default: whole prompts.
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// What a preempted request's KV becomes: `swap` keeps it in a swap pool and resumes it
    /// without prefill (on a CPU the cache simply stays in RAM); `recompute` drops it and
    /// prefills prompt + generated again on re-admission (vLLM's default on GPUs; on a CPU a
    /// prefill token costs over half a decode row, so every preemption is expensive).
    #[arg(long, default_value = "swap")]
    pub preemption: PreemptionMode,
    /// Swap pool in tokens (default: as large as the KV budget). A victim that does not fit
    /// is recomputed.
    #[arg(long)]
    pub swap_budget_tokens: Option<usize>,
}

impl EngineArgs {
    /// Swap pool in tokens.
    pub fn swap_tokens(&self) -> usize {
        self.swap_budget_tokens.unwrap_or(self.kv_budget_tokens)
    }

    /// The scheduler settings: these options over `SchedulerConfig::new`'s defaults.
    pub fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_running: self.max_running,
            prefill_chunk: self.prefill_chunk,
            preemption_mode: self.preemption,
            swap_budget_tokens: self.swap_tokens(),
            ..SchedulerConfig::new(self.kv_budget_tokens)
        }
    }

    /// The same options as `trail serve` arguments (for a child server).
    pub fn to_cli(&self) -> Vec<String> {
        let mut v = vec![
            "--max-running".to_string(),
            self.max_running.to_string(),
            "--kv-budget-tokens".to_string(),
            self.kv_budget_tokens.to_string(),
            "--preemption".to_string(),
            self.preemption.to_string(),
            "--swap-budget-tokens".to_string(),
            self.swap_tokens().to_string(),
        ];
        if let Some(n) = self.prefill_chunk {
            v.extend(["--prefill-chunk".to_string(), n.to_string()]);
        }
        v
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "max running {}, KV budget {} tokens, prefill chunk {}, preemption by {}{}",
            self.max_running,
            self.kv_budget_tokens,
            self.prefill_chunk
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
    }
}
