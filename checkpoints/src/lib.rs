//! trail-checkpoints: the length predictors of TRAIL and everything around them.
//!
//! - [`bins`]: equal-width remaining-length bins (and v2's "runs to the cap" class), labels and
//!   the expectation readout.
//! - [`calibrate`]: the filter's calibrated likelihood (v2), fitted on validation.
//! - [`probe`]: the MLP probe (standardize → Linear(d,512) → ReLU → Linear(512,k) → softmax)
//!   and its batched inference.
//! - [`train`]: seeded training (AdamW, cosine schedule, early stop on validation MAE).
//! - [`refine`]: the Bayesian filter of the paper (§2.3 of the digest) and a per-request state.
//! - [`schedule`]: when the filter starts and refreshes and which state each refresh reads: one
//!   schedule for the server and the scorer.
//! - [`baseline`]: readouts of total-length predictors and constant baselines.
//! - [`checkpoint`]: the safetensors checkpoint format with its metadata.
//! - [`bert`]: the BERT baseline's sentence encoder (all-MiniLM-L6-v2, frozen).
//! - [`bert_tune`]: the same encoder fine-tuned end to end with the length head.
//! - [`metrics`]: Kendall's τ-b and request-level bootstrap intervals.
//! - [`prior`]: the exported fine-tuned BERT as a prompt → total-length predictor (SJF-BERT).
//! - [`suite`]: every predictor of a generated run, trained into `runs/NAME/models/`.
//! - [`scoring`]: those predictors scored on the run's test split (`metrics.json`).

pub mod baseline;
pub mod bert;
pub mod bert_tune;
pub mod bins;
pub mod calibrate;
pub mod checkpoint;
pub mod error;
pub mod metrics;
pub mod prior;
pub mod probe;
pub mod refine;
pub mod schedule;
pub mod scoring;
pub mod suite;
pub mod train;

pub use bins::Bins;
pub use checkpoint::{Checkpoint, CheckpointMeta, MAX_REFINE_INTERVAL};
pub use error::Error;
pub use probe::{Probe, Standardizer};
pub use refine::{Between, Filter, RefineState};
pub use train::{Dataset, EpochRecord, TrainConfig, TrainReport, split_by_group, train_probe};

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
