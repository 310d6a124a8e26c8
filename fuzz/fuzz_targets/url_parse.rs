//! `Url::parse` on any text (a registry URL from configuration, a URL a tool prints).
//!
//! Asserts: no panic; an error is `InvalidUrl`; a parsed URL round-trips through its full string
//! and its node name (CONTRACT §1); with a password in the input, neither an error nor the
//! redacted forms show it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::Url;
use registry_fuzz::{
    SENTINEL_PASSWORD, assert_no_password, check_parse_error, check_round_trip, touch_accessors,
};

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    match Url::parse(&input) {
        Ok(u) => {
            check_round_trip(&input, &u);
            touch_accessors(&u);
        }
        Err(e) => check_parse_error(&input, &e),
    }

    // The same text after credentials that hold a password.
    if input.contains(SENTINEL_PASSWORD) {
        return;
    }
    let with_password = format!("dubbo://user:{SENTINEL_PASSWORD}@{input}");
    match Url::parse(&with_password) {
        Ok(u) => {
            assert_no_password("Debug", &format!("{u:?}"));
            assert_no_password("the redacted identity", &u.to_identity_string_redacted());
            if let Err(e) = registry_failback::FailbackConfig::from_url(&u) {
                assert_no_password("a FailbackConfig error", &e.to_string());
            }
        }
        Err(e) => assert_no_password("a parse error", &format!("{e} {e:?}")),
    }
});
