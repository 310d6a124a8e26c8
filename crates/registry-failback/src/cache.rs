//! The memory and disk cache of notified lists (CONTRACT §6).
//!
//! Every live notification updates the in-memory cache, keyed by the subscription's service
//! key (`[group/]interface[:version]`, so a restarted consumer with a new `pid` or `timestamp`
//! finds its lists). When a file is configured, one writer task saves the whole cache a short
//! while after a change (debounced), to a temporary file renamed into place: no lock files and
//! no torn files. The file is read when the registry is built; a missing file is normal, a
//! corrupt one is logged and ignored.
//!
//! The file format is JSON:
//!
//! ```json
//! {
//!   "format": 1,
//!   "registry": "zookeeper://10.0.0.1:2181",
//!   "services": {
//!     "com.foo.Greeter:1.0": [
//!       { "service": "com.foo.Greeter", "category": "providers", "revision": 42,
//!         "urls": ["dubbo://10.0.0.1:20880/com.foo.Greeter?version=1.0"] }
//!     ]
//!   }
//! }
//! ```
//!
//! `urls` holds the entries without `empty://` markers; an empty array is a list known to be
//! empty.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use registry_core::{Notification, Source, Url, is_match};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The version of the file format.
pub const CACHE_FORMAT: u32 = 1;

/// One cached list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedList {
    /// The service interface.
    pub service: String,
    /// The category.
    pub category: String,
    /// The backend's revision of the list.
    pub revision: u64,
    /// The entries, as full URL strings, without markers.
    pub urls: Vec<String>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFile {
    /// [`CACHE_FORMAT`].
    pub format: u32,
    /// The registry the lists came from (no password).
    pub registry: String,
    /// Lists per subscription service key.
    pub services: BTreeMap<String, Vec<CachedList>>,
}

/// A list as held in memory: the notification's own `Arc` (markers included), so recording a
/// notification costs a pointer copy; strings are made only when the file is written.
#[derive(Clone)]
struct Held {
    revision: u64,
    urls: Arc<[Url]>,
}

type Lists = HashMap<String, BTreeMap<(String, String), Held>>;

pub(crate) struct Cache {
    registry: String,
    file: Option<PathBuf>,
    lists: Mutex<Lists>,
    dirty: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    /// A cache for `registry`, loaded from `file` when there is one.
    pub(crate) fn load(registry: &Url, file: Option<PathBuf>) -> Cache {
        let mut lists = Lists::new();
        if let Some(path) = &file {
            match read_file(path) {
                Ok(Some(f)) => {
                    for (key, ls) in f.services {
                        let m = lists.entry(key).or_default();
                        for l in ls {
                            let urls: Vec<Url> = l
                                .urls
                                .iter()
                                .filter_map(|s| match Url::parse(s) {
                                    Ok(u) => Some(u),
                                    Err(e) => {
                                        tracing::warn!(error = %e, "skipping an unreadable URL in the registry cache");
                                        None
                                    }
                                })
                                .collect();
                            m.insert(
                                (l.service, l.category),
                                Held {
                                    revision: l.revision,
                                    urls: urls.into(),
                                },
                            );
                        }
                    }
                    tracing::debug!(file = %path.display(), services = lists.len(), "loaded the registry cache");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "ignoring a corrupt registry cache file; it will be rewritten"
                ),
            }
        }
        Cache {
            registry: registry.to_identity_string_redacted(),
            file,
            lists: Mutex::new(lists),
            dirty: Arc::new(Notify::new()),
        }
    }

    /// Records a live list of the subscription with service key `key`.
    pub(crate) fn update(&self, key: &str, n: &Notification) {
        if n.source != Source::Live {
            return;
        }
        let list = Held {
            revision: n.revision,
            urls: n.urls.clone(),
        };
        {
            let mut lists = lock(&self.lists);
            let m = lists.entry(key.to_owned()).or_default();
            let slot = (n.service.clone(), n.category.clone());
            if m.get(&slot).is_some_and(|old| old.revision > list.revision) {
                return;
            }
            m.insert(slot, list);
        }
        if self.file.is_some() {
            self.dirty.notify_one();
        }
    }

