//! trail-checkpoints: (skeleton, filled in by its issue).
