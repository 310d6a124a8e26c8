//! [`ZookeeperRegistry`]: one ZooKeeper session per registry, one persistent recursive watch
//! per category path (shared by every subscription on it), and a watch on the root for
//! `interface=*` subscriptions.
//!
//! Tasks:
//! - one *watch task* per watched path and session: it owns the [`zk::PersistentWatcher`],
//!   applies created/deleted events to the path's list, answers re-read requests, and
//!   pushes full lists to the subscriptions' [`Delivery`]s (never calls a listener);
//! - one *root task* while an `interface=*` subscription exists: it lists the services and
//!   attaches new ones to the wildcard subscriptions;
//! - one *monitor* per session: it turns session states into [`RegistryEvent`]s, re-reads
//!   every watched path after a reconnect, and starts a new session when one expires;
//! - a *connector* while there is no session (`check=false` start, or after an expiry).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::url::{ANY_VALUE, INTERFACE_KEY};
use registry_core::{
    Error, Notification, NotifyListener, Registry, RegistryEvent, Result, Source, Url, decode,
    is_match, listener_id,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

use crate::config::Config;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failed ZooKeeper call: the client's error, or our request timeout.
#[derive(Debug)]
enum Fail {
    Zk(zk::Error),
    Timeout(Duration),
}

/// What the tasks need to know about the registry, without holding it.
#[derive(Clone)]
struct Ctx {
    label: String,
    root: String,
    timeout: Duration,
}

impl Ctx {
    async fn call<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<T, Fail>
    where
        T: Send,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Fail::Zk(e)),
            Err(_) => Err(Fail::Timeout(self.timeout)),
        }
    }

    /// A registry error that names the registry, the operation and the path.
    fn error(&self, op: &str, path: &str, fail: Fail) -> Error {
        let e = match fail {
            Fail::Timeout(after) => {
                return Error::Timeout {
                    operation: format!("zookeeper {op} {path} on {}", self.label),
                    after,
                };
            }
            Fail::Zk(e) => e,
        };
        let reason = format!("{op} {path}: {e}");
        match e {
            zk::Error::ConnectionLoss
            | zk::Error::SessionExpired
            | zk::Error::SessionMoved
            | zk::Error::NoHosts
            | zk::Error::Timeout
            | zk::Error::Throttled
            | zk::Error::ClientClosed => Error::Unavailable {
                registry: self.label.clone(),
                reason,
            },
            zk::Error::NoAuth | zk::Error::AuthFailed => Error::AccessDenied {
                registry: self.label.clone(),
                reason,
            },
            zk::Error::UnmarshalError { .. } | zk::Error::MarshallingError
                if op == "list children of" =>
            {
                Error::TooLarge {
                    what: "the child list".into(),
                    path: path.to_owned(),
                    reason: format!(
                        "the reply could not be read ({e}); remove stale entries or split the service"
                    ),
                }
            }
            zk::Error::BadArguments(_)
            | zk::Error::InvalidAcl
            | zk::Error::NoChildrenForEphemerals
            | zk::Error::Unimplemented
            | zk::Error::QuotaExceeded => Error::Backend {
                registry: self.label.clone(),
                message: reason,
                retryable: false,
                source: Some(Box::new(e)),
            },
            _ => Error::Backend {
                registry: self.label.clone(),
                message: reason,
                retryable: true,
                source: Some(Box::new(e)),
            },
        }
    }
}

/// The current session.
#[derive(Clone)]
struct Session {
    client: zk::Client,
    generation: u64,
}

enum Cmd {
    /// Read the list again, push it, then answer.
    Reread(oneshot::Sender<Result<()>>),
    /// Drop the watch and add it again, then re-read (after a reconnect of the same session).
    ///
    /// zookeeper-client 0.11.2 re-sends persistent watches with the old `SetWatches` request,
    /// which cannot carry them (`resend_watches` computes `index.max(index)` where it means
    /// `index.max(i)`), so after a reconnect the server no longer knows them. Adding them
    /// again ourselves works with any client version.
    Rearm(oneshot::Sender<Result<()>>),
}

impl Cmd {
    fn into_ack(self) -> oneshot::Sender<Result<()>> {
        match self {
            Cmd::Reread(a) | Cmd::Rearm(a) => a,
        }
    }
}

