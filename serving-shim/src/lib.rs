//! trail-serving-shim: a continuous-batching serving engine with pluggable schedulers and the
//! TRAIL length predictor in the loop.
//!
//! The model-free part is its own crate, `trail-scheduler`, re-exported here under the same
//! paths (a simulator depends on it alone):
//! - [`clock`]: the [`Clock`] the scheduler reads time from ([`SystemClock`], [`ManualClock`]),
//!   and [`VirtualTime`], stepped by a [`StepTimeModel`].
//! - [`sequence`]: a request as the scheduler sees it ([`Sequence`]): lengths, generated
//!   tokens, predictions, counters, timestamps.
//! - [`block`]: the KV budget in blocks of tokens ([`BlockManager`]).
//! - [`policy`]: the [`Policy`] trait and `fcfs`, `sjf-bert`, `sprpt`, `trail`, `oracle`.
//! - [`scheduler`]: iteration-level batching, chunked prefill, policy and memory preemption by
//!   recompute ([`Scheduler`]).
//! - [`metrics`]: statistics with vLLM's latency histograms ([`EngineStats`]).
//! - [`steps`]: the step log ([`StepRecord`], `steps.parquet`) and the step-time model fitted
//!   to it ([`StepTimeModel`]).
//!
//! Over the real model:
//! - [`predictor`]: the TRAIL probe and Bayesian filter in the loop ([`Predictor`]).
//! - [`bert`]: initial length predictions from the prompt by the fine-tuned BERT, batched on
//!   its own thread ([`BertPredictor`]).
//! - [`request`]: a request as callers see it ([`GenRequest`], its [`Event`]s, its
//!   [`Summary`], its [`RequestHandle`]).
//! - [`engine`]: the engine thread over the `trail-llm` runner ([`Engine`]).
//! - [`recording`]: requests' tokens and predictor outputs, replayed by engines on virtual
//!   time instead of running the model again ([`Recordings`]).
//! - [`http`]: the OpenAI-compatible HTTP front end (axum), every error in OpenAI's shape.
//! - [`openai`]: its wire types (requests, responses, stream chunks, the model list);
//!   `params` checks a request against the server's limits, `sse` streams its answer.
//! - [`stop`]: stop strings, looked for by the engine and cut by the front end.
//! - [`prometheus`]: the Prometheus exposition of the statistics, under vLLM's names where the
//!   meaning is the same.
//! - [`gate`]: what the front end refuses before a handler runs (foreign origins, non-JSON
//!   posts).
//! - [`listener`]: the accept loop: header-read timeout, connection cap, shutdown deadline.
//! - [`error`]: the engine's errors ([`EngineError`]) and the scheduling core's.

mod api_error;
pub mod bert;
pub mod engine;
pub mod error;
pub mod gate;
pub mod http;
pub mod listener;
pub mod openai;
mod params;
pub mod predictor;
pub mod prometheus;
pub mod recording;
pub mod request;
mod sse;
pub mod stop;

pub use trail_scheduler::{block, clock, metrics, policy, scheduler, sequence, steps};

pub use bert::BertPredictor;
pub use engine::{Engine, EngineConfig, EngineReport};
pub use error::{BlockError, EngineError, SchedulerError, StepLogError};
pub use predictor::Predictor;
pub use recording::{PredictorEvent, Recording, RecordingKey, Recordings};
pub use request::{Event, GenRequest, RequestHandle, Summary};
pub use stop::StopStrings;
pub use trail_scheduler::{
    AllocStatus, BlockManager, Chunk, Clock, Counters, EngineStats, Fcfs, FinishReason, Histogram,
    ManualClock, Oracle, Policy, PolicyKind, PreemptKind, PreemptionMode, Scheduler,
    SchedulerConfig, SeqId, SeqState, Sequence, SjfBert, Sprpt, StepModelError, StepPlan,
    StepRecord, StepResult, StepSample, StepShape, StepTimeModel, SystemClock, Timestamps, Trail,
    VirtualTime,
};
