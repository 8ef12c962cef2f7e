//! trail-serving-shim: (skeleton, filled in by its issue).
