//! Corpora: prompts streamed out of Alpaca, ShareGPT, generic JSONL/JSON and parquet files.
//!
//! A [`Corpus`] is a file plus a [`Format`] (which field holds the user message). The file's
//! encoding is found on its own: `*.parquet` is read with the parquet crate's arrow reader,
//! `*.zst` is decompressed on the fly, and JSON text is a JSON array when its first non-blank byte
//! is `[` and JSON Lines otherwise. Reading is streaming: one record is held at a time, a JSON
//! array is cut element by element by a byte scanner ([`ArrayScanner`]) that tracks strings,
//! escapes and nesting, and each element is parsed on its own. Memory stays bounded whatever the
//! file's size.
//!
//! A JSON array cut off mid-record (the ShareGPT file on PyPI is) is not an error: every complete
//! element is kept and the [`Report`] says how many records and bytes were dropped at the end.
//! Bad input (not JSON, wrong type, missing field, empty prompt) fails with a [`CorpusError`]
//! naming the file, the line (JSON Lines), record (JSON array) or row (parquet), and the field;
//! with [`Options::skip_bad`] the record is listed in [`Report::skipped`] instead.
//!
//! User messages:
//! - Alpaca (`{instruction, input, output}`): `instruction`, or `instruction + "\n\n" + input` when
//!   `input` is non-empty (as the Stanford Alpaca prompt and `shared/fixtures` build it; a missing
//!   or null `input` counts as empty). Text is kept exactly as stored.
//! - ShareGPT (`{id, conversations: [{from, value}]}`): the first turn whose `from` is `"human"`.
//!   A conversation without one is counted in [`Report::no_human_turn`], one whose first human
//!   turn is blank in [`Report::empty_prompt`]; both are properties of the corpus, not errors.
//! - Any other file: the string field named by [`Format::Field`] (`--prompt-field NAME`).
//!
//! The repository carries Alpaca ([`carried_alpaca_path`]): `data/alpaca.jsonl.zst`, the
//! recovered Stanford Alpaca records (CC BY-NC 4.0, see `data/alpaca.LICENSE.md`). Its first
//! 5,000 records keep the original order and the rest are sorted by instruction, so draw samples
//! with a seed ([`crate::split::sample`]), never the first N.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

mod parquet;
mod scanner;

use parquet::read_parquet;
pub use scanner::{ArrayScanner, Element, Ending, ScanError};

/// sha256 of the carried `data/alpaca.jsonl.zst` as committed.
pub const CARRIED_ALPACA_ZST_SHA256: &str =
    "fdb7876303bfd320a14907cab7b57887799d15a2285a02e49ff80f6163e81953";
/// sha256 of the decompressed carried Alpaca (`alpaca.jsonl`, as in its README). This is what
/// [`Report::sha256`] gives for the carried corpus.
pub const CARRIED_ALPACA_SHA256: &str =
    "1d9e8d5a337a13ef2b7a6aee3ad64e839aab2fce2b9d22f331605bcf794dee57";
/// Records in the carried Alpaca.
pub const CARRIED_ALPACA_RECORDS: usize = 26_932;

/// The carried Alpaca (`datasets/data/alpaca.jsonl.zst` in the source tree).
pub fn carried_alpaca_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/alpaca.jsonl.zst")
}

/// The carried Alpaca, decompressed, as JSON Lines.
pub fn open_carried_alpaca() -> Result<Box<dyn BufRead>, CorpusError> {
    open_text(&carried_alpaca_path())
}

/// Opens a JSON text file, decompressing it when its name ends in `.zst`.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead>, CorpusError> {
    let file = File::open(path).map_err(|e| CorpusError::io(path, e))?;
    if is_zst(path) {
        let dec = zstd::stream::read::Decoder::new(file).map_err(|e| CorpusError::io(path, e))?;
        Ok(Box::new(BufReader::with_capacity(1 << 16, dec)))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
    }
}

fn is_zst(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zst"))
}

fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// One prompt taken from a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the source: element of a JSON array, record (non-blank line) of a JSON Lines
    /// file, row of a parquet file; 0-based, counting records that were skipped.
    pub index: usize,
    /// The user message.
    pub prompt: String,
}

/// Where the user message is in each record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// `{instruction, input, output}`.
    Alpaca,
    /// `{id, conversations: [{from, value}]}`.
    ShareGpt,
    /// A string field (JSON) or string column (parquet) of this name.
    Field(String),
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Alpaca => f.write_str("alpaca"),
            Format::ShareGpt => f.write_str("sharegpt"),
            Format::Field(name) => write!(f, "field `{name}`"),
        }
    }
}

/// How to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// List bad records in [`Report::skipped`] and go on, instead of failing on the first.
    pub skip_bad: bool,
}

/// Where a record is in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSON Lines file.
    Line(usize),
    /// 0-based element of a JSON array and the byte offset where it starts.
    Record { index: usize, offset: u64 },
    /// 0-based row of a parquet file.
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Record { index, offset } => write!(f, "record {index} (byte {offset})"),
            Location::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// What is wrong with one record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The record does not parse.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// The record is not a JSON object.
    #[error("not a JSON object")]
    NotObject,
    /// A required field is absent (or null).
    #[error("missing field `{0}`")]
    MissingField(String),
    /// A field has the wrong JSON type.
    #[error("wrong type for field `{field}`: expected {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    /// The user message is empty or blank.
    #[error("empty prompt (field `{0}`)")]
    EmptyPrompt(String),
}

/// A record left out under [`Options::skip_bad`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub location: Location,
    pub reason: Problem,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

impl Serialize for Skipped {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Skipped", 2)?;
        st.serialize_field("location", &self.location.to_string())?;
        st.serialize_field("reason", &self.reason.to_string())?;
        st.end()
    }
}

/// What a read found, for the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// sha256 (hex) of the content read: the decompressed text for `.zst`, the file otherwise.
    pub sha256: String,
    /// Bytes of content read.
    pub bytes: u64,
    /// Records handed out.
    pub records: usize,
    /// Bad records left out (only with [`Options::skip_bad`]).
    pub skipped: Vec<Skipped>,
    /// ShareGPT conversations without a human turn (left out).
    pub no_human_turn: usize,
    /// ShareGPT conversations whose first human turn is blank (left out).
    pub empty_prompt: usize,
    /// The JSON array ends without its closing `]`.
    pub truncated: bool,
    /// Incomplete records at the end of a truncated array (0 or 1).
    pub dropped_records: usize,
    /// Bytes after the last complete record of a truncated array.
    pub dropped_bytes: u64,
}

/// Errors of this module. Each names the file; record problems name the location and field.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: the file is empty")]
    Empty { path: PathBuf },
    #[error("{path}: {location}: {problem}")]
    Record {
        path: PathBuf,
        location: Location,
        problem: Problem,
    },
    #[error("{path}: byte {offset}: {detail}")]
    Syntax {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error("{path}: no column `{field}` (columns: {columns})")]
    MissingColumn {
        path: PathBuf,
        field: String,
        columns: String,
    },
    #[error("{path}: column `{field}` is {found}, not a string column")]
    ColumnType {
        path: PathBuf,
        field: String,
        found: String,
    },
    #[error("{path}: {format} cannot be read from parquet")]
    Unsupported { path: PathBuf, format: String },
    #[error("{path}: parquet: {source}")]
    Parquet {
        path: PathBuf,
        source: ::parquet::errors::ParquetError,
    },
    #[error("{path}: arrow: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
}

impl CorpusError {
    fn io(path: &Path, source: io::Error) -> Self {
        CorpusError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A corpus file and where its prompts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    pub path: PathBuf,
    pub format: Format,
}

impl Corpus {
    /// An Alpaca file (JSON array, JSON Lines, `.zst` of either, or parquet).
    pub fn alpaca(path: impl Into<PathBuf>) -> Self {
        Corpus {
            path: path.into(),
            format: Format::Alpaca,
        }
    }

