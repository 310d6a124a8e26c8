//! The session task of a registry: it owns the connection, the lease and the one watch stream.
//!
//! - **One member at a time.** Each member (endpoint) gets its own client; the registry talks
//!   to one of them, the lease keep-alive and the watch stream included, so a keep-alive that
//!   goes unanswered says the member under the watch stream is gone too. When a step fails
//!   or a member does not answer, the session moves to the next member at once (backing off
//!   only after every member failed in a row): a hung member never gets a second request.
//! - **Every step fits inside the lease.** Each step of (re-)establishing (connect,
//!   authenticate, grant, renew, sentinel put, watch open, each watch's creation) has a
//!   deadline of a sixth of the *granted* TTL (at most `timeout`), and so does the answer to a
//!   keep-alive (at most one renewal period, a third of the TTL) or to a watch creation, so
//!   the loss of a member is noticed and another one reached well before the lease expires.
//! - **Require leader.** Every request carries etcd's require-leader flag: a member cut off
//!   from the majority refuses requests and ends the watch and keep-alive streams ("no
//!   leader") instead of keeping them open and silent; HTTP/2 keep-alive pings notice a
//!   frozen member.
//! - The lease is renewed every TTL/3 by sending a keep-alive on the lease's keep-alive stream;
//!   an answer with TTL 0 (or "not found" when the stream is opened again) means the lease is
//!   gone: `SessionLost`, a new lease, then `NewSession`. While the connection is healthy the
//!   new lease is put in place on the same connection: the watch stream and its watches stay.
//! - etcd never tells a lease holder that its lease was revoked or expired server-side, so
//!   every time the streams are opened a sentinel key (`<lease prefix><root>/<lease hex>`,
//!   outside the Dubbo tree, value the registry's identity) is put on the lease, and an anchor
//!   watch is created on that key, from the put's revision + 1. etcd deletes the sentinel
//!   with the lease, so a DELETE event on the anchor watch means the lease is gone (within
//!   milliseconds instead of up to TTL/3), or that someone deleted the sentinel by hand: the
//!   old lease is then revoked before a new one is granted, so no put in flight on it ends
//!   up on a lease nobody renews. `destroy` stops this task before revoking the lease, so the
//!   DELETE that revoke causes is never seen here.
//! - Every watch of the registry is created on one watch stream with a watch id of our own, so
//!   responses are routed by id. A watch etcd refuses (no permission on its prefix) disturbs
//!   no other watch: its prefix is read again after a jittered delay (0.5–1 s, doubling up to
//!   30–60 s; whether or not the periodic re-read is on) and the watch created again after that read,
//!   until etcd accepts it; only a refusal that says the auth token is bad leads to
//!   authenticating again, paced by a jittered, growing backoff. A "permission denied" on a
//!   prefix one small read shows readable says the stream's token went stale: the streams
//!   are opened again (paced too).
//! - A broken stream (server down, network) is `Disconnected`; the task then reconnects,
//!   renews the same lease and re-creates every watch from its last revision + 1, and reports
//!   `Reconnected` (or `NewSession` when the lease did not survive).
//! - A watch cancelled for compaction is read again (the full list is notified) and created
//!   again from the read's revision + 1. A read that fails is tried again later (jittered,
//!   growing delay); the stream and the other watches are not disturbed.
//! - Every `etcd.reread.period` every watched prefix is read again, in case the server lost an
//!   event; a prefix that fails is logged and the others go on.
//! - The keep-alive runs on its own task and the watch stream is read by its own task, so
//!   neither a long read nor a send waiting on the watch stream delays a renewal, and the
//!   watch stream is always drained while create requests are sent. Resync and re-read reads
//!   run on their own tasks, at most [`READ_CONCURRENCY`] at once, and report back to the
//!   session task, which applies them and re-creates watches.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    EventType, LeaseKeepAliveStream, LeaseKeeper, WatchOptions, WatchResponse, WatchStream, Watcher,
};
use registry_core::{Error, RegistryEvent};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};

use crate::errors::{self, Kind};
use crate::paths;
use crate::shared::{Clients, Cmd, Inner, connect, grant, lock};
use crate::watches::{Batch, Entries, WatchState, parse_key};

/// The first watch id (anchor watches and subscriptions draw from the same counter).
pub(crate) const FIRST_WATCH_ID: i64 = 1;

/// Reconnection backoff, once every member failed in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A connection that lasted this long resets the reconnection backoff.
const STABLE: Duration = Duration::from_secs(5);
/// Authentication backoff: Authenticate is costly for etcd (bcrypt), and a fleet that lost
/// its tokens at once (a restarted etcd) must not stampede it.
const AUTH_MIN: Duration = Duration::from_secs(1);
const AUTH_MAX: Duration = Duration::from_secs(30);
/// Without an authentication for this long, the authentication backoff starts over.
const AUTH_STABLE: Duration = Duration::from_secs(60);
/// Delays of a failed resync read's retries.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Delays before trying a refused watch again (a missing permission is seldom granted within
/// a second, and each try is a read and a create request).
const REFUSED_MIN: Duration = Duration::from_secs(1);
const REFUSED_MAX: Duration = Duration::from_secs(60);

/// The delay before the `n`th try (from 1) of a backoff from `min` to `max`, jittered.
fn nth_delay(min: Duration, max: Duration, n: u32) -> Duration {
    jitter(
        min.saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(max),
    )
}

/// Between half and all of `d`, at random: a fleet that failed at once spreads its retries.
fn jitter(d: Duration) -> Duration {
    let n = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(n / 2..=n))
}

/// A jittered exponential backoff.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        jitter(d)
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Paces authentications: the first after a quiet period at once, then a growing, jittered
/// gap between two.
struct AuthPace {
    backoff: Backoff,
    /// When the next authentication may start.
    next_at: Option<Instant>,
    last: Option<Instant>,
}

impl AuthPace {
    fn new() -> AuthPace {
        AuthPace::between(AUTH_MIN, AUTH_MAX)
    }

    /// Gaps growing from `min` to `max` (starting over after [`AUTH_STABLE`] without one).
    fn between(min: Duration, max: Duration) -> AuthPace {
        AuthPace {
            backoff: Backoff::new(min, max),
            next_at: None,
            last: None,
        }
    }

    fn due(&self) -> bool {
        self.next_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Schedules one authentication: returns how long to wait before it.
    fn schedule(&mut self) -> Duration {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) > AUTH_STABLE)
        {
            self.backoff.reset();
        }
        let wait = self
            .next_at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        self.last = Some(now + wait);
        self.next_at = Some(now + wait + self.backoff.next());
        wait
    }
}

/// Why the connected loop ended.
enum Exit {
    Shutdown,
    /// Connection trouble; the text says what.
    Down(String),
    LeaseLost,
    /// The auth token is bad: authenticate again and open new streams.
    Reauthenticate,
    /// etcd refused a watch on a prefix the registry may read: the watch stream's auth token
    /// is stale (etcd checks the token the stream was opened with, and the same permission
    /// for a watch as for a read). Open the streams again, with the client's token.
    Reopen,
    /// A watch response was over the decoding limit (the stream is dead, and which watch it
    /// was for is unknown): open a new stream and read every watched prefix again, creating
    /// each watch after the read, so the oversized response is skipped instead of being
    /// replayed by a resume.
    ResyncAll(String),
}

