//! The registry URL parameters the reliability layer reads (CONTRACT §5).

use std::path::PathBuf;
use std::time::Duration;

use registry_core::{Error, Result, Url};

/// Settings of a [`crate::FailbackRegistry`], read from the registry URL.
#[derive(Debug, Clone, PartialEq)]
pub struct FailbackConfig {
    /// `check` (default true): fail fast instead of retrying in the background.
    pub check: bool,
    /// `retry.period` (ms, default 5000): the longest wait between two retries.
    pub retry_period: Duration,
    /// `retry.times` (default -1): retries before giving up; `None` never gives up.
    pub retry_times: Option<u32>,
    /// The first retry waits up to this long (about 100 ms); each later one doubles it.
    pub retry_base: Duration,
    /// `recovery.concurrency` (default 16): operations run at once when restoring a session.
    pub recovery_concurrency: usize,
    /// `enable-empty-protection` (default false).
    pub empty_protection: bool,
    /// The disk cache file; `None` when disabled (`file=false|0|N/A|`, `file-cache=false`).
    pub cache_file: Option<PathBuf>,
    /// `file.debounce` (ms, default 200): how long the cache writer gathers changes.
    pub cache_debounce: Duration,
    /// Seeds the jitter of the retry and confirmation waits (`None`: from the operating
    /// system). For tests that replay a run on a paused clock.
    #[doc(hidden)]
    pub jitter_seed: Option<u64>,
}

fn millis(url: &Url, key: &str, default: u64) -> Result<Duration> {
    Ok(Duration::from_millis(url.parameter_num(key, default)?))
}

impl FailbackConfig {
    /// Reads the settings from a registry URL. A value that is not a number, or is out of
    /// range, is an [`Error::InvalidParameter`] naming the parameter.
    pub fn from_url(url: &Url) -> Result<FailbackConfig> {
        let retry_times: i64 = url.parameter_num("retry.times", -1)?;
        let retry_times = match retry_times {
            -1 => None,
            n if n >= 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            n => {
                return Err(Error::InvalidParameter {
                    key: "retry.times".into(),
                    value: n.to_string(),
                    reason: "use -1 (never give up) or a count of retries".into(),
                });
            }
        };
        let retry_period = millis(url, "retry.period", 5000)?;
        if retry_period.is_zero() {
            return Err(Error::InvalidParameter {
                key: "retry.period".into(),
                value: "0".into(),
                reason: "the retry period must be at least 1 ms".into(),
            });
        }
        let recovery_concurrency: usize = url.parameter_num("recovery.concurrency", 16)?;
        Ok(FailbackConfig {
            check: url.check(),
            retry_period,
            retry_times,
            retry_base: Duration::from_millis(100).min(retry_period),
            recovery_concurrency: recovery_concurrency.max(1),
            empty_protection: url.parameter_bool("enable-empty-protection", false),
            cache_file: cache_file(url),
            cache_debounce: millis(url, "file.debounce", 200)?,
            jitter_seed: None,
        })
    }
}

/// The disk cache path: `file=<path>`, or one file per registry identity
/// ([`cache_identity`]) in `rust-registry/` under the user's cache directory (for example
/// `~/.cache/rust-registry/zookeeper-10.0.0.1_2181-<hash>.json`); `None` when `file` is
/// `false`, `0`, `N/A` or empty, or `file-cache=false`, and when the user has no cache
/// directory (a warning says so: there is no fallback to a shared temporary directory).
pub fn cache_file(url: &Url) -> Option<PathBuf> {
    if !url.parameter_bool("file-cache", true) {
        return None;
    }
    match url.parameters().get("file").map(|f| f.trim()) {
        Some("" | "false" | "0" | "N/A") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let Some(dir) = dirs::cache_dir() else {
                tracing::warn!(
                    registry = %url.to_identity_string_redacted(),
                    "no user cache directory (HOME and XDG_CACHE_HOME are unset): running without a disk cache; set file=<path> to have one"
                );
                return None;
            };
            Some(dir.join(CACHE_DIR).join(default_file_name(url)))
        }
    }
}

/// The directory under the user's cache directory that holds the default cache files.
pub const CACHE_DIR: &str = "rust-registry";

