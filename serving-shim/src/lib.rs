//! trail-serving-shim: a continuous-batching serving engine with pluggable schedulers and the
//! TRAIL length predictor in the loop.
//!
//! The model-free part, usable by a simulator as is:
//! - [`clock`]: the [`Clock`] the scheduler reads time from ([`SystemClock`], [`ManualClock`]).
//! - [`sequence`]: a request as the scheduler sees it ([`Sequence`]): lengths, generated
//!   tokens, predictions, counters, timestamps.
//! - [`block`]: the KV budget in blocks of tokens ([`BlockManager`]).
//! - [`policy`]: the [`Policy`] trait and `fcfs`, `sjf-bert`, `sprpt`, `trail`, `oracle`.
//! - [`scheduler`]: iteration-level batching, chunked prefill, policy and memory preemption by
//!   recompute ([`Scheduler`]).
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
//! - [`metrics`]: statistics and their Prometheus exposition ([`EngineStats`]).
//! - [`http`]: the OpenAI-compatible HTTP front end (axum), every error in OpenAI's shape.
//! - [`openai`]: its wire types (requests, responses, stream chunks, the model list);
//!   `params` checks a request against the server's limits, `sse` streams its answer.
//! - [`stop`]: stop strings, looked for by the engine and cut by the front end.
//! - [`gate`]: what the front end refuses before a handler runs (foreign origins, non-JSON
//!   posts).
//! - [`listener`]: the accept loop: header-read timeout, connection cap, shutdown deadline.
//! - [`steps`]: the step log ([`StepRecord`], `steps.parquet`) for the simulator's step-time
//!   model.

mod api_error;
pub mod bert;
pub mod block;
pub mod clock;
pub mod engine;
pub mod error;
pub mod gate;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod openai;
mod params;
pub mod policy;
pub mod predictor;
pub mod recording;
pub mod request;
pub mod scheduler;
pub mod sequence;
mod sse;
pub mod steps;
pub mod stop;

pub use bert::BertPredictor;
pub use block::{AllocStatus, BlockManager};
pub use clock::{Clock, ManualClock, StepCost, SystemClock, VirtualTime};
pub use engine::{Engine, EngineConfig, EngineReport};
pub use error::{BlockError, EngineError, SchedulerError, StepLogError};
pub use metrics::{EngineStats, Histogram};
pub use policy::{Fcfs, Oracle, Policy, PolicyKind, SjfBert, Sprpt, Trail};
pub use predictor::Predictor;
pub use recording::{PredictorEvent, Recording, RecordingKey, Recordings};
pub use request::{Event, GenRequest, RequestHandle, Summary};
pub use scheduler::{
    Chunk, Counters, PreemptKind, PreemptionMode, Scheduler, SchedulerConfig, StepPlan, StepResult,
};
pub use sequence::{FinishReason, SeqId, SeqState, Sequence, Timestamps};
pub use steps::StepRecord;
pub use stop::StopStrings;
