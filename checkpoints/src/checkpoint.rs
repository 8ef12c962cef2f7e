//! The checkpoint file: one safetensors file with the decode probe, the optional prompt
//! predictor and their standardizations, plus metadata in the safetensors string map.
//!
//! Tensors (f32): `probe.{w1,b1,w2,b2,mean,std}` and, when present, `prompt.{…}`. `w1` is
//! h×d and `w2` k×h (PyTorch `Linear` layout). Metadata keys: see [`CheckpointMeta`]; lists are
//! JSON arrays, numbers decimal strings. `format` is `"trail-checkpoint"`, `format_version`
//! 1 or [`FORMAT_VERSION`].
//!
//! # Versions
//! - **1**: the paper's predictor: k length bins, the probe reads the layers' states alone,
//!   the filter multiplies by the probe's posterior as it is.
//! - **2** (predictor v2): adds `bins_cap_class` (a "runs to the cap" class after the length
//!   bins, read out as the request's own cap minus the tokens generated), `g_input` (the probe
//!   reads the tokens generated as two more inputs, [`g_features`]), and `label_prior` with
//!   `likelihood_exponent` (the filter's calibrated likelihood,
//!   [`crate::Filter::with_likelihood`]).
//!
//! A checkpoint that uses none of v2's features is written as version 1, byte for byte what
//! a v1 build wrote; a v1 file loads and serves as before. A newer version is refused with an
//! error naming it and how to re-export.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::bins::Bins;
use crate::probe::{Probe, Standardizer};
use crate::{Error, Result};

pub const FORMAT: &str = "trail-checkpoint";
/// The newest version this build reads and writes (see the module docs).
pub const FORMAT_VERSION: u32 = 2;

/// The probe's inputs for the tokens generated, appended after the layers' states when
/// [`CheckpointMeta::g_input`] is set: `g / max` and `ln(1 + g)` (`max` the bins' `max`).
pub fn g_features(g: u32, max: u32) -> [f32; 2] {
    let g = f64::from(g);
    [(g / f64::from(max.max(1))) as f32, g.ln_1p() as f32]
}

/// The longest refine interval a checkpoint (or `--refine-every`) may name, in tokens: longer
/// than any context, so a larger one can only be a mistake or an attack.
pub const MAX_REFINE_INTERVAL: u32 = 1 << 16;

/// Bounds on the metadata numbers that size memory or arithmetic, checked on load.
const MAX_HIDDEN_SIZE: u64 = 1 << 20;
const MAX_BINS: u64 = 1 << 16;

/// Everything about a checkpoint besides its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// sha256 of the LLM weights file the probe reads.
    pub model_sha256: String,
    /// The runner's kernel id (numerics of the hidden states).
    pub kernel_id: String,
    /// Decoder layers the decode probe reads (concatenated in this order).
    pub probe_layers: Vec<usize>,
    /// Layers the prompt predictor reads (mean over prompt tokens); empty without one.
    pub prompt_layers: Vec<usize>,
    /// The LLM's hidden size (per layer).
    pub hidden_size: usize,
    pub bins: Bins,
    pub refine_interval: u32,
    /// sha256 of the training data ([`crate::Dataset::sha256`] or the dataset's own hash).
    pub train_data_sha256: String,
    pub val_mae: f64,
    pub prompt_val_mae: Option<f64>,
    pub git_commit: String,
    /// The decode probe also reads the tokens generated ([`g_features`]); version 2.
    pub g_input: bool,
    /// The training label frequencies the filter divides the probe's posterior by, raised to
    /// `likelihood_exponent` (none: the paper's update); version 2.
    pub label_prior: Option<Vec<f64>>,
    pub likelihood_exponent: f64,
}

impl CheckpointMeta {
    /// The decode probe's input width: the layers' states, plus two with [`g_features`].
    pub fn probe_dim(&self) -> usize {
        self.hidden_size * self.probe_layers.len() + if self.g_input { 2 } else { 0 }
    }

    /// Whether the checkpoint uses a feature of format version 2.
    pub fn is_v2(&self) -> bool {
        self.bins.cap_class() || self.g_input || self.label_prior.is_some()
    }

    /// The version [`Checkpoint::save`] writes: 1 unless a v2 feature is used.
    pub fn format_version(&self) -> u32 {
        if self.is_v2() { 2 } else { 1 }
    }

