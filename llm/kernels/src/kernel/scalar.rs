//! Portable scalar tile kernel: the reference order of float operations for every path.

use crate::format::{QK, TILE, tile_quant};
use crate::{BlockFormat, QActivations};
use half::f16;

pub(crate) fn tile(
    format: BlockFormat,
    w: &[u8],
    act: &QActivations,
    row0: usize,
    nrows: usize,
    out: &mut [f32],
) {
    let nb = act.k / QK;
    let bb = format.tile_block_bytes();
    let qb = format.tile_quant_bytes();
    for r in 0..nrows {
        let row = row0 + r;
        for o in 0..TILE {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = &w[b * bb..(b + 1) * bb];
                let a = &act.qs[row * act.k + b * QK..row * act.k + (b + 1) * QK];
                let ab = row * nb + b;
                let mut dot = 0i32;
                for (e, &av) in a.iter().enumerate() {
                    dot += tile_quant(format, blk, o, e) as i32 * av as i32;
                }
                let sumi = match format {
                    BlockFormat::Q4_0 => dot - 8 * act.isum[ab],
                    BlockFormat::Q4_1 => dot,
                    BlockFormat::Q8_0 => dot - 128 * act.isum[ab],
                };
                let dw = f16::from_bits(u16::from_le_bytes([blk[qb + 2 * o], blk[qb + 2 * o + 1]]))
                    .to_f32();
                let t = dw * act.d[ab];
                acc = t.mul_add(sumi as f32, acc);
                if format == BlockFormat::Q4_1 {
                    let mo = qb + 2 * TILE + 2 * o;
                    let mw = f16::from_bits(u16::from_le_bytes([blk[mo], blk[mo + 1]])).to_f32();
                    acc = mw.mul_add(act.s[ab], acc);
                }
            }
            out[r * TILE + o] = acc;
        }
    }
}
