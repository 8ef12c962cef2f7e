//! The model options every stage that runs the target model shares.

use std::path::PathBuf;

use anyhow::Context;
use trail_llm::{Device, KvFormat, Runner, hub};

/// `--model`, `--device`, `--threads`, `--kv-cache`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A local GGUF, or `hf:OWNER/REPO/FILE.gguf`. Default: SmolLM2-135M-Instruct Q4_1, fetched
    /// into the cache on first use.
    #[arg(long, env = "TRAIL_MODEL")]
    pub model: Option<String>,
    /// `cpu`. The forward is CPU-only in this build: `cuda:N` is parsed but refused until a GPU
    /// forward exists.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Worker threads for the matmuls (default: every core).
    #[arg(long, env = "TRAIL_THREADS")]
    pub threads: Option<usize>,
    /// The KV cache: `f16` (one-pass attention over half the bytes), or `f32` (the numerics
    /// before issue 23: labels made with them replay under it). Part of the kernel id.
    #[arg(long = "kv-cache", env = "TRAIL_KV_CACHE", default_value_t = KvFormat::F16)]
    pub kv_cache: KvFormat,
}

impl ModelArgs {
    /// The GGUF path, fetched or resolved.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(hub::resolve_model(self.model.as_deref())?)
    }

    /// Sets the thread pool and loads the model, its caches in `--kv-cache`.
    pub fn load(&self) -> anyhow::Result<Runner> {
        init_threads(self.threads)?;
        let path = self.path()?;
        let mut runner = Runner::load_on(&path, self.device)
            .with_context(|| format!("loading {}", path.display()))?;
        runner.set_kv_format(self.kv_cache);
        Ok(runner)
    }
}

/// Sizes rayon's global pool once (later calls keep the first size).
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    Ok(())
}

/// Threads the matmuls run on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
