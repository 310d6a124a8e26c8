//! The ZooKeeper backend's reading of a registry URL (connect string from the host, `h1,h2`
//! hosts and `backup`, IPv6, `group`, `session`, `timeout`, credentials).
//!
//! Asserts: no panic; the password never shows in an error or in `Debug`; a URL that is
//! accepted gives one connect-string entry per address, each an address ZooKeeper's client
//! reads as the host and port the URL names (a `/` would make the rest a chroot), and a root
//! that is an absolute ZooKeeper path without an empty segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::Url;
use registry_fuzz::{SENTINEL_PASSWORD, assert_no_password, zookeeper_client_address};
use registry_zookeeper::Config;

fn check(url: &Url) {
    let cfg = match Config::from_url(url) {
        Ok(c) => c,
        Err(e) => {
            assert_no_password("an error", &format!("{e} {e:?}"));
            return;
        }
    };
    assert_no_password("Debug", &format!("{cfg:?}"));
    assert_no_password("the label", &cfg.label);
    let addresses = url.addresses();
    let entries: Vec<&str> = cfg.connect.split(',').collect();
    assert_eq!(entries.len(), addresses.len(), "{url:?} -> {cfg:?}");
    for (entry, address) in entries.iter().zip(&addresses) {
        assert!(!entry.contains('/'), "{entry:?} would be read as a chroot");
        let (host, _port) = zookeeper_client_address(entry)
            .unwrap_or_else(|e| panic!("{url:?}: connect entry {entry:?}: {e}"));
        assert!(
            address.starts_with(host) || address.starts_with(&format!("[{host}]")),
            "{url:?}: {address:?} became {entry:?}"
        );
    }
    assert!(cfg.root.starts_with('/'), "{cfg:?}");
    assert!(cfg.root == "/" || !cfg.root.ends_with('/'), "{cfg:?}");
    assert!(!cfg.root.contains("//"), "{cfg:?}");
    assert!(!cfg.session_timeout.is_zero() && !cfg.timeout.is_zero());
    let _ = cfg.entry_path(url);
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if text.contains(SENTINEL_PASSWORD) {
        return;
    }
    let input = if text.contains("://") {
        text.into_owned()
    } else {
        format!("zookeeper://{text}")
    };
    let Ok(url) = Url::parse(&input) else {
        return;
    };
    check(&url);
    check(&url.with_credentials(Some("user"), Some(SENTINEL_PASSWORD)));
});
