//! The session task of a registry: it owns the connection, the lease and the one watch stream.
//!
//! - The lease is renewed every TTL/3 by sending a keep-alive on the lease's keep-alive stream;
//!   an answer with TTL 0 (or "not found" when the stream is opened again) means the lease is
//!   gone: `SessionLost`, a new lease, then `NewSession`.
//! - etcd never tells a lease holder that its lease was revoked or expired server-side, so
//!   every time the streams are opened a sentinel key (`root/.registry-leases/<lease hex>`,
//!   value the registry's identity) is put on the lease, and the watch stream is opened with
//!   the anchor watch on that key, from the put's revision + 1. etcd deletes the sentinel with
//!   the lease, so a DELETE event on the anchor watch means the lease is gone: the same path
//!   as a TTL-0 keep-alive answer, within milliseconds instead of up to TTL/3. The keep-alive
//!   stays the fallback (a partition that breaks the watch stream too). `destroy` stops this
//!   task before revoking the lease, so the DELETE that revoke causes is never seen here.
//! - Every watch of the registry is created on one watch stream with a watch id of our own, so
//!   responses are routed by id. The stream is opened with the anchor watch on the lease
//!   sentinel (on the root key itself, which no entry uses, when etcd refuses the sentinel's
//!   put: keep-alive detection only).
//! - A broken stream (server down, network) is `Disconnected`; the task then reconnects with
//!   backoff, renews the same lease and re-creates every watch from its last revision + 1, and
//!   reports `Reconnected` (or `NewSession` when the lease did not survive).
//! - A watch cancelled for compaction is read again (the full list is notified) and created
//!   again from the read's revision + 1.
//! - Every `etcd.reread.period` every watched prefix is read again, in case the server lost an
//!   event; a prefix that fails is logged and the others go on.
//! - The keep-alive runs on its own task and the watch stream is read by its own task, so
//!   neither a long read nor a send waiting on the watch stream delays a renewal, and the
//!   watch stream is always drained while create requests are sent. Resync and re-read reads
//!   run on their own tasks, at most [`READ_CONCURRENCY`] at once, and report back to the
//!   session task, which applies them and re-creates watches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{
    EventType, LeaseKeepAliveStream, LeaseKeeper, WatchOptions, WatchResponse, WatchStream, Watcher,
};
use registry_core::{Error, RegistryEvent, Url};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};

use crate::errors::{self, Kind};
use crate::paths;
use crate::registry::{Inner, connect, grant, lock};
use crate::watches::{Changed, WatchState, parse_key};

/// The watch id of the anchor watch that opens the stream (on the lease sentinel).
const ANCHOR_WATCH_ID: i64 = 1;
/// The first watch id of subscriptions.
pub(crate) const FIRST_WATCH_ID: i64 = 2;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(5);

/// Requests from the registry handle to its session task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Create every watch not yet created on the current stream.
    Arm,
    /// Cancel a watch that was created on stream generation `.1`.
    Cancel(i64, u64),
    /// A request said the lease is gone: check it now.
    CheckLease,
    /// A request said the auth token is invalid: authenticate again.
    Reauthenticate,
}

/// Why the connected loop ended.
enum Exit {
    Shutdown,
    /// Connection trouble; the text says what.
    Down(String),
    LeaseLost,
    Reauthenticate,
    /// A watch response was over the decoding limit (the stream is dead, and which watch it
    /// was for is unknown): open a new stream and read every watched prefix again, creating
    /// each watch after the read, so the oversized response is skipped instead of being
    /// replayed by a resume.
    ResyncAll(String),
}

struct Streams {
    keeper: LeaseKeeper,
    keep_alive: LeaseKeepAliveStream,
    watcher: Watcher,
    watch: WatchStream,
    /// The lease sentinel the anchor watch is on (`None`: on the root key, etcd refused the
    /// sentinel).
    sentinel: Option<String>,
}

/// Where the session stands, for the events it reports.
struct Flags {
    ever_up: bool,
    down: bool,
    lost: bool,
    /// When the lease was last granted or renewed.
    renewed: Instant,
    /// The last refusal of the credentials logged at warn level.
    denied: Option<String>,
    /// The last refusal of the sentinel's put logged at warn level.
    sentinel_denied: Option<String>,
}

