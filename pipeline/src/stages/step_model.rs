//! A step-time model from a file, as `trail sim trace --steps` and `trail eval latency
//! --step-model` read it: the model's JSON (`step_model.json`, or a machine's model such as
//! `reports/latency-smollm2/step-models/*.json`), or a step log (`steps.parquet`) to fit; and
//! what the model's KV capacity does to the engine's options.
//!
//! **The file's capacity wins.** A model that gives `kv_capacity_tokens` describes a machine
//! (a GPU's memory after the weights), so that capacity is the engine's KV budget and
//! replaces `--kv-budget-tokens`, with a note when they differ; the swap pool, unless
//! `--swap-budget-tokens` is given, is as large. To run the model at another capacity, drop the
//! field from (a copy of) the file and give the flag.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use trail_scheduler::StepTimeModel;

use crate::stages::engine_args::{EngineArgs, MAX_KV_TOKENS};

/// The model in `path`: fitted to it when it is a step log (parquet, told by its magic
/// bytes), read as JSON otherwise; checked either way.
pub fn read(path: &Path) -> anyhow::Result<StepTimeModel> {
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let model = if n == 4 && &magic == b"PAR1" {
        let records = trail_scheduler::steps::read(path)?;
        StepTimeModel::fit_log(&records)
            .with_context(|| format!("{}: fitting the step-time model", path.display()))?
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str::<StepTimeModel>(&text).with_context(|| {
            format!(
                "{}: neither a step log (steps.parquet) nor a step-time model (JSON)",
                path.display()
            )
        })?
    };
    model
        .check()
        .with_context(|| format!("{}: not a usable step-time model", path.display()))?;
    Ok(model)
}

/// `engine` with `model`'s KV capacity as its KV budget, where the model gives one (see the
/// module docs); a note on stderr says when that replaces a different `--kv-budget-tokens`.
pub fn engine_for(engine: &EngineArgs, model: &StepTimeModel) -> anyhow::Result<EngineArgs> {
    let Some(capacity) = model.kv_capacity_tokens else {
        return Ok(engine.clone());
    };
    anyhow::ensure!(
        (16..=MAX_KV_TOKENS).contains(&capacity),
        "the step model's kv_capacity_tokens must be 16 to {MAX_KV_TOKENS}, got {capacity}"
    );
    if capacity != engine.kv_budget_tokens {
        eprintln!(
            "note: the step model's KV capacity, {capacity} tokens, replaces --kv-budget-tokens \
             {}",
            engine.kv_budget_tokens
        );
    }
    Ok(EngineArgs {
        kv_budget_tokens: capacity,
        ..engine.clone()
    })
}

/// One line for logs and reports: the coefficients in ms and µs, the swap cost and the
/// capacity where set.
pub fn describe(m: &StepTimeModel) -> String {
    let mut s = format!(
        "{:.2} ms + {:.3} ms per decode row + {:.3} ms per prefill token + {:.3} µs per KV token",
        m.base_s * 1e3,
        m.per_decode_row_s * 1e3,
        m.per_prefill_token_s * 1e3,
        m.per_kv_token_s * 1e6
    );
    if m.per_swap_token_s > 0.0 {
        s.push_str(&format!(
            " + {:.3} µs per KV token swapped out or in",
            m.per_swap_token_s * 1e6
        ));
    }
    if let Some(c) = m.kv_capacity_tokens {
        s.push_str(&format!("; KV capacity {c} tokens"));
    }
    s
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::manifest::write_atomic;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn the_files_capacity_sets_the_kv_budget_and_the_swap_pool() {
        let flags = Cli::parse_from(["x", "--kv-budget-tokens", "4096"]).engine;
        let fitted = StepTimeModel::constant(0.01);
        assert_eq!(engine_for(&flags, &fitted).unwrap(), flags);
        let gpu = StepTimeModel {
            kv_capacity_tokens: Some(434_512),
            ..fitted
        };
        let e = engine_for(&flags, &gpu).unwrap();
        assert_eq!(e.kv_budget_tokens, 434_512);
        let s = e.scheduler();
        assert_eq!(
            (s.kv_budget_tokens, s.swap_budget_tokens),
            (434_512, 434_512)
        );
        // A swap pool given by flag stays.
        let swap = Cli::parse_from(["x", "--swap-budget-tokens", "32768"]).engine;
        assert_eq!(
            engine_for(&swap, &gpu)
                .unwrap()
                .scheduler()
                .swap_budget_tokens,
            32768
        );
        let huge = StepTimeModel {
            kv_capacity_tokens: Some(MAX_KV_TOKENS + 1),
            ..fitted
        };
        assert!(engine_for(&flags, &huge).is_err());
    }

    #[test]
    fn a_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        write_atomic(
            &path,
            br#"{"base_s": 0.01, "per_decode_row_s": 1e-4, "per_prefill_token_s": 1e-4,
                "per_kv_token_s": 1e-7, "per_swap_token_s": 5e-6, "kv_capacity_tokens": 1000}"#,
        )
        .unwrap();
        let m = read(&path).unwrap();
        assert_eq!(
            (m.per_swap_token_s, m.kv_capacity_tokens),
            (5e-6, Some(1000))
        );
        assert!(describe(&m).contains("5.000 µs per KV token swapped"));
        write_atomic(
            &path,
            br#"{"base_s": -0.01, "per_decode_row_s": 0, "per_prefill_token_s": 0, "per_kv_token_s": 0}"#,
        )
        .unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(e.contains("m.json") && e.contains("base_s"), "{e}");
    }
}
