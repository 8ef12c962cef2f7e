//! Writing and reading a run's parquet files (layout and columns in [`crate::schema`]).
//!
//! Writers: every file is written to `NAME.tmp`, synced, then renamed, so a file under its final
//! name is always whole. Embeddings use zstd level 1; the `embedding` column has no dictionary
//! and no statistics, and is BYTE_STREAM_SPLIT encoded when f32 (PLAIN when f16: polars cannot
//! read f16 written with BYTE_STREAM_SPLIT).
//!
//! A [`PartWriter`] takes the rows of one part for all layers, sorts them by (request order,
//! kind, g) and writes one file per layer. A part covers a fixed chunk of the request order, so a
//! part's bytes do not depend on the order in which its requests finished. [`part_complete`]
//! tells a resumed run which parts to redo: one with a missing layer file, a leftover `.tmp`, or a
//! file whose footer does not read.
//!
//! Readers take one or more run dirs as one dataset. A request present in several of them (the
//! same request id) is taken from the first dir that has it, both in [`read_requests_dirs`] and
//! in [`read_layer`], so the two stay consistent.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float16Array, Float32Array, RecordBatch,
    RecordBatchReader, StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Float16Type, Float32Type, UInt32Type};
use half::f16;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::SerializedFileReader;
use parquet::schema::types::ColumnPath;
use trail_fs::AtomicFile;

use crate::schema::{
    self, Dtype, ELEMENT_FIELD, FinishReason, Kind, RequestRow, embeddings_schema, layer_dir,
    part_path, requests_schema, tmp_path,
};
use crate::split::Split;

/// Rows per record batch when writing.
const WRITE_BATCH_ROWS: usize = 4096;

/// Errors of this module; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: parquet: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: arrow: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
    #[error("{path}: {detail}")]
    Schema { path: PathBuf, detail: String },
    #[error("{path}: row {row}: {detail}")]
    Value {
        path: PathBuf,
        row: usize,
        detail: String,
    },
    #[error("{path}: embedding dimension {found}, expected {expected}")]
    Dim {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("request {request_id} has embeddings (in {path}) but no row in any requests.parquet")]
    MissingRequest { request_id: String, path: PathBuf },
    #[error("no embeddings for layer {layer} under {dirs}")]
    NoParts { layer: u32, dirs: String },
    #[error("a row has {found} values, expected {expected} ({layers} layers x dim {dim})")]
    RowLength {
        found: usize,
        expected: usize,
        layers: usize,
        dim: usize,
    },
}