    /// The Alpaca carried in the repository.
    pub fn carried_alpaca() -> Self {
        Corpus::alpaca(carried_alpaca_path())
    }

    /// A ShareGPT file (JSON array, possibly truncated, or JSON Lines).
    pub fn sharegpt(path: impl Into<PathBuf>) -> Self {
        Corpus {
            path: path.into(),
            format: Format::ShareGpt,
        }
    }

    /// Any JSON/JSONL/parquet file whose prompt is the string field `name`.
    pub fn field(path: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Corpus {
            path: path.into(),
            format: Format::Field(name.into()),
        }
    }

    /// Streams every record to `each`, in source order.
    pub fn for_each(
        &self,
        options: Options,
        mut each: impl FnMut(Record),
    ) -> Result<Report, CorpusError> {
        if is_parquet(&self.path) {
            return read_parquet(&self.path, &self.format, options, &mut each);
        }
        let file = File::open(&self.path).map_err(|e| CorpusError::io(&self.path, e))?;
        let hashing = HashingReader::new(file);
        if is_zst(&self.path) {
            let dec = zstd::stream::read::Decoder::new(hashing)
                .map_err(|e| CorpusError::io(&self.path, e))?;
            // Hash the decompressed content: the figure that matches an uncompressed copy.
            let inner = HashingReader::new(dec);
            let mut reader = BufReader::with_capacity(1 << 16, inner);
            let mut report =
                read_json_text(&self.path, &mut reader, &self.format, options, &mut each)?;
            let inner = reader.into_inner();
            report.bytes = inner.bytes;
            report.sha256 = hex::encode(inner.hasher.finalize());
            Ok(report)
        } else {
            let mut reader = BufReader::with_capacity(1 << 16, hashing);
            let mut report =
                read_json_text(&self.path, &mut reader, &self.format, options, &mut each)?;
            let inner = reader.into_inner();
            report.bytes = inner.bytes;
            report.sha256 = hex::encode(inner.hasher.finalize());
            Ok(report)
        }
    }

    /// Reads every record into memory (prompts only; fine for corpora of this size).
    pub fn load(&self, options: Options) -> Result<(Vec<Record>, Report), CorpusError> {
        let mut records = Vec::new();
        let report = self.for_each(options, |r| records.push(r))?;
        Ok((records, report))
    }
}

/// Counts and hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Reads JSON text (array or lines) to the end, so the hash covers the whole content.
fn read_json_text(
    path: &Path,
    reader: &mut impl BufRead,
    format: &Format,
    options: Options,
    each: &mut dyn FnMut(Record),
) -> Result<Report, CorpusError> {
    let lead = first_content_byte(reader).map_err(|e| CorpusError::io(path, e))?;
    let Some(first) = lead.byte else {
        // An empty or blank file holds no corpus.
        return Err(CorpusError::Empty {
            path: path.to_path_buf(),
        });
    };
    let mut report = Report::default();
    let mut extractor = Extractor {
        format,
        options,
        report: &mut report,
        each,
    };
    if first == b'[' {
        let mut scanner = ArrayScanner::starting_at(reader, lead.skipped);
        loop {
            match scanner.next_element() {
                Ok(Some(el)) => {
                    let location = Location::Record {
                        index: el.index,
                        offset: el.offset,
                    };
                    let parsed = serde_json::from_slice::<Value>(&el.bytes)
                        .map_err(|e| Problem::NotJson(e.to_string()));
                    extractor.take(path, el.index, location, parsed)?;
                }
                Ok(None) => break,
                Err(ScanError::Io(e)) => return Err(CorpusError::io(path, e)),
                Err(ScanError::Syntax { offset, detail }) => {
                    return Err(CorpusError::Syntax {
                        path: path.to_path_buf(),
                        offset,
                        detail,
                    });
                }
            }
        }
        let end = scanner.ending();
        report.truncated = end.truncated;
        report.dropped_records = end.dropped_records;
        report.dropped_bytes = end.dropped_bytes;
    } else {
        let mut line = Vec::new();
        let mut line_no = lead.newlines;
        let mut index = 0usize;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| CorpusError::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed =
                serde_json::from_slice::<Value>(&line).map_err(|e| Problem::NotJson(e.to_string()));
            extractor.take(path, index, Location::Line(line_no), parsed)?;
            index += 1;
        }
    }
    Ok(report)
}

