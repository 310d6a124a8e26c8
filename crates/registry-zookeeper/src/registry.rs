//! [`ZookeeperRegistry`]: one ZooKeeper session per registry (see the session module), one
//! persistent recursive watch per category path (shared by every subscription on it), and a
//! watch on the root for `interface=*` subscriptions (see the tasks module).
//!
//! Tasks:
//! - one *watch task* per watched path and session: it owns the [`zk::PersistentWatcher`],
//!   feeds created/deleted events and full reads of the path to the registry's
//!   [`ListKeeper`] (which pushes the lists to the subscriptions' [`Delivery`]s; no
//!   listener runs here), and answers re-read requests;
//! - one *root task* while an `interface=*` subscription exists: it lists the services,
//!   attaches new ones to the wildcard subscriptions and detaches the ones gone (their
//!   watches dropped when no other subscription needs them);
//! - one *monitor* per session: it turns session states into [`RegistryEvent`]s, re-reads
//!   every watched path after a reconnect, and starts a new session when one expires;
//! - a *connector* while there is no session (`check=false` start, or after an expiry).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::keeper::{KeeperStats, ListKeeper, Scope};
use registry_core::url::ANY_VALUE;
use registry_core::{
    Error, NotifyListener, Registry, RegistryEvent, Result, Url, decode, is_match, listener_id,
};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

use crate::errors::Fail;
use crate::options::Config;
use crate::session::{Ctx, READ_UNITS, Session, lock};
use crate::tasks::{self, Cmd, Job, RootHost, TaskRef, after, answer, send_cmd};
use crate::watches::{
    RETIRED, RootData, RootWatch, Sub, SubKey, Watch, WatchData, decode_child, mark_root_loaded,
};

/// How many of our past session ids are remembered (see [`Inner::our_sessions`]).
pub(crate) const SESSIONS_KEPT: usize = 16;

/// A watched category path and its task on the current session.
pub(crate) struct WatchEntry {
    watch: Arc<Watch>,
    task: Option<TaskRef>,
    /// The subscriptions on it.
    users: Vec<SubKey>,
}

/// What the root task reaches the registry through.
struct Host(Weak<Inner>);

impl RootHost for Host {
    fn attach(
        &self,
        sub: &Arc<Sub>,
        service: &str,
    ) -> Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>> {
        let inner = self.0.upgrade()?;
        Some(Box::pin(inner.attach_service(sub, service, false)))
    }

    fn detach_gone(&self, sub: &Arc<Sub>, listed: &[String], generation: u64) {
        if let Some(inner) = self.0.upgrade() {
            inner.detach_gone(sub, listed, generation);
        }
    }

    fn all_attached(&self) {
        if let Some(inner) = self.0.upgrade() {
            mark_root_loaded(&inner.keeper, &inner.feed);
        }
    }
}

/// The root watch and its task on the current session.
pub(crate) struct RootEntry {
    root: Arc<RootWatch>,
    task: Option<TaskRef>,
}

#[derive(Default)]
pub(crate) struct State {
    subs: HashMap<SubKey, Arc<Sub>>,
    watches: HashMap<String, WatchEntry>,
    root: Option<RootEntry>,
    /// Tasks of watches that were dropped and may still be ending, by path. A new task for
    /// the same path waits for the old one first: the old watcher's removal must reach the
    /// server before the new watch, or it would remove the new one (ZooKeeper removes
    /// persistent watches per path, ZOOKEEPER-4472).
    retiring: HashMap<String, JoinHandle<()>>,
}

pub(crate) struct Inner {
    pub(crate) url: Url,
    pub(crate) cfg: Config,
    pub(crate) events: broadcast::Sender<RegistryEvent>,
    pub(crate) destroyed: AtomicBool,
    pub(crate) available: AtomicBool,
    pub(crate) ever_connected: AtomicBool,
    pub(crate) generations: AtomicU64,
    /// The ids of our sessions, the current one last (at most [`SESSIONS_KEPT`]): an entry
    /// owned by one of them is ours to delete, even when the session is no longer current
    /// (a session our client gave up on may live on in the ensemble until it expires there).
    pub(crate) our_sessions: Mutex<Vec<i64>>,
    pub(crate) session: Mutex<Option<Session>>,
    pub(crate) state: Mutex<State>,
    /// The monitor and connector tasks.
    pub(crate) background: Mutex<Vec<JoinHandle<()>>>,
    /// Bounds how many watches arm and read at once.
    pub(crate) permits: Arc<Semaphore>,
    /// Set by destroy: ends every call in flight.
    pub(crate) closing: watch::Sender<bool>,
    /// The lists of every subscription (see the watches module).
    pub(crate) keeper: ListKeeper,
    /// Taken by everything that feeds the keeper (see [`mark_root_loaded`]).
    pub(crate) feed: Arc<Mutex<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for h in lock(&self.background).drain(..) {
            h.abort();
        }
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, e) in st.watches.drain() {
            if let Some(t) = e.task {
                t.handle.abort();
            }
        }
        if let Some(t) = st.root.take().and_then(|r| r.task) {
            t.handle.abort();
        }
        for (_, h) in st.retiring.drain() {
            h.abort();
        }
    }
}

