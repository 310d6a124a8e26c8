//! The memory and disk cache of notified lists (CONTRACT §6).
//!
//! Every live notification updates the in-memory cache, keyed by the subscription's service
//! key (`[group/]interface[:version]`, so a restarted consumer with a new `pid` or `timestamp`
//! finds its lists). When a file is configured, the file is read when the registry is built,
//! and one writer per registry saves the lists that changed a short while after a change
//! (debounced).
//!
//! Many processes on one host share a registry's file, so a save never writes this process's
//! memory over the file. It takes an advisory lock (`flock` on `<file>.lock`, held for
//! milliseconds), reads the file, replaces only the lists this process received live since
//! its last save, writes a temporary file in the same directory, fsyncs it, renames it over
//! the file and fsyncs the directory. Lists other processes saved are kept; readers need no
//! lock, since the file is only ever replaced whole.
//!
//! Lists read from the file are older than any live list, whatever their stored revision:
//! a backend may number revisions afresh in each process, so the first live list after a
//! restart replaces the cached one, in memory and on disk.
//!
//! A missing file is normal; a corrupt one, or one written for another registry, is logged
//! and replaced at the next save. A save that fails (an unwritable or uncreatable directory)
//! logs one warning, and the writer retries with a growing pause (1 s doubling to 5 min); the
//! registry works on without the file.
//!
//! The file format is JSON:
//!
//! ```json
//! {
//!   "format": 2,
//!   "registry": "zookeeper://10.0.0.1:2181,10.0.0.2:2181",
//!   "identity": "9f2c0b7d4e1a6c53",
//!   "services": {
//!     "com.foo.Greeter:1.0": [
//!       { "service": "com.foo.Greeter", "category": "providers", "revision": 42,
//!         "urls": ["dubbo://10.0.0.1:20880/com.foo.Greeter?version=1.0"] }
//!     ]
//!   }
//! }
//! ```
//!
//! `registry` is a readable label and `identity` the hash of what makes registries different
//! ([`crate::cache_file`]); `urls` holds the entries without `empty://` markers; an empty array
//! is a list known to be empty.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use registry_core::{Notification, Source, Url, is_match};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::{cache_identity, cache_key};

/// The version of the file format.
pub const CACHE_FORMAT: u32 = 2;

/// The first pause after a failed save; each further failure doubles it, up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long a save waits for another process's lock before it counts as failed.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// One cached list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedList {
    /// The service interface.
    pub service: String,
    /// The category.
    pub category: String,
    /// The backend's revision of the list when it was saved (for reading only: a list read
    /// from the file is older than any live one, whatever this says).
    pub revision: u64,
    /// The entries, as full URL strings, without markers.
    pub urls: Vec<String>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFile {
    /// [`CACHE_FORMAT`].
    pub format: u32,
    /// A readable label of the registry the lists came from (no user name, no password).
    pub registry: String,
    /// The hash of the registry's identity ([`crate::cache_key`]); the file is only read for
    /// a registry with this identity.
    #[serde(default)]
    pub identity: String,
    /// Lists per subscription service key.
    pub services: BTreeMap<String, Vec<CachedList>>,
}

/// A list as held in memory: the notification's own `Arc` (markers included), so recording a
/// notification costs a pointer copy; strings are made only when the file is written.
#[derive(Clone)]
struct Held {
    revision: u64,
    urls: Arc<[Url]>,
    /// Received live by this process (not read from the file).
    live: bool,
}

/// (service, category)
type Slot = (String, String);
type Lists = HashMap<String, BTreeMap<Slot, Held>>;
/// (service key, service, category)
type ListKey = (String, String, String);

#[derive(Default)]
struct State {
    lists: Lists,
    /// Lists received live and not saved yet.
    dirty: HashSet<ListKey>,
}

/// The writer's own state, behind the lock that makes saves of one registry run one at a
/// time (the final save at destroy waits for a save in progress, then writes what is newer).
#[derive(Default)]
struct WriterState {
    /// The last save failed (and was warned about).
    failing: bool,
    /// Stray temporary files of killed writers were removed.
    swept: bool,
}

