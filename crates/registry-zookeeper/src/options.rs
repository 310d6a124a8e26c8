//! The registry URL's parameters (CONTRACT §5) as the ZooKeeper backend uses them.

use std::time::Duration;

use registry_core::url::GROUP_KEY;
use registry_core::{Error, Result, Url};

/// Default `session` (ms).
pub const DEFAULT_SESSION_MS: u64 = 60_000;
/// Default `timeout` (ms).
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Default group: the root is `/dubbo`.
pub const DEFAULT_GROUP: &str = "dubbo";

/// What a registry URL says, checked. Its `Debug` hides the password.
#[derive(Clone)]
pub struct Config {
    /// `h1:2181,h2:2181`: the address and every `backup`.
    pub connect: String,
    /// `/dubbo`, or `/` + group.
    pub root: String,
    /// Asked session timeout.
    pub session_timeout: Duration,
    /// Connect and request timeout.
    pub timeout: Duration,
    /// `user:password` for the `digest` scheme.
    pub auth: Option<String>,
    /// Fail at creation when the server is unreachable.
    pub check: bool,
    /// `enable-empty-protection`.
    pub empty_protection: bool,
    /// The registry URL with the password hidden, for messages.
    pub label: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = self.auth.as_deref().map(|a| match a.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => "***".to_owned(),
        });
        f.debug_struct("Config")
            .field("connect", &self.connect)
            .field("root", &self.root)
            .field("session_timeout", &self.session_timeout)
            .field("timeout", &self.timeout)
            .field("auth", &auth)
            .field("check", &self.check)
            .field("empty_protection", &self.empty_protection)
            .field("label", &self.label)
            .finish()
    }
}

impl Config {
    /// Reads and checks the parameters of the registry URL `url`.
    pub fn from_url(url: &Url) -> Result<Config> {
        let label = url.to_identity_string_redacted();
        if url.is_anyhost() {
            return Err(Error::InvalidRegistryUrl {
                url: label,
                reason: "0.0.0.0 (anyhost) is not a ZooKeeper address".into(),
            });
        }
        let hosts = url.host_ports()?;
        if hosts.is_empty() {
            return Err(Error::InvalidRegistryUrl {
                url: label,
                reason: "no ZooKeeper address (expected zookeeper://host:port)".into(),
            });
        }
        let mut connect = Vec::with_capacity(hosts.len());
        for (host, port) in &hosts {
            if host.is_empty() || host == "[]" {
                return Err(Error::InvalidRegistryUrl {
                    url: label,
                    reason: "an address has no host (expected host:port)".into(),
                });
            }
            let port = if *port == 0 { 2181 } else { *port };
            // The client splits `host:port` at the last `:`: a bare IPv6 address needs brackets.
            connect.push(if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            });
        }
        let connect = connect.join(",");
        let session_ms: u64 = url.parameter_num("session", DEFAULT_SESSION_MS)?;
        let timeout_ms: u64 = url.parameter_num("timeout", DEFAULT_TIMEOUT_MS)?;
        for (key, v) in [("session", session_ms), ("timeout", timeout_ms)] {
            if v == 0 || v > i32::MAX as u64 {
                return Err(Error::InvalidParameter {
                    key: key.into(),
                    value: v.to_string(),
                    reason: "expected milliseconds between 1 and 2147483647".into(),
                });
            }
        }
        let group = url.parameter_or(GROUP_KEY, DEFAULT_GROUP).trim();
        let group = if group.is_empty() {
            DEFAULT_GROUP
        } else {
            group
        };
        let root = if group.starts_with('/') {
            group.to_owned()
        } else {
            format!("/{group}")
        };
        // `/g/` is `/g`; a group of slashes only (`//`) is the root `/`, not an empty path.
        let root = match root.trim_end_matches('/') {
            "" => "/".to_owned(),
            trimmed => trimmed.to_owned(),
        };
        if root.contains("//") {
            return Err(Error::InvalidParameter {
                key: GROUP_KEY.into(),
                value: group.to_owned(),
                reason: "a ZooKeeper path may not hold an empty segment".into(),
            });
        }
        let auth = match (url.username(), url.password()) {
            (Some(u), Some(p)) => Some(format!("{u}:{p}")),
            (Some(u), None) => Some(format!("{u}:")),
            _ => None,
        };
        Ok(Config {
            connect,
            root,
            session_timeout: Duration::from_millis(session_ms),
            timeout: Duration::from_millis(timeout_ms),
            auth,
            check: url.parameter_bool("check", true),
            empty_protection: url.parameter_bool("enable-empty-protection", false),
            label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Config {
        Config::from_url(&s.parse().expect("url")).expect("config")
    }

    #[test]
    fn debug_hides_the_password() {
        let c = cfg("zookeeper://alice:s3cret-pw@h1:1");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }

    #[test]
    fn parameters() {
        let c = cfg("zookeeper://u:p@h1:1,h2:2?backup=h3:3&session=9000&timeout=700&check=false");
        assert_eq!(c.connect, "h1:1,h2:2,h3:3");
        assert_eq!(c.session_timeout, Duration::from_millis(9000));
        assert_eq!(c.timeout, Duration::from_millis(700));
        assert_eq!(c.auth.as_deref(), Some("u:p"));
        assert!(!c.check);
        assert_eq!(cfg("zookeeper://h").connect, "h:2181");
        let bad = Config::from_url(&"zookeeper://h:1?session=abc".parse().expect("url"));
        assert!(matches!(bad, Err(Error::InvalidParameter { key, .. }) if key == "session"));
        let zero = Config::from_url(&"zookeeper://h:1?timeout=0".parse().expect("url"));
        assert!(matches!(zero, Err(Error::InvalidParameter { key, .. }) if key == "timeout"));
        assert!(Config::from_url(&"zookeeper://0.0.0.0:2181".parse().expect("url")).is_err());
    }

    /// Found by the `zookeeper_options` fuzz target: a bare IPv6 address without a port went
    /// into the connect string as `::1`, which the client reads as host `:` port 1; a `backup`
    /// entry was passed on unchecked (`h:abc`, or `h/x`, which the client reads as a chroot).
    #[test]
    fn every_address_reaches_the_client_as_written() {
        assert_eq!(cfg("zookeeper://::1").connect, "[::1]:2181");
        assert_eq!(
            cfg("zookeeper://[::1]:1,fe80::2:3?backup=::4").connect,
            "[::1]:1,[fe80::2]:3,[::4]:2181"
        );
        assert_eq!(cfg("zookeeper://h:0").connect, "h:2181");
        for bad in ["zookeeper://h?backup=h2:abc", "zookeeper://h?backup=h2/x"] {
            let e = Config::from_url(&bad.parse().expect("url")).expect_err(bad);
            assert!(
                matches!(&e, Error::InvalidParameter { key, .. } if key == "backup"),
                "{e:?}"
            );
        }
        for no_host in [
            "zookeeper://:2181",
            "zookeeper://[]:2181",
            "zookeeper://h?backup=[]",
        ] {
            let e = Config::from_url(&no_host.parse().expect("url")).expect_err(no_host);
            assert!(matches!(e, Error::InvalidRegistryUrl { .. }), "{e:?}");
        }
    }
}
