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
        })
    }
}

/// The disk cache path: `file=<path>`, or one file per registry key under the user's cache
/// directory; `None` when `file` is `false`, `0`, `N/A` or empty, or `file-cache=false`.
pub fn cache_file(url: &Url) -> Option<PathBuf> {
    if !url.parameter_bool("file-cache", true) {
        return None;
    }
    match url.parameters().get("file").map(|f| f.trim()) {
        Some("" | "false" | "0" | "N/A") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let dir = dirs::cache_dir().unwrap_or_else(std::env::temp_dir);
            // Address and group name the file; credentials never appear in it.
            let mut name = url.address();
            if let Some(g) = url.group() {
                name.push('-');
                name.push_str(g);
            }
            let name: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            Some(
                dir.join("rust-registry")
                    .join(format!("{}-{name}.json", url.protocol())),
            )
        }
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
        assert!(f.ends_with("rust-registry/zookeeper-h_2181.json"), "{f:?}");
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
        assert!(path.ends_with("zookeeper-h_2181-g.json"), "{path:?}");
        assert!(!path.to_string_lossy().contains("secret"));
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
