//! The etcd backend's reading of a registry URL (endpoints from the host, `h1,h2` hosts and
//! `backup`, IPv6, `group`, `session`, `timeout`, `etcd.*` parameters, credentials).
//!
//! Asserts: no panic; the password never shows in an error or in `Debug`; a URL that is
//! accepted gives one endpoint per address, each an `http://host:port` URI with the host the
//! URL names, a lease TTL of at least a second and a root `/group` without a trailing `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::Url;
use registry_etcd::Options;
use registry_fuzz::{SENTINEL_PASSWORD, assert_no_password};

fn check(url: &Url) {
    let opts = match Options::from_url(url) {
        Ok(o) => o,
        Err(e) => {
            assert_no_password("an error", &format!("{e} {e:?}"));
            return;
        }
    };
    assert_no_password("Debug", &format!("{opts:?}"));
    let addresses = url.addresses();
    assert_eq!(opts.endpoints.len(), addresses.len(), "{url:?} -> {opts:?}");
    for (endpoint, address) in opts.endpoints.iter().zip(&addresses) {
        let uri: http::Uri = endpoint
            .parse()
            .unwrap_or_else(|e| panic!("{url:?}: endpoint {endpoint:?} is not a URI: {e}"));
        assert_eq!(uri.scheme_str(), Some("http"), "{endpoint:?}");
        assert!(uri.port_u16().is_some(), "{endpoint:?} has no port");
        assert_eq!(uri.path(), "/", "{endpoint:?} has a path");
        let host = uri.host().unwrap_or_else(|| panic!("{endpoint:?} has no host"));
        assert!(address.starts_with(host), "{url:?}: {address:?} became {endpoint:?}");
    }
    assert!(opts.ttl_secs >= 1);
    assert!(!opts.timeout.is_zero());
    assert!(opts.root.len() >= 2 && opts.root.starts_with('/') && !opts.root.ends_with('/'));
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if text.contains(SENTINEL_PASSWORD) {
        return;
    }
    let input = if text.contains("://") {
        text.into_owned()
    } else {
        format!("etcd://{text}")
    };
    let Ok(url) = Url::parse(&input) else {
        return;
    };
    check(&url);
    check(&url.with_credentials(Some("user"), Some(SENTINEL_PASSWORD)));
});
