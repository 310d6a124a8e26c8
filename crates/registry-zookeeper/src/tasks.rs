//! The task behind each watch, one per watched path and session, and the one retry
//! mechanism every such task runs ([`run`]): a *list* task per category path
//! ([`Job::List`]: a persistent recursive watch whose events and reads feed the keeper) and a *root* task while an `interface=*` subscription exists ([`Job::Root`]: a
//! persistent watch on the root, the services listed again on every event, new ones attached
//! to the wildcard subscriptions and gone ones detached).
//!
//! A task arms its watch and reads when asked ([`Cmd`]); a failed attempt is tried again
//! with backoff until it succeeds, the watch is dropped (its command channel closes) or the
//! session ends. Requests that came meanwhile are answered by the attempt that settles them.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use registry_core::url::ANY_VALUE;
use registry_core::{Error, Result, decode};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

use crate::errors::{Fail, copy_error};
use crate::session::{Ctx, lock};
use crate::watches::{RETIRED, RootWatch, Sub, Watch};

/// What the root task needs of the registry.
pub(crate) trait RootHost: Send + Sync {
    /// Attaches `service` to the wildcard subscription `sub`: its category paths watched and
    /// read (see `Inner::attach_service`); `None` when the registry is gone.
    fn attach(
        &self,
        sub: &Arc<Sub>,
        service: &str,
    ) -> Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>>;

    /// Takes the wildcard subscription `sub` off the services no longer under the root
    /// (`listed`: the services listed, sorted, by the root task of `generation`; nothing is
    /// done when another task took the root over since); see `Inner::detach_gone`.
    fn detach_gone(&self, sub: &Arc<Sub>, listed: &[String], generation: u64);

    /// Every service listed is attached to every wildcard subscription: their lists can go
    /// out.
    fn all_attached(&self);
}

/// What one attempt is about.
struct Ask {
    /// The session generation of the task.
    generation: u64,
    /// `sync` the path before reading (see [`Ctx::read_children`]).
    sync: bool,
    /// Ask the size of the list rather than take it from what is kept.
    unsure: bool,
}

/// What a task watches and reads.
pub(crate) enum Job {
    /// A category path: its events and reads feed the keeper; read again when asked.
    List(Arc<Watch>),
    /// The root, for `interface=*` subscriptions: every event (a service added or removed)
    /// lists the services again; new ones are attached through `host`, gone ones detached.
    Root {
        root: Arc<RootWatch>,
        host: Arc<dyn RootHost>,
    },
}

impl Job {
    fn path<'a>(&'a self, ctx: &'a Ctx) -> &'a str {
        match self {
            Job::List(w) => &w.path,
            Job::Root { .. } => &ctx.root,
        }
    }

    fn mode(&self) -> zk::AddWatchMode {
        match self {
            Job::List(_) => zk::AddWatchMode::PersistentRecursive,
            Job::Root { .. } => zk::AddWatchMode::Persistent,
        }
    }

    /// Marks a list watch as armed and read with nothing pending (or not).
    fn set_ready(&self, ready: bool) {
        if let Job::List(w) = self {
            lock(&w.data).ready = ready;
        }
    }

    /// Handles a batch of watch events; whether the list must be read again.
    fn on_events(&self, generation: u64, batch: &[zk::WatchedEvent]) -> bool {
        match self {
            Job::List(w) => {
                w.apply_batch(generation, batch);
                false
            }
            Job::Root { .. } => batch.iter().any(|e| e.event_type != zk::EventType::Session),
        }
    }

    /// Whether the watch was dropped (nobody needs it any more).
    fn retired(&self) -> bool {
        match self {
            Job::List(w) => lock(&w.data).generation == RETIRED,
            Job::Root { root, .. } => lock(&root.data).generation == RETIRED,
        }
    }

    /// Whether this list was read before (by an earlier session's task, or before a
    /// reconnect): a new read must then not go back in time (see [`Ctx::read_children`]).
    fn read_before(&self) -> bool {
        match self {
            Job::List(w) => lock(&w.data).read_once,
            Job::Root { root, .. } => lock(&root.data).listed,
        }
    }

