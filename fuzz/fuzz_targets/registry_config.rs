//! `RegistryConfig` from TOML and from `REGISTRY_*` environment variables, then `to_url`.
//!
//! Asserts: no panic; an accepted configuration survives TOML serialization unchanged; a
//! password, given as `password` or inside the address, never shows in an error. (The URL it
//! yields need not round-trip: values are written unescaped, CONTRACT §1, and a configured
//! value may hold `&`.)
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use registry_core::RegistryConfig;
use registry_fuzz::{SENTINEL_PASSWORD, assert_no_password, touch_accessors};

#[derive(Arbitrary, Debug)]
enum Var {
    Url,
    Protocol,
    Username,
    Password,
    Group,
    TimeoutMs,
    SessionMs,
    Check,
    Parameters,
}

impl Var {
    fn name(&self) -> &'static str {
        match self {
            Var::Url => "REGISTRY_URL",
            Var::Protocol => "REGISTRY_PROTOCOL",
            Var::Username => "REGISTRY_USERNAME",
            Var::Password => "REGISTRY_PASSWORD",
            Var::Group => "REGISTRY_GROUP",
            Var::TimeoutMs => "REGISTRY_TIMEOUT_MS",
            Var::SessionMs => "REGISTRY_SESSION_MS",
            Var::Check => "REGISTRY_CHECK",
            Var::Parameters => "REGISTRY_PARAMETERS",
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Secret {
    None,
    /// `password = "<sentinel>"`.
    Field,
    /// `user:<sentinel>@` put in front of the address's host.
    InAddress,
}

#[derive(Arbitrary, Debug)]
struct Input {
    toml: String,
    env: Vec<(Var, String)>,
    secret: Secret,
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

fuzz_target!(|input: Input| {
    if input.toml.contains(SENTINEL_PASSWORD)
        || input.env.iter().any(|(_, v)| v.contains(SENTINEL_PASSWORD))
    {
        return;
    }
    let mut c = match RegistryConfig::from_toml_str(&input.toml) {
        Ok(c) => {
            let text = toml::to_string(&c).expect("a configuration serializes");
            let back = RegistryConfig::from_toml_str(&text)
                .unwrap_or_else(|e| panic!("{text:?} does not read back: {e}"));
            assert_eq!(back, c, "{text}");
            c
        }
        Err(_) => RegistryConfig::default(),
    };
    let env = &input.env;
    let lookup = |k: &str| {
        env.iter()
            .rev()
            .find(|(v, _)| v.name() == k)
            .map(|(_, value)| value.clone())
    };
    if c.apply_env(lookup).is_err() {
        return;
    }
    check(c, &input.secret);
});