    /// The serving filter of this checkpoint refreshing every `interval` tokens: its bins, and
    /// its calibrated likelihood where it has one.
    pub fn filter(&self, interval: u32) -> crate::Filter {
        let f = crate::Filter::new(self.bins, interval, crate::Between::CountDown);
        match &self.label_prior {
            Some(prior) => f.with_likelihood(prior, self.likelihood_exponent),
            None => f,
        }
    }
}

/// A decode probe, an optional prompt predictor, and their metadata.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub probe: Probe,
    pub prompt: Option<Probe>,
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn vec_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Checkpoint {
    fn check(&self) -> Result<()> {
        let m = &self.meta;
        // 0 is allowed: a BERT checkpoint does not refine.
        if m.refine_interval > MAX_REFINE_INTERVAL {
            return Err(Error::Invalid(format!(
                "refine_interval {} is above its bound of {MAX_REFINE_INTERVAL} tokens",
                m.refine_interval
            )));
        }
        let want = m.probe_dim();
        if self.probe.dim() != want || self.probe.k() != m.bins.k() {
            return Err(Error::Invalid(format!(
                "probe is {}→{} but metadata says {} layers × {} hidden{} → {} bins",
                self.probe.dim(),
                self.probe.k(),
                m.probe_layers.len(),
                m.hidden_size,
                if m.g_input { " + 2 (g)" } else { "" },
                m.bins.k()
            )));
        }
        if let Some(p) = &m.label_prior
            && (p.len() != m.bins.k() || p.iter().any(|x| !(x.is_finite() && *x >= 0.0)))
        {
            return Err(Error::Invalid(format!(
                "label_prior has {} entries (want {}, finite and ≥ 0)",
                p.len(),
                m.bins.k()
            )));
        }
        if !(m.likelihood_exponent.is_finite() && (0.0..=4.0).contains(&m.likelihood_exponent)) {
            return Err(Error::Invalid(format!(
                "likelihood_exponent {} is outside 0..=4",
                m.likelihood_exponent
            )));
        }
        if let Some(p) = &self.prompt
            && (p.dim() != m.hidden_size * m.prompt_layers.len() || p.k() != m.bins.k())
        {
            return Err(Error::Invalid(format!(
                "prompt predictor is {}→{} but metadata says {} layers × {} hidden → {} bins",
                p.dim(),
                p.k(),
                m.prompt_layers.len(),
                m.hidden_size,
                m.bins.k()
            )));
        }
        Ok(())
    }

    /// Write the checkpoint (via a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check()?;
        let m = &self.meta;
        let mut meta: HashMap<String, String> = HashMap::new();
        let json = |v: &[usize]| serde_json::to_string(v).expect("usize list serializes");
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), m.format_version().to_string());
        meta.insert("model_sha256".into(), m.model_sha256.clone());
        meta.insert("kernel_id".into(), m.kernel_id.clone());
        meta.insert("probe_layers".into(), json(&m.probe_layers));
        meta.insert("prompt_layers".into(), json(&m.prompt_layers));
        meta.insert("hidden_size".into(), m.hidden_size.to_string());
        meta.insert("bins_k".into(), m.bins.length_bins().to_string());
        meta.insert("bins_max".into(), m.bins.max().to_string());
        meta.insert("refine_interval".into(), m.refine_interval.to_string());
        meta.insert("train_data_sha256".into(), m.train_data_sha256.clone());
        meta.insert("val_mae".into(), m.val_mae.to_string());
        if let Some(v) = m.prompt_val_mae {
            meta.insert("prompt_val_mae".into(), v.to_string());
        }
        meta.insert("git_commit".into(), m.git_commit.clone());
        if m.is_v2() {
            meta.insert("bins_cap_class".into(), m.bins.cap_class().to_string());
            meta.insert("g_input".into(), m.g_input.to_string());
            if let Some(p) = &m.label_prior {
                let list = serde_json::to_string(p).expect("f64 list serializes");
                meta.insert("label_prior".into(), list);
                meta.insert(
                    "likelihood_exponent".into(),
                    m.likelihood_exponent.to_string(),
                );
            }
        }

        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut push = |prefix: &str, p: &Probe| -> Result<()> {
            owned.push((
                format!("{prefix}.w1"),
                p.w1.dims().to_vec(),
                f32_bytes(&p.w1)?,
            ));
            owned.push((
                format!("{prefix}.b1"),
                p.b1.dims().to_vec(),
                f32_bytes(&p.b1)?,
            ));
            owned.push((
                format!("{prefix}.w2"),
                p.w2.dims().to_vec(),
                f32_bytes(&p.w2)?,
            ));
            owned.push((
                format!("{prefix}.b2"),
                p.b2.dims().to_vec(),
                f32_bytes(&p.b2)?,
            ));
            let d = p.dim();
            owned.push((
                format!("{prefix}.mean"),
                vec![d],
                vec_bytes(&p.standardizer.mean),
            ));
            owned.push((
                format!("{prefix}.std"),
                vec![d],
                vec_bytes(&p.standardizer.std),
            ));
            Ok(())
        };
        push("probe", &self.probe)?;
        if let Some(p) = &self.prompt {
            push("prompt", p)?;
        }
        write_safetensors(path, Dtype::F32, &owned, meta)
    }

    /// Read a checkpoint; any damage is a [`Error::Format`] naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(path, e))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format_err(path, e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<&String> {
            meta.get(k)
                .ok_or_else(|| format_err(path, format!("metadata lacks `{k}`")))
        };
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| format_err(path, format!("metadata `{k}` is not a number")))
        };
        // A number that sizes memory, at most `max` (a clear error rather than a wrap or a
        // huge allocation).
        let bounded = |k: &str, max: u64| -> Result<u64> {
            let v = num(k)?;
            if v > max {
                return Err(format_err(
                    path,
                    format!("metadata `{k}` = {v} is above its bound {max}"),
                ));
            }
            Ok(v)
        };
        let list = |k: &str| -> Result<Vec<usize>> {
            serde_json::from_str(get(k)?)
                .map_err(|_| format_err(path, format!("metadata `{k}` is not a list")))
        };
        if get("format")? != FORMAT {
            return Err(format_err(
                path,
                "metadata `format` is not trail-checkpoint",
            ));
        }
        let version = num("format_version")?;
        if !(1..=FORMAT_VERSION as u64).contains(&version) {
            return Err(format_err(
                path,
                format!(
                    "checkpoint format version {version}; this build reads versions 1 to \
                     {FORMAT_VERSION}: re-export it with this build's `trail export --run RUN \
                     --out FILE` (or use the trail that wrote it)"
                ),
            ));
        }
        // A v2 key in a v1 file, or a flag that is not a boolean, is damage.
        let flag = |k: &str| -> Result<bool> {
            match (meta.get(k), version) {
                (None, _) => Ok(false),
                (Some(_), 1) => Err(format_err(
                    path,
                    format!("metadata `{k}` needs format version 2, the file says 1"),
                )),
                (Some(v), _) => v
                    .parse()
                    .map_err(|_| format_err(path, format!("metadata `{k}` is not true/false"))),
            }
        };
        let bins_max = bounded("bins_max", u32::MAX.into())? as u32;
        let mut bins = Bins::new(bounded("bins_k", MAX_BINS)? as usize, bins_max)
            .map_err(|e| format_err(path, e))?;
        if flag("bins_cap_class")? {
            bins = bins.with_cap_class();
        }
        let float = |k: &str| -> Result<f64> {
            get(k)?
                .parse()
                .map_err(|_| format_err(path, format!("metadata `{k}` is not a number")))
        };
        let m = CheckpointMeta {
            model_sha256: get("model_sha256")?.clone(),
            kernel_id: get("kernel_id")?.clone(),
            probe_layers: list("probe_layers")?,
            prompt_layers: list("prompt_layers")?,
            hidden_size: bounded("hidden_size", MAX_HIDDEN_SIZE)? as usize,
            bins,
            refine_interval: bounded("refine_interval", MAX_REFINE_INTERVAL.into())? as u32,
            train_data_sha256: get("train_data_sha256")?.clone(),
            val_mae: float("val_mae")?,
            prompt_val_mae: match meta.get("prompt_val_mae") {
                Some(_) => Some(float("prompt_val_mae")?),
                None => None,
            },
            git_commit: get("git_commit")?.clone(),
            g_input: flag("g_input")?,
            label_prior: match meta.get("label_prior") {
                None => None,
                Some(_) if version == 1 => {
                    return Err(format_err(
                        path,
                        "metadata `label_prior` needs format version 2, the file says 1",
                    ));
                }
                Some(text) => Some(serde_json::from_str(text).map_err(|_| {
                    format_err(path, "metadata `label_prior` is not a list of numbers")
                })?),
            },
            likelihood_exponent: match meta.get("likelihood_exponent") {
                None => 0.0,
                Some(_) => float("likelihood_exponent")?,
            },
        };
        let tensor = |name: &str| -> Result<Tensor> {
            let v = st
                .tensor(name)
                .map_err(|e| format_err(path, format!("{name}: {e}")))?;
            if v.dtype() != Dtype::F32 {
                return Err(format_err(
                    path,
                    format!("{name} is {:?}, expected F32", v.dtype()),
                ));
            }
            let data: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Ok(Tensor::from_vec(data, v.shape(), &Device::Cpu)?)
        };
        let vec = |name: &str| -> Result<Vec<f32>> { Ok(tensor(name)?.to_vec1()?) };
        let probe = |prefix: &str| -> Result<Probe> {
            let st = Standardizer {
                mean: vec(&format!("{prefix}.mean"))?,
                std: vec(&format!("{prefix}.std"))?,
            };
            Probe::new(
                st,
                tensor(&format!("{prefix}.w1"))?,
                tensor(&format!("{prefix}.b1"))?,
                tensor(&format!("{prefix}.w2"))?,
                tensor(&format!("{prefix}.b2"))?,
            )
            .map_err(|e| format_err(path, e))
        };
        let has_prompt = st.names().iter().any(|n| n.starts_with("prompt."));
        let ckpt = Self {
            meta: m,
            probe: probe("probe")?,
            prompt: if has_prompt {
                Some(probe("prompt")?)
            } else {
                None
            },
        };
        ckpt.check().map_err(|e| format_err(path, e))?;
        Ok(ckpt)
    }

    /// [`Checkpoint::load`], then refuse a checkpoint made for another model or hidden size.
    pub fn load_for(path: &Path, model_sha256: &str, hidden_size: usize) -> Result<Self> {
        let c = Self::load(path)?;
        if c.meta.model_sha256 != model_sha256 {
            return Err(Error::ModelMismatch {
                path: path.to_path_buf(),
                expected: model_sha256.to_string(),
                found: c.meta.model_sha256,
            });
        }
        if c.meta.hidden_size != hidden_size {
            return Err(Error::HiddenMismatch {
                path: path.to_path_buf(),
                expected: hidden_size,
                found: c.meta.hidden_size,
            });
        }
        Ok(c)
    }
}

