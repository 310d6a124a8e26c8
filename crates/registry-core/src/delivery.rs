//! [`Delivery`]: the one task per subscription that hands notifications to a listener
//! (CONTRACT §4.5–4.7, 4.9).
//!
//! Producers (a backend's watch handler, a store mutation) call [`Delivery::push`], which
//! never blocks and never runs the listener. The delivery task then:
//! - delivers one notification at a time, in the order they were pushed;
//! - keeps only the latest pending list per (service, category), so a slow listener ends on
//!   the latest state instead of a queue of stale ones;
//! - drops a snapshot whose revision is older than the last delivered one (a live list after
//!   a cached one is always taken), and a repeat of the list just delivered;
//! - with empty protection, does not push an empty `providers` list over a non-empty one;
//! - catches a panicking listener and logs it, so other subscriptions are never harmed;
//! - with [`Delivery::spawn_isolated`], runs the listener on tokio's blocking pool, so a
//!   listener that blocks never stalls the runtime (and with it other subscriptions, client
//!   event loops, keep-alives), even on a current-thread runtime. Use it wherever the listener
//!   is application code; internal forwarding listeners that only enqueue do not need it.
//!
//! [`Delivery::close`] returns only when no listener call is running, and none starts after.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use crate::registry::{Notification, NotifyListener, Source};
use crate::url::PROVIDERS_CATEGORY;

type Key = (String, String);

/// Options of a [`Delivery`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryOptions {
    /// Do not deliver an empty `providers` list when a non-empty one was delivered before.
    pub empty_protection: bool,
    /// A label for logs (the subscription URL).
    pub label: String,
}

struct State {
    enqueued: u64,
    order: VecDeque<Key>,
    pending: HashMap<Key, Notification>,
    last: HashMap<Key, Notification>,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
    delivered: watch::Sender<u64>,
    /// `true` while the listener may be called; held during each call.
    gate: tokio::sync::Mutex<bool>,
    listener: Arc<dyn NotifyListener>,
    options: DeliveryOptions,
    isolated: bool,
}

/// The delivery task of one subscription; see the module documentation.
pub struct Delivery {
    inner: Arc<Inner>,
}

impl Delivery {
    /// Starts the delivery task for `listener` on the current tokio runtime; the listener is
    /// called on that task. For a listener that only enqueues (a layer forwarding to another
    /// delivery).
    pub fn spawn(listener: Arc<dyn NotifyListener>, options: DeliveryOptions) -> Delivery {
        Delivery::start(listener, options, false)
    }

    /// Like [`Delivery::spawn`], but each call of the listener runs on tokio's blocking pool
    /// (one at a time, in order): for application listeners, which may block.
    pub fn spawn_isolated(listener: Arc<dyn NotifyListener>, options: DeliveryOptions) -> Delivery {
        Delivery::start(listener, options, true)
    }

