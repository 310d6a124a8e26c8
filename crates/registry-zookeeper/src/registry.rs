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
use registry_core::url::ANY_VALUE;
use registry_core::{
    Error, Notification, NotifyListener, Registry, RegistryEvent, Result, Source, Url, decode,
    is_match, listener_id,
};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
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
    /// Bounds how many watches arm and read at once.
    permits: Arc<Semaphore>,
    /// Becomes `true` when the registry is destroyed: calls in flight end at once.
    closing: watch::Receiver<bool>,
}

impl Ctx {
    async fn call<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<T, Fail>
    where
        T: Send,
    {
        let mut closing = self.closing.clone();
        tokio::select! {
            r = tokio::time::timeout(self.timeout, fut) => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Fail::Zk(e)),
                Err(_) => Err(Fail::Timeout(self.timeout)),
            },
            _ = closing.wait_for(|c| *c) => Err(Fail::Zk(zk::Error::ClientClosed)),
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

/// The first pause before a failed arm or read of a watch is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two attempts to arm or read a watch.
const RETRY_MAX: Duration = Duration::from_secs(3);
/// How many watches arm and read at once (after a reconnect every watch does).
const READ_CONCURRENCY: usize = 8;

/// Exponential backoff from [`RETRY_FIRST`] to [`RETRY_MAX`].
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: RETRY_FIRST }
    }

    fn reset(&mut self) {
        self.next = RETRY_FIRST;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(RETRY_MAX);
        d
    }
}

/// The current session.
#[derive(Clone)]
struct Session {
    /// The only owner of the client besides operations in flight: tasks hold it weakly, so
    /// dropping this closes the session.
    client: Arc<zk::Client>,
    generation: u64,
}

/// A request to a watch (or root) task: read the list again (after arming the watch when
/// needed) and push it.
struct Cmd {
    /// Drop the watch and add it again first (after a reconnect of the same session).
    ///
    /// zookeeper-client 0.11.2 re-sends persistent watches with the old `SetWatches` request,
    /// which cannot carry them (`resend_watches` computes `index.max(index)` where it means
    /// `index.max(i)`), so after a reconnect the server no longer knows them. Adding them
    /// again ourselves works with any client version.
    rearm: bool,
    /// Answer only once the watch is armed and read (or no longer needed); otherwise the
    /// answer is the result of the next attempt. Either way the task keeps trying after a
    /// failure, with backoff, until it succeeds or its session ends.
    until_ok: bool,
    /// A subscription that starts receiving this list with this read (see [`WatchData::joining`]).
    admit: Option<Arc<Sub>>,
    ack: oneshot::Sender<Result<()>>,
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
    /// Services attached (their first read succeeded; wildcard: every service seen) and the
    /// watched paths the subscription is on.
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
            urls.push(self.url.to_empty_marker_for(service, category));
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
    /// Whether a read of this generation succeeded. Until then events are applied but
    /// nothing is pushed: the list may be the previous session's, or empty.
    primed: bool,
    /// Whether the watch is armed and its list read, with no read pending.
    ready: bool,
    /// Subscriptions that receive this list.
    subs: Vec<Arc<Sub>>,
    /// Subscriptions waiting for their first read of this list (asked with
    /// [`Cmd::admit`]), so their first notifications come in category order and complete.
    joining: Vec<Arc<Sub>>,
}

impl WatchData {
    fn has(&self, sub: &Arc<Sub>) -> bool {
        self.subs
            .iter()
            .chain(&self.joining)
            .any(|s| Arc::ptr_eq(s, sub))
    }
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

