//! [`LocalDirRegistry`]: the raw backend (one attempt per operation; `FailbackRegistry` adds
//! the rest).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::url::{ANY_VALUE, GROUP_KEY};
use registry_core::{
    Error, Notification, NotifyListener, Registry, RegistryEvent, Result, Source, Url,
    check_accepts, is_match, listener_id,
};
use tokio::sync::{Notify, broadcast, watch};

use crate::owner::{self, ME};
use crate::store::{SETTLE, Snapshot, Store};

/// The default poll interval, in milliseconds (`poll` parameter).
pub const DEFAULT_POLL_MS: u64 = 100;
/// How long a directory may keep changing before a read of it is used anyway.
const MAX_UNSETTLED: Duration = Duration::from_secs(1);

/// (service, category)
type Key = (String, String);

/// The last list read for one (service, category): every live entry, unfiltered.
struct Cached {
    entries: BTreeMap<String, Url>,
    revision: u64,
}

struct Sub {
    url: Url,
    categories: Vec<String>,
    wildcard: bool,
    delivery: Delivery,
    /// Services a wildcard subscription has been told about.
    known: BTreeSet<String>,
}

impl Sub {
    fn wants(&self, service: &str, category: &str) -> bool {
        (self.wildcard || self.url.service_interface() == service)
            && self.categories.iter().any(|c| c == category)
    }

    /// Pushes the list of (`service`, `category`) from `cached`, filtered for this
    /// subscription; an empty result is the `empty://` marker.
    fn push(&self, service: &str, category: &str, cached: &Cached) {
        let mut urls: Vec<Url> = cached
            .entries
            .values()
            .filter(|u| is_match(&self.url, u))
            .cloned()
            .collect();
        urls.sort_by_cached_key(Url::to_full_string);
        if urls.is_empty() {
            urls.push(self.url.to_empty_marker_for(service, category));
        }
        self.delivery.push(Notification::new(
            service,
            category,
            urls,
            cached.revision,
            Source::Live,
        ));
    }
}

#[derive(Default)]
struct State {
    /// A per-registry counter: every change of any list takes the next value, so revisions
    /// never go back for a (service, category).
    revision: u64,
    lists: HashMap<Key, Cached>,
    /// Lists whose directory was changing when read: since when, and the last names read.
    unsettled: HashMap<Key, (Instant, BTreeSet<String>)>,
    subs: HashMap<(Url, usize), Sub>,
}

struct Inner {
    url: Url,
    store: Arc<Store>,
    /// This registry instance, recorded as the owner of its dynamic entries.
    owner: String,
    poll: Duration,
    destroyed: AtomicBool,
    events: broadcast::Sender<RegistryEvent>,
    state: tokio::sync::Mutex<State>,
    /// Dynamic entries this instance wrote, removed by `destroy`.
    owned: Mutex<HashSet<PathBuf>>,
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
}

/// The raw `localdir://` registry. Use it through the scheme (`localdir:///path`), which wraps
/// it in `FailbackRegistry`; see the crate documentation.
pub struct LocalDirRegistry {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The directory named by a `localdir` URL, and its settings.
pub(crate) struct Settings {
    pub dir: PathBuf,
    pub group: String,
    pub poll: Duration,
}

impl Settings {
    pub fn from_url(url: &Url) -> Result<Settings> {
        let invalid = |reason: String| Error::InvalidRegistryUrl {
            url: url.to_identity_string_redacted(),
            reason,
        };
        if !url.host().is_empty() {
            return Err(invalid(format!(
                "the directory must be an absolute path, written with three slashes: \
                 localdir:///var/lib/registry (`{}` was read as a host name)",
                url.address()
            )));
        }
        if url.path().is_empty() {
            return Err(invalid(
                "no directory: write localdir:///absolute/path/to/a/shared/directory".to_owned(),
            ));
        }
        let dir = PathBuf::from(format!("/{}", url.path()));
        let poll_ms: u64 = url.parameter_num("poll", DEFAULT_POLL_MS)?;
        if poll_ms == 0 {
            return Err(Error::InvalidParameter {
                key: "poll".to_owned(),
                value: "0".to_owned(),
                reason: "the poll interval must be at least 1 ms".to_owned(),
            });
        }
        let raw_group = url.parameter_or(GROUP_KEY, "dubbo");
        let group = raw_group.trim_matches('/');
        if group.is_empty()
            || group
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::InvalidParameter {
                key: GROUP_KEY.to_owned(),
                value: raw_group.to_owned(),
                reason: "the group names a directory under the registry directory: no empty, `.` or `..` parts"
                    .to_owned(),
            });
        }
        Ok(Settings {
            dir,
            group: group.to_owned(),
            poll: Duration::from_millis(poll_ms),
        })
    }
}