struct TaskRef {
    generation: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    handle: JoinHandle<()>,
}

/// One subscription.
struct Sub {
    url: Url,
    categories: Vec<String>,
    wildcard: bool,
    delivery: Delivery,
    active: AtomicBool,
    /// Services attached (wildcard: every service seen) and the watched paths it is on.
    attached: Mutex<(HashSet<String>, Vec<String>)>,
    /// The last list pushed per (service, category), so an unchanged list is not pushed again.
    last: Mutex<LastPushed>,
}

/// (service, category) -> the list last pushed.
type LastPushed = HashMap<(String, String), Arc<[Url]>>;

impl Sub {
    fn push(&self, service: &str, category: &str, data: &WatchData) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut urls: Vec<Url> = data
            .children
            .values()
            .flatten()
            .filter(|u| is_match(&self.url, u))
            .cloned()
            .collect();
        if urls.is_empty() {
            let base = if self.wildcard {
                self.url
                    .clone()
                    .with_path(service)
                    .with_parameter(INTERFACE_KEY, service)
            } else {
                self.url.clone()
            };
            urls.push(base.to_empty_marker(category));
        }
        let urls: Arc<[Url]> = urls.into();
        {
            let mut last = lock(&self.last);
            let key = (service.to_owned(), category.to_owned());
            if last.get(&key) == Some(&urls) {
                return;
            }
            last.insert(key, urls.clone());
        }
        self.delivery.push(Notification::new(
            service,
            category,
            urls,
            data.revision,
            Source::Live,
        ));
    }
}

/// The list of one category path.
struct WatchData {
    /// Node name -> the URL it decodes to (`None`: skipped, already warned about).
    children: BTreeMap<String, Option<Url>>,
    /// Never goes back: the parent's `pzxid` on a read, the event's zxid (3.9+) or one more
    /// than before on an event.
    revision: u64,
    /// The session generation of the task allowed to change this list.
    generation: u64,
    subs: Vec<Arc<Sub>>,
}

struct Watch {
    path: String,
    service: String,
    category: String,
    data: Mutex<WatchData>,
}

struct WatchEntry {
    watch: Arc<Watch>,
    task: Option<TaskRef>,
}

fn decode_child(path: &str, name: &str) -> Option<Url> {
    match Url::from_encoded(name) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(path, child = name, error = %e, "skipped a child node that is not an encoded URL");
            None
        }
    }
}

fn is_terminal(ev: &zk::WatchedEvent) -> bool {
    ev.event_type == zk::EventType::Session && ev.session_state.is_terminated()
}

impl Watch {
    /// Applies one node event; whether the list changed.
    fn apply(&self, data: &mut WatchData, ev: &zk::WatchedEvent) -> bool {
        let Some(rest) = ev.path.strip_prefix(self.path.as_str()) else {
            return false;
        };
        let changed = if rest.is_empty() {
            // The category node itself: deleted means no children.
            ev.event_type == zk::EventType::NodeDeleted && {
                let had = !data.children.is_empty();
                data.children.clear();
                had
            }
        } else {
            match rest.strip_prefix('/') {
                Some(child) if !child.is_empty() && !child.contains('/') => match ev.event_type {
                    zk::EventType::NodeCreated => {
                        if data.children.contains_key(child) {
                            false
                        } else {
                            let url = decode_child(&self.path, child);
                            data.children.insert(child.to_owned(), url);
                            true
                        }
                    }
                    zk::EventType::NodeDeleted => data.children.remove(child).is_some(),
                    _ => false,
                },
                _ => false,
            }
        };
        if changed {
            data.revision = (data.revision + 1).max(u64::try_from(ev.zxid).unwrap_or(0));
        }
        changed
    }

    /// Applies a batch of events from the task of `generation`, then pushes once.
    fn apply_batch(&self, generation: u64, batch: &[zk::WatchedEvent]) {
        let mut data = lock(&self.data);
        if data.generation != generation {
            return;
        }
        let mut changed = false;
        for ev in batch {
            if ev.event_type != zk::EventType::Session {
                changed |= self.apply(&mut data, ev);
            }
        }
        if changed {
            self.push_all(&data);
        }
    }