    /// The cached lists a subscription would be told, marked as cache: entries filtered by
    /// matching, empty ones as `empty://` markers. Empty when nothing is cached.
    pub(crate) fn lists_for(&self, sub: &Url) -> Vec<Notification> {
        let lists = lock(&self.lists);
        let Some(m) = lists.get(&sub.service_key()) else {
            return Vec::new();
        };
        let categories = sub.categories();
        let mut out = Vec::new();
        let mut services: Vec<&String> = m.keys().map(|(s, _)| s).collect();
        services.dedup();
        for service in services {
            for c in &categories {
                let Some(l) = m.get(&(service.clone(), c.clone())) else {
                    continue;
                };
                let mut urls: Vec<Url> = l
                    .urls
                    .iter()
                    .filter(|u| !u.is_empty_marker() && is_match(sub, u))
                    .cloned()
                    .collect();
                if urls.is_empty() {
                    urls.push(sub.to_empty_marker_for(service, c));
                }
                out.push(Notification::new(
                    service.as_str(),
                    c.as_str(),
                    urls,
                    l.revision,
                    Source::Cache,
                ));
            }
        }
        out
    }

    /// Starts the writer task, when there is a file. It holds the cache weakly.
    pub(crate) fn spawn_writer(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> Option<tokio::task::AbortHandle> {
        self.file.as_ref()?;
        let weak: Weak<Cache> = Arc::downgrade(self);
        let dirty = self.dirty.clone();
        let task = tokio::spawn(async move {
            loop {
                dirty.notified().await;
                tokio::time::sleep(debounce).await;
                match weak.upgrade() {
                    Some(cache) => cache.save().await,
                    None => return,
                }
            }
        });
        Some(task.abort_handle())
    }

    /// Writes the file now (when there is one).
    pub(crate) async fn save(&self) {
        let Some(path) = self.file.clone() else {
            return;
        };
        // Copy the pointers under the lock; make the strings on the blocking pool.
        let held: Lists = lock(&self.lists).clone();
        let registry = self.registry.clone();
        let result = tokio::task::spawn_blocking(move || {
            let snapshot = CacheFile {
                format: CACHE_FORMAT,
                registry,
                services: held
                    .into_iter()
                    .map(|(key, lists)| {
                        let lists = lists
                            .into_iter()
                            .map(|((service, category), h)| CachedList {
                                service,
                                category,
                                revision: h.revision,
                                urls: h
                                    .urls
                                    .iter()
                                    .filter(|u| !u.is_empty_marker())
                                    .map(Url::to_full_string)
                                    .collect(),
                            })
                            .collect();
                        (key, lists)
                    })
                    .collect(),
            };
            write_file(&path, &snapshot).map(|()| path)
        })
        .await;
        match result {
            Ok(Ok(path)) => tracing::trace!(file = %path.display(), "saved the registry cache"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not save the registry cache"),
            Err(e) => tracing::warn!(error = %e, "the registry cache writer failed"),
        }
    }
}

/// Reads a cache file: `Ok(None)` when there is none, an error when it cannot be used.
pub fn read_file(path: &Path) -> Result<Option<CacheFile>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let file: CacheFile =
        serde_json::from_slice(&text).map_err(|e| format!("not a cache file: {e}"))?;
    if file.format != CACHE_FORMAT {
        return Err(format!("format {} is not {CACHE_FORMAT}", file.format));
    }
    Ok(Some(file))
}

fn write_file(path: &Path, file: &CacheFile) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
    // Unique per write: several registries of one process may share a file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, json).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot rename {} to {}: {e}", tmp.display(), path.display())
    })
}
