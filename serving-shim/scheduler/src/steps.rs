//! The step log: one [`StepRecord`] per model step, stored as `steps.parquet`, and the
//! step-time model fitted to it ([`StepTimeModel`], in [`model`]) that the simulator
//! (`trail sim trace --steps`) and the engine on virtual time step by. The engine writes the log
//! (`trail serve --out`), and so does `trail bench runner --out`.
//!
//! Columns, one row per step, none nullable (pyarrow and polars read it as is):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `step` | uint64 | step index, from 0 |
//! | `t` | float64 | seconds since the log's start at the start of the step |
//! | `rows` | uint64 | rows in the step (decodes + prefill chunks): the batch size |
//! | `decode_rows` | uint64 | decode rows (one token each) |
//! | `prefill_tokens` | uint64 | prefill tokens over all chunks |
//! | `kv_tokens` | uint64 | KV tokens held after the step |
//! | `kv_blocks` | uint64 | KV blocks held after the step |
//! | `running` | uint64 | requests running after the step |
//! | `waiting` | uint64 | requests waiting after the step |
//! | `layers` | uint64 | decoder layers whose states the step captured |
//! | `preempted_policy` | uint64 | policy preemptions planned with the step |
//! | `preempted_memory` | uint64 | memory preemptions planned with the step |
//! | `step_secs` | float64 | seconds of the whole step |
//! | `forward_secs` | float64 | seconds of the forward pass |
//! | `predictor_secs` | float64 | seconds of the length predictor (probe + filter) |
//!
//! [`write()`] writes through `trail_fs::AtomicFile` (a temporary name, synced, renamed into
//! place), so a file under its final name is always whole; [`read`] names the file and the column in every error.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, UInt64Type};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use trail_fs::AtomicFile;

use crate::error::StepLogError;

pub mod model;

pub use model::{StepSample, StepShape, StepTimeModel};

/// One model step (see the module docs for the meaning of each field).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step index, from 0.
    pub step: u64,
    /// Seconds since the log's start (the engine clock) at the start of the step.
    pub t: f64,
    /// Rows in the step: the batch size.
    pub rows: usize,
    /// Decode rows.
    pub decode_rows: usize,
    /// Prefill tokens.
    pub prefill_tokens: usize,
    /// KV tokens held after the step.
    pub kv_tokens: usize,
    /// KV blocks held after the step.
    pub kv_blocks: usize,
    /// Requests running after the step.
    pub running: usize,
    /// Requests waiting after the step.
    pub waiting: usize,
    /// Decoder layers whose states the step captured.
    pub layers: usize,
    /// Policy preemptions planned with this step.
    pub preempted_policy: usize,
    /// Memory preemptions planned with this step.
    pub preempted_memory: usize,
    /// Seconds of the whole step (forward, sampling, predictor, bookkeeping).
    pub step_secs: f64,
    /// Seconds of the forward pass.
    pub forward_secs: f64,
    /// Seconds of the predictor (probe + filter).
    pub predictor_secs: f64,
}

/// A column's name and its accessor.
type Column<T> = (&'static str, fn(&StepRecord) -> T);

/// Integer columns, in file order, with their accessors.
const COUNTS: [Column<u64>; 11] = [
    ("step", |r| r.step),
    ("rows", |r| r.rows as u64),
    ("decode_rows", |r| r.decode_rows as u64),
    ("prefill_tokens", |r| r.prefill_tokens as u64),
    ("kv_tokens", |r| r.kv_tokens as u64),
    ("kv_blocks", |r| r.kv_blocks as u64),
    ("running", |r| r.running as u64),
    ("waiting", |r| r.waiting as u64),
    ("layers", |r| r.layers as u64),
    ("preempted_policy", |r| r.preempted_policy as u64),
    ("preempted_memory", |r| r.preempted_memory as u64),
];

/// Float columns, in file order after `t`, with their accessors.
const SECONDS: [Column<f64>; 3] = [
    ("step_secs", |r| r.step_secs),
    ("forward_secs", |r| r.forward_secs),
    ("predictor_secs", |r| r.predictor_secs),
];

/// The schema of `steps.parquet`.
pub fn schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("t", DataType::Float64, false),
    ];
    fields.extend(
        COUNTS[1..]
            .iter()
            .map(|(name, _)| Field::new(*name, DataType::UInt64, false)),
    );
    fields.extend(
        SECONDS
            .iter()
            .map(|(name, _)| Field::new(*name, DataType::Float64, false)),
    );
    Arc::new(Schema::new(fields))
}

/// Writes `records` to `path` atomically (`trail_fs`), creating its directory.
pub fn write(path: &Path, records: &[StepRecord]) -> Result<(), StepLogError> {
    let schema = schema();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let name = field.name().as_str();
        let col: ArrayRef = if name == "t" {
            Arc::new(Float64Array::from_iter_values(records.iter().map(|r| r.t)))
        } else if let Some((_, f)) = COUNTS.iter().find(|(n, _)| *n == name) {
            Arc::new(UInt64Array::from_iter_values(records.iter().map(f)))
        } else {
            let (_, f) = SECONDS
                .iter()
                .find(|(n, _)| *n == name)
                .expect("every column has an accessor");
            Arc::new(Float64Array::from_iter_values(records.iter().map(f)))
        };
        columns.push(col);
    }
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| StepLogError::Arrow {
        path: path.to_path_buf(),
        source: e,
    })?;

    let file = AtomicFile::create(path).map_err(|e| StepLogError::io(&e.path, e.source))?;
    let tmp = file.temp_path().to_path_buf();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .build();
    let parquet = |e| StepLogError::Parquet {
        path: tmp.clone(),
        source: e,
    };
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(parquet)?;
    writer.write(&batch).map_err(parquet)?;
    let file = writer.into_inner().map_err(parquet)?;
    file.commit()
        .map_err(|e| StepLogError::io(&e.path, e.source))
}

