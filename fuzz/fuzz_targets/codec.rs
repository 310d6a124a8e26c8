//! `encode` / `decode` (CONTRACT §1: Java's URLEncoder and URLDecoder, UTF-8).
//!
//! Asserts, for any text: `encode` equals URLEncoder's byte-by-byte rule (the oracle of
//! registry-core's codec tests) and `decode` inverts it. For any text given to `decode`: no
//! panic; an error is `InvalidEncoding` naming the input; a result is no longer than the input,
//! is the input itself when it holds no `%` or `+`, and round-trips through `encode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::{Error, decode, encode};
use registry_fuzz::java_rule;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let e = encode(&s);
    let oracle: String = s.bytes().map(java_rule).collect();
    assert_eq!(e, oracle, "encode({s:?})");
    assert_eq!(
        decode(&e).ok().as_deref(),
        Some(&*s),
        "decode(encode({s:?}))"
    );

    // Any text as a node name.
    match decode(&s) {
        Ok(d) => {
            // Decoding removes every `%XX` and `+`, so there are never more bytes out than in.
            assert!(d.len() <= s.len(), "decode({s:?}) = {d:?} grew");
            assert_eq!(decode(&encode(&d)).ok().as_ref(), Some(&d));
            if !s.contains(['%', '+']) {
                assert_eq!(d, s, "text without escapes decodes to itself");
            }
        }
        Err(Error::InvalidEncoding { input, .. }) => assert_eq!(input, s),
        Err(other) => panic!("decode({s:?}): unexpected error kind {other:?}"),
    }
});
