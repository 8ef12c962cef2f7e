//! trail-llm: the target-model runner and model fetching.
//!
//! [`Runner`] loads any llama-architecture GGUF (weights in their block formats, tokenizer and
//! chat template from the metadata) and generates; [`Llama::step`] is the batched forward the
//! serving engine drives: rows of different lengths (prefill chunks and decode tokens) in one
//! step, each with its own [`KvCache`], returning logits and the hidden states of the layers in
//! a [`LayerSet`]. Results are bit-identical per row whatever the batch, and prefill ≡ decode;
//! [`Runner::kernel_id`] names the numerics that make them so. [`hub`] fetches models. The
//! `testing` module (unit tests, or the `testing` feature) writes tiny random GGUF models.

mod attention;
pub mod batch;
pub mod cache;
pub mod config;
pub mod device;
pub mod encoder;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod layers;
pub mod linear;
pub mod model;
mod ops;
mod rope;
pub mod runner;
pub mod sampler;
mod scratch;
pub mod step;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;

pub use cache::KvFormat;
pub use device::Device;
pub use error::{LlmError, Result};
pub use layers::LayerSet;
pub use linear::QLinear;
pub use model::{Config, KvCache, Llama, Row, StepOutput};
pub use runner::{GenerateOptions, Generation, Runner, StopReason, numerics_key, same_numerics};
pub use sampler::{Sampler, Sampling};
pub use tokenizer::{ChatTemplate, Message};