/// The first byte of content and what was skipped before it.
struct Lead {
    byte: Option<u8>,
    skipped: u64,
    newlines: usize,
}

/// Skips blank bytes and a UTF-8 byte-order mark; the first other byte stays unconsumed.
fn first_content_byte(reader: &mut impl BufRead) -> io::Result<Lead> {
    let mut lead = Lead {
        byte: None,
        skipped: 0,
        newlines: 0,
    };
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(lead);
        }
        if lead.skipped == 0 && buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
            reader.consume(3);
            lead.skipped = 3;
            continue;
        }
        let i = buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(buf.len());
        lead.newlines += buf[..i].iter().filter(|&&b| b == b'\n').count();
        lead.byte = buf.get(i).copied();
        reader.consume(i);
        lead.skipped += i as u64;
        if lead.byte.is_some() {
            return Ok(lead);
        }
    }
}

/// Turns parsed records into prompts, counting or failing on bad ones.
struct Extractor<'a> {
    format: &'a Format,
    options: Options,
    report: &'a mut Report,
    each: &'a mut dyn FnMut(Record),
}

/// What one record yields.
enum Taken {
    Prompt(String),
    NoHumanTurn,
    EmptyHumanTurn,
}

impl Extractor<'_> {
    fn take(
        &mut self,
        path: &Path,
        index: usize,
        location: Location,
        parsed: Result<Value, Problem>,
    ) -> Result<(), CorpusError> {
        let taken = parsed.and_then(|v| extract(self.format, &v));
        self.settle(path, index, location, taken)
    }

    /// Hands a prompt to the caller, counts a conversation without one, lists a bad record
    /// (with `skip_bad`) or fails naming it.
    fn settle(
        &mut self,
        path: &Path,
        index: usize,
        location: Location,
        taken: Result<Taken, Problem>,
    ) -> Result<(), CorpusError> {
        match taken {
            Ok(Taken::Prompt(prompt)) => {
                self.report.records += 1;
                (self.each)(Record { index, prompt });
            }
            Ok(Taken::NoHumanTurn) => self.report.no_human_turn += 1,
            Ok(Taken::EmptyHumanTurn) => self.report.empty_prompt += 1,
            Err(reason) if self.options.skip_bad => {
                self.report.skipped.push(Skipped { location, reason });
            }
            Err(problem) => {
                return Err(CorpusError::Record {
                    path: path.to_path_buf(),
                    location,
                    problem,
                });
            }
        }
        Ok(())
    }
}

