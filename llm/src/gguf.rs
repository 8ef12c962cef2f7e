//! The GGUF file: metadata getters and raw tensor reads that name the file and key on error.
//!
//! Parsing is candle's `gguf_file`; tensor bytes are read here, straight into the typed block
//! vectors of [`crate::linear::QLinear`], so weights are held once and stay in their file format.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};

use crate::error::{LlmError, Result};

/// An open GGUF file: parsed header and metadata, tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    len: u64,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses `path` (header, metadata and tensor table).
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| LlmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let content = Content::read(&mut file).map_err(|source| LlmError::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")
    }

    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| LlmError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    fn bad(&self, key: &str, reason: impl Into<String>) -> LlmError {
        LlmError::BadKey {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// An integer of any GGUF integer type, as `u64`.
    pub fn uint(&self, key: &str) -> Result<u64> {
        let v = match self.value(key)? {
            Value::U8(v) => Some(*v as u64),
            Value::U16(v) => Some(*v as u64),
            Value::U32(v) => Some(*v as u64),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        v.ok_or_else(|| self.bad(key, "expected a non-negative integer"))
    }

    /// A `usize` that must be positive.
    pub fn count(&self, key: &str) -> Result<usize> {
        match self.uint(key)? {
            0 => Err(self.bad(key, "must be positive")),
            v => usize::try_from(v).map_err(|_| self.bad(key, "too large")),
        }
    }

    pub fn float(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            _ => Err(self.bad(key, "expected a float")),
        }
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        match self.value(key)? {
            Value::String(s) => Ok(s),
            _ => Err(self.bad(key, "expected a string")),
        }
    }

    pub fn array(&self, key: &str) -> Result<&[Value]> {
        match self.value(key)? {
            Value::Array(v) => Ok(v),
            _ => Err(self.bad(key, "expected an array")),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.bad(key, "expected an array of strings")),
            })
            .collect()
    }

    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::U8(v) => Ok(*v as i64),
                Value::I8(v) => Ok(*v as i64),
                Value::U16(v) => Ok(*v as i64),
                Value::I16(v) => Ok(*v as i64),
                Value::U32(v) => Ok(*v as i64),
                Value::I32(v) => Ok(*v as i64),
                Value::I64(v) => Ok(*v),
                Value::U64(v) => Ok(*v as i64),
                _ => Err(self.bad(key, "expected an array of integers")),
            })
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor's table entry: dtype and shape in candle order (`[out, in]` for a matrix).
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LlmError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    pub fn bad_tensor(&self, name: &str, reason: impl Into<String>) -> LlmError {
        LlmError::BadTensor {
            path: self.path.clone(),
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    /// Reads the raw bytes of tensor `name` into `dst` (exactly its storage size), checking
    /// first that the file holds them all.
    pub fn read_tensor_bytes(&mut self, name: &str, dst: &mut [u8]) -> Result<()> {
        let info = self.tensor_info(name)?;
        let elems = info.shape.elem_count();
        let dtype = info.ggml_dtype;
        let want = storage_bytes(dtype, elems).ok_or_else(|| {
            self.bad_tensor(
                name,
                format!("{elems} elements are not whole {dtype:?} blocks"),
            )
        })?;
        if want != dst.len() {
            return Err(self.bad_tensor(name, format!("holds {want} bytes, not {}", dst.len())));
        }
        // A corrupt offset must not wrap around (and read the wrong bytes) or panic.
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let end = start.saturating_add(want as u64);
        if end > self.len {
            return Err(LlmError::Truncated {
                path: self.path.clone(),
                name: name.to_string(),
                need: end,
                have: self.len,
            });
        }
        let io = |source| LlmError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(start)).map_err(io)?;
        self.file.read_exact(dst).map_err(io)
    }
}

/// Bytes that `elems` values of `dtype` occupy, if they are whole blocks.
pub fn storage_bytes(dtype: GgmlDType, elems: usize) -> Option<usize> {
    let bs = dtype.block_size();
    elems
        .is_multiple_of(bs)
        .then(|| elems / bs * dtype.type_size())
}
