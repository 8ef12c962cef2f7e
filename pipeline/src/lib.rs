//! The stages behind the `trail` binary, as a library so the integration tests run them in
//! process (and in child processes they can kill) exactly as the command line does.

pub mod cli;
pub mod manifest;
pub mod stages;
