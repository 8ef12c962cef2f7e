//! Shared helpers for the integration tests (`tests/it`).

use std::path::PathBuf;

/// The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the trail cache
/// (`$TRAIL_HOME`, default `~/.cache/trail`) and reused by every test.
pub fn smollm2_gguf() -> PathBuf {
    let home = std::env::var_os("TRAIL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/trail"));
    home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `../shared/fixtures` beside the checkout (CI clones with `shared/` beside it).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}
