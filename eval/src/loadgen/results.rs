//! `results.parquet`: one row per request of a latency run, tagged with the policy, load,
//! arrival rate and seed it ran under. Columns (nullable where a request may lack the value):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `policy` | utf8 | scheduling policy |
//! | `load` | float64 | load as a fraction of the measured saturation throughput |
//! | `rate_rps` | float64 | Poisson arrival rate, requests per second |
//! | `seed` | uint64 | seed of the arrivals and of the prompt sample |
//! | `index` | uint64 | request's index in its `trace.jsonl` |
//! | `request_id` | utf8? | the generated run's request id (with `#k` for the k-th repeat) |
//! | `arrival_s` | float64 | scheduled arrival, seconds from the start of the cell |
//! | `sent_s` | float64 | when the client actually sent it |
//! | `ttft_s` | float64? | time to first token, from the arrival |
//! | `latency_s` | float64 | end-to-end latency, from the arrival |
//! | `tpot_s` | float64? | time per output token after the first, `benchmark_serving.py`'s: `(latency_s − ttft_s) / (output_tokens − 1)` |
//! | `queue_s` | float64? | server-reported time waiting before the first schedule |
//! | `preemptions` | uint32? | server-reported preemptions (policy and memory) |
//! | `output_tokens` | uint32 | tokens received |
//! | `target_tokens` | uint32? | the fixed output length the trace asked for |
//! | `error` | utf8? | why the request failed, when it did |
//! | `prompt_tokens` | uint32? | prompt tokens after the chat template (the server's `usage`, else the trace's) |
//! | `itl_s` | list\<float64\> | inter-token latencies: gaps between successive streamed chunks, seconds |
//!
//! Files written before `prompt_tokens` and `itl_s` existed read with `None` and no gaps.
//!
//! [`write_results`] writes through a temporary file and a rename; [`read_results`] names the
//! file and column in its errors.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, ListArray, ListBuilder, RecordBatch,
    StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::RequestResult;
use crate::Error;

/// One row of `results.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub policy: String,
    pub load: f64,
    pub rate_rps: f64,
    pub seed: u64,
    /// The fixed output length the trace asked for.
    pub target_tokens: Option<u32>,
    pub result: RequestResult,
}

/// The schema of `results.parquet`.
pub fn results_schema() -> SchemaRef {
    let f = |name: &str, t: DataType, nullable: bool| Field::new(name, t, nullable);
    Arc::new(Schema::new(vec![
        f("policy", DataType::Utf8, false),
        f("load", DataType::Float64, false),
        f("rate_rps", DataType::Float64, false),
        f("seed", DataType::UInt64, false),
        f("index", DataType::UInt64, false),
        f("request_id", DataType::Utf8, true),
        f("arrival_s", DataType::Float64, false),
        f("sent_s", DataType::Float64, false),
        f("ttft_s", DataType::Float64, true),
        f("latency_s", DataType::Float64, false),
        f("tpot_s", DataType::Float64, true),
        f("queue_s", DataType::Float64, true),
        f("preemptions", DataType::UInt32, true),
        f("output_tokens", DataType::UInt32, false),
        f("target_tokens", DataType::UInt32, true),
        f("error", DataType::Utf8, true),
        f("prompt_tokens", DataType::UInt32, true),
        f(
            "itl_s",
            DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true))),
            false,
        ),
    ]))
}

