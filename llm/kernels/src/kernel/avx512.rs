//! AVX-512 VNNI tile kernel: one `zmm` lane per output, `vpdpbusd` of unsigned weights against
//! broadcast signed activations, up to 8 rows sharing each unpacked weight block.

use crate::format::{QK, TILE};
use crate::{BlockFormat, QActivations};
use std::arch::x86_64::*;

/// Compiled with AVX-512 F/BW/VNNI, AVX2, FMA and F16C; the `#[inline(always)]` helpers below
/// are compiled into it.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI, AVX2, FMA and F16C; `w` holds `act.k / 32` repacked
/// blocks of `format`; `row0 + nrows <= act.n`; `out.len() >= nrows * 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
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
        // SAFETY: forwarded contract; each call covers rows `row0 + r ..` within bounds.
        unsafe {
            if left >= 8 {
                rows::<8>(format, w, act, row0 + r, o);
                r += 8;
            } else if left >= 4 {
                rows::<4>(format, w, act, row0 + r, o);
                r += 4;
            } else if left >= 2 {
                rows::<2>(format, w, act, row0 + r, o);
                r += 2;
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
    match format {
        // SAFETY: forwarded contract.
        BlockFormat::Q4_0 => unsafe { q4::<R, false>(w, act, row0, out) },
        BlockFormat::Q4_1 => unsafe { q4::<R, true>(w, act, row0, out) },
        BlockFormat::Q8_0 => unsafe { q8::<R>(w, act, row0, out) },
    }
}

/// Runs `$body` with `$r` bound to each constant `0..$R` (`$R ≤ 8`), fully unrolled so that
/// per-row accumulators indexed by `$r` stay in registers.
macro_rules! unroll_rows {
    ($R:expr, $r:ident, $body:block) => {{
        unroll_rows!(@one $R, $r, $body, 0);
        unroll_rows!(@one $R, $r, $body, 1);
        unroll_rows!(@one $R, $r, $body, 2);
        unroll_rows!(@one $R, $r, $body, 3);
        unroll_rows!(@one $R, $r, $body, 4);
        unroll_rows!(@one $R, $r, $body, 5);
        unroll_rows!(@one $R, $r, $body, 6);
        unroll_rows!(@one $R, $r, $body, 7);
    }};
    (@one $R:expr, $r:ident, $body:block, $i:literal) => {
        if $i < $R {
            let $r: usize = $i;
            $body
        }
    };
}

/// Integer dot of 8 weight step vectors with the 32 activations at `a` (exact).
#[inline(always)]
unsafe fn dot8(v: &[__m512i; 8], a: *const i8) -> __m512i {
    let a = a as *const i32;
    // SAFETY: `a` points at 32 readable bytes (one activation block).
    unsafe {
        let mut s0 = _mm512_setzero_si512();
        let mut s1 = _mm512_setzero_si512();
        s0 = _mm512_dpbusd_epi32(s0, v[0], _mm512_set1_epi32(a.read_unaligned()));
        s1 = _mm512_dpbusd_epi32(s1, v[1], _mm512_set1_epi32(a.add(1).read_unaligned()));
        s0 = _mm512_dpbusd_epi32(s0, v[2], _mm512_set1_epi32(a.add(2).read_unaligned()));
        s1 = _mm512_dpbusd_epi32(s1, v[3], _mm512_set1_epi32(a.add(3).read_unaligned()));
        s0 = _mm512_dpbusd_epi32(s0, v[4], _mm512_set1_epi32(a.add(4).read_unaligned()));
        s1 = _mm512_dpbusd_epi32(s1, v[5], _mm512_set1_epi32(a.add(5).read_unaligned()));
        s0 = _mm512_dpbusd_epi32(s0, v[6], _mm512_set1_epi32(a.add(6).read_unaligned()));
        s1 = _mm512_dpbusd_epi32(s1, v[7], _mm512_set1_epi32(a.add(7).read_unaligned()));
        _mm512_add_epi32(s0, s1)
    }
}

#[inline(always)]
unsafe fn q4<const R: usize, const MIN: bool>(
    w: &[u8],
    act: &QActivations,
    row0: usize,
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
    // SAFETY: all pointer offsets stay inside `w` (nb blocks of `bb` bytes), `act` rows
    // `row0..row0+R` and `out[..R*16]`, per the caller's contract.
    unsafe {
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        let ap = act.qs.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * bb);
            let mut v = [_mm512_setzero_si512(); 8];
            for c in 0..4 {
                let x = _mm512_loadu_si512(blk.add(64 * c) as *const _);
                v[2 * c] = _mm512_and_si512(x, mask);
                v[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), mask);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb) as *const __m256i));
            let mw = if MIN {
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb + 32) as *const __m256i))
            } else {
                _mm512_setzero_ps()
            };
            unroll_rows!(R, r, {
                let row = row0 + r;
                let ab = row * nb + b;
                let mut s = dot8(&v, ap.add(row * act.k + b * QK));
                if !MIN {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * *act.isum.get_unchecked(ab)));
                }
                let t = _mm512_mul_ps(dw, _mm512_set1_ps(*act.d.get_unchecked(ab)));
                acc[r] = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(s), acc[r]);
                if MIN {
                    acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*act.s.get_unchecked(ab)), acc[r]);
                }
            });
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(r * TILE), *acc);
        }
    }
}

#[inline(always)]
unsafe fn q8<const R: usize>(w: &[u8], act: &QActivations, row0: usize, out: &mut [f32]) {
    let format = BlockFormat::Q8_0;
    let nb = act.k / QK;
    let bb = format.tile_block_bytes();
    let qb = format.tile_quant_bytes();
    // SAFETY: as in `q4`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        let ap = act.qs.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * bb);
            let mut v = [_mm512_setzero_si512(); 8];
            for (c, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(blk.add(64 * c) as *const _);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb) as *const __m256i));
            unroll_rows!(R, r, {
                let row = row0 + r;
                let ab = row * nb + b;
                let s = dot8(&v, ap.add(row * act.k + b * QK));
                // Weights are stored as q + 128: remove 128 · Σa (exact).
                let s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * *act.isum.get_unchecked(ab)));
                let t = _mm512_mul_ps(dw, _mm512_set1_ps(*act.d.get_unchecked(ab)));
                acc[r] = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(s), acc[r]);
            });
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(r * TILE), *acc);
        }
    }
}
