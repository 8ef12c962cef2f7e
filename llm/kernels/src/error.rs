//! Errors raised while loading quantized weights or choosing a SIMD path.

/// Why a weight matrix could not be built from GGUF bytes, or a SIMD path not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// `in_features` must be a positive multiple of the block size (32).
    #[error("in_features {in_features} is not a positive multiple of the block size 32")]
    BadInFeatures { in_features: usize },
    /// `out_features` must be positive.
    #[error("out_features must be positive")]
    EmptyOutput,
    /// The byte slice does not hold exactly `out_features × in_features` weights.
    #[error("{format:?} weight {out_features}x{in_features} needs {expected} bytes, got {got}")]
    BadLength {
        format: crate::BlockFormat,
        out_features: usize,
        in_features: usize,
        expected: usize,
        got: usize,
    },
    /// The GGUF type id names a block layout this crate does not implement.
    #[error("unsupported ggml type id {0}")]
    UnsupportedType(u32),
    /// `TRAIL_SIMD` (or a caller) named a path that does not exist.
    #[error(
        "unknown SIMD path {0:?} (TRAIL_SIMD takes scalar, portable, avx2, avx512vnni or avx512)"
    )]
    UnknownSimdPath(String),
    /// The path exists but this CPU lacks one of its features.
    #[error("SIMD path {0} is not supported by this CPU")]
    UnsupportedSimdPath(&'static str),
}
