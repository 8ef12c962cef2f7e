//! Tile kernels: one tile of 16 outputs × a range of activation rows, per SIMD path.
//!
//! Every path computes, for each output and row, the same float recurrence over blocks in
//! order (`acc = fma(dw · da, sumi, acc)`, then for `Q4_1` `acc = fma(mw, d_a · isum_a, acc)`),
//! where `sumi` is the exact integer dot product of the block. Integer sums are exact, the float
//! operations and their order are the same on every path, so results are bit-identical across
//! paths, batch sizes, tiles and threads. The x86 kernels are `#[target_feature]` functions
//! compiled into every x86-64 build and called only on a CPU that supports them
//! ([`SimdPath::is_supported`]).

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

pub use crate::simd::SimdPath;
use crate::{BlockFormat, QActivations};

/// Computes `out[r * 16 + o]` for rows `row0..row0 + nrows` of `act` and the 16 outputs of one
/// tile whose repacked bytes are `w` (`nb` blocks). Panics if this CPU does not support `path`.
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
    path.assert_supported();
    match path {
        SimdPath::Scalar => scalar::tile(format, w, act, row0, nrows, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2/FMA/F16C (asserted above), and the bounds of `w`, `act` and
        // `out` were checked above.
        SimdPath::Avx2 => unsafe { avx2::tile(format, w, act, row0, nrows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX-512 F/BW/VNNI.
        SimdPath::Avx512Vnni => unsafe { avx512::tile(format, w, act, row0, nrows, out) },
        #[cfg(not(target_arch = "x86_64"))]
        other => unreachable!("{other} is supported only on x86-64"),
    }
}
