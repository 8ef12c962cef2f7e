//! Typed errors of the model-free scheduling core: the block manager, the scheduler, the step
//! log and the step-time model.

use std::path::{Path, PathBuf};

use crate::sequence::SeqId;

/// Errors of the [`BlockManager`](crate::block::BlockManager).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// A block of zero tokens.
    #[error("block size must be at least one token")]
    ZeroBlockSize,
    /// A budget smaller than one block.
    #[error("the KV budget holds no whole block")]
    EmptyPool,
    /// More blocks than ids.
    #[error("a pool of {0} blocks is too large")]
    PoolTooLarge(usize),
    /// Memory pressure.
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        /// Blocks asked for.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// `allocate` on a sequence that already holds blocks.
    #[error("sequence {0} already holds blocks")]
    AlreadyAllocated(SeqId),
}

/// Errors of the [`Scheduler`](crate::scheduler::Scheduler).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// A configuration value out of range.
    #[error("invalid scheduler config: {0}")]
    Config(String),
    /// The KV pool could not be built.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The waiting queue is full (overload: answer 429).
    #[error("the waiting queue is full ({max_waiting} requests)")]
    Overloaded {
        /// `max_waiting` of the config.
        max_waiting: usize,
    },
    /// A request that could not run even alone in the KV pool.
    #[error(
        "prompt_len + max_new_tokens = {tokens} tokens exceeds the KV budget of {budget} tokens"
    )]
    TooLong {
        /// Prompt plus `max_new_tokens`.
        tokens: usize,
        /// KV budget in tokens.
        budget: usize,
    },
    /// A request without prompt tokens.
    #[error("request {0} has an empty prompt")]
    EmptyPrompt(SeqId),
    /// A request asking for no tokens.
    #[error("request {0} asks for max_new_tokens = 0")]
    NoNewTokens(SeqId),
    /// An id already in use.
    #[error("request id {0} is already in use")]
    DuplicateId(SeqId),
    /// A step result for a sequence the last plan did not schedule.
    #[error("step result for sequence {0}, which the last plan did not schedule")]
    Unscheduled(SeqId),
    /// A planned sequence reached the end of its context but got no token.
    #[error("sequence {0} completed its chunk but the step reported no token")]
    MissingToken(SeqId),
    /// A token reported for a sequence whose chunk did not reach the end of its context.
    #[error("sequence {0} got a token in the middle of its prefill")]
    UnexpectedToken(SeqId),
    /// `on_step_done` without a plan in flight.
    #[error("on_step_done called without a step in flight")]
    NoStepInFlight,
    /// `schedule` while the previous plan is still in flight.
    #[error("schedule called while a step is in flight")]
    StepInFlight,
}

/// Errors of the step log ([`steps`](crate::steps)); each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StepLogError {
    /// Reading, writing or renaming the file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The parquet layer.
    #[error("{}: parquet: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: parquet::errors::ParquetError,
    },
    /// The arrow layer.
    #[error("{}: arrow: {source}", path.display())]
    Arrow {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: arrow::error::ArrowError,
    },
    /// A missing, mistyped or nullable column.
    #[error("{}: {detail}", path.display())]
    Schema {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl StepLogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Errors of fitting the step-time model ([`StepTimeModel::fit`](crate::steps::StepTimeModel::fit))
/// or of checking one read from a file ([`StepTimeModel::check`](crate::steps::StepTimeModel::check)).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepModelError {
    /// No steps to fit.
    #[error("empty sample: at least one step is needed")]
    NoSteps,
    /// A step time that is negative, infinite or NaN.
    #[error("step time {0} must be a finite number")]
    BadStepTime(f64),
    /// A coefficient of a model read from a file that is negative, infinite or NaN.
    #[error("{name} = {value}: a step-model coefficient must be a finite number ≥ 0")]
    BadCoefficient {
        /// The field.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// A KV capacity of 0 tokens.
    #[error("kv_capacity_tokens must be at least 1")]
    NoCapacity,
}
