//! # registry-failback
//!
//! [`FailbackRegistry`] is the reliability layer every backend sits behind (CONTRACT §3, §4,
//! §6). A backend crate implements the raw operations once and wraps itself:
//!
//! ```ignore
//! #[async_trait::async_trait]
//! impl registry_core::RegistryFactory for MyFactory {
//!     async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>> {
//!         let raw = MyRawRegistry::connect(url).await?;
//!         Ok(registry_failback::FailbackRegistry::new(raw)?)
//!     }
//! }
//! ```
//!
//! and gets, without repeating any of it:
//! - intent bookkeeping: what should be registered and subscribed, the source of truth for
//!   recovery;
//! - `check` semantics: fail fast, or retry in the background;
//! - "the last call wins" (CONTRACT §6.1): every backend call for a key (a URL, or a
//!   subscription) runs under that key's lock and applies the intent current when it runs, so
//!   recovery, retries and the application's calls never apply an older intent after a newer
//!   one; a failed register with `check=true` ends absent and a failed unregister is carried
//!   out in the background, even when the server applied the write and only the reply was lost;
//!   every backend call is bounded by `timeout`;
//! - a retry queue with one pending task per key that applies the current intent, exponential
//!   backoff from about 100 ms to `retry.period` with full jitter, `retry.times` (-1: never give
//!   up), and exhausted tasks that leave the queue; after a registration call whose outcome is
//!   unknown ([`Error::may_have_applied`]), the task confirms the intent (applies it again, at
//!   most `retry.period` apart, at most `recovery.concurrency` passes at once) until a late
//!   write can no longer land, and a new failure of the key wakes it from a confirmation wait;
//! - recovery: on a new session every registration and subscription is restored at once, with
//!   bounded concurrency (`recovery.concurrency`); a reconnect of the same session restores
//!   nothing and wakes pending retries;
//! - one delivery per subscription (a drainer runs while lists are pending): ordered, revision-guarded, latest-wins, panic-isolated,
//!   with empty protection and the source (live or cache) of each list;
//! - a memory and disk cache of notified lists, used when a subscribe fails (including at
//!   start-up with `check=false` and the backend down);
//! - `lookup` from the last notified lists; `destroy` that unregisters, unsubscribes, stops every
//!   task and closes the backend; and [`FailbackRegistry::status`].

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod cache;
mod config;
pub mod metrics;
mod retry;
mod status;

pub use cache::{CACHE_FORMAT, CacheFile, CachedList, read_file as read_cache_file};
pub use config::{FailbackConfig, cache_file, cache_identity, cache_key};
pub use status::{Health, IntentStatus, ListStatus, RegistryStatus, SubscriptionStatus};

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::{
    Error, Notification, NotifyListener, Registry, RegistryEvent, Result, Url, check_accepts,
    listener_id,
};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;
use tokio::time::Instant as TokioInstant;

use cache::Cache;
use retry::{TaskKey, backoff, confirm_wait};

type SubKey = (Url, usize);

/// How many locks serialize the backend calls of the keys (a URL, or a subscription): calls
/// for one key never overlap, calls for different keys mostly run side by side.
const KEY_LOCKS: usize = 64;

/// The listener handed to the raw backend for one subscription. It forwards into the
/// subscription's delivery task and the cache until it is deactivated (unsubscribe, destroy,
/// a failed subscribe), after which whatever the backend still sends is dropped.
struct Forward {
    active: RwLock<bool>,
    /// When the backend last handed a list over (for the notification delay metric).
    pushed_at: Arc<Mutex<Option<Instant>>>,
    delivery: Arc<Delivery>,
    cache: Arc<Cache>,
    service_key: String,
    /// An `interface=*` subscription: the cache forgets the services it is told are empty.
    wildcard: bool,
}

impl Forward {
    /// Returns once no notification is being forwarded, and none will be.
    fn deactivate(&self) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

impl NotifyListener for Forward {
    fn is_forwarder(&self) -> bool {
        true
    }