struct Streams {
    clients: Clients,
    keeper: LeaseKeeper,
    keep_alive: LeaseKeepAliveStream,
    watcher: Watcher,
    watch: WatchStream,
    /// The lease sentinel the anchor watch is on (`None`: etcd refused the sentinel).
    sentinel: Option<String>,
    /// The anchor watch's id.
    anchor: i64,
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
    /// A lease to revoke before granting a new one (its sentinel was deleted by hand and the
    /// revoke could not be done then).
    revoke: Option<i64>,
}

/// Whether `reason` differs from the last one recorded in `last` (and records it).
fn first_time(last: &mut Option<String>, reason: &str) -> bool {
    if last.as_deref() == Some(reason) {
        return false;
    }
    *last = Some(reason.to_owned());
    true
}

/// The members and their clients, one at a time in use.
struct Members {
    cache: Vec<Option<Clients>>,
    current: usize,
}

impl Members {
    fn new(inner: &Inner) -> Members {
        let n = inner.opts.endpoints.len();
        let current = inner
            .member
            .load(Ordering::Acquire)
            .min(n.saturating_sub(1));
        let mut cache = vec![None; n];
        cache[current] = inner.clients();
        Members { cache, current }
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    /// Leaves the current member for the next one (after `reason`).
    fn rotate(&mut self, inner: &Inner, reason: &str) {
        let n = self.len();
        if n < 2 {
            return;
        }
        let from = self.current;
        self.current = (from + 1) % n;
        inner.member.store(self.current, Ordering::Release);
        inner.set_clients(self.cache[self.current].clone());
        tracing::info!(
            registry = %inner.label,
            from = inner.opts.endpoints[from],
            to = inner.opts.endpoints[self.current],
            reason,
            "moving to another etcd member"
        );
    }

    /// The clients of the current member (connecting them when needed), and whether they
    /// were just connected (and authenticated).
    async fn clients(&mut self, inner: &Inner) -> Result<(Clients, bool), Step> {
        if let Some(c) = &self.cache[self.current] {
            inner.set_clients(Some(c.clone()));
            return Ok((c.clone(), false));
        }
        let endpoint = &inner.opts.endpoints[self.current];
        let c = connect(inner, endpoint, inner.step_timeout())
            .await
            .map_err(step_err)?;
        self.cache[self.current] = Some(c.clone());
        inner.set_clients(Some(c.clone()));
        Ok((c, true))
    }
}

/// What made an attempt fail, for the pause before the next.
enum Failure {
    /// Connection trouble on the current member: the next member, at once.
    Down(String),
    /// The auth token is bad: authenticate again, paced.
    Token { down: Option<String> },
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
        revoke: None,
    };
    let mut members = Members::new(&inner);
    let mut generation: u64 = 0;
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut auth = AuthPace::new();
    // Streams opened again for a refused watch on a readable prefix (a stale stream token):
    // the first at once, then at growing gaps, so a refusal that is something else after all
    // cannot make a loop of them.
    let mut reopen = AuthPace::between(REFUSED_MIN, REFUSED_MAX);
    // Authenticate again only when an error said the token is bad: not at every reconnection
    // (Authenticate is costly for etcd, and a fleet reconnecting at once would stampede it).
    let mut need_auth = false;
    // Failures in a row; each moves to the next member, at once until every member failed.
    let mut failures: usize = 0;
    let mut reads = Reads::new(&inner);
    let mut resync_all = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Requests made while disconnected are stale: arming is redone below.
        while cmds.try_recv().is_ok() {}

        let failure = match establish(
            &inner,
            &mut members,
            &mut flags,
            std::mem::take(&mut need_auth),
        )
        .await
        {
            Ok(streams) => {
                generation += 1;
                let mut live = Live::start(&inner, streams);
                if std::mem::take(&mut resync_all) {
                    let mut watches = lock(&inner.watches);
                    for (id, w) in watches.iter_mut().filter(|(_, w)| !w.resyncing) {
                        w.resyncing = true;
                        reads.spawn(&inner, *id, w, Purpose::Resync, Duration::ZERO);
                    }
                }
                if let Err(reason) = arm_all(&inner, &mut live, &mut reads, generation).await {
                    Failure::Down(reason)
                } else {
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
                    failures = 0;
                    let since = Instant::now();
                    let exit = connected(
                        &inner,
                        &mut live,
                        &mut reads,
                        &mut cmds,
                        &mut shutdown,
                        generation,
                        &mut flags,
                        &mut auth,
                        &mut reopen,
                    )
                    .await;
                    drop(live);
                    if since.elapsed() >= STABLE {
                        backoff.reset();
                    }
                    match exit {
                        Exit::Shutdown => return,
                        Exit::Down(reason) => Failure::Down(reason),
                        Exit::LeaseLost => {
                            lease_lost(&inner, &mut flags);
                            continue;
                        }
                        Exit::ResyncAll(reason) => {
                            tracing::warn!(
                                registry = %inner.label,
                                reason,
                                "a watch response was over the decoding limit; reading every watched prefix again instead of resuming"
                            );
                            resync_all = true;
                            continue;
                        }
                        Exit::Reauthenticate => Failure::Token { down: None },
                        // Paced where it is decided (`on_refused`).
                        Exit::Reopen => continue,
                    }
                }
            }
            Err(Step::LeaseLost) => {
                lease_lost(&inner, &mut flags);
                continue;
            }
            Err(Step::Down(reason, Kind::TokenInvalid)) => Failure::Token { down: Some(reason) },
            // With credentials, "user name is empty" says the request went without a token (a
            // re-authentication that failed dropped it): authenticate again, paced.
            Err(Step::Down(reason, Kind::Denied))
                if inner.opts.user.is_some() && reason.contains("user name is empty") =>
            {
                Failure::Token { down: Some(reason) }
            }
            Err(Step::Down(reason, kind)) => {
                if kind == Kind::Denied && first_time(&mut flags.denied, &reason) {
                    // Retried for ever (check=false, or after etcd's users changed): say so
                    // once per distinct refusal, not at every attempt.
                    tracing::warn!(registry = %inner.label, reason, "etcd refuses the credentials; retrying in the background");
                }
                Failure::Down(reason)
            }
        };
        let wait = match failure {
            Failure::Down(reason) => {
                down(&inner, &mut flags, &reason);
                members.rotate(&inner, &reason);
                failures += 1;
                // The next member at once; once every member failed in a row, back off.
                if failures.is_multiple_of(members.len()) {
                    backoff.next()
                } else {
                    Duration::ZERO
                }
            }
            Failure::Token { down: reason } => {
                if let Some(reason) = reason {
                    down(&inner, &mut flags, &reason);
                }
                need_auth = true;
                auth.schedule()
            }
        };
        // The lease stays renewed while waiting (keep-alives need no auth token, so also while
        // authentication is paced), on the member the next attempt uses.
        let renew_on = members.cache[members.current].clone();
        if !wait.is_zero() && wait_renewing(&inner, &mut flags, renew_on, wait, &mut shutdown).await
        {
            return;
        }
        check_expiry(&inner, &mut flags);
    }
}

