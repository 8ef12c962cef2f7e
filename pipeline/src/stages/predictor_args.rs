//! The predictor options `trail serve`, `trail eval latency` and `trail bench serve` share, so
//! the three run the predictor alike and bound its flags alike:
//! - [`PredictorArgs`]: the TRAIL predictor in the engine's loop (all three);
//! - [`RankingArgs`]: what the length-aware policies rank and preempt by besides it (`serve`
//!   and `eval latency`).

use std::path::PathBuf;

use serde::Serialize;
use trail_checkpoints::MAX_REFINE_INTERVAL;

/// `--checkpoint`, `--refine-every`.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize)]
pub struct PredictorArgs {
    /// The exported predictor (`trail export`); needed by `trail` and `sprpt`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Refresh the refined prediction every N tokens, 1 to 65536 (default: the checkpoint's
    /// interval).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REFINE_INTERVAL)))]
    pub refine_every: Option<u32>,
}

/// `--bert-checkpoint`, `--c`.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize)]
pub struct RankingArgs {
    /// The fine-tuned BERT (`bert.safetensors` of `trail export --bert`): predicts each
    /// request's length from its prompt before admission; `sjf-bert` orders waiting requests by
    /// it, and so do `sprpt` and `trail` (their only prediction for a request that has not been
    /// prefilled yet).
    #[arg(long)]
    pub bert_checkpoint: Option<PathBuf>,
    /// TRAIL's limit: preemptible only while generated ≤ c × the initial prediction.
    #[arg(long, default_value_t = 0.8)]
    pub c: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        predictor: PredictorArgs,
        #[command(flatten)]
        ranking: RankingArgs,
    }

    #[test]
    fn the_refresh_interval_is_bounded_and_the_error_names_the_flag() {
        for bad in ["0", "65537", "many"] {
            let e = Cli::try_parse_from(["x", "--refine-every", bad])
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("--refine-every"), "{bad}: {e}");
        }
        for ok in [1, 65536] {
            let cli = Cli::parse_from(["x", "--refine-every", &ok.to_string()]);
            assert_eq!(cli.predictor.refine_every, Some(ok));
        }
        let d = Cli::parse_from(["x"]);
        assert_eq!(
            (d.predictor.checkpoint, d.predictor.refine_every),
            (None, None)
        );
        assert_eq!((d.ranking.bert_checkpoint, d.ranking.c), (None, 0.8));
    }
}