impl Inner {
    pub(crate) fn ctx(&self) -> Ctx {
        Ctx {
            label: self.cfg.label.clone(),
            root: self.cfg.root.clone(),
            timeout: self.cfg.timeout,
            permits: self.permits.clone(),
            closing: self.closing.subscribe(),
        }
    }

    /// Whether `owner` (an `ephemeralOwner`) is one of our sessions, current or past.
    pub(crate) fn is_ours(&self, owner: i64) -> bool {
        lock(&self.our_sessions).contains(&owner)
    }

    pub(crate) fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.cfg.label.clone(),
            })
        } else {
            Ok(())
        }
    }

    pub(crate) fn current(&self) -> Option<Session> {
        lock(&self.session).clone()
    }

    pub(crate) fn session(&self) -> Result<Session> {
        self.alive()?;
        self.current().ok_or_else(|| Error::NotConnected {
            registry: self.cfg.label.clone(),
            reason: format!(
                "no ZooKeeper session with {} yet (connecting in the background)",
                self.cfg.connect
            ),
        })
    }

    pub(crate) fn emit(&self, ev: RegistryEvent) {
        tracing::debug!(registry = %self.cfg.label, event = ?ev, "registry event");
        let _ = self.events.send(ev);
    }

    /// The command channel of a watch's task on the current session, starting it if needed.
    fn watch_task(
        &self,
        retiring: &mut HashMap<String, JoinHandle<()>>,
        entry: &mut WatchEntry,
    ) -> Option<mpsc::UnboundedSender<Cmd>> {
        if self.destroyed.load(Ordering::Acquire) {
            return None;
        }
        let session = self.current()?;
        if let Some(t) = &entry.task {
            if t.generation == session.generation && !t.tx.is_closed() {
                return Some(t.tx.clone());
            }
            t.handle.abort();
        }
        {
            let mut data = lock(&entry.watch.data);
            if data.generation != session.generation {
                data.generation = session.generation;
                data.primed = false;
            }
            data.ready = false;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(after(
            retiring.remove(&entry.watch.path),
            tasks::run(
                Job::List(entry.watch.clone()),
                Arc::downgrade(&session.client),
                session.generation,
                rx,
                self.ctx(),
            ),
        ));
        entry.task = Some(TaskRef {
            generation: session.generation,
            tx: tx.clone(),
            handle,
        });
        Some(tx)
    }

    fn root_task(
        self: &Arc<Self>,
        retiring: &mut HashMap<String, JoinHandle<()>>,
        entry: &mut RootEntry,
    ) -> Option<mpsc::UnboundedSender<Cmd>> {
        if self.destroyed.load(Ordering::Acquire) {
            return None;
        }
        let session = self.current()?;
        if let Some(t) = &entry.task {
            if t.generation == session.generation && !t.tx.is_closed() {
                return Some(t.tx.clone());
            }
            t.handle.abort();
        }
        lock(&entry.root.data).generation = session.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(after(
            retiring.remove(&self.cfg.root),
            tasks::run(
                Job::Root {
                    root: entry.root.clone(),
                    host: Arc::new(Host(Arc::downgrade(self))),
                },
                Arc::downgrade(&session.client),
                session.generation,
                rx,
                self.ctx(),
            ),
        ));
        entry.task = Some(TaskRef {
            generation: session.generation,
            tx: tx.clone(),
            handle,
        });
        Some(tx)
    }

    /// Whether the watch of `entry` is armed and read on the current session.
    fn watch_ready(entry: &WatchEntry, session: &Session) -> bool {
        let live = entry
            .task
            .as_ref()
            .is_some_and(|t| t.generation == session.generation && !t.tx.is_closed());
        let d = lock(&entry.watch.data);
        live && d.ready && d.generation == session.generation
    }

    /// Puts `sub` on the watches of `service`'s categories, and returns a future that waits
    /// until each of them is armed and read on the current session (reading the ones that
    /// are not, or every one with `force`) and then marks the service attached. An attached
    /// service is looked at again only with `force`.
    pub(crate) fn attach_service(
        &self,
        sub: &Arc<Sub>,
        service: &str,
        force: bool,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let mut targets = Vec::new();
        {
            let session = self.current();
            let mut st = lock(&self.state);
            let st = &mut *st;
            let mut attached = lock(&sub.attached);
            if sub.active.load(Ordering::Acquire) && (force || !attached.0.contains(service)) {
                for category in &sub.categories {
                    let path = self.cfg.category_path(service, category);
                    let entry = st
                        .watches
                        .entry(path.clone())
                        .or_insert_with(|| WatchEntry {
                            watch: Arc::new(Watch {
                                path: path.clone(),
                                service: service.to_owned(),
                                category: category.clone(),
                                scope: Scope::category(service, category.as_str()),
                                keeper: self.keeper.clone(),
                                feed: self.feed.clone(),
                                data: Mutex::new(WatchData {
                                    generation: 0,
                                    primed: false,
                                    ready: false,
                                    read_once: false,
                                    bytes: 0,
                                }),
                            }),
                            task: None,
                            users: Vec::new(),
                        });
                    if !entry.users.contains(&sub.key) {
                        entry.users.push(sub.key.clone());
                    }
                    if !attached.1.contains(&path) {
                        attached.1.push(path.clone());
                    }
                    let ready = session
                        .as_ref()
                        .is_some_and(|s| Inner::watch_ready(entry, s));
                    let tx = self.watch_task(&mut st.retiring, entry);
                    if force || !ready {
                        targets.push((path, tx));
                    }
                }
            }
        }
        let label = self.cfg.label.clone();
        let sub = sub.clone();
        let service = service.to_owned();
        async move {
            let answers: Vec<_> = targets
                .into_iter()
                .map(|(path, tx)| (path, send_cmd(tx, false, false)))
                .collect();
            for (path, rx) in answers {
                answer(&label, &path, rx).await?;
            }
            lock(&sub.attached).0.insert(service);
            Ok(())
        }
    }

    /// Whether every watch of `sub` is armed and read on the current session.
    fn is_ready(&self, sub: &Arc<Sub>) -> bool {
        let Some(session) = self.current() else {
            return false;
        };
        let st = lock(&self.state);
        let paths = lock(&sub.attached).1.clone();
        !paths.is_empty()
            && paths.iter().all(|path| {
                st.watches
                    .get(path)
                    .is_some_and(|e| e.users.contains(&sub.key) && Inner::watch_ready(e, &session))
            })
    }

    /// Takes `sub` off the watch of `path`; drops the watch when nobody needs it any more
    /// (and its scope from the keeper, emptied first with `clear`: the path is known to be
    /// gone, and no other scope may cover it, `Scope::Root` being loaded).
    fn leave_watch(&self, st: &mut State, sub: &Sub, path: String, clear: bool) {
        let empty = match st.watches.get_mut(&path) {
            Some(e) => {
                e.users.retain(|k| *k != sub.key);
                e.users.is_empty()
            }
            None => false,
        };
        let Some(e) = empty.then(|| st.watches.remove(&path)).flatten() else {
            return;
        };
        // Its ending task feeds nothing more.
        lock(&e.watch.data).generation = RETIRED;
        {
            let _feed = lock(&self.feed);
            if clear {
                self.keeper.replace(&e.watch.scope, [], 0);
            }
            self.keeper.forget(&e.watch.scope);
        }
        if let Some(t) = e.task {
            // Dropping the sender ends the task, which drops the watcher.
            st.retiring.retain(|_, h| !h.is_finished());
            st.retiring.insert(path, t.handle);
        }
    }

    /// Takes the `interface=*` subscription `sub` off the watches of the services that are no
    /// longer under the root (`listed`: the services listed, sorted), so a service that goes
    /// leaves no watch, task or state behind. Its lists are emptied first (the service node
    /// is gone, so are its entries, whether or not their deletes were seen).
    pub(crate) fn detach_gone(&self, sub: &Arc<Sub>, listed: &[String], generation: u64) {
        let is_listed = |s: &str| listed.binary_search_by(|l| l.as_str().cmp(s)).is_ok();
        let mut st = lock(&self.state);
        // The listing is still the current root task's (checked under the state lock, then
        // the root's, the lock order): an older task's listing must not take services off.
        if st
            .root
            .as_ref()
            .is_none_or(|r| lock(&r.root.data).generation != generation)
        {
            return;
        }
        let gone: Vec<String> = {
            let mut attached = lock(&sub.attached);
            attached.0.retain(|s| is_listed(s));
            let (gone, kept) = std::mem::take(&mut attached.1).into_iter().partition(|p| {
                st.watches
                    .get(p)
                    .is_some_and(|e| !is_listed(&e.watch.service))
            });
            attached.1 = kept;
            gone
        };
        if gone.is_empty() {
            return;
        }
        tracing::debug!(registry = %self.cfg.label, paths = ?gone, "services gone from the root: their watches are dropped");
        for path in gone {
            self.leave_watch(&mut st, sub, path, true);
        }
    }

    /// The number of paths watched (category paths, and the root while an `interface=*`
    /// subscription exists).
    pub(crate) fn watch_count(&self) -> usize {
        let st = lock(&self.state);
        st.watches.len() + usize::from(st.root.is_some())
    }

    /// Takes `sub` off every watch; drops the watches nobody needs any more (and their
    /// scopes from the keeper).
    fn detach(&self, sub: &Arc<Sub>) {
        let mut st = lock(&self.state);
        sub.active.store(false, Ordering::Release);
        let paths = std::mem::take(&mut lock(&sub.attached).1);
        for path in paths {
            self.leave_watch(&mut st, sub, path, false);
        }
        if sub.wildcard {
            let empty = st.root.as_ref().is_some_and(|r| {
                let mut d = lock(&r.root.data);
                d.subs.retain(|s| !Arc::ptr_eq(s, sub));
                d.subs.is_empty()
            });
            if empty && let Some(r) = st.root.take() {
                lock(&r.root.data).generation = RETIRED;
                {
                    let _feed = lock(&self.feed);
                    self.keeper.forget(&Scope::Root);
                }
                if let Some(t) = r.task {
                    st.retiring.retain(|_, h| !h.is_finished());
                    st.retiring.insert(self.cfg.root.clone(), t.handle);
                }
            }
        }
    }

    /// What the keeper holds for `url` when every category path it needs is watched and read
    /// on the current session (else the caller reads).
    fn held(&self, url: &Url, session: &Session) -> Option<Vec<Url>> {
        let service = url.service_interface();
        if service == ANY_VALUE {
            return None;
        }
        let all_ready = {
            let st = lock(&self.state);
            url.categories().iter().all(|c| {
                st.watches
                    .get(&self.cfg.category_path(service, c))
                    .is_some_and(|e| Inner::watch_ready(e, session))
            })
        };
        if all_ready {
            self.keeper.lookup(url)
        } else {
            None
        }
    }

    async fn remove_sub(&self, key: &SubKey) {
        let sub = lock(&self.state).subs.remove(key);
        if let Some(sub) = sub {
            let id = {
                let mut id = lock(&sub.id);
                sub.active.store(false, Ordering::Release);
                id.take()
            };
            if let Some(id) = id {
                self.keeper.unsubscribe(id);
            }
            self.detach(&sub);
            sub.delivery.close().await;
        }
    }

    /// Asks every watch (and the root watch) to read its list again and push it; with
    /// `rearm` (a reconnect of the same session) each watch is dropped and added again first
    /// (see [`Cmd::rearm`]). Watches of a new session are armed by their new tasks. The
    /// requests are sent before this returns; the future ends once every watch is armed and
    /// read, and yields the paths whose task stopped first (their session ended). The tasks
    /// keep trying after a failure whether or not the future is still awaited.
    pub(crate) fn reread_all(
        self: &Arc<Self>,
        rearm: bool,
    ) -> impl Future<Output = Vec<String>> + Send + 'static {
        let answers = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let State {
                watches,
                root,
                retiring,
                ..
            } = st;
            let mut answers: Vec<_> = watches
                .iter_mut()
                .map(|(path, e)| {
                    let tx = self.watch_task(retiring, e);
                    (path.clone(), send_cmd(tx, rearm, true))
                })
                .collect();
            if let Some(r) = root.as_mut() {
                let tx = self.root_task(retiring, r);
                answers.push((self.cfg.root.clone(), send_cmd(tx, rearm, true)));
            }
            answers
        };
        async move {
            let mut stopped = Vec::new();
            for (path, rx) in answers {
                let done = match rx {
                    Some(rx) => matches!(rx.await, Ok(Ok(()))),
                    None => false,
                };
                if !done {
                    stopped.push(path);
                }
            }
            stopped
        }
    }

    pub(crate) async fn list(&self, session: &Session, path: &str) -> Result<Vec<Url>> {
        let ctx = self.ctx();
        match ctx.read_children(&session.client, path, false, None).await {
            Ok((names, _)) => Ok(names
                .iter()
                .filter_map(|n| decode_child(path, n, true))
                .collect()),
            Err(Fail::Zk(zk::Error::NoNode)) => Ok(Vec::new()),
            Err(f) => Err(ctx.error("list children of", path, f)),
        }
    }
}

