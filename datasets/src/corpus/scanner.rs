//! The JSON array scanner: cuts the top-level elements out of a streamed JSON array without
//! parsing them, tracking strings, escapes and nesting, so memory is one element at a time and a
//! stream cut off mid-array (the ShareGPT file on PyPI is) ends cleanly with a count of what was
//! dropped.

use std::io::{self, BufRead};

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::io::BufReader;

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
}