    /// Applies a batch of events from the task of `generation`, then pushes once (only when
    /// a read of this generation succeeded before).
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
        if changed && data.primed {
            self.push_all(&data);
        }
    }

    /// Replaces the list with a read (`None`: the node does not exist), applies the events
    /// that arrived with it, admits the joining subscriptions in `admit`, and pushes to every
    /// subscription.
    fn replace(
        &self,
        generation: u64,
        read: Option<(Vec<String>, i64)>,
        batch: &[zk::WatchedEvent],
        admit: &[Arc<Sub>],
    ) {
        let mut data = lock(&self.data);
        if data.generation != generation {
            return;
        }
        let (names, pzxid) = read.unwrap_or_default();
        let mut old = std::mem::take(&mut data.children);
        let mut changed = old.len() != names.len();
        for name in names {
            let url = match old.remove(&name) {
                Some(u) => u,
                None => {
                    changed = true;
                    decode_child(&self.path, &name)
                }
            };
            data.children.insert(name, url);
        }
        let read_revision = u64::try_from(pzxid).unwrap_or(0);
        data.revision = if read_revision > data.revision {
            read_revision
        } else if changed {
            // Our own revisions ran ahead of the server's (several events per zxid): a
            // changed list still gets a newer revision.
            data.revision + 1
        } else {
            data.revision
        };
        for ev in batch {
            if ev.event_type != zk::EventType::Session {
                self.apply(&mut data, ev);
            }
        }
        data.primed = true;
        for sub in admit {
            if let Some(i) = data.joining.iter().position(|s| Arc::ptr_eq(s, sub)) {
                let s = data.joining.swap_remove(i);
                data.subs.push(s);
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

/// The next event of `watcher`, or never when there is none.
async fn next_event(watcher: &mut Option<zk::PersistentWatcher>) -> zk::WatchedEvent {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

/// The outcome of one attempt of a watch or root task.
enum Attempt {
    Done,
    Failed(Error),
    /// The session ended: the task stops (a task of the next session takes over).
    SessionEnded,
}

/// Why a watch or root task stopped.
enum End {
    /// Nobody needs the watch any more.
    Dropped,
    /// The session ended.
    Session,
}

/// What a watch or root task keeps between attempts: the requests waiting for an answer
/// and when to try again.
struct Pending {
    label: String,
    path: String,
    waiters: Vec<Cmd>,
    /// Try now (a request came).
    now: bool,
    /// Try again then (the last attempt failed).
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
    failures: u32,
}

impl Pending {
    fn new(ctx: &Ctx, path: &str) -> Pending {
        Pending {
            label: ctx.label.clone(),
            path: path.to_owned(),
            waiters: Vec::new(),
            now: false,
            retry_at: None,
            backoff: Backoff::new(),
            failures: 0,
        }
    }

    fn take(&mut self, cmd: Cmd) {
        if cmd.rearm {
            self.backoff.reset();
        }
        self.now = true;
        self.waiters.push(cmd);
    }

    /// Whether an attempt is due (`work`: arming or reading is still needed).
    fn due(&self, work: bool) -> bool {
        work && self.now
    }

    fn admitted(&self) -> Vec<Arc<Sub>> {
        self.waiters
            .iter()
            .filter_map(|w| w.admit.clone())
            .collect()
    }

    fn succeeded(&mut self) {
        self.now = false;
        self.retry_at = None;
        self.backoff.reset();
        if self.failures > 0 {
            tracing::info!(registry = %self.label, path = %self.path, attempts = self.failures + 1, "watch armed and read after retrying");
        }
        self.failures = 0;
        for w in self.waiters.drain(..) {
            let _ = w.ack.send(Ok(()));
        }
    }

    fn failed(&mut self, e: &Error) {
        self.now = false;
        self.failures += 1;
        let pause = self.backoff.next();
        self.retry_at = Some(tokio::time::Instant::now() + pause);
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            tracing::warn!(registry = %self.label, path = %self.path, error = %e, failures = self.failures, retry_in = ?pause, "cannot watch or read; retrying");
        } else {
            tracing::debug!(registry = %self.label, path = %self.path, error = %e, failures = self.failures, retry_in = ?pause, "cannot watch or read; retrying");
        }
        let (answer, keep): (Vec<Cmd>, Vec<Cmd>) =
            self.waiters.drain(..).partition(|w| !w.until_ok);
        self.waiters = keep;
        for w in answer {
            let _ = w.ack.send(Err(copy_error(e, &self.label)));
        }
    }

    /// Answers everything still waiting when the task stops.
    fn end(mut self, end: End, rx: &mut mpsc::UnboundedReceiver<Cmd>) {
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            self.waiters.push(cmd);
        }
        for w in self.waiters.drain(..) {
            let _ = w.ack.send(match end {
                End::Dropped => Ok(()),
                End::Session => Err(Error::Unavailable {
                    registry: self.label.clone(),
                    reason: format!("the session ended before {} was read", self.path),
                }),
            });
        }
    }
}

/// A copy of an error for several waiters (`Error` is not `Clone`), as retryable as it.
fn copy_error(e: &Error, label: &str) -> Error {
    if e.is_retryable() {
        Error::Unavailable {
            registry: label.to_owned(),
            reason: e.to_string(),
        }
    } else {
        Error::Backend {
            registry: label.to_owned(),
            message: e.to_string(),
            retryable: false,
            source: None,
        }
    }
}

/// The watch task of one category path for one session: arms the watch, reads the list
/// when asked, applies events, and after a failure tries again with backoff until it
/// succeeds, the watch is dropped or the session ends.
async fn run_watch(
    watch: Arc<Watch>,
    client: Weak<zk::Client>,
    generation: u64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ctx: Ctx,
) {
    let mut watcher: Option<zk::PersistentWatcher> = None;
    let mut need_read = true;
    let mut pending = Pending::new(&ctx, &watch.path);
    let end = 'task: loop {
        if pending.due(watcher.is_none() || need_read) {
            lock(&watch.data).ready = false;
            let admit = pending.admitted();
            let Some(c) = client.upgrade() else {
                break 'task End::Session;
            };
            let attempt = attempt_watch(&watch, &c, generation, &mut watcher, &ctx, &admit).await;
            drop(c);
            match attempt {
                Attempt::Done => {
                    need_read = false;
                    lock(&watch.data).ready = true;
                    pending.succeeded();
                }
                Attempt::Failed(e) => pending.failed(&e),
                Attempt::SessionEnded => break 'task End::Session,
            }
        }
        tokio::select! {
            ev = next_event(&mut watcher) => {
                let mut batch = vec![ev];
                if let Some(w) = watcher.as_mut() {
                    drain(w, &mut batch);
                }
                watch.apply_batch(generation, &batch);
                if batch.last().is_some_and(is_terminal) {
                    break 'task End::Session;
                }
            }
            cmd = rx.recv() => match cmd {
                None => break 'task End::Dropped,
                Some(cmd) => {
                    if cmd.rearm {
                        // Dropped before the new watch is added, so its removal reaches
                        // the server first.
                        watcher = None;
                    }
                    need_read = true;
                    lock(&watch.data).ready = false;
                    pending.take(cmd);
                }
            },
            () = sleep_until(pending.retry_at) => {
                pending.now = true;
            }
        }
    };
    pending.end(end, &mut rx);
    tracing::debug!(registry = %ctx.label, path = %watch.path, "watch task ended");
}

/// Arms the watch when needed, then reads the list.
async fn attempt_watch(
    watch: &Watch,
    client: &zk::Client,
    generation: u64,
    watcher: &mut Option<zk::PersistentWatcher>,
    ctx: &Ctx,
    admit: &[Arc<Sub>],
) -> Attempt {
    if client.state().is_terminated() {
        return Attempt::SessionEnded;
    }
    let _permit = ctx.permits.acquire().await;
    let w = match watcher {
        Some(w) => w,
        None => match arm(
            ctx,
            client,
            &watch.path,
            zk::AddWatchMode::PersistentRecursive,
        )
        .await
        {
            Ok(w) => watcher.insert(w),
            Err(e) => {
                return if client.state().is_terminated() {
                    Attempt::SessionEnded
                } else {
                    Attempt::Failed(e)
                };
            }
        },
    };
    let (result, end) = reread_watch(watch, client, generation, w, ctx, admit).await;
    match result {
        _ if end => Attempt::SessionEnded,
        Ok(()) => Attempt::Done,
        Err(_) if client.state().is_terminated() => Attempt::SessionEnded,
        Err(e) => Attempt::Failed(e),
    }
}

/// Reads the list, applies the events that came meanwhile, pushes. Returns the result and
/// whether the session ended.
async fn reread_watch(
    watch: &Watch,
    client: &zk::Client,
    generation: u64,
    watcher: &mut zk::PersistentWatcher,
    ctx: &Ctx,
    admit: &[Arc<Sub>],
) -> (Result<()>, bool) {
    let read = ctx.call(client.get_children(&watch.path)).await;
    // Events that came before the reply are already in the read; applying them again on
    // top of it leaves the same list once all of them are applied, which `drain` ensures
    // (they are all queued by the time the reply is seen).
    let mut batch = Vec::new();
    drain(watcher, &mut batch);
    let result = match read {
        Ok((names, stat)) => {
            watch.replace(generation, Some((names, stat.pzxid)), &batch, admit);
            Ok(())
        }
        Err(Fail::Zk(zk::Error::NoNode)) => {
            watch.replace(generation, None, &batch, admit);
            Ok(())
        }
        Err(f) => {
            watch.apply_batch(generation, &batch);
            Err(ctx.error("list children of", &watch.path, f))
        }
    };
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

/// The root task for one session: arms the root watch, lists the services on every root
/// event and when asked, attaches new ones; after a failure it tries again with backoff.
async fn run_root(
    registry: Weak<Inner>,
    root: Arc<RootWatch>,
    client: Weak<zk::Client>,
    generation: u64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ctx: Ctx,
) {
    let mut watcher: Option<zk::PersistentWatcher> = None;
    let mut need_list = true;
    let mut pending = Pending::new(&ctx, &ctx.root);
    let end = 'task: loop {
        if pending.due(watcher.is_none() || need_list) {
            // Events from here on ask for another listing.
            need_list = false;
            let Some(c) = client.upgrade() else {
                break 'task End::Session;
            };
            let attempt = attempt_root(&registry, &root, &c, generation, &mut watcher, &ctx).await;
            drop(c);
            match attempt {
                Attempt::Done => pending.succeeded(),
                Attempt::Failed(e) => {
                    need_list = true;
                    pending.failed(&e);
                }
                Attempt::SessionEnded => break 'task End::Session,
            }
        }
        tokio::select! {
            ev = next_event(&mut watcher) => {
                let mut batch = vec![ev];
                if let Some(w) = watcher.as_mut() {
                    drain(w, &mut batch);
                }
                if batch.last().is_some_and(is_terminal) {
                    break 'task End::Session;
                }
                if batch.iter().any(|e| e.event_type != zk::EventType::Session) {
                    need_list = true;
                    pending.now = true;
                }
            }
            cmd = rx.recv() => match cmd {
                None => break 'task End::Dropped,
                Some(cmd) => {
                    if cmd.rearm {
                        watcher = None;
                    }
                    need_list = true;
                    pending.take(cmd);
                }
            },
            () = sleep_until(pending.retry_at) => {
                pending.now = true;
            }
        }
    };
    pending.end(end, &mut rx);
    tracing::debug!(registry = %ctx.label, path = %ctx.root, "root task ended");
}

/// Arms the root watch when needed, then lists and attaches the services.
async fn attempt_root(
    registry: &Weak<Inner>,
    root: &RootWatch,
    client: &zk::Client,
    generation: u64,
    watcher: &mut Option<zk::PersistentWatcher>,
    ctx: &Ctx,
) -> Attempt {
    if client.state().is_terminated() {
        return Attempt::SessionEnded;
    }
    if watcher.is_none() {
        let armed = {
            let _permit = ctx.permits.acquire().await;
            arm(ctx, client, &ctx.root, zk::AddWatchMode::Persistent).await
        };
        match armed {
            Ok(w) => *watcher = Some(w),
            Err(_) if client.state().is_terminated() => return Attempt::SessionEnded,
            Err(e) => return Attempt::Failed(e),
        }
    }
    match relist(registry, root, client, generation, ctx).await {
        Ok(()) => Attempt::Done,
        Err(_) if client.state().is_terminated() => Attempt::SessionEnded,
        Err(e) => Attempt::Failed(e),
    }
}

/// Lists the services under the root and attaches the ones not attached yet to every
/// wildcard subscription (each service's categories read in order).
async fn relist(
    registry: &Weak<Inner>,
    root: &RootWatch,
    client: &zk::Client,
    generation: u64,
    ctx: &Ctx,
) -> Result<()> {
    let read = {
        let _permit = ctx.permits.acquire().await;
        ctx.call(client.get_children(&ctx.root)).await
    };
    let names = match read {
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
    let jobs = {
        let Some(inner) = registry.upgrade() else {
            return Ok(());
        };
        let mut jobs = Vec::new();
        for sub in &subs {
            for svc in &services {
                if !lock(&sub.attached).0.contains(svc) {
                    jobs.push(inner.attach_service(sub, svc, false));
                }
            }
        }
        jobs
    };
    let mut first_error = None;
    for r in futures_util::future::join_all(jobs).await {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Sends a request to a task; the answer comes on the returned receiver (`None`: there is
/// no task, no session).
fn send_cmd(
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    rearm: bool,
    until_ok: bool,
    admit: Option<Arc<Sub>>,
) -> Option<oneshot::Receiver<Result<()>>> {
    let (ack, answer) = oneshot::channel();
    tx?.send(Cmd {
        rearm,
        until_ok,
        admit,
        ack,
    })
    .ok()?;
    Some(answer)
}

/// Waits for the answer of [`send_cmd`].
async fn answer(
    label: &str,
    path: &str,
    answer: Option<oneshot::Receiver<Result<()>>>,
) -> Result<()> {
    let stopped = || Error::Unavailable {
        registry: label.to_owned(),
        reason: format!("the watch on {path} is not running (no session)"),
    };
    match answer {
        Some(rx) => rx.await.unwrap_or_else(|_| Err(stopped())),
        None => Err(stopped()),
    }
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
    /// The highest revision reported for each path, kept when its watch is dropped, so a
    /// watch made again for the path (whose read gives the real `pzxid`, possibly lower
    /// than the revisions we made up from events) never reports an older revision.
    high_water: HashMap<String, u64>,
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
    /// Bounds how many watches arm and read at once.
    permits: Arc<Semaphore>,
    /// Set by destroy: ends every call in flight.
    closing: watch::Sender<bool>,
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
            permits: self.permits.clone(),
            closing: self.closing.subscribe(),
        }
    }

    /// How long `Reconnected` and `NewSession` wait for every watch to be armed and read;
    /// the watches not done by then keep trying in the background.
    fn settle_bound(&self) -> Duration {
        self.cfg.timeout * 3
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

    /// One attempt to make a session. The client gives each host up to `timeout` (its
    /// connection timeout, also the idle limit of a live connection) and tries them in a
    /// random order, so the whole attempt gets `timeout` per host: one unreachable host
    /// in front of a working one must not fail it.
    async fn connect_once(&self) -> Result<zk::Client> {
        let connector = self.connector();
        let hosts = u32::try_from(self.cfg.connect.split(',').count())
            .unwrap_or(u32::MAX)
            .max(1);
        let budget = self.cfg.timeout.saturating_mul(hosts);
        match tokio::time::timeout(budget, connector.connect(&self.cfg.connect)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(Error::Unavailable {
                registry: self.cfg.label.clone(),
                reason: format!("cannot connect to ZooKeeper at {}: {e}", self.cfg.connect),
            }),
            Err(_) => Err(Error::Unavailable {
                registry: self.cfg.label.clone(),
                reason: format!(
                    "cannot connect to ZooKeeper at {} within {budget:?} ({:?} per host)",
                    self.cfg.connect, self.cfg.timeout
                ),
            }),
        }
    }

    /// Makes `client` the current session and starts its monitor.
    /// Makes `client` the current session and starts its monitor; `None` (and the client
    /// dropped, which closes its session) when the registry was destroyed meanwhile.
    fn install(self: &Arc<Self>, client: zk::Client) -> Option<u64> {
        // Under the state lock, which destroy holds when it sets `destroyed`.
        let st = lock(&self.state);
        if self.destroyed.load(Ordering::Acquire) {
            return None;
        }
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(
            registry = %self.cfg.label,
            session = %client.session_id(),
            asked_ms = self.cfg.session_timeout.as_millis() as u64,
            negotiated_ms = client.session_timeout().as_millis() as u64,
            "ZooKeeper session established (the server clamps the session timeout to 2-20 ticks)"
        );
        let states = client.state_watcher();
        *lock(&self.session) = Some(Session {
            client: Arc::new(client),
            generation,
        });
        drop(st);
        self.available.store(true, Ordering::Release);
        let h = tokio::spawn(monitor(Arc::downgrade(self), states, generation));
        let mut bg = lock(&self.background);
        bg.retain(|h| !h.is_finished());
        bg.push(h);
        Some(generation)
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
            run_watch(
                entry.watch.clone(),
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
            run_root(
                Arc::downgrade(self),
                entry.root.clone(),
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

    /// Puts `sub` on the watches of `service`'s categories, and returns a future that reads
    /// them one after another in the subscription's category order (each read admits `sub`,
    /// see [`WatchData::joining`]) and marks the service attached once all of them were read.
    /// An attached service is read again only with `force`.
    fn attach_service(
        &self,
        sub: &Arc<Sub>,
        service: &str,
        force: bool,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let mut targets = Vec::new();
        {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let mut attached = lock(&sub.attached);
            if sub.active.load(Ordering::Acquire) && (force || !attached.0.contains(service)) {
                for category in &sub.categories {
                    let path = self.cfg.category_path(service, category);
                    let revision = st.high_water.get(&path).copied().unwrap_or(0);
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
                                    revision,
                                    generation: 0,
                                    primed: false,
                                    ready: false,
                                    subs: Vec::new(),
                                    joining: Vec::new(),
                                }),
                            }),
                            task: None,
                        });
                    {
                        let mut d = lock(&entry.watch.data);
                        if !d.has(sub) {
                            d.joining.push(sub.clone());
                        }
                    }
                    if !attached.1.contains(&path) {
                        attached.1.push(path.clone());
                    }
                    let tx = self.watch_task(&mut st.retiring, entry);
                    targets.push((path, tx));
                }
            }
        }
        let label = self.cfg.label.clone();
        let sub = sub.clone();
        let service = service.to_owned();
        async move {
            for (path, tx) in targets {
                answer(&label, &path, send_cmd(tx, false, false, Some(sub.clone()))).await?;
            }
            lock(&sub.attached).0.insert(service);
            Ok(())
        }
    }

    /// Whether every watch of `sub` is armed and read on the current session, with `sub`
    /// receiving its list.
    fn is_ready(&self, sub: &Arc<Sub>) -> bool {
        let Some(session) = self.current() else {
            return false;
        };
        let st = lock(&self.state);
        let paths = lock(&sub.attached).1.clone();
        !paths.is_empty()
            && paths.iter().all(|path| {
                st.watches.get(path).is_some_and(|e| {
                    let live = e
                        .task
                        .as_ref()
                        .is_some_and(|t| t.generation == session.generation && !t.tx.is_closed());
                    let d = lock(&e.watch.data);
                    live && d.ready
                        && d.generation == session.generation
                        && d.subs.iter().any(|s| Arc::ptr_eq(s, sub))
                })
            })
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
                    d.joining.retain(|s| !Arc::ptr_eq(s, sub));
                    d.subs.is_empty() && d.joining.is_empty()
                }
                None => false,
            };
            let removed = if empty {
                st.watches.remove(&path)
            } else {
                None
            };
            if let Some(e) = &removed {
                let revision = lock(&e.watch.data).revision;
                let hw = st.high_water.entry(path.clone()).or_default();
                *hw = (*hw).max(revision);
            }
            if let Some(t) = removed.and_then(|e| e.task) {
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

    /// Asks every watch (and the root watch) to read its list again and push it; with
    /// `rearm` (a reconnect of the same session) each watch is dropped and added again first
    /// (see [`Cmd::rearm`]). Watches of a new session are armed by their new tasks. The
    /// requests are sent before this returns; the future ends once every watch is armed and
    /// read, and yields the paths whose task stopped first (their session ended). The tasks
    /// keep trying after a failure whether or not the future is still awaited.
    fn reread_all(
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
                    (path.clone(), send_cmd(tx, rearm, true, None))
                })
                .collect();
            if let Some(r) = root.as_mut() {
                let tx = self.root_task(retiring, r);
                answers.push((self.cfg.root.clone(), send_cmd(tx, rearm, true, None)));
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

    /// Waits (up to [`Inner::settle_bound`]) for a [`Inner::reread_all`], logging what is
    /// not done; whether everything was armed and read.
    fn settle(
        &self,
        wait: impl Future<Output = Vec<String>> + Send + 'static,
    ) -> impl Future<Output = bool> + Send + 'static {
        let bound = self.settle_bound();
        let label = self.cfg.label.clone();
        async move {
            match tokio::time::timeout(bound, wait).await {
                Ok(stopped) if stopped.is_empty() => true,
                Ok(stopped) => {
                    tracing::warn!(registry = %label, paths = ?stopped, "the session ended before these watches were read again");
                    false
                }
                Err(_) => {
                    tracing::warn!(registry = %label, after = ?bound, "not every watch was armed and read in time; they keep trying in the background");
                    true
                }
            }
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

/// Turns the session's states into events; replaces an expired session. After a reconnect
/// of the same session every watch is added again and read, then `Reconnected` is sent; a
/// state change meanwhile (another disconnection) supersedes it.
async fn monitor(registry: Weak<Inner>, mut states: zk::StateWatcher, generation: u64) {
    type Settling = std::pin::Pin<Box<dyn Future<Output = bool> + Send>>;
    let mut settling: Option<Settling> = None;
    // `state_watcher()` consumed the state current at install: a session that ended (or a
    // connection lost) between connect and install would otherwise never be seen.
    let mut initial = Some(states.peek_state()).filter(|s| {
        !matches!(
            s,
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
        )
    });
    loop {
        let state = match settling.as_mut() {
            _ if initial.is_some() => match initial.take() {
                Some(s) => s,
                None => continue,
            },
            Some(wait) => tokio::select! {
                state = states.changed() => {
                    settling = None;
                    state
                }
                _ = wait => {
                    settling = None;
                    let Some(inner) = registry.upgrade() else {
                        return;
                    };
                    if inner.destroyed.load(Ordering::Acquire)
                        || inner.generations.load(Ordering::Acquire) != generation
                    {
                        return;
                    }
                    inner.emit(RegistryEvent::Reconnected);
                    continue;
                }
            },
            None => states.changed().await,
        };
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
                let wait = inner.reread_all(true);
                settling = Some(Box::pin(inner.settle(wait)));
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
                let Some(generation) = inner.install(client) else {
                    return;
                };
                let settled = inner.settle(inner.reread_all(false));
                drop(inner);
                let complete = settled.await;
                let Some(inner) = registry.upgrade() else {
                    return;
                };
                if inner.destroyed.load(Ordering::Acquire)
                    || inner.current().is_none_or(|s| s.generation != generation)
                {
                    // That session ended already; its monitor started another connector.
                    return;
                }
                let first = !inner.ever_connected.swap(true, Ordering::AcqRel);
                tracing::info!(registry = %inner.cfg.label, after_ms = started.elapsed().as_millis() as u64, first, complete, "ZooKeeper session ready");
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
            session: Mutex::new(None),
            state: Mutex::new(State::default()),
            background: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(READ_CONCURRENCY)),
            closing: watch::channel(false).0,
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
        let (sub, existing) = {
            let mut st = lock(&inner.state);
            // Checked under the lock destroy holds when it sets `destroyed` and drains.
            inner.alive()?;
            match st.subs.get(&key) {
                Some(sub) => (sub.clone(), true),
                None => {
                    let sub = Arc::new(Sub {
                        url: url.clone(),
                        categories: url.categories(),
                        wildcard,
                        delivery: Delivery::for_listener(
                            listener,
                            DeliveryOptions {
                                empty_protection: inner.cfg.empty_protection,
                                label: url.to_redacted_string(),
                            },
                        ),
                        active: AtomicBool::new(true),
                        attached: Mutex::new((HashSet::new(), Vec::new())),
                        last: Mutex::new(HashMap::new()),
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
                send_cmd(inner.root_task(retiring, entry), false, false, None)
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
            sub.active.store(false, Ordering::Release);
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