impl From<trail_fs::Error> for StoreError {
    fn from(e: trail_fs::Error) -> Self {
        StoreError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

impl StoreError {
    fn io(path: &Path, source: io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    fn parquet(path: &Path, source: parquet::errors::ParquetError) -> Self {
        StoreError::Parquet {
            path: path.to_path_buf(),
            source,
        }
    }
    fn arrow(path: &Path, source: arrow::error::ArrowError) -> Self {
        StoreError::Arrow {
            path: path.to_path_buf(),
            source,
        }
    }
    fn schema(path: &Path, detail: impl Into<String>) -> Self {
        StoreError::Schema {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// writer properties and atomic files

/// Properties of `requests.parquet`: zstd level 1.
pub fn requests_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .build()
}

/// Properties of an embeddings part (see the module docs).
pub fn embeddings_properties(dtype: Dtype) -> WriterProperties {
    let col = ColumnPath::new(vec![
        "embedding".into(),
        "list".into(),
        ELEMENT_FIELD.into(),
    ]);
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .set_column_dictionary_enabled(col.clone(), false)
        .set_column_statistics_enabled(col.clone(), EnabledStatistics::None);
    if dtype == Dtype::F32 {
        b = b.set_column_encoding(col, Encoding::BYTE_STREAM_SPLIT);
    }
    b.build()
}

/// A parquet file under its temporary name `NAME.tmp` (which [`part_complete`] looks for),
/// put in place by [`AtomicParquet::finish`] through `trail_fs`.
struct AtomicParquet {
    path: PathBuf,
    tmp: PathBuf,
    writer: ArrowWriter<AtomicFile>,
}

impl AtomicParquet {
    fn create(
        path: &Path,
        schema: arrow::datatypes::SchemaRef,
        props: WriterProperties,
    ) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = AtomicFile::create_named(path, &tmp)?;
        let writer = ArrowWriter::try_new(file, schema, Some(props))
            .map_err(|e| StoreError::parquet(&tmp, e))?;
        Ok(AtomicParquet {
            path: path.to_path_buf(),
            tmp,
            writer,
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .map_err(|e| StoreError::parquet(&self.tmp, e))
    }

    fn finish(self) -> Result<PathBuf> {
        let file = self
            .writer
            .into_inner()
            .map_err(|e| StoreError::parquet(&self.tmp, e))?;
        file.commit()?;
        Ok(self.path)
    }
}

// ---------------------------------------------------------------------------------------------
// requests.parquet

/// Writes `requests.parquet` in batches; the file appears under its name on [`finish`].
///
/// [`finish`]: RequestsWriter::finish
pub struct RequestsWriter {
    file: AtomicParquet,
    rows: usize,
}

impl RequestsWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = AtomicParquet::create(path, requests_schema(), requests_properties())?;
        Ok(RequestsWriter { file, rows: 0 })
    }

    pub fn write(&mut self, rows: &[RequestRow]) -> Result<()> {
        for chunk in rows.chunks(WRITE_BATCH_ROWS) {
            let s = |f: fn(&RequestRow) -> &str| -> ArrayRef {
                Arc::new(StringArray::from_iter_values(chunk.iter().map(f)))
            };
            let u = |f: fn(&RequestRow) -> u32| -> ArrayRef {
                Arc::new(UInt32Array::from_iter_values(chunk.iter().map(f)))
            };
            let columns = vec![
                s(|r| &r.request_id),
                s(|r| &r.dataset),
                s(|r| r.split.as_str()),
                s(|r| &r.prompt),
                u(|r| r.prompt_tokens),
                s(|r| &r.output),
                u(|r| r.output_tokens),
                s(|r| r.finish_reason.as_str()),
            ];
            let batch = RecordBatch::try_new(requests_schema(), columns)
                .map_err(|e| StoreError::arrow(&self.file.tmp, e))?;
            self.file.write(&batch)?;
            self.rows += chunk.len();
        }
        Ok(())
    }

    /// Closes the file and renames it into place; returns its path.
    pub fn finish(self) -> Result<PathBuf> {
        self.file.finish()
    }
}

/// Writes `rows` to `path` atomically.
pub fn write_requests(path: &Path, rows: &[RequestRow]) -> Result<PathBuf> {
    let mut w = RequestsWriter::create(path)?;
    w.write(rows)?;
    w.finish()
}

fn open_batches(path: &Path) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(WRITE_BATCH_ROWS).build())
        .map_err(|e| StoreError::parquet(path, e))
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ArrayRef> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| StoreError::schema(path, format!("no column `{name}`")))?;
    if col.null_count() > 0 {
        return Err(StoreError::schema(
            path,
            format!("column `{name}` has nulls"),
        ));
    }
    Ok(col)
}

fn str_column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a StringArray> {
    let col = column(batch, name, path)?;
    col.as_string_opt::<i32>().ok_or_else(|| {
        StoreError::schema(
            path,
            format!("column `{name}` is {}, not utf8", col.data_type()),
        )
    })
}

fn u32_column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a UInt32Array> {
    let col = column(batch, name, path)?;
    col.as_primitive_opt::<UInt32Type>().ok_or_else(|| {
        StoreError::schema(
            path,
            format!("column `{name}` is {}, not uint32", col.data_type()),
        )
    })
}

/// Reads a `requests.parquet`.
pub fn read_requests(path: &Path) -> Result<Vec<RequestRow>> {
    let mut rows = Vec::new();
    for batch in open_batches(path)? {
        let batch = batch.map_err(|e| StoreError::arrow(path, e))?;
        let id = str_column(&batch, "request_id", path)?;
        let dataset = str_column(&batch, "dataset", path)?;
        let split = str_column(&batch, "split", path)?;
        let prompt = str_column(&batch, "prompt", path)?;
        let prompt_tokens = u32_column(&batch, "prompt_tokens", path)?;
        let output = str_column(&batch, "output", path)?;
        let output_tokens = u32_column(&batch, "output_tokens", path)?;
        let finish = str_column(&batch, "finish_reason", path)?;
        for i in 0..batch.num_rows() {
            let row = rows.len();
            let bad = |detail: String| StoreError::Value {
                path: path.to_path_buf(),
                row,
                detail,
            };
            rows.push(RequestRow {
                request_id: id.value(i).to_owned(),
                dataset: dataset.value(i).to_owned(),
                split: split
                    .value(i)
                    .parse::<Split>()
                    .map_err(|e| bad(e.to_string()))?,
                prompt: prompt.value(i).to_owned(),
                prompt_tokens: prompt_tokens.value(i),
                output: output.value(i).to_owned(),
                output_tokens: output_tokens.value(i),
                finish_reason: finish
                    .value(i)
                    .parse::<FinishReason>()
                    .map_err(|e| bad(e.to_string()))?,
            });
        }
    }
    Ok(rows)
}

/// The requests of several run dirs as one list: a request id seen in an earlier dir is skipped.
pub fn read_requests_dirs<P: AsRef<Path>>(run_dirs: &[P]) -> Result<Vec<RequestRow>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for dir in run_dirs {
        let rows = read_requests(&schema::requests_path(dir.as_ref()))?;
        out.extend(
            rows.into_iter()
                .filter(|r| seen.insert(r.request_id.clone())),
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// embeddings

/// Rows of one layer's embeddings, column by column; `data` holds `len() * dim` values, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingTable {
    pub request_ids: Vec<String>,
    pub kind: Vec<Kind>,
    pub g: Vec<u32>,
    pub remaining: Vec<u32>,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl EmbeddingTable {
    pub fn new(dim: usize) -> Self {
        EmbeddingTable {
            dim,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.g.len()
    }

    pub fn is_empty(&self) -> bool {
        self.g.is_empty()
    }

    /// Appends a row; panics unless `embedding.len() == dim`.
    pub fn push(
        &mut self,
        request_id: &str,
        kind: Kind,
        g: u32,
        remaining: u32,
        embedding: &[f32],
    ) {
        assert_eq!(embedding.len(), self.dim, "embedding length");
        self.request_ids.push(request_id.to_owned());
        self.kind.push(kind);
        self.g.push(g);
        self.remaining.push(remaining);
        self.data.extend_from_slice(embedding);
    }

    /// Row `i`'s embedding.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    fn append(&mut self, other: EmbeddingTable) {
        self.request_ids.extend(other.request_ids);
        self.kind.extend(other.kind);
        self.g.extend(other.g);
        self.remaining.extend(other.remaining);
        self.data.extend(other.data);
    }

    fn retain_rows(&mut self, keep: impl Fn(&str) -> bool) {
        let dim = self.dim;
        let mut w = 0;
        for r in 0..self.len() {
            if keep(&self.request_ids[r]) {
                if w != r {
                    self.request_ids.swap(w, r);
                    self.kind[w] = self.kind[r];
                    self.g[w] = self.g[r];
                    self.remaining[w] = self.remaining[r];
                    self.data.copy_within(r * dim..(r + 1) * dim, w * dim);
                }
                w += 1;
            }
        }
        self.request_ids.truncate(w);
        self.kind.truncate(w);
        self.g.truncate(w);
        self.remaining.truncate(w);
        self.data.truncate(w * dim);
    }
}

/// Writes one layer file atomically, rows in the table's order.
pub fn write_layer_file(path: &Path, table: &EmbeddingTable, dtype: Dtype) -> Result<PathBuf> {
    let mut file = AtomicParquet::create(
        path,
        embeddings_schema(table.dim, dtype),
        embeddings_properties(dtype),
    )?;
    let all: Vec<usize> = (0..table.len()).collect();
    for chunk in all.chunks(WRITE_BATCH_ROWS) {
        let batch = write_rows(
            table.dim,
            dtype,
            chunk,
            |r| {
                (
                    table.request_ids[r].clone(),
                    table.kind[r],
                    table.g[r],
                    table.remaining[r],
                )
            },
            |r| RowRef::F32(table.row(r)),
        )
        .map_err(|e| StoreError::arrow(path, e))?;
        file.write(&batch)?;
    }
    file.finish()
}

/// A row's values, borrowed, in the dtype they are held in.
enum RowRef<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

/// A record batch of the embeddings schema holding `rows`, converted to `dtype`.
fn write_rows<'a>(
    dim: usize,
    dtype: Dtype,
    rows: &[usize],
    meta: impl Fn(usize) -> (String, Kind, u32, u32),
    values: impl Fn(usize) -> RowRef<'a>,
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let metas: Vec<_> = rows.iter().map(|&r| meta(r)).collect();
    let ids = StringArray::from_iter_values(metas.iter().map(|m| m.0.as_str()));
    let kinds = StringArray::from_iter_values(metas.iter().map(|m| m.1.as_str()));
    let g = UInt32Array::from_iter_values(metas.iter().map(|m| m.2));
    let remaining = UInt32Array::from_iter_values(metas.iter().map(|m| m.3));
    let child: ArrayRef = match dtype {
        Dtype::F16 => {
            let mut v: Vec<f16> = Vec::with_capacity(rows.len() * dim);
            for &r in rows {
                match values(r) {
                    RowRef::F16(x) => v.extend_from_slice(x),
                    RowRef::F32(x) => v.extend(x.iter().map(|&f| f16::from_f32(f))),
                }
            }
            Arc::new(Float16Array::from(v))
        }
        Dtype::F32 => {
            let mut v: Vec<f32> = Vec::with_capacity(rows.len() * dim);
            for &r in rows {
                match values(r) {
                    RowRef::F16(x) => v.extend(x.iter().map(|h| h.to_f32())),
                    RowRef::F32(x) => v.extend_from_slice(x),
                }
            }
            Arc::new(Float32Array::from(v))
        }
    };
    let list = FixedSizeListArray::try_new(schema::element_field(dtype), dim as i32, child, None)?;
    RecordBatch::try_new(
        embeddings_schema(dim, dtype),
        vec![
            Arc::new(ids),
            Arc::new(kinds),
            Arc::new(g),
            Arc::new(remaining),
            Arc::new(list),
        ],
    )
}

/// Reads one layer file (f16 or f32) into f32.
pub fn read_layer_file(path: &Path) -> Result<EmbeddingTable> {
    let reader = open_batches(path)?;
    let dim = match reader
        .schema()
        .field_with_name("embedding")
        .map(|f| f.data_type().clone())
    {
        Ok(DataType::FixedSizeList(f, n))
            if matches!(f.data_type(), DataType::Float16 | DataType::Float32) =>
        {
            n as usize
        }
        Ok(other) => {
            return Err(StoreError::schema(
                path,
                format!("column `embedding` is {other}, not a fixed-size list of float16/float32"),
            ));
        }
        Err(_) => return Err(StoreError::schema(path, "no column `embedding`")),
    };
    let mut table = EmbeddingTable::new(dim);
    for batch in reader {
        let batch = batch.map_err(|e| StoreError::arrow(path, e))?;
        let ids = str_column(&batch, "request_id", path)?;
        let kinds = str_column(&batch, "kind", path)?;
        let g = u32_column(&batch, "g", path)?;
        let remaining = u32_column(&batch, "remaining", path)?;
        let emb = column(&batch, "embedding", path)?.as_fixed_size_list();
        let n = batch.num_rows();
        for i in 0..n {
            let row = table.len();
            table.request_ids.push(ids.value(i).to_owned());
            table
                .kind
                .push(kinds.value(i).parse().map_err(|e: schema::UnknownValue| {
                    StoreError::Value {
                        path: path.to_path_buf(),
                        row,
                        detail: e.to_string(),
                    }
                })?);
            table.g.push(g.value(i));
            table.remaining.push(remaining.value(i));
        }
        let values = emb.values();
        if values.null_count() > 0 {
            return Err(StoreError::schema(path, "null embedding values"));
        }
        match values.data_type() {
            DataType::Float16 => table.data.extend(
                values.as_primitive::<Float16Type>().values()[..n * dim]
                    .iter()
                    .map(|h| h.to_f32()),
            ),
            _ => table
                .data
                .extend_from_slice(&values.as_primitive::<Float32Type>().values()[..n * dim]),
        }
    }
    Ok(table)
}

/// The `part-*.parquet` files of one layer of a run (never `.tmp` files), sorted by name.
pub fn layer_parts(run_dir: &Path, layer: u32) -> Result<Vec<PathBuf>> {
    let dir = layer_dir(run_dir, layer);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&dir, e)),
    };
    let mut parts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            parts.push(entry.path());
        }
    }
    parts.sort();
    Ok(parts)
}

