//! [`FaultyRegistry`]: a wrapper over any registry that makes chosen operations fail and
//! emits connection events, for tests of the reliability layer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::registry::{Notification, NotifyListener, Registry, RegistryEvent, listener_id};
use crate::url::Url;

/// An operation of [`Registry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Registry::register`]
    Register,
    /// [`Registry::unregister`]
    Unregister,
    /// [`Registry::subscribe`]
    Subscribe,
    /// [`Registry::unsubscribe`]
    Unsubscribe,
    /// [`Registry::lookup`]
    Lookup,
}

#[derive(Default)]
struct Passed {
    registered: Vec<Url>,
    subscriptions: Vec<(Url, Arc<dyn NotifyListener>)>,
}

/// Wraps a registry: [`FaultyRegistry::fail_next`] makes the next N calls of an operation
/// fail with a retryable [`Error::Injected`]; [`FaultyRegistry::disconnect`],
/// [`FaultyRegistry::reconnect`] and [`FaultyRegistry::expire_session`] act out connection
/// trouble and emit the matching [`RegistryEvent`]s. Calls are counted per operation.
pub struct FaultyRegistry {
    inner: Arc<dyn Registry>,
    faults: Mutex<HashMap<Op, u32>>,
    calls: Mutex<HashMap<Op, u64>>,
    down: AtomicBool,
    events: broadcast::Sender<RegistryEvent>,
    passed: Mutex<Passed>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultyRegistry {
    /// Wraps `inner`. The inner registry's own events are forwarded (this needs a tokio
    /// runtime).
    pub fn new(inner: Arc<dyn Registry>) -> Arc<FaultyRegistry> {
        let me = Arc::new(FaultyRegistry {
            events: broadcast::channel(64).0,
            inner,
            faults: Mutex::default(),
            calls: Mutex::default(),
            down: AtomicBool::new(false),
            passed: Mutex::default(),
        });
        let weak: Weak<FaultyRegistry> = Arc::downgrade(&me);
        let mut rx = me.inner.events();
        tokio::spawn(async move {
            while let Ok(ev) = rx.recv().await {
                match weak.upgrade() {
                    Some(me) => {
                        let _ = me.events.send(ev);
                    }
                    None => return,
                }
            }
        });
        me
    }

    /// The wrapped registry.
    pub fn inner(&self) -> &Arc<dyn Registry> {
        &self.inner
    }

    /// Makes the next `n` calls of `op` fail.
    pub fn fail_next(&self, op: Op, n: u32) {
        *lock(&self.faults).entry(op).or_default() += n;
    }

    /// Stops failing `op`.
    pub fn clear_faults(&self, op: Op) {
        lock(&self.faults).remove(&op);
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: Op) -> u64 {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    /// Emits an event to whoever listens to [`Registry::events`].
    pub fn emit(&self, event: RegistryEvent) {
        let _ = self.events.send(event);
    }

    /// The connection drops: [`Registry::is_available`] turns false, every operation fails
    /// with [`Error::Unavailable`], and `Disconnected` is emitted.
    pub fn disconnect(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.emit(RegistryEvent::Disconnected);
    }

    /// The same session comes back: operations work again and `Reconnected` is emitted.
    pub fn reconnect(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.emit(RegistryEvent::Reconnected);
    }

    /// The session is lost and replaced, as when a ZooKeeper session expires or an etcd lease
    /// is revoked: every dynamic registration and every subscription made through this wrapper
    /// is removed from the inner registry, then `SessionLost` and `NewSession` are emitted and
    /// operations work again.
    pub async fn expire_session(&self) {
        let passed = std::mem::take(&mut *lock(&self.passed));
        for url in passed.registered.iter().filter(|u| u.is_dynamic()) {
            if let Err(e) = self.inner.unregister(url).await {
                tracing::warn!(%url, error = %e, "expire_session could not remove a registration");
            }
        }
        for (url, listener) in &passed.subscriptions {
            if let Err(e) = self.inner.unsubscribe(url, listener).await {
                tracing::warn!(%url, error = %e, "expire_session could not remove a subscription");
            }
        }
        // What was persistent survives the session.
        lock(&self.passed).registered = passed
            .registered
            .into_iter()
            .filter(|u| !u.is_dynamic())
            .collect();
        self.emit(RegistryEvent::SessionLost);
        self.down.store(false, Ordering::SeqCst);
        self.emit(RegistryEvent::NewSession);
    }

    /// Hands `notification` to every listener subscribed through the wrapper, as a backend
    /// would when it delivers a late or duplicated snapshot.
    pub fn deliver_to_subscribers(&self, notification: Notification) {
        let listeners: Vec<Arc<dyn NotifyListener>> = lock(&self.passed)
            .subscriptions
            .iter()
            .map(|(_, l)| l.clone())
            .collect();
        for l in listeners {
            l.notify(notification.clone());
        }
    }

    /// The URLs registered through the wrapper and still in place.
    pub fn registered(&self) -> Vec<Url> {
        lock(&self.passed).registered.clone()
    }

    /// How many subscriptions made through the wrapper are in place.
    pub fn subscription_count(&self) -> usize {
        lock(&self.passed).subscriptions.len()
    }

    fn enter(&self, op: Op) -> Result<()> {
        *lock(&self.calls).entry(op).or_default() += 1;
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                registry: self.inner.url().to_identity_string_redacted(),
                reason: "disconnected by the fault injector".to_owned(),
            });
        }
        let mut faults = lock(&self.faults);
        if let Some(n) = faults.get_mut(&op)
            && *n > 0
        {
            *n -= 1;
            return Err(Error::Injected {
                operation: format!("{op:?}").to_lowercase(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for FaultyRegistry {
    fn url(&self) -> &Url {
        self.inner.url()
    }

    fn is_available(&self) -> bool {
        !self.down.load(Ordering::SeqCst) && self.inner.is_available()
    }

    async fn register(&self, url: &Url) -> Result<()> {
        self.enter(Op::Register)?;
        self.inner.register(url).await?;
        let mut p = lock(&self.passed);
        if !p.registered.contains(url) {
            p.registered.push(url.clone());
        }
        Ok(())
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        self.enter(Op::Unregister)?;
        self.inner.unregister(url).await?;
        lock(&self.passed).registered.retain(|u| u != url);
        Ok(())
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        self.enter(Op::Subscribe)?;
        self.inner.subscribe(url, listener.clone()).await?;
        let mut p = lock(&self.passed);
        let id = listener_id(&listener);
        if !p
            .subscriptions
            .iter()
            .any(|(u, l)| u == url && listener_id(l) == id)
        {
            p.subscriptions.push((url.clone(), listener));
        }
        Ok(())
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        self.enter(Op::Unsubscribe)?;
        self.inner.unsubscribe(url, listener).await?;
        let id = listener_id(listener);
        lock(&self.passed)
            .subscriptions
            .retain(|(u, l)| !(u == url && listener_id(l) == id));
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        self.enter(Op::Lookup)?;
        self.inner.lookup(url).await
    }

    async fn destroy(&self) {
        self.inner.destroy().await;
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }
}
