//! The project's one content hash: SHA-256. Cache keys (bases, scorers, stages) are its first
//! 16 hex digits over a canonical text; archive manifests use the full digest.

use sha2::{Digest, Sha256};

/// The full SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A cache key: the first 16 hex digits (64 bits) of the SHA-256 of `text`.
pub fn key16(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes())[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        // FIPS 180-2 test vector "abc".
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key16("abc"), "ba7816bf8f01cfea");
    }
}