/// The layers present in a run (`embeddings/layer=L` directories), ascending.
pub fn list_layers(run_dir: &Path) -> Result<Vec<u32>> {
    let dir = run_dir.join(schema::EMBEDDINGS_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&dir, e)),
    };
    let mut layers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
        let name = entry.file_name();
        if let Some(Ok(l)) = name
            .to_string_lossy()
            .strip_prefix("layer=")
            .map(str::parse)
        {
            layers.push(l);
        }
    }
    layers.sort_unstable();
    Ok(layers)
}

/// One layer of several run dirs as one table (parts in name order, dirs in the order given).
/// Rows of a request id already read from an earlier dir are left out.
pub fn read_layer<P: AsRef<Path>>(run_dirs: &[P], layer: u32) -> Result<EmbeddingTable> {
    let mut out: Option<EmbeddingTable> = None;
    let mut earlier: HashSet<String> = HashSet::new();
    for dir in run_dirs {
        let mut this_dir: HashSet<String> = HashSet::new();
        for part in layer_parts(dir.as_ref(), layer)? {
            let mut t = read_layer_file(&part)?;
            if !earlier.is_empty() {
                t.retain_rows(|id| !earlier.contains(id));
            }
            this_dir.extend(t.request_ids.iter().cloned());
            match &mut out {
                None => out = Some(t),
                Some(o) if o.dim == t.dim => o.append(t),
                Some(o) => {
                    return Err(StoreError::Dim {
                        path: part,
                        found: t.dim,
                        expected: o.dim,
                    });
                }
            }
        }
        earlier.extend(this_dir);
    }
    out.ok_or_else(|| StoreError::NoParts {
        layer,
        dirs: run_dirs
            .iter()
            .map(|d| d.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// One layer's embeddings joined with their requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingTable {
    pub embeddings: EmbeddingTable,
    /// Split of each row's request.
    pub split: Vec<Split>,
    /// `output_tokens` of each row's request.
    pub output_tokens: Vec<u32>,
}

/// [`read_layer`] joined with [`read_requests_dirs`]; every row must have its request.
pub fn read_training<P: AsRef<Path>>(run_dirs: &[P], layer: u32) -> Result<TrainingTable> {
    let requests = read_requests_dirs(run_dirs)?;
    let by_id: HashMap<&str, &RequestRow> = requests
        .iter()
        .map(|r| (r.request_id.as_str(), r))
        .collect();
    let embeddings = read_layer(run_dirs, layer)?;
    let mut split = Vec::with_capacity(embeddings.len());
    let mut output_tokens = Vec::with_capacity(embeddings.len());
    for id in &embeddings.request_ids {
        let r = by_id
            .get(id.as_str())
            .ok_or_else(|| StoreError::MissingRequest {
                request_id: id.clone(),
                path: run_dirs
                    .iter()
                    .map(|d| d.as_ref().to_path_buf())
                    .next()
                    .unwrap_or_default(),
            })?;
        split.push(r.split);
        output_tokens.push(r.output_tokens);
    }
    Ok(TrainingTable {
        embeddings,
        split,
        output_tokens,
    })
}

// ---------------------------------------------------------------------------------------------
// parts

/// Buffers the rows of one part for all layers, then writes one file per layer.
pub struct PartWriter {
    run_dir: PathBuf,
    part: usize,
    layers: Vec<u32>,
    dim: usize,
    dtype: Dtype,
    /// (request order, request id, kind, g, remaining) per row.
    rows: Vec<(u64, String, Kind, u32, u32)>,
    /// Row-major, each row `layers.len() * dim` values, layer by layer.
    f16: Vec<f16>,
    f32: Vec<f32>,
}

/// What [`PartWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSummary {
    pub part: usize,
    pub rows: usize,
    /// One file per layer, in the order of the writer's layers.
    pub files: Vec<PathBuf>,
}

impl PartWriter {
    /// A writer of part `part` of `run_dir` for these layers (the order of `layers` is the order
    /// of each row's states in [`PartWriter::push`]).
    pub fn new(run_dir: &Path, part: usize, layers: &[u32], dim: usize, dtype: Dtype) -> Self {
        PartWriter {
            run_dir: run_dir.to_path_buf(),
            part,
            layers: layers.to_vec(),
            dim,
            dtype,
            rows: Vec::new(),
            f16: Vec::new(),
            f32: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds one sampled position. `order` is the request's position in the request order;
    /// `states` holds `layers.len() * dim` values, the state after each layer in turn.
    pub fn push(
        &mut self,
        order: u64,
        request_id: &str,
        kind: Kind,
        g: u32,
        remaining: u32,
        states: &[f32],
    ) -> Result<()> {
        let expected = self.layers.len() * self.dim;
        if states.len() != expected {
            return Err(StoreError::RowLength {
                found: states.len(),
                expected,
                layers: self.layers.len(),
                dim: self.dim,
            });
        }
        self.rows
            .push((order, request_id.to_owned(), kind, g, remaining));
        match self.dtype {
            Dtype::F16 => self.f16.extend(states.iter().map(|&x| f16::from_f32(x))),
            Dtype::F32 => self.f32.extend_from_slice(states),
        }
        Ok(())
    }

    /// Sorts the rows by (request order, kind, g) and writes every layer file atomically.
    pub fn finish(self) -> Result<PartSummary> {
        let mut perm: Vec<usize> = (0..self.rows.len()).collect();
        perm.sort_by_key(|&i| {
            let (order, _, kind, g, _) = &self.rows[i];
            (*order, *kind, *g)
        });
        let stride = self.layers.len() * self.dim;
        let mut files = Vec::with_capacity(self.layers.len());
        for (li, &layer) in self.layers.iter().enumerate() {
            let path = part_path(&self.run_dir, layer, self.part);
            let mut file = AtomicParquet::create(
                &path,
                embeddings_schema(self.dim, self.dtype),
                embeddings_properties(self.dtype),
            )?;
            for chunk in perm.chunks(WRITE_BATCH_ROWS) {
                let at = |r: usize| r * stride + li * self.dim..r * stride + (li + 1) * self.dim;
                let batch = write_rows(
                    self.dim,
                    self.dtype,
                    chunk,
                    |r| {
                        let (_, id, kind, g, remaining) = &self.rows[r];
                        (id.clone(), *kind, *g, *remaining)
                    },
                    |r| match self.dtype {
                        Dtype::F16 => RowRef::F16(&self.f16[at(r)]),
                        Dtype::F32 => RowRef::F32(&self.f32[at(r)]),
                    },
                )
                .map_err(|e| StoreError::arrow(&path, e))?;
                file.write(&batch)?;
            }
            files.push(file.finish()?);
        }
        Ok(PartSummary {
            part: self.part,
            rows: self.rows.len(),
            files,
        })
    }
}

/// Whether part `part` of `run_dir` is whole for every layer: each file exists, its footer reads,
/// and no `.tmp` of it is left over. Anything else means the part must be redone.
pub fn part_complete(run_dir: &Path, part: usize, layers: &[u32]) -> bool {
    layers.iter().all(|&layer| {
        let path = part_path(run_dir, layer, part);
        if tmp_path(&path).exists() {
            return false;
        }
        match File::open(&path) {
            Ok(f) => SerializedFileReader::new(f).is_ok(),
            Err(_) => false,
        }
    })
}

/// Rows of a parquet file, from its footer alone.
pub fn row_count(path: &Path) -> Result<u64> {
    use parquet::file::reader::FileReader;
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| StoreError::parquet(path, e))?;
    Ok(reader.metadata().file_metadata().num_rows() as u64)
}

/// Removes the files of part `part` (final and temporary) for these layers, e.g. before a redo.
pub fn remove_part(run_dir: &Path, part: usize, layers: &[u32]) -> Result<()> {
    for &layer in layers {
        let path = part_path(run_dir, layer, part);
        for p in [tmp_path(&path), path] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&p, e)),
            }
        }
    }
    Ok(())
}
