//! `QMatrix`: a quantized `out_features × in_features` weight repacked into tiles of 16 outputs,
//! and the batched, multi-threaded matmul over it.

use crate::format::{QK, TILE, decode_gguf_block, set_tile_quant, tile_quant};
use crate::kernel::{self, SimdPath};
use crate::{BlockFormat, KernelError, QActivations};
use half::f16;
use rayon::prelude::*;

/// A quantized weight matrix (`out_features × in_features`), repacked at load for the kernels.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: BlockFormat,
    out_features: usize,
    in_features: usize,
    /// `tiles × nb × tile_block_bytes`; outputs past `out_features` are zero.
    data: Vec<u8>,
}

/// Block-dot work (rows × blocks × tiles) below which a matmul runs on the calling thread.
const SERIAL_WORK: usize = 1 << 10;
/// Weight bytes per job at most (kept in L2 while the job's row blocks reuse them).
const CHUNK_BYTES: usize = 640 << 10;
/// Rows computed together per weight pass (the AVX-512 kernel keeps 8 rows in registers).
const ROW_BLOCK: usize = 8;

impl QMatrix {
    /// Builds the matrix from the raw bytes of a GGUF tensor whose ggml shape is
    /// `[in_features, out_features]` (rows of `in_features` weights, one per output).
    pub fn from_gguf_bytes(
        format: BlockFormat,
        out_features: usize,
        in_features: usize,
        bytes: &[u8],
    ) -> Result<Self, KernelError> {
        if in_features == 0 || !in_features.is_multiple_of(QK) {
            return Err(KernelError::BadInFeatures { in_features });
        }
        if out_features == 0 {
            return Err(KernelError::EmptyOutput);
        }
        let nb = in_features / QK;
        let gb = format.gguf_block_bytes();
        let expected = out_features * nb * gb;
        if bytes.len() != expected {
            return Err(KernelError::BadLength {
                format,
                out_features,
                in_features,
                expected,
                got: bytes.len(),
            });
        }
        let tiles = out_features.div_ceil(TILE);
        let bb = format.tile_block_bytes();
        let qb = format.tile_quant_bytes();
        let mut data = vec![0u8; tiles * nb * bb];
        if format == BlockFormat::Q8_0 {
            // Padding outputs hold q = 0, stored as 0x80.
            for blk in data.chunks_exact_mut(bb) {
                blk[..qb].fill(0x80);
            }
        }
        for o in 0..out_features {
            let (t, ot) = (o / TILE, o % TILE);
            for b in 0..nb {
                let src = &bytes[(o * nb + b) * gb..(o * nb + b + 1) * gb];
                let (q, d, m) = decode_gguf_block(format, src);
                let blk = &mut data[(t * nb + b) * bb..(t * nb + b + 1) * bb];
                for (e, &qe) in q.iter().enumerate() {
                    set_tile_quant(format, blk, ot, e, qe);
                }
                blk[qb + 2 * ot..qb + 2 * ot + 2].copy_from_slice(&d.to_le_bytes());
                if format == BlockFormat::Q4_1 {
                    let mo = qb + 2 * TILE + 2 * ot;
                    blk[mo..mo + 2].copy_from_slice(&m.to_le_bytes());
                }
            }
        }
        Ok(QMatrix {
            format,
            out_features,
            in_features,
            data,
        })
    }

    /// Block layout of the weights.
    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// Number of outputs (rows of the weight).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Number of inputs (columns of the weight).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of weights (quants, scales, minimums) streamed per matmul, padding included.
    pub fn weight_bytes(&self) -> usize {
        self.data.len()
    }