    fn start(
        listener: Arc<dyn NotifyListener>,
        options: DeliveryOptions,
        isolated: bool,
    ) -> Delivery {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                enqueued: 0,
                order: VecDeque::new(),
                pending: HashMap::new(),
                last: HashMap::new(),
                closed: false,
            }),
            wake: Notify::new(),
            delivered: watch::channel(0).0,
            gate: tokio::sync::Mutex::new(true),
            listener,
            options,
            isolated,
        });
        tokio::spawn(run(inner.clone()));
        Delivery { inner }
    }

    /// Queues a notification; returns at once. A pending list of the same (service, category)
    /// is replaced by this one unless this one is older.
    pub fn push(&self, n: Notification) {
        {
            let mut st = lock(&self.inner.state);
            if st.closed {
                return;
            }
            st.enqueued += 1;
            let key = (n.service.clone(), n.category.clone());
            match st.pending.get(&key) {
                Some(p) if is_stale(p, &n) => {}
                Some(_) => {
                    st.pending.insert(key, n);
                }
                None => {
                    st.order.push_back(key.clone());
                    st.pending.insert(key, n);
                }
            }
        }
        self.inner.wake.notify_one();
    }

    /// Waits until everything pushed before this call was delivered (or superseded, or
    /// dropped as stale), or the delivery was closed.
    pub async fn flush(&self) {
        self.flush_handle().await
    }

    /// Like [`Delivery::flush`], but the target is fixed now and the future does not borrow
    /// the delivery, so it can be awaited after the delivery was moved or locks released.
    pub fn flush_handle(&self) -> impl Future<Output = ()> + Send + 'static {
        let target = lock(&self.inner.state).enqueued;
        let mut rx = self.inner.delivered.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d >= target).await;
        }
    }

    /// The last list delivered for each (service, category).
    pub fn last_delivered(&self) -> Vec<Notification> {
        lock(&self.inner.state).last.values().cloned().collect()
    }

    /// The last list delivered for one (service, category).
    pub fn last_delivered_for(&self, service: &str, category: &str) -> Option<Notification> {
        lock(&self.inner.state)
            .last
            .get(&(service.to_owned(), category.to_owned()))
            .cloned()
    }

    /// Forgets the revisions delivered so far: the next list of each (service, category) is
    /// taken whatever its revision. For when the source of the lists was re-established (a new
    /// raw subscription after a new session) and may number its lists afresh.
    pub fn rebase(&self) {
        let mut st = lock(&self.inner.state);
        for n in st.last.values_mut() {
            n.revision = 0;
        }
    }

    /// Stops the task. When this returns no listener call is running and none will start.
    pub async fn close(&self) {
        {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            st.pending.clear();
            st.order.clear();
        }
        self.inner.wake.notify_one();
        *self.inner.gate.lock().await = false;
        self.inner.delivered.send_replace(u64::MAX);
    }

    /// Whether [`Delivery::close`] was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.inner.state).closed
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        lock(&self.inner.state).closed = true;
        self.inner.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `new` is older than `old` and must not replace it.
fn is_stale(old: &Notification, new: &Notification) -> bool {
    if old.source == Source::Cache && new.source == Source::Live {
        return false;
    }
    new.revision < old.revision
}

async fn run(inner: Arc<Inner>) {
    loop {
        let notified = inner.wake.notified();
        let (batch, upto) = {
            let mut st = lock(&inner.state);
            if st.closed {
                return;
            }
            let mut batch = Vec::with_capacity(st.order.len());
            while let Some(key) = st.order.pop_front() {
                if let Some(n) = st.pending.remove(&key) {
                    batch.push(n);
                }
            }
            (batch, st.enqueued)
        };
        if batch.is_empty() {
            notified.await;
            continue;
        }
        for n in batch {
            if !admit(&inner, &n) {
                continue;
            }
            let gate = inner.gate.lock().await;
            if !*gate {
                return;
            }
            let panicked = if inner.isolated {
                let listener = inner.listener.clone();
                match tokio::task::spawn_blocking(move || listener.notify(n)).await {
                    Ok(()) => false,
                    Err(e) => e.is_panic(),
                }
            } else {
                let listener = &inner.listener;
                catch_unwind(AssertUnwindSafe(|| listener.notify(n))).is_err()
            };
            if panicked {
                tracing::error!(
                    subscription = %inner.options.label,
                    "a registry listener panicked; the notification is dropped and the subscription goes on"
                );
            }
            drop(gate);
        }
        inner.delivered.send_if_modified(|d| {
            let changed = upto > *d;
            *d = (*d).max(upto);
            changed
        });
    }
}

/// The revision guard, duplicate filter and empty protection; records what is delivered.
fn admit(inner: &Inner, n: &Notification) -> bool {
    let mut st = lock(&inner.state);
    let key = (n.service.clone(), n.category.clone());
    if let Some(last) = st.last.get(&key) {
        if is_stale(last, n) {
            tracing::debug!(
                subscription = %inner.options.label,
                category = %n.category,
                revision = n.revision,
                last = last.revision,
                "dropped a notification older than the one already delivered"
            );
            return false;
        }
        if last.source == n.source && last.urls == n.urls {
            // The list just delivered, perhaps re-read at a newer revision: not news.
            let revision = last.revision.max(n.revision);
            if let Some(l) = st.last.get_mut(&key) {
                l.revision = revision;
            }
            return false;
        }
        if inner.options.empty_protection
            && n.category == PROVIDERS_CATEGORY
            && n.is_empty()
            && !last.is_empty()
        {
            tracing::warn!(
                subscription = %inner.options.label,
                service = %n.service,
                "empty protection: kept the previous providers list instead of an empty one"
            );
            return false;
        }
    }
    st.last.insert(key, n.clone());
    true
}