/// Rejects a service or category that cannot be a directory name of its own.
fn check_names(url: &Url) -> Result<()> {
    let service = url.service_interface();
    if service.is_empty() || service == "." || service == ".." {
        return Err(Error::InvalidUrl {
            input: url.to_redacted_string(),
            reason: "the URL has no usable service interface (path or `interface`)".to_owned(),
        });
    }
    let category = url.category();
    if category.is_empty()
        || category == "."
        || category == ".."
        || category.contains(['/', '\\', '\0', ','])
    {
        return Err(Error::InvalidParameter {
            key: "category".to_owned(),
            value: category.to_owned(),
            reason: "a registered URL has one category, which must be a plain name".to_owned(),
        });
    }
    Ok(())
}

impl LocalDirRegistry {
    /// Opens the registry described by `url` (`localdir:///abs/dir?group=..&poll=..`) and starts
    /// its poller on the current tokio runtime. With `check=true` (the default) the directory
    /// must be creatable and writable.
    pub async fn open(url: Url) -> Result<LocalDirRegistry> {
        let settings = Settings::from_url(&url)?;
        let store = Arc::new(Store::new(settings.dir.join(&settings.group)));
        let probe = {
            let store = store.clone();
            blocking(&url, move || store.probe()).await
        };
        if let Err(e) = probe {
            if url.parameter_bool("check", true) {
                return Err(e);
            }
            tracing::warn!(error = %e, "localdir: the directory is not usable yet; operations will be retried");
        }
        let inner = Arc::new(Inner {
            store,
            owner: owner::new_instance_id(),
            poll: settings.poll,
            destroyed: AtomicBool::new(false),
            events: broadcast::channel(16).0,
            state: tokio::sync::Mutex::new(State::default()),
            owned: Mutex::new(HashSet::new()),
            wake: Arc::new(Notify::new()),
            stop: watch::channel(false).0,
            url,
        });
        tokio::spawn(poll_loop(
            Arc::downgrade(&inner),
            inner.wake.clone(),
            inner.stop.subscribe(),
            inner.poll,
        ));
        tracing::debug!(
            registry = %inner.url.to_identity_string_redacted(),
            root = %inner.store.root.display(),
            owner = %inner.owner,
            "localdir registry opened"
        );
        Ok(LocalDirRegistry { inner })
    }

    /// The directory this registry keeps its entries in (`<dir>/<group>`).
    pub fn root(&self) -> &Path {
        &self.inner.store.root
    }

    /// The id recorded as the owner of this instance's dynamic entries.
    pub fn owner_id(&self) -> &str {
        &self.inner.owner
    }
}

/// Runs a blocking file-system operation off the async threads.
async fn blocking<T: Send + 'static>(
    url: &Url,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::backend(
            url,
            format!("a file-system task failed: {e}"),
            true,
        ))
    })
}

/// One poll: which lists are wanted now, read them, notify what changed.
async fn poll_loop(
    weak: Weak<Inner>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    poll: Duration,
) {
    let mut delay = poll;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = wake.notified() => {}
            _ = stop.changed() => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.destroyed.load(Ordering::Acquire) {
            return;
        }
        delay = match inner.scan().await {
            Ok(true) => SETTLE,
            Ok(false) => poll,
            Err(e) => {
                tracing::warn!(registry = %inner.url.to_identity_string_redacted(), error = %e, "localdir: poll failed");
                poll
            }
        };
    }
}