    fn notify(&self, n: Notification) {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        if *active {
            *lock(&self.pushed_at) = Some(Instant::now());
            self.cache.update(&self.service_key, &n, self.wildcard);
            self.delivery.push(n);
        }
    }
}

/// The application's listener, counted: every call is a notification by source, and a live
/// one's delay from the backend's hand-over is observed.
struct Metered {
    inner: Arc<dyn NotifyListener>,
    scheme: Arc<str>,
    pushed_at: Arc<Mutex<Option<Instant>>>,
}

impl NotifyListener for Metered {
    fn notify(&self, n: Notification) {
        let delay = match n.source {
            registry_core::Source::Live => lock(&self.pushed_at).map(|t| t.elapsed()),
            registry_core::Source::Cache => None,
        };
        metrics::record_notification(&self.scheme, n.source, delay);
        self.inner.notify(n);
    }
}

/// One subscription: the user's listener behind a delivery task, and the listener handed to
/// the raw backend.
struct Sub {
    delivery: Arc<Delivery>,
    forward: Arc<Forward>,
    /// The same allocation as `forward`, as the backend sees it.
    raw_listener: Arc<dyn NotifyListener>,
    /// Closed when the first subscribe call of this subscription has returned, so a second
    /// subscribe of the same pair returns after the first lists too (a semaphore with no
    /// permits: closing it wakes every waiter, and it is far smaller than a channel).
    ready: tokio::sync::Semaphore,
}

/// The intent for one URL (compared without `timestamp`).
struct Reg {
    /// The URL as last registered or unregistered by the application.
    url: Url,
    /// Registered (`true`) or to be removed (`false`, kept until the backend confirms).
    present: bool,
    /// Earlier forms of the URL (other timestamps) that may still be in the backend.
    old: Vec<Url>,
    /// Bumped by every change of this intent.
    seq: u64,
}

/// The intent for one (subscription URL, listener).
#[derive(Default)]
struct SubSlot {
    /// The subscription, while the application wants it.
    live: Option<Arc<Sub>>,
    /// Raw listeners whose backend subscription must be removed.
    stale: Vec<Arc<dyn NotifyListener>>,
    /// The subscription an `unsubscribe` is closing: a concurrent `unsubscribe` (or destroy)
    /// of the same pair waits for it too before returning.
    closing: Option<Arc<Sub>>,
    /// Bumped by every change of this intent.
    seq: u64,
}

struct Pending {
    generation: u64,
    /// The task; `destroy` aborts it and waits for it to end.
    task: tokio::task::JoinHandle<()>,
    attempt: u32,
    next_attempt_at: Option<SystemTime>,
    last_error: String,
    /// The intent changed after the task started: its `retry.times` budget starts again.
    reset: bool,
    /// A registration call of this key failed in a way that may still take effect (a
    /// time-out, a lost reply; [`Error::may_have_applied`]): until this instant such a write
    /// may still land, so the task keeps applying the intent now and then, and once more
    /// after it. Never set for a subscription.
    late_until: Option<TokioInstant>,
    /// The intent is in place; the task only confirms it (applies it again) until
    /// `late_until` has passed.
    confirming: bool,
    /// Wakes a confirming task when a call of the key failed again: it starts over from a
    /// short wait (a task still retrying keeps its backoff).
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct State {
    regs: HashMap<Url, Reg>,
    subs: HashMap<SubKey, SubSlot>,
    tasks: HashMap<TaskKey, Pending>,
    given_up: HashMap<TaskKey, (u32, String)>,
    destroyed: bool,
    seq: u64,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn healthy(&self, key: &TaskKey) -> bool {
        !self.tasks.contains_key(key) && !self.given_up.contains_key(key)
    }
}

struct Shared<R: Registry> {
    raw: R,
    config: FailbackConfig,
    /// The backend scheme, the label of every metric.
    scheme: Arc<str>,
    registration_gauges: metrics::IntentGauges,
    subscription_gauges: metrics::IntentGauges,
    /// The bound of every backend call and of every wait for a running listener (the
    /// registry URL's `timeout`).
    call_timeout: Duration,
    state: Mutex<State>,
    key_locks: Vec<tokio::sync::Mutex<()>>,
    /// Spreads the keys over `key_locks`; fixed, so which keys share a lock is the same in
    /// every run (a run on a paused clock can be repeated).
    hasher: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>,
    cache: Arc<Cache>,
    destroyed: AtomicBool,
    /// Set when `destroy` has finished (what [`Registry::is_destroyed`] reports, so a manager
    /// does not build a successor while this one is still unregistering).
    destroy_finished: AtomicBool,
    /// Held through `destroy`: a second call waits for the first to finish.
    destroying: tokio::sync::Mutex<()>,
    /// Counts the times the backend came back; every retry task watches it, so one that was
    /// busy when it happened still sees it before its next wait.
    kick: tokio::sync::watch::Sender<u64>,
    events: broadcast::Sender<RegistryEvent>,
    background: Mutex<Vec<AbortHandle>>,
    generation: AtomicU64,
    /// Bounds the confirmation passes running at once (`recovery.concurrency`), so the
    /// confirmations after many unknown-outcome calls do not add a burst of their own.
    confirm_permits: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reliability layer over a raw backend `R`; see the crate documentation.
pub struct FailbackRegistry<R: Registry> {
    shared: Arc<Shared<R>>,
}

impl<R: Registry> FailbackRegistry<R> {
    /// Wraps `raw`, reading the settings from its registry URL, loading the disk cache and
    /// starting the event and cache-writer tasks on the current tokio runtime. A bad setting
    /// is an [`Error::InvalidParameter`].
    pub fn new(raw: R) -> Result<Arc<FailbackRegistry<R>>> {
        let config = FailbackConfig::from_url(raw.url())?;
        Ok(FailbackRegistry::with_config(raw, config))
    }

    /// Wraps `raw` with explicit settings.
    pub fn with_config(raw: R, config: FailbackConfig) -> Arc<FailbackRegistry<R>> {
        let cache = Arc::new(Cache::load(raw.url(), config.cache_file.clone()));
        let writer = cache.spawn_writer(config.cache_debounce);
        let mut raw_events = raw.events();
        let call_timeout = Duration::from_millis(
            raw.url()
                .parameter_num("timeout", 5000)
                .unwrap_or(5000)
                .max(1),
        );
        let scheme: Arc<str> = Arc::from(raw.url().protocol());
        let shared = Arc::new(Shared {
            registration_gauges: metrics::IntentGauges::new(
                metrics::Intent::Registrations,
                &scheme,
            ),
            subscription_gauges: metrics::IntentGauges::new(
                metrics::Intent::Subscriptions,
                &scheme,
            ),
            scheme,
            raw,
            call_timeout,
            state: Mutex::new(State::default()),
            key_locks: (0..KEY_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            hasher: Default::default(),
            cache,
            destroyed: AtomicBool::new(false),
            destroy_finished: AtomicBool::new(false),
            destroying: tokio::sync::Mutex::new(()),
            kick: tokio::sync::watch::channel(0).0,
            events: broadcast::channel(64).0,
            background: Mutex::new(writer.into_iter().collect()),
            generation: AtomicU64::new(0),
            confirm_permits: tokio::sync::Semaphore::new(config.recovery_concurrency.max(1)),
            config,
        });
        let weak = Arc::downgrade(&shared);
        let events = tokio::spawn(async move {
            loop {
                let event = raw_events.recv().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                match event {
                    Ok(ev) => shared.on_event(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed backend events; restoring everything");
                        shared.clone().spawn_recovery();
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        lock(&shared.background).push(events.abort_handle());
        // The intent gauges, refreshed every second (counting is a walk over the intents).
        let weak = Arc::downgrade(&shared);
        let gauges = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.publish_gauges();
            }
        });
        lock(&shared.background).push(gauges.abort_handle());
        Arc::new(FailbackRegistry { shared })
    }

    /// The raw backend.
    pub fn raw(&self) -> &R {
        &self.shared.raw
    }

    /// The settings in force.
    pub fn config(&self) -> &FailbackConfig {
        &self.shared.config
    }

    /// A snapshot of every intent and its state.
    pub fn status(&self) -> RegistryStatus {
        self.shared.status()
    }

    /// How many intents are not in place and being retried (for tests and health checks).
    /// A task that only confirms an intent in place (applies it again now and then, after a
    /// failed call that might still take effect late) is not counted.
    pub fn pending_retries(&self) -> usize {
        lock(&self.shared.state)
            .tasks
            .values()
            .filter(|p| !p.confirming)
            .count()
    }

    /// How many background tasks of the retry queue exist, confirming ones included.
    pub fn retry_tasks(&self) -> usize {
        lock(&self.shared.state).tasks.len()
    }
}

impl<R: Registry> Shared<R> {
    fn label(&self) -> String {
        self.raw.url().to_identity_string_redacted()
    }

    fn destroyed_error(&self) -> Error {
        Error::Destroyed {
            registry: self.label(),
        }
    }

    fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(self.destroyed_error())
        } else {
            Ok(())
        }
    }

    /// `check` for register and unregister: registry check && URL check && port != 0.
    fn check_registration(&self, url: &Url) -> bool {
        self.config.check && url.check() && url.port() != 0
    }

    /// `check` for subscribe and unsubscribe: registry check && URL check.
    fn check_subscription(&self, url: &Url) -> bool {
        self.config.check && url.check()
    }

    /// The lock that serializes the backend calls of `key`.
    fn key_lock(&self, key: &TaskKey) -> &tokio::sync::Mutex<()> {
        &self.key_locks[(self.hasher.hash_one(key) % KEY_LOCKS as u64) as usize]
    }

    /// The bound of one backend call: three times the registry's `timeout` (a backend's own
    /// requests are bounded by `timeout`; one call may wait for a connection, then a request,
    /// then its retry).
    fn call_bound(&self) -> Duration {
        self.call_timeout * 3
    }

    /// The bound of a backend subscribe of `url`: one read per category (a wildcard
    /// subscription reads every service), on top of [`Shared::call_bound`].
    fn subscribe_bound(&self, url: &Url) -> Duration {
        let reads = if url.service_interface() == registry_core::url::ANY_VALUE {
            16
        } else {
            url.categories().len() as u32
        };
        self.call_bound() + self.call_timeout * reads
    }

    /// How long after a failed call that may still take effect (a time-out, a lost reply)
    /// such a late write may still land: until then the intent is confirmed now and then
    /// (at most `retry.period` apart), and once more after it.
    fn late_grace(&self) -> Duration {
        self.call_bound() * 2
    }

    /// A backend call bounded by [`Shared::call_bound`]: a hung call is a retryable
    /// [`Error::Timeout`] whose outcome is unknown.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.bounded_by(self.call_bound(), operation, call).await
    }

