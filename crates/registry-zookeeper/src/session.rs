//! The ZooKeeper session of a registry: connecting (with `timeout` per host), the
//! *monitor* that turns session states into [`RegistryEvent`]s and re-reads every watched
//! path after a reconnect, and the *connector* that makes a new session while there is none
//! (`check=false` start, or after an expiry). [`Ctx`] is what tasks need to make calls on the
//! session: the request timeout, the read permits, and the signal that ends calls when the
//! registry is destroyed.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use registry_core::{Error, RegistryEvent, Result};
use tokio::sync::{Semaphore, watch};
use zookeeper_client as zk;

use crate::errors::{self, Fail};
use crate::registry::{Inner, SESSIONS_KEPT};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The current session.
#[derive(Clone)]
pub(crate) struct Session {
    /// The only owner of the client besides operations in flight: tasks hold it weakly, so
    /// dropping this closes the session.
    pub(crate) client: Arc<zk::Client>,
    pub(crate) generation: u64,
}

/// What the tasks need to know about the registry, without holding it.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) label: String,
    pub(crate) root: String,
    pub(crate) timeout: Duration,
    /// Bounds the reads in flight: [`READ_UNITS`] units, a read taking one per
    /// [`UNIT_BYTES`] it is expected to bring (at least one, at most all), an arm one.
    pub(crate) permits: Arc<Semaphore>,
    /// Becomes `true` when the registry is destroyed: calls in flight end at once.
    pub(crate) closing: watch::Receiver<bool>,
}

/// How many read units the registry has: at most this many reads at once (after a reconnect
/// every watch reads).
pub(crate) const READ_UNITS: u32 = 8;
/// The expected reply size one read unit stands for: a list of `READ_UNITS * UNIT_BYTES`
/// (4 MiB) or more is read alone, so on a slow link big lists take turns instead of all
/// sharing the link and all running out of time.
pub(crate) const UNIT_BYTES: u64 = 512 * 1024;
/// The slowest link (bytes per second) a list read is given time for, beyond `timeout`:
/// a 5 MB list gets `timeout` + 80 s. Progress itself is watched by the client: a connection
/// that brings no byte for `timeout` is dropped, which fails the read at once.
pub(crate) const MIN_READ_RATE: u64 = 64 * 1024;
/// What one child costs in a `get_children` reply, as a bound for Dubbo's encoded URLs
/// (300–700 bytes) plus the length prefix, used when only the number of children is known.
pub(crate) const CHILD_BYTES_BOUND: u64 = 1024;

/// The read units for a reply of about `bytes`.
fn read_units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT_BYTES))
        .unwrap_or(READ_UNITS)
        .clamp(1, READ_UNITS)
}

impl Ctx {
    /// `fut` within `timeout`, ended at once when the registry is destroyed.
    pub(crate) async fn call<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<T, Fail>
    where
        T: Send,
    {
        self.call_within(self.timeout, fut).await
    }

