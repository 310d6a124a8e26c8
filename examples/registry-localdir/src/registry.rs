//! [`LocalDirRegistry`]: the raw backend (one attempt per operation; `FailbackRegistry` adds
//! the rest).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::keeper::{ListKeeper, Scope, SubscriptionId};
use registry_core::url::{ANY_VALUE, GROUP_KEY};
use registry_core::{
    Error, NotifyListener, Registry, RegistryEvent, Result, Url, check_accepts, listener_id,
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

/// A subscription: its id in the keeper and its delivery (kept to flush and close it).
struct Sub {
    id: SubscriptionId,
    delivery: Arc<Delivery>,
}

#[derive(Default)]
struct State {
    subs: HashMap<(Url, usize), (Url, Sub)>,
    /// Scopes read into the keeper and still wanted.
    loaded: Vec<Scope>,
    /// Directories that were changing when read: since when, and the last names read.
    unsettled: HashMap<Key, (Instant, BTreeSet<String>)>,
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
    /// The lists of every subscription, fed from the reads.
    keeper: ListKeeper,
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
            keeper: ListKeeper::new(url.to_identity_string_redacted()),
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

    /// Reads the directories of `scope`: one category, or every category of every service.
    async fn read(&self, scope: &Scope) -> Result<Vec<(Key, Snapshot)>> {
        let store = self.store.clone();
        let scope = scope.clone();
        blocking(&self.url, move || {
            let keys: Vec<Key> = match &scope {
                Scope::Category { service, category } => vec![(service.clone(), category.clone())],
                Scope::Service { service } => store
                    .categories(service)?
                    .into_iter()
                    .map(|c| (service.clone(), c))
                    .collect(),
                Scope::Root => {
                    let mut keys = Vec::new();
                    for s in store.services()? {
                        for c in store.categories(&s)? {
                            keys.push((s.clone(), c));
                        }
                    }
                    keys
                }
            };
            keys.into_iter()
                .map(|k| {
                    let snap = store.read_category(&store.category_dir(&k.0, &k.1))?;
                    Ok((k, snap))
                })
                .collect()
        })
        .await
    }

    /// Reads `scope` until every directory was quiet during its read (for at most
    /// [`MAX_UNSETTLED`]) and hands it to the keeper.
    async fn load(&self, st: &mut State, scope: &Scope) -> Result<()> {
        let start = Instant::now();
        loop {
            let reads = self.read(scope).await?;
            if reads.iter().all(|(_, s)| s.stable) || start.elapsed() >= MAX_UNSETTLED {
                self.feed(st, scope, reads);
                return Ok(());
            }
            tokio::time::sleep(SETTLE).await;
        }
    }

    fn feed(&self, st: &mut State, scope: &Scope, reads: Vec<(Key, Snapshot)>) {
        for (key, _) in &reads {
            st.unsettled.remove(key);
        }
        let entries = reads.into_iter().flat_map(|((s, c), snap)| {
            snap.entries
                .into_values()
                .map(move |u| (s.clone(), c.clone(), u))
        });
        self.keeper.replace(scope, entries, 0);
        if !st.loaded.contains(scope) {
            st.loaded.push(scope.clone());
        }
    }

    /// One poll: reads every scope the subscriptions need and hands the reads to the keeper
    /// (which notifies what changed). A directory that was changing during its read is read
    /// again shortly (`true` is returned), unless it has been changing for [`MAX_UNSETTLED`]
    /// and the read repeats the previous one.
    async fn scan(&self) -> Result<bool> {
        let mut st = self.state.lock().await;
        let mut wanted: Vec<Scope> = Vec::new();
        for (url, _) in st.subs.values() {
            for scope in scopes_of(url) {
                if !wanted.contains(&scope) {
                    wanted.push(scope);
                }
            }
        }
        let gone: Vec<Scope> = st
            .loaded
            .iter()
            .filter(|s| !wanted.contains(s))
            .cloned()
            .collect();
        for scope in gone {
            self.keeper.forget(&scope);
            st.loaded.retain(|s| *s != scope);
        }
        let mut hot = false;
        for scope in wanted {
            let reads = self.read(&scope).await?;
            if settled(&mut st, &reads) {
                self.feed(&mut st, &scope, reads);
            } else {
                hot = true;
            }
        }
        Ok(hot)
    }
}

/// The scopes a subscription needs: each of its categories, or everything for `interface=*`.
fn scopes_of(url: &Url) -> Vec<Scope> {
    if url.service_interface() == ANY_VALUE {
        vec![Scope::Root]
    } else {
        url.categories()
            .into_iter()
            .map(|c| Scope::category(url.service_interface(), c))
            .collect()
    }
}

/// Whether a poll's reads may be used: every directory was quiet during its read, or one
/// has been changing for [`MAX_UNSETTLED`] and its read repeats the previous one.
fn settled(st: &mut State, reads: &[(Key, Snapshot)]) -> bool {
    let mut ok = true;
    for (key, snap) in reads {
        if snap.stable {
            continue;
        }
        let names: BTreeSet<String> = snap.entries.keys().cloned().collect();
        let settled_enough = match st.unsettled.get_mut(key) {
            Some((since, last)) => {
                let repeat = *last == names;
                *last = names;
                repeat && since.elapsed() >= MAX_UNSETTLED
            }
            None => {
                st.unsettled.insert(key.clone(), (Instant::now(), names));
                false
            }
        };
        ok &= settled_enough;
    }
    ok
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
        let delivery = Arc::new(Delivery::for_listener(
            listener,
            DeliveryOptions {
                empty_protection: false,
                label: url.to_redacted_string(),
            },
        ));
        let id = inner.keeper.subscribe(url, delivery.clone());
        // Read what the keeper does not hold yet; the first lists go out with the last read.
        for scope in scopes_of(url) {
            if !st.loaded.contains(&scope)
                && let Err(e) = inner.load(&mut st, &scope).await
            {
                inner.keeper.unsubscribe(id);
                delivery.close().await;
                return Err(e);
            }
        }
        let flush = delivery.flush_handle();
        st.subs.insert(key, (url.clone(), Sub { id, delivery }));
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
        if let Some((_, sub)) = sub {
            inner.keeper.unsubscribe(sub.id);
            sub.delivery.close().await;
        }
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let inner = &self.inner;
        inner.alive()?;
        // Fresh from the directory, matched by a keeper of its own.
        let keeper = ListKeeper::new("lookup");
        for scope in scopes_of(url) {
            let reads = inner.read(&scope).await?;
            let entries = reads.into_iter().flat_map(|((s, c), snap)| {
                snap.entries
                    .into_values()
                    .map(move |u| (s.clone(), c.clone(), u))
            });
            keeper.replace(&scope, entries, 0);
        }
        Ok(keeper.lookup(url).unwrap_or_default())
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
            for scope in std::mem::take(&mut st.loaded) {
                inner.keeper.forget(&scope);
            }
            st.subs.drain().map(|(_, (_, s))| s).collect()
        };
        for sub in subs {
            inner.keeper.unsubscribe(sub.id);
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