pub(crate) struct Cache {
    label: String,
    identity: String,
    file: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    writer: Arc<Mutex<WriterState>>,
    dirty: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    /// A cache for `registry`, loaded from `file` when there is one.
    pub(crate) fn load(registry: &Url, file: Option<PathBuf>) -> Cache {
        let identity = cache_key(registry);
        let mut lists = Lists::new();
        if let Some(path) = &file {
            match read_file(path) {
                Ok(Some(f)) if f.identity != identity => tracing::warn!(
                    file = %path.display(),
                    written_for = %f.registry,
                    "the registry cache file holds another registry's lists; not using them (it will be replaced)"
                ),
                Ok(Some(f)) => {
                    for (key, ls) in f.services {
                        let m = lists.entry(key).or_default();
                        for l in ls {
                            m.insert((l.service, l.category), held_from_disk(l.revision, &l.urls));
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
            label: cache_identity(registry),
            identity,
            file,
            state: Arc::new(Mutex::new(State {
                lists,
                dirty: HashSet::new(),
            })),
            writer: Arc::new(Mutex::new(WriterState::default())),
            dirty: Arc::new(Notify::new()),
        }
    }

    /// Records a live list of the subscription with service key `key`. A list read from the
    /// file is always replaced; a live one only by a list of the same or a newer revision.
    ///
    /// With `forget_empty` (an `interface=*` subscription, told about every service that
    /// comes and goes), an empty list removes the service's list instead, here and in the
    /// file, so neither grows with every service name ever seen: a service the cache does not
    /// name is one with no entries, which is what the empty list said.
    pub(crate) fn update(&self, key: &str, n: &Notification, forget_empty: bool) {
        if n.source != Source::Live {
            return;
        }
        let list = Held {
            revision: n.revision,
            urls: n.urls.clone(),
            live: true,
        };
        {
            let mut st = lock(&self.state);
            let m = st.lists.entry(key.to_owned()).or_default();
            let slot = (n.service.clone(), n.category.clone());
            if m.get(&slot)
                .is_some_and(|old| old.live && old.revision > list.revision)
            {
                return;
            }
            if forget_empty && n.is_empty() {
                m.remove(&slot);
            } else {
                m.insert(slot, list);
            }
            if self.file.is_some() {
                st.dirty
                    .insert((key.to_owned(), n.service.clone(), n.category.clone()));
            }
        }
        if self.file.is_some() {
            self.dirty.notify_one();
        }
    }

    /// The cached lists a subscription would be told, marked as cache: entries filtered by
    /// matching, empty ones as `empty://` markers. Empty when nothing is cached.
    pub(crate) fn lists_for(&self, sub: &Url) -> Vec<Notification> {
        let st = lock(&self.state);
        let Some(m) = st.lists.get(&sub.service_key()) else {
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

    /// Starts the writer task, when there is a file. It holds the cache weakly. After a
    /// failed save it waits (1 s, doubling up to 5 min) and tries again.
    pub(crate) fn spawn_writer(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> Option<tokio::task::AbortHandle> {
        self.file.as_ref()?;
        let weak: Weak<Cache> = Arc::downgrade(self);
        let dirty = self.dirty.clone();
        let task = tokio::spawn(async move {
            let mut pause = RETRY_FIRST;
            loop {
                dirty.notified().await;
                loop {
                    tokio::time::sleep(debounce).await;
                    let saved = match weak.upgrade() {
                        Some(cache) => cache.try_save().await,
                        None => return,
                    };
                    if saved {
                        pause = RETRY_FIRST;
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        });
        Some(task.abort_handle())
    }

    /// Writes the lists that changed now (when there is a file), after any save in progress.
    pub(crate) async fn save(&self) {
        self.try_save().await;
    }

    /// Whether the lists that changed are on disk (or there was nothing to write).
    async fn try_save(&self) -> bool {
        let Some(path) = self.file.clone() else {
            return true;
        };
        let state = self.state.clone();
        let writer = self.writer.clone();
        let label = self.label.clone();
        let identity = self.identity.clone();
        let result = tokio::task::spawn_blocking(move || {
            // One save at a time per registry; the lists are taken under this lock, so a
            // later save always writes lists at least as new as an earlier one.
            let mut w = lock(&writer);
            let (taken, lists) = {
                let mut st = lock(&state);
                let taken = std::mem::take(&mut st.dirty);
                // A changed list no longer held was forgotten (`update`): `None` removes it
                // from the file.
                let lists: Vec<(ListKey, Option<Held>)> = taken
                    .iter()
                    .map(|k| {
                        let h = st
                            .lists
                            .get(&k.0)
                            .and_then(|m| m.get(&(k.1.clone(), k.2.clone())));
                        (k.clone(), h.cloned())
                    })
                    .collect();
                (taken, lists)
            };
            if taken.is_empty() {
                return true;
            }
            tracing::debug!(file = %path.display(), lists = lists.len(), "saving the registry cache");
            match write_merged(&path, &label, &identity, lists, &mut w) {
                Ok(()) => {
                    if w.failing {
                        w.failing = false;
                        tracing::info!(file = %path.display(), "the registry cache is saved again");
                    }
                    true
                }
                Err(e) => {
                    lock(&state).dirty.extend(taken);
                    if w.failing {
                        tracing::debug!(file = %path.display(), error = %e, "could not save the registry cache");
                    } else {
                        w.failing = true;
                        tracing::warn!(
                            file = %path.display(),
                            error = %e,
                            "could not save the registry cache; the registry works on without it and the save is retried with growing pauses"
                        );
                    }
                    false
                }
            }
        })
        .await;
        result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the registry cache writer failed");
            false
        })
    }
}

fn held_from_disk(revision: u64, urls: &[String]) -> Held {
    let urls: Vec<Url> = urls
        .iter()
        .filter_map(|s| match Url::parse(s) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable URL in the registry cache");
                None
            }
        })
        .collect();
    Held {
        revision,
        urls: urls.into(),
        live: false,
    }
}

/// Reads a cache file: `Ok(None)` when there is none, an error when it cannot be used.
pub fn read_file(path: &Path) -> Result<Option<CacheFile>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        // No file, or no directory to hold one (the writer reports that).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let file: CacheFile =
        serde_json::from_slice(&text).map_err(|e| format!("not a cache file: {e}"))?;
    if file.format != CACHE_FORMAT {
        return Err(format!("format {} is not {CACHE_FORMAT}", file.format));
    }
    Ok(Some(file))
}

/// Creates `dir` and its missing parents, private to the user (mode 0700 on Unix).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

fn open_lock_file(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// Under the file's lock: reads the file, puts `lists` in it (replacing the same lists,
/// removing those given as `None`, keeping every other) and replaces it durably.
fn write_merged(
    path: &Path,
    label: &str,
    identity: &str,
    lists: Vec<(ListKey, Option<Held>)>,
    w: &mut WriterState,
) -> Result<(), String> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} names no file", path.display()))?
        .to_string_lossy()
        .into_owned();
    create_private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let lock_path = dir.join(format!("{name}.lock"));
    let lock_file = open_lock_file(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    let mut file_lock = fd_lock::RwLock::new(lock_file);
    let started = Instant::now();
    let _guard = loop {
        match file_lock.try_write() {
            Ok(g) => break g,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > LOCK_WAIT {
                    return Err(format!(
                        "another process held {} for more than {LOCK_WAIT:?}",
                        lock_path.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("cannot lock {}: {e}", lock_path.display())),
        }
    };
    let temp_prefix = format!(".{name}.");
    if !w.swept {
        sweep_temp_files(&dir, &temp_prefix);
        w.swept = true;
    }
    let mut file = match read_file(path) {
        Ok(Some(f)) if f.identity == identity => f,
        Ok(Some(f)) => {
            tracing::debug!(file = %path.display(), written_for = %f.registry, "replacing another registry's cache file");
            CacheFile::default()
        }
        Ok(None) => CacheFile::default(),
        Err(e) => {
            tracing::debug!(file = %path.display(), error = %e, "replacing an unusable cache file");
            CacheFile::default()
        }
    };
    file.format = CACHE_FORMAT;
    label.clone_into(&mut file.registry);
    identity.clone_into(&mut file.identity);
    for ((key, service, category), held) in lists {
        let Some(held) = held else {
            if let Some(saved) = file.services.get_mut(&key) {
                saved.retain(|l| l.service != service || l.category != category);
                if saved.is_empty() {
                    file.services.remove(&key);
                }
            }
            continue;
        };
        let list = CachedList {
            service,
            category,
            revision: held.revision,
            urls: held
                .urls
                .iter()
                .filter(|u| !u.is_empty_marker())
                .map(Url::to_full_string)
                .collect(),
        };
        let saved = file.services.entry(key).or_default();
        match saved
            .iter_mut()
            .find(|l| l.service == list.service && l.category == list.category)
        {
            Some(l) => *l = list,
            None => {
                saved.push(list);
                saved.sort_by(|a, b| (&a.service, &a.category).cmp(&(&b.service, &b.category)));
            }
        }
    }
    let mut temp = tempfile::Builder::new()
        .prefix(&temp_prefix)
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| format!("cannot create a temporary file in {}: {e}", dir.display()))?;
    let written = (|| -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(temp.as_file_mut());
        serde_json::to_writer_pretty(&mut out, &file)?;
        out.flush()?;
        drop(out);
        temp.as_file().sync_all()
    })();
    written.map_err(|e| format!("cannot write {}: {e}", temp.path().display()))?;
    temp.persist(path)
        .map_err(|e| format!("cannot rename into {}: {}", path.display(), e.error))?;
    sync_dir(&dir);
    Ok(())
}

/// Makes the rename durable. Some file systems cannot sync a directory; that is not an error.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync the cache directory");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Removes temporary files a killed writer left (only called under the file's lock, so no
/// writer is using one).
fn sweep_temp_files(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(prefix) && n.ends_with(".tmp") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::debug!(file = %e.path().display(), "removed a stray registry cache temporary file")
                }
                Err(err) => {
                    tracing::debug!(file = %e.path().display(), error = %err, "could not remove a stray temporary file")
                }
            }
        }
    }
}
