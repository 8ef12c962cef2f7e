//! [`BertPrior`]: the exported fine-tuned BERT (`bert.safetensors`, written by `trail export
//! --bert`) as a prompt → total-output-length predictor, the prediction SJF-BERT schedules by
//! before a request is admitted. The file carries everything: weights in f16, and in its
//! metadata the BERT `config.json`, `tokenizer.json`, the bins and the head's size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::bert_tune::TunedBert;
use crate::bins::Bins;
use crate::{Error, Result};

/// A fine-tuned BERT and its bins.
pub struct BertPrior {
    model: TunedBert,
    bins: Bins,
    path: PathBuf,
}

impl std::fmt::Debug for BertPrior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertPrior")
            .field("path", &self.path)
            .field("bins", &self.bins)
            .finish()
    }
}

impl BertPrior {
    /// Loads a `bert.safetensors` written by `trail export --bert`; a missing metadata key is an
    /// error naming the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let format = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            meta.get(key).ok_or_else(|| {
                format(format!(
                    "metadata has no `{key}` (not written by `trail export --bert`?)"
                ))
            })
        };
        if get("format")? != "trail-bert" {
            return Err(format("metadata `format` is not `trail-bert`".into()));
        }
        let num = |key: &str| -> Result<usize> {
            get(key)?
                .parse::<usize>()
                .map_err(|e| format(format!("metadata `{key}`: {e}")))
        };
        let bins = Bins::new(num("bins_k")?, num("bins_max")? as u32)?;
        // Written since predictor v2; absent (false) in earlier files.
        let bins = match meta.get("bins_cap_class").map(String::as_str) {
            None | Some("false") => bins,
            Some("true") => bins.with_cap_class(),
            Some(v) => return Err(format(format!("metadata `bins_cap_class` is `{v}`"))),
        };
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let write = |name: &str, key: &str| -> Result<PathBuf> {
            let p = dir.path().join(name);
            trail_fs::write_atomic(&p, get(key)?.as_bytes())?;
            Ok(p)
        };
        let config = write("config.json", "config_json")?;
        let tokenizer = write("tokenizer.json", "tokenizer_json")?;
        let model = TunedBert::load(
            path,
            &config,
            &tokenizer,
            bins.k(),
            num("head_hidden")?,
            num("max_len")?,
        )?;
        Ok(Self {
            model,
            bins,
            path: path.to_path_buf(),
        })
    }

    /// The bins the head classifies into.
    pub fn bins(&self) -> Bins {
        self.bins
    }

    /// Predicted total output length of each prompt (the expectation over bin midpoints; the
    /// cap class, where the bins have one, read as the bins' `max`), `batch` prompts at a time.
    pub fn predict(&self, prompts: &[&str], batch: usize) -> Result<Vec<f64>> {
        let caps = vec![self.bins.max(); prompts.len()];
        self.predict_capped(prompts, &caps, batch)
    }

    /// [`BertPrior::predict`] with each prompt's own cap (the `max_tokens` its client sent):
    /// the cap class, where the bins have one, reads out that cap, never a profiled length.
    pub fn predict_capped(&self, prompts: &[&str], caps: &[u32], batch: usize) -> Result<Vec<f64>> {
        debug_assert_eq!(prompts.len(), caps.len());
        let k = self.bins.k();
        let probs = self.model.predict_proba(prompts, batch)?;
        Ok(probs
            .chunks_exact(k)
            .zip(caps)
            .map(|(p, &cap)| self.bins.readout(p, f64::from(cap)))
            .collect())
    }
}
