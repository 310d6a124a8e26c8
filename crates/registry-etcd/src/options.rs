//! The registry URL's parameters (CONTRACT §5) as the etcd backend uses them.

use std::time::Duration;

use registry_core::url::GROUP_KEY;
use registry_core::{Error, Result, Url};

/// `etcd.reread.period`: how often (ms) every watched prefix is read again, guarding against
/// events the server loses; `0` disables it.
pub const REREAD_PERIOD_KEY: &str = "etcd.reread.period";
/// `etcd.max-message-size`: the largest reply (bytes) the client decodes.
pub const MAX_MESSAGE_SIZE_KEY: &str = "etcd.max-message-size";

/// `etcd.lease-prefix`: the key prefix of the lease sentinels (one key per live registry,
/// `<prefix><root>/<lease id in hex>`); it must be outside the registry root, so Dubbo
/// subscribers and Dubbo Admin never see it.
pub const LEASE_PREFIX_KEY: &str = "etcd.lease-prefix";
/// The default of [`LEASE_PREFIX_KEY`].
pub const DEFAULT_LEASE_PREFIX: &str = "/.registry-leases";

/// The default of [`REREAD_PERIOD_KEY`]: three minutes.
pub const DEFAULT_REREAD_PERIOD_MS: u64 = 180_000;
/// The default of [`MAX_MESSAGE_SIZE_KEY`]: 64 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// The etcd client port used when an address has none.
pub const DEFAULT_PORT: u16 = 2379;

const TIMEOUT_KEY: &str = "timeout";
const SESSION_KEY: &str = "session";

/// Everything the backend takes from the registry URL. Its `Debug` hides the password.
#[derive(Clone)]
pub struct Options {
    /// `http://host:port` of every address.
    pub endpoints: Vec<String>,
    /// Connect and request timeout.
    pub timeout: Duration,
    /// Lease TTL in seconds (session / 2).
    pub ttl_secs: i64,
    /// How often the lease is renewed (TTL / 3).
    pub keep_alive_period: Duration,
    /// Periodic re-read of every watched prefix.
    pub reread: Option<Duration>,
    /// The client's decoding limit.
    pub max_message_size: usize,
    /// `/` + group.
    pub root: String,
    /// The lease sentinels' prefix (`/...`, no trailing `/`), outside `root`.
    pub lease_prefix: String,
    /// `username`, `password`.
    pub user: Option<(String, String)>,
    /// `check`.
    pub check: bool,
    /// `enable-empty-protection`.
    pub empty_protection: bool,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .field("ttl_secs", &self.ttl_secs)
            .field("keep_alive_period", &self.keep_alive_period)
            .field("reread", &self.reread)
            .field("max_message_size", &self.max_message_size)
            .field("root", &self.root)
            .field("lease_prefix", &self.lease_prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "<redacted>")))
            .field("check", &self.check)
            .field("empty_protection", &self.empty_protection)
            .finish()
    }
}