    /// Replaces the list with a read (`None`: the node does not exist), applies the events
    /// that arrived with it, and pushes to every subscription.
    fn replace(
        &self,
        generation: u64,
        read: Option<(Vec<String>, i64)>,
        batch: &[zk::WatchedEvent],
    ) {
        let mut data = lock(&self.data);
        if data.generation != generation {
            return;
        }
        let (names, pzxid) = read.unwrap_or_default();
        let mut old = std::mem::take(&mut data.children);
        for name in names {
            let url = match old.remove(&name) {
                Some(u) => u,
                None => decode_child(&self.path, &name),
            };
            data.children.insert(name, url);
        }
        data.revision = data.revision.max(u64::try_from(pzxid).unwrap_or(0));
        for ev in batch {
            if ev.event_type != zk::EventType::Session {
                self.apply(&mut data, ev);
            }
        }
        self.push_all(&data);
    }

    fn push_all(&self, data: &WatchData) {
        for sub in &data.subs {
            sub.push(&self.service, &self.category, data);
        }
    }
}

/// Takes every event that is already waiting, stopping after a terminal one.
fn drain(watcher: &mut zk::PersistentWatcher, batch: &mut Vec<zk::WatchedEvent>) {
    if batch.last().is_some_and(is_terminal) {
        return;
    }
    while let Some(ev) = watcher.changed().now_or_never() {
        let end = is_terminal(&ev);
        batch.push(ev);
        if end {
            return;
        }
    }
}

async fn arm(
    ctx: &Ctx,
    client: &zk::Client,
    path: &str,
    mode: zk::AddWatchMode,
) -> Result<zk::PersistentWatcher> {
    ctx.call(client.watch(path, mode))
        .await
        .map_err(|f| ctx.error("watch", path, f))
}

fn refuse_all(rx: &mut mpsc::UnboundedReceiver<Cmd>, make: impl Fn() -> Error) {
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        let _ = cmd.into_ack().send(Err(make()));
    }
}

/// The watch task of one category path for one session.
async fn run_watch(
    watch: Arc<Watch>,
    client: zk::Client,
    generation: u64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ctx: Ctx,
) {
    // A re-arm request waiting for its answer (given after the re-read).
    let mut rearmed: Option<oneshot::Sender<Result<()>>> = None;
    'arm: loop {
        // The previous watcher (if any) was dropped when the last iteration ended, so its
        // removal reaches the server before this new watch.
        let mut watcher = match arm(
            &ctx,
            &client,
            &watch.path,
            zk::AddWatchMode::PersistentRecursive,
        )
        .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(registry = %ctx.label, path = %watch.path, error = %e, "cannot watch");
                let msg = e.to_string();
                let refuse = || Error::Unavailable {
                    registry: ctx.label.clone(),
                    reason: msg.clone(),
                };
                if let Some(ack) = rearmed.take() {
                    let _ = ack.send(Err(refuse()));
                }
                refuse_all(&mut rx, refuse);
                return;
            }
        };
        if let Some(ack) = rearmed.take() {
            let (result, end) = reread_watch(&watch, &client, generation, &mut watcher, &ctx).await;
            let _ = ack.send(result);
            if end {
                break;
            }
        }
        loop {
            tokio::select! {
                ev = watcher.changed() => {
                    let mut batch = vec![ev];
                    drain(&mut watcher, &mut batch);
                    watch.apply_batch(generation, &batch);
                    if batch.last().is_some_and(is_terminal) {
                        break 'arm;
                    }
                }
                cmd = rx.recv() => match cmd {
                    None => break 'arm,
                    Some(Cmd::Rearm(ack)) => {
                        rearmed = Some(ack);
                        continue 'arm;
                    }
                    Some(Cmd::Reread(ack)) => {
                        let (result, end) =
                            reread_watch(&watch, &client, generation, &mut watcher, &ctx).await;
                        let _ = ack.send(result);
                        if end {
                            break 'arm;
                        }
                    }
                }
            }
        }
    }
    tracing::debug!(registry = %ctx.label, path = %watch.path, "watch task ended");
}

