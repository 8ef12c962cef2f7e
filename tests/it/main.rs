//! trail's one integration-test binary.
//!
//! The modules that run the real models (SmolLM2, all-MiniLM-L6-v2; fetched into the trail
//! cache on first use) build with the `model` feature, on by default. Without it
//! (`--no-default-features`) the model-free suite runs offline: the tests that need a model in
//! otherwise model-free modules are listed as ignored.

// Tests write damaged and hand-made files on purpose, not through trail-fs.
#![allow(clippy::disallowed_methods)]

#[cfg(feature = "model")]
mod api;
#[cfg(feature = "model")]
mod bert;
mod checkpoints;
mod cli;
mod datasets;
#[cfg(feature = "model")]
mod generate;
#[cfg(feature = "model")]
mod honest;
#[cfg(feature = "model")]
mod hostile;
mod latency;
mod layout;
mod mae;
#[cfg(feature = "model")]
mod runner;
#[cfg(feature = "model")]
mod serving;
mod sim;
mod step_model;
mod train;
mod upgrade;
