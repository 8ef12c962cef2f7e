//! The columns of a generation run's parquet files, and the names of its paths.
//!
//! `requests.parquet`, one row per request:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `request_id` | utf8 | [`crate::prompt::request_id`] of dataset and prompt |
//! | `dataset` | utf8 | dataset name |
//! | `split` | utf8 | `train` \| `val` \| `test` |
//! | `prompt` | utf8 | the user message |
//! | `prompt_tokens` | uint32 | tokens after the chat template |
//! | `output` | utf8 | the generated text |
//! | `output_tokens` | uint32 | decode steps, the stop token included |
//! | `finish_reason` | utf8 | `stop` \| `length` |
//!
//! `embeddings/layer=L/part-NNNNN.parquet` (hive layout), one row per sampled state:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `request_id` | utf8 | joins `requests.parquet` |
//! | `kind` | utf8 | `prompt_mean` (mean over prompt tokens) \| `token` |
//! | `g` | uint32 | tokens generated before this state (0 = last prompt token) |
//! | `remaining` | uint32 | `output_tokens - g` |
//! | `embedding` | `fixed_size_list<float16 or float32>[dim]` | the residual stream after layer L |
//!
//! All columns are non-null. Rows of a part are sorted by (request order, kind, g).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::split::Split;

/// The requests file of a run directory.
pub const REQUESTS_FILE: &str = "requests.parquet";
/// The embeddings directory of a run directory.
pub const EMBEDDINGS_DIR: &str = "embeddings";
/// Name of the list element field of the `embedding` column (the Parquet LIST convention).
pub const ELEMENT_FIELD: &str = "element";

/// An unknown value in a string-coded column or option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}` (expected {expected})")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Which state a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Mean of the prompt tokens' states (one per request, `g = 0`).
    PromptMean,
    /// One token's state.
    Token,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PromptMean => "prompt_mean",
            Kind::Token => "token",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        match s {
            "prompt_mean" => Ok(Kind::PromptMean),
            "token" => Ok(Kind::Token),
            _ => Err(UnknownValue {
                what: "kind",
                value: s.to_owned(),
                expected: "prompt_mean or token",
            }),
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model emitted a stop token.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FinishReason {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        match s {
            "stop" => Ok(FinishReason::Stop),
            "length" => Ok(FinishReason::Length),
            _ => Err(UnknownValue {
                what: "finish_reason",
                value: s.to_owned(),
                expected: "stop or length",
            }),
        }
    }
}

/// Element type of the stored embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE half precision, PLAIN encoded (polars cannot read f16 written BYTE_STREAM_SPLIT).
    #[default]
    F16,
    /// f32, BYTE_STREAM_SPLIT encoded.
    F32,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    pub fn arrow(self) -> DataType {
        match self {
            Dtype::F16 => DataType::Float16,
            Dtype::F32 => DataType::Float32,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "half" => Ok(Dtype::F16),
            "f32" | "float32" | "float" => Ok(Dtype::F32),
            _ => Err(UnknownValue {
                what: "dtype",
                value: s.to_owned(),
                expected: "f16 or f32",
            }),
        }
    }
}

/// One row of `requests.parquet`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRow {
    pub request_id: String,
    pub dataset: String,
    pub split: Split,
    pub prompt: String,
    pub prompt_tokens: u32,
    pub output: String,
    pub output_tokens: u32,
    pub finish_reason: FinishReason,
}

/// Schema of `requests.parquet`.
pub fn requests_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("dataset", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("output", DataType::Utf8, false),
        Field::new("output_tokens", DataType::UInt32, false),
        Field::new("finish_reason", DataType::Utf8, false),
    ]))
}

/// The `embedding` column's element field.
pub fn element_field(dtype: Dtype) -> Arc<Field> {
    Arc::new(Field::new(ELEMENT_FIELD, dtype.arrow(), false))
}

/// Schema of an embeddings part.
pub fn embeddings_schema(dim: usize, dtype: Dtype) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("g", DataType::UInt32, false),
        Field::new("remaining", DataType::UInt32, false),
        Field::new(
            "embedding",
            DataType::FixedSizeList(element_field(dtype), dim as i32),
            false,
        ),
    ]))
}

/// `run_dir/requests.parquet`.
pub fn requests_path(run_dir: &Path) -> PathBuf {
    run_dir.join(REQUESTS_FILE)
}

/// `run_dir/embeddings/layer=L`.
pub fn layer_dir(run_dir: &Path, layer: u32) -> PathBuf {
    run_dir.join(EMBEDDINGS_DIR).join(format!("layer={layer}"))
}

/// `part-NNNNN.parquet`.
pub fn part_file_name(part: usize) -> String {
    format!("part-{part:05}.parquet")
}

/// `run_dir/embeddings/layer=L/part-NNNNN.parquet`.
pub fn part_path(run_dir: &Path, layer: u32, part: usize) -> PathBuf {
    layer_dir(run_dir, layer).join(part_file_name(part))
}

/// The temporary name a file is written under before its rename: `NAME.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in [Kind::PromptMean, Kind::Token] {
            assert_eq!(k.to_string().parse::<Kind>().unwrap(), k);
        }
        for f in [FinishReason::Stop, FinishReason::Length] {
            assert_eq!(f.to_string().parse::<FinishReason>().unwrap(), f);
        }
        for d in [Dtype::F16, Dtype::F32] {
            assert_eq!(d.to_string().parse::<Dtype>().unwrap(), d);
        }
        assert!("tok".parse::<Kind>().is_err());
        assert!(Kind::PromptMean < Kind::Token);
    }

    #[test]
    fn paths_follow_the_hive_layout() {
        let run = Path::new("runs/a");
        assert_eq!(
            part_path(run, 11, 3),
            Path::new("runs/a/embeddings/layer=11/part-00003.parquet")
        );
        assert_eq!(
            tmp_path(&part_path(run, 0, 0)),
            Path::new("runs/a/embeddings/layer=0/part-00000.parquet.tmp")
        );
    }
}
