//! Streaming sha256 of a file: read in blocks, never whole into memory.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Read block of the streaming hash.
const BLOCK: usize = 1 << 16;

/// The sha256 of the file at `path`, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_file_len(path).map(|(hex, _)| hex)
}

/// The sha256 of the file at `path` (lowercase hex) and its length in bytes.
pub fn sha256_file_len(path: &Path) -> Result<(String, u64)> {
    let file = File::open(path).map_err(|e| Error::new(path, e))?;
    let mut reader = BufReader::with_capacity(BLOCK, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut len = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::new(path, e)),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_and_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        crate::write_atomic(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file_len(&p).unwrap(),
            (
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_string(),
                3
            )
        );
        // Longer than a block: the same digest as hashing it in one piece.
        let big: Vec<u8> = (0..3 * BLOCK + 17).map(|i| (i * 31 % 251) as u8).collect();
        crate::write_atomic(&p, &big).unwrap();
        assert_eq!(sha256_file(&p).unwrap(), hex::encode(Sha256::digest(&big)));
        let missing = dir.path().join("missing");
        let err = sha256_file(&missing).unwrap_err();
        assert_eq!(err.path, missing);
    }
}
