//! trail's one integration-test binary.

mod checkpoints;
mod datasets;
mod latency;
mod runner;
mod serving;
mod sim;
mod train;