/// Writes `(name, shape, little-endian bytes)` tensors of one dtype with metadata as
/// safetensors, atomically (`trail_fs`). The header's keys are sorted, so the same
/// tensors and metadata always give the same bytes (the safetensors crate writes its metadata
/// map in hash order).
pub(crate) fn write_safetensors(
    path: &Path,
    dtype: Dtype,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(dtype, s.clone(), b).map_err(|e| format_err(path, e))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut bytes = safetensors::serialize(views, Some(meta)).map_err(|e| format_err(path, e))?;
    sort_header(&mut bytes).map_err(|e| format_err(path, e))?;
    Ok(trail_fs::write_atomic(path, &bytes)?)
}

/// Rewrites a serialized safetensors header with its JSON keys sorted, in place: the same
/// object in another key order has the same length.
fn sort_header(bytes: &mut [u8]) -> std::result::Result<(), String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = &bytes[8..8 + n];
    let text = std::str::from_utf8(header).map_err(|e| e.to_string())?;
    let trimmed = text.trim_end();
    // serde_json's Map is a BTreeMap here (no preserve_order), so this sorts every level.
    let value: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| e.to_string())?;
    let sorted = serde_json::to_string(&value).map_err(|e| e.to_string())?;
    if sorted.len() != trimmed.len() {
        return Err(format!(
            "sorted header is {} bytes, the original {}",
            sorted.len(),
            trimmed.len()
        ));
    }
    bytes[8..8 + sorted.len()].copy_from_slice(sorted.as_bytes());
    Ok(())
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tensors and metadata give the same bytes whatever the metadata map's order,
    /// and the file still reads back with every key and tensor.
    #[test]
    fn safetensors_files_are_byte_stable() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("b".to_string(), vec![2], vec_bytes(&[1.0, 2.0])),
            ("a".to_string(), vec![1], vec_bytes(&[3.0])),
        ];
        let mut files = Vec::new();
        for i in 0..8 {
            let meta: HashMap<String, String> = (0..12)
                .map(|k| (format!("key{}", (k + i) % 12), format!("value {k}")))
                .map(|(k, _)| (k.clone(), format!("v-{k}")))
                .collect();
            let path = dir.path().join(format!("{i}.safetensors"));
            write_safetensors(&path, Dtype::F32, &tensors, meta).unwrap();
            files.push(std::fs::read(&path).unwrap());
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]));
        let (_, header) = SafeTensors::read_metadata(&files[0]).unwrap();
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta.len(), 12);
        assert_eq!(meta["key3"], "v-key3");
        let st = SafeTensors::deserialize(&files[0]).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &vec_bytes(&[3.0])[..]);
    }
}
