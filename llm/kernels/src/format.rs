//! GGUF/ggml block layouts and how a weight matrix is repacked at load.
//!
//! ggml layouts (32 weights per block, little endian):
//! - `Q4_0`: `d: f16, qs: [u8; 16]`; weight `j` is `(qs[j] & 15) - 8`, weight `j + 16` is
//!   `(qs[j] >> 4) - 8`, both times `d`.
//! - `Q4_1`: `d: f16, m: f16, qs: [u8; 16]`; weight is `q * d + m` with the same nibble order.
//! - `Q8_0`: `d: f16, qs: [i8; 32]`; weight is `q * d`.
//!
//! Repacked layout ("tiles"): outputs are grouped by [`TILE`] (16). For each tile and each input
//! block the quants of its 16 outputs are interleaved in 4-byte groups, so that one 32-bit lane
//! of a SIMD register holds 4 consecutive weights of one output — the shape `vpdpbusd` and
//! `pmaddubsw` want — followed by the 16 `f16` scales (and for `Q4_1` the 16 `f16` minimums).
//!
//! Per tile and block, "step" `s` (0..8) covers block elements `4s..4s+4`. For Q4 formats the
//! block holds 4 chunks of 64 bytes; chunk `c`, byte `4o + t` keeps step `2c` element `t` of
//! output `o` in its low nibble and step `2c+1` in its high nibble. For `Q8_0` the block holds 8
//! chunks of 64 bytes (one per step), each weight stored as `q + 128` (`q ^ 0x80`) so it is
//! unsigned.

/// Number of output features packed together.
pub const TILE: usize = 16;
/// Weights per quantization block.
pub const QK: usize = 32;

/// GGUF/ggml block layouts supported by [`crate::QMatrix`].
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockFormat {
    /// `d · (q − 8)`, 4-bit.
    Q4_0,
    /// `d · q + m`, 4-bit.
    Q4_1,
    /// `d · q`, 8-bit.
    Q8_0,
}

impl BlockFormat {
    /// The ggml type id used in GGUF tensor infos.
    pub fn ggml_type(self) -> u32 {
        match self {
            BlockFormat::Q4_0 => 2,
            BlockFormat::Q4_1 => 3,
            BlockFormat::Q8_0 => 8,
        }
    }

    /// The format for a ggml type id.
    pub fn from_ggml_type(id: u32) -> Result<Self, crate::KernelError> {
        match id {
            2 => Ok(BlockFormat::Q4_0),
            3 => Ok(BlockFormat::Q4_1),
            8 => Ok(BlockFormat::Q8_0),
            other => Err(crate::KernelError::UnsupportedType(other)),
        }
    }

    /// Bytes of one ggml block in a GGUF file.
    pub fn gguf_block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    /// Bytes of quants for one tile and one block in the repacked layout.
    pub(crate) fn tile_quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => TILE * QK / 2,
            BlockFormat::Q8_0 => TILE * QK,
        }
    }

    /// Bytes for one tile and one block in the repacked layout (quants, scales, minimums).
    pub(crate) fn tile_block_bytes(self) -> usize {
        let scales = match self {
            BlockFormat::Q4_1 => 2 * TILE * 2,
            _ => TILE * 2,
        };
        self.tile_quant_bytes() + scales
    }
}

/// One output row of one block decoded from ggml bytes: quants (unsigned, as stored in the
/// repacked layout), scale bits, minimum bits.
pub(crate) fn decode_gguf_block(format: BlockFormat, b: &[u8]) -> ([u8; QK], u16, u16) {
    let d = u16::from_le_bytes([b[0], b[1]]);
    let mut q = [0u8; QK];
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let (m, qs) = if format == BlockFormat::Q4_1 {
                (u16::from_le_bytes([b[2], b[3]]), &b[4..20])
            } else {
                (0, &b[2..18])
            };
            for j in 0..16 {
                q[j] = qs[j] & 0x0F;
                q[j + 16] = qs[j] >> 4;
            }
            (q, d, m)
        }
        BlockFormat::Q8_0 => {
            for j in 0..QK {
                q[j] = b[2 + j] ^ 0x80;
            }
            (q, d, 0)
        }
    }
}

/// Reads the stored (unsigned) quant of element `e` (0..32) of output `o` (0..16) from one
/// repacked tile block.
#[inline(always)]
pub(crate) fn tile_quant(format: BlockFormat, blk: &[u8], o: usize, e: usize) -> u8 {
    let step = e / 4;
    let t = e % 4;
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let byte = blk[(step / 2) * 64 + 4 * o + t];
            if step.is_multiple_of(2) {
                byte & 0x0F
            } else {
                byte >> 4
            }
        }
        BlockFormat::Q8_0 => blk[step * 64 + 4 * o + t],
    }
}

/// Writes quant `q` of element `e` of output `o` into a repacked tile block (nibbles are OR-ed,
/// so the block must start zeroed).
pub(crate) fn set_tile_quant(format: BlockFormat, blk: &mut [u8], o: usize, e: usize, q: u8) {
    let step = e / 4;
    let t = e % 4;
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let byte = &mut blk[(step / 2) * 64 + 4 * o + t];
            if step.is_multiple_of(2) {
                *byte |= q & 0x0F;
            } else {
                *byte |= (q & 0x0F) << 4;
            }
        }
        BlockFormat::Q8_0 => blk[step * 64 + 4 * o + t] = q,
    }
}
