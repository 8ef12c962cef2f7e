//! Typed errors of the serving shim: the engine's own, and (re-exported) those of the
//! scheduling core it drives.

pub use trail_scheduler::error::{BlockError, SchedulerError, StepLogError};

/// Errors of the [`Engine`](crate::engine::Engine).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The scheduler refused or failed.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The model failed.
    #[error("model: {0}")]
    Llm(#[from] trail_llm::LlmError),
    /// The predictor's checkpoint failed.
    #[error("predictor: {0}")]
    Checkpoint(#[from] trail_checkpoints::Error),
    /// The predictor does not fit the model.
    #[error("predictor: {0}")]
    Predictor(String),
    /// Prompt plus `max_tokens` beyond the model's context.
    #[error(
        "prompt of {prompt} tokens + max_tokens {max_new} exceeds the context of {context} tokens"
    )]
    ContextExceeded {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_new: usize,
        /// The model's context length.
        context: usize,
    },
    /// An evaluation stop of zero tokens, or beyond the request's cap.
    #[error("eval_output_tokens = {eval_stop} must be between 1 and max_tokens = {max_new}")]
    EvalStop {
        /// The evaluation stop asked for.
        eval_stop: usize,
        /// The request's cap.
        max_new: usize,
    },
    /// The engine was configured in a way it cannot run.
    #[error("engine configuration: {0}")]
    Config(String),
    /// A replayed request's recording does not match what the engine asks of it (made with
    /// another model, checkpoint or refresh interval).
    #[error("replay: {0}")]
    Replay(String),
    /// An invariant between the scheduler's plan and the engine's state broke (a bug).
    #[error("internal: {0}")]
    Internal(String),
    /// The engine is shutting down and admits nothing.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The engine thread is gone.
    #[error("the engine stopped: {0}")]
    Stopped(String),
}
