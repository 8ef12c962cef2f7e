//! [`Scratch`]: the forward's per-step buffers (residual stream, norms, projections, attention
//! output, MLP, RoPE rows), kept per thread between steps instead of allocated every step.
//!
//! A step takes its thread's buffers ([`Scratch::take`]) and gives them back when done
//! ([`Scratch::give_back`]); a step that starts on a thread whose buffers are out (a rayon
//! worker that picked up another step while waiting) gets fresh ones. Every buffer is zeroed
//! to its step's size before use, as a new allocation would be, so reuse never changes a bit.

use std::cell::RefCell;

/// Buffers larger than this in all (f32 values) are dropped after their step, not kept: a long
/// prefill should not leave its memory on every thread that ran one.
const KEEP_AT_MOST: usize = 1 << 22;

/// The per-step buffers of [`crate::Llama::step`].
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub x: Vec<f32>,
    pub xn: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub att: Vec<f32>,
    pub o: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

thread_local! {
    static SPARE: RefCell<Scratch> = RefCell::default();
}

impl Scratch {
    /// This thread's buffers (empty ones if none are kept here).
    pub(crate) fn take() -> Self {
        SPARE.with(RefCell::take)
    }

    /// Keeps the buffers on this thread for its next step, unless they are too large.
    pub(crate) fn give_back(self) {
        if self.capacity() <= KEEP_AT_MOST {
            SPARE.with(|s| *s.borrow_mut() = self);
        }
    }

    fn capacity(&self) -> usize {
        [
            &self.x, &self.xn, &self.q, &self.k, &self.v, &self.att, &self.o, &self.gate, &self.up,
            &self.cos, &self.sin,
        ]
        .iter()
        .map(|b| b.capacity())
        .sum()
    }
}

/// `buf` resized to `len` zeros.
pub(crate) fn zeroed(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.clear();
    buf.resize(len, 0.0);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_and_large_ones_are_dropped() {
        let mut s = Scratch::take();
        zeroed(&mut s.q, 8).fill(3.0);
        s.give_back();
        let mut s = Scratch::take();
        assert_eq!(s.q.capacity(), 8, "kept on this thread");
        // Taken while out: a second step on this thread gets fresh buffers.
        assert_eq!(Scratch::take().q.capacity(), 0);
        assert_eq!(zeroed(&mut s.q, 4), &[0.0; 4]);
        zeroed(&mut s.gate, KEEP_AT_MOST + 1);
        s.give_back();
        assert_eq!(Scratch::take().gate.capacity(), 0, "too large to keep");
    }
}