/// Reads the list, applies the events that came meanwhile, pushes. Returns the result and
/// whether the session ended.
async fn reread_watch(
    watch: &Watch,
    client: &zk::Client,
    generation: u64,
    watcher: &mut zk::PersistentWatcher,
    ctx: &Ctx,
) -> (Result<()>, bool) {
    let read = ctx.call(client.get_children(&watch.path)).await;
    // Events that came before the reply are already in the read; applying them again on
    // top of it leaves the same list once all of them are applied, which `drain` ensures
    // (they are all queued by the time the reply is seen).
    let mut batch = Vec::new();
    drain(watcher, &mut batch);
    let result = match read {
        Ok((names, stat)) => {
            watch.replace(generation, Some((names, stat.pzxid)), &batch);
            Ok(())
        }
        Err(Fail::Zk(zk::Error::NoNode)) => {
            watch.replace(generation, None, &batch);
            Ok(())
        }
        Err(f) => {
            watch.apply_batch(generation, &batch);
            Err(ctx.error("list children of", &watch.path, f))
        }
    };
    if let Err(e) = &result {
        tracing::warn!(registry = %ctx.label, path = %watch.path, error = %e, "cannot read the child list");
    }
    (result, batch.last().is_some_and(is_terminal))
}

/// The root watch of `interface=*` subscriptions.
struct RootWatch {
    data: Mutex<RootData>,
}

struct RootData {
    generation: u64,
    subs: Vec<Arc<Sub>>,
}

struct RootEntry {
    root: Arc<RootWatch>,
    task: Option<TaskRef>,
}

/// The root task for one session.
async fn run_root(
    registry: Weak<Inner>,
    root: Arc<RootWatch>,
    client: zk::Client,
    generation: u64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ctx: Ctx,
) {
    let mut rearmed: Option<oneshot::Sender<Result<()>>> = None;
    'arm: loop {
        let mut watcher = match arm(&ctx, &client, &ctx.root, zk::AddWatchMode::Persistent).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(registry = %ctx.label, path = %ctx.root, error = %e, "cannot watch the root");
                let msg = e.to_string();
                let refuse = || Error::Unavailable {
                    registry: ctx.label.clone(),
                    reason: msg.clone(),
                };
                if let Some(ack) = rearmed.take() {
                    let _ = ack.send(Err(refuse()));
                }
                refuse_all(&mut rx, refuse);
                return;
            }
        };
        if let Some(ack) = rearmed.take() {
            let _ = ack.send(relist(&registry, &root, &client, generation, &ctx).await);
        }
        loop {
            tokio::select! {
                ev = watcher.changed() => {
                    let mut batch = vec![ev];
                    drain(&mut watcher, &mut batch);
                    if batch.iter().any(|e| e.event_type != zk::EventType::Session)
                        && let Err(e) = relist(&registry, &root, &client, generation, &ctx).await
                    {
                        tracing::warn!(registry = %ctx.label, error = %e, "cannot list the services");
                    }
                    if batch.last().is_some_and(is_terminal) {
                        break 'arm;
                    }
                }
                cmd = rx.recv() => match cmd {
                    None => break 'arm,
                    Some(Cmd::Rearm(ack)) => {
                        rearmed = Some(ack);
                        continue 'arm;
                    }
                    Some(Cmd::Reread(ack)) => {
                        let r = relist(&registry, &root, &client, generation, &ctx).await;
                        let _ = ack.send(r);
                    }
                }
            }
        }
    }
}