/// Waits `wait` before the next attempt (true when the registry shut down meanwhile), renewing
/// the lease meanwhile on `clients` (when there are some): a wait can be long (authentication
/// is paced up to [`AUTH_MAX`]), longer than the lease's TTL. When the lease goes unrenewed for
/// its TTL all the same (the member does not answer), the loss is reported on time.
async fn wait_renewing(
    inner: &Arc<Inner>,
    flags: &mut Flags,
    clients: Option<Clients>,
    wait: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let end = Instant::now() + wait;
    let lease = inner.lease.load(Ordering::Acquire);
    let (tx, mut renewed) = mpsc::unbounded_channel();
    let _renewer = clients.filter(|_| lease != 0).map(|c| {
        AbortOnDrop(tokio::spawn(renew_while_waiting(inner.clone(), c, lease, tx)).abort_handle())
    });
    // Whether the expiry was checked since the last renewal: a check that reports nothing
    // (no lease, or destroyed) is not done again until a renewal moves the expiry.
    let mut checked = false;
    loop {
        let reported = !flags.ever_up || flags.lost;
        let expiry = flags.renewed + inner.ttl() + Duration::from_millis(5);
        tokio::select! {
            _ = tokio::time::sleep_until(end) => return *shutdown.borrow(),
            _ = stopped(shutdown) => return true,
            Some(()) = renewed.recv() => {
                flags.renewed = Instant::now();
                checked = false;
            }
            _ = tokio::time::sleep_until(expiry), if !reported && !checked => {
                check_expiry(inner, flags);
                checked = true;
            }
        }
    }
}

