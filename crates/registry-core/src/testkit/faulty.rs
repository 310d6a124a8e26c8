//! [`FaultyRegistry`]: a wrapper over any registry that makes chosen operations fail and
//! emits connection events, for tests of the reliability layer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};

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

/// How a call goes on after its fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Through,
    /// Went through after a [`Fault::Hang`]: it lands late.
    Hung,
    Lose,
    Late(Duration),
}

/// What happens to one call of an operation; queued per operation with
/// [`FaultyRegistry::inject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails with a retryable [`Error::Injected`] before reaching the wrapped registry
    /// (`reached: false`: nothing was sent).
    Fail,
    /// Reaches the wrapped registry (the change is applied), then fails with a retryable
    /// [`Error::Injected`]: the reply was lost, the outcome is unknown to the caller.
    LoseReply,
    /// Waits this long, then goes through.
    Delay(Duration),
    /// Never returns until [`FaultyRegistry::release_hung`] (then goes through); a caller that
    /// bounds its calls sees a time-out.
    Hang,
    /// Fails at once with a retryable [`Error::Injected`], as a timed-out request does, and
    /// reaches the wrapped registry this long afterwards anyway, as a request that was already
    /// sent may (register and unregister; for other operations it is [`Fault::LoseReply`]).
    ApplyLate(Duration),
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
    faults: Mutex<HashMap<Op, VecDeque<Fault>>>,
    release: Notify,
    calls: Mutex<HashMap<Op, u64>>,
    log: Mutex<Vec<(Op, std::time::Instant)>>,
    returned: Mutex<HashMap<Op, u64>>,
    down: AtomicBool,
    events: broadcast::Sender<RegistryEvent>,
    passed: Mutex<Passed>,
    last_fault: Arc<Mutex<Option<tokio::time::Instant>>>,
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
            release: Notify::new(),
            calls: Mutex::default(),
            log: Mutex::default(),
            returned: Mutex::default(),
            down: AtomicBool::new(false),
            passed: Mutex::default(),
            last_fault: Arc::default(),
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

    /// Makes the next `n` calls of `op` fail (before reaching the wrapped registry).
    pub fn fail_next(&self, op: Op, n: u32) {
        self.inject(op, Fault::Fail, n);
    }

    /// Queues `fault` for the next `n` calls of `op`, after the faults already queued.
    pub fn inject(&self, op: Op, fault: Fault, n: u32) {
        lock(&self.faults)
            .entry(op)
            .or_default()
            .extend(std::iter::repeat_n(fault, n as usize));
    }

    /// Stops failing `op`: drops its queued faults.
    pub fn clear_faults(&self, op: Op) {
        lock(&self.faults).remove(&op);
    }

    /// Drops every queued fault of every operation and lets every hung call go on.
    pub fn clear_all_faults(&self) {
        lock(&self.faults).clear();
        self.release_hung();
    }

    /// Lets every call hung by [`Fault::Hang`] go on.
    pub fn release_hung(&self) {
        self.release.notify_waiters();
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: Op) -> u64 {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    /// How many calls of `op` returned (failed ones included), as opposed to
    /// [`FaultyRegistry::calls`], which counts them as they start.
    pub fn returned(&self, op: Op) -> u64 {
        lock(&self.returned).get(&op).copied().unwrap_or(0)
    }

    /// When each call of `op` was made, in order.
    pub fn call_times(&self, op: Op) -> Vec<std::time::Instant> {
        lock(&self.log)
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, t)| *t)
            .collect()
    }

    /// When a fault last took effect (tokio's clock, so a paused clock counts): a call
    /// returned an error the wrapper made (injected, or disconnected), or a write it held back
    /// ([`Fault::ApplyLate`], [`Fault::Hang`]) reached the wrapped registry.
    pub fn last_fault_at(&self) -> Option<tokio::time::Instant> {
        *lock(&self.last_fault)
    }

    fn note_fault(&self) {
        *lock(&self.last_fault) = Some(tokio::time::Instant::now());
    }

    /// Emits an event to whoever listens to [`Registry::events`].
    pub fn emit(&self, event: RegistryEvent) {
        let _ = self.events.send(event);
    }

    /// The connection drops: [`Registry::is_available`] turns false, every operation fails
    /// with [`Error::NotConnected`] (nothing is sent), and `Disconnected` is emitted.
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
                tracing::warn!(url = %url.to_redacted_string(), error = %e, "expire_session could not remove a registration");
            }
        }
        for (url, listener) in &passed.subscriptions {
            if let Err(e) = self.inner.unsubscribe(url, listener).await {
                tracing::warn!(url = %url.to_redacted_string(), error = %e, "expire_session could not remove a subscription");
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

    /// Counts the call, applies its queued fault and says how the call goes on.
    async fn enter(&self, op: Op) -> Result<Pass> {
        let result = self.enter_inner(op).await;
        if result.is_err() {
            self.note_fault();
            self.mark_returned(op);
        }
        result
    }

    fn mark_returned(&self, op: Op) {
        *lock(&self.returned).entry(op).or_default() += 1;
    }

    async fn enter_inner(&self, op: Op) -> Result<Pass> {
        *lock(&self.calls).entry(op).or_default() += 1;
        lock(&self.log).push((op, std::time::Instant::now()));
        if self.down.load(Ordering::SeqCst) {
            // Nothing is sent while disconnected.
            return Err(Error::not_connected(
                self.inner.url().to_identity_string_redacted(),
                "disconnected by the fault injector",
            ));
        }
        let fault = lock(&self.faults)
            .get_mut(&op)
            .and_then(VecDeque::pop_front);
        match fault {
            None => Ok(Pass::Through),
            Some(Fault::Fail) => Err(self.injected(op, false)),
            Some(Fault::LoseReply) => Ok(Pass::Lose),
            Some(Fault::ApplyLate(d)) => Ok(Pass::Late(d)),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(Pass::Through)
            }
            Some(Fault::Hang) => {
                self.release.notified().await;
                Ok(Pass::Hung)
            }
        }
    }

    /// [`Fault::ApplyLate`] of a register or unregister: the write reaches the wrapped
    /// registry `d` from now; the caller gets the error returned.
    fn apply_late(&self, op: Op, url: &Url, d: Duration) -> Error {
        let (inner, url) = (self.inner.clone(), url.clone());
        let last_fault = self.last_fault.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = match op {
                Op::Unregister => inner.unregister(&url).await,
                _ => inner.register(&url).await,
            };
            *lock(&last_fault) = Some(tokio::time::Instant::now());
        });
        self.note_fault();
        self.mark_returned(op);
        self.injected(op, true)
    }

    fn injected(&self, op: Op, reached: bool) -> Error {
        Error::Injected {
            operation: format!("{op:?}").to_lowercase(),
            reached,
        }
    }

    /// The outcome of a call that reached the wrapped registry.
    fn leave<T>(&self, op: Op, pass: Pass, value: T) -> Result<T> {
        self.mark_returned(op);
        match pass {
            Pass::Through => Ok(value),
            Pass::Hung => {
                self.note_fault();
                Ok(value)
            }
            Pass::Lose | Pass::Late(_) => {
                self.note_fault();
                Err(self.injected(op, true))
            }
        }
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
        let pass = self.enter(Op::Register).await?;
        if let Pass::Late(d) = pass {
            return Err(self.apply_late(Op::Register, url, d));
        }
        self.inner
            .register(url)
            .await
            .inspect_err(|_| self.mark_returned(Op::Register))?;
        {
            let mut p = lock(&self.passed);
            match p.registered.iter_mut().find(|u| *u == url) {
                Some(u) => *u = url.clone(),
                None => p.registered.push(url.clone()),
            }
        }
        self.leave(Op::Register, pass, ())
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        let pass = self.enter(Op::Unregister).await?;
        if let Pass::Late(d) = pass {
            return Err(self.apply_late(Op::Unregister, url, d));
        }
        self.inner
            .unregister(url)
            .await
            .inspect_err(|_| self.mark_returned(Op::Unregister))?;
        lock(&self.passed).registered.retain(|u| u != url);
        self.leave(Op::Unregister, pass, ())
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let pass = self.enter(Op::Subscribe).await?;
        // Recorded first, so a session loss while the call runs removes it too.
        let id = listener_id(&listener);
        let new = {
            let mut p = lock(&self.passed);
            let new = !p
                .subscriptions
                .iter()
                .any(|(u, l)| u == url && listener_id(l) == id);
            if new {
                p.subscriptions.push((url.clone(), listener.clone()));
            }
            new
        };
        if let Err(e) = self.inner.subscribe(url, listener.clone()).await {
            if new {
                lock(&self.passed)
                    .subscriptions
                    .retain(|(u, l)| !(u == url && listener_id(l) == id));
            }
            self.mark_returned(Op::Subscribe);
            return Err(e);
        }
        self.leave(Op::Subscribe, pass, ())
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        let pass = self.enter(Op::Unsubscribe).await?;
        self.inner
            .unsubscribe(url, listener)
            .await
            .inspect_err(|_| self.mark_returned(Op::Unsubscribe))?;
        let id = listener_id(listener);
        lock(&self.passed)
            .subscriptions
            .retain(|(u, l)| !(u == url && listener_id(l) == id));
        self.leave(Op::Unsubscribe, pass, ())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let pass = self.enter(Op::Lookup).await?;
        let found = self
            .inner
            .lookup(url)
            .await
            .inspect_err(|_| self.mark_returned(Op::Lookup))?;
        self.leave(Op::Lookup, pass, found)
    }

    async fn destroy(&self) {
        self.inner.destroy().await;
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }
}