/// Lists the services under the root and attaches the new ones to every wildcard
/// subscription (each service's categories read in order).
async fn relist(
    registry: &Weak<Inner>,
    root: &RootWatch,
    client: &zk::Client,
    generation: u64,
    ctx: &Ctx,
) -> Result<()> {
    let names = match ctx.call(client.get_children(&ctx.root)).await {
        Ok((names, _)) => names,
        Err(Fail::Zk(zk::Error::NoNode)) => Vec::new(),
        Err(f) => return Err(ctx.error("list children of", &ctx.root, f)),
    };
    let mut services: Vec<String> = names
        .iter()
        .filter_map(|n| match decode(n) {
            Ok(s) if !s.is_empty() && s != ANY_VALUE => Some(s),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %ctx.root, child = %n, error = %e, "skipped a service node that does not decode");
                None
            }
        })
        .collect();
    services.sort();
    let subs = {
        let data = lock(&root.data);
        if data.generation != generation {
            return Ok(());
        }
        data.subs.clone()
    };
    let Some(inner) = registry.upgrade() else {
        return Ok(());
    };
    let mut first_error = None;
    for sub in subs {
        let jobs: Vec<_> = services
            .iter()
            .map(|svc| inner.attach_service(&sub, svc))
            .collect();
        let results = futures_util::future::join_all(
            jobs.into_iter().map(|j| reread_in_order(&ctx.label, j)),
        )
        .await;
        for r in results {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Asks each watch task in turn to re-read and push, waiting for each answer, so the
/// categories of a service are notified in order.
async fn reread_in_order(
    label: &str,
    targets: Vec<(String, Option<mpsc::UnboundedSender<Cmd>>)>,
) -> Result<()> {
    for (path, tx) in targets {
        wait_reread(label, &path, tx, false).await?;
    }
    Ok(())
}

/// Sends a re-read (or, with `rearm`, a re-arm and re-read) and waits for the answer.
async fn wait_reread(
    label: &str,
    path: &str,
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    rearm: bool,
) -> Result<()> {
    let stopped = || Error::Unavailable {
        registry: label.to_owned(),
        reason: format!("the watch on {path} is not running (no session)"),
    };
    let Some(tx) = tx else {
        return Err(stopped());
    };
    let (ack, answer) = oneshot::channel();
    let cmd = if rearm {
        Cmd::Rearm(ack)
    } else {
        Cmd::Reread(ack)
    };
    if tx.send(cmd).is_err() {
        return Err(stopped());
    }
    answer.await.unwrap_or_else(|_| Err(stopped()))
}

#[derive(Default)]
struct State {
    subs: HashMap<(Url, usize), Arc<Sub>>,
    watches: HashMap<String, WatchEntry>,
    root: Option<RootEntry>,
    /// Tasks of watches that were dropped and may still be ending, by path. A new task for
    /// the same path waits for the old one first: the old watcher's removal must reach the
    /// server before the new watch, or it would remove the new one (ZooKeeper removes
    /// persistent watches per path, ZOOKEEPER-4472).
    retiring: HashMap<String, JoinHandle<()>>,
}

/// Runs `task` once the retiring task of the same path (if any) has ended.
async fn after(previous: Option<JoinHandle<()>>, task: impl Future<Output = ()>) {
    if let Some(p) = previous {
        let _ = p.await;
    }
    task.await
}

struct Inner {
    url: Url,
    cfg: Config,
    events: broadcast::Sender<RegistryEvent>,
    destroyed: AtomicBool,
    available: AtomicBool,
    ever_connected: AtomicBool,
    generations: AtomicU64,
    session: Mutex<Option<Session>>,
    state: Mutex<State>,
    /// The monitor and connector tasks.
    background: Mutex<Vec<JoinHandle<()>>>,
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
    fn ctx(&self) -> Ctx {
        Ctx {
            label: self.cfg.label.clone(),
            root: self.cfg.root.clone(),
            timeout: self.cfg.timeout,
        }
    }

    fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.cfg.label.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn current(&self) -> Option<Session> {
        lock(&self.session).clone()
    }

    fn session(&self) -> Result<Session> {
        self.alive()?;
        self.current().ok_or_else(|| Error::Unavailable {
            registry: self.cfg.label.clone(),
            reason: format!(
                "no ZooKeeper session with {} yet (connecting in the background)",
                self.cfg.connect
            ),
        })
    }

    fn emit(&self, ev: RegistryEvent) {
        tracing::debug!(registry = %self.cfg.label, event = ?ev, "registry event");
        let _ = self.events.send(ev);
    }

    fn connector(&self) -> zk::Connector {
        let mut c = zk::Client::connector()
            .with_session_timeout(self.cfg.session_timeout)
            .with_connection_timeout(self.cfg.timeout);
        if let Some(auth) = &self.cfg.auth {
            c = c.with_auth("digest", auth.as_bytes());
        }
        c
    }

    fn acls(&self) -> zk::Acls<'static> {
        if self.cfg.auth.is_some() {
            zk::Acls::creator_all()
        } else {
            zk::Acls::anyone_all()
        }
    }

    async fn connect_once(&self) -> Result<zk::Client> {
        let connector = self.connector();
        match tokio::time::timeout(self.cfg.timeout, connector.connect(&self.cfg.connect)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(Error::Unavailable {
                registry: self.cfg.label.clone(),
                reason: format!("cannot connect to ZooKeeper at {}: {e}", self.cfg.connect),
            }),
            Err(_) => Err(Error::Unavailable {
                registry: self.cfg.label.clone(),
                reason: format!(
                    "cannot connect to ZooKeeper at {} within {:?}",
                    self.cfg.connect, self.cfg.timeout
                ),
            }),
        }
    }

    /// Makes `client` the current session and starts its monitor.
    fn install(self: &Arc<Self>, client: zk::Client) {
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(
            registry = %self.cfg.label,
            session = %client.session_id(),
            asked_ms = self.cfg.session_timeout.as_millis() as u64,
            negotiated_ms = client.session_timeout().as_millis() as u64,
            "ZooKeeper session established (the server clamps the session timeout to 2-20 ticks)"
        );
        let states = client.state_watcher();
        *lock(&self.session) = Some(Session { client, generation });
        self.available.store(true, Ordering::Release);
        let h = tokio::spawn(monitor(Arc::downgrade(self), states, generation));
        let mut bg = lock(&self.background);
        bg.retain(|h| !h.is_finished());
        bg.push(h);
    }

    /// The command channel of a watch's task on the current session, starting it if needed.
    fn watch_task(
        &self,
        retiring: &mut HashMap<String, JoinHandle<()>>,
        entry: &mut WatchEntry,
    ) -> Option<mpsc::UnboundedSender<Cmd>> {
        let session = self.current()?;
        if let Some(t) = &entry.task {
            if t.generation == session.generation && !t.tx.is_closed() {
                return Some(t.tx.clone());
            }
            t.handle.abort();
        }
        lock(&entry.watch.data).generation = session.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(after(
            retiring.remove(&entry.watch.path),
            run_watch(
                entry.watch.clone(),
                session.client,
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
            run_root(
                Arc::downgrade(self),
                entry.root.clone(),
                session.client,
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

    /// Puts `sub` on the watches of `service`'s categories (once); returns the watches to
    /// re-read, in the subscription's category order.
    fn attach_service(
        &self,
        sub: &Arc<Sub>,
        service: &str,
    ) -> Vec<(String, Option<mpsc::UnboundedSender<Cmd>>)> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        if !sub.active.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut attached = lock(&sub.attached);
        if !attached.0.insert(service.to_owned()) {
            return Vec::new();
        }
        let mut out = Vec::new();
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
                        data: Mutex::new(WatchData {
                            children: BTreeMap::new(),
                            revision: 0,
                            generation: 0,
                            subs: Vec::new(),
                        }),
                    }),
                    task: None,
                });
            lock(&entry.watch.data).subs.push(sub.clone());
            attached.1.push(path.clone());
            let tx = self.watch_task(&mut st.retiring, entry);
            out.push((path, tx));
        }
        out
    }

    /// Takes `sub` off every watch; drops the watches nobody needs any more.
    fn detach(&self, sub: &Arc<Sub>) {
        let mut st = lock(&self.state);
        sub.active.store(false, Ordering::Release);
        let paths = std::mem::take(&mut lock(&sub.attached).1);
        for path in paths {
            let empty = match st.watches.get(&path) {
                Some(e) => {
                    let mut d = lock(&e.watch.data);
                    d.subs.retain(|s| !Arc::ptr_eq(s, sub));
                    d.subs.is_empty()
                }
                None => false,
            };
            if empty
                && let Some(e) = st.watches.remove(&path)
                && let Some(t) = e.task
            {
                // Dropping the sender ends the task, which drops the watcher.
                st.retiring.retain(|_, h| !h.is_finished());
                st.retiring.insert(path, t.handle);
            }
        }
        if sub.wildcard {
            let empty = st.root.as_ref().is_some_and(|r| {
                let mut d = lock(&r.root.data);
                d.subs.retain(|s| !Arc::ptr_eq(s, sub));
                d.subs.is_empty()
            });
            if empty && let Some(t) = st.root.take().and_then(|r| r.task) {
                st.retiring.retain(|_, h| !h.is_finished());
                st.retiring.insert(self.cfg.root.clone(), t.handle);
            }
        }
    }

    async fn remove_sub(&self, key: &(Url, usize)) {
        let sub = lock(&self.state).subs.remove(key);
        if let Some(sub) = sub {
            self.detach(&sub);
            sub.delivery.close().await;
        }
    }

    /// Re-reads every watch and pushes the lists. Watches of a new session are armed by
    /// their new tasks; with `rearm` (a reconnect of the same session) the existing watches
    /// are dropped and added again first (see [`Cmd::Rearm`]).
    async fn reread_all(self: &Arc<Self>, rearm: bool) {
        let (targets, root) = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let State {
                watches,
                root,
                retiring,
                ..
            } = st;
            let targets: Vec<_> = watches
                .iter_mut()
                .map(|(path, e)| (path.clone(), self.watch_task(retiring, e)))
                .collect();
            let root = root.as_mut().map(|r| self.root_task(retiring, r));
            (targets, root)
        };
        let jobs = targets.into_iter().map(|(path, tx)| async move {
            (wait_reread(&self.cfg.label, &path, tx, rearm).await, path)
        });
        for (r, path) in futures_util::future::join_all(jobs).await {
            if let Err(e) = r {
                tracing::warn!(registry = %self.cfg.label, path, error = %e, "re-read failed");
            }
        }
        if let Some(tx) = root
            && let Err(e) = wait_reread(&self.cfg.label, &self.cfg.root, tx, rearm).await
        {
            tracing::warn!(registry = %self.cfg.label, error = %e, "re-listing the services failed");
        }
    }

    fn spawn_connector(self: &Arc<Self>) {
        let h = tokio::spawn(connector_loop(Arc::downgrade(self)));
        let mut bg = lock(&self.background);
        bg.retain(|h| !h.is_finished());
        bg.push(h);
    }

    async fn list(&self, session: &Session, path: &str) -> Result<Vec<Url>> {
        let ctx = self.ctx();
        match ctx.call(session.client.list_children(path)).await {
            Ok(names) => Ok(names.iter().filter_map(|n| decode_child(path, n)).collect()),
            Err(Fail::Zk(zk::Error::NoNode)) => Ok(Vec::new()),
            Err(f) => Err(ctx.error("list children of", path, f)),
        }
    }
}