/// Reads a step log written by [`write()`] (or any parquet file with its columns).
pub fn read(path: &Path) -> Result<Vec<StepRecord>, StepLogError> {
    let file = File::open(path).map_err(|e| StepLogError::io(path, e))?;
    let parquet = |e| StepLogError::Parquet {
        path: path.to_path_buf(),
        source: e,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(parquet)?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| StepLogError::Arrow {
            path: path.to_path_buf(),
            source: e,
        })?;
        let u = |name| u64_column(&batch, name, path);
        let f = |name| f64_column(&batch, name, path);
        let step = u("step")?;
        let t = f("t")?;
        let rows = u("rows")?;
        let decode_rows = u("decode_rows")?;
        let prefill_tokens = u("prefill_tokens")?;
        let kv_tokens = u("kv_tokens")?;
        let kv_blocks = u("kv_blocks")?;
        let running = u("running")?;
        let waiting = u("waiting")?;
        let layers = u("layers")?;
        let preempted_policy = u("preempted_policy")?;
        let preempted_memory = u("preempted_memory")?;
        let step_secs = f("step_secs")?;
        let forward_secs = f("forward_secs")?;
        let predictor_secs = f("predictor_secs")?;
        let n = |a: &UInt64Array, i: usize| a.value(i) as usize;
        for i in 0..batch.num_rows() {
            out.push(StepRecord {
                step: step.value(i),
                t: t.value(i),
                rows: n(rows, i),
                decode_rows: n(decode_rows, i),
                prefill_tokens: n(prefill_tokens, i),
                kv_tokens: n(kv_tokens, i),
                kv_blocks: n(kv_blocks, i),
                running: n(running, i),
                waiting: n(waiting, i),
                layers: n(layers, i),
                preempted_policy: n(preempted_policy, i),
                preempted_memory: n(preempted_memory, i),
                step_secs: step_secs.value(i),
                forward_secs: forward_secs.value(i),
                predictor_secs: predictor_secs.value(i),
            });
        }
    }
    Ok(out)
}

fn u64_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a UInt64Array, StepLogError> {
    column(batch, name, DataType::UInt64, path).map(|c| c.as_primitive::<UInt64Type>())
}

fn f64_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a Float64Array, StepLogError> {
    column(batch, name, DataType::Float64, path).map(|c| c.as_primitive::<Float64Type>())
}

fn column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    ty: DataType,
    path: &Path,
) -> Result<&'a ArrayRef, StepLogError> {
    let schema = |detail: String| StepLogError::Schema {
        path: path.to_path_buf(),
        detail,
    };
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| schema(format!("no column `{name}`")))?;
    if col.data_type() != &ty {
        return Err(schema(format!(
            "column `{name}` is {}, expected {ty}",
            col.data_type()
        )));
    }
    if col.null_count() > 0 {
        return Err(schema(format!("column `{name}` has nulls")));
    }
    Ok(col)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn record(i: u64) -> StepRecord {
        StepRecord {
            step: i,
            t: 0.25 * i as f64,
            rows: 3 + i as usize,
            decode_rows: 2,
            prefill_tokens: 17 * i as usize,
            kv_tokens: 100 + i as usize,
            kv_blocks: 7,
            running: 3,
            waiting: 5 - i as usize,
            layers: 1,
            preempted_policy: i as usize % 2,
            preempted_memory: 1,
            step_secs: 0.0125 + i as f64,
            forward_secs: 0.011,
            predictor_secs: 1e-5,
        }
    }

    #[test]
    fn round_trip_is_exact_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("steps.parquet");
        let records: Vec<StepRecord> = (0..5).map(record).collect();
        write(&path, &records).unwrap();
        assert_eq!(read(&path).unwrap(), records);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["steps.parquet"]);
        // An empty log is a valid file too.
        write(&path, &[]).unwrap();
        assert!(read(&path).unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_column() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let missing = dir.join("missing.parquet");
        let e = read(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.parquet"), "{e}");

        let not_parquet = dir.join("steps.json");
        std::fs::write(&not_parquet, b"[]").unwrap();
        let e = read(&not_parquet).unwrap_err().to_string();
        assert!(e.contains("steps.json") && e.contains("parquet"), "{e}");

        // A file without the `layers` column.
        let path = dir.join("old.parquet");
        let fields: Vec<_> = schema()
            .fields()
            .iter()
            .filter(|f| f.name() != "layers")
            .cloned()
            .collect();
        let s = Arc::new(Schema::new(fields));
        let cols: Vec<ArrayRef> = s
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                match f.data_type() {
                    DataType::UInt64 => Arc::new(UInt64Array::from(vec![1u64])),
                    _ => Arc::new(Float64Array::from(vec![0.5])),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(s.clone(), cols).unwrap();
        let mut w = ArrowWriter::try_new(File::create(&path).unwrap(), s, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("old.parquet") && e.contains("`layers`"), "{e}");
    }
}
