//! The crate's one error type: every failure names the file, key, tensor or limit involved.

use std::path::PathBuf;

/// Errors from loading a GGUF model, tokenizing, templating and running the forward.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a readable GGUF file: {source}", path.display())]
    Gguf {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{}: architecture `{found}` is not supported (only `llama`)", path.display())]
    Architecture { path: PathBuf, found: String },
    #[error("{}: metadata key `{key}` is missing", path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{}: metadata key `{key}` is malformed: {reason}", path.display())]
    BadKey {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    BadTensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "{}: truncated: tensor `{name}` needs bytes up to offset {need} but the file has {have}",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        name: String,
        need: u64,
        have: u64,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// `max` is the longest prompt that fits: the context less the room kept for generation.
    #[error(
        "prompt of {len} tokens is too long: at most {max} prompt tokens fit the context with \
         room left to generate"
    )]
    PromptTooLong { len: usize, max: usize },
    #[error("sequence would reach position {pos}, past the context of {max} tokens")]
    ContextOverflow { pos: usize, max: usize },
    #[error("bad step: {0}")]
    Step(String),
    #[error("{0}")]
    Simd(trail_kernels::KernelError),
    #[error("device `{0}`: {1}")]
    Device(String, String),
}

/// `Result` with [`LlmError`].
pub type Result<T> = std::result::Result<T, LlmError>;