    /// `fut` within `bound`, ended at once when the registry is destroyed.
    pub(crate) async fn call_within<T>(
        &self,
        bound: Duration,
        fut: impl Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<T, Fail>
    where
        T: Send,
    {
        let mut closing = self.closing.clone();
        tokio::select! {
            r = tokio::time::timeout(bound, fut) => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Fail::Zk(e)),
                Err(_) => Err(Fail::Timeout(bound)),
            },
            _ = closing.wait_for(|c| *c) => Err(Fail::Zk(zk::Error::ClientClosed)),
        }
    }

    /// How long a read of a reply of about `bytes` may take: `timeout`, plus the time the
    /// bytes take at [`MIN_READ_RATE`].
    pub(crate) fn read_budget(&self, bytes: u64) -> Duration {
        self.timeout + Duration::from_millis(bytes.saturating_mul(1000) / MIN_READ_RATE)
    }

    /// Takes one read unit (an arm, a sync, a stat).
    pub(crate) async fn small_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.permits.acquire().await.ok()
    }

    /// Reads the children of `path` with a time bound and a share of the read units that
    /// follow the reply's size: `known_bytes` when the caller knows it (a list kept current
    /// by events), else the number of children (a `stat`, one small request) times
    /// [`CHILD_BYTES_BOUND`]. With `sync`, a `sync` of `path` comes first: the server we are
    /// connected to catches up with the leader up to now, so the read (same session, so after
    /// it) is at least as new as anything we saw before.
    ///
    /// ZooKeeper lets a session reconnect to any server not older than the last *reply* the
    /// session had; watch events do not count. A list kept from events may therefore be newer
    /// than what a follower that is behind returns: after a reconnect (or on a new session,
    /// which may land on another follower) an unsynced read could give an older list.
    pub(crate) async fn read_children(
        &self,
        client: &zk::Client,
        path: &str,
        sync: bool,
        known_bytes: Option<u64>,
    ) -> Result<(Vec<String>, zk::Stat), Fail> {
        let bytes = {
            let _permit = self.small_permit().await;
            if sync {
                match self.call(client.sync(path)).await {
                    // Nothing there yet: the read that follows says so.
                    Ok(()) | Err(Fail::Zk(zk::Error::NoNode)) => {}
                    Err(f) => return Err(f),
                }
            }
            match known_bytes {
                Some(b) => b,
                None => match self.call(client.check_stat(path)).await? {
                    Some(stat) => u64::try_from(stat.num_children).unwrap_or(0) * CHILD_BYTES_BOUND,
                    None => return Err(Fail::Zk(zk::Error::NoNode)),
                },
            }
        };
        let _permits = self.permits.acquire_many(read_units(bytes)).await;
        self.call_within(self.read_budget(bytes), client.get_children(path))
            .await
    }

    /// A registry error that names the registry, the operation and the path.
    pub(crate) fn error(&self, op: &str, path: &str, fail: Fail) -> Error {
        errors::error(&self.label, op, path, fail)
    }
}

impl Inner {
    /// How long `Reconnected` and `NewSession` wait for every watch to be armed and read;
    /// the watches not done by then keep trying in the background.
    pub(crate) fn settle_bound(&self) -> Duration {
        self.cfg.timeout * 3
    }

    pub(crate) fn connector(&self) -> zk::Connector {
        let mut c = zk::Client::connector()
            .with_session_timeout(self.cfg.session_timeout)
            .with_connection_timeout(self.cfg.timeout);
        if let Some(auth) = &self.cfg.auth {
            c = c.with_auth("digest", auth.as_bytes());
        }
        c
    }

    pub(crate) fn acls(&self) -> zk::Acls<'static> {
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
    pub(crate) async fn connect_once(&self) -> Result<zk::Client> {
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
    pub(crate) fn install(self: &Arc<Self>, client: zk::Client) -> Option<u64> {
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
        {
            let mut ours = lock(&self.our_sessions);
            if ours.len() >= SESSIONS_KEPT {
                ours.remove(0);
            }
            ours.push(client.session_id().0);
        }
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

    /// Waits (up to [`Inner::settle_bound`]) for a [`Inner::reread_all`], logging what is
    /// not done; whether everything was armed and read.
    pub(crate) fn settle(
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

    pub(crate) fn spawn_connector(self: &Arc<Self>) {
        let h = tokio::spawn(connector_loop(Arc::downgrade(self)));
        let mut bg = lock(&self.background);
        bg.retain(|h| !h.is_finished());
        bg.push(h);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_reads_take_more_units_up_to_all() {
        assert_eq!(read_units(0), 1);
        assert_eq!(read_units(UNIT_BYTES), 1);
        assert_eq!(read_units(UNIT_BYTES + 1), 2);
        // A 10,000-entry Dubbo list (4-6 MB) is read alone.
        assert_eq!(read_units(4_000_000), READ_UNITS);
        assert_eq!(read_units(u64::MAX), READ_UNITS);
    }
}
