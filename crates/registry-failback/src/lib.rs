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
//! - a retry queue with one pending task per (operation, key), register/unregister and
//!   subscribe/unsubscribe cancelling each other, exponential backoff from about 100 ms to
//!   `retry.period` with full jitter, `retry.times` (-1: never give up), and exhausted tasks that
//!   leave the queue;
//! - recovery: on a new session every registration and subscription is restored at once, with
//!   bounded concurrency (`recovery.concurrency`); a reconnect of the same session restores
//!   nothing and wakes pending retries;
//! - one delivery task per subscription: ordered, revision-guarded, latest-wins, panic-isolated,
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
pub use config::{FailbackConfig, cache_file};
pub use status::{Health, IntentStatus, ListStatus, RegistryStatus, SubscriptionStatus};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::{
    Error, Notification, NotifyListener, Registry, RegistryEvent, Result, Url, check_accepts,
    listener_id,
};
use tokio::sync::{Notify, broadcast};
use tokio::task::AbortHandle;

use cache::Cache;
use retry::{TaskKey, backoff};

type SubKey = (Url, usize);

/// One subscription: the user's listener behind a delivery task, and the listener handed to the
/// raw backend, which forwards into that task and the cache.
struct Sub {
    url: Url,
    delivery: Arc<Delivery>,
    forward: Arc<dyn NotifyListener>,
}

struct Forward {
    delivery: Arc<Delivery>,
    cache: Arc<Cache>,
    service_key: String,
}

impl NotifyListener for Forward {
    fn notify(&self, n: Notification) {
        self.cache.update(&self.service_key, &n);
        self.delivery.push(n);
    }
}

struct Pending {
    generation: u64,
    abort: AbortHandle,
    attempt: u32,
    next_attempt_at: Option<SystemTime>,
    last_error: String,
}

#[derive(Default)]
struct State {
    registered: HashSet<Url>,
    subscriptions: HashMap<SubKey, Arc<Sub>>,
    /// Raw listeners of subscriptions whose raw unsubscribe is being retried.
    unsubscribing: HashMap<SubKey, Arc<dyn NotifyListener>>,
    tasks: HashMap<TaskKey, Pending>,
    given_up: HashMap<TaskKey, (u32, String)>,
}

struct Shared<R: Registry> {
    raw: R,
    config: FailbackConfig,
    state: Mutex<State>,
    cache: Arc<Cache>,
    destroyed: AtomicBool,
    /// Wakes every sleeping retry task (the backend is back).
    kick: Arc<Notify>,
    events: broadcast::Sender<RegistryEvent>,
    background: Mutex<Vec<AbortHandle>>,
    generation: AtomicU64,
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
        let shared = Arc::new(Shared {
            raw,
            config,
            state: Mutex::new(State::default()),
            cache,
            destroyed: AtomicBool::new(false),
            kick: Arc::new(Notify::new()),
            events: broadcast::channel(64).0,
            background: Mutex::new(writer.into_iter().collect()),
            generation: AtomicU64::new(0),
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
}

impl<R: Registry> Shared<R> {
    fn label(&self) -> String {
        self.raw.url().to_identity_string_redacted()
    }

    fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.label(),
            })
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

