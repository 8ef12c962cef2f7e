//! The statistics behind every figure trail reports, in one place, so the predictor reports
//! (`trail report`, `trail eval mae`) and the scheduling reports (`trail eval latency`,
//! `trail sim trace`, `trail bench`) compute them the same way:
//!
//! - [`quantile()`]: numpy's default (`method="linear"`) quantile, to the bit, so a reader can
//!   check any reported percentile or median with `numpy.quantile`;
//! - [`kendall`]: Kendall's τ-b with ties on both sides;
//! - [`bootstrap`]: seeded request-level percentile bootstrap intervals.
//!
//! No dependency on the model, the engine or the file formats: `trail-checkpoints`,
//! `trail-eval` and `trail-pipeline` all build on it.

pub mod bootstrap;
pub mod kendall;
pub mod quantile;

pub use bootstrap::{Bootstrap, Interval};
pub use kendall::kendall_tau_b;
pub use quantile::{median, quantile, quantile_sorted};
