//! BERT baseline: a prompt-only total-length predictor from a sentence encoder.
//!
//! all-MiniLM-L6-v2 (6 layers, hidden 384) run with candle-transformers' `BertModel`,
//! tokenized by `tokenizers` from the model's `tokenizer.json`, truncated to `max_len` tokens
//! (sentence-transformers uses 256 for this model). The sentence embedding follows
//! sentence-transformers' modules for it (`modules.json`: Transformer → Pooling(mean) →
//! Normalize): mean over the tokens the attention mask keeps, then L2 normalization. The frozen
//! baseline trains the usual MLP head ([`crate::train_probe`]) on these embeddings against total
//! length bins.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{Error, Result};

/// A frozen sentence encoder.
pub struct BertEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    hidden: usize,
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

impl BertEncoder {
    /// Load `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: Config =
            serde_json::from_str(&text).map_err(|e| format_err(&config_path, e))?;
        let hidden: usize = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["hidden_size"].as_u64())
            .ok_or_else(|| format_err(&config_path, "no hidden_size"))?
            as usize;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| format_err(&tok_path, e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| format_err(&tok_path, e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let weights: PathBuf = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::Io {
                path: weights,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        // SAFETY: the file is memory-mapped read-only; nobody in this process writes it.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&weights),
                DType::F32,
                &Device::Cpu,
            )
        }
        .map_err(|e| format_err(&weights, e))?;
        let model = BertModel::load(vb, &config).map_err(|e| format_err(&weights, e))?;
        Ok(Self {
            model,
            tokenizer,
            hidden,
        })
    }

    /// Embedding width (384 for MiniLM-L6).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Sentence embeddings of `texts` (n×hidden, row-major): masked mean pooling, then L2
    /// normalization. Texts are encoded together (padded to the longest).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Invalid(format!("tokenizing: {e}")))?;
        let (n, t) = (enc.len(), enc[0].get_ids().len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            enc.iter().flat_map(|e| f(e).to_vec()).collect()
        };
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (n, t), &dev)?;
        let types = Tensor::from_vec(flat(&|e| e.get_type_ids()), (n, t), &dev)?;
        let mask = Tensor::from_vec(flat(&|e| e.get_attention_mask()), (n, t), &dev)?;
        let out = self.model.forward(&ids, &types, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = out.broadcast_mul(&m)?.sum(1)?;
        let count = m.sum(1)?.clamp(1e-9, f32::MAX)?;
        let mean = summed.broadcast_div(&count)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.flatten_all()?.to_vec1()?)
    }

    /// [`BertEncoder::embed`] in chunks of `batch` texts.
    pub fn embed_batched(&self, texts: &[&str], batch: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len() * self.hidden);
        for chunk in texts.chunks(batch.max(1)) {
            out.extend(self.embed(chunk)?);
        }
        Ok(out)
    }
}
