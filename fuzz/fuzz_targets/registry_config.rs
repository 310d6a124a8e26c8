//! `RegistryConfig` from TOML and from `REGISTRY_*` environment variables, then `to_url`.
//! Input: one byte choosing where a password goes, the TOML text, a NUL byte, then
//! `NAME=value` lines of environment.
//!
//! Asserts: no panic; an accepted configuration survives TOML serialization unchanged; a
//! password, given as `password` or inside the address, never shows in an error. (The URL it
//! yields need not round-trip: values are written unescaped, CONTRACT §1, and a configured
//! value may hold `&`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::RegistryConfig;
use registry_fuzz::{SENTINEL_PASSWORD, assert_no_password, touch_accessors};

#[derive(Debug)]
enum Secret {
    None,
    /// `password = "<sentinel>"`.
    Field,
    /// `user:<sentinel>@` put in front of the address's host.
    InAddress,
}

fn check(mut c: RegistryConfig, secret: &Secret) {
    match secret {
        Secret::None => {}
        Secret::Field => c.password = Some(SENTINEL_PASSWORD.to_owned()),
        Secret::InAddress => {
            if let Some(a) = &c.address {
                let a = match a.split_once("://") {
                    Some((scheme, rest)) => format!("{scheme}://user:{SENTINEL_PASSWORD}@{rest}"),
                    None => format!("user:{SENTINEL_PASSWORD}@{a}"),
                };
                c.address = Some(a);
            }
        }
    }
    match c.to_url() {
        Ok(u) => touch_accessors(&u),
        Err(e) => {
            if !matches!(secret, Secret::None) {
                assert_no_password("a to_url error", &format!("{e} {e:?}"));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // One byte for where the password goes, the TOML text, a NUL, then `NAME=value` lines.
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let secret = match mode % 3 {
        0 => Secret::None,
        1 => Secret::Field,
        _ => Secret::InAddress,
    };
    let rest = String::from_utf8_lossy(rest);
    let (toml_text, env_text) = rest.split_once('\0').unwrap_or((&rest, ""));
    if rest.contains(SENTINEL_PASSWORD) {
        return;
    }
    let mut c = match RegistryConfig::from_toml_str(toml_text) {
        Ok(c) => {
            let text = toml::to_string(&c).expect("a configuration serializes");
            let back = RegistryConfig::from_toml_str(&text)
                .unwrap_or_else(|e| panic!("{text:?} does not read back: {e}"));
            assert_eq!(back, c, "{text}");
            c
        }
        Err(_) => RegistryConfig::default(),
    };
    let env: Vec<(&str, &str)> = env_text.lines().filter_map(|l| l.split_once('=')).collect();
    let lookup = |k: &str| {
        env.iter()
            .rev()
            .find(|(name, _)| *name == k)
            .map(|(_, value)| (*value).to_owned())
    };
    if c.apply_env(lookup).is_err() {
        return;
    }
    check(c, &secret);
});