fn invalid(key: &str, value: impl ToString, reason: &str) -> Error {
    Error::InvalidParameter {
        key: key.to_owned(),
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

impl Options {
    /// Reads and checks the parameters of `url`.
    pub fn from_url(url: &Url) -> Result<Options> {
        registry_core::manager::validate_registry_url(url)?;
        let hosts = url.host_ports()?;
        if hosts.is_empty() {
            return Err(Error::InvalidRegistryUrl {
                url: url.to_identity_string_redacted(),
                reason: "no etcd address; write etcd://host:2379".to_owned(),
            });
        }
        let mut endpoints = Vec::with_capacity(hosts.len());
        for (host, port) in &hosts {
            if host.is_empty() || host == "[]" {
                return Err(Error::InvalidRegistryUrl {
                    url: url.to_identity_string_redacted(),
                    reason: "an address has no host; write etcd://host:2379".to_owned(),
                });
            }
            let port = if *port == 0 { DEFAULT_PORT } else { *port };
            // In a URI an IPv6 address is bracketed.
            endpoints.push(if host.contains(':') && !host.starts_with('[') {
                format!("http://[{host}]:{port}")
            } else {
                format!("http://{host}:{port}")
            });
        }

        let timeout_ms: u64 = url.parameter_num(TIMEOUT_KEY, 5000)?;
        if timeout_ms == 0 {
            return Err(invalid(TIMEOUT_KEY, timeout_ms, "must be more than 0 ms"));
        }
        let session_ms: u64 = url.parameter_num(SESSION_KEY, 60_000)?;
        if session_ms < 2000 {
            return Err(invalid(
                SESSION_KEY,
                session_ms,
                "must be at least 2000 ms (the etcd lease TTL is session / 2, at least 1 s)",
            ));
        }
        let ttl_ms = session_ms / 2;
        let ttl_secs = ttl_ms.div_ceil(1000).max(1);
        let keep_alive_period = Duration::from_millis((ttl_secs * 1000 / 3).max(100));

        let reread_ms: u64 = url.parameter_num(REREAD_PERIOD_KEY, DEFAULT_REREAD_PERIOD_MS)?;
        let reread = (reread_ms > 0).then(|| Duration::from_millis(reread_ms));
        let max_message_size: usize =
            url.parameter_num(MAX_MESSAGE_SIZE_KEY, DEFAULT_MAX_MESSAGE_SIZE)?;
        if max_message_size < 4096 {
            return Err(invalid(
                MAX_MESSAGE_SIZE_KEY,
                max_message_size,
                "must be at least 4096 bytes",
            ));
        }

        let group = url.parameter_or(GROUP_KEY, "dubbo");
        let root = if group.starts_with('/') {
            group.trim_end_matches('/').to_owned()
        } else {
            format!("/{}", group.trim_end_matches('/'))
        };
        if root.len() < 2 {
            return Err(invalid(
                GROUP_KEY,
                group,
                "the group must not be empty or `/`",
            ));
        }

        let lease_prefix = url.parameter_or(LEASE_PREFIX_KEY, DEFAULT_LEASE_PREFIX);
        let trimmed = lease_prefix.trim_end_matches('/');
        if !trimmed.starts_with('/') || trimmed.len() < 2 {
            return Err(invalid(
                LEASE_PREFIX_KEY,
                lease_prefix,
                "must be a key prefix such as /.registry-leases (starting with `/`, not `/` alone)",
            ));
        }
        if trimmed == root || trimmed.starts_with(&format!("{root}/")) {
            return Err(invalid(
                LEASE_PREFIX_KEY,
                lease_prefix,
                "must be outside the registry root (Dubbo would see the sentinels as a service)",
            ));
        }
        let lease_prefix = trimmed.to_owned();

        let user = match (url.username(), url.password()) {
            (Some(u), p) => Some((u.to_owned(), p.unwrap_or("").to_owned())),
            (None, Some(_)) => {
                return Err(Error::InvalidRegistryUrl {
                    url: url.to_identity_string_redacted(),
                    reason: "a password without a user name; write etcd://user:password@host"
                        .to_owned(),
                });
            }
            (None, None) => None,
        };

        Ok(Options {
            endpoints,
            timeout: Duration::from_millis(timeout_ms),
            ttl_secs: i64::try_from(ttl_secs).unwrap_or(i64::MAX),
            keep_alive_period,
            reread,
            max_message_size,
            root,
            lease_prefix,
            user,
            check: url.check(),
            empty_protection: url.parameter_bool("enable-empty-protection", false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<Options> {
        Options::from_url(&Url::parse(s).expect("url"))
    }

    #[test]
    fn defaults() {
        let o = opts("etcd://127.0.0.1:2379").expect("options");
        assert_eq!(o.endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(o.timeout, Duration::from_secs(5));
        assert_eq!(o.ttl_secs, 30);
        assert_eq!(o.keep_alive_period, Duration::from_secs(10));
        assert_eq!(o.reread, Some(Duration::from_secs(180)));
        assert_eq!(o.max_message_size, 64 * 1024 * 1024);
        assert_eq!(o.root, "/dubbo");
        assert_eq!(o.lease_prefix, "/.registry-leases");
        assert!(o.user.is_none());
        assert!(o.check);
    }

    #[test]
    fn addresses_group_and_user() {
        let o = opts("etcd3://u:p@h1:1,h2?backup=h3:3&group=g&session=10000&etcd.reread.period=0")
            .expect("options");
        assert_eq!(
            o.endpoints,
            vec!["http://h1:1", "http://h2:2379", "http://h3:3"]
        );
        assert_eq!(o.root, "/g");
        assert_eq!(o.ttl_secs, 5);
        assert_eq!(o.reread, None);
        assert_eq!(o.user, Some(("u".to_owned(), "p".to_owned())));
        assert_eq!(opts("etcd://h?group=/x/").expect("options").root, "/x");
    }

    /// Found by the `etcd_options` fuzz target: a bare IPv6 address became
    /// `http://fe80::1:2379`, which is no URI; a `backup` entry was passed on unchecked.
    #[test]
    fn every_address_becomes_an_endpoint() {
        let o = opts("etcd://::1,fe80::2:3?backup=[::4]:5,h:0").expect("options");
        assert_eq!(
            o.endpoints,
            vec![
                "http://[::1]:2379",
                "http://[fe80::2]:3",
                "http://[::4]:5",
                "http://h:2379"
            ]
        );
        for bad in ["etcd://h?backup=h2:abc", "etcd://h?backup=h2/x"] {
            match opts(bad) {
                Err(Error::InvalidParameter { key, .. }) => assert_eq!(key, "backup", "{bad}"),
                other => panic!("{bad}: expected InvalidParameter, got {other:?}"),
            }
        }
        for no_host in ["etcd://:2379", "etcd://[]:2379", "etcd://h?backup=[]"] {
            assert!(
                matches!(opts(no_host), Err(Error::InvalidRegistryUrl { .. })),
                "{no_host}"
            );
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let o = opts("etcd://alice:s3cr3t-pw@h1:1").expect("options");
        let text = format!("{o:?}");
        assert!(!text.contains("s3cr3t-pw"), "{text}");
        assert!(
            text.contains("alice") && text.contains("<redacted>"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (url, key) in [
            ("etcd://h?timeout=abc", "timeout"),
            ("etcd://h?timeout=0", "timeout"),
            ("etcd://h?session=100", "session"),
            ("etcd://h?etcd.max-message-size=-1", "etcd.max-message-size"),
            ("etcd://h?etcd.reread.period=x", "etcd.reread.period"),
            (
                "etcd://h?etcd.lease-prefix=/dubbo/leases",
                "etcd.lease-prefix",
            ),
            ("etcd://h?group=x&etcd.lease-prefix=/x", "etcd.lease-prefix"),
            ("etcd://h?etcd.lease-prefix=leases", "etcd.lease-prefix"),
            ("etcd://h?etcd.lease-prefix=/", "etcd.lease-prefix"),
        ] {
            match opts(url) {
                Err(Error::InvalidParameter { key: k, .. }) => assert_eq!(k, key, "{url}"),
                other => panic!("{url}: expected InvalidParameter, got {other:?}"),
            }
        }
        assert!(matches!(
            opts("etcd://0.0.0.0:2379"),
            Err(Error::InvalidRegistryUrl { .. })
        ));
    }
}