    /// Reads (and pushes or attaches) once the watch is armed, after a `sync` of the path
    /// with `sync` (see [`Ctx::read_children`]); with `unsure`, the size of the list is asked
    /// first rather than taken from what is kept. Returns the result and whether the session
    /// ended meanwhile.
    async fn read(
        &self,
        client: &zk::Client,
        watcher: &mut zk::PersistentWatcher,
        ctx: &Ctx,
        ask: &Ask,
    ) -> (Result<()>, bool) {
        match self {
            Job::List(w) => reread_watch(w, client, watcher, ctx, ask).await,
            Job::Root { root, host } => match relist(root, host.as_ref(), client, ctx, ask).await {
                Ok(Listed::Superseded) => (Ok(()), true),
                Ok(Listed::Attached) => (Ok(()), false),
                Err(e) => (Err(e), false),
            },
        }
    }
}

/// The first pause before a failed arm or read of a watch is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two attempts to arm or read a watch.
const RETRY_MAX: Duration = Duration::from_secs(3);

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

/// A request to a watch (or root) task: read the list again (after arming the watch when
/// needed) and push it.
pub(crate) struct Cmd {
    /// Drop the watch and add it again first (after a reconnect of the same session).
    ///
    /// zookeeper-client 0.11.2 re-sends persistent watches with the old `SetWatches` request,
    /// which cannot carry them (`resend_watches` computes `index.max(index)` where it means
    /// `index.max(i)`), so after a reconnect the server no longer knows them. Adding them
    /// again ourselves works with any client version.
    pub(crate) rearm: bool,
    /// Answer only once the watch is armed and read (or no longer needed); otherwise the
    /// answer is the result of the next attempt. Either way the task keeps trying after a
    /// failure, with backoff, until it succeeds or its session ends.
    pub(crate) until_ok: bool,
    pub(crate) ack: oneshot::Sender<Result<()>>,
}

/// A running task and how to reach it.
pub(crate) struct TaskRef {
    pub(crate) generation: u64,
    pub(crate) tx: mpsc::UnboundedSender<Cmd>,
    pub(crate) handle: JoinHandle<()>,
}

/// How long a batch of events holding a delete waits for more (see the watch loop).
const COALESCE_DELETES: std::time::Duration = std::time::Duration::from_millis(2);

fn is_terminal(ev: &zk::WatchedEvent) -> bool {
    ev.event_type == zk::EventType::Session && ev.session_state.is_terminated()
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
    /// The session ended, or the read was not taken because a task of a newer session feeds
    /// the path: the task stops, and nobody waiting is told the list was read.
    SessionEnded,
    /// The read was not taken because the watch was dropped: the task stops.
    Dropped,
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

/// The task of `job` for one session: arms the watch, reads when asked, handles events,
/// and after a failure tries again with backoff until it succeeds, the watch is dropped or
/// the session ends.
pub(crate) async fn run(
    job: Job,
    client: Weak<zk::Client>,
    generation: u64,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ctx: Ctx,
) {
    let mut watcher: Option<zk::PersistentWatcher> = None;
    let mut need_read = true;
    // A task of a new session for a list read before: its first read must be synced.
    let mut need_sync = job.read_before();
    let mut pending = Pending::new(&ctx, job.path(&ctx));
    let end = 'task: loop {
        if pending.due(watcher.is_none() || need_read) {
            job.set_ready(false);
            // Events from here on ask for another read (root).
            need_read = false;
            let Some(c) = client.upgrade() else {
                break 'task End::Session;
            };
            let ask = Ask {
                generation,
                sync: need_sync,
                unsure: need_sync || pending.failures > 0 || !job.read_before(),
            };
            let attempt = attempt(&job, &c, &mut watcher, &ctx, &ask).await;
            drop(c);
            match attempt {
                Attempt::Done => {
                    need_sync = false;
                    job.set_ready(true);
                    pending.succeeded();
                }
                Attempt::Failed(e) => {
                    need_read = true;
                    pending.failed(&e);
                }
                Attempt::SessionEnded => break 'task End::Session,
                Attempt::Dropped => break 'task End::Dropped,
            }
        }
        tokio::select! {
            ev = next_event(&mut watcher) => {
                let mut batch = vec![ev];
                if let Some(w) = watcher.as_mut() {
                    drain(w, &mut batch);
                    // A node replaced in one transaction (another session's entry taken
                    // over: delete + create) sends its two events back to back: wait a
                    // moment for the second, so the list never shows the entry missing.
                    if batch.iter().any(|e| e.event_type == zk::EventType::NodeDeleted) {
                        tokio::time::sleep(COALESCE_DELETES).await;
                        drain(w, &mut batch);
                    }
                }
                let again = job.on_events(generation, &batch);
                if batch.last().is_some_and(is_terminal) {
                    break 'task End::Session;
                }
                if again {
                    need_read = true;
                    pending.now = true;
                }
            }
            cmd = rx.recv() => match cmd {
                None => break 'task End::Dropped,
                Some(cmd) => {
                    if cmd.rearm {
                        // Dropped before the new watch is added, so its removal reaches
                        // the server first.
                        watcher = None;
                        // A reconnect: the server may be another one, behind the last.
                        need_sync = true;
                    }
                    need_read = true;
                    job.set_ready(false);
                    pending.take(cmd);
                }
            },
            () = sleep_until(pending.retry_at) => {
                pending.now = true;
            }
        }
    };
    pending.end(end, &mut rx);
    tracing::debug!(registry = %ctx.label, path = %job.path(&ctx), "watch task ended");
}

