//! `encode` and `decode`, byte-identical to Java's `URLEncoder.encode(s, "UTF-8")` and
//! `URLDecoder.decode(s, "UTF-8")` (CONTRACT §1). Node names in ZooKeeper and keys in etcd are
//! `encode(url.to_full_string())`, so this is what makes them interoperate with Dubbo.

use crate::error::{Error, Result};

/// Encodes like Java's `URLEncoder.encode(s, "UTF-8")`: `A-Z a-z 0-9 . - * _` are kept, a
/// space becomes `+`, every other byte of the UTF-8 form becomes `%XX` (upper-case hex).
///
/// ```
/// assert_eq!(registry_core::encode("dubbo://h:1/a?x=1&y=2"), "dubbo%3A%2F%2Fh%3A1%2Fa%3Fx%3D1%26y%3D2");
/// assert_eq!(registry_core::encode("a b~é"), "a+b%7E%C3%A9");
/// ```
pub fn encode(s: &str) -> String {
    // `form_urlencoded` (rust-url) implements the application/x-www-form-urlencoded byte
    // serializer, whose kept set and space rule are exactly URLEncoder's.
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Decodes like Java's `URLDecoder.decode(s, "UTF-8")`: `+` is a space and `%XX` a byte.
///
/// Unlike a lenient decoder, a `%` not followed by two hex digits, or bytes that are not UTF-8,
/// are an [`Error::InvalidEncoding`] naming the input and the offset, as Java throws: a node
/// name that does not decode must be skipped, not guessed at.
pub fn decode(s: &str) -> Result<String> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
                match (hex(i + 1), hex(i + 2)) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => {
                        return Err(Error::InvalidEncoding {
                            input: s.to_owned(),
                            reason: format!("`%` at offset {i} is not followed by two hex digits"),
                        });
                    }
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|e| Error::InvalidEncoding {
        input: s.to_owned(),
        reason: format!(
            "the decoded bytes are not UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// URLEncoder's rule for one byte, written out independently of the implementation.
    fn java_rule(b: u8) -> String {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'*' | b'_' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        }
    }

    #[test]
    fn every_ascii_byte_follows_urlencoder() {
        for b in 0u8..=127 {
            let s = (b as char).to_string();
            assert_eq!(encode(&s), java_rule(b), "byte {b:#04x}");
            assert_eq!(decode(&encode(&s)).unwrap(), s);
        }
    }

    #[test]
    fn every_non_ascii_byte_is_percent_encoded() {
        // Bytes 128..=255 only occur inside multi-byte UTF-8 sequences; each one is %XX.
        for cp in 0x80u32..=0x7FF {
            let c = char::from_u32(cp).unwrap();
            let s = c.to_string();
            let expect: String = s.bytes().map(java_rule).collect();
            assert_eq!(encode(&s), expect, "U+{cp:04X}");
        }
        let seen: std::collections::BTreeSet<u8> = (0x80u32..=0x7FF)
            .chain(0x800..=0x8FF)
            .filter_map(char::from_u32)
            .flat_map(|c| c.to_string().into_bytes())
            .collect();
        assert!(seen.iter().all(|b| *b >= 0x80));
        for b in 0x80u8..=0xF4 {
            if seen.contains(&b) {
                assert_eq!(java_rule(b).len(), 3);
            }
        }
    }

    #[test]
    fn multibyte_utf8_matches_java() {
        // Values printed by java.net.URLEncoder.encode(s, "UTF-8").
        assert_eq!(encode("中文"), "%E4%B8%AD%E6%96%87");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode("😀"), "%F0%9F%98%80");
        assert_eq!(encode("a b+c"), "a+b%2Bc");
        assert_eq!(encode("~!'()"), "%7E%21%27%28%29");
        assert_eq!(decode("%E4%B8%AD%E6%96%87").unwrap(), "中文");
        assert_eq!(decode("%e4%b8%ad").unwrap(), "中"); // Java accepts lower-case hex
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in ["%", "%4", "%zz", "abc%G1", "%FF%FE"] {
            let e = decode(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(s in ".*") {
            prop_assert_eq!(decode(&encode(&s)).unwrap(), s);
        }

        #[test]
        fn encoded_is_only_safe_bytes(s in ".*") {
            let e = encode(&s);
            prop_assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b".-*_+%".contains(&b)));
        }
    }
}
