//! trail-scheduler: the model-free core of the serving engine, which a simulator drives as
//! is. It knows nothing of the model, the predictor or HTTP (no candle, tokenizers, axum or
//! tokio); the serving shim (`trail-serving-shim`) runs it over the real model, and the
//! trace-driven simulator (`trail-eval`) over a [`StepTimeModel`].
//!
//! - [`clock`]: the [`Clock`] the scheduler reads time from ([`SystemClock`], [`ManualClock`]),
//!   and the engine's [`VirtualTime`].
//! - [`sequence`]: a request as the scheduler sees it ([`Sequence`]): lengths, generated
//!   tokens, predictions, counters, timestamps.
//! - [`block`]: the KV budget in blocks of tokens ([`BlockManager`]).
//! - [`policy`]: the [`Policy`] trait and `fcfs`, `sjf-bert`, `sprpt`, `trail`, `oracle`.
//! - [`scheduler`]: iteration-level batching, chunked prefill, policy and memory preemption by
//!   recompute ([`Scheduler`]).
//! - [`metrics`]: engine statistics with vLLM's latency histograms ([`EngineStats`]; their
//!   Prometheus exposition is the serving shim's).
//! - [`steps`]: the step log ([`StepRecord`], `steps.parquet`) and the step-time model fitted
//!   to it ([`StepTimeModel`]).
//! - [`error`]: the typed errors of the above.

pub mod block;
pub mod clock;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod scheduler;
pub mod sequence;
pub mod steps;

pub use block::{AllocStatus, BlockManager};
pub use clock::{Clock, ManualClock, SystemClock, VirtualTime};
pub use error::{BlockError, SchedulerError, StepLogError, StepModelError};
pub use metrics::{EngineStats, Histogram};
pub use policy::{Fcfs, Oracle, Policy, PolicyKind, SjfBert, Sprpt, Trail};
pub use scheduler::{
    Chunk, Counters, PreemptKind, PreemptionMode, Scheduler, SchedulerConfig, StepPlan, StepResult,
};
pub use sequence::{FinishReason, SeqId, SeqState, Sequence, Timestamps};
pub use steps::{StepRecord, StepSample, StepShape, StepTimeModel};
