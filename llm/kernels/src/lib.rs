//! trail-kernels: quantized matmul kernels (GGUF `Q4_0`, `Q4_1`, `Q8_0` weights × Q8
//! activations) for the runner's CPU hot path.
//!
//! Weights are repacked at load into tiles of 16 outputs ([`format`]); activations are quantized
//! once per step into Q8 blocks ([`QActivations`]); a tile kernel ([`kernel`]) reads each weight
//! block once for up to 8 rows of the batch; tiles of outputs are spread over rayon's threads.
//! The SIMD path (AVX-512 VNNI, AVX2, scalar) is chosen at compile time, and every path gives
//! bit-identical results whatever the batch size or thread count.

mod activation;
mod error;
pub mod format;
pub mod kernel;
mod matrix;

pub use activation::QActivations;
pub use error::KernelError;
pub use format::BlockFormat;
pub use kernel::SimdPath;
pub use matrix::{QMatrix, matmul_group, matmul_group_on};

/// Names the numerics of this build: crate version, activation quantization, SIMD path.
/// Bits only change when this string changes.
pub fn kernel_id() -> String {
    format!(
        "trail-kernels/{} act=q8_32(f32 d,isum) acc=f32-fma-blockorder path={}",
        env!("CARGO_PKG_VERSION"),
        SimdPath::best().name()
    )
}