/// Renews `lease` on `clients` every keep-alive period until aborted or the lease is gone;
/// reports each renewal. A failure is logged and tried again at the next period.
async fn renew_while_waiting(
    inner: Arc<Inner>,
    clients: Clients,
    lease: i64,
    renewed: mpsc::UnboundedSender<()>,
) {
    let (period, within) = (inner.keep_alive_period(), answer_timeout(&inner));
    loop {
        let mut lc = clients.lease.clone();
        let opened = errors::timed(
            &inner.label,
            || format!("renewing lease {lease:x} at {}", clients.endpoint),
            inner.step_timeout(),
            lc.keep_alive(lease),
        )
        .await;
        match opened {
            Ok((mut keeper, mut stream)) => loop {
                let answer = tokio::time::timeout(within, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
                match answer {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        tracing::debug!(registry = %inner.label, lease, "renewed the lease while waiting");
                        let _ = renewed.send(());
                    }
                    // Gone: the next attempt finds out.
                    Ok(Ok(Some(_))) => return,
                    Ok(Err(e)) if errors::kind(&e) == Kind::LeaseNotFound => return,
                    Ok(Err(e)) => {
                        tracing::debug!(registry = %inner.label, lease, error = %e, "no renewal while waiting");
                        break;
                    }
                    Ok(Ok(None)) | Err(_) => {
                        tracing::debug!(registry = %inner.label, lease, "no keep-alive answer while waiting");
                        break;
                    }
                }
                tokio::time::sleep(period).await;
            },
            Err((_, Kind::LeaseNotFound)) => return,
            Err((e, _)) => {
                tracing::debug!(registry = %inner.label, lease, error = %e, "no renewal while waiting");
            }
        }
        tokio::time::sleep(period).await;
    }
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

/// While etcd cannot be reached: once the lease's granted TTL has passed since its last
/// renewal, the server has (or, when it comes back, may have) dropped it and its entries.
/// Report the loss now; the lease is still tried on reconnection (etcd restarts keep leases
/// alive), and either way `NewSession` follows so every entry is put again.
fn check_expiry(inner: &Inner, flags: &mut Flags) {
    if flags.ever_up
        && !flags.lost
        && inner.lease.load(Ordering::Acquire) != 0
        && flags.renewed.elapsed() > inner.ttl()
        && !inner.destroyed.load(Ordering::Acquire)
    {
        tracing::warn!(
            registry = %inner.label,
            unrenewed_for = ?flags.renewed.elapsed(),
            ttl = ?inner.ttl(),
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
    if old != 0 {
        tracing::warn!(registry = %inner.label, lease = old, "the etcd lease is gone (expired or revoked); granting a new one");
    }
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

/// Authenticates `clients` again (within `within`).
async fn reauthenticate(
    inner: &Inner,
    clients: &Clients,
    within: Duration,
) -> Result<(), (Error, Kind)> {
    let Some((user, password)) = inner.opts.user.clone() else {
        return Ok(());
    };
    let mut client = clients.client.clone();
    // etcd refuses to authenticate a request that carries a stale token.
    client.remove_client_auth();
    match errors::timed(
        &inner.label,
        || format!("authenticating again at {}", clients.endpoint),
        within,
        client.set_client_auth(user, password),
    )
    .await
    {
        Ok(()) => {
            tracing::debug!(registry = %inner.label, "authenticated to etcd again");
            Ok(())
        }
        // `connect` found authentication off and connected without the credentials.
        Err((e, _)) if e.to_string().contains("authentication is not enabled") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Revokes `lease` (already gone counts as done).
async fn revoke(
    inner: &Inner,
    clients: &Clients,
    lease: i64,
    within: Duration,
) -> Result<(), (Error, Kind)> {
    let mut l = clients.lease.clone();
    match errors::timed(
        &inner.label,
        || format!("revoking lease {lease:x}"),
        within,
        l.revoke(lease),
    )
    .await
    {
        Ok(_) | Err((_, Kind::LeaseNotFound)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The key and options of the anchor watch `id`: on the sentinel from the put's revision + 1
/// (a DELETE after the put, the lease revoked before the watch is created, is still
/// reported), or on the sentinel prefix itself (no key of it is ever deleted by a lease of
/// ours: keep-alive detection only) when etcd refused the sentinel.
fn anchor_watch(
    inner: &Inner,
    sentinel: &Option<(String, i64)>,
    id: i64,
) -> (String, WatchOptions) {
    match sentinel {
        Some((key, revision)) => (
            key.clone(),
            WatchOptions::new()
                .with_watch_id(id)
                .with_start_revision(revision + 1),
        ),
        None => (
            inner.opts.lease_prefix.clone(),
            WatchOptions::new().with_watch_id(id),
        ),
    }
}

/// Connects (when needed) to the current member, makes sure there is a lease, and opens the
/// keep-alive and watch streams; every step within [`Inner::step_timeout`].
async fn establish(
    inner: &Inner,
    members: &mut Members,
    flags: &mut Flags,
    need_auth: bool,
) -> Result<Streams, Step> {
    let step = inner.step_timeout();
    let (clients, fresh) = members.clients(inner).await?;
    if need_auth && !fresh {
        reauthenticate(inner, &clients, step)
            .await
            .map_err(step_err)?;
    }
    if let Some(old) = flags.revoke {
        revoke(inner, &clients, old, step).await.map_err(step_err)?;
        flags.revoke = None;
    }
    let mut lease = inner.lease.load(Ordering::Acquire);
    if lease == 0 {
        if inner.destroyed.load(Ordering::Acquire) {
            return Err(Step::Down("destroyed".to_owned(), Kind::Other));
        }
        lease = grant(inner, &clients, step)
            .await
            .map_err(|e| Step::Down(e.0.to_string(), e.1))?;
        inner.lease.store(lease, Ordering::Release);
        flags.renewed = Instant::now();
        tracing::info!(registry = %inner.label, lease, ttl = ?inner.ttl(), "granted a lease");
        if flags.ever_up && !flags.lost {
            flags.lost = true;
            inner.emit(RegistryEvent::SessionLost);
        }
    }
    let mut lc = clients.lease.clone();
    let (keeper, keep_alive) = errors::timed(
        &inner.label,
        || format!("renewing lease {lease:x} at {}", clients.endpoint),
        step,
        lc.keep_alive(lease),
    )
    .await
    .map_err(step_err)?;
    flags.renewed = Instant::now();
    let sentinel = put_sentinel(inner, &clients, lease, flags, step).await?;
    let anchor = inner.next_watch_id.fetch_add(1, Ordering::Relaxed);
    let (key, options) = anchor_watch(inner, &sentinel, anchor);
    let mut wc = clients.watch.clone();
    let (watcher, watch) = errors::timed(
        &inner.label,
        || format!("opening the watch stream at {}", clients.endpoint),
        step,
        wc.watch(key, Some(options)),
    )
    .await
    .map_err(step_err)?;
    Ok(Streams {
        clients,
        keeper,
        keep_alive,
        watcher,
        watch,
        sentinel: sentinel.map(|(key, _)| key),
        anchor,
    })
}

/// Puts the sentinel of `lease` on the lease (again, at every establish: cheap, and a lease
/// gone meanwhile shows here as "lease not found"). Returns its key and the put's revision;
/// `None` when etcd refuses the put (a user without write permission there): logged once,
/// and the lease is then watched by its keep-alive only.
async fn put_sentinel(
    inner: &Inner,
    clients: &Clients,
    lease: i64,
    flags: &mut Flags,
    within: Duration,
) -> Result<Option<(String, i64)>, Step> {
    let key = paths::sentinel_key(&inner.opts.lease_prefix, &inner.opts.root, lease);
    let mut kv = clients.kv.clone();
    let put = errors::timed(
        &inner.label,
        || format!("putting the lease sentinel {key} at {}", clients.endpoint),
        within,
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
                    "etcd refuses the lease sentinel (grant write permission on the `{}` prefix); a revoked or expired lease is noticed at the next keep-alive only",
                    crate::options::LEASE_PREFIX_KEY
                );
            }
            Ok(None)
        }
        Err(e) => Err(step_err(e)),
    }
}

/// Creates every watch not yet created on stream `generation`, each from its revision + 1
/// (a watch whose prefix is being read again is created when that read is done).
/// A refused watch is created again here too: its pending retry is stopped (a refusal starts
/// a new one), so a watch has one retry at most however often the stream is opened again.
async fn arm_all(
    inner: &Inner,
    live: &mut Live,
    reads: &mut Reads,
    generation: u64,
) -> Result<(), String> {
    let requests: Vec<(i64, String, i64)> = {
        let mut watches = lock(&inner.watches);
        watches
            .iter_mut()
            .filter(|(_, w)| w.armed != generation && !w.resyncing)
            .map(|(id, w)| {
                w.armed = generation;
                w.refused = false;
                (*id, w.prefix.clone(), w.revision + 1)
            })
            .collect()
    };
    for (id, ..) in &requests {
        reads.stop_retry(*id);
    }
    for (id, prefix, from) in requests {
        tracing::debug!(registry = %inner.label, id, prefix, from, "watching");
        live.create_watch(id, prefix, from).await?;
    }
    Ok(())
}

/// When the unanswered creates are due, as the deadline the session task had set passed at
/// `now`: never when none waits (`waiting`); a step from now when messages of the stream wait
/// to be handled (`queued`: the session task was busy elsewhere, the answers may be among
/// them); else a step after the stream's `last` message taken off it by the reader task (the
/// deadline counts from the stream's last message, not from when the session task looked),
/// which is `now` or earlier when the stream stayed silent for a step.
fn creates_due(
    waiting: bool,
    queued: bool,
    last: Option<Instant>,
    step: Duration,
    now: Instant,
) -> Option<Instant> {
    if !waiting {
        return None;
    }
    if queued {
        return Some(now + step);
    }
    match last {
        Some(last) if last + step > now => Some(last + step),
        _ => Some(now),
    }
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
    clients: Clients,
    watcher: Watcher,
    watch_rx: mpsc::UnboundedReceiver<WatchMessage>,
    keep_alive_rx: mpsc::UnboundedReceiver<KeepAlive>,
    check_lease: Arc<Notify>,
    /// The lease sentinel the anchor watch is on.
    sentinel: Option<String>,
    /// The anchor watch's id.
    anchor: i64,
    /// The ids of the create requests sent and not yet answered, in order: etcd answers them
    /// in order, and a refusal may carry watch id -1 (etcd 3.5+).
    pending: VecDeque<i64>,
    /// By when the oldest unanswered create request must be answered (`None`: none waits): a
    /// step after it was sent or after the stream's last message, whichever is later (etcd
    /// answers creates in order, and a stream that delivers is alive). A member that answers
    /// none in time is left, like one that does not answer a keep-alive.
    create_due: Option<Instant>,
    /// The deadline of one step ([`Inner::step_timeout`]) when the connection was made.
    step: Duration,
    /// When the reader task took the stream's last message off the stream, in milliseconds
    /// after `started` (0: none yet): the stream's progress, also while the session task is
    /// busy elsewhere and that message waits in `watch_rx`.
    last_message: Arc<AtomicU64>,
    started: Instant,
    _reader: AbortOnDrop,
    keeper: AbortOnDrop,
}

impl Live {
    fn start(inner: &Arc<Inner>, s: Streams) -> Live {
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let mut watch = s.watch;
        let started = Instant::now();
        let last_message = Arc::new(AtomicU64::new(0));
        let last = last_message.clone();
        let reader = tokio::spawn(async move {
            loop {
                let m = watch.message().await;
                let at = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                last.store(at.max(1), Ordering::Release);
                let end = !matches!(m, Ok(Some(_)));
                if watch_tx.send(m).is_err() || end {
                    return;
                }
            }
        });
        let check_lease = Arc::new(Notify::new());
        let (keeper, keep_alive_rx) =
            spawn_keep_alive(inner, s.keeper, s.keep_alive, check_lease.clone());
        Live {
            clients: s.clients,
            watcher: s.watcher,
            watch_rx,
            keep_alive_rx,
            check_lease,
            sentinel: s.sentinel,
            anchor: s.anchor,
            pending: VecDeque::new(),
            create_due: None,
            step: inner.step_timeout(),
            last_message,
            started,
            _reader: AbortOnDrop(reader.abort_handle()),
            keeper,
        }
    }

    async fn create_watch(&mut self, id: i64, prefix: String, from: i64) -> Result<(), String> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_watch_id(id);
        self.send_create(id, prefix, options).await
    }

    /// Sends a create request (within a step: the request channel is full when the member
    /// takes nothing more) and expects its answer within a step ([`Live::create_due`]).
    async fn send_create(
        &mut self,
        id: i64,
        key: String,
        options: WatchOptions,
    ) -> Result<(), String> {
        self.pending.push_back(id);
        self.create_due
            .get_or_insert_with(|| Instant::now() + self.step);
        match tokio::time::timeout(self.step, self.watcher.watch(key, Some(options))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("creating watch {id}: {e}")),
            Err(_) => Err(format!(
                "creating watch {id}: the request was not taken within {:?}",
                self.step
            )),
        }
    }

    /// Cancels watch `id` (the request sent within a step).
    async fn cancel(&mut self, id: i64) -> Result<(), String> {
        match tokio::time::timeout(self.step, self.watcher.cancel_by_id(id)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cancelling watch {id}: {e}")),
            Err(_) => Err(format!(
                "cancelling watch {id}: the request was not taken within {:?}",
                self.step
            )),
        }
    }

    /// The watch stream delivered a message: the creates still unanswered get a new step.
    fn stream_progress(&mut self) {
        self.create_due = (!self.pending.is_empty()).then(|| Instant::now() + self.step);
    }

    /// The deadline of the unanswered creates passed as the session task saw it: whether it
    /// really did ([`creates_due`]). `false`: the deadline was pushed back (or nothing waits).
    fn creates_overdue(&mut self) -> bool {
        let last = self.last_message.load(Ordering::Acquire);
        let last = (last > 0).then(|| self.started + Duration::from_millis(last));
        self.create_due = creates_due(
            !self.pending.is_empty(),
            !self.watch_rx.is_empty(),
            last,
            self.step,
            Instant::now(),
        );
        self.create_due.is_some_and(|due| due <= Instant::now())
    }

    /// The lease is gone (or its sentinel was deleted by hand, `revoke`), the connection is
    /// healthy: puts a new lease in place on the same connection, keeping the watch stream
    /// and its watches. The old lease is revoked first when asked, so no put in flight on it
    /// ends up on a lease nobody renews.
    async fn replace_lease(
        &mut self,
        inner: &Arc<Inner>,
        flags: &mut Flags,
        revoke_old: bool,
    ) -> Result<(), Exit> {
        let old = inner.lease.load(Ordering::Acquire);
        lease_lost(inner, flags);
        if inner.destroyed.load(Ordering::Acquire) {
            return Err(Exit::Shutdown);
        }
        let step = inner.step_timeout();
        let clients = self.clients.clone();
        let down = |(e, kind): (Error, Kind)| match kind {
            Kind::TokenInvalid => Exit::Reauthenticate,
            _ => Exit::Down(e.to_string()),
        };
        if revoke_old && old != 0 {
            if let Err(e) = revoke(inner, &clients, old, step).await {
                flags.revoke = Some(old);
                return Err(down(e));
            }
            tracing::info!(registry = %inner.label, lease = old, "revoked the lease whose sentinel was deleted");
        }
        let lease = grant(inner, &clients, step).await.map_err(down)?;
        inner.lease.store(lease, Ordering::Release);
        flags.renewed = Instant::now();
        let mut lc = clients.lease.clone();
        let (keeper, stream) = errors::timed(
            &inner.label,
            || format!("renewing lease {lease:x} at {}", clients.endpoint),
            step,
            lc.keep_alive(lease),
        )
        .await
        .map_err(|e| match e.1 {
            Kind::LeaseNotFound => Exit::LeaseLost,
            _ => down(e),
        })?;
        let (task, rx) = spawn_keep_alive(inner, keeper, stream, self.check_lease.clone());
        self.keeper = task;
        self.keep_alive_rx = rx;
        let sentinel = put_sentinel(inner, &clients, lease, flags, step)
            .await
            .map_err(|s| match s {
                Step::LeaseLost => Exit::LeaseLost,
                Step::Down(reason, Kind::TokenInvalid) => {
                    tracing::debug!(registry = %inner.label, reason, "the auth token is bad");
                    Exit::Reauthenticate
                }
                Step::Down(reason, _) => Exit::Down(reason),
            })?;
        let anchor = inner.next_watch_id.fetch_add(1, Ordering::Relaxed);
        let (key, options) = anchor_watch(inner, &sentinel, anchor);
        self.step = inner.step_timeout();
        self.send_create(anchor, key, options)
            .await
            .map_err(|e| Exit::Down(format!("the anchor watch: {e}")))?;
        let old_anchor = std::mem::replace(&mut self.anchor, anchor);
        self.sentinel = sentinel.map(|(k, _)| k);
        self.cancel(old_anchor)
            .await
            .map_err(|e| Exit::Down(format!("the old anchor watch: {e}")))?;
        tracing::info!(registry = %inner.label, lease, ttl = ?inner.ttl(), "granted a new lease on the same connection; the watches stay");
        flags.lost = false;
        inner.emit(RegistryEvent::NewSession);
        Ok(())
    }
}

fn spawn_keep_alive(
    inner: &Arc<Inner>,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    check: Arc<Notify>,
) -> (AbortOnDrop, mpsc::UnboundedReceiver<KeepAlive>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(keep_alive(inner.clone(), keeper, stream, check, tx));
    (AbortOnDrop(task.abort_handle()), rx)
}

/// How long a keep-alive may stay unanswered before the member is presumed gone: one step
/// (a sixth of the granted TTL, at most the request timeout), never more than one renewal
/// period (TTL/3). The last renewal was at most one period before the unanswered keep-alive
/// was sent, so the loss is noticed at most half the TTL after it, leaving half the TTL to
/// move to another member and renew the same lease.
fn answer_timeout(inner: &Inner) -> Duration {
    inner.step_timeout().min(inner.keep_alive_period())
}

/// Renews the lease every TTL/3 (and when asked), until the stream fails or the lease is gone.
async fn keep_alive(
    inner: Arc<Inner>,
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    check: Arc<Notify>,
    tx: mpsc::UnboundedSender<KeepAlive>,
) {
    let period = inner.keep_alive_period();
    let answer_within = answer_timeout(&inner);
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
    /// etcd refused the watch: read, then create it again.
    Retry,
}

/// A read done off the session task.
struct ReadDone {
    id: i64,
    purpose: Purpose,
    /// The retry's sequence number ([`Purpose::Retry`]; 0 otherwise).
    seq: u64,
    /// Whether it was read again after a failure (a delayed retry).
    again: bool,
    /// A retry counts as pending until its read is applied (or it is aborted).
    _pending: Option<AliveGuard>,
    result: Result<(Entries, i64), (Error, Kind)>,
}

/// Reads run on their own tasks, at most [`READ_CONCURRENCY`] at once, and report to the
/// session task, which applies them.
pub(crate) struct Reads {
    tx: mpsc::UnboundedSender<ReadDone>,
    rx: mpsc::UnboundedReceiver<ReadDone>,
    limit: Arc<Semaphore>,
    /// Periodic re-reads not yet reported.
    rereads: usize,
    /// Failed resync reads of a watch in a row (for the delay before the next).
    retries: HashMap<i64, u32>,
    /// The one pending retry of each refused watch: its sequence number (a reported read of
    /// an older one is stale and dropped) and its task (aborted when the watch is created
    /// again, cancelled, retried anew, or the session ends).
    refused: HashMap<i64, (u64, tokio::task::AbortHandle)>,
    /// The sequence number of the last retry started.
    refused_seq: u64,
    /// Retries of refused watches pending: started, and their read not yet applied (for
    /// tests: each chain of retries of a watch counts one).
    alive_retries: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Reads {
    fn drop(&mut self) {
        for (_, (_, task)) in self.refused.drain() {
            task.abort();
        }
    }
}

/// Counts a retry as pending until dropped (its task aborted, or its read applied).
struct AliveGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many prefixes are read at once by resyncs and the periodic re-read.
pub(crate) const READ_CONCURRENCY: usize = 4;

impl Reads {
    fn new(inner: &Inner) -> Reads {
        let (tx, rx) = mpsc::unbounded_channel();
        Reads {
            tx,
            rx,
            limit: Arc::new(Semaphore::new(READ_CONCURRENCY)),
            rereads: 0,
            retries: HashMap::new(),
            refused: HashMap::new(),
            refused_seq: 0,
            alive_retries: inner.refused_retries.clone(),
        }
    }

    /// Stops the pending retry of refused watch `id`, if any (the watch was created again,
    /// cancelled, or gets a new retry).
    fn stop_retry(&mut self, id: i64) {
        if let Some((_, task)) = self.refused.remove(&id) {
            task.abort();
        }
    }

    /// Whether `done` is the report of the current retry of its watch (and forgets that
    /// retry); a stale one (its retry was stopped after it read) is to be dropped.
    fn current_retry(&mut self, done: &ReadDone) -> bool {
        match self.refused.get(&done.id) {
            Some((seq, _)) if *seq == done.seq => {
                self.refused.remove(&done.id);
                true
            }
            _ => false,
        }
    }

    /// Reads the prefix of watch `id` after `delay`.
    fn spawn(
        &mut self,
        inner: &Arc<Inner>,
        id: i64,
        w: &WatchState,
        purpose: Purpose,
        delay: Duration,
    ) {
        if purpose == Purpose::Reread {
            self.rereads += 1;
        }
        let seq = if purpose == Purpose::Retry {
            self.stop_retry(id);
            self.refused_seq += 1;
            self.alive_retries.fetch_add(1, Ordering::AcqRel);
            self.refused_seq
        } else {
            0
        };
        let alive = (purpose == Purpose::Retry).then(|| AliveGuard(self.alive_retries.clone()));
        let (inner, tx, limit) = (inner.clone(), self.tx.clone(), self.limit.clone());
        let (prefix, scope) = (w.prefix.clone(), w.scope.clone());
        let task = tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
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
                seq,
                again: !delay.is_zero(),
                _pending: alive,
                result,
            });
        });
        if purpose == Purpose::Retry {
            self.refused.insert(id, (seq, task.abort_handle()));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connected(
    inner: &Arc<Inner>,
    live: &mut Live,
    reads: &mut Reads,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    generation: u64,
    flags: &mut Flags,
    auth: &mut AuthPace,
    reopen: &mut AuthPace,
) -> Exit {
    let reread_period = inner
        .opts
        .reread
        .unwrap_or(Duration::from_secs(86_400 * 365));
    let mut reread_tick = tokio::time::interval_at(Instant::now() + reread_period, reread_period);
    reread_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        let create_due = live.create_due;
        let unanswered = async {
            match create_due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            _ = stopped(shutdown) => Err(Exit::Shutdown),
            _ = unanswered => if live.creates_overdue() {
                Err(Exit::Down(format!(
                    "etcd answered no watch creation for {:?}",
                    live.step
                )))
            } else {
                Ok(())
            },
            m = live.keep_alive_rx.recv() => match m {
                Some(KeepAlive::Renewed) => {
                    flags.renewed = Instant::now();
                    Ok(())
                }
                // The lease is gone, the connection works: a new lease on it.
                Some(KeepAlive::Ended(Exit::LeaseLost)) => live.replace_lease(inner, flags, false).await,
                Some(KeepAlive::Ended(exit)) => Err(exit),
                None => Err(Exit::Down("the keep-alive task ended".to_owned())),
            },
            m = live.watch_rx.recv() => match m {
                Some(Ok(Some(r))) => match on_watch_response(inner, reads, live, r).inspect(|_| live.stream_progress()) {
                    Ok(Seen::Nothing) => Ok(()),
                    Ok(Seen::SentinelDeleted) => live.replace_lease(inner, flags, true).await,
                    Ok(Seen::Refused(id, reason)) => on_refused(inner, reads, live, reopen, generation, id, reason).await,
                    Err(exit) => Err(exit),
                },
                Some(Ok(None)) | None => Err(Exit::Down("the watch stream ended".to_owned())),
                Some(Err(e)) => Err(match errors::kind(&e) {
                    Kind::TokenInvalid => Exit::Reauthenticate,
                    Kind::TooLarge => Exit::ResyncAll(format!("watch stream: {e}")),
                    _ => Exit::Down(format!("watch stream: {e}")),
                }),
            },
            done = reads.rx.recv() => match done {
                Some(done) => on_read(inner, reads, live, generation, done).await,
                None => Ok(()),
            },
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Arm) => arm_all(inner, live, reads, generation).await.map_err(Exit::Down),
                Some(Cmd::Cancel(id, armed)) => {
                    reads.stop_retry(id);
                    if armed == generation && let Err(e) = live.cancel(id).await {
                        Err(Exit::Down(e))
                    } else {
                        Ok(())
                    }
                }
                Some(Cmd::CheckLease) => {
                    live.check_lease.notify_one();
                    Ok(())
                }
                Some(Cmd::Reauthenticate) => {
                    // A unary request met a stale token: a new token for the requests; the
                    // watch stream and its watches stay. Paced: many requests report at once.
                    if inner.opts.user.is_some() && auth.due() {
                        auth.schedule();
                        match reauthenticate(inner, &live.clients, inner.step_timeout()).await {
                            Ok(()) => Ok(()),
                            Err((e, Kind::Denied)) => {
                                tracing::warn!(registry = %inner.label, error = %e, "etcd refuses the credentials");
                                Ok(())
                            }
                            Err((e, _)) => Err(Exit::Down(e.to_string())),
                        }
                    } else {
                        Ok(())
                    }
                }
                None => Err(Exit::Shutdown),
            },
            _ = reread_tick.tick(), if inner.opts.reread.is_some() => {
                if reads.rereads > 0 {
                    tracing::debug!(registry = %inner.label, left = reads.rereads, "the previous periodic re-read is still running");
                } else {
                    let watches = lock(&inner.watches);
                    for (id, w) in watches.iter().filter(|(_, w)| !w.resyncing) {
                        reads.spawn(inner, *id, w, Purpose::Reread, Duration::ZERO);
                    }
                }
                Ok(())
            }
        };
        if let Err(exit) = step {
            return exit;
        }
    }
}

/// What a watch response asks of the session.
enum Seen {
    Nothing,
    /// The lease sentinel was deleted (the lease is gone, or someone deleted it by hand).
    SentinelDeleted,
    /// etcd refused to create a watch (`None`: one it cannot be told which), for the reason.
    Refused(Option<i64>, String),
}

/// Whether a refusal says the auth token is bad (rather than a missing permission).
fn token_refusal(reason: &str) -> bool {
    reason.contains("invalid auth token")
        || reason.contains("auth token is expired")
        || reason.contains("revision of auth store is old")
        || reason.contains("user name is empty")
}

/// Routes one watch response by its watch id.
fn on_watch_response(
    inner: &Arc<Inner>,
    reads: &mut Reads,
    live: &mut Live,
    r: WatchResponse,
) -> Result<Seen, Exit> {
    let id = r.watch_id();
    if r.created() {
        // Create requests are answered in order.
        let asked = live.pending.pop_front();
        if r.canceled() {
            // etcd refused to create a watch: 3.5+ answers watch id -1, 3.4 the id asked.
            let which = if id == -1 { asked } else { Some(id) };
            return Ok(Seen::Refused(which, r.cancel_reason().to_owned()));
        }
        if let Some(w) = lock(&inner.watches).get_mut(&id) {
            w.refusals = 0;
        }
    }
    if id == live.anchor {
        if r.canceled() {
            return Err(Exit::Down(format!(
                "the anchor watch was cancelled: {}",
                r.cancel_reason()
            )));
        }
        let sentinel = live.sentinel.as_deref();
        let deleted = r.events().iter().any(|ev| {
            ev.event_type() == EventType::Delete
                && ev.kv().and_then(|kv| kv.key_str().ok()) == sentinel
        });
        if let (true, Some(key)) = (deleted, sentinel) {
            tracing::info!(registry = %inner.label, key, "the lease sentinel was deleted");
            return Ok(Seen::SentinelDeleted);
        }
        return Ok(Seen::Nothing);
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
            reads.spawn(inner, id, w, Purpose::Resync, Duration::ZERO);
        }
        return Ok(Seen::Nothing);
    }
    if r.created() || r.events().is_empty() {
        return Ok(Seen::Nothing);
    }
    let mut watches = lock(&inner.watches);
    let Some(w) = watches.get_mut(&id) else {
        return Ok(Seen::Nothing);
    };
    let mut batch = Batch::default();
    let mut latest = w.revision;
    for ev in r.events() {
        let Some(kv) = ev.kv() else { continue };
        let rev = kv.mod_revision();
        if rev <= w.revision {
            continue; // already in the keeper (read at a later revision)
        }
        latest = latest.max(rev);
        let Ok(key) = kv.key_str() else { continue };
        // A delete event carries the key only: the key encodes the URL.
        if let Some((service, category, url)) = parse_key(&inner.label, &w.prefix, &w.scope, key) {
            batch.add(
                service,
                category,
                url,
                ev.event_type() == EventType::Put,
                rev,
            );
        }
    }
    w.revision = latest;
    // Under the watches lock: a read of the same prefix is applied before or after, never
    // in the middle.
    batch.feed(&inner.keeper);
    Ok(Seen::Nothing)
}

