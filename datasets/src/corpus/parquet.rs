//! Prompts out of a parquet file: the named string columns, read with the arrow reader in batches
//! of 1,024 rows, errors naming the row and the column.

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Schema};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{CorpusError, Extractor, Format, Location, Options, Problem, Record, Report, Taken};
use super::{alpaca_prompt, sha256_file};

/// Streams the prompts of a parquet corpus to `each`, row by row.
pub(super) fn read_parquet(
    path: &Path,
    format: &Format,
    options: Options,
    each: &mut dyn FnMut(Record),
) -> Result<Report, CorpusError> {
    let mut report = Report::default();
    (report.sha256, report.bytes) = sha256_file(path)?;
    let parquet_err = |source| CorpusError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| CorpusError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let (roots, present) = resolve_columns(path, format, builder.schema())?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(parquet_err)?;
    let mut extractor = Extractor {
        format,
        options,
        report: &mut report,
        each,
    };
    let mut row = 0usize;
    for batch in reader {
        let batch = batch.map_err(|source| CorpusError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
        let cols: Vec<Option<ArrayRef>> = present
            .iter()
            .map(|name| name.as_ref().and_then(|n| batch.column_by_name(n).cloned()))
            .collect();
        for r in 0..batch.num_rows() {
            let taken = take_row(format, &cols, r).map(Taken::Prompt);
            extractor.settle(path, row, Location::Row(row), taken)?;
            row += 1;
        }
    }
    Ok(report)
}

/// The projected column indices, and per wanted column its name when the file has it.
fn resolve_columns(
    path: &Path,
    format: &Format,
    schema: &Schema,
) -> Result<(Vec<usize>, Vec<Option<String>>), CorpusError> {
    // (name, required)
    let wanted: Vec<(&str, bool)> = match format {
        Format::Alpaca => vec![("instruction", true), ("input", false)],
        Format::Field(name) => vec![(name.as_str(), true)],
        Format::ShareGpt => {
            return Err(CorpusError::Unsupported {
                path: path.to_path_buf(),
                format: format.to_string(),
            });
        }
    };
    let mut roots = Vec::new();
    let mut present = Vec::new();
    for (name, required) in wanted {
        match schema.index_of(name) {
            Ok(i) => {
                let dt = schema.field(i).data_type();
                if !matches!(
                    dt,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                ) {
                    return Err(CorpusError::ColumnType {
                        path: path.to_path_buf(),
                        field: name.to_string(),
                        found: dt.to_string(),
                    });
                }
                roots.push(i);
                present.push(Some(name.to_string()));
            }
            Err(_) if required => {
                return Err(CorpusError::MissingColumn {
                    path: path.to_path_buf(),
                    field: name.to_string(),
                    columns: column_names(schema),
                });
            }
            Err(_) => present.push(None),
        }
    }
    Ok((roots, present))
}

fn column_names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The string in column `c` at row `r`; `None` when the column is absent or the cell null.
fn cell(cols: &[Option<ArrayRef>], c: usize, r: usize) -> Option<String> {
    let col = cols[c].as_ref()?;
    if col.is_null(r) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(r).to_owned(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(r).to_owned(),
        _ => col.as_string_view().value(r).to_owned(),
    })
}

/// The prompt of row `r` (columns in [`resolve_columns`]'s order).
fn take_row(format: &Format, cols: &[Option<ArrayRef>], r: usize) -> Result<String, Problem> {
    match format {
        Format::Alpaca => match cell(cols, 0, r) {
            None => Err(Problem::MissingField("instruction".into())),
            Some(ins) => alpaca_prompt(&ins, &cell(cols, 1, r).unwrap_or_default()),
        },
        Format::Field(name) => match cell(cols, 0, r) {
            None => Err(Problem::MissingField(name.clone())),
            Some(p) if p.trim().is_empty() => Err(Problem::EmptyPrompt(name.clone())),
            Some(p) => Ok(p),
        },
        Format::ShareGpt => unreachable!("resolve_columns rejects ShareGPT"),
    }
}
