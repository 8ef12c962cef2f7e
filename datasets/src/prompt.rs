//! Prompt keys: the normalized text that splits and deduplication use, and request ids.
//!
//! [`normalize`] trims the prompt and turns every run of whitespace (Unicode `White_Space`, as
//! [`char::is_whitespace`] defines it) into one ASCII space. Nothing else changes: no case
//! folding and no Unicode normalization (NFC needs tables that change between Unicode versions;
//! whitespace is a small, stable set). So the key is the same on any machine and any Rust
//! version, and two prompts share it only when they differ in layout alone; "exact duplicate"
//! in this crate means "equal after `normalize`".
//!
//! [`request_id`] is the first 16 hex digits (64 bits) of
//! `sha256(dataset + "\n" + normalize(prompt))`: shards, reruns and run dirs agree on it.

use sha2::{Digest, Sha256};

/// Hex digits in a request id.
pub const REQUEST_ID_LEN: usize = 16;

/// Trim, and collapse each run of whitespace to one space.
pub fn normalize(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    for word in prompt.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// The stable id of a prompt of a dataset: 16 hex digits of sha256(dataset, normalized prompt).
pub fn request_id(dataset: &str, prompt: &str) -> String {
    let mut h = Sha256::new();
    h.update(dataset.as_bytes());
    h.update(b"\n");
    h.update(normalize(prompt).as_bytes());
    let mut id = hex::encode(h.finalize());
    id.truncate(REQUEST_ID_LEN);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_only_touches_whitespace() {
        assert_eq!(
            normalize("  Give\tthree\n\n tips.\u{3000}"),
            "Give three tips."
        );
        assert_eq!(normalize("Ünïcode  Case"), "Ünïcode Case");
        assert_eq!(normalize(" \n "), "");
        assert_eq!(normalize(&normalize("a  b")), "a b");
    }

    #[test]
    fn request_id_is_pinned() {
        // sha256("alpaca\nGive three tips for staying healthy.") computed with Python's hashlib.
        assert_eq!(
            request_id("alpaca", "Give three tips for staying healthy."),
            "fd930bd6e2e02ea5"
        );
        assert_eq!(
            request_id("alpaca", " Give three tips\nfor staying healthy. "),
            request_id("alpaca", "Give three tips for staying healthy.")
        );
        assert_ne!(request_id("sharegpt", "x"), request_id("alpaca", "x"));
        assert_eq!(request_id("d", "p").len(), REQUEST_ID_LEN);
    }
}
