//! Runs llama.cpp's own benchmarks on the same GGUF and threads, for side-by-side ratios:
//! `llama-bench` (prefill `pp N`, decode `tg N` at batch 1, from an empty cache and from an
//! N-token one) and `llama-batched-bench` (decode with B sequences in parallel, each from an
//! N-token prompt).

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde::Serialize;

/// llama.cpp's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaCpp {
    pub prefill_tok_s: f64,
    /// `llama-bench` tg at batch 1 from a cache holding the prompt (`-d N`): the context
    /// trail's decode rows and `llama-batched-bench`'s rows start from.
    pub decode_b1_tok_s: f64,
    /// `llama-bench` tg at batch 1 from an empty cache (its default `tg` figure).
    pub decode_b1_depth0_tok_s: f64,
    /// `llama-batched-bench` S_TG t/s per batch size (all rows together).
    pub batched: Vec<(usize, f64)>,
}

impl LlamaCpp {
    /// Decode tok/s at batch `b`: `llama-bench` for 1 (its standard figure), else batched.
    pub fn decode_tok_s(&self, b: usize) -> Option<f64> {
        if b == 1 {
            return Some(self.decode_b1_tok_s);
        }
        self.batched.iter().find(|(n, _)| *n == b).map(|(_, x)| *x)
    }
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{shown} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs both tools from `dir`.
pub fn run(
    dir: &Path,
    model: &Path,
    threads: usize,
    prompt: usize,
    generated: usize,
    batches: &[usize],
) -> anyhow::Result<LlamaCpp> {
    let bench = dir.join("llama-bench");
    let batched = dir.join("llama-batched-bench");
    for b in [&bench, &batched] {
        anyhow::ensure!(
            b.is_file(),
            "{} not found (build llama.cpp there first)",
            b.display()
        );
    }
    let json = output(
        Command::new(&bench)
            .arg("-m")
            .arg(model)
            .args(["-t", &threads.to_string()])
            .args(["-p", &prompt.to_string(), "-n", &generated.to_string()])
            .args(["-d", &format!("0,{prompt}")])
            .args(["-r", "3", "-o", "json"]),
    )?;
    let bench = parse_llama_bench(&json, prompt)?;
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let npl: Vec<String> = batches
        .iter()
        .filter(|&&b| b > 1)
        .map(|b| b.to_string())
        .collect();
    let mut batched_rates = Vec::new();
    if !npl.is_empty() {
        let ctx = max_b * (prompt + generated) + 64;
        let text = output(
            Command::new(&batched)
                .arg("-m")
                .arg(model)
                .args(["-t", &threads.to_string(), "-c", &ctx.to_string()])
                .args(["-b", "2048", "-ub", "512"])
                .args(["-npp", &prompt.to_string(), "-ntg", &generated.to_string()])
                .args(["-npl", &npl.join(",")]),
        )?;
        batched_rates = parse_batched_bench(&text)?;
    }
    Ok(LlamaCpp {
        prefill_tok_s: bench.prefill,
        decode_b1_tok_s: bench.decode_at_depth,
        decode_b1_depth0_tok_s: bench.decode_depth0,
        batched: batched_rates,
    })
}

/// tok/s read from `llama-bench -o json`.
#[derive(Debug, PartialEq)]
pub struct BenchRows {
    /// `pp` from an empty cache.
    pub prefill: f64,
    /// `tg` from an empty cache.
    pub decode_depth0: f64,
    /// `tg` from a cache `depth` tokens deep.
    pub decode_at_depth: f64,
}

/// The rows of `llama-bench -o json -d 0,DEPTH` (a row without `n_depth` is at depth 0).
pub fn parse_llama_bench(json: &str, depth: usize) -> anyhow::Result<BenchRows> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("llama-bench did not print JSON")?;
    let rows = v.as_array().context("llama-bench JSON is not an array")?;
    let (mut pp, mut tg0, mut tgd) = (None, None, None);
    for r in rows {
        let n_prompt = r["n_prompt"].as_u64().unwrap_or(0);
        let n_gen = r["n_gen"].as_u64().unwrap_or(0);
        let d = r["n_depth"].as_u64().unwrap_or(0) as usize;
        let ts = r["avg_ts"]
            .as_f64()
            .context("llama-bench row without avg_ts")?;
        match (n_prompt > 0, n_gen > 0) {
            (true, false) if d == 0 => pp = Some(ts),
            (false, true) if d == 0 => tg0 = Some(ts),
            _ => {}
        }
        if n_prompt == 0 && n_gen > 0 && d == depth {
            tgd = Some(ts);
        }
    }
    Ok(BenchRows {
        prefill: pp.context("llama-bench printed no pp row at depth 0")?,
        decode_depth0: tg0.context("llama-bench printed no tg row at depth 0")?,
        decode_at_depth: tgd
            .with_context(|| format!("llama-bench printed no tg row at depth {depth}"))?,
    })
}

/// `(B, S_TG t/s)` rows from `llama-batched-bench`'s markdown table.
pub fn parse_batched_bench(text: &str) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| l.starts_with('|')) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        if cells.iter().any(|c| c == "S_TG t/s") {
            header = Some(cells);
            continue;
        }
        let Some(h) = &header else { continue };
        let col = |name: &str| h.iter().position(|c| c == name);
        let (Some(b), Some(s)) = (col("B"), col("S_TG t/s")) else {
            continue;
        };
        if let (Ok(b), Ok(s)) = (cells[b].parse::<usize>(), cells[s].parse::<f64>()) {
            rows.push((b, s));
        }
    }
    anyhow::ensure!(!rows.is_empty(), "no rows in llama-batched-bench's output");
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_tools() {
        let json = r#"[{"n_prompt":128,"n_gen":0,"n_depth":0,"avg_ts":512.5},
            {"n_prompt":0,"n_gen":128,"n_depth":0,"avg_ts":190.25},
            {"n_prompt":128,"n_gen":0,"n_depth":128,"avg_ts":480.0},
            {"n_prompt":0,"n_gen":128,"n_depth":128,"avg_ts":170.5}]"#;
        assert_eq!(
            parse_llama_bench(json, 128).unwrap(),
            BenchRows {
                prefill: 512.5,
                decode_depth0: 190.25,
                decode_at_depth: 170.5
            }
        );
        assert!(parse_llama_bench(json, 64).is_err());
        let table = "\
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    8 |   2048 |    2.000 |   512.00 |    3.500 |   292.57 |    5.500 |   372.36 |
|   128 |    128 |   32 |   8192 |    8.000 |   512.00 |   10.500 |   390.10 |   18.500 |   442.81 |
";
        assert_eq!(
            parse_batched_bench(table).unwrap(),
            vec![(8, 292.57), (32, 390.10)]
        );
        assert!(parse_batched_bench("nothing").is_err());
    }
}