    async fn bounded_by<T>(
        &self,
        limit: Duration,
        operation: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                operation: operation.to_owned(),
                after: limit,
            }),
        }
    }

    /// Publishes how many registrations and subscriptions are ok, retrying or given up.
    fn publish_gauges(&self) {
        let (regs, subs) = {
            let st = lock(&self.state);
            let count = |key: TaskKey, c: &mut metrics::IntentCounts| {
                if st.given_up.contains_key(&key) {
                    c.given_up += 1;
                } else if st.tasks.get(&key).is_some_and(|p| !p.confirming) {
                    c.retrying += 1;
                } else {
                    c.ok += 1;
                }
            };
            let mut regs = metrics::IntentCounts::default();
            for (id, r) in &st.regs {
                if r.present {
                    count(TaskKey::Reg(id.clone()), &mut regs);
                }
            }
            let mut subs = metrics::IntentCounts::default();
            for ((u, id), slot) in &st.subs {
                if slot.live.is_some() {
                    count(TaskKey::Sub(u.clone(), *id), &mut subs);
                }
            }
            (regs, subs)
        };
        self.registration_gauges.set(regs);
        self.subscription_gauges.set(subs);
    }

    /// What a task of `key` does now, for the metrics.
    fn operation(st: &State, key: &TaskKey) -> metrics::Operation {
        match key {
            TaskKey::Reg(id) if st.regs.get(id).is_some_and(|r| r.present) => {
                metrics::Operation::Register
            }
            TaskKey::Reg(_) => metrics::Operation::Unregister,
            TaskKey::Sub(u, id)
                if st
                    .subs
                    .get(&(u.clone(), *id))
                    .is_some_and(|s| s.live.is_some()) =>
            {
                metrics::Operation::Subscribe
            }
            TaskKey::Sub(..) => metrics::Operation::Unsubscribe,
        }
    }

    fn on_event(self: Arc<Self>, ev: RegistryEvent) {
        let _ = self.events.send(ev);
        match ev {
            RegistryEvent::NewSession => {
                tracing::info!(registry = %self.label(), "new backend session; restoring registrations and subscriptions");
                self.spawn_recovery();
            }
            RegistryEvent::Connected | RegistryEvent::Reconnected => {
                if ev == RegistryEvent::Reconnected {
                    metrics::record_reconnect(&self.scheme);
                }
                tracing::info!(registry = %self.label(), event = ?ev, "backend reachable; pending retries run soon");
                self.kick.send_modify(|k| *k += 1);
            }
            RegistryEvent::SessionLost => {
                metrics::record_session_lost(&self.scheme);
                tracing::warn!(registry = %self.label(), "backend session lost; dynamic entries are gone until a new session");
            }
            RegistryEvent::Disconnected => {
                metrics::record_disconnect(&self.scheme);
                tracing::warn!(registry = %self.label(), "backend connection lost");
            }
            _ => {}
        }
    }

    fn spawn_recovery(self: Arc<Self>) {
        if self.destroyed.load(Ordering::Acquire) {
            return;
        }
        tokio::spawn(async move { self.recover().await });
    }

