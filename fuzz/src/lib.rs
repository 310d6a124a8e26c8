//! Shared checks of the fuzz targets in `fuzz_targets/`.
//!
//! Each target feeds bytes that other programs could have written (node names, keys,
//! configuration, cache files) to the code that reads them, and asserts what
//! docs/CONTRACT.md says about the result. A panic, in the code under test or in an assertion
//! here, is a finding.

use registry_core::{Error, Url};

/// A password no fuzz input is expected to hold; inputs that do are skipped. It is put into
/// URLs so the checks can tell whether an error message or a `Debug` form shows a password.
pub const SENTINEL_PASSWORD: &str = "Sentinel-Pw-7f3a";

/// Java's `URLEncoder.encode(s, "UTF-8")` rule for one byte (the oracle of
/// `registry-core`'s codec tests, restated): `A-Z a-z 0-9 . - * _` kept, space to `+`,
/// every other byte `%XX` upper-case.
pub fn java_rule(b: u8) -> String {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'*' | b'_' => {
            (b as char).to_string()
        }
        b' ' => "+".to_owned(),
        _ => format!("%{b:02X}"),
    }
}

/// CONTRACT §1 for a URL that parsed: its full string parses back to an equal URL with the same
/// full string, and so does its node name (`encode` of the full string).
pub fn check_round_trip(input: &str, u: &Url) {
    let full = u.to_full_string();
    let back = match Url::parse(&full) {
        Ok(b) => b,
        Err(e) => panic!("{input:?} parsed, but its full string {full:?} does not: {e}"),
    };
    assert_eq!(back.to_full_string(), full, "input {input:?}");
    assert_eq!(&back, u, "input {input:?}: full string {full:?}");
    let node = registry_core::encode(&full);
    match Url::from_encoded(&node) {
        Ok(b) => assert_eq!(&b, u, "input {input:?}: node name {node:?}"),
        Err(e) => panic!("{input:?} parsed, but its node name {node:?} does not: {e}"),
    }
}

/// CONTRACT §1: a URL that does not parse is an `InvalidUrl` error.
pub fn check_parse_error(input: &str, e: &Error) {
    assert!(
        matches!(e, Error::InvalidUrl { .. }),
        "{input:?}: expected InvalidUrl, got {e:?}"
    );
}

/// Everything a URL's accessors compute, called for the panics they might hide.
pub fn touch_accessors(u: &Url) {
    let _ = u.to_identity_string();
    let _ = u.to_identity_string_redacted();
    let _ = format!("{u:?}");
    let _ = u.addresses();
    let _ = u.is_anyhost();
    let _ = u.service_key();
    let _ = u.categories();
    let _ = u.category();
    let _ = u.is_dynamic();
    let _ = u.check();
    let _ = u.is_enabled();
    let _ = u.parameter_num::<u64>("timeout", 0);
    let _ = u.to_empty_marker_for(u.path(), u.category());
    let _ = registry_failback::cache_key(u);
    let _ = registry_failback::cache_identity(u);
    let _ = registry_failback::FailbackConfig::from_url(u);
}

/// "Never a password in an error or a log": `text` must not show [`SENTINEL_PASSWORD`].
pub fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(SENTINEL_PASSWORD),
        "{what} shows the password: {text}"
    );
}

/// The `(host, port)` ZooKeeper's client reads from one address of a connect string
/// (`zookeeper-client`'s `parse_address`: `[v6]:port`, else split at the last `:`; an empty
/// port is 2181), or why it refuses it.
pub fn zookeeper_client_address(s: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let i = rest.rfind(']').ok_or("unclosed [")?;
        let after = &rest[i + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => p,
            None if after.is_empty() => "",
            None => return Err("junk after ]"),
        };
        (&rest[..i], port)
    } else {
        match s.rfind(':') {
            None => (s, ""),
            Some(i) => (&s[..i], &s[i + 1..]),
        }
    };
    if host.is_empty() {
        return Err("empty host");
    }
    let port = if port.is_empty() {
        2181
    } else {
        port.parse::<u16>().map_err(|_| "invalid port")?
    };
    if port == 0 {
        return Err("port 0");
    }
    Ok((host, port))
}
