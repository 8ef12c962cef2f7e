//! The backends a cell's server is driven through, beside the executor and the fixed-delay
//! test backend of `trail_eval::loadgen` (which needs neither an HTTP client nor the model):
//!
//! * [`http`]: an OpenAI-compatible server over HTTP ([`HttpBackend`]), like vLLM's
//!   `benchmark_serving.py`.
//! * [`engine`]: a serving-shim engine in this process ([`EngineBackend`]), on the wall clock
//!   or replaying a whole trace on virtual time.

pub mod engine;
pub mod http;

pub use engine::EngineBackend;
pub use http::HttpBackend;
