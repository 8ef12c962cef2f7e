//! trail's one integration-test binary.

mod checkpoints;
mod datasets;
mod generate;
mod honest;
mod hostile;
mod latency;
mod mae;
mod runner;
mod serving;
mod sim;
mod train;
