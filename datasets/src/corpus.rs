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
        source: parquet::errors::ParquetError,
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
        match taken {
            Ok(Taken::Prompt(prompt)) => {
                self.report.records += 1;
                (self.each)(Record { index, prompt });
            }
            Ok(Taken::NoHumanTurn) => self.report.no_human_turn += 1,
            Ok(Taken::EmptyHumanTurn) => self.report.empty_prompt += 1,
            Err(problem) if self.options.skip_bad => {
                self.report.skipped.push(Skipped {
                    location,
                    reason: problem,
                });
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

// ---------------------------------------------------------------------------------------------
// JSON array scanner

/// One top-level element of a JSON array, as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// 0-based position in the array.
    pub index: usize,
    /// Byte offset of its first byte in the stream.
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// How the array ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ending {
    /// No closing `]` before the end of the stream.
    pub truncated: bool,
    /// Elements started but not finished (0 or 1).
    pub dropped_records: usize,
    /// Bytes after the end of the last complete element (or after `[` when there is none).
    pub dropped_bytes: u64,
}

/// Structural problems the scanner sees (element contents are checked by the JSON parser).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("byte {offset}: {detail}")]
    Syntax { offset: u64, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Between {
    /// Before the opening `[`.
    Start,
    /// After `[` or `,`: an element or (after `[`) `]` comes next.
    BeforeElement { first: bool },
    /// After an element: `,` or `]` comes next.
    AfterElement,
    /// After `]`: only blanks may follow.
    Closed,
    /// The stream ended.
    Done,
}

/// Cuts the top-level elements out of a streamed JSON array without parsing them: it tracks
/// strings (with escapes) and the nesting of `{}`/`[]`, so memory is one element at a time.
/// A stream that ends mid-array ends the iteration cleanly; [`ArrayScanner::ending`] says
/// what was dropped.
pub struct ArrayScanner<R> {
    reader: R,
    offset: u64,
    state: Between,
    index: usize,
    last_end: u64,
    ending: Ending,
}

impl<R: BufRead> ArrayScanner<R> {
    pub fn new(reader: R) -> Self {
        Self::starting_at(reader, 0)
    }

    /// A scanner over a stream whose first `offset` bytes were already consumed (offsets in
    /// elements and errors count from the start of the stream).
    pub fn starting_at(reader: R, offset: u64) -> Self {
        ArrayScanner {
            reader,
            offset,
            state: Between::Start,
            index: 0,
            last_end: 0,
            ending: Ending::default(),
        }
    }

    /// How the array ended (meaningful once [`ArrayScanner::next_element`] returned `None`).
    pub fn ending(&self) -> Ending {
        self.ending
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn syntax<T>(&self, offset: u64, detail: impl Into<String>) -> Result<T, ScanError> {
        Err(ScanError::Syntax {
            offset,
            detail: detail.into(),
        })
    }

    /// Skips blanks (and a leading byte-order mark); the next byte, unconsumed, or `None` at EOF.
    fn peek_content(&mut self) -> Result<Option<u8>, ScanError> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            if self.offset == 0 && buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
                self.reader.consume(3);
                self.offset += 3;
                continue;
            }
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => {
                    let b = buf[i];
                    self.reader.consume(i);
                    self.offset += i as u64;
                    return Ok(Some(b));
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                    self.offset += n as u64;
                }
            }
        }
    }

    fn bump(&mut self) {
        self.reader.consume(1);
        self.offset += 1;
    }

    fn truncate(&mut self, dropped_records: usize) {
        self.ending = Ending {
            truncated: true,
            dropped_records,
            dropped_bytes: self.offset - self.last_end,
        };
        self.state = Between::Done;
    }

    /// The next complete element, or `None` at the end of the array or of the stream.
    pub fn next_element(&mut self) -> Result<Option<Element>, ScanError> {
        loop {
            match self.state {
                Between::Done => return Ok(None),
                Between::Start => match self.peek_content()? {
                    None => {
                        self.state = Between::Done;
                        return self.syntax(self.offset, "empty input: expected a JSON array");
                    }
                    Some(b'[') => {
                        self.bump();
                        self.last_end = self.offset;
                        self.state = Between::BeforeElement { first: true };
                    }
                    Some(b) => {
                        self.state = Between::Done;
                        return self.syntax(
                            self.offset,
                            format!("expected a JSON array (`[`), found {}", show_byte(b)),
                        );
                    }
                },
                Between::BeforeElement { first } => match self.peek_content()? {
                    None => {
                        self.truncate(0);
                        return Ok(None);
                    }
                    Some(b']') if first => {
                        self.bump();
                        self.state = Between::Closed;
                    }
                    Some(b @ (b']' | b',')) => {
                        self.state = Between::Done;
                        return self.syntax(
                            self.offset,
                            format!("expected a value after `,`, found {}", show_byte(b)),
                        );
                    }
                    Some(_) => {
                        let start = self.offset;
                        match self.read_value()? {
                            Some(bytes) => {
                                self.last_end = self.offset;
                                self.state = Between::AfterElement;
                                let index = self.index;
                                self.index += 1;
                                return Ok(Some(Element {
                                    index,
                                    offset: start,
                                    bytes,
                                }));
                            }
                            None => {
                                self.truncate(1);
                                return Ok(None);
                            }
                        }
                    }
                },
                Between::AfterElement => match self.peek_content()? {
                    None => {
                        self.truncate(0);
                        return Ok(None);
                    }
                    Some(b',') => {
                        self.bump();
                        self.state = Between::BeforeElement { first: false };
                    }
                    Some(b']') => {
                        self.bump();
                        self.state = Between::Closed;
                    }
                    Some(b) => {
                        self.state = Between::Done;
                        return self.syntax(
                            self.offset,
                            format!(
                                "expected `,` or `]` after record {}, found {}",
                                self.index - 1,
                                show_byte(b)
                            ),
                        );
                    }
                },
                Between::Closed => match self.peek_content()? {
                    None => {
                        self.state = Between::Done;
                        return Ok(None);
                    }
                    Some(b) => {
                        self.state = Between::Done;
                        return self.syntax(
                            self.offset,
                            format!("data after the closing `]`: {}", show_byte(b)),
                        );
                    }
                },
            }
        }
    }

    /// Reads one value starting at the current (non-blank) byte; `None` if the stream ends first.
    fn read_value(&mut self) -> Result<Option<Vec<u8>>, ScanError> {
        let mut out = Vec::new();
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escape = false;
        let mut scalar = false;
        let mut first = true;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let mut i = 0;
            let mut done = false;
            if first {
                first = false;
                match buf[0] {
                    b'{' | b'[' => depth = 1,
                    b'"' => in_string = true,
                    b'}' | b']' => {
                        let b = buf[0];
                        return self.syntax(self.offset, format!("unexpected {}", show_byte(b)));
                    }
                    _ => scalar = true,
                }
                i = 1;
            }
            while i < buf.len() {
                if in_string {
                    if escape {
                        escape = false;
                        i += 1;
                        continue;
                    }
                    match memchr::memchr2(b'"', b'\\', &buf[i..]) {
                        None => {
                            i = buf.len();
                        }
                        Some(j) => {
                            i += j;
                            if buf[i] == b'\\' {
                                escape = true;
                            } else {
                                in_string = false;
                                if depth == 0 {
                                    i += 1;
                                    done = true;
                                    break;
                                }
                            }
                            i += 1;
                        }
                    }
                } else if scalar {
                    let b = buf[i];
                    if b.is_ascii_whitespace() || b == b',' || b == b']' || b == b'}' {
                        done = true;
                        break;
                    }
                    i += 1;
                } else {
                    match buf[i] {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                done = true;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            out.extend_from_slice(&buf[..i]);
            self.reader.consume(i);
            self.offset += i as u64;
            if done {
                return Ok(Some(out));
            }
        }
    }
}

fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("`{}`", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

// ---------------------------------------------------------------------------------------------
// parquet

fn read_parquet(
    path: &Path,
    format: &Format,
    options: Options,
    each: &mut dyn FnMut(Record),
) -> Result<Report, CorpusError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::DataType;
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let mut report = Report::default();
    let (sha, bytes) = sha256_file(path)?;
    report.sha256 = sha;
    report.bytes = bytes;

    let parquet_err = |source| CorpusError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| CorpusError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let schema = builder.schema().clone();
    let columns = || {
        schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
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
    for (name, required) in &wanted {
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
            Err(_) if *required => {
                return Err(CorpusError::MissingColumn {
                    path: path.to_path_buf(),
                    field: name.to_string(),
                    columns: columns(),
                });
            }
            Err(_) => present.push(None),
        }
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(parquet_err)?;
    let mut row = 0usize;
    for batch in reader {
        let batch = batch.map_err(|source| CorpusError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
        let cols: Vec<Option<arrow::array::ArrayRef>> = present
            .iter()
            .map(|name| name.as_ref().and_then(|n| batch.column_by_name(n).cloned()))
            .collect();
        let value = |c: usize, r: usize| -> Option<String> {
            let col = cols[c].as_ref()?;
            if col.is_null(r) {
                return None;
            }
            Some(match col.data_type() {
                DataType::Utf8 => col.as_string::<i32>().value(r).to_owned(),
                DataType::LargeUtf8 => col.as_string::<i64>().value(r).to_owned(),
                _ => col.as_string_view().value(r).to_owned(),
            })
        };
        for r in 0..batch.num_rows() {
            let taken = match format {
                Format::Alpaca => match value(0, r) {
                    None => Err(Problem::MissingField("instruction".into())),
                    Some(ins) => alpaca_prompt(&ins, &value(1, r).unwrap_or_default()),
                },
                Format::Field(name) => match value(0, r) {
                    None => Err(Problem::MissingField(name.clone())),
                    Some(p) if p.trim().is_empty() => Err(Problem::EmptyPrompt(name.clone())),
                    Some(p) => Ok(p),
                },
                Format::ShareGpt => unreachable!("rejected above"),
            };
            let location = Location::Row(row);
            match taken {
                Ok(prompt) => {
                    report.records += 1;
                    each(Record { index: row, prompt });
                }
                Err(problem) if options.skip_bad => {
                    report.skipped.push(Skipped {
                        location,
                        reason: problem,
                    });
                }
                Err(problem) => {
                    return Err(CorpusError::Record {
                        path: path.to_path_buf(),
                        location,
                        problem,
                    });
                }
            }
            row += 1;
        }
    }
    Ok(report)
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

    fn scan(text: &str) -> (Vec<String>, Result<Ending, String>) {
        let mut s = ArrayScanner::new(text.as_bytes());
        let mut out = Vec::new();
        loop {
            match s.next_element() {
                Ok(Some(el)) => out.push(String::from_utf8(el.bytes).unwrap()),
                Ok(None) => return (out, Ok(s.ending())),
                Err(e) => return (out, Err(e.to_string())),
            }
        }
    }

    #[test]
    fn scanner_cuts_elements_of_every_kind() {
        let (els, end) = scan(r#" [ {"a": "x}]\"{"}, [1, [2]], "s\\", 12.5e3 , true,null ] "#);
        assert_eq!(
            els,
            [
                r#"{"a": "x}]\"{"}"#,
                "[1, [2]]",
                r#""s\\""#,
                "12.5e3",
                "true",
                "null"
            ]
        );
        assert_eq!(end.unwrap(), Ending::default());
        let (els, end) = scan("[]");
        assert!(els.is_empty());
        assert_eq!(end.unwrap(), Ending::default());
    }

    #[test]
    fn scanner_survives_truncation_anywhere() {
        let full = r#"[{"id": "a", "v": "q\"uo\\te"}, {"id": "b", "n": 123}, {"id": "c"}]"#;
        for cut in 0..full.len() {
            let (els, end) = scan(&full[..cut]);
            if cut == 0 {
                assert!(end.is_err(), "empty input is an error");
                continue;
            }
            let end = end.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert!(end.truncated, "cut at {cut}");
            // Every element handed out is complete JSON.
            for el in &els {
                serde_json::from_str::<Value>(el).unwrap();
            }
            assert!(end.dropped_records <= 1);
            let kept: usize = els.len();
            assert!(kept <= 3);
        }
        let (els, end) = scan(full);
        assert_eq!(els.len(), 3);
        assert!(!end.unwrap().truncated);
    }

    #[test]
    fn scanner_reports_what_was_dropped() {
        // Cut inside a string right after an escape.
        let (els, end) = scan("[{\"a\": 1}, {\"b\": \"x\\");
        assert_eq!(els, ["{\"a\": 1}"]);
        let end = end.unwrap();
        assert_eq!(
            end,
            Ending {
                truncated: true,
                dropped_records: 1,
                dropped_bytes: 11
            }
        );
        // Cut inside a number at the top level.
        let (els, end) = scan("[1, 23");
        assert_eq!(els, ["1"]);
        assert_eq!(
            end.unwrap(),
            Ending {
                truncated: true,
                dropped_records: 1,
                dropped_bytes: 4
            }
        );
        // Cut right after a comma.
        let (els, end) = scan("[{}, ");
        assert_eq!(els, ["{}"]);
        assert_eq!(
            end.unwrap(),
            Ending {
                truncated: true,
                dropped_records: 0,
                dropped_bytes: 2
            }
        );
        // Cut right after an element.
        let (_, end) = scan("[{}");
        assert_eq!(
            end.unwrap(),
            Ending {
                truncated: true,
                dropped_records: 0,
                dropped_bytes: 0
            }
        );
        // Cut right after the bracket.
        let (els, end) = scan("[");
        assert!(els.is_empty());
        assert_eq!(
            end.unwrap(),
            Ending {
                truncated: true,
                dropped_records: 0,
                dropped_bytes: 0
            }
        );
    }

    #[test]
    fn scanner_rejects_what_is_not_an_array() {
        assert!(scan("").1.unwrap_err().contains("empty input"));
        assert!(
            scan("{\"a\": 1}")
                .1
                .unwrap_err()
                .contains("expected a JSON array")
        );
        assert!(
            scan("[1 2]")
                .1
                .unwrap_err()
                .contains("expected `,` or `]` after record 0")
        );
        assert!(scan("[1,]").1.unwrap_err().contains("expected a value"));
        assert!(scan("[1] x").1.unwrap_err().contains("after the closing"));
    }

    #[test]
    fn scanner_handles_tiny_reads() {
        // A reader that hands out one byte at a time exercises every buffer boundary.
        let text = r#"[{"a": "b\"\\c"}, ["]"], "x"]"#;
        let reader = BufReader::with_capacity(1, text.as_bytes());
        let mut s = ArrayScanner::new(reader);
        let mut n = 0;
        while let Some(el) = s.next_element().unwrap() {
            serde_json::from_slice::<Value>(&el.bytes).unwrap();
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(!s.ending().truncated);
    }

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