impl Inner {
    fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.url.to_identity_string_redacted(),
            })
        } else {
            Ok(())
        }
    }

    /// The (service, category) lists the subscriptions need; wildcard subscriptions need every
    /// service in the group directory.
    async fn wanted(&self, subs: &[(&Url, &[String], bool)]) -> Result<BTreeSet<Key>> {
        let mut keys = BTreeSet::new();
        let services = if subs.iter().any(|(_, _, w)| *w) {
            let store = self.store.clone();
            blocking(&self.url, move || store.services()).await?
        } else {
            Vec::new()
        };
        for (url, categories, wildcard) in subs {
            let names: Vec<&str> = if *wildcard {
                services.iter().map(String::as_str).collect()
            } else {
                vec![url.service_interface()]
            };
            for s in names {
                for c in *categories {
                    keys.insert((s.to_owned(), c.clone()));
                }
            }
        }
        Ok(keys)
    }

    async fn read(&self, keys: &BTreeSet<Key>) -> Result<Vec<(Key, Snapshot)>> {
        let store = self.store.clone();
        let keys: Vec<Key> = keys.iter().cloned().collect();
        blocking(&self.url, move || {
            keys.into_iter()
                .map(|k| {
                    let snap = store.read_category(&store.category_dir(&k.0, &k.1))?;
                    Ok((k, snap))
                })
                .collect()
        })
        .await
    }

    /// Reads until every directory was quiet during its read, for at most [`MAX_UNSETTLED`].
    async fn read_settled(&self, keys: &BTreeSet<Key>) -> Result<Vec<(Key, Snapshot)>> {
        let start = Instant::now();
        loop {
            let reads = self.read(keys).await?;
            if reads.iter().all(|(_, s)| s.stable) || start.elapsed() >= MAX_UNSETTLED {
                return Ok(reads);
            }
            tokio::time::sleep(SETTLE).await;
        }
    }

    /// One poll: reads every wanted list, records and notifies the changed ones. Returns
    /// whether some directory was changing (poll again soon).
    async fn scan(&self) -> Result<bool> {
        let mut st = self.state.lock().await;
        if st.subs.is_empty() {
            st.lists.clear();
            st.unsettled.clear();
            return Ok(false);
        }
        let subs: Vec<(Url, Vec<String>, bool)> = st
            .subs
            .values()
            .map(|s| (s.url.clone(), s.categories.clone(), s.wildcard))
            .collect();
        let refs: Vec<(&Url, &[String], bool)> =
            subs.iter().map(|(u, c, w)| (u, c.as_slice(), *w)).collect();
        let keys = self.wanted(&refs).await?;
        let reads = self.read(&keys).await?;
        let hot = apply(&mut st, reads, false);
        st.lists.retain(|k, _| keys.contains(k));
        st.unsettled.retain(|k, _| keys.contains(k));
        Ok(hot)
    }
}

/// Records the reads that changed a list (taking a new revision) and notifies every
/// subscription that wants them. An unsettled read is skipped (and `true` returned) unless
/// `force`, or unless the directory has been changing for [`MAX_UNSETTLED`] and the read
/// repeats the previous one.
fn apply(st: &mut State, reads: Vec<(Key, Snapshot)>, force: bool) -> bool {
    let mut hot = false;
    let mut changed: Vec<Key> = Vec::new();
    for (key, snap) in reads {
        let names: BTreeSet<String> = snap.entries.keys().cloned().collect();
        if !snap.stable && !force {
            let now = Instant::now();
            let settled_enough = match st.unsettled.get_mut(&key) {
                Some((since, last)) => {
                    let repeat = *last == names;
                    *last = names.clone();
                    repeat && since.elapsed() >= MAX_UNSETTLED
                }
                None => {
                    st.unsettled.insert(key.clone(), (now, names.clone()));
                    false
                }
            };
            if !settled_enough {
                hot = true;
                continue;
            }
        }
        st.unsettled.remove(&key);
        let same = st
            .lists
            .get(&key)
            .is_some_and(|c| c.entries.keys().eq(names.iter()));
        if !same {
            st.revision += 1;
            st.lists.insert(
                key.clone(),
                Cached {
                    entries: snap.entries,
                    revision: st.revision,
                },
            );
            changed.push(key);
        }
    }
    let State { subs, lists, .. } = st;
    for sub in subs.values_mut() {
        for (service, category) in &changed {
            if sub.wants(service, category)
                && (!sub.wildcard || sub.known.contains(service))
                && let Some(c) = lists.get(&(service.clone(), category.clone()))
            {
                sub.push(service, category, c);
            }
        }
        if sub.wildcard {
            introduce_services(sub, lists);
        }
    }
    hot
}

/// Tells a wildcard subscription about services it has not seen that now have entries in
/// one of its categories: one notification per category, in the subscription's order.
fn introduce_services(sub: &mut Sub, lists: &HashMap<Key, Cached>) {
    let mut services: BTreeSet<&String> = BTreeSet::new();
    for ((service, category), cached) in lists {
        if !sub.known.contains(service)
            && sub.categories.contains(category)
            && !cached.entries.is_empty()
        {
            services.insert(service);
        }
    }
    for service in services {
        let all: Option<Vec<&Cached>> = sub
            .categories
            .iter()
            .map(|c| lists.get(&(service.clone(), c.clone())))
            .collect();
        // Wait until every category of the service was read.
        let Some(all) = all else { continue };
        sub.known.insert(service.clone());
        for (c, cached) in sub.categories.iter().zip(all) {
            sub.push(service, c, cached);
        }
    }
}

#[async_trait]
impl Registry for LocalDirRegistry {
    fn url(&self) -> &Url {
        &self.inner.url
    }

    fn is_available(&self) -> bool {
        !self.inner.destroyed.load(Ordering::Acquire)
    }