    /// Brings every registration and subscription to its current intent at once, with
    /// bounded concurrency; what fails goes to the retry queue. Each key is brought to the
    /// intent current when its turn comes, so a call the application makes meanwhile is
    /// never undone.
    async fn recover(self: &Arc<Self>) {
        let start = Instant::now();
        let (regs, subs): (Vec<Url>, Vec<SubKey>) = {
            let st = lock(&self.state);
            (
                st.regs.keys().cloned().collect(),
                st.subs.keys().cloned().collect(),
            )
        };
        let failed = AtomicU64::new(0);
        let n = self.config.recovery_concurrency;
        futures_util::stream::iter(regs.iter())
            .for_each_concurrent(n, |url| {
                let failed = &failed;
                async move {
                    let key = TaskKey::Reg(url.clone());
                    match self.reconcile_reg(url).await {
                        Ok(seq) => self.settle(&key, seq),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            self.schedule(key, &e);
                        }
                    }
                }
            })
            .await;
        futures_util::stream::iter(subs.iter())
            .for_each_concurrent(n, |key| {
                let failed = &failed;
                async move {
                    let task = TaskKey::Sub(key.0.clone(), key.1);
                    match self.reconcile_sub(key, true).await {
                        Ok(seq) => self.settle(&task, seq),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            self.schedule(task, &e);
                        }
                    }
                }
            })
            .await;
        tracing::info!(
            registry = %self.label(),
            registrations = regs.len(),
            subscriptions = subs.len(),
            failed = failed.load(Ordering::Relaxed),
            elapsed_ms = start.elapsed().as_secs_f64() * 1000.0,
            "restored after a new session"
        );
        metrics::record_recovery(
            &self.scheme,
            start.elapsed(),
            failed.load(Ordering::Relaxed),
        );
    }

    /// The seq of `key`'s intent now (`None`: no intent left).
    fn current_seq(st: &State, key: &TaskKey) -> Option<u64> {
        match key {
            TaskKey::Reg(u) => st.regs.get(u).map(|r| r.seq),
            TaskKey::Sub(u, id) => st.subs.get(&(u.clone(), *id)).map(|s| s.seq),
        }
    }

    /// Nothing is left to do for `key` after its intent as of `applied` was brought to the
    /// backend: the intent is gone, or still the one applied.
    fn is_settled(st: &State, key: &TaskKey, applied: Option<u64>) -> bool {
        match Self::current_seq(st, key) {
            None => true,
            current => current == applied,
        }
    }

    /// A register call (intent `seq`) failed with `error` and the caller is told so: unless a
    /// later call changed the intent, it becomes "absent". When the call made the intent
    /// (`created`) and nothing earlier may be in the backend, it is simply forgotten (refused,
    /// nothing written); otherwise the removal is carried out in the background.
    fn withdraw(self: &Arc<Self>, url: &Url, seq: u64, created: bool, key: TaskKey, error: &Error) {
        let undo = {
            let mut st = lock(&self.state);
            let next = st.next_seq();
            match st.regs.get_mut(url) {
                Some(r) if r.seq == seq && created && r.old.is_empty() => {
                    st.regs.remove(url);
                    false
                }
                Some(r) if r.seq == seq => {
                    r.present = false;
                    r.seq = next;
                    true
                }
                _ => false,
            }
        };
        if undo {
            self.schedule(key, error);
        }
    }

    /// Forgets an unregistration carried out, once no task of it is left.
    fn forget_if_done(st: &mut State, key: &TaskKey) {
        if let TaskKey::Reg(id) = key
            && !st.tasks.contains_key(key)
            && st
                .regs
                .get(id)
                .is_some_and(|r| !r.present && r.old.is_empty())
        {
            st.regs.remove(id);
        }
    }

    /// The backend was brought to `key`'s intent as of `applied`: when that is still the
    /// intent, its retry task (if any) has nothing left to do.
    fn settle(&self, key: &TaskKey, applied: Option<u64>) {
        let mut st = lock(&self.state);
        if !Self::is_settled(&st, key, applied) {
            return;
        }
        st.given_up.remove(key);
        // A task confirming the intent (a possibly late request may still land) keeps
        // going; it ends by itself.
        match st.tasks.get_mut(key) {
            Some(p) if p.late_until.is_some() || p.confirming => p.confirming = true,
            Some(_) => {
                if let Some(p) = st.tasks.remove(key) {
                    p.task.abort();
                }
                Self::forget_if_done(&mut st, key);
            }
            None => {}
        }
    }

    /// Brings the backend to the current intent for the registration `id` (under its key
    /// lock, so calls for one URL never overlap). Returns the seq of the intent applied,
    /// `None` when there was no intent left.
    async fn reconcile_reg(&self, id: &Url) -> Result<Option<u64>> {
        let _turn = self.key_lock(&TaskKey::Reg(id.clone())).lock().await;
        let (url, present, old, seq) = {
            let st = lock(&self.state);
            match st.regs.get(id) {
                Some(r) => (r.url.clone(), r.present, r.old.clone(), r.seq),
                None => return Ok(None),
            }
        };
        for o in &old {
            // One entry per identity: an earlier form goes before the new one is written.
            self.bounded("unregister", self.raw.unregister(o)).await?;
            let mut st = lock(&self.state);
            if let Some(r) = st.regs.get_mut(id) {
                r.old.retain(|x| !same_form(x, o));
            }
        }
        if present {
            self.bounded("register", self.raw.register(&url)).await?;
        } else {
            self.bounded("unregister", self.raw.unregister(&url))
                .await?;
            let mut st = lock(&self.state);
            // Forgotten once no task may still have to apply it again (after a call that may
            // take effect late); the task forgets it when it ends.
            if !st.tasks.contains_key(&TaskKey::Reg(id.clone()))
                && st
                    .regs
                    .get(id)
                    .is_some_and(|r| r.seq == seq && !r.present && r.old.is_empty())
            {
                st.regs.remove(id);
            }
        }
        Ok(Some(seq))
    }

    /// Brings the backend to the current intent for the subscription `key`: removes the raw
    /// subscriptions of stale listeners, then (re-)subscribes the live one. `rebase`: the
    /// raw subscription may be new and number its lists afresh.
    async fn reconcile_sub(&self, key: &SubKey, rebase: bool) -> Result<Option<u64>> {
        let _turn = self
            .key_lock(&TaskKey::Sub(key.0.clone(), key.1))
            .lock()
            .await;
        let (live, stale, seq) = {
            let st = lock(&self.state);
            match st.subs.get(key) {
                Some(s) => (s.live.clone(), s.stale.clone(), s.seq),
                None => return Ok(None),
            }
        };
        for l in &stale {
            self.bounded("unsubscribe", self.raw.unsubscribe(&key.0, l))
                .await?;
            let mut st = lock(&self.state);
            if let Some(s) = st.subs.get_mut(key) {
                let gone = listener_id(l);
                s.stale.retain(|x| listener_id(x) != gone);
            }
        }
        match live {
            Some(sub) => {
                if rebase {
                    sub.delivery.rebase();
                }
                self.bounded_by(
                    self.subscribe_bound(&key.0),
                    "subscribe",
                    self.raw.subscribe(&key.0, sub.raw_listener.clone()),
                )
                .await?;
                if sub.delivery.flush_within(self.call_timeout).await
                    && sub
                        .delivery
                        .last_delivered()
                        .iter()
                        .any(|n| n.source == registry_core::Source::Cache)
                {
                    // The listener still holds cached lists: the backend had this subscription
                    // already (a subscribe whose reply was lost) and told it nothing new. Make
                    // it start again, so its first lists are read and delivered now.
                    tracing::debug!(
                        subscription = %key.0.to_identity_string_redacted(),
                        "re-subscribing to replace cached lists with live ones"
                    );
                    self.bounded(
                        "unsubscribe",
                        self.raw.unsubscribe(&key.0, &sub.raw_listener),
                    )
                    .await?;
                    self.bounded_by(
                        self.subscribe_bound(&key.0),
                        "subscribe",
                        self.raw.subscribe(&key.0, sub.raw_listener.clone()),
                    )
                    .await?;
                }
            }
            None => {
                let mut st = lock(&self.state);
                if st
                    .subs
                    .get(key)
                    .is_some_and(|s| s.live.is_none() && s.stale.is_empty() && s.closing.is_none())
                {
                    st.subs.remove(key);
                }
            }
        }
        Ok(Some(seq))
    }

    async fn reconcile(&self, key: &TaskKey) -> Result<Option<u64>> {
        match key {
            TaskKey::Reg(u) => self.reconcile_reg(u).await,
            TaskKey::Sub(u, id) => self.reconcile_sub(&(u.clone(), *id), true).await,
        }
    }

    /// Puts `key` in the retry queue (one pending task per key; each attempt applies the
    /// intent current at that time).
    fn schedule(self: &Arc<Self>, key: TaskKey, error: &Error) {
        let mut st = lock(&self.state);
        if st.destroyed {
            return;
        }
        st.given_up.remove(&key);
        metrics::record_retry(&self.scheme, Self::operation(&st, &key));
        // A failed call may still have been applied, or may be applied late (a request sent
        // before a time-out, a lost reply): the intent is confirmed until that could no longer
        // have happened. A call refused before it was sent (not connected) cannot land.
        // A subscription needs none: each subscribe hands the backend a listener of its own,
        // so a late subscribe cannot undo a later call (after an unsubscribe it reaches a
        // closed listener).
        let late = (error.may_have_applied() && matches!(key, TaskKey::Reg(_)))
            .then(|| TokioInstant::now() + self.late_grace());
        if let Some(p) = st.tasks.get_mut(&key) {
            p.last_error = error.to_string();
            p.reset = true;
            p.late_until = p.late_until.max(late);
            // A task confirming an intent in place may be far from its next pass: the key
            // failed again, so it tries again soon. A task still retrying keeps its backoff
            // (an application that keeps calling during an outage does not make it retry at
            // the shortest wait).
            if std::mem::replace(&mut p.confirming, false) {
                p.wake.notify_one();
            }
            return;
        }
        tracing::warn!(
            registry = %self.label(),
            intent = key.kind(),
            url = %key.url().to_identity_string_redacted(),
            error = %error,
            "failed; retrying in the background"
        );
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(tokio::sync::Notify::new());
        // The jitter of the task's waits: its own generator, so the waits do not depend on
        // the order in which tasks woken at the same instant run; seeded from
        // `jitter_seed`, the key and the task's number when the seed is set (a run on a
        // paused clock can be repeated).
        let rng = match self.config.jitter_seed {
            Some(seed) => rand::SeedableRng::seed_from_u64(
                seed ^ self.hasher.hash_one(&key) ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ),
            None => rand::SeedableRng::from_rng(&mut rand::rng()),
        };
        let task = tokio::spawn(retry_loop(
            Arc::downgrade(self),
            self.kick.subscribe(),
            wake.clone(),
            key.clone(),
            generation,
            rng,
        ));
        st.tasks.insert(
            key,
            Pending {
                generation,
                task,
                attempt: 0,
                next_attempt_at: None,
                last_error: error.to_string(),
                reset: false,
                late_until: late,
                confirming: false,
                wake,
            },
        );
    }

    fn status(&self) -> RegistryStatus {
        let st = lock(&self.state);
        let health = |key: &TaskKey| -> Health {
            if let Some(p) = st.tasks.get(key).filter(|p| !p.confirming) {
                Health::Retrying {
                    attempt: p.attempt,
                    next_attempt_at: p.next_attempt_at,
                    last_error: p.last_error.clone(),
                }
            } else if let Some((attempts, e)) = st.given_up.get(key) {
                Health::GivenUp {
                    attempts: *attempts,
                    last_error: e.clone(),
                }
            } else {
                Health::Ok
            }
        };
        let mut registrations = Vec::new();
        let mut unregistrations = Vec::new();
        for (id, r) in &st.regs {
            let status = IntentStatus {
                url: r.url.clone(),
                health: health(&TaskKey::Reg(id.clone())),
            };
            if r.present {
                registrations.push(status);
            } else if status.health != Health::Ok {
                unregistrations.push(status);
            }
        }
        registrations.sort_by_cached_key(|i| i.url.to_full_string());
        unregistrations.sort_by_cached_key(|i| i.url.to_full_string());
        let subscriptions = st
            .subs
            .iter()
            .filter_map(|((url, id), slot)| {
                let sub = slot.live.as_ref()?;
                Some(SubscriptionStatus {
                    url: url.clone(),
                    health: health(&TaskKey::Sub(url.clone(), *id)),
                    lists: sub
                        .delivery
                        .last_delivered()
                        .into_iter()
                        .map(|n| ListStatus {
                            entries: n.entries().count(),
                            service: n.service,
                            category: n.category,
                            revision: n.revision,
                            source: n.source,
                        })
                        .collect(),
                })
            })
            .collect();
        RegistryStatus {
            registry: self.label(),
            available: !self.destroyed.load(Ordering::Acquire) && self.raw.is_available(),
            destroyed: self.destroyed.load(Ordering::Acquire),
            registrations,
            unregistrations,
            subscriptions,
            confirming: st.tasks.values().filter(|p| p.confirming).count(),
        }
    }
}