    fn on_event(self: Arc<Self>, ev: RegistryEvent) {
        let _ = self.events.send(ev);
        match ev {
            RegistryEvent::NewSession => {
                tracing::info!(registry = %self.label(), "new backend session; restoring registrations and subscriptions");
                self.spawn_recovery();
            }
            RegistryEvent::Connected | RegistryEvent::Reconnected => {
                tracing::info!(registry = %self.label(), event = ?ev, "backend reachable; pending retries run now");
                self.kick.notify_waiters();
            }
            RegistryEvent::SessionLost => {
                tracing::warn!(registry = %self.label(), "backend session lost; dynamic entries are gone until a new session");
            }
            RegistryEvent::Disconnected => {
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

    /// Re-registers every intent and re-subscribes every subscription at once, with bounded
    /// concurrency; what fails goes to the retry queue.
    async fn recover(self: &Arc<Self>) {
        let start = Instant::now();
        let (regs, subs): (Vec<Url>, Vec<(SubKey, Arc<Sub>)>) = {
            let st = lock(&self.state);
            (
                st.registered.iter().cloned().collect(),
                st.subscriptions
                    .iter()
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect(),
            )
        };
        let failed = AtomicU64::new(0);
        let n = self.config.recovery_concurrency;
        futures_util::stream::iter(regs.iter())
            .for_each_concurrent(n, |url| {
                let failed = &failed;
                async move {
                    let key = TaskKey::Register(url.clone());
                    match self.raw.register(url).await {
                        Ok(()) => self.settle(&key),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            self.schedule(key, &e);
                        }
                    }
                }
            })
            .await;
        futures_util::stream::iter(subs.iter())
            .for_each_concurrent(n, |(key, sub)| {
                let failed = &failed;
                async move {
                    let task = TaskKey::Subscribe(key.0.clone(), key.1);
                    match self.raw.subscribe(&sub.url, sub.forward.clone()).await {
                        Ok(()) => {
                            // The raw subscription may be new and number its lists afresh.
                            sub.delivery.rebase();
                            self.settle(&task);
                        }
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
    }

    /// The intent behind `key` is in place: cancel its retry and forget a give-up.
    fn settle(&self, key: &TaskKey) {
        let mut st = lock(&self.state);
        if let Some(p) = st.tasks.remove(key) {
            p.abort.abort();
        }
        st.given_up.remove(key);
    }

    fn cancel(st: &mut State, key: &TaskKey) {
        if let Some(p) = st.tasks.remove(key) {
            p.abort.abort();
        }
        st.given_up.remove(key);
    }

    /// Puts `key` in the retry queue (one pending task per key; the opposite one is cancelled).
    fn schedule(self: &Arc<Self>, key: TaskKey, error: &Error) {
        if self.destroyed.load(Ordering::Acquire) {
            return;
        }
        let mut st = lock(&self.state);
        Self::cancel(&mut st, &key.opposite());
        st.given_up.remove(&key);
        if let Some(p) = st.tasks.get_mut(&key) {
            p.last_error = error.to_string();
            return;
        }
        tracing::warn!(
            registry = %self.label(),
            operation = key.operation(),
            url = %key.url(),
            error = %error,
            "failed; retrying in the background"
        );
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(retry_loop(
            Arc::downgrade(self),
            self.kick.clone(),
            key.clone(),
            generation,
        ));
        st.tasks.insert(
            key,
            Pending {
                generation,
                abort: task.abort_handle(),
                attempt: 0,
                next_attempt_at: None,
                last_error: error.to_string(),
            },
        );
    }

    /// One attempt of a retry: `Ok` also when the intent is gone (nothing left to do).
    async fn attempt(&self, key: &TaskKey) -> Result<()> {
        match key {
            TaskKey::Register(url) => {
                if !lock(&self.state).registered.contains(url) {
                    return Ok(());
                }
                self.raw.register(url).await
            }
            TaskKey::Unregister(url) => {
                if lock(&self.state).registered.contains(url) {
                    return Ok(());
                }
                self.raw.unregister(url).await
            }
            TaskKey::Subscribe(url, id) => {
                let sub = lock(&self.state)
                    .subscriptions
                    .get(&(url.clone(), *id))
                    .cloned();
                match sub {
                    Some(sub) => {
                        sub.delivery.rebase();
                        self.raw.subscribe(url, sub.forward.clone()).await
                    }
                    None => Ok(()),
                }
            }
            TaskKey::Unsubscribe(url, id) => {
                let forward = lock(&self.state)
                    .unsubscribing
                    .get(&(url.clone(), *id))
                    .cloned();
                match forward {
                    Some(f) => {
                        self.raw.unsubscribe(url, &f).await?;
                        lock(&self.state).unsubscribing.remove(&(url.clone(), *id));
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
        }
    }

    fn status(&self) -> RegistryStatus {
        let st = lock(&self.state);
        let health = |key: &TaskKey| -> Health {
            if let Some(p) = st.tasks.get(key) {
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
        let mut registrations: Vec<IntentStatus> = st
            .registered
            .iter()
            .map(|u| IntentStatus {
                url: u.clone(),
                health: health(&TaskKey::Register(u.clone())),
            })
            .collect();
        registrations.sort_by_cached_key(|i| i.url.to_full_string());
        let unregistrations = st
            .tasks
            .keys()
            .chain(st.given_up.keys())
            .filter_map(|k| match k {
                TaskKey::Unregister(u) => Some(IntentStatus {
                    url: u.clone(),
                    health: health(k),
                }),
                _ => None,
            })
            .collect();
        let subscriptions = st
            .subscriptions
            .iter()
            .map(|((url, id), sub)| SubscriptionStatus {
                url: url.clone(),
                health: health(&TaskKey::Subscribe(url.clone(), *id)),
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
            .collect();
        RegistryStatus {
            registry: self.label(),
            available: !self.destroyed.load(Ordering::Acquire) && self.raw.is_available(),
            destroyed: self.destroyed.load(Ordering::Acquire),
            registrations,
            unregistrations,
            subscriptions,
        }
    }
}

/// The life of one pending retry: wait (backoff with full jitter, or until the backend is
/// back), try, and repeat until it succeeds, the intent is gone, it is cancelled, or
/// `retry.times` is exhausted. The task holds the registry weakly.
async fn retry_loop<R: Registry>(
    weak: Weak<Shared<R>>,
    kick: Arc<Notify>,
    key: TaskKey,
    generation: u64,
) {
    let mut attempt: u32 = 0;
    loop {
        let delay = {
            let Some(s) = weak.upgrade() else { return };
            if let Some(max) = s.config.retry_times
                && attempt >= max
            {
                let mut st = lock(&s.state);
                if st
                    .tasks
                    .get(&key)
                    .is_some_and(|p| p.generation == generation)
                {
                    let p = st
                        .tasks
                        .remove(&key)
                        .map(|p| p.last_error)
                        .unwrap_or_default();
                    tracing::error!(
                        registry = %s.label(),
                        operation = key.operation(),
                        url = %key.url(),
                        attempts = attempt,
                        last_error = %p,
                        "giving up after retry.times attempts"
                    );
                    st.given_up.insert(key.clone(), (attempt, p));
                }
                return;
            }
            let delay = backoff(attempt + 1, s.config.retry_base, s.config.retry_period);
            let mut st = lock(&s.state);
            match st.tasks.get_mut(&key) {
                Some(p) if p.generation == generation => {
                    p.next_attempt_at = Some(SystemTime::now() + delay);
                }
                _ => return,
            }
            delay
        };
        let woken = kick.notified();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = woken => {}
        }
        attempt += 1;
        let Some(s) = weak.upgrade() else { return };
        let result = s.attempt(&key).await;
        let mut st = lock(&s.state);
        let current = st
            .tasks
            .get(&key)
            .is_some_and(|p| p.generation == generation);
        if !current {
            return;
        }
        match result {
            Ok(()) => {
                st.tasks.remove(&key);
                tracing::info!(
                    registry = %s.label(),
                    operation = key.operation(),
                    url = %key.url(),
                    attempts = attempt,
                    "retry succeeded"
                );
                return;
            }
            Err(e) if !e.is_retryable() => {
                st.tasks.remove(&key);
                tracing::error!(
                    registry = %s.label(),
                    operation = key.operation(),
                    url = %key.url(),
                    error = %e,
                    "giving up: the error is not one that retrying can fix"
                );
                st.given_up.insert(key.clone(), (attempt, e.to_string()));
                return;
            }
            Err(e) => {
                tracing::debug!(
                    registry = %s.label(),
                    operation = key.operation(),
                    url = %key.url(),
                    attempt,
                    error = %e,
                    "retry failed"
                );
                if let Some(p) = st.tasks.get_mut(&key) {
                    p.attempt = attempt;
                    p.last_error = e.to_string();
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

    async fn register(&self, url: &Url) -> Result<()> {
        let s = &self.shared;
        s.alive()?;
        check_accepts(s.raw.url(), url)?;
        let key = TaskKey::Register(url.clone());
        {
            let mut st = lock(&s.state);
            st.registered.insert(url.clone());
            Shared::<R>::cancel(&mut st, &key.opposite());
        }
        match s.raw.register(url).await {
            Ok(()) => {
                s.settle(&key);
                Ok(())
            }
            Err(e) if !e.is_retryable() || s.check_registration(url) => {
                let mut st = lock(&s.state);
                st.registered.remove(url);
                Shared::<R>::cancel(&mut st, &key);
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
        let key = TaskKey::Unregister(url.clone());
        {
            let mut st = lock(&s.state);
            st.registered.remove(url);
            Shared::<R>::cancel(&mut st, &key.opposite());
        }
        match s.raw.unregister(url).await {
            Ok(()) => {
                s.settle(&key);
                Ok(())
            }
            Err(e) if !e.is_retryable() || s.check_registration(url) => Err(e),
            Err(e) => {
                s.schedule(key, &e);
                Ok(())
            }
        }
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let s = &self.shared;
        s.alive()?;
        let id = listener_id(&listener);
        let key: SubKey = (url.clone(), id);
        let sub = {
            let mut st = lock(&s.state);
            if st.subscriptions.contains_key(&key) {
                return Ok(());
            }
            // The application's listener: on the blocking pool, so it may block.
            let delivery = Arc::new(Delivery::spawn_isolated(
                listener,
                DeliveryOptions {
                    empty_protection: s.config.empty_protection,
                    label: url.to_full_string(),
                },
            ));
            let forward: Arc<dyn NotifyListener> = Arc::new(Forward {
                delivery: delivery.clone(),
                cache: s.cache.clone(),
                service_key: url.service_key(),
            });
            let sub = Arc::new(Sub {
                url: url.clone(),
                delivery,
                forward,
            });
            st.subscriptions.insert(key.clone(), sub.clone());
            Shared::<R>::cancel(&mut st, &TaskKey::Unsubscribe(url.clone(), id));
            // A raw unsubscribe still pending for this pair is moot now.
            st.unsubscribing.remove(&key);
            sub
        };
        let task = TaskKey::Subscribe(url.clone(), id);
        match s.raw.subscribe(url, sub.forward.clone()).await {
            Ok(()) => {
                s.settle(&task);
                sub.delivery.flush().await;
                Ok(())
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
                        subscription = %url,
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
                    lock(&s.state).subscriptions.remove(&key);
                    sub.delivery.close().await;
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
        let sub = {
            let mut st = lock(&s.state);
            let sub = st.subscriptions.remove(&key);
            Shared::<R>::cancel(&mut st, &TaskKey::Subscribe(url.clone(), id));
            sub
        };
        let Some(sub) = sub else {
            return Ok(());
        };
        sub.delivery.close().await;
        match s.raw.unsubscribe(url, &sub.forward).await {
            Ok(()) => Ok(()),
            Err(e) if !e.is_retryable() || s.check_subscription(url) => Err(e),
            Err(e) => {
                lock(&s.state)
                    .unsubscribing
                    .insert(key.clone(), sub.forward.clone());
                s.schedule(TaskKey::Unsubscribe(url.clone(), id), &e);
                Ok(())
            }
        }
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let s = &self.shared;
        s.alive()?;
        let subscribed = lock(&s.state)
            .subscriptions
            .iter()
            .find(|((u, _), _)| u == url)
            .map(|(_, sub)| sub.clone());
        if let Some(sub) = subscribed {
            let categories = url.categories();
            let lists = sub.delivery.last_delivered();
            if categories
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
        s.raw.lookup(url).await
    }

    async fn destroy(&self) {
        let s = &self.shared;
        if s.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (registered, subs, unsubscribing) = {
            let mut st = lock(&s.state);
            for (_, p) in st.tasks.drain() {
                p.abort.abort();
            }
            st.given_up.clear();
            (
                std::mem::take(&mut st.registered),
                std::mem::take(&mut st.subscriptions),
                std::mem::take(&mut st.unsubscribing),
            )
        };
        let n = s.config.recovery_concurrency;
        let limit =
            Duration::from_millis(s.raw.url().parameter_num("timeout", 5000).unwrap_or(5000));
        futures_util::stream::iter(registered.iter().filter(|u| u.is_dynamic()))
            .for_each_concurrent(n, |url| async move {
                match tokio::time::timeout(limit, s.raw.unregister(url)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(%url, error = %e, "destroy: unregister failed"),
                    Err(_) => tracing::warn!(%url, "destroy: unregister timed out"),
                }
            })
            .await;
        for ((url, _), sub) in subs {
            sub.delivery.close().await;
            if let Ok(Err(e)) =
                tokio::time::timeout(limit, s.raw.unsubscribe(&url, &sub.forward)).await
            {
                tracing::debug!(%url, error = %e, "destroy: unsubscribe failed");
            }
        }
        for ((url, _), forward) in unsubscribing {
            let _ = tokio::time::timeout(limit, s.raw.unsubscribe(&url, &forward)).await;
        }
        s.cache.save().await;
        for h in lock(&s.background).drain(..) {
            h.abort();
        }
        s.raw.destroy().await;
        tracing::info!(registry = %s.label(), "registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.shared.events.subscribe()
    }
}
