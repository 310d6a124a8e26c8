//! The etcd backend's reading of a registry URL (endpoints from the host, `h1,h2` hosts and
//! `backup`, IPv6, `group`, `session`, `timeout`, `etcd.*` parameters, credentials).
//!
//! Asserts: no panic; the password never shows in an error or in `Debug`; a URL that is
//! accepted gives one endpoint per address, each (when the host is a name or an IP address)
//! an `http://host:port` URI with the host the URL names, a lease TTL of at least a second and a root `/group` without a trailing `/`.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use registry_core::Url;
use registry_etcd::Options;
use registry_fuzz::{SENTINEL_PASSWORD, assert_no_password};

/// A host name, an IPv4 address, or an IPv6 address with or without brackets.
fn plain_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        inner.parse::<Ipv6Addr>().is_ok()
    } else if h.contains(':') {
        h.parse::<Ipv6Addr>().is_ok()
    } else {
        !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    }
}

fn check(url: &Url) {
    let opts = match Options::from_url(url) {
        Ok(o) => o,
        Err(e) => {
            assert_no_password("an error", &format!("{e} {e:?}"));
            return;
        }
    };
    assert_no_password("Debug", &format!("{opts:?}"));
    let hosts = url.host_ports().expect("from_url accepted the addresses");
    assert_eq!(opts.endpoints.len(), hosts.len(), "{url:?} -> {opts:?}");
    for (endpoint, (host, _)) in opts.endpoints.iter().zip(&hosts) {
        assert!(endpoint.starts_with("http://"), "{endpoint:?}");
        // A host that is no name or address (a control character, a stray `[`) is left to the
        // client, which refuses it when it connects ("invalid uri character").
        if !plain_host(host) {
            continue;
        }
        let uri: http::Uri = endpoint
            .parse()
            .unwrap_or_else(|e| panic!("{url:?}: endpoint {endpoint:?} is not a URI: {e}"));
        assert_eq!(uri.scheme_str(), Some("http"), "{endpoint:?}");
        assert!(uri.port_u16().is_some(), "{endpoint:?} has no port");
        assert_eq!(uri.path(), "/", "{endpoint:?} has a path");
        let got = uri
            .host()
            .unwrap_or_else(|| panic!("{endpoint:?} has no host"));
        // `uri.host()` keeps an IPv6 address's brackets; the URL's host may have none.
        let bare = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_owned();
        assert_eq!(
            bare(got),
            bare(host),
            "{url:?}: {host:?} became {endpoint:?}"
        );
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