/// `a` and `b` are the same form of a URL: equal, and with the same `timestamp`.
fn same_form(a: &Url, b: &Url) -> bool {
    a == b && a.parameter("timestamp") == b.parameter("timestamp")
}

/// The life of one pending retry: wait (backoff with full jitter; when the backend is back,
/// a short jittered wait), bring the key to its current intent, and repeat until that
/// succeeds for the intent current afterwards, the intent is gone, it is cancelled, or
/// `retry.times` is exhausted. When a registration call of the key failed in a way that may
/// still take effect (`late_until`), the task then confirms the intent: it applies it again
/// after short, growing waits (at most `retry.period` apart; a reconnect does not hurry it)
/// until such a late write can no longer land, and once more after that. A new failure of
/// the key wakes it from a confirmation wait (a task still retrying keeps its backoff). The
/// task holds the registry weakly.
async fn retry_loop<R: Registry>(
    weak: Weak<Shared<R>>,
    mut kick: tokio::sync::watch::Receiver<u64>,
    wake: Arc<tokio::sync::Notify>,
    key: TaskKey,
    generation: u64,
    mut rng: rand::rngs::StdRng,
) {
    // Attempts counted against `retry.times` (started again when the intent changes, or
    // when a confirmation pass fails).
    let mut attempt: u32 = 0;
    // Backoff steps since the task last had a short wait: a change of the intent restarts
    // the budget above, not the backoff.
    let mut step: u32 = 0;
    // Confirmation passes since the intent was last put in place.
    let mut confirms: u32 = 0;
    loop {
        let (delay, base, confirming) = {
            let Some(s) = weak.upgrade() else { return };
            let mut st = lock(&s.state);
            let Some(p) = st
                .tasks
                .get_mut(&key)
                .filter(|p| p.generation == generation)
            else {
                return;
            };
            if std::mem::take(&mut p.reset) {
                attempt = 0;
                confirms = 0;
            }
            if p.confirming {
                // The intent is in place; a write of an earlier call may still land until
                // `late_until`: confirm it again soon, and once more when that has passed.
                let left = p.late_until.map_or(Duration::ZERO, |u| {
                    u.saturating_duration_since(TokioInstant::now())
                });
                let wait = confirm_wait(
                    &mut rng,
                    confirms + 1,
                    s.config.retry_base,
                    s.config.retry_period,
                )
                .min(left);
                (wait, s.config.retry_base, true)
            } else {
                if let Some(max) = s.config.retry_times
                    && attempt >= max
                {
                    let p = st
                        .tasks
                        .remove(&key)
                        .map(|p| p.last_error)
                        .unwrap_or_default();
                    tracing::error!(
                        registry = %s.label(),
                        intent = key.kind(),
                        url = %key.url().to_identity_string_redacted(),
                        attempts = attempt,
                        last_error = %p,
                        "giving up after retry.times attempts"
                    );
                    metrics::record_give_up(&s.scheme, Shared::<R>::operation(&st, &key));
                    st.given_up.insert(key.clone(), (attempt, p));
                    return;
                }
                let delay = backoff(
                    &mut rng,
                    step + 1,
                    s.config.retry_base,
                    s.config.retry_period,
                );
                p.next_attempt_at = Some(SystemTime::now() + delay);
                (delay, s.config.retry_base, false)
            }
        };
        // A reconnect hurries pending retries only: a confirming task's intent is in place,
        // and its next pass is due within `retry.period` anyway (and would fail again while
        // the backend is away). What happened meanwhile is marked seen, so a task that later
        // falls back to retrying is not woken by an old reconnect.
        if confirming {
            kick.borrow_and_update();
        }
        let woken = async {
            if confirming || kick.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let kicked = tokio::select! {
            // Polled in this order, so a run on a paused clock is the same every time.
            biased;
            // The key failed again: start over from a short wait.
            () = wake.notified() => {
                step = 0;
                continue;
            }
            () = woken => true,
            () = tokio::time::sleep(delay) => false,
        };
        if kicked {
            // The backend is back: go soon, but not in step with every other task (and
            // every other process) that was waiting for it.
            let window = base.min(Duration::from_millis(500));
            tokio::time::sleep(backoff(&mut rng, 1, window, window)).await;
        }
        if !confirming {
            attempt += 1;
            step += 1;
        }
        let Some(s) = weak.upgrade() else { return };
        // Confirmation passes run a bounded number at a time; one is counted once it runs.
        let permit = if confirming {
            let permit = s.confirm_permits.acquire().await.ok();
            metrics::record_confirmation(&s.scheme, Shared::<R>::operation(&lock(&s.state), &key));
            permit
        } else {
            None
        };
        let started = TokioInstant::now();
        let result = s.reconcile(&key).await;
        drop(permit);
        let mut st = lock(&s.state);
        if st
            .tasks
            .get(&key)
            .is_none_or(|p| p.generation != generation)
        {
            return;
        }
        match result {
            Ok(applied) if Shared::<R>::is_settled(&st, &key, applied) => {
                let Some(p) = st.tasks.get_mut(&key) else {
                    return;
                };
                match p.late_until {
                    // A late write may still land after this application: confirm again.
                    Some(until) if started < until => {
                        if p.confirming {
                            confirms += 1;
                        } else {
                            p.confirming = true;
                            confirms = 0;
                            step = 0;
                        }
                        tracing::debug!(
                            registry = %s.label(),
                            intent = key.kind(),
                            url = %key.url().to_identity_string_redacted(),
                            confirms,
                            late_window_left_ms = until.saturating_duration_since(TokioInstant::now()).as_millis() as u64,
                            "intent in place; confirming it while a write of unknown outcome may still land"
                        );
                    }
                    _ => {
                        let was_confirming = p.confirming;
                        st.tasks.remove(&key);
                        Shared::<R>::forget_if_done(&mut st, &key);
                        if !was_confirming {
                            tracing::info!(
                                registry = %s.label(),
                                intent = key.kind(),
                                url = %key.url().to_identity_string_redacted(),
                                attempts = attempt,
                                "retry succeeded"
                            );
                        }
                        return;
                    }
                }
            }
            Ok(_) => {
                // The intent changed while this attempt ran: apply the new one (a retry
                // does not count it; a confirmation pass was never counted).
                if !confirming {
                    attempt = attempt.saturating_sub(1);
                }
            }
            Err(e) if !e.is_retryable() => {
                st.tasks.remove(&key);
                tracing::error!(
                    registry = %s.label(),
                    intent = key.kind(),
                    url = %key.url().to_identity_string_redacted(),
                    error = %e,
                    "giving up: the error is not one that retrying can fix"
                );
                metrics::record_give_up(&s.scheme, Shared::<R>::operation(&st, &key));
                st.given_up.insert(key.clone(), (attempt, e.to_string()));
                return;
            }
            Err(e) => {
                tracing::debug!(
                    registry = %s.label(),
                    intent = key.kind(),
                    url = %key.url().to_identity_string_redacted(),
                    attempt,
                    error = %e,
                    "retry failed"
                );
                metrics::record_retry(&s.scheme, Shared::<R>::operation(&st, &key));
                if confirming {
                    // The intent was in place: the retries it needs now are new ones, from
                    // a short wait.
                    attempt = 0;
                    step = 0;
                }
                if let Some(p) = st.tasks.get_mut(&key) {
                    p.attempt = attempt;
                    p.last_error = e.to_string();
                    p.confirming = false;
                    // Only a call that may have been sent can land late: the task's own fast
                    // failures during an outage (not connected) do not extend the window.
                    if e.may_have_applied() && matches!(key, TaskKey::Reg(_)) {
                        p.late_until = p.late_until.max(Some(TokioInstant::now() + s.late_grace()));
                    }
                }
            }
        }
    }
}

#[async_trait]
impl<R: Registry> Registry for FailbackRegistry<R> {
    fn url(&self) -> &Url {
        self.shared.raw.url()
    }

    fn is_available(&self) -> bool {
        !self.shared.destroyed.load(Ordering::Acquire) && self.shared.raw.is_available()
    }

    fn is_destroyed(&self) -> bool {
        self.shared.destroy_finished.load(Ordering::Acquire)
    }

    async fn register(&self, url: &Url) -> Result<()> {
        let s = &self.shared;
        s.alive()?;
        check_accepts(s.raw.url(), url)?;
        let key = TaskKey::Reg(url.clone());
        let (seq, created) = {
            let mut st = lock(&s.state);
            if st.destroyed {
                return Err(s.destroyed_error());
            }
            let seq = st.next_seq();
            let created = !st.regs.contains_key(url);
            match st.regs.get_mut(url) {
                Some(r) => {
                    if !same_form(&r.url, url) && !r.old.iter().any(|o| same_form(o, &r.url)) {
                        let previous = r.url.clone();
                        r.old.push(previous);
                    }
                    r.old.retain(|o| !same_form(o, url));
                    r.url = url.clone();
                    r.present = true;
                    r.seq = seq;
                }
                None => {
                    st.regs.insert(
                        url.clone(),
                        Reg {
                            url: url.clone(),
                            present: true,
                            old: Vec::new(),
                            seq,
                        },
                    );
                }
            }
            // A registration given up before is made again.
            st.given_up.remove(&key);
            (seq, created)
        };
        match s.reconcile_reg(url).await {
            Ok(applied) => {
                s.settle(&key, applied);
                s.alive()
            }
            Err(e) if !e.is_retryable() => {
                // Refused: this URL was not written. When this call made the intent, forget
                // it; when it replaced one (a pending unregistration, an earlier form), what
                // may be in the backend must still go.
                s.withdraw(url, seq, created, key, &e);
                Err(e)
            }
            Err(e) if s.check_registration(url) => {
                // The outcome is unknown (the write may have been applied and only the reply
                // lost): the caller is told it failed, so the entry must end absent.
                s.withdraw(url, seq, false, key, &e);
                Err(e)
            }
            Err(e) => {
                s.schedule(key, &e);
                Ok(())
            }
        }
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        let s = &self.shared;
        s.alive()?;
        let key = TaskKey::Reg(url.clone());
        {
            let mut st = lock(&s.state);
            if st.destroyed {
                return Err(s.destroyed_error());
            }
            let seq = st.next_seq();
            match st.regs.get_mut(url) {
                Some(r) => {
                    // Remove what was registered (its timestamp), whatever this URL says.
                    r.present = false;
                    r.seq = seq;
                }
                None => {
                    st.regs.insert(
                        url.clone(),
                        Reg {
                            url: url.clone(),
                            present: false,
                            old: Vec::new(),
                            seq,
                        },
                    );
                }
            }
            st.given_up.remove(&key);
        }
        match s.reconcile_reg(url).await {
            Ok(applied) => {
                s.settle(&key, applied);
                Ok(())
            }
            Err(e) => {
                // Carried out in the background whatever the caller is told.
                s.schedule(key, &e);
                if !e.is_retryable() || s.check_registration(url) {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let s = &self.shared;
        s.alive()?;
        let id = listener_id(&listener);
        let key: SubKey = (url.clone(), id);
        let task = TaskKey::Sub(url.clone(), id);
        let sub = {
            let mut st = lock(&s.state);
            if st.destroyed {
                return Err(s.destroyed_error());
            }
            let seq = st.next_seq();
            let revive = st.given_up.remove(&task).is_some();
            let slot = st.subs.entry(key.clone()).or_default();
            match &slot.live {
                Some(sub) if revive => {
                    // Its retries gave up: subscribing again tries again.
                    slot.seq = seq;
                    Ok((sub.clone(), true))
                }
                // Already subscribed: return once its first subscribe call has.
                Some(sub) => Err(sub.clone()),
                None => {
                    // The application's listener: on the blocking pool, so it may block.
                    let pushed_at = Arc::new(Mutex::new(None));
                    let listener: Arc<dyn NotifyListener> = Arc::new(Metered {
                        inner: listener,
                        scheme: s.scheme.clone(),
                        pushed_at: pushed_at.clone(),
                    });
                    let delivery = Arc::new(Delivery::spawn_isolated(
                        listener,
                        DeliveryOptions {
                            empty_protection: s.config.empty_protection,
                            label: url.to_identity_string_redacted(),
                        },
                    ));
                    let forward = Arc::new(Forward {
                        active: RwLock::new(true),
                        pushed_at,
                        delivery: delivery.clone(),
                        cache: s.cache.clone(),
                        service_key: url.service_key(),
                        wildcard: url.service_interface() == registry_core::url::ANY_VALUE,
                    });
                    let raw_listener: Arc<dyn NotifyListener> = forward.clone();
                    let sub = Arc::new(Sub {
                        delivery,
                        forward,
                        raw_listener,
                        ready: tokio::sync::Semaphore::new(0),
                    });
                    slot.live = Some(sub.clone());
                    slot.seq = seq;
                    Ok((sub, false))
                }
            }
        };
        let (sub, revived) = match sub {
            Ok(started) => started,
            Err(first) => {
                let _ = tokio::time::timeout(s.call_timeout, first.ready.acquire()).await;
                return Ok(());
            }
        };
        // Whatever this call ends with, a concurrent subscribe of the pair may return then.
        struct Ready<'a>(&'a tokio::sync::Semaphore);
        impl Drop for Ready<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _ready = Ready(&sub.ready);
        match s.reconcile_sub(&key, revived).await {
            Ok(applied) => {
                s.settle(&task, applied);
                sub.delivery.flush().await;
                s.alive()
            }
            Err(e) => {
                let cached = if e.is_retryable() {
                    s.cache.lists_for(url)
                } else {
                    Vec::new()
                };
                if !cached.is_empty() {
                    tracing::warn!(
                        registry = %s.label(),
                        subscription = %url.to_identity_string_redacted(),
                        error = %e,
                        lists = cached.len(),
                        "subscribe failed; delivering cached lists and retrying in the background"
                    );
                    for n in cached {
                        sub.delivery.push(n);
                    }
                    s.schedule(task, &e);
                    sub.delivery.flush().await;
                    return Ok(());
                }
                if !e.is_retryable() || s.check_subscription(url) {
                    // The subscription ends here; what the backend may have set up is removed.
                    let undo = {
                        let mut st = lock(&s.state);
                        let seq = st.next_seq();
                        match st.subs.get_mut(&key) {
                            Some(slot)
                                if slot.live.as_ref().is_some_and(|l| Arc::ptr_eq(l, &sub)) =>
                            {
                                slot.live = None;
                                slot.stale.push(sub.raw_listener.clone());
                                slot.seq = seq;
                                true
                            }
                            _ => false,
                        }
                    };
                    sub.forward.deactivate();
                    sub.delivery.close_within(s.call_timeout).await;
                    if undo {
                        s.schedule(task, &e);
                    }
                    return Err(e);
                }
                s.schedule(task, &e);
                Ok(())
            }
        }
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        let s = &self.shared;
        s.alive()?;
        let id = listener_id(listener);
        let key: SubKey = (url.clone(), id);
        let task = TaskKey::Sub(url.clone(), id);
        let sub = {
            let mut st = lock(&s.state);
            if st.destroyed {
                return Err(s.destroyed_error());
            }
            let seq = st.next_seq();
            let Some(slot) = st.subs.get_mut(&key) else {
                return Ok(());
            };
            match slot.live.take() {
                // Another unsubscribe of the pair is closing it: return when it is closed.
                None => Err(slot.closing.clone()),
                Some(sub) => {
                    slot.stale.push(sub.raw_listener.clone());
                    slot.closing = Some(sub.clone());
                    slot.seq = seq;
                    st.given_up.remove(&task);
                    Ok(sub)
                }
            }
        };
        let sub = match sub {
            Ok(sub) => sub,
            Err(closing) => {
                if let Some(sub) = closing {
                    sub.delivery.close_within(s.call_timeout).await;
                }
                return Ok(());
            }
        };
        // Nothing reaches the listener or the cache from here on.
        sub.forward.deactivate();
        sub.delivery.close_within(s.call_timeout).await;
        if let Some(slot) = lock(&s.state).subs.get_mut(&key)
            && slot.closing.as_ref().is_some_and(|c| Arc::ptr_eq(c, &sub))
        {
            slot.closing = None;
        }
        match s.reconcile_sub(&key, false).await {
            Ok(applied) => {
                s.settle(&task, applied);
                Ok(())
            }
            Err(e) => {
                // Carried out in the background whatever the caller is told.
                s.schedule(task, &e);
                if !e.is_retryable() || s.check_subscription(url) {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let s = &self.shared;
        s.alive()?;
        // The layer's lists answer only while the subscription is healthy and live: lists
        // of a subscription being retried or given up may be stale (or from the cache).
        let subscribed = {
            let st = lock(&s.state);
            st.subs
                .iter()
                .filter(|((u, id), _)| u == url && st.healthy(&TaskKey::Sub(u.clone(), *id)))
                .find_map(|(_, slot)| slot.live.clone())
        };
        if let Some(sub) = subscribed {
            let categories = url.categories();
            let lists = sub.delivery.last_delivered();
            if lists
                .iter()
                .all(|n| n.source == registry_core::Source::Live)
                && categories
                    .iter()
                    .all(|c| lists.iter().any(|n| &n.category == c))
            {
                let mut out = Vec::new();
                for c in &categories {
                    for n in lists.iter().filter(|n| &n.category == c) {
                        out.extend(n.entries().cloned());
                    }
                }
                return Ok(out);
            }
        }
        s.bounded("lookup", s.raw.lookup(url)).await
    }

    async fn destroy(&self) {
        let s = &self.shared;
        // A second call returns when the first has finished.
        let _destroying = s.destroying.lock().await;
        let (regs, subs, late, tasks) = {
            let mut st = lock(&s.state);
            if st.destroyed {
                return;
            }
            st.destroyed = true;
            s.destroyed.store(true, Ordering::Release);
            // When a failed write of a key may still land (see `late_until`).
            let mut late: HashMap<Url, TokioInstant> = HashMap::new();
            let mut tasks = Vec::new();
            for (key, p) in st.tasks.drain() {
                p.task.abort();
                tasks.push(p.task);
                if let (TaskKey::Reg(id), Some(at)) = (key, p.late_until) {
                    late.insert(id, at);
                }
            }
            st.given_up.clear();
            (
                std::mem::take(&mut st.regs),
                std::mem::take(&mut st.subs),
                late,
                tasks,
            )
        };
        // A failed write may still land until its `late_until`: pending unregistrations are
        // carried out after that, waiting no longer than one `timeout` in all (the limit is
        // set once, for every URL, and counts the wait for the tasks below), and not at all
        // when the backend is away (nothing can be removed then).
        let late_limit = TokioInstant::now() + s.call_timeout;
        let wait_late = s.raw.is_available();
        // The aborted tasks end at their next await (a call in flight is dropped): none of
        // them sends anything after the calls below.
        let _ = tokio::time::timeout(s.call_timeout, futures_util::future::join_all(tasks)).await;
        let n = s.config.recovery_concurrency;
        // Registrations: dynamic ones go; pending unregistrations (persistent ones included)
        // and earlier forms are tried once; persistent registrations stay.
        let late = &late;
        futures_util::stream::iter(regs.iter())
            .for_each_concurrent(n, |(id, r)| async move {
                if wait_late
                    && !r.present
                    && let Some(at) = late.get(id)
                {
                    tokio::time::sleep_until((*at).min(late_limit)).await;
                }
                let _turn = s.key_lock(&TaskKey::Reg(id.clone())).lock().await;
                let mut gone: Vec<&Url> = r.old.iter().collect();
                if !r.present || r.url.is_dynamic() {
                    gone.push(&r.url);
                }
                for url in gone {
                    if let Err(e) = s.bounded("unregister", s.raw.unregister(url)).await {
                        tracing::warn!(url = %url.to_identity_string_redacted(), error = %e, "destroy: unregister failed");
                    }
                }
            })
            .await;
        futures_util::stream::iter(subs.iter())
            .for_each_concurrent(n, |(key, slot)| async move {
                let mut raw: Vec<&Arc<dyn NotifyListener>> = slot.stale.iter().collect();
                if let Some(sub) = &slot.live {
                    sub.forward.deactivate();
                    sub.delivery.close_within(s.call_timeout).await;
                    raw.push(&sub.raw_listener);
                }
                if let Some(sub) = &slot.closing {
                    sub.delivery.close_within(s.call_timeout).await;
                }
                let _turn = s.key_lock(&TaskKey::Sub(key.0.clone(), key.1)).lock().await;
                for l in raw {
                    if let Err(e) = s.bounded("unsubscribe", s.raw.unsubscribe(&key.0, l)).await {
                        tracing::debug!(url = %key.0.to_identity_string_redacted(), error = %e, "destroy: unsubscribe failed");
                    }
                }
            })
            .await;
        s.cache.save().await;
        for h in lock(&s.background).drain(..) {
            h.abort();
        }
        s.raw.destroy().await;
        s.registration_gauges.set(metrics::IntentCounts::default());
        s.subscription_gauges.set(metrics::IntentCounts::default());
        s.destroy_finished.store(true, Ordering::Release);
        let _ = s.events.send(RegistryEvent::Destroyed);
        tracing::info!(registry = %s.label(), "registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.shared.events.subscribe()
    }
}