/// The `zookeeper://` registry; see the crate documentation.
///
/// Cloning is not offered: share it as an `Arc<dyn Registry>` or `Arc<ZookeeperRegistry>`.
pub struct ZookeeperRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZookeeperRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZookeeperRegistry")
            .field("url", &self.inner.cfg.label)
            .field("root", &self.inner.cfg.root)
            .field("session", &self.session_id())
            .finish()
    }
}

impl ZookeeperRegistry {
    /// Builds a registry for `url` (`zookeeper://host:port[,host:port]?...`). With
    /// `check=true` (the default) it connects first and fails with
    /// [`Error::Unavailable`] when no session can be made within `timeout` per host; with
    /// `check=false` it returns at once and connects in the background
    /// ([`Registry::is_available`] is false until then). Needs a tokio runtime.
    pub async fn new(url: Url) -> Result<ZookeeperRegistry> {
        let cfg = Config::from_url(&url)?;
        let inner = Arc::new(Inner {
            url,
            events: broadcast::channel(64).0,
            destroyed: AtomicBool::new(false),
            available: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            generations: AtomicU64::new(0),
            our_sessions: Mutex::new(Vec::new()),
            session: Mutex::new(None),
            state: Mutex::new(State::default()),
            background: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(READ_UNITS as usize)),
            closing: watch::channel(false).0,
            keeper: ListKeeper::new(cfg.label.clone()),
            feed: Arc::new(Mutex::new(())),
            cfg,
        });
        if inner.cfg.check {
            let client = inner.connect_once().await?;
            if inner.install(client).is_none() {
                return Err(Error::Destroyed {
                    registry: inner.cfg.label.clone(),
                });
            }
            inner.ever_connected.store(true, Ordering::Release);
            inner.emit(RegistryEvent::Connected);
        } else {
            inner.spawn_connector();
        }
        Ok(ZookeeperRegistry { inner })
    }

    /// What the registry's list keeper holds (entries, subscriptions, scopes read, ...), for
    /// metrics and tests.
    pub fn keeper_stats(&self) -> KeeperStats {
        self.inner.keeper.stats()
    }

    /// The number of paths this registry watches: one per category path a subscription needs
    /// (shared), and the root while an `interface=*` subscription exists.
    pub fn watch_count(&self) -> usize {
        self.inner.watch_count()
    }

    /// The current session's id and password (inside [`zk::SessionInfo`]), or `None` when
    /// there is no session. Another client can attach to the session with
    /// `zookeeper_client::Client::connector().with_session(info)`; closing that client ends
    /// the session, which is how tests make a session expire.
    pub fn session_info(&self) -> Option<zk::SessionInfo> {
        self.inner.current().map(|s| s.client.session().clone())
    }

    /// The current session id, or `None` when there is no session.
    pub fn session_id(&self) -> Option<i64> {
        self.inner.current().map(|s| s.client.session_id().0)
    }

    /// The session timeout the server granted (ZooKeeper clamps the asked `session` to
    /// 2–20 ticks), or `None` when there is no session.
    pub fn negotiated_session_timeout(&self) -> Option<Duration> {
        self.inner.current().map(|s| s.client.session_timeout())
    }

    /// The root path (`/` + group).
    pub fn root(&self) -> &str {
        &self.inner.cfg.root
    }

    /// The node path of `url`: `root/encode(interface)/category/encode(url.to_full_string())`.
    pub fn entry_path(&self, url: &Url) -> String {
        self.inner.cfg.entry_path(url)
    }

    /// The category path (`root/encode(interface)/category`).
    pub fn category_path(&self, interface: &str, category: &str) -> String {
        self.inner.cfg.category_path(interface, category)
    }

    async fn create_entry(&self, session: &Session, url: &Url) -> Result<()> {
        let inner = &self.inner;
        let ctx = inner.ctx();
        let path = inner.cfg.entry_path(url);
        let parent = inner
            .cfg
            .category_path(url.service_interface(), url.category());
        let dynamic = url.is_dynamic();
        let mode = if dynamic {
            zk::CreateMode::Ephemeral
        } else {
            zk::CreateMode::Persistent
        };
        let acls = inner.acls();
        let options = mode.with_acls(acls);
        let ours = session.client.session_id().0;
        for _ in 0..4 {
            match ctx.call(session.client.create(&path, &[], &options)).await {
                Ok(_) => return Ok(()),
                Err(Fail::Zk(zk::Error::NoNode)) => {
                    let dir = zk::CreateMode::Persistent.with_acls(acls);
                    ctx.call(session.client.mkdir(&parent, &dir))
                        .await
                        .map_err(|f| ctx.error("create", &parent, f))?;
                }
                Err(Fail::Zk(zk::Error::NodeExists)) => {
                    let stat = ctx
                        .call(session.client.check_stat(&path))
                        .await
                        .map_err(|f| ctx.error("stat", &path, f))?;
                    let Some(stat) = stat else { continue };
                    let owner = stat.ephemeral_owner;
                    if (dynamic && owner == ours) || (!dynamic && owner == 0) {
                        return Ok(());
                    }
                    tracing::info!(
                        registry = %ctx.label, path, owner = format_args!("{owner:#x}"), ours = format_args!("{ours:#x}"),
                        "replacing an entry left by another session"
                    );
                    // One transaction: the other session's node goes and ours comes in its
                    // place, so a watcher never sees the entry missing in between.
                    let replace = async {
                        let mut multi = session.client.new_multi_writer();
                        multi.add_delete(&path, Some(stat.version))?;
                        multi.add_create(&path, &[], &options)?;
                        multi.commit().await.map_err(zk::Error::from)
                    };
                    match ctx.call(replace).await {
                        Ok(_) => return Ok(()),
                        // Changed or gone meanwhile: look again.
                        Err(Fail::Zk(
                            zk::Error::NoNode | zk::Error::BadVersion | zk::Error::NodeExists,
                        )) => {}
                        Err(f) => return Err(ctx.error("replace", &path, f)),
                    }
                }
                Err(f) => return Err(ctx.error("create", &path, f)),
            }
        }
        Err(Error::backend(
            &inner.url,
            format!("create {path}: the node kept changing under us; try again"),
            true,
        ))
    }
}

