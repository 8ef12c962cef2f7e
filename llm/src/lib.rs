//! trail-llm: (skeleton, filled in by its issue).

pub mod hub;
