//! trail-kernels: quantized matmul kernels (GGUF `Q4_0`, `Q4_1`, `Q8_0` weights × Q8
//! activations) for the runner's CPU hot path.
//!
//! Weights are repacked at load into tiles of 16 outputs ([`format`](mod@format)); activations are quantized
//! once per step into Q8 blocks ([`QActivations`]); a tile kernel ([`kernel`]) reads each weight
//! block once for up to 8 rows of the batch; tiles of outputs are spread over rayon's threads.
//! The SIMD path (AVX-512 VNNI, AVX2, scalar) is chosen at run time ([`SimdPath::selected`]:
//! the fastest this CPU supports, or the one `TRAIL_SIMD` names), so one build runs on every
//! x86-64 machine, and every path gives bit-identical results whatever the batch size or thread
//! count.
//!
//! ```
//! use trail_kernels::{BlockFormat, QActivations, QMatrix, matmul_group};
//! // Two Q4_1 matrices (4 and 2 outputs × 64 inputs): 2 blocks of 20 bytes per output row.
//! let mut bytes = vec![0u8; 4 * 2 * 20];
//! bytes[0..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes()); // d of row 0
//! bytes[4] = 0x21; // row 0: weight 0 = 1, weight 16 = 2
//! let wq = QMatrix::from_gguf_bytes(BlockFormat::Q4_1, 4, 64, &bytes)?;
//! let wk = QMatrix::from_gguf_bytes(BlockFormat::Q4_1, 2, 64, &bytes[..2 * 2 * 20])?;
//! let x: Vec<f32> = (0..3 * 64).map(|i| (i % 64) as f32 / 64.0).collect(); // 3 rows
//! let act = QActivations::quantize(&x, 3, 64); // once per step, shared by q and k
//! let (mut yq, mut yk) = (vec![0f32; 3 * 4], vec![0f32; 3 * 2]);
//! matmul_group(&act, &mut [(&wq, &mut yq), (&wk, &mut yk)]);
//! assert!((yq[0] - 2.0 * 16.0 / 64.0).abs() < 0.01); // 1·x[0] + 2·x[16]
//! assert_eq!(yq[..2], yk[..2]);
//! # Ok::<(), trail_kernels::KernelError>(())
//! ```

mod activation;
mod error;
pub mod format;
pub mod kernel;
mod matrix;
pub mod simd;

pub use activation::QActivations;
pub use error::KernelError;
pub use format::BlockFormat;
pub use matrix::{QMatrix, matmul_group, matmul_group_on};
pub use simd::{SIMD_ENV, SimdPath};

/// Names the numerics of this process: crate version, activation quantization, and the SIMD
/// path it runs ([`SimdPath::selected`]). Bits only change when this string changes.
pub fn kernel_id() -> String {
    kernel_id_on(SimdPath::selected())
}

/// [`kernel_id`] for a given path (every path gives the same bits; the path names how).
pub fn kernel_id_on(path: SimdPath) -> String {
    format!(
        "trail-kernels/{} act=q8_32(f32 d,isum,round-ties-even) acc=f32-fma-blockorder path={}",
        env!("CARGO_PKG_VERSION"),
        path.name()
    )
}