/// Every address, lower-cased, sorted, without duplicates.
fn sorted_addresses(url: &Url) -> Vec<String> {
    let mut addresses: Vec<String> = url
        .addresses()
        .iter()
        .map(|a| a.to_ascii_lowercase())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// What makes two registries different, as one string: the protocol, every address (main and
/// `backup`, lower-cased, sorted), the path, the group (without leading or trailing `/`) and
/// the user name. Never the password. Two registry URLs share a cache file exactly when this
/// is equal; the file names it only through [`cache_key`], a hash.
fn identity_string(url: &Url) -> String {
    let addresses = sorted_addresses(url);
    let group = url
        .group()
        .map(|g| g.trim().trim_matches('/'))
        .filter(|g| !g.is_empty())
        .unwrap_or("");
    let user = url.username().unwrap_or("");
    // Each part with its length, so no two different tuples make the same string.
    let mut s = String::new();
    for part in [
        url.protocol(),
        &addresses.join(","),
        url.path().trim_matches('/'),
        group,
        user,
    ] {
        s.push_str(&part.len().to_string());
        s.push(':');
        s.push_str(part);
        s.push('\n');
    }
    s
}

/// The hash (16 hex digits of SHA-256) of a registry's identity: protocol, every address,
/// path, group and user name (never the password). The default cache file name ends with it,
/// and the file records it, so a file is only ever read for the registry that wrote it.
pub fn cache_key(url: &Url) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(identity_string(url).as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A readable label of a registry's identity, without user name or password:
/// `protocol://address[,address...][/path][?group=g]`. Written into the cache file.
pub fn cache_identity(url: &Url) -> String {
    let mut s = format!("{}://{}", url.protocol(), sorted_addresses(url).join(","));
    let path = url.path().trim_matches('/');
    if !path.is_empty() {
        s.push('/');
        s.push_str(path);
    }
    if let Some(g) = url.group().filter(|g| !g.trim().is_empty()) {
        s.push_str("?group=");
        s.push_str(g.trim());
    }
    s
}

/// `<protocol>-<readable part>-<cache_key>.json`: the readable part is the first address in
/// sorted order (or the path when there is none), cut to 40 characters, with every character
/// but letters, digits, `.` and `-` made `_`.
fn default_file_name(url: &Url) -> String {
    let first = sorted_addresses(url)
        .into_iter()
        .next()
        .unwrap_or_else(|| url.path().trim_matches('/').to_owned());
    let safe = |s: &str, max: usize| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    };
    let readable = safe(&first, 40);
    let protocol = safe(url.protocol(), 20);
    if readable.is_empty() {
        format!("{protocol}-{}.json", cache_key(url))
    } else {
        format!("{protocol}-{readable}-{}.json", cache_key(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = FailbackConfig::from_url(&"zookeeper://h:2181".parse().unwrap()).unwrap();
        assert!(c.check);
        assert_eq!(c.retry_period, Duration::from_secs(5));
        assert_eq!(c.retry_times, None);
        assert!(!c.empty_protection);
        let f = c.cache_file.unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            f.parent().unwrap().ends_with("rust-registry")
                && name.starts_with("zookeeper-h_2181-")
                && name.ends_with(".json"),
            "{f:?}"
        );
        let c = FailbackConfig::from_url(
            &"etcd://u:p@h:2379?check=false&retry.period=1000&retry.times=3&file=/tmp/x.json&group=g&enable-empty-protection=true"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert!(!c.check && c.empty_protection);
        assert_eq!(c.retry_times, Some(3));
        assert_eq!(c.cache_file, Some(PathBuf::from("/tmp/x.json")));
    }

    #[test]
    fn the_cache_file_can_be_disabled() {
        for off in [
            "file=false",
            "file=0",
            "file=N/A",
            "file=",
            "file-cache=false",
        ] {
            let url: Url = format!("zookeeper://h:2181?{off}").parse().unwrap();
            assert_eq!(cache_file(&url), None, "{off}");
        }
        let g: Url = "zookeeper://u:secret@h:2181?group=g".parse().unwrap();
        let path = cache_file(&g).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("zookeeper-h_2181-"), "{path:?}");
        assert!(!path.to_string_lossy().contains("secret"));
    }

    fn file_of(url: &str) -> PathBuf {
        cache_file(&url.parse().unwrap()).unwrap()
    }

    /// Everything that makes two registries different gives them different files; what does
    /// not (address order, a password, other parameters) does not.
    #[test]
    fn the_file_identity_covers_protocol_addresses_path_group_and_user() {
        let base = "zookeeper://h1:2181?backup=h2:2181&group=g";
        let different = [
            "etcd://h1:2181?backup=h2:2181&group=g",
            "zookeeper://h1:2181?group=g",
            "zookeeper://h1:2181?backup=h3:2181&group=g",
            "zookeeper://h1:2181/p?backup=h2:2181&group=g",
            "zookeeper://h1:2181?backup=h2:2181&group=other",
            "zookeeper://h1:2181?backup=h2:2181",
            "zookeeper://alice@h1:2181?backup=h2:2181&group=g",
            "localdir:///a",
            "localdir:///b",
        ];
        let mut seen = std::collections::HashSet::new();
        assert!(seen.insert(file_of(base)));
        for d in different {
            assert!(
                seen.insert(file_of(d)),
                "{d} shares a file with another URL"
            );
        }
        assert_ne!(
            file_of("zookeeper://alice:pw@h:2181"),
            file_of("zookeeper://bob:pw@h:2181"),
            "users"
        );
        for same in [
            "zookeeper://h2:2181?backup=h1:2181&group=g",
            "zookeeper://H1:2181?backup=h2:2181&group=/g/",
            "zookeeper://h1:2181?backup=h2:2181&group=g&session=5000&check=false&application=x",
        ] {
            assert_eq!(file_of(same), file_of(base), "{same}");
        }
        assert_eq!(
            file_of("zookeeper://alice:one@h:2181"),
            file_of("zookeeper://alice:two@h:2181"),
            "the password is not part of the identity"
        );
        let named = file_of("zookeeper://alice:s3cret@h:2181");
        let text = named.to_string_lossy();
        assert!(
            !text.contains("alice") && !text.contains("s3cret"),
            "{text}"
        );
        let local = file_of("localdir:///tmp/shared/dir");
        let name = local.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("localdir-tmp_shared_dir-"), "{name}");
        assert_eq!(
            cache_identity(
                &"zookeeper://u:p@h1:2181?backup=h2:2181&group=g"
                    .parse()
                    .unwrap()
            ),
            "zookeeper://h1:2181,h2:2181?group=g"
        );
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (q, key) in [
            ("retry.period=soon", "retry.period"),
            ("retry.period=0", "retry.period"),
            ("retry.times=-5", "retry.times"),
            ("recovery.concurrency=x", "recovery.concurrency"),
        ] {
            let url: Url = format!("zookeeper://h:2181?{q}").parse().unwrap();
            let e = FailbackConfig::from_url(&url).unwrap_err().to_string();
            assert!(e.contains(key), "{q}: {e}");
        }
    }
}
