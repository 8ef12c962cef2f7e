//! AVX2 tile kernel: two `ymm` halves of 8 outputs, `vpmaddubsw` of unsigned weights against
//! broadcast signed activations, up to 4 rows sharing each unpacked weight block.

use crate::format::{QK, TILE};
use crate::{BlockFormat, QActivations};
use std::arch::x86_64::*;

/// Compiled with AVX2, FMA and F16C; the `#[inline(always)]` helpers below are compiled into it.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `act.k / 32` repacked blocks of `format`;
/// `row0 + nrows <= act.n`; `out.len() >= nrows * 16`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile(
    format: BlockFormat,
    w: &[u8],
    act: &QActivations,
    row0: usize,
    nrows: usize,
    out: &mut [f32],
) {
    let mut r = 0;
    while r < nrows {
        let left = nrows - r;
        let o = &mut out[r * TILE..];
        // SAFETY: forwarded contract; each call covers rows within bounds.
        unsafe {
            if left >= 4 {
                rows::<4>(format, w, act, row0 + r, o);
                r += 4;
            } else {
                rows::<1>(format, w, act, row0 + r, o);
                r += 1;
            }
        }
    }
}

#[inline(always)]
unsafe fn rows<const R: usize>(
    format: BlockFormat,
    w: &[u8],
    act: &QActivations,
    row0: usize,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        for h in 0..2 {
            match format {
                BlockFormat::Q4_0 => q4::<R, false>(w, act, row0, h, out),
                BlockFormat::Q4_1 => q4::<R, true>(w, act, row0, h, out),
                BlockFormat::Q8_0 => q8::<R>(w, act, row0, h, out),
            }
        }
    }
}

#[inline(always)]
unsafe fn bcast(a: *const i8, step: usize) -> __m256i {
    // SAFETY: `a` points at a 32-byte activation block, `step < 8`.
    unsafe { _mm256_set1_epi32((a as *const i32).add(step).read_unaligned()) }
}

/// Half `h` (outputs `8h..8h+8`) of a Q4 tile.
#[inline(always)]
unsafe fn q4<const R: usize, const MIN: bool>(
    w: &[u8],
    act: &QActivations,
    row0: usize,
    h: usize,
    out: &mut [f32],
) {
    let format = if MIN {
        BlockFormat::Q4_1
    } else {
        BlockFormat::Q4_0
    };
    let nb = act.k / QK;
    let bb = format.tile_block_bytes();
    let qb = format.tile_quant_bytes();
    // SAFETY: offsets stay inside `w`, `act` rows `row0..row0+R` and `out[..R*16]`.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let wp = w.as_ptr();
        let ap = act.qs.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * bb);
            let mut v = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let x = _mm256_loadu_si256(blk.add(64 * c + 32 * h) as *const __m256i);
                v[2 * c] = _mm256_and_si256(x, mask);
                v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(x, 4), mask);
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(qb + 16 * h) as *const __m128i));
            let mw = if MIN {
                _mm256_cvtph_ps(_mm_loadu_si128(blk.add(qb + 32 + 16 * h) as *const __m128i))
            } else {
                _mm256_setzero_ps()
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = row0 + r;
                let ab = row * nb + b;
                let a = ap.add(row * act.k + b * QK);
                // Each i16 lane: 2 products ≤ 2·15·127; 8 steps ≤ 30480 < 32767, no saturation.
                let mut p = _mm256_maddubs_epi16(v[0], bcast(a, 0));
                for (st, vs) in v.iter().enumerate().skip(1) {
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*vs, bcast(a, st)));
                }
                let mut s = _mm256_madd_epi16(p, ones);
                if !MIN {
                    s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * *act.isum.get_unchecked(ab)));
                }
                let t = _mm256_mul_ps(dw, _mm256_set1_ps(*act.d.get_unchecked(ab)));
                *acc = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(s), *acc);
                if MIN {
                    *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(*act.s.get_unchecked(ab)), *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(r * TILE + 8 * h), *acc);
        }
    }
}

/// Half `h` of a Q8_0 tile. Weights are stored as `q ^ 0x80`; flip back to signed and use the
/// `abs`/`sign` trick so `vpmaddubsw` cannot saturate (|pair| ≤ 2·128·127 < 32767).
#[inline(always)]
unsafe fn q8<const R: usize>(w: &[u8], act: &QActivations, row0: usize, h: usize, out: &mut [f32]) {
    let format = BlockFormat::Q8_0;
    let nb = act.k / QK;
    let bb = format.tile_block_bytes();
    let qb = format.tile_quant_bytes();
    // SAFETY: as in `q4`.
    unsafe {
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let wp = w.as_ptr();
        let ap = act.qs.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * bb);
            let mut wabs = [_mm256_setzero_si256(); 8];
            let mut wsgn = [_mm256_setzero_si256(); 8];
            for c in 0..8 {
                let x = _mm256_loadu_si256(blk.add(64 * c + 32 * h) as *const __m256i);
                let ws = _mm256_xor_si256(x, flip);
                wabs[c] = _mm256_abs_epi8(ws);
                wsgn[c] = ws;
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(qb + 16 * h) as *const __m128i));
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = row0 + r;
                let ab = row * nb + b;
                let a = ap.add(row * act.k + b * QK);
                let mut s = _mm256_setzero_si256();
                for st in 0..8 {
                    let p =
                        _mm256_maddubs_epi16(wabs[st], _mm256_sign_epi8(bcast(a, st), wsgn[st]));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                }
                let t = _mm256_mul_ps(dw, _mm256_set1_ps(*act.d.get_unchecked(ab)));
                *acc = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(s), *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(r * TILE + 8 * h), *acc);
        }
    }
}