/// Whether `reason` differs from the last one recorded in `last` (and records it).
fn first_time(last: &mut Option<String>, reason: &str) -> bool {
    if last.as_deref() == Some(reason) {
        return false;
    }
    *last = Some(reason.to_owned());
    true
}

pub(crate) async fn run(inner: Arc<Inner>, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut flags = Flags {
        ever_up: inner.available.load(Ordering::Acquire),
        down: false,
        lost: false,
        renewed: Instant::now(),
        denied: None,
        sentinel_denied: None,
    };
    let mut generation: u64 = 0;
    let mut backoff = BACKOFF_MIN;
    // `new` (check=true) has just authenticated: the first streams need no new token. Every
    // later establish authenticates again: a token that expired meanwhile (simple tokens after
    // `--auth-token-ttl` of inactivity, JWTs after their TTL) would make etcd refuse every
    // watch of the new stream.
    let mut fresh_token = inner.available.load(Ordering::Acquire);
    let mut reads = Reads::new();
    let mut resync_all = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Requests made while disconnected are stale: arming is redone below.
        while cmds.try_recv().is_ok() {}

        let reauthenticate = !std::mem::take(&mut fresh_token);
        match establish(&inner, &mut flags, reauthenticate).await {
            Ok(streams) => {
                generation += 1;
                let mut live = Live::start(&inner, streams);
                if std::mem::take(&mut resync_all) {
                    let mut watches = lock(&inner.watches);
                    for (id, w) in watches.iter_mut().filter(|(_, w)| !w.resyncing) {
                        w.resyncing = true;
                        reads.spawn(&inner, *id, w, Purpose::Resync);
                    }
                }
                if let Err(reason) = arm_all(&inner, &mut live.watcher, generation).await {
                    down(&inner, &mut flags, &reason);
                    if sleep_or_shutdown(&mut shutdown, pause(&inner, &flags, backoff)).await {
                        return;
                    }
                    check_expiry(&inner, &mut flags);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                inner.available.store(true, Ordering::Release);
                if !flags.ever_up {
                    flags.ever_up = true;
                    inner.emit(RegistryEvent::Connected);
                } else if flags.lost {
                    inner.emit(RegistryEvent::NewSession);
                } else if flags.down {
                    inner.emit(RegistryEvent::Reconnected);
                }
                flags.lost = false;
                flags.down = false;
                flags.denied = None;
                let since = Instant::now();
                let exit = connected(
                    &inner,
                    &mut live,
                    &mut reads,
                    &mut cmds,
                    &mut shutdown,
                    generation,
                    &mut flags,
                )
                .await;
                drop(live);
                if since.elapsed() >= STABLE {
                    backoff = BACKOFF_MIN;
                }
                match exit {
                    Exit::Shutdown => return,
                    Exit::Down(reason) => {
                        down(&inner, &mut flags, &reason);
                        if sleep_or_shutdown(&mut shutdown, pause(&inner, &flags, backoff)).await {
                            return;
                        }
                        check_expiry(&inner, &mut flags);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    Exit::LeaseLost => lease_lost(&inner, &mut flags),
                    Exit::ResyncAll(reason) => {
                        tracing::warn!(
                            registry = %inner.label,
                            reason,
                            "a watch response was over the decoding limit; reading every watched prefix again instead of resuming"
                        );
                        resync_all = true;
                    }
                    Exit::Reauthenticate => {
                        // The next establish authenticates again and re-creates every watch
                        // on a fresh stream. Paced, in case etcd keeps refusing.
                        if sleep_or_shutdown(&mut shutdown, pause(&inner, &flags, backoff)).await {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            Err(Step::LeaseLost) => lease_lost(&inner, &mut flags),
            Err(Step::Down(reason, kind)) => {
                if kind == Kind::Denied && first_time(&mut flags.denied, &reason) {
                    // Retried for ever (check=false, or after etcd's users changed): say so
                    // once per distinct refusal, not at every attempt.
                    tracing::warn!(registry = %inner.label, reason, "etcd refuses the credentials; retrying in the background");
                }
                down(&inner, &mut flags, &reason);
                if sleep_or_shutdown(&mut shutdown, pause(&inner, &flags, backoff)).await {
                    return;
                }
                check_expiry(&inner, &mut flags);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sleeps `d`; true when the registry shut down meanwhile.
async fn sleep_or_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = stopped(shutdown) => true,
    }
}

/// The pause before the next attempt: the backoff, cut short so a lease that expires
/// meanwhile is reported on time.
fn pause(inner: &Inner, flags: &Flags, backoff: Duration) -> Duration {
    if !flags.ever_up || flags.lost {
        return backoff;
    }
    let ttl = Duration::from_secs(u64::try_from(inner.opts.ttl_secs).unwrap_or(1));
    let left = ttl.saturating_sub(flags.renewed.elapsed()) + Duration::from_millis(5);
    backoff.min(left)
}

/// Resolves when the registry shuts down.
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn down(inner: &Inner, flags: &mut Flags, reason: &str) {
    inner.available.store(false, Ordering::Release);
    if flags.ever_up && !flags.down {
        flags.down = true;
        tracing::warn!(registry = %inner.label, reason, "lost the connection to etcd");
        inner.emit(RegistryEvent::Disconnected);
    } else {
        tracing::debug!(registry = %inner.label, reason, "etcd still unreachable");
    }
}

/// While etcd cannot be reached: once the lease's TTL has passed since its last renewal, the
/// server has (or, when it comes back, may have) dropped it and its entries. Report the loss
/// now; the lease is still tried on reconnection (etcd restarts keep leases alive), and either
/// way `NewSession` follows so every entry is put again.
fn check_expiry(inner: &Inner, flags: &mut Flags) {
    let ttl = Duration::from_secs(u64::try_from(inner.opts.ttl_secs).unwrap_or(1));
    if flags.ever_up
        && !flags.lost
        && inner.lease.load(Ordering::Acquire) != 0
        && flags.renewed.elapsed() > ttl
        && !inner.destroyed.load(Ordering::Acquire)
    {
        tracing::warn!(
            registry = %inner.label,
            unrenewed_for = ?flags.renewed.elapsed(),
            "the etcd lease could not be renewed within its TTL; its entries are presumed gone"
        );
        flags.lost = true;
        inner.emit(RegistryEvent::SessionLost);
    }
}

fn lease_lost(inner: &Inner, flags: &mut Flags) {
    let old = inner.lease.swap(0, Ordering::AcqRel);
    if inner.destroyed.load(Ordering::Acquire) {
        return;
    }
    tracing::warn!(registry = %inner.label, lease = old, "the etcd lease is gone (expired or revoked); granting a new one");
    if flags.ever_up && !flags.lost {
        flags.lost = true;
        inner.emit(RegistryEvent::SessionLost);
    }
}

enum Step {
    Down(String, Kind),
    LeaseLost,
}

fn step_err((e, kind): (Error, Kind)) -> Step {
    if kind == Kind::LeaseNotFound {
        Step::LeaseLost
    } else {
        Step::Down(e.to_string(), kind)
    }
}

/// Connects (when needed), makes sure there is a lease, and opens the keep-alive and watch
/// streams.
async fn establish(
    inner: &Inner,
    flags: &mut Flags,
    reauthenticate: bool,
) -> Result<Streams, Step> {
    let (clients, fresh) = match inner.clients() {
        Some(c) => (c, false),
        None => {
            let c = connect(inner).await.map_err(step_err)?;
            *inner.clients.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
            (c, true)
        }
    };
    if reauthenticate
        && !fresh
        && let Some((user, password)) = inner.opts.user.clone()
    {
        let mut client = clients.client.clone();
        // etcd refuses to authenticate a request that carries a stale token.
        client.remove_client_auth();
        match errors::timed(
            &inner.label,
            || "authenticating again".to_owned(),
            inner.opts.timeout,
            client.set_client_auth(user, password),
        )
        .await
        {
            Ok(()) => tracing::debug!(registry = %inner.label, "authenticated to etcd again"),
            // `connect` found authentication off and connected without the credentials.
            Err((e, _)) if e.to_string().contains("authentication is not enabled") => {}
            Err(e) => return Err(step_err(e)),
        }
    }
    let mut lease = inner.lease.load(Ordering::Acquire);
    if lease == 0 {
        if inner.destroyed.load(Ordering::Acquire) {
            return Err(Step::Down("destroyed".to_owned(), Kind::Other));
        }
        lease = grant(inner, &clients)
            .await
            .map_err(|e| Step::Down(e.0.to_string(), e.1))?;
        inner.lease.store(lease, Ordering::Release);
        flags.renewed = Instant::now();
        tracing::info!(registry = %inner.label, lease, ttl = inner.opts.ttl_secs, "granted a lease");
        if flags.ever_up && !flags.lost {
            flags.lost = true;
            inner.emit(RegistryEvent::SessionLost);
        }
    }
    let mut lc = clients.lease.clone();
    let (keeper, keep_alive) = errors::timed(
        &inner.label,
        || format!("renewing lease {lease:x}"),
        inner.opts.timeout,
        lc.keep_alive(lease),
    )
    .await
    .map_err(step_err)?;
    flags.renewed = Instant::now();
    let sentinel = put_sentinel(inner, &clients, lease, flags).await?;
    let (anchor, options) = match &sentinel {
        // From the put's revision + 1: a DELETE after the put (the lease revoked before the
        // watch is created) is still reported.
        Some((key, revision)) => (
            key.clone(),
            WatchOptions::new()
                .with_watch_id(ANCHOR_WATCH_ID)
                .with_start_revision(revision + 1),
        ),
        None => (
            inner.opts.root.clone(),
            WatchOptions::new().with_watch_id(ANCHOR_WATCH_ID),
        ),
    };
    let mut wc = clients.watch.clone();
    let (watcher, watch) = errors::timed(
        &inner.label,
        || "opening the watch stream".to_owned(),
        inner.opts.timeout,
        wc.watch(anchor, Some(options)),
    )
    .await
    .map_err(step_err)?;
    Ok(Streams {
        keeper,
        keep_alive,
        watcher,
        watch,
        sentinel: sentinel.map(|(key, _)| key),
    })
}

/// Puts the sentinel of `lease` on the lease (again, at every establish: cheap, and a lease
/// gone meanwhile shows here as "lease not found"). Returns its key and the put's revision;
/// `None` when etcd refuses the put (a user without write permission there): logged once,
/// and the lease is then watched by its keep-alive only.
async fn put_sentinel(
    inner: &Inner,
    clients: &crate::registry::Clients,
    lease: i64,
    flags: &mut Flags,
) -> Result<Option<(String, i64)>, Step> {
    let key = paths::sentinel_key(&inner.opts.root, lease);
    let mut kv = clients.kv.clone();
    let put = errors::timed(
        &inner.label,
        || format!("putting the lease sentinel {key}"),
        inner.opts.timeout,
        kv.put(
            key.clone(),
            inner.label.clone(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        ),
    )
    .await;
    match put {
        Ok(resp) => {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            flags.sentinel_denied = None;
            Ok(Some((key, revision)))
        }
        Err((e, Kind::Denied)) if !e.to_string().contains("user name is empty") => {
            let reason = e.to_string();
            if first_time(&mut flags.sentinel_denied, &reason) {
                tracing::warn!(
                    registry = %inner.label,
                    reason,
                    "etcd refuses the lease sentinel; a revoked or expired lease is noticed at the next keep-alive only"
                );
            }
            Ok(None)
        }
        Err(e) => Err(step_err(e)),
    }
}

/// Creates every watch not yet created on stream `generation`, each from its revision + 1
/// (a watch whose prefix is being read again is created when that read is done).
async fn arm_all(inner: &Inner, watcher: &mut Watcher, generation: u64) -> Result<(), String> {
    let requests: Vec<(i64, String, i64)> = {
        let mut watches = lock(&inner.watches);
        watches
            .iter_mut()
            .filter(|(_, w)| w.armed != generation && !w.resyncing)
            .map(|(id, w)| {
                w.armed = generation;
                (*id, w.prefix.clone(), w.revision + 1)
            })
            .collect()
    };
    for (id, prefix, from) in requests {
        tracing::debug!(registry = %inner.label, id, prefix, from, "watching");
        create_watch(watcher, id, prefix, from).await?;
    }
    Ok(())
}

async fn create_watch(
    watcher: &mut Watcher,
    id: i64,
    prefix: String,
    from: i64,
) -> Result<(), String> {
    watcher
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from)
                    .with_watch_id(id),
            ),
        )
        .await
        .map_err(|e| format!("creating watch {id}: {e}"))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the keep-alive task reports.
enum KeepAlive {
    Renewed,
    Ended(Exit),
}

type WatchMessage = Result<Option<WatchResponse>, etcd_client::Error>;

/// One established connection: the keep-alive task and the task that reads the watch stream
/// run on their own, so neither long reads nor sends on the watch stream can delay a renewal,
/// and the watch stream is always read while requests are sent on it.
struct Live {
    watcher: Watcher,
    watch_rx: mpsc::UnboundedReceiver<WatchMessage>,
    keep_alive_rx: mpsc::UnboundedReceiver<KeepAlive>,
    check_lease: Arc<Notify>,
    /// The lease sentinel the anchor watch is on.
    sentinel: Option<String>,
    _tasks: [AbortOnDrop; 2],
}

impl Live {
    fn start(inner: &Arc<Inner>, s: Streams) -> Live {
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let mut watch = s.watch;
        let reader = tokio::spawn(async move {
            loop {
                let m = watch.message().await;
                let end = !matches!(m, Ok(Some(_)));
                if watch_tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        let (keep_alive_tx, keep_alive_rx) = mpsc::unbounded_channel();
        let check_lease = Arc::new(Notify::new());
        let keeper = tokio::spawn(keep_alive(
            inner.clone(),
            s.keeper,
            s.keep_alive,
            check_lease.clone(),
            keep_alive_tx,
        ));
        Live {
            watcher: s.watcher,
            watch_rx,
            keep_alive_rx,
            check_lease,
            sentinel: s.sentinel,
            _tasks: [
                AbortOnDrop(reader.abort_handle()),
                AbortOnDrop(keeper.abort_handle()),
            ],
        }
    }
}

/// How long a keep-alive may stay unanswered before the connection is presumed dead: the
/// request timeout, but never more than one renewal period (TTL/3). The last renewal was at
/// most one period before the unanswered keep-alive was sent, so the loss is noticed at most
/// 2/3 of the TTL after it, leaving a third of the TTL to reconnect and renew the same lease.
/// (`timeout.max(period)` could exceed the TTL: with the default 5 s timeout and a 2 s TTL the
/// lease expired before the connection was even presumed dead.)
fn answer_timeout(opts: &crate::options::Options) -> Duration {
    opts.timeout.min(opts.keep_alive_period)
}

/// Renews the lease every TTL/3 (and when asked), until the stream fails or the lease is gone.
async fn keep_alive(
    inner: Arc<Inner>,
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    check: Arc<Notify>,
    tx: mpsc::UnboundedSender<KeepAlive>,
) {
    let period = inner.opts.keep_alive_period;
    let answer_within = answer_timeout(&inner.opts);
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unanswered: Option<Instant> = None;
    let exit = loop {
        let overdue = async {
            match unanswered {
                Some(since) => tokio::time::sleep_until(since + answer_within).await,
                None => std::future::pending().await,
            }
        };
        let send = tokio::select! {
            _ = tick.tick() => true,
            _ = check.notified() => true,
            _ = overdue => break Exit::Down(format!("no keep-alive answer for {answer_within:?}")),
            m = stream.message() => match m {
                Ok(Some(r)) => {
                    if r.ttl() <= 0 {
                        break Exit::LeaseLost;
                    }
                    unanswered = None;
                    let _ = tx.send(KeepAlive::Renewed);
                    false
                }
                Ok(None) => break Exit::Down("the keep-alive stream ended".to_owned()),
                Err(e) => break match errors::kind(&e) {
                    Kind::LeaseNotFound => Exit::LeaseLost,
                    Kind::TokenInvalid => Exit::Reauthenticate,
                    _ => Exit::Down(format!("keep-alive stream: {e}")),
                },
            },
        };
        if send {
            match tokio::time::timeout(answer_within, keeper.keep_alive()).await {
                Ok(Ok(())) => {
                    unanswered.get_or_insert_with(Instant::now);
                }
                Ok(Err(e)) => break Exit::Down(format!("sending a keep-alive: {e}")),
                Err(_) => {
                    break Exit::Down(format!("sending a keep-alive took over {answer_within:?}"));
                }
            }
        }
    };
    let _ = tx.send(KeepAlive::Ended(exit));
}

/// Why a prefix is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The watch was cancelled by the server (compaction): read, then create it again.
    Resync,
    /// The periodic re-read.
    Reread,
}

/// A read done off the session task.
struct ReadDone {
    id: i64,
    purpose: Purpose,
    result: Result<(BTreeMap<String, Url>, i64), (Error, Kind)>,
}

/// Reads run on their own tasks, at most [`READ_CONCURRENCY`] at once, and report to the
/// session task, which applies them.
pub(crate) struct Reads {
    tx: mpsc::UnboundedSender<ReadDone>,
    rx: mpsc::UnboundedReceiver<ReadDone>,
    limit: Arc<Semaphore>,
    /// Periodic re-reads not yet reported.
    rereads: usize,
}

/// How many prefixes are read at once by resyncs and the periodic re-read.
const READ_CONCURRENCY: usize = 4;

impl Reads {
    fn new() -> Reads {
        let (tx, rx) = mpsc::unbounded_channel();
        Reads {
            tx,
            rx,
            limit: Arc::new(Semaphore::new(READ_CONCURRENCY)),
            rereads: 0,
        }
    }

    fn spawn(&mut self, inner: &Arc<Inner>, id: i64, w: &WatchState, purpose: Purpose) {
        if purpose == Purpose::Reread {
            self.rereads += 1;
        }
        let (inner, tx, limit) = (inner.clone(), self.tx.clone(), self.limit.clone());
        let (prefix, scope) = (w.prefix.clone(), w.scope.clone());
        tokio::spawn(async move {
            let Ok(_permit) = limit.acquire_owned().await else {
                return;
            };
            let result = match inner.clients() {
                Some(clients) => inner.read(&clients, &prefix, &scope).await,
                None => Err((
                    Error::Unavailable {
                        registry: inner.label.clone(),
                        reason: format!("reading {prefix}: not connected"),
                    },
                    Kind::Transient,
                )),
            };
            let _ = tx.send(ReadDone {
                id,
                purpose,
                result,
            });
        });
    }
}

async fn connected(
    inner: &Arc<Inner>,
    live: &mut Live,
    reads: &mut Reads,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    generation: u64,
    flags: &mut Flags,
) -> Exit {
    let reread_period = inner
        .opts
        .reread
        .unwrap_or(Duration::from_secs(86_400 * 365));
    let mut reread_tick = tokio::time::interval_at(Instant::now() + reread_period, reread_period);
    reread_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = stopped(shutdown) => return Exit::Shutdown,
            m = live.keep_alive_rx.recv() => match m {
                Some(KeepAlive::Renewed) => flags.renewed = Instant::now(),
                Some(KeepAlive::Ended(exit)) => return exit,
                None => return Exit::Down("the keep-alive task ended".to_owned()),
            },
            m = live.watch_rx.recv() => match m {
                Some(Ok(Some(r))) => {
                    if let Err(exit) = on_watch_response(inner, reads, live.sentinel.as_deref(), r) {
                        return exit;
                    }
                }
                Some(Ok(None)) | None => return Exit::Down("the watch stream ended".to_owned()),
                Some(Err(e)) => return match errors::kind(&e) {
                    Kind::TokenInvalid => Exit::Reauthenticate,
                    Kind::TooLarge => Exit::ResyncAll(format!("watch stream: {e}")),
                    _ => Exit::Down(format!("watch stream: {e}")),
                },
            },
            done = reads.rx.recv() => {
                if let Some(done) = done
                    && let Err(exit) = on_read(inner, reads, &mut live.watcher, generation, done).await
                {
                    return exit;
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Arm) => {
                    if let Err(reason) = arm_all(inner, &mut live.watcher, generation).await {
                        return Exit::Down(reason);
                    }
                }
                Some(Cmd::Cancel(id, armed)) => {
                    if armed == generation && let Err(e) = live.watcher.cancel_by_id(id).await {
                        return Exit::Down(format!("cancelling watch {id}: {e}"));
                    }
                }
                Some(Cmd::CheckLease) => live.check_lease.notify_one(),
                Some(Cmd::Reauthenticate) => {
                    if inner.opts.user.is_some() {
                        return Exit::Reauthenticate;
                    }
                }
                None => return Exit::Shutdown,
            },
            _ = reread_tick.tick(), if inner.opts.reread.is_some() => {
                if reads.rereads > 0 {
                    tracing::debug!(registry = %inner.label, left = reads.rereads, "the previous periodic re-read is still running");
                } else {
                    let watches = lock(&inner.watches);
                    for (id, w) in watches.iter().filter(|(_, w)| !w.resyncing) {
                        reads.spawn(inner, *id, w, Purpose::Reread);
                    }
                }
            }
        }
    }
}

/// Routes one watch response by its watch id. A DELETE of the lease `sentinel` (on the anchor
/// watch) means the lease is gone.
fn on_watch_response(
    inner: &Arc<Inner>,
    reads: &mut Reads,
    sentinel: Option<&str>,
    r: WatchResponse,
) -> Result<(), Exit> {
    let id = r.watch_id();
    if r.created() && r.canceled() {
        // etcd refused to create a watch: 3.5+ answers watch id -1 with "invalid auth token"
        // or "revision of auth store is old", 3.4 the requested id with "permission denied".
        // With credentials, authenticate again and re-create every watch on a fresh stream.
        if inner.opts.user.is_some() {
            tracing::warn!(
                registry = %inner.label,
                id,
                reason = r.cancel_reason(),
                "etcd refused a watch; authenticating again and re-creating every watch"
            );
            return Err(Exit::Reauthenticate);
        }
        tracing::error!(
            registry = %inner.label,
            id,
            reason = r.cancel_reason(),
            "etcd refused a watch; the list is kept fresh by the periodic re-read only"
        );
        return Ok(());
    }
    if id == ANCHOR_WATCH_ID {
        if r.canceled() {
            return Err(Exit::Down(format!(
                "the anchor watch was cancelled: {}",
                r.cancel_reason()
            )));
        }
        let deleted = r.events().iter().any(|ev| {
            ev.event_type() == EventType::Delete
                && ev.kv().and_then(|kv| kv.key_str().ok()) == sentinel
        });
        if let (true, Some(key)) = (deleted, sentinel) {
            tracing::debug!(registry = %inner.label, key, "the lease sentinel was deleted");
            return Err(Exit::LeaseLost);
        }
        return Ok(());
    }
    if r.compact_revision() > 0 || (r.canceled() && !r.created()) {
        let mut watches = lock(&inner.watches);
        if let Some(w) = watches.get_mut(&id)
            && !w.resyncing
        {
            tracing::info!(
                registry = %inner.label,
                id,
                compact_revision = r.compact_revision(),
                reason = r.cancel_reason(),
                "watch cancelled by the server; reading the prefix again"
            );
            w.resyncing = true;
            reads.spawn(inner, id, w, Purpose::Resync);
        }
        return Ok(());
    }
    if r.created() || r.events().is_empty() {
        return Ok(());
    }
    let mut watches = lock(&inner.watches);
    let Some(w) = watches.get_mut(&id) else {
        return Ok(());
    };
    let mut changed = Changed::new();
    let mut latest = w.revision;
    for ev in r.events() {
        let Some(kv) = ev.kv() else { continue };
        let rev = kv.mod_revision();
        if rev <= w.revision {
            continue; // already in the state (read at a later revision)
        }
        latest = latest.max(rev);
        let Ok(key) = kv.key_str() else { continue };
        let url = match ev.event_type() {
            EventType::Put => match parse_key(&inner.label, &w.prefix, &w.scope, key) {
                Some((_, _, u)) => Some(u),
                None => continue,
            },
            EventType::Delete => None,
        };
        changed.extend(w.apply(key, url));
    }
    w.revision = latest;
    if !changed.is_empty() {
        w.notify_changed(&changed);
    }
    Ok(())
}

/// Applies a read done off the session task: notifies what changed; after a resync, creates
/// the watch again (under a new id) from the read's revision + 1.
async fn on_read(
    inner: &Inner,
    reads: &mut Reads,
    watcher: &mut Watcher,
    generation: u64,
    done: ReadDone,
) -> Result<(), Exit> {
    if done.purpose == Purpose::Reread {
        reads.rereads = reads.rereads.saturating_sub(1);
    }
    let create = {
        let mut watches = lock(&inner.watches);
        let Some(w) = watches.get_mut(&done.id) else {
            return Ok(()); // unsubscribed meanwhile
        };
        let (entries, revision) = match done.result {
            Ok(r) => r,
            Err((e, kind)) => {
                let token = kind == Kind::TokenInvalid && inner.opts.user.is_some();
                return match done.purpose {
                    Purpose::Reread if token => {
                        tracing::info!(registry = %inner.label, error = %e, "the auth token is no longer valid; authenticating again");
                        Err(Exit::Reauthenticate)
                    }
                    Purpose::Reread => {
                        // The other prefixes go on.
                        tracing::warn!(registry = %inner.label, prefix = w.prefix, error = %e, "periodic re-read of a prefix failed");
                        Ok(())
                    }
                    Purpose::Resync if kind == Kind::TooLarge => {
                        // Resuming would replay what was too large, and reading is too large
                        // too: this watch cannot work with the configured limit.
                        tracing::error!(
                            registry = %inner.label,
                            prefix = w.prefix,
                            error = %e,
                            "this list is larger than the registry URL parameter `{}` allows; its subscription no longer receives changes",
                            crate::options::MAX_MESSAGE_SIZE_KEY
                        );
                        watches.remove(&done.id);
                        Ok(())
                    }
                    Purpose::Resync => {
                        // Created again (and, still compacted, read again) on the next stream.
                        w.resyncing = false;
                        w.armed = 0;
                        Err(if token {
                            Exit::Reauthenticate
                        } else {
                            Exit::Down(e.to_string())
                        })
                    }
                };
            }
        };
        if revision > w.revision {
            let changed = w.replace(entries);
            w.revision = revision;
            if !changed.is_empty() {
                if done.purpose == Purpose::Reread {
                    tracing::warn!(
                        registry = %inner.label,
                        prefix = w.prefix,
                        "the periodic re-read found changes no watch event reported; notifying them"
                    );
                }
                w.notify_changed(&changed);
            }
        }
        if done.purpose == Purpose::Resync && w.resyncing {
            let Some(mut w) = watches.remove(&done.id) else {
                return Ok(());
            };
            w.resyncing = false;
            w.armed = generation;
            let new_id = inner.next_watch_id.fetch_add(1, Ordering::Relaxed);
            let create = (new_id, w.prefix.clone(), w.revision + 1);
            watches.insert(new_id, w);
            Some(create)
        } else {
            None
        }
    };
    if let Some((id, prefix, from)) = create {
        create_watch(watcher, id, prefix, from)
            .await
            .map_err(Exit::Down)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_warned_once_per_distinct_reason() {
        let mut last = None;
        assert!(first_time(&mut last, "authentication failed"));
        assert!(!first_time(&mut last, "authentication failed"));
        assert!(first_time(&mut last, "user name not found"));
        assert!(first_time(&mut last, "authentication failed"));
    }

    #[test]
    fn an_unanswered_keep_alive_is_noticed_with_a_third_of_the_ttl_left() {
        for (url, want) in [
            ("etcd://h?session=4000", 666),
            ("etcd://h?session=60000", 5000),
            ("etcd://h?session=60000&timeout=1000", 1000),
            ("etcd://h?session=2000&timeout=60000", 333),
        ] {
            let o = crate::options::Options::from_url(&url.parse().expect("url")).expect("options");
            let answer = answer_timeout(&o);
            assert_eq!(answer, Duration::from_millis(want), "{url}");
            let ttl = Duration::from_secs(u64::try_from(o.ttl_secs).expect("ttl"));
            // Last renewal, one period, then the unanswered keep-alive's deadline.
            assert!(
                o.keep_alive_period + answer <= ttl * 2 / 3 + Duration::from_millis(2),
                "{url}"
            );
        }
    }
}
