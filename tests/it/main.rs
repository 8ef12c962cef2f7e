//! trail's one integration-test binary.

mod checkpoints;
mod datasets;
mod runner;
mod serving;
mod sim;
mod train;