/// Arms the watch when needed, then reads.
async fn attempt(
    job: &Job,
    client: &zk::Client,
    watcher: &mut Option<zk::PersistentWatcher>,
    ctx: &Ctx,
    ask: &Ask,
) -> Attempt {
    if client.state().is_terminated() {
        return Attempt::SessionEnded;
    }
    let w = match watcher {
        Some(w) => w,
        None => {
            let armed = {
                let _permit = ctx.small_permit().await;
                arm(ctx, client, job.path(ctx), job.mode()).await
            };
            match armed {
                Ok(w) => watcher.insert(w),
                Err(_) if client.state().is_terminated() => return Attempt::SessionEnded,
                Err(e) => return Attempt::Failed(e),
            }
        }
    };
    let (result, end) = job.read(client, w, ctx, ask).await;
    match result {
        _ if end && job.retired() => Attempt::Dropped,
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
    watcher: &mut zk::PersistentWatcher,
    ctx: &Ctx,
    ask: &Ask,
) -> (Result<()>, bool) {
    // The bytes counted from reads and events tell the size, unless the list may have
    // changed unseen (a reconnect, a new session, a failed read) or was never read.
    let known = (!ask.unsure).then(|| lock(&watch.data).bytes);
    let read = ctx
        .read_children(client, &watch.path, ask.sync, known)
        .await;
    // Events that came before the reply are already in the read; applying them again on
    // top of it leaves the same list once all of them are applied, which `drain` ensures
    // (they are all queued by the time the reply is seen).
    let mut batch = Vec::new();
    drain(watcher, &mut batch);
    let taken = match read {
        Ok((names, stat)) => watch.replace(ask.generation, Some((names, stat.pzxid)), &batch),
        Err(Fail::Zk(zk::Error::NoNode)) => watch.replace(ask.generation, None, &batch),
        Err(f) => {
            watch.apply_batch(ask.generation, &batch);
            return (
                Err(ctx.error("list children of", &watch.path, f)),
                batch.last().is_some_and(is_terminal),
            );
        }
    };
    if !taken {
        tracing::debug!(registry = %ctx.label, path = %watch.path, "read not taken: a newer session's task feeds this path, or the watch was dropped");
    }
    (Ok(()), !taken || batch.last().is_some_and(is_terminal))
}

/// What a listing of the root came to.
enum Listed {
    /// Every service listed is attached to every wildcard subscription.
    Attached,
    /// A task of a newer session feeds the root (or the root watch was dropped): nothing
    /// may be reported as listed.
    Superseded,
}

/// Lists the services under the root, detaches the ones gone from every wildcard
/// subscription and attaches the ones not attached yet (each service's categories read in
/// order).
async fn relist(
    root: &RootWatch,
    host: &dyn RootHost,
    client: &zk::Client,
    ctx: &Ctx,
    ask: &Ask,
) -> Result<Listed> {
    // Service names are short: the size is asked only when the listing may have grown
    // unseen, or a listing failed.
    let known = (!ask.unsure).then_some(0);
    let read = ctx.read_children(client, &ctx.root, ask.sync, known).await;
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
        let mut data = lock(&root.data);
        if data.generation != ask.generation {
            return Ok(Listed::Superseded);
        }
        data.listed = true;
        data.subs.clone()
    };
    let mut jobs = Vec::new();
    for sub in &subs {
        host.detach_gone(sub, &services, ask.generation);
        for svc in &services {
            if !lock(&sub.attached).0.contains(svc) {
                let Some(job) = host.attach(sub, svc) else {
                    // The registry is gone.
                    return Ok(Listed::Superseded);
                };
                jobs.push(job);
            }
        }
    }
    let mut first_error = None;
    for r in futures_util::future::join_all(jobs).await {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            // Checked and marked under the root's lock, so a new session's task cannot take
            // over in between.
            let data = lock(&root.data);
            if data.generation != ask.generation {
                return Ok(Listed::Superseded);
            }
            host.all_attached();
            Ok(Listed::Attached)
        }
    }
}

