//! trail's one integration-test binary.

mod checkpoints;
mod datasets;
mod runner;
mod sim;
