//! The model's hyper-parameters ([`Config`]), read from the `llama.*` GGUF metadata; every part
//! of the forward (cache, rows, attention, the model) reads its shapes here.

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;

/// Hyper-parameters, named as in HF `LlamaConfig`, read from `llama.*` GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
}

impl Config {
    /// Reads the `llama.*` keys. `head_count_kv` and `rope.freq_base` are optional in the GGUF
    /// spec (defaults: `head_count`, 10000); the others are required.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.architecture()?;
        if arch != "llama" {
            return Err(LlmError::Architecture {
                path: gguf.path().to_path_buf(),
                found: arch.to_string(),
            });
        }
        let hidden_size = gguf.count("llama.embedding_length")?;
        let num_attention_heads = gguf.count("llama.attention.head_count")?;
        let num_key_value_heads = if gguf.has("llama.attention.head_count_kv") {
            gguf.count("llama.attention.head_count_kv")?
        } else {
            num_attention_heads
        };
        let bad = |key: &str, reason: String| LlmError::BadKey {
            path: gguf.path().to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if !hidden_size.is_multiple_of(num_attention_heads) {
            return Err(bad(
                "llama.attention.head_count",
                format!("{num_attention_heads} heads do not divide {hidden_size}"),
            ));
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(bad(
                "llama.attention.head_count_kv",
                format!("{num_key_value_heads} kv heads do not divide {num_attention_heads}"),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;
        if head_dim % 2 != 0 {
            return Err(bad(
                "llama.embedding_length",
                format!("odd head dim {head_dim}"),
            ));
        }
        if gguf.has("llama.rope.dimension_count") {
            let rope = gguf.count("llama.rope.dimension_count")?;
            if rope != head_dim {
                return Err(bad(
                    "llama.rope.dimension_count",
                    format!("partial RoPE ({rope} of {head_dim}) is not supported"),
                ));
            }
        }
        let rope_theta = if gguf.has("llama.rope.freq_base") {
            gguf.float("llama.rope.freq_base")?
        } else {
            10_000.0
        };
        let vocab_size = gguf.tensor_info("token_embd.weight")?.shape.dims()[0];
        Ok(Self {
            hidden_size,
            intermediate_size: gguf.count("llama.feed_forward_length")?,
            num_hidden_layers: gguf.count("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: gguf.float("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta,
            max_position_embeddings: gguf.count("llama.context_length")?,
            vocab_size,
        })
    }

    /// Width of a token's keys (or values): KV heads × head size.
    pub(crate) fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Width of a token's queries: attention heads × head size.
    pub(crate) fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
}