fn extract(format: &Format, value: &Value) -> Result<Taken, Problem> {
    let obj = value.as_object().ok_or(Problem::NotObject)?;
    match format {
        Format::Alpaca => {
            let instruction = required_str(obj, "instruction")?;
            let input = optional_str(obj, "input")?.unwrap_or("");
            Ok(Taken::Prompt(alpaca_prompt(instruction, input)?))
        }
        Format::ShareGpt => {
            let turns = match obj.get("conversations") {
                None | Some(Value::Null) => {
                    return Err(Problem::MissingField("conversations".into()));
                }
                Some(Value::Array(turns)) => turns,
                Some(_) => {
                    return Err(Problem::WrongType {
                        field: "conversations".into(),
                        expected: "an array",
                    });
                }
            };
            for turn in turns {
                let turn = turn.as_object().ok_or(Problem::WrongType {
                    field: "conversations[]".into(),
                    expected: "an object",
                })?;
                if turn.get("from").and_then(Value::as_str) != Some("human") {
                    continue;
                }
                let value = required_str(turn, "value").map_err(|p| match p {
                    Problem::MissingField(_) => {
                        Problem::MissingField("conversations[].value".into())
                    }
                    _ => Problem::WrongType {
                        field: "conversations[].value".into(),
                        expected: "a string",
                    },
                })?;
                if value.trim().is_empty() {
                    return Ok(Taken::EmptyHumanTurn);
                }
                return Ok(Taken::Prompt(value.to_owned()));
            }
            Ok(Taken::NoHumanTurn)
        }
        Format::Field(name) => {
            let prompt = required_str(obj, name)?;
            if prompt.trim().is_empty() {
                return Err(Problem::EmptyPrompt(name.clone()));
            }
            Ok(Taken::Prompt(prompt.to_owned()))
        }
    }
}

/// The Alpaca user message.
pub fn alpaca_prompt(instruction: &str, input: &str) -> Result<String, Problem> {
    if instruction.trim().is_empty() {
        return Err(Problem::EmptyPrompt("instruction".into()));
    }
    if input.is_empty() {
        Ok(instruction.to_owned())
    } else {
        Ok(format!("{instruction}\n\n{input}"))
    }
}

fn required_str<'v>(
    obj: &'v serde_json::Map<String, Value>,
    field: &str,
) -> Result<&'v str, Problem> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(Problem::MissingField(field.to_owned())),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Problem::WrongType {
            field: field.to_owned(),
            expected: "a string",
        }),
    }
}

fn optional_str<'v>(
    obj: &'v serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<&'v str>, Problem> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Problem::WrongType {
            field: field.to_owned(),
            expected: "a string",
        }),
    }
}

/// sha256 (hex) and length of a file (streamed by `trail_fs`).
pub fn sha256_file(path: &Path) -> Result<(String, u64), CorpusError> {
    trail_fs::sha256_file_len(path).map_err(|e| CorpusError::io(&e.path, e.source))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p
    }

    #[test]
    fn alpaca_prompt_joins_input_after_a_blank_line() {
        assert_eq!(alpaca_prompt("Do it.", "").unwrap(), "Do it.");
        assert_eq!(
            alpaca_prompt("Do it.", "with this").unwrap(),
            "Do it.\n\nwith this"
        );
        assert_eq!(
            alpaca_prompt("  ", "x"),
            Err(Problem::EmptyPrompt("instruction".into()))
        );
    }

    #[test]
    fn sharegpt_counts_conversations_without_a_human_turn() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"[
          {"id": "a", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "Q1"}]},
          {"id": "b", "conversations": [{"from": "gpt", "value": "only me"}]},
          {"id": "c", "conversations": [{"from": "human", "value": "  "}]},
          {"id": "d", "conversations": [{"from": "human", "value": "Q4"}, {"from": "human", "value": "Q5"}]},
          {"id": "e", "conversations": [{"from": "human", "value": "cut \"here\\"#;
        let p = write(dir.path(), "sg.json", text);
        let (recs, rep) = Corpus::sharegpt(&p).load(Options::default()).unwrap();
        assert_eq!(
            recs,
            [
                Record {
                    index: 0,
                    prompt: "Q1".into()
                },
                Record {
                    index: 3,
                    prompt: "Q4".into()
                }
            ]
        );
        assert_eq!(rep.records, 2);
        assert_eq!(rep.no_human_turn, 1);
        assert_eq!(rep.empty_prompt, 1);
        assert!(rep.truncated);
        assert_eq!(rep.dropped_records, 1);
        let tail = &text[text.find(",\n          {\"id\": \"e\"").unwrap()..];
        assert_eq!(rep.dropped_bytes, tail.len() as u64);
        assert_eq!(rep.bytes, text.len() as u64);
    }
}