/// etcd refused to create watch `id`. A bad token: authenticate again (paced) and open a new
/// stream. Anything else (a missing permission on the prefix): the others are not disturbed,
/// and that watch is tried again (its prefix read, then the watch created) after a jittered
/// delay that grows with its refusals in a row. etcd says "permission denied" for a bad or
/// expired token of the stream too: with credentials, one small read of the prefix tells
/// them apart. A bad client token fails the read too: authenticate again. A read that
/// succeeds says the stream's token is stale while the client's is good (authenticated
/// again in place since the stream was opened): the streams are opened again with it
/// (paced by `reopen`; between two, the refusal is taken for a missing permission).
async fn on_refused(
    inner: &Arc<Inner>,
    reads: &mut Reads,
    live: &mut Live,
    reopen: &mut AuthPace,
    generation: u64,
    id: Option<i64>,
    reason: String,
) -> Result<(), Exit> {
    inner.refusals.fetch_add(1, Ordering::AcqRel);
    if token_refusal(&reason) && inner.opts.user.is_some() {
        tracing::info!(registry = %inner.label, ?id, reason, "etcd refused a watch: the auth token is bad; authenticating again");
        return Err(Exit::Reauthenticate);
    }
    let Some(id) = id else {
        tracing::error!(registry = %inner.label, reason, "etcd refused a watch (which one is unknown)");
        return Ok(());
    };
    if id == live.anchor {
        tracing::warn!(
            registry = %inner.label,
            reason,
            "etcd refused the watch on the lease sentinel; a revoked or expired lease is noticed at the next keep-alive only"
        );
        return Ok(());
    }
    let Some(prefix) = lock(&inner.watches).get(&id).map(|w| w.prefix.clone()) else {
        return Ok(()); // unsubscribed meanwhile
    };
    if inner.opts.user.is_some() {
        let mut kv = live.clients.kv.clone();
        let probe =
            crate::shared::probe(&inner.label, &mut kv, &prefix, inner.step_timeout()).await;
        match probe {
            Err((e, Kind::TokenInvalid)) => {
                tracing::info!(registry = %inner.label, id, error = %e, "etcd refused a watch: the auth token is bad; authenticating again");
                return Err(Exit::Reauthenticate);
            }
            Ok(()) if reopen.due() => {
                reopen.schedule();
                tracing::info!(registry = %inner.label, id, prefix, reason, "etcd refused the watch of a prefix the registry may read: the watch stream's auth token is stale; opening the streams again");
                return Err(Exit::Reopen);
            }
            _ => {}
        }
    }
    let mut watches = lock(&inner.watches);
    let Some(w) = watches.get_mut(&id) else {
        return Ok(()); // unsubscribed meanwhile
    };
    w.refused = true;
    w.armed = generation;
    w.refusals = w.refusals.saturating_add(1);
    let delay = nth_delay(REFUSED_MIN, REFUSED_MAX, w.refusals);
    if w.refusals == 1 {
        tracing::error!(
            registry = %inner.label,
            id,
            prefix,
            reason,
            retry_in = ?delay,
            "etcd refused the watch of this prefix; its subscription gets no changes until etcd accepts it (tried again with a growing delay, up to {REFUSED_MAX:?})"
        );
    } else {
        tracing::debug!(registry = %inner.label, id, prefix, reason, retry_in = ?delay, "etcd refused the watch of this prefix again");
    }
    reads.spawn(inner, id, w, Purpose::Retry, delay);
    Ok(())
}

