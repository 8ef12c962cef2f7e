//! Tile kernels: one tile of 16 outputs × a range of activation rows, per SIMD path.
//!
//! Every path computes, for each output and row, the same float recurrence over blocks in
//! order (`acc = fma(dw · da, sumi, acc)`, then for `Q4_1` `acc = fma(mw, d_a · isum_a, acc)`),
//! where `sumi` is the exact integer dot product of the block. Integer sums are exact, the float
//! operations and their order are the same on every path, so results are bit-identical across
//! paths, batch sizes, tiles and threads.

pub(crate) mod scalar;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod avx2;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx512f",
    target_feature = "avx512bw",
    target_feature = "avx512vnni",
    target_feature = "f16c",
    target_feature = "fma"
))]
pub(crate) mod avx512;

use crate::{BlockFormat, QActivations};

/// A SIMD code path; which ones exist is decided at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimdPath {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// AVX-512 BW + VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl SimdPath {
    /// Paths compiled into this build, slowest first.
    pub fn available() -> Vec<SimdPath> {
        #[allow(unused_mut)]
        let mut v = vec![SimdPath::Scalar];
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        v.push(SimdPath::Avx2);
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512vnni",
            target_feature = "f16c",
            target_feature = "fma"
        ))]
        v.push(SimdPath::Avx512Vnni);
        v
    }

    /// The fastest compiled path (what [`crate::QMatrix::matmul_q`] uses).
    pub fn best() -> SimdPath {
        *Self::available()
            .last()
            .expect("scalar is always available")
    }

    /// Short name for [`crate::kernel_id`].
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512Vnni => "avx512vnni",
        }
    }
}

/// Computes `out[r * 16 + o]` for rows `row0..row0 + nrows` of `act` and the 16 outputs of one
/// tile whose repacked bytes are `w` (`nb` blocks). `path` must be in [`SimdPath::available`].
pub(crate) fn tile(
    path: SimdPath,
    format: BlockFormat,
    w: &[u8],
    act: &QActivations,
    row0: usize,
    nrows: usize,
    out: &mut [f32],
) {
    let nb = act.k / crate::format::QK;
    assert!(w.len() >= nb * format.tile_block_bytes());
    assert!(row0 + nrows <= act.n && out.len() >= nrows * crate::format::TILE);
    match path {
        SimdPath::Scalar => scalar::tile(format, w, act, row0, nrows, out),
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        // SAFETY: the module is compiled only when AVX2/FMA/F16C are enabled for the target, and
        // the bounds of `w`, `act` and `out` were checked above.
        SimdPath::Avx2 => unsafe { avx2::tile(format, w, act, row0, nrows, out) },
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512vnni",
            target_feature = "f16c",
            target_feature = "fma"
        ))]
        // SAFETY: as above, for AVX-512 F/BW/VNNI.
        SimdPath::Avx512Vnni => unsafe { avx512::tile(format, w, act, row0, nrows, out) },
        #[allow(unreachable_patterns)]
        other => panic!("SIMD path {other:?} is not compiled into this build"),
    }
}
