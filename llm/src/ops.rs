//! The per-token f32 operations of the forward around the matmuls: RMSNorm, RoPE (its cos/sin
//! table is [`crate::rope`]), the residual add, the SiLU-gated product, and the fixed-order dot
//! product they and attention share.
//!
//! Each loop is `#[inline(always)]` and compiled once per SIMD path with that path's target
//! features ([`trail_kernels::simd_dispatch!`]), so it auto-vectorizes as wide as the CPU allows
//! in a build for the baseline x86-64. Rust never fuses or reorders float operations, so every
//! copy gives the same bits.

use trail_kernels::simd::Isa;
use trail_kernels::simd_dispatch;

/// Dot product with eight fixed lanes (vectorizes; the order never depends on the caller).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

simd_dispatch! {
    /// RMSNorm of every row of `x` (width `w.len()`) into `out`.
    pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) = rms_norm_body;
}

#[inline(always)]
fn rms_norm_body(_isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = dot(xr, xr) / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

simd_dispatch! {
    /// Rotates interleaved pairs `(2i, 2i+1)` of every head of every token (GGUF llama layout).
    pub(crate) fn rope(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) = rope_body;
}

#[inline(always)]
fn rope_body(_isa: Isa, x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    let n = cos.len() / half;
    let width = x.len() / n;
    for (t, xt) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in xt.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c[i] - b * s[i];
                head[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

simd_dispatch! {
    /// `x += y`, element by element (the residual stream).
    pub(crate) fn add(x: &mut [f32], y: &[f32]) = add_body;
}

#[inline(always)]
fn add_body(_isa: Isa, x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

simd_dispatch! {
    /// `gate = silu(gate) · up`, element by element (the MLP's gated product).
    pub(crate) fn swiglu(gate: &mut [f32], up: &[f32]) = swiglu_body;
}

#[inline(always)]
fn swiglu_body(_isa: Isa, gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