    /// The weights as f32 (`out_features × in_features`, row-major), decoded exactly as ggml
    /// does: `d·(q−8)`, `d·q + m`, `d·q`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.out_features * self.in_features];
        for o in 0..self.out_features {
            self.dequantize_row_into(
                o,
                &mut out[o * self.in_features..(o + 1) * self.in_features],
            );
        }
        out
    }

    /// Decodes one output row (e.g. an embedding lookup) into `out` (`in_features` values).
    pub fn dequantize_row_into(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.out_features && out.len() == self.in_features);
        let nb = self.in_features / QK;
        let bb = self.format.tile_block_bytes();
        let qb = self.format.tile_quant_bytes();
        let (t, ot) = (row / TILE, row % TILE);
        for b in 0..nb {
            let blk = &self.data[(t * nb + b) * bb..(t * nb + b + 1) * bb];
            let d = f16::from_bits(u16::from_le_bytes([blk[qb + 2 * ot], blk[qb + 2 * ot + 1]]))
                .to_f32();
            let mo = qb + 2 * TILE + 2 * ot;
            for e in 0..QK {
                let q = tile_quant(self.format, blk, ot, e);
                out[b * QK + e] = match self.format {
                    BlockFormat::Q4_0 => (q as i32 - 8) as f32 * d,
                    BlockFormat::Q4_1 => {
                        let m = f16::from_bits(u16::from_le_bytes([blk[mo], blk[mo + 1]])).to_f32();
                        q as f32 * d + m
                    }
                    BlockFormat::Q8_0 => (q as i32 - 128) as f32 * d,
                };
            }
        }
    }

    /// `y = x · Wᵀ`: `x` is `n × in_features`, `y` is `n × out_features` (overwritten).
    /// Quantizes `x` to Q8 blocks first; use [`QActivations::quantize`] + [`Self::matmul_q`] to
    /// share that work between matrices with the same input.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let act = QActivations::quantize(x, n, self.in_features);
        self.matmul_q(&act, y);
    }

    /// `y = act · Wᵀ` on [`SimdPath::selected`].
    pub fn matmul_q(&self, act: &QActivations, y: &mut [f32]) {
        self.matmul_q_on(SimdPath::selected(), act, y);
    }

    /// `y = act · Wᵀ` on a given SIMD path (for tests and benchmarks). Every path gives the same
    /// bits. Panics if this CPU does not support the path or the shapes disagree.
    pub fn matmul_q_on(&self, path: SimdPath, act: &QActivations, y: &mut [f32]) {
        matmul_group_on(path, act, &mut [(self, y)]);
    }

    /// Tiles per job for `n` rows on `threads` threads: small enough that a job's weights stay
    /// in L2 while its row blocks reuse them, and enough jobs to balance the threads.
    fn chunk_tiles(&self, threads: usize) -> usize {
        let tile_bytes = self.tile_bytes();
        let tiles = self.out_features.div_ceil(TILE);
        (CHUNK_BYTES / tile_bytes)
            .min(tiles.div_ceil(4 * threads))
            .max(1)
    }

    fn tile_bytes(&self) -> usize {
        self.in_features / QK * self.format.tile_block_bytes()
    }

    /// Computes tiles `t0..t1` for every row of `act` into `y` (`n × out_features`).
    ///
    /// # Safety
    /// `y` points at `act.n × out_features` writable floats, and no other thread writes
    /// columns of tiles `t0..t1` concurrently.
    unsafe fn run_tiles(
        &self,
        path: SimdPath,
        act: &QActivations,
        t0: usize,
        t1: usize,
        y: *mut f32,
    ) {
        let n = act.n;
        let out = self.out_features;
        let tile_bytes = self.tile_bytes();
        let mut buf = [0f32; ROW_BLOCK * TILE];
        let mut row0 = 0;
        while row0 < n {
            let nr = ROW_BLOCK.min(n - row0);
            for t in t0..t1 {
                let w = &self.data[t * tile_bytes..(t + 1) * tile_bytes];
                kernel::tile(path, self.format, w, act, row0, nr, &mut buf);
                let cols = TILE.min(out - t * TILE);
                for r in 0..nr {
                    // SAFETY: columns `t*16 .. t*16+cols <= out` of row `row0 + r < n` lie in
                    // `y`, and tile `t` is ours alone (the function's contract).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            buf.as_ptr().add(r * TILE),
                            y.add((row0 + r) * out + t * TILE),
                            cols,
                        );
                    }
                }
            }
            row0 += nr;
        }
    }
}

/// Several matrices with the same input (q/k/v, gate/up) in one parallel region:
/// `ys[i].1 = act · ys[i].0ᵀ`, each `n × out_features`. Same bits as separate
/// [`QMatrix::matmul_q`] calls, with one fork-join instead of one per matrix.
pub fn matmul_group(act: &QActivations, ys: &mut [(&QMatrix, &mut [f32])]) {
    matmul_group_on(SimdPath::selected(), act, ys);
}

/// [`matmul_group`] on a given SIMD path.
pub fn matmul_group_on(path: SimdPath, act: &QActivations, ys: &mut [(&QMatrix, &mut [f32])]) {
    path.assert_supported();
    let n = act.n;
    for (m, y) in ys.iter() {
        assert_eq!(
            act.k, m.in_features,
            "activation width differs from in_features"
        );
        assert!(
            y.len() >= n * m.out_features,
            "y holds fewer than n × out_features values"
        );
    }
    if n == 0 || ys.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads();
    // (matrix, first tile, end tile) per job, and the total block-dot work.
    let mut jobs = Vec::new();
    let mut work = 0;
    for (i, (m, _)) in ys.iter().enumerate() {
        let tiles = m.out_features.div_ceil(TILE);
        let ct = m.chunk_tiles(threads);
        jobs.extend(
            (0..tiles)
                .step_by(ct)
                .map(|t0| (i, t0, (t0 + ct).min(tiles))),
        );
        work += tiles * n * (m.in_features / QK);
    }
    let outs: Vec<(&QMatrix, SendPtr)> = ys
        .iter_mut()
        .map(|(m, y)| (*m, SendPtr(y.as_mut_ptr())))
        .collect();
    let job = |&(i, t0, t1): &(usize, usize, usize)| {
        let (m, y) = &outs[i];
        // SAFETY: `y` holds `n × out_features` floats (asserted above) and every
        // (matrix, tile) pair belongs to exactly one job, so writes never overlap.
        unsafe { m.run_tiles(path, act, t0, t1, y.get()) };
    };
    if work <= SERIAL_WORK || threads == 1 || jobs.len() == 1 {
        jobs.iter().for_each(job);
    } else {
        jobs.par_iter().for_each(job);
    }
}

struct SendPtr(*mut f32);
impl SendPtr {
    /// A method (not field access) so closures capture the `Sync` wrapper, not the raw pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the pointer is only used for disjoint writes (see `matmul_q_on`).
unsafe impl Sync for SendPtr {}
// SAFETY: as above.
unsafe impl Send for SendPtr {}