#[async_trait]
impl Registry for ZookeeperRegistry {
    fn url(&self) -> &Url {
        &self.inner.url
    }

    fn is_available(&self) -> bool {
        !self.inner.destroyed.load(Ordering::Acquire)
            && self.inner.available.load(Ordering::Acquire)
    }

    async fn register(&self, url: &Url) -> Result<()> {
        self.inner.alive()?;
        registry_core::check_accepts(&self.inner.url, url)?;
        let session = self.inner.session()?;
        self.create_entry(&session, url).await
    }

    /// Deletes the entry only when one of our sessions owns it (or no session does: a
    /// persistent `dynamic=false` entry), with the version just read. An entry another
    /// session owns is left alone: it was registered again elsewhere with the same URL (a
    /// restarted instance on the same host:port), and this unregister came late.
    async fn unregister(&self, url: &Url) -> Result<()> {
        let session = self.inner.session()?;
        let ctx = self.inner.ctx();
        let path = self.inner.cfg.entry_path(url);
        for _ in 0..4 {
            let stat = match ctx.call(session.client.check_stat(&path)).await {
                Ok(Some(stat)) => stat,
                Ok(None) => return Ok(()),
                Err(f) => return Err(ctx.error("stat", &path, f)),
            };
            let owner = stat.ephemeral_owner;
            if owner != 0 && !self.inner.is_ours(owner) {
                tracing::info!(
                    registry = %ctx.label, path, owner = format_args!("{owner:#x}"),
                    "unregister left an entry another session registered with the same URL"
                );
                return Ok(());
            }
            match ctx
                .call(session.client.delete(&path, Some(stat.version)))
                .await
            {
                Ok(()) | Err(Fail::Zk(zk::Error::NoNode)) => return Ok(()),
                Err(Fail::Zk(zk::Error::BadVersion)) => continue,
                Err(f) => return Err(ctx.error("delete", &path, f)),
            }
        }
        Err(Error::backend(
            &self.inner.url,
            format!("delete {path}: the node kept changing under us; try again"),
            true,
        ))
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        inner.session()?;
        let key = (url.clone(), listener_id(&listener));
        let wildcard = url.service_interface() == ANY_VALUE;
        let (sub, existing) = {
            let mut st = lock(&inner.state);
            // Checked under the lock destroy holds when it sets `destroyed` and drains.
            inner.alive()?;
            match st.subs.get(&key) {
                Some(sub) => (sub.clone(), true),
                None => {
                    let sub = Arc::new(Sub {
                        key: key.clone(),
                        categories: url.categories(),
                        wildcard,
                        delivery: Arc::new(Delivery::for_listener(
                            listener,
                            DeliveryOptions {
                                empty_protection: inner.cfg.empty_protection,
                                label: url.to_redacted_string(),
                            },
                        )),
                        active: AtomicBool::new(true),
                        id: Mutex::new(None),
                        attached: Mutex::new((HashSet::new(), Vec::new())),
                    });
                    st.subs.insert(key.clone(), sub.clone());
                    (sub, false)
                }
            }
        };
        let result = if wildcard {
            let rx = {
                let mut st = lock(&inner.state);
                let State { root, retiring, .. } = &mut *st;
                let entry = root.get_or_insert_with(|| RootEntry {
                    root: Arc::new(RootWatch {
                        data: Mutex::new(RootData {
                            generation: 0,
                            listed: false,
                            subs: Vec::new(),
                        }),
                    }),
                    task: None,
                });
                {
                    let mut d = lock(&entry.root.data);
                    if !d.subs.iter().any(|s| Arc::ptr_eq(s, &sub)) {
                        d.subs.push(sub.clone());
                    }
                }
                send_cmd(inner.root_task(retiring, entry), false, false)
            };
            answer(&inner.cfg.label, &inner.cfg.root, rx).await
        } else {
            // Subscribing again (the reliability layer does after a new session) reads
            // again whatever is not armed and read on the current session.
            let force = existing && !inner.is_ready(&sub);
            inner
                .attach_service(&sub, url.service_interface(), force)
                .await
        };
        if let Err(e) = result {
            if !existing {
                inner.remove_sub(&key).await;
            }
            return Err(e);
        }
        let ready = {
            // Every scope it needs is read: the keeper gives it its first lists now.
            let mut id = lock(&sub.id);
            if id.is_none() && sub.active.load(Ordering::Acquire) {
                *id = Some(inner.keeper.subscribe(url, sub.delivery.clone()));
            }
            !sub.active.load(Ordering::Acquire) || id.is_some_and(|id| inner.keeper.is_ready(id))
        };
        if !ready {
            // A read the keeper did not take is answered with an error (see the tasks
            // module), so this is not expected; but returning now would break the promise
            // that the first lists were delivered.
            tracing::warn!(registry = %inner.cfg.label, subscription = %url.to_redacted_string(), "a subscribe's reads were answered but its first lists are not ready; failing it");
            if !existing {
                inner.remove_sub(&key).await;
            }
            return Err(Error::Unavailable {
                registry: inner.cfg.label.clone(),
                reason: format!(
                    "the first lists of {} were not read on the current session; try again",
                    url.to_redacted_string()
                ),
            });
        }
        sub.delivery.flush_handle().await;
        Ok(())
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        self.inner.alive()?;
        self.inner
            .remove_sub(&(url.clone(), listener_id(listener)))
            .await;
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let inner = &self.inner;
        let session = inner.session()?;
        if let Some(held) = inner.held(url, &session) {
            return Ok(held);
        }
        let services = if url.service_interface() == ANY_VALUE {
            let mut names: Vec<String> = match inner
                .ctx()
                .read_children(&session.client, &inner.cfg.root, false, None)
                .await
            {
                Ok((n, _)) => n.iter().filter_map(|n| decode(n).ok()).collect(),
                Err(Fail::Zk(zk::Error::NoNode)) => Vec::new(),
                Err(f) => return Err(inner.ctx().error("list children of", &inner.cfg.root, f)),
            };
            names.sort();
            names
        } else {
            vec![url.service_interface().to_owned()]
        };
        let mut out = Vec::new();
        for service in &services {
            for category in url.categories() {
                let path = inner.cfg.category_path(service, &category);
                let found = inner.list(&session, &path).await?;
                out.extend(found.into_iter().filter(|u| is_match(url, u)));
            }
        }
        Ok(out)
    }