/// Turns the session's states into events; replaces an expired session.
async fn monitor(registry: Weak<Inner>, mut states: zk::StateWatcher, generation: u64) {
    loop {
        let state = states.changed().await;
        let Some(inner) = registry.upgrade() else {
            return;
        };
        if inner.destroyed.load(Ordering::Acquire)
            || inner.generations.load(Ordering::Acquire) != generation
        {
            return;
        }
        match state {
            zk::SessionState::Disconnected => {
                inner.available.store(false, Ordering::Release);
                tracing::warn!(registry = %inner.cfg.label, "disconnected from ZooKeeper; the session may still be alive");
                inner.emit(RegistryEvent::Disconnected);
            }
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                inner.available.store(true, Ordering::Release);
                tracing::info!(registry = %inner.cfg.label, "reconnected to ZooKeeper with the same session; re-reading every watched list");
                inner.reread_all(true).await;
                inner.emit(RegistryEvent::Reconnected);
            }
            other => {
                inner.available.store(false, Ordering::Release);
                {
                    let mut s = lock(&inner.session);
                    if s.as_ref().is_some_and(|s| s.generation == generation) {
                        *s = None;
                    }
                }
                tracing::warn!(registry = %inner.cfg.label, state = %other, "the ZooKeeper session is lost; its ephemeral entries are gone; making a new session");
                inner.emit(RegistryEvent::SessionLost);
                inner.spawn_connector();
                return;
            }
        }
    }
}

