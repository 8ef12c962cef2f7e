//! trail-eval: queueing theory and simulation for size-based LLM scheduling, and load
//! generation. Model-free: it depends on the scheduling core (`trail-scheduler`), not on the
//! serving shim, so it builds without the model runtime or the HTTP stack.
//!
//! * [`dist`]: size laws ([`Sizes`], including the capped mixture of length-capped generations)
//!   and the joint law of (size, prediction) ([`Joint`]).
//! * [`policy`]: FCFS, SRPT, SPRPT, SPRPT with limited preemption (TRAIL), predicted SJF.
//! * [`theory`]: M/G/1 mean response times by SOAP, with atoms (ties) handled exactly; the
//!   derivation is in that module's docs.
//! * [`des`]: a single-server discrete-event simulator with batch-means confidence intervals.
//! * [`loadgen`]: arrival processes, traces, results, the open-loop executor and its backend
//!   trait for latency runs.
//! * [`tracesim`]: a trace-driven serving simulator: the serving shim's scheduler, replicas behind
//!   a router, and a step-time model fitted to a step log.

pub mod des;
pub mod dist;
pub mod loadgen;
pub mod policy;
mod quad;
pub mod theory;
pub mod tracesim;

pub use des::{SimConfig, SimResult, simulate};
pub use dist::{CappedMixture, Empirical, Joint, Predictions, Sizes};
pub use policy::Policy;
pub use theory::{Options, mean_response, mean_response_with};

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("load must be in (0, 1), got {0}")]
    BadLoad(f64),
    #[error("{0} must be a finite number")]
    NotFinite(String),
    #[error("empty sample: at least one job is needed")]
    EmptySample,
    #[error("bad parameter: {0}")]
    BadParameter(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<trail_fs::Error> for Error {
    fn from(e: trail_fs::Error) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}