    async fn destroy(&self) {
        let inner = &self.inner;
        let (subs, tasks) = {
            let mut st = lock(&inner.state);
            if inner.destroyed.swap(true, Ordering::AcqRel) {
                return;
            }
            let subs: Vec<Arc<Sub>> = st.subs.drain().map(|(_, s)| s).collect();
            let mut tasks: Vec<JoinHandle<()>> = st
                .watches
                .drain()
                .filter_map(|(_, e)| e.task.map(|t| t.handle))
                .collect();
            tasks.extend(st.root.take().and_then(|r| r.task.map(|t| t.handle)));
            tasks.extend(st.retiring.drain().map(|(_, h)| h));
            (subs, tasks)
        };
        inner.available.store(false, Ordering::Release);
        // Calls in flight (each holds the client) end now.
        inner.closing.send_replace(true);
        let background: Vec<JoinHandle<()>> = lock(&inner.background).drain(..).collect();
        for h in tasks.iter().chain(background.iter()) {
            h.abort();
        }
        for h in tasks.into_iter().chain(background) {
            let _ = h.await;
        }
        for sub in &subs {
            let id = {
                let mut id = lock(&sub.id);
                sub.active.store(false, Ordering::Release);
                id.take()
            };
            if let Some(id) = id {
                inner.keeper.unsubscribe(id);
            }
            sub.delivery.close().await;
        }
        // zookeeper-client 0.11 has no `close()`: dropping the last client closes the
        // session, and the server deletes our ephemeral entries at once. This is the last
        // one: tasks hold it weakly (and were stopped above), calls in flight were ended by
        // `closing`, and no task or session can be made after `destroyed` was set. Wait (up
        // to `timeout`) until the close went through.
        let session = lock(&inner.session).take();
        if let Some(session) = session {
            let mut states = session.client.state_watcher();
            drop(session);
            let closed = tokio::time::timeout(inner.cfg.timeout, async {
                loop {
                    if states.peek_state().is_terminated() {
                        return;
                    }
                    states.changed().await;
                }
            })
            .await;
            if closed.is_err() {
                tracing::warn!(registry = %inner.cfg.label, "the ZooKeeper session did not close in time; it will expire");
            }
        }
        tracing::debug!(registry = %inner.cfg.label, "zookeeper registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use registry_test_servers::{Kind, shared_address};

    use super::*;

    /// A listing of the root by the task of an older session, after a newer task took the
    /// root over: `Scope::Root` is not marked loaded, and the task must not answer that the
    /// services were listed (an `interface=*` subscribe would return without its lists).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_a_newer_task_took_over_is_not_reported_as_listed() {
        let Some(addr) = shared_address(Kind::Zookeeper, "a_listing_a_newer_task_took_over") else {
            return;
        };
        let url = format!(
            "zookeeper://{addr}?group={}",
            registry_core::testkit::unique_service("superseded-root")
        );
        let registry = ZookeeperRegistry::new(url.parse().expect("url"))
            .await
            .expect("registry");
        let inner = registry.inner.clone();
        let session = inner.current().expect("a session");
        let root = Arc::new(RootWatch {
            data: Mutex::new(RootData {
                // A task of the next generation feeds the root now.
                generation: session.generation + 1,
                listed: false,
                subs: Vec::new(),
            }),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let old = tokio::spawn(tasks::run(
            Job::Root {
                root,
                host: Arc::new(Host(Arc::downgrade(&inner))),
            },
            Arc::downgrade(&session.client),
            session.generation,
            rx,
            inner.ctx(),
        ));
        let said = answer("test", &inner.cfg.root, send_cmd(Some(tx), false, false)).await;
        assert!(
            said.is_err(),
            "the old task said the services were listed (root loaded: {})",
            inner.keeper.is_loaded(&Scope::Root)
        );
        assert!(!inner.keeper.is_loaded(&Scope::Root));
        tokio::time::timeout(Duration::from_secs(5), old)
            .await
            .expect("the old task ended")
            .expect("the old task did not panic");
        drop(session);
        registry.destroy().await;
    }
}
