//! trail-kernels: (skeleton).