    async fn register(&self, url: &Url) -> Result<()> {
        let inner = &self.inner;
        inner.alive()?;
        check_accepts(&inner.url, url)?;
        check_names(url)?;
        let path = inner.store.entry_path(url);
        let full = url.to_full_string();
        let content = if url.is_dynamic() {
            ME.entry(full, &inner.owner)
        } else {
            owner::EntryFile {
                url: Some(full),
                ..Default::default()
            }
        }
        .to_bytes();
        {
            let (store, path) = (inner.store.clone(), path.clone());
            blocking(&inner.url, move || store.write(&path, &content)).await?;
        }
        if url.is_dynamic() {
            lock(&inner.owned).insert(path.clone());
        } else {
            lock(&inner.owned).remove(&path);
        }
        if inner.destroyed.load(Ordering::Acquire) {
            // Destroyed while writing: do not leave the entry behind.
            let store = inner.store.clone();
            let _ = blocking(&inner.url, move || store.remove(&path)).await;
            return inner.alive();
        }
        inner.wake.notify_one();
        Ok(())
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        let inner = &self.inner;
        inner.alive()?;
        check_names(url)?;
        let path = inner.store.entry_path(url);
        lock(&inner.owned).remove(&path);
        let store = inner.store.clone();
        blocking(&inner.url, move || store.remove(&path)).await?;
        inner.wake.notify_one();
        Ok(())
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        inner.alive()?;
        let key = (url.clone(), listener_id(&listener));
        let mut st = inner.state.lock().await;
        inner.alive()?;
        if st.subs.contains_key(&key) {
            return Ok(());
        }
        let mut sub = Sub {
            url: url.clone(),
            categories: url.categories(),
            wildcard: url.service_interface() == ANY_VALUE,
            delivery: Delivery::for_listener(
                listener,
                DeliveryOptions {
                    empty_protection: false,
                    label: url.to_redacted_string(),
                },
            ),
            known: BTreeSet::new(),
        };
        let keys = inner
            .wanted(&[(&sub.url, sub.categories.as_slice(), sub.wildcard)])
            .await?;
        let reads = inner.read_settled(&keys).await?;
        // Lists that changed are notified to the existing subscriptions first.
        apply(&mut st, reads, true);
        if sub.wildcard {
            introduce_services(&mut sub, &st.lists);
        } else {
            let service = url.service_interface().to_owned();
            for c in &sub.categories {
                if let Some(cached) = st.lists.get(&(service.clone(), c.clone())) {
                    sub.push(&service, c, cached);
                }
            }
        }
        let flush = sub.delivery.flush_handle();
        st.subs.insert(key, sub);
        drop(st);
        flush.await;
        Ok(())
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        inner.alive()?;
        let sub = inner
            .state
            .lock()
            .await
            .subs
            .remove(&(url.clone(), listener_id(listener)));
        if let Some(sub) = sub {
            sub.delivery.close().await;
        }
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let inner = &self.inner;
        inner.alive()?;
        let categories = url.categories();
        let keys = inner
            .wanted(&[(
                url,
                categories.as_slice(),
                url.service_interface() == ANY_VALUE,
            )])
            .await?;
        let reads: HashMap<Key, Snapshot> = inner.read_settled(&keys).await?.into_iter().collect();
        // In the order of the services, then of the subscription's categories.
        let services: BTreeSet<&String> = keys.iter().map(|(s, _)| s).collect();
        let mut out = Vec::new();
        for s in services {
            for c in &categories {
                if let Some(snap) = reads.get(&(s.clone(), c.clone())) {
                    let mut found: Vec<Url> = snap
                        .entries
                        .values()
                        .filter(|u| is_match(url, u))
                        .cloned()
                        .collect();
                    found.sort_by_cached_key(Url::to_full_string);
                    out.extend(found);
                }
            }
        }
        Ok(out)
    }

    async fn destroy(&self) {
        let inner = &self.inner;
        if inner.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.stop.send_replace(true);
        let owned: Vec<PathBuf> = lock(&inner.owned).drain().collect();
        let (store, me) = (inner.store.clone(), inner.owner.clone());
        let removed = blocking(&inner.url, move || {
            for path in &owned {
                store.remove_if(path, |f| f.is_owned_by(&me));
            }
            Ok(())
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "localdir: destroy could not remove every entry");
        }
        let subs: Vec<Sub> = {
            let mut st = inner.state.lock().await;
            st.lists.clear();
            st.subs.drain().map(|(_, s)| s).collect()
        };
        for sub in subs {
            sub.delivery.close().await;
        }
        tracing::debug!(registry = %inner.url.to_identity_string_redacted(), "localdir registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }
}

impl Drop for LocalDirRegistry {
    fn drop(&mut self) {
        // Stops the poller even when the registry was never destroyed.
        self.inner.stop.send_replace(true);
    }
}