fn batch(rows: &[ResultRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let r = |g: fn(&ResultRow) -> f64| -> ArrayRef {
        Arc::new(rows.iter().map(g).collect::<Float64Array>())
    };
    let ro = |g: fn(&ResultRow) -> Option<f64>| -> ArrayRef {
        Arc::new(rows.iter().map(g).collect::<Float64Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|x| x.policy.as_str()),
        )),
        r(|x| x.load),
        r(|x| x.rate_rps),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|x| x.seed))),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|x| x.result.index as u64),
        )),
        Arc::new(
            rows.iter()
                .map(|x| x.result.request_id.as_deref())
                .collect::<StringArray>(),
        ),
        r(|x| x.result.arrival_s),
        r(|x| x.result.sent_s),
        ro(|x| x.result.ttft_s),
        r(|x| x.result.latency_s),
        ro(|x| x.result.tpot_s),
        ro(|x| x.result.queue_s),
        Arc::new(
            rows.iter()
                .map(|x| x.result.preemptions)
                .collect::<UInt32Array>(),
        ),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|x| x.result.output_tokens),
        )),
        Arc::new(
            rows.iter()
                .map(|x| x.target_tokens)
                .collect::<UInt32Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|x| x.result.error.as_deref())
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|x| x.result.prompt_tokens)
                .collect::<UInt32Array>(),
        ),
        itl_column(rows),
    ];
    RecordBatch::try_new(results_schema(), columns)
}

fn itl_column(rows: &[ResultRow]) -> ArrayRef {
    let mut b = ListBuilder::new(Float64Builder::new());
    for r in rows {
        b.values().append_slice(&r.result.itl_s);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// Row `i`'s inter-token latencies.
fn itl_at(a: &ListArray, i: usize) -> Vec<f64> {
    let v = a.value(i);
    v.as_any()
        .downcast_ref::<Float64Array>()
        .map_or_else(Vec::new, |f| f.values().to_vec())
}

/// Writes `rows` to `path` atomically (`trail_fs`).
pub fn write_results(path: &Path, rows: &[ResultRow]) -> Result<(), Error> {
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let other = |e: &dyn std::fmt::Display| io(std::io::Error::other(e.to_string()));
    let tmp = trail_fs::AtomicFile::create(path)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let batch = batch(rows).map_err(|e| other(&e))?;
    let mut w = ArrowWriter::try_new(tmp, results_schema(), Some(props)).map_err(|e| other(&e))?;
    w.write(&batch).map_err(|e| other(&e))?;
    Ok(w.into_inner().map_err(|e| other(&e))?.commit()?)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T, Error> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            Error::BadParameter(format!(
                "{}: column `{name}` is missing or of another type",
                path.display()
            ))
        })
}

fn opt<A: Array, T>(a: &A, i: usize, v: impl Fn(&A, usize) -> T) -> Option<T> {
    a.is_valid(i).then(|| v(a, i))
}