/// Sends a request to a task; the answer comes on the returned receiver (`None`: there is
/// no task, no session).
pub(crate) fn send_cmd(
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    rearm: bool,
    until_ok: bool,
) -> Option<oneshot::Receiver<Result<()>>> {
    let (ack, answer) = oneshot::channel();
    tx?.send(Cmd {
        rearm,
        until_ok,
        ack,
    })
    .ok()?;
    Some(answer)
}

/// Waits for the answer of [`send_cmd`].
pub(crate) async fn answer(
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

/// Runs `task` once the retiring task of the same path (if any) has ended.
pub(crate) async fn after(previous: Option<JoinHandle<()>>, task: impl Future<Output = ()>) {
    if let Some(p) = previous {
        let _ = p.await;
    }
    task.await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use registry_core::keeper::{ListKeeper, Scope};
    use registry_core::{Url, encode};
    use registry_test_servers::{Kind, shared_address};
    use tokio::sync::{Semaphore, watch};

    use super::*;
    use crate::session::READ_UNITS;
    use crate::watches::WatchData;

    fn ctx(closing: watch::Receiver<bool>) -> Ctx {
        Ctx {
            label: "zookeeper://test".to_owned(),
            root: "/".to_owned(),
            timeout: Duration::from_secs(5),
            permits: Arc::new(Semaphore::new(READ_UNITS as usize)),
            closing,
        }
    }

    /// A read by the task of an older session, after a new session's task took the path
    /// over (the window in which a subscribe used to return before its first list): the
    /// keeper does not take it, and the task must not answer that the list was read. The
    /// new session's task then reads it, and says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_a_newer_task_took_over_is_not_reported_as_read() {
        let Some(addr) = shared_address(Kind::Zookeeper, "a_read_a_newer_task_took_over") else {
            return;
        };
        let client = Arc::new(
            zk::Client::connector()
                .with_session_timeout(Duration::from_secs(10))
                .connect(&addr)
                .await
                .expect("connect"),
        );
        let path = format!(
            "/{}/com.foo.S/providers",
            registry_core::testkit::unique_service("superseded")
        );
        let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        client.mkdir(&path, &options).await.expect("mkdir");
        let entry: Url = "dubbo://10.0.0.1:20880/com.foo.S".parse().expect("url");
        let node = format!("{path}/{}", encode(&entry.to_full_string()));
        let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        client.create(&node, &[], &ephemeral).await.expect("create");

        let keeper = ListKeeper::new("test");
        let scope = Scope::category("com.foo.S", "providers");
        let w = Arc::new(Watch {
            path: path.clone(),
            service: "com.foo.S".to_owned(),
            category: "providers".to_owned(),
            scope: scope.clone(),
            keeper: keeper.clone(),
            feed: Arc::new(Mutex::new(())),
            // A task of generation 2 feeds the path now.
            data: Mutex::new(WatchData {
                generation: 2,
                primed: false,
                ready: false,
                read_once: false,
                bytes: 0,
            }),
        });
        let (_closing, closing) = watch::channel(false);
        let (tx, rx) = mpsc::unbounded_channel();
        let old = tokio::spawn(run(
            Job::List(w.clone()),
            Arc::downgrade(&client),
            1,
            rx,
            ctx(closing.clone()),
        ));
        let said = answer("test", &path, send_cmd(Some(tx.clone()), false, false)).await;
        assert!(
            said.is_err(),
            "the old task said the list was read, yet the keeper did not take it (loaded: {})",
            keeper.is_loaded(&scope)
        );
        assert!(!keeper.is_loaded(&scope));
        // It stopped: a newer task owns the path.
        tokio::time::timeout(Duration::from_secs(5), old)
            .await
            .expect("the old task ended")
            .expect("the old task did not panic");

        let (tx, rx) = mpsc::unbounded_channel();
        let new = tokio::spawn(run(
            Job::List(w.clone()),
            Arc::downgrade(&client),
            2,
            rx,
            ctx(closing),
        ));
        answer("test", &path, send_cmd(Some(tx.clone()), false, false))
            .await
            .expect("the new task read the list");
        assert!(keeper.is_loaded(&scope));
        assert_eq!(
            keeper.entries(&scope),
            vec![("com.foo.S".to_owned(), "providers".to_owned(), entry)]
        );
        drop(tx);
        let _ = new.await;
        let _ = client.delete(&node, None).await;
    }
}