/// Applies a read done off the session task: notifies what changed; after a resync (or a
/// re-read of a refused watch), creates the watch again (under a new id) from the read's
/// revision + 1. A failed resync read is tried again later; the stream stays.
async fn on_read(
    inner: &Arc<Inner>,
    reads: &mut Reads,
    live: &mut Live,
    generation: u64,
    done: ReadDone,
) -> Result<(), Exit> {
    if done.purpose == Purpose::Reread {
        reads.rereads = reads.rereads.saturating_sub(1);
    }
    if done.purpose == Purpose::Retry && !reads.current_retry(&done) {
        return Ok(()); // a retry stopped after its read: a newer one (or none) goes on
    }
    if done.again {
        inner.reads_again.fetch_add(1, Ordering::AcqRel);
    }
    let create = {
        let mut watches = lock(&inner.watches);
        let Some(w) = watches.get_mut(&done.id) else {
            reads.retries.remove(&done.id);
            return Ok(()); // unsubscribed meanwhile
        };
        let (entries, revision) = match done.result {
            Ok(r) => r,
            Err((e, kind)) => {
                let token = kind == Kind::TokenInvalid && inner.opts.user.is_some();
                if token {
                    let _ = inner.cmds.send(Cmd::Reauthenticate);
                }
                if kind == Kind::Transient {
                    // Perhaps the member: the keep-alive finds out.
                    live.check_lease.notify_one();
                }
                match done.purpose {
                    Purpose::Retry => {
                        // Still not readable (or a passing failure): tried again later, if it
                        // is still refused (a new stream may have created it meanwhile).
                        if w.refused {
                            w.refusals = w.refusals.saturating_add(1);
                            let delay = nth_delay(REFUSED_MIN, REFUSED_MAX, w.refusals);
                            tracing::debug!(registry = %inner.label, prefix = w.prefix, error = %e, retry_in = ?delay, "reading a refused watch's prefix failed; trying again later");
                            reads.spawn(inner, done.id, w, Purpose::Retry, delay);
                        }
                    }
                    Purpose::Reread => {
                        // The other prefixes go on.
                        tracing::warn!(registry = %inner.label, prefix = w.prefix, error = %e, "periodic re-read of a prefix failed");
                    }
                    Purpose::Resync if kind == Kind::TooLarge => {
                        // Resuming would replay what was too large, and reading is too large
                        // too (a single key over the limit: pages are halved down to one
                        // key). The watch stays, and its subscriptions keep their last lists;
                        // the prefix is read again with a growing delay, and the watch created
                        // after a read that fits (once that key is gone).
                        let n = reads.retries.entry(done.id).or_insert(0);
                        *n = n.saturating_add(1);
                        let delay = nth_delay(REFUSED_MIN, REFUSED_MAX, *n);
                        if *n == 1 {
                            tracing::error!(
                                registry = %inner.label,
                                prefix = w.prefix,
                                error = %e,
                                retry_in = ?delay,
                                "a key of this prefix is larger than the registry URL parameter `{}` allows; its subscriptions keep their last lists and get no changes until the prefix can be read (tried again with a growing delay, up to {REFUSED_MAX:?})",
                                crate::options::MAX_MESSAGE_SIZE_KEY
                            );
                        } else {
                            tracing::debug!(registry = %inner.label, prefix = w.prefix, error = %e, retry_in = ?delay, "the prefix is still too large to read");
                        }
                        reads.spawn(inner, done.id, w, Purpose::Resync, delay);
                    }
                    Purpose::Resync => {
                        // Only this watch waits: tried again later, the stream and the other
                        // watches are not disturbed.
                        let n = reads.retries.entry(done.id).or_insert(0);
                        *n = n.saturating_add(1);
                        let delay = nth_delay(RETRY_MIN, RETRY_MAX, *n);
                        tracing::warn!(registry = %inner.label, prefix = w.prefix, error = %e, retry_in = ?delay, "reading a cancelled watch's prefix failed; trying again later");
                        reads.spawn(inner, done.id, w, Purpose::Resync, delay);
                    }
                }
                return Ok(());
            }
        };
        if revision > w.revision {
            inner.keeper.replace(
                &w.scope.to_keeper(),
                entries,
                u64::try_from(revision).unwrap_or(0),
            );
            w.revision = revision;
        }
        let again = (done.purpose == Purpose::Resync && w.resyncing) || w.refused;
        if again {
            reads.retries.remove(&done.id);
            // Created again under a new id: a retry of the old one has nothing left to do.
            reads.stop_retry(done.id);
            let Some(mut w) = watches.remove(&done.id) else {
                return Ok(());
            };
            w.resyncing = false;
            w.refused = false;
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
        live.create_watch(id, prefix, from)
            .await
            .map_err(Exit::Down)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_core::Url;

    #[test]
    fn a_refusal_is_warned_once_per_distinct_reason() {
        let mut last = None;
        assert!(first_time(&mut last, "authentication failed"));
        assert!(!first_time(&mut last, "authentication failed"));
        assert!(first_time(&mut last, "user name not found"));
        assert!(first_time(&mut last, "authentication failed"));
    }

    fn inner(url: &str, granted_ttl_secs: u64) -> Inner {
        let url: Url = url.parse().expect("url");
        let opts = crate::options::Options::from_url(&url).expect("options");
        let inner = Inner::new(url, opts, mpsc::unbounded_channel().0, FIRST_WATCH_ID);
        inner
            .ttl_ms
            .store(granted_ttl_secs * 1000, Ordering::Release);
        inner
    }

    #[test]
    fn steps_and_keep_alive_answers_fit_inside_the_granted_ttl() {
        for (url, granted, step_ms, answer_ms) in [
            ("etcd://h?session=6000", 3, 500, 500),
            ("etcd://h?session=4000", 2, 333, 333),
            // etcd may grant more than asked (its minimum TTL): the granted TTL counts.
            ("etcd://h?session=4000", 8, 1333, 1333),
            ("etcd://h?session=60000", 30, 5000, 5000),
            ("etcd://h?session=60000&timeout=1000", 30, 1000, 1000),
            ("etcd://h?session=2000&timeout=60000", 1, 250, 250),
        ] {
            let inner = inner(url, granted);
            let ttl = Duration::from_secs(granted);
            assert_eq!(inner.ttl(), ttl, "{url}");
            assert_eq!(inner.step_timeout().as_millis(), step_ms, "{url}");
            let answer = answer_timeout(&inner);
            assert_eq!(answer.as_millis(), answer_ms, "{url}");
            // Last renewal, one period, then the unanswered keep-alive's deadline: at least
            // a third of the TTL is left to move to another member (a few steps).
            assert!(
                inner.keep_alive_period() + answer <= ttl * 2 / 3 + Duration::from_millis(2),
                "{url}"
            );
        }
    }

    #[test]
    fn the_nth_delay_doubles_with_jitter_up_to_its_cap() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for (n, cap) in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (40, 60)] {
            let cap = Duration::from_secs(cap);
            let d = nth_delay(min, max, n);
            assert!(
                d >= cap / 2 && d <= cap,
                "{n}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut caps = Vec::new();
        for _ in 0..8 {
            let d = b.next();
            caps.push(d);
        }
        for (i, d) in caps.iter().enumerate() {
            let cap = Duration::from_secs(1 << i.min(5)).min(Duration::from_secs(30));
            assert!(
                *d >= cap / 2 && *d <= cap,
                "{i}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn authentications_are_paced() {
        let mut a = AuthPace::new();
        assert!(a.due());
        assert_eq!(a.schedule(), Duration::ZERO, "the first at once");
        assert!(!a.due());
        let second = a.schedule();
        assert!(second >= Duration::from_millis(500) && second <= Duration::from_secs(1));
        let third = a.schedule();
        assert!(
            third >= second + Duration::from_secs(1),
            "{third:?} after {second:?}"
        );
    }

    /// Past the lease's expiry with no lease to report lost, the wait still ends when it
    /// should (the expiry branch fired at once again and again: with the clock paused, time
    /// never moved on).
    #[test]
    fn a_wait_past_the_lease_expiry_with_no_lease_ends_on_time() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime");
            rt.block_on(async {
                let inner = Arc::new(inner("etcd://h?session=6000", 3));
                assert_eq!(inner.lease.load(Ordering::Acquire), 0);
                let mut flags = Flags {
                    ever_up: true,
                    down: true,
                    lost: false,
                    renewed: Instant::now(),
                    denied: None,
                    sentinel_denied: None,
                    revoke: None,
                };
                let (_stop, mut shutdown) = tokio::sync::watch::channel(false);
                let start = Instant::now();
                let wait = Duration::from_secs(30);
                let stopped = wait_renewing(&inner, &mut flags, None, wait, &mut shutdown).await;
                assert!(!stopped);
                assert!(start.elapsed() >= wait);
                assert!(!flags.lost, "no lease: nothing to report");
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the wait ended (no busy loop past the expiry)");
    }

    #[tokio::test(start_paused = true)]
    async fn watch_creations_are_due_a_step_after_the_streams_last_message() {
        let step = Duration::from_millis(500);
        let now = Instant::now() + Duration::from_secs(10);
        // Nothing waits: no deadline.
        assert_eq!(creates_due(false, true, None, step, now), None);
        // Messages wait to be handled (the session task was busy): a step from now.
        assert_eq!(
            creates_due(true, true, Some(now - Duration::from_secs(5)), step, now),
            Some(now + step)
        );
        // The reader took a message off the stream 200 ms ago: due a step after it.
        let last = now - Duration::from_millis(200);
        assert_eq!(
            creates_due(true, false, Some(last), step, now),
            Some(last + step)
        );
        // The stream silent for a step or longer (or never spoke): due now, the member is left.
        for last in [Some(now - step), Some(now - Duration::from_secs(3)), None] {
            assert_eq!(creates_due(true, false, last, step, now), Some(now));
        }
    }

    #[test]
    fn only_a_bad_token_leads_to_authenticating_again() {
        assert!(token_refusal("etcdserver: invalid auth token"));
        assert!(token_refusal("etcdserver: revision of auth store is old"));
        assert!(!token_refusal("etcdserver: permission denied"));
    }
}