/// Reads a `results.parquet` written by [`write_results`].
pub fn read_results(path: &Path) -> Result<Vec<ResultRow>, Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |e: &dyn std::fmt::Display| Error::BadParameter(format!("{}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(&e))?
        .build()
        .map_err(|e| bad(&e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| bad(&e))?;
        let policy = column::<StringArray>(&b, "policy", path)?;
        let load = column::<Float64Array>(&b, "load", path)?;
        let rate = column::<Float64Array>(&b, "rate_rps", path)?;
        let seed = column::<UInt64Array>(&b, "seed", path)?;
        let index = column::<UInt64Array>(&b, "index", path)?;
        let id = column::<StringArray>(&b, "request_id", path)?;
        let arrival = column::<Float64Array>(&b, "arrival_s", path)?;
        let sent = column::<Float64Array>(&b, "sent_s", path)?;
        let ttft = column::<Float64Array>(&b, "ttft_s", path)?;
        let latency = column::<Float64Array>(&b, "latency_s", path)?;
        let tpot = column::<Float64Array>(&b, "tpot_s", path)?;
        let queue = column::<Float64Array>(&b, "queue_s", path)?;
        let pre = column::<UInt32Array>(&b, "preemptions", path)?;
        let out_tok = column::<UInt32Array>(&b, "output_tokens", path)?;
        let target = column::<UInt32Array>(&b, "target_tokens", path)?;
        let error = column::<StringArray>(&b, "error", path)?;
        // Absent from files written before them.
        let prompt = b.column_by_name("prompt_tokens").is_some();
        let prompt = prompt
            .then(|| column::<UInt32Array>(&b, "prompt_tokens", path))
            .transpose()?;
        let itl = b.column_by_name("itl_s").is_some();
        let itl = itl
            .then(|| column::<ListArray>(&b, "itl_s", path))
            .transpose()?;
        for i in 0..b.num_rows() {
            out.push(ResultRow {
                policy: policy.value(i).to_string(),
                load: load.value(i),
                rate_rps: rate.value(i),
                seed: seed.value(i),
                target_tokens: opt(target, i, |a, i| a.value(i)),
                result: RequestResult {
                    index: index.value(i) as usize,
                    request_id: opt(id, i, |a, i| a.value(i).to_string()),
                    arrival_s: arrival.value(i),
                    sent_s: sent.value(i),
                    ttft_s: opt(ttft, i, |a, i| a.value(i)),
                    latency_s: latency.value(i),
                    tpot_s: opt(tpot, i, |a, i| a.value(i)),
                    itl_s: itl.map_or_else(Vec::new, |a| itl_at(a, i)),
                    output_tokens: out_tok.value(i),
                    prompt_tokens: prompt.and_then(|a| opt(a, i, |a, i| a.value(i))),
                    queue_s: opt(queue, i, |a, i| a.value(i)),
                    preemptions: opt(pre, i, |a, i| a.value(i)),
                    error: opt(error, i, |a, i| a.value(i).to_string()),
                },
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: usize, error: Option<&str>) -> ResultRow {
        ResultRow {
            policy: if i.is_multiple_of(2) { "fcfs" } else { "trail" }.into(),
            load: 0.8,
            rate_rps: 1.25,
            seed: 7,
            target_tokens: (!i.is_multiple_of(3)).then_some(10 + i as u32),
            result: RequestResult {
                index: i,
                request_id: (i != 1).then(|| format!("req-{i}")),
                arrival_s: i as f64 * 0.5,
                sent_s: i as f64 * 0.5 + 0.001,
                ttft_s: error.is_none().then_some(0.25),
                latency_s: 1.0 + i as f64,
                tpot_s: (i > 0).then_some(0.01),
                itl_s: vec![0.01; i],
                output_tokens: 10 + i as u32,
                prompt_tokens: (i != 4).then_some(30 + i as u32),
                queue_s: Some(0.1),
                preemptions: (i != 2).then_some(i as u32),
                error: error.map(String::from),
            },
        }
    }

    #[test]
    fn rows_round_trip_with_their_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/results.parquet");
        let rows: Vec<ResultRow> = (0..5)
            .map(|i| row(i, (i == 3).then_some("HTTP 429")))
            .collect();
        write_results(&path, &rows).unwrap();
        assert_eq!(read_results(&path).unwrap(), rows);
        write_results(&path, &[]).unwrap();
        assert!(read_results(&path).unwrap().is_empty());
    }

    #[test]
    fn a_file_from_before_prompt_tokens_and_itl_reads_without_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.parquet");
        let rows: Vec<ResultRow> = (0..3).map(|i| row(i, None)).collect();
        let full = batch(&rows).unwrap();
        let old = full.project(&(0..full.num_columns() - 2).collect::<Vec<_>>());
        let old = old.unwrap();
        let file = trail_fs::AtomicFile::create(&path).unwrap();
        let mut w = ArrowWriter::try_new(file, old.schema(), None).unwrap();
        w.write(&old).unwrap();
        w.into_inner().unwrap().commit().unwrap();
        let back = read_results(&path).unwrap();
        for (b, r) in back.iter().zip(&rows) {
            assert!(b.result.itl_s.is_empty() && b.result.prompt_tokens.is_none());
            assert_eq!(b.result.latency_s, r.result.latency_s);
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = read_results(Path::new("/nonexistent/results.parquet"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/results.parquet"), "{err}");
    }
}
