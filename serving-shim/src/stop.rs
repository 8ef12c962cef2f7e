//! [`StopStrings`]: a request's stop strings (OpenAI's `stop`). The engine ends a request in the
//! step whose token completes one in the decoded text (finish reason `stop`); the front end cuts
//! the text before the first one, and while streaming holds back the tail that could still be
//! the start of one, so a stop string never reaches the client in part.

/// Most stop strings in a request.
pub const MAX_STOP_STRINGS: usize = 16;

/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// A request's stop strings (none: the text ends only at a stop token or the cap).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct StopStrings(Vec<String>);

impl StopStrings {
    /// The stop strings `v`: at most [`MAX_STOP_STRINGS`], each of 1 to [`MAX_STOP_BYTES`]
    /// bytes, or an error saying which is not.
    pub fn new(v: Vec<String>) -> Result<Self, String> {
        if v.len() > MAX_STOP_STRINGS {
            return Err(format!(
                "{} stop strings: at most {MAX_STOP_STRINGS}",
                v.len()
            ));
        }
        if let Some(s) = v.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(format!(
                "stop string {s:?}: must be 1 to {MAX_STOP_BYTES} bytes"
            ));
        }
        Ok(Self(v))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The strings.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Where the first stop string in `text` begins (the earliest of any), if one is there.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.0.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// How much of `text`, a prefix of a longer text to come, may be shown: up to the first
    /// stop string if there is one; otherwise all but the tail that the start of a stop string
    /// could be (cut back to a character boundary).
    pub fn visible(&self, text: &str) -> usize {
        if let Some(at) = self.find(text) {
            return at;
        }
        let longest = self.0.iter().map(String::len).max().unwrap_or(0);
        let mut end = text.len().saturating_sub(longest.saturating_sub(1));
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(v: &[&str]) -> StopStrings {
        StopStrings::new(v.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    #[test]
    fn the_first_stop_string_cuts_the_text() {
        let s = stops(&["\n\n", "END"]);
        assert_eq!(s.find("a END b\n\n"), Some(2));
        assert_eq!(s.find("no stop here"), None);
        assert_eq!(StopStrings::default().find("anything"), None);
    }

    #[test]
    fn a_streamed_text_holds_back_what_could_start_a_stop_string() {
        let s = stops(&["END"]);
        // "EN" could be the start of "END": held back.
        assert_eq!(s.visible("abcEN"), 3);
        assert_eq!(s.visible("abcEND"), 3);
        assert_eq!(s.visible("ab"), 0);
        // Held back to a character boundary.
        assert_eq!(s.visible("aéx"), 1);
        assert_eq!(StopStrings::default().visible("abc"), 3);
    }

    #[test]
    fn empty_long_or_too_many_stop_strings_are_refused() {
        assert!(StopStrings::new(vec![String::new()]).is_err());
        assert!(StopStrings::new(vec!["x".repeat(MAX_STOP_BYTES + 1)]).is_err());
        assert!(StopStrings::new(vec!["x".into(); MAX_STOP_STRINGS + 1]).is_err());
        assert!(StopStrings::new(vec!["x".into(); MAX_STOP_STRINGS]).is_ok());
    }
}
