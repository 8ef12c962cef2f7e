//! trail's one integration-test binary.

mod checkpoints;
mod runner;
mod sim;
