//! Shared helpers for the integration tests (`tests/it`).

use std::path::PathBuf;

/// The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the trail cache
/// (`$TRAIL_HOME`, default `~/.cache/trail`) and reused by every test.
pub fn smollm2_gguf() -> PathBuf {
    trail_llm::hub::SMOLLM2
        .ensure()
        .unwrap_or_else(|e| panic!("the integration tests need the real model: {e}"))
}

/// all-MiniLM-L6-v2's directory in the trail cache (fetched on first use).
pub fn minilm_dir() -> PathBuf {
    let main = trail_llm::hub::MINILM
        .ensure()
        .unwrap_or_else(|e| panic!("the integration tests need all-MiniLM-L6-v2: {e}"));
    main.parent().expect("a file in a directory").to_path_buf()
}

/// The HF transformers reference (ids and per-layer hidden states of SmolLM2 on five prompts),
/// copied from `../shared/fixtures` so a fresh clone runs the parity tests.
pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/smollm2_hf_reference.json")
}

/// `../shared` beside the checkout (CI clones with `shared/` beside it).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// Runs a Python script with `args` and returns its stdout; panics with its output when it
/// fails (the readers the tests cross-check with, pyarrow and polars, must be installed).
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 must be installed (with pyarrow and polars) to run these tests");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python failed (pyarrow and polars are required: pip install pyarrow polars)\n{stdout}\n{stderr}"
    );
    stdout
}

/// Cosine similarity, accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}