/// Makes a session (retrying with backoff until it works or the registry is destroyed),
/// re-arms and re-reads every watch, then reports `Connected` or `NewSession`.
async fn connector_loop(registry: Weak<Inner>) {
    let mut pause = Duration::from_millis(100);
    let started = Instant::now();
    loop {
        let Some(inner) = registry.upgrade() else {
            return;
        };
        if inner.destroyed.load(Ordering::Acquire) {
            return;
        }
        match inner.connect_once().await {
            Ok(client) => {
                if inner.destroyed.load(Ordering::Acquire) {
                    return;
                }
                inner.install(client);
                inner.reread_all(false).await;
                let first = !inner.ever_connected.swap(true, Ordering::AcqRel);
                tracing::info!(registry = %inner.cfg.label, after_ms = started.elapsed().as_millis() as u64, first, "ZooKeeper session ready");
                inner.emit(if first {
                    RegistryEvent::Connected
                } else {
                    RegistryEvent::NewSession
                });
                return;
            }
            Err(e) => {
                tracing::warn!(registry = %inner.cfg.label, error = %e, retry_in = ?pause, "no ZooKeeper session yet");
            }
        }
        drop(inner);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
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
    /// [`Error::Unavailable`] when no session can be made within `timeout`; with
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
            session: Mutex::new(None),
            state: Mutex::new(State::default()),
            background: Mutex::new(Vec::new()),
            cfg,
        });
        if inner.cfg.check {
            let client = inner.connect_once().await?;
            inner.install(client);
            inner.ever_connected.store(true, Ordering::Release);
            inner.emit(RegistryEvent::Connected);
        } else {
            inner.spawn_connector();
        }
        Ok(ZookeeperRegistry { inner })
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
                    match ctx
                        .call(session.client.delete(&path, Some(stat.version)))
                        .await
                    {
                        Ok(())
                        | Err(Fail::Zk(zk::Error::NoNode))
                        | Err(Fail::Zk(zk::Error::BadVersion)) => {}
                        Err(f) => return Err(ctx.error("delete", &path, f)),
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

    async fn unregister(&self, url: &Url) -> Result<()> {
        let session = self.inner.session()?;
        let ctx = self.inner.ctx();
        let path = self.inner.cfg.entry_path(url);
        match ctx.call(session.client.delete(&path, None)).await {
            Ok(()) | Err(Fail::Zk(zk::Error::NoNode)) => Ok(()),
            Err(f) => Err(ctx.error("delete", &path, f)),
        }
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        inner.session()?;
        let key = (url.clone(), listener_id(&listener));
        let wildcard = url.service_interface() == ANY_VALUE;
        let sub = {
            let mut st = lock(&inner.state);
            if st.subs.contains_key(&key) {
                return Ok(());
            }
            let sub = Arc::new(Sub {
                url: url.clone(),
                categories: url.categories(),
                wildcard,
                delivery: Delivery::spawn(
                    listener,
                    DeliveryOptions {
                        empty_protection: inner.cfg.empty_protection,
                        label: url.to_full_string(),
                    },
                ),
                active: AtomicBool::new(true),
                attached: Mutex::new((HashSet::new(), Vec::new())),
                last: Mutex::new(HashMap::new()),
            });
            st.subs.insert(key.clone(), sub.clone());
            sub
        };
        let result = if wildcard {
            let tx = {
                let mut st = lock(&inner.state);
                let State { root, retiring, .. } = &mut *st;
                let entry = root.get_or_insert_with(|| RootEntry {
                    root: Arc::new(RootWatch {
                        data: Mutex::new(RootData {
                            generation: 0,
                            subs: Vec::new(),
                        }),
                    }),
                    task: None,
                });
                lock(&entry.root.data).subs.push(sub.clone());
                inner.root_task(retiring, entry)
            };
            wait_reread(&inner.cfg.label, &inner.cfg.root, tx, false).await
        } else {
            let targets = inner.attach_service(&sub, url.service_interface());
            reread_in_order(&inner.cfg.label, targets).await
        };
        if let Err(e) = result {
            inner.remove_sub(&key).await;
            return Err(e);
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
        let services = if url.service_interface() == ANY_VALUE {
            let mut names: Vec<String> = match inner
                .ctx()
                .call(session.client.list_children(&inner.cfg.root))
                .await
            {
                Ok(n) => n.iter().filter_map(|n| decode(n).ok()).collect(),
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
        if inner.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.available.store(false, Ordering::Release);
        let (subs, tasks) = {
            let mut st = lock(&inner.state);
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
        let background: Vec<JoinHandle<()>> = lock(&inner.background).drain(..).collect();
        for h in tasks.iter().chain(background.iter()) {
            h.abort();
        }
        for h in tasks.into_iter().chain(background) {
            let _ = h.await;
        }
        for sub in &subs {
            sub.active.store(false, Ordering::Release);
            sub.delivery.close().await;
        }
        // Dropping the last client closes the session: the server deletes our ephemeral
        // entries at once. Wait (up to `timeout`) until the close went through.
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
