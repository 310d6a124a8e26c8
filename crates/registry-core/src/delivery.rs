//! [`Delivery`]: what hands one subscription's notifications to its listener
//! (CONTRACT §4.5–4.7, 4.9).
//!
//! Producers (a backend's watch handler, a store mutation) call [`Delivery::push`], which
//! never blocks and never runs the listener (except [`Delivery::inline`], for forwarders). A
//! drainer is started when something is pushed and none is running, and ends when the queue
//! is empty, so an idle subscription costs no task. It:
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::registry::{Notification, NotifyListener, Source};
use crate::url::PROVIDERS_CATEGORY;

type Key = (String, String);

/// The lists of one delivery, one per (service, category): a plain vector while there are
/// few (most subscriptions have one to four categories: no hashing, no spare buckets), a map
/// beyond [`FEW`] (`interface=*` subscriptions of many services).
///
/// Beyond [`FEW`], the lists last delivered empty are kept only for the [`KEPT_EMPTY`] most
/// recent (service, category) pairs: an `interface=*` subscription is told an empty list for
/// every service that leaves, and would otherwise hold one for every service name it ever saw.
/// A pair forgotten that way is treated as never delivered (what matters of it, that it holds
/// nothing, is what a listener assumes of a service it was never told about; the keeper,
/// upstream, still ignores older reads of it).
#[derive(Default)]
struct Lists {
    few: Vec<Tagged>,
    many: HashMap<Key, Tagged>,
    /// The pairs of `many` delivered empty, oldest first (a pair may appear more than once,
    /// and may hold a non-empty list by now: both are checked when it is taken off).
    empties: VecDeque<Key>,
}

const FEW: usize = 16;
/// How many pairs delivered empty a delivery of many pairs keeps (see [`Lists`]).
const KEPT_EMPTY: usize = 256;

impl Lists {
    fn get(&self, service: &str, category: &str) -> Option<&Tagged> {
        if self.many.is_empty() {
            self.few
                .iter()
                .find(|t| t.n.service == service && t.n.category == category)
        } else {
            self.many.get(&(service.to_owned(), category.to_owned()))
        }
    }

    fn get_mut(&mut self, service: &str, category: &str) -> Option<&mut Tagged> {
        if self.many.is_empty() {
            self.few
                .iter_mut()
                .find(|t| t.n.service == service && t.n.category == category)
        } else {
            self.many
                .get_mut(&(service.to_owned(), category.to_owned()))
        }
    }

    fn insert(&mut self, t: Tagged) {
        if !self.many.is_empty() {
            self.insert_many(t);
            return;
        }
        if let Some(slot) = self.get_mut(&t.n.service, &t.n.category) {
            *slot = t;
            return;
        }
        if self.few.len() < FEW {
            self.few.reserve_exact(1);
            self.few.push(t);
            return;
        }
        for old in std::mem::take(&mut self.few) {
            self.insert_many(old);
        }
        self.insert_many(t);
    }

    fn insert_many(&mut self, t: Tagged) {
        let key = (t.n.service.clone(), t.n.category.clone());
        if t.n.is_empty() || t.protected {
            self.empties.push_back(key.clone());
        }
        self.many.insert(key, t);
        self.trim_empties();
    }

    /// Lets go of the oldest pairs delivered empty beyond [`KEPT_EMPTY`].
    fn trim_empties(&mut self) {
        while self.empties.len() > KEPT_EMPTY {
            let Some(old) = self.empties.pop_front() else {
                break;
            };
            // Only if it is still empty (or kept by empty protection) and this is its latest
            // place in the queue.
            if self
                .many
                .get(&old)
                .is_some_and(|t| t.n.is_empty() || t.protected)
                && !self.empties.contains(&old)
            {
                self.many.remove(&old);
            }
        }
    }

    /// Empty protection kept the list of (`service`, `category`) instead of an empty one: it
    /// ages out like a list delivered empty (the service left).
    fn protect(&mut self, service: &str, category: &str) {
        let Some(t) = self.get_mut(service, category).filter(|t| !t.protected) else {
            return;
        };
        t.protected = true;
        if !self.many.is_empty() {
            let key = (service.to_owned(), category.to_owned());
            self.empties.push_back(key);
            self.trim_empties();
        }
    }

    fn values(&self) -> impl Iterator<Item = &Tagged> {
        self.few.iter().chain(self.many.values())
    }
}

/// Options of a [`Delivery`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryOptions {
    /// Do not deliver an empty `providers` list when a non-empty one was delivered before.
    pub empty_protection: bool,
    /// A label for logs (the subscription URL).
    pub label: String,
}

/// A notification and the epoch of the source it came from (see [`Delivery::rebase`]).
#[derive(Clone)]
struct Tagged {
    n: Notification,
    epoch: u64,
    /// Kept in place of an empty `providers` list by empty protection (in `Lists`, it ages out
    /// like a list delivered empty).
    protected: bool,
}

struct State {
    enqueued: u64,
    /// Bumped by [`Delivery::rebase`]: lists of a newer epoch are never older than lists of an
    /// earlier one, whatever their revisions.
    epoch: u64,
    /// Lists waiting for the listener, in delivery order, at most one per (service, category).
    pending: VecDeque<Tagged>,
    last: Lists,
    closed: bool,
    /// A listener call is under way.
    running: bool,
    /// A drainer is scheduled or running (at most one at a time: calls stay in order).
    active: bool,
}

struct Inner {
    state: Mutex<State>,
    /// How many pushes were delivered (or superseded or dropped); `u64::MAX` once closed.
    delivered: AtomicU64,
    /// Woken when `delivered` grows.
    progress: Notify,
    /// `true` while the listener may be called; held during each call.
    gate: tokio::sync::Mutex<bool>,
    listener: Arc<dyn NotifyListener>,
    options: DeliveryOptions,
    isolated: bool,
    /// Where drainers run (task modes only).
    runtime: Option<tokio::runtime::Handle>,
    /// Inline mode (no task): held through each listener call, so calls are one at a time
    /// and `close` can wait for a running one.
    inline: Option<Mutex<()>>,
}

/// The delivery task of one subscription; see the module documentation.
pub struct Delivery {
    inner: Arc<Inner>,
}

impl Delivery {
    /// A delivery for `listener` on the current tokio runtime; the listener is called on a task
    /// started when lists are pushed. For a listener that only enqueues (a layer forwarding to
    /// another delivery).
    pub fn spawn(listener: Arc<dyn NotifyListener>, options: DeliveryOptions) -> Delivery {
        Delivery::start(listener, options, false)
    }

    /// Like [`Delivery::spawn`], but the listener is called on tokio's blocking pool (one call
    /// at a time, in order; one hand-off from the push to the call): for application
    /// listeners, which may block.
    pub fn spawn_isolated(listener: Arc<dyn NotifyListener>, options: DeliveryOptions) -> Delivery {
        Delivery::start(listener, options, true)
    }

    /// No task: [`Delivery::push`] applies the revision guard, the repeat filter and empty
    /// protection and calls the listener at once, on the caller's task. Only for a listener
    /// that never blocks (see [`NotifyListener::is_forwarder`]): it saves a task per
    /// subscription and a hand-off per notification.
    pub fn inline(listener: Arc<dyn NotifyListener>, options: DeliveryOptions) -> Delivery {
        Delivery {
            inner: Delivery::inner(listener, options, false, true),
        }
    }

    /// What a backend uses for a subscription's listener: [`Delivery::inline`] when the
    /// listener is a forwarder (the reliability layer's, which only hands the list to its own
    /// delivery: one hop from the backend's event to the application's listener), else
    /// [`Delivery::spawn_isolated`] (an application listener, which may block).
    pub fn for_listener(listener: Arc<dyn NotifyListener>, options: DeliveryOptions) -> Delivery {
        if listener.is_forwarder() {
            Delivery::inline(listener, options)
        } else {
            Delivery::start(listener, options, true)
        }
    }

    fn start(
        listener: Arc<dyn NotifyListener>,
        options: DeliveryOptions,
        isolated: bool,
    ) -> Delivery {
        Delivery {
            inner: Delivery::inner(listener, options, isolated, false),
        }
    }

    fn inner(
        listener: Arc<dyn NotifyListener>,
        options: DeliveryOptions,
        isolated: bool,
        inline: bool,
    ) -> Arc<Inner> {
        Arc::new(Inner {
            state: Mutex::new(State {
                enqueued: 0,
                epoch: 0,
                pending: VecDeque::new(),
                last: Lists::default(),
                closed: false,
                running: false,
                active: false,
            }),
            delivered: AtomicU64::new(0),
            progress: Notify::new(),
            gate: tokio::sync::Mutex::new(true),
            listener,
            options,
            isolated,
            runtime: (!inline).then(tokio::runtime::Handle::current),
            inline: inline.then(|| Mutex::new(())),
        })
    }

    /// Queues a notification; returns at once. A pending list of the same (service, category)
    /// is replaced by this one unless this one is older; the replacement takes its place at the
    /// end of the queue, so a newer list never overtakes an older change of another category
    /// (CONTRACT §4.5).
    pub fn push(&self, n: Notification) {
        if let Some(calls) = &self.inner.inline {
            self.push_inline(calls, n);
            return;
        }
        {
            let mut st = lock(&self.inner.state);
            if st.closed {
                return;
            }
            st.enqueued += 1;
            let new = Tagged {
                n,
                epoch: st.epoch,
                protected: false,
            };
            let at = st
                .pending
                .iter()
                .position(|p| p.n.service == new.n.service && p.n.category == new.n.category);
            match at {
                Some(i) if is_stale(&st.pending[i], &new) => {}
                Some(i) => {
                    st.pending.remove(i);
                    st.pending.push_back(new);
                }
                None => st.pending.push_back(new),
            }
            if st.active {
                return;
            }
            st.active = true;
        }
        // No drainer: start one. It ends when the queue is empty, so an idle subscription
        // costs no task, and an application listener is reached with one hand-off.
        let (inner, runtime) = (self.inner.clone(), &self.inner.runtime);
        let Some(runtime) = runtime else { return };
        if inner.isolated {
            runtime.spawn_blocking(move || drain_blocking(&inner));
        } else {
            runtime.spawn(drain_task(inner));
        }
    }

    fn push_inline(&self, calls: &Mutex<()>, n: Notification) {
        let _call = lock(calls);
        let (t, upto) = {
            let mut st = lock(&self.inner.state);
            if st.closed {
                return;
            }
            st.enqueued += 1;
            (
                Tagged {
                    n,
                    epoch: st.epoch,
                    protected: false,
                },
                st.enqueued,
            )
        };
        if admit(&self.inner, &t) {
            let listener = &self.inner.listener;
            if catch_unwind(AssertUnwindSafe(|| listener.notify(t.n))).is_err() {
                report_panic(&self.inner);
            }
        }
        self.inner.advance(upto);
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
        let inner = self.inner.clone();
        async move {
            loop {
                // Created before the check: a wake-up between the two is not lost.
                let progressed = inner.progress.notified();
                if inner.delivered.load(Ordering::Acquire) >= target {
                    return;
                }
                progressed.await;
            }
        }
    }

    /// [`Delivery::flush`] bounded by `limit`: `true` when everything pushed before was
    /// delivered in time.
    pub async fn flush_within(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, self.flush_handle())
            .await
            .is_ok()
    }

    /// The last list delivered for each (service, category).
    pub fn last_delivered(&self) -> Vec<Notification> {
        lock(&self.inner.state)
            .last
            .values()
            .map(|t| t.n.clone())
            .collect()
    }

    /// The last list delivered for one (service, category).
    pub fn last_delivered_for(&self, service: &str, category: &str) -> Option<Notification> {
        lock(&self.inner.state)
            .last
            .get(service, category)
            .map(|t| t.n.clone())
    }

    /// Starts a new epoch of the source: lists pushed from now on are taken whatever their
    /// revisions compared with lists delivered or still pending from before (those pending
    /// ones are dropped when a newer-epoch list of their category arrives, and never delivered
    /// after one). For when the source of the lists is re-established (a new raw subscription
    /// after a new session) and may number its lists afresh. Call it before the source is
    /// re-established, so its first lists belong to the new epoch.
    pub fn rebase(&self) {
        lock(&self.inner.state).epoch += 1;
    }

    /// Stops the task. When this returns no listener call is running and none will start.
    pub async fn close(&self) {
        self.begin_close();
        if let Some(calls) = &self.inner.inline {
            // Inline calls are short (forwarders only): wait for a running one.
            drop(lock(calls));
        } else {
            *self.inner.gate.lock().await = false;
        }
        self.inner.advance(u64::MAX);
    }

    /// Like [`Delivery::close`], but waits at most `limit` for a listener call that is running.
    /// No call starts after this returns either way; `false` says a call was still running
    /// (it was logged: a listener must not block, least of all on the registry calling it).
    pub async fn close_within(&self, limit: std::time::Duration) -> bool {
        self.begin_close();
        if let Some(calls) = &self.inner.inline {
            drop(lock(calls));
            self.inner.advance(u64::MAX);
            return true;
        }
        let done = match tokio::time::timeout(limit, self.inner.gate.lock()).await {
            Ok(mut gate) => {
                *gate = false;
                true
            }
            Err(_) if !lock(&self.inner.state).running => {
                // The call waiting for its turn on the blocking pool sees `closed` and skips.
                true
            }
            Err(_) => {
                tracing::warn!(
                    subscription = %self.inner.options.label,
                    waited_ms = limit.as_millis() as u64,
                    "a listener call is still running; not waiting for it any longer (no further call will start)"
                );
                false
            }
        };
        self.inner.advance(u64::MAX);
        done
    }

    fn begin_close(&self) {
        {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            st.pending = VecDeque::new();
        }
    }

    /// Whether [`Delivery::close`] was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.inner.state).closed
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            st.pending = VecDeque::new();
        }
        // A flush waiting on this delivery returns.
        self.inner.advance(u64::MAX);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The same entries in the same order, timestamps included (`Url` equality ignores the
/// `timestamp`, but a re-registration with a new one is news to a listener).
fn same_lists(a: &[crate::Url], b: &[crate::Url]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y && x.parameter("timestamp") == y.parameter("timestamp"))
}

/// `new` is older than `old` and must not replace it.
fn is_stale(old: &Tagged, new: &Tagged) -> bool {
    stale(&old.n, old.epoch, &new.n, new.epoch)
}

fn stale(old: &Notification, old_epoch: u64, new: &Notification, new_epoch: u64) -> bool {
    if new_epoch != old_epoch {
        return new_epoch < old_epoch;
    }
    match (old.source, new.source) {
        // A live list after a cached one is always news; a cached list never replaces a
        // live one of the same source (it was saved earlier).
        (Source::Cache, Source::Live) => false,
        (Source::Live, Source::Cache) => true,
        _ => new.revision < old.revision,
    }
}

/// Takes what is pending, or ends the drainer (clearing `active`) when nothing is; `None`
/// also when closed.
fn next_batch(inner: &Inner) -> Option<(VecDeque<Tagged>, u64)> {
    let mut st = lock(&inner.state);
    if st.closed || st.pending.is_empty() {
        st.active = false;
        let upto = st.enqueued;
        let closed = st.closed;
        drop(st);
        if !closed {
            inner.advance(upto);
        }
        return None;
    }
    // Taken whole: an idle subscription keeps no queue capacity.
    Some((std::mem::take(&mut st.pending), st.enqueued))
}

fn report_panic(inner: &Inner) {
    tracing::error!(
        subscription = %inner.options.label,
        "a registry listener panicked; the notification is dropped and the subscription goes on"
    );
}

/// The drainer of an isolated delivery, on tokio's blocking pool: calls the listener for
/// everything pending, in order, until the queue is empty.
fn drain_blocking(inner: &Arc<Inner>) {
    while let Some((batch, upto)) = next_batch(inner) {
        for t in batch {
            if !admit(inner, &t) {
                continue;
            }
            // Held through the call: `close` waits for it.
            let gate = inner.gate.blocking_lock();
            if !*gate || lock(&inner.state).closed {
                lock(&inner.state).active = false;
                return;
            }
            if call_listener(inner, t.n) {
                report_panic(inner);
            }
            drop(gate);
        }
        inner.advance(upto);
    }
}

/// The drainer of a [`Delivery::spawn`] delivery: the same, on a task.
async fn drain_task(inner: Arc<Inner>) {
    while let Some((batch, upto)) = next_batch(&inner) {
        for t in batch {
            if !admit(&inner, &t) {
                continue;
            }
            let gate = inner.gate.lock().await;
            if !*gate || lock(&inner.state).closed {
                lock(&inner.state).active = false;
                return;
            }
            if call_listener(&inner, t.n) {
                report_panic(&inner);
            }
            drop(gate);
        }
        inner.advance(upto);
    }
}

impl Inner {
    /// Records that the pushes up to `upto` were delivered and wakes the flushes waiting.
    fn advance(&self, upto: u64) {
        if self.delivered.fetch_max(upto, Ordering::AcqRel) < upto {
            self.progress.notify_waiters();
        }
    }
}

/// Calls the listener unless the delivery was closed meanwhile (a call queued on the blocking
/// pool may start late: it must not start after `close` returned). Returns whether it
/// panicked.
fn call_listener(inner: &Inner, n: Notification) -> bool {
    {
        let mut st = lock(&inner.state);
        if st.closed {
            return false;
        }
        st.running = true;
    }
    let listener = &inner.listener;
    let panicked = catch_unwind(AssertUnwindSafe(|| listener.notify(n))).is_err();
    lock(&inner.state).running = false;
    panicked
}

/// The revision guard, duplicate filter and empty protection; records what is delivered.
fn admit(inner: &Inner, t: &Tagged) -> bool {
    let mut st = lock(&inner.state);
    let n = &t.n;
    if let Some(last) = st.last.get(&n.service, &n.category) {
        let (last_epoch, last) = (last.epoch, &last.n);
        if stale(last, last_epoch, n, t.epoch) {
            tracing::debug!(
                subscription = %inner.options.label,
                category = %n.category,
                revision = n.revision,
                last = last.revision,
                "dropped a notification older than the one already delivered"
            );
            return false;
        }
        if last.source == n.source && same_lists(&last.urls, &n.urls) {
            // The list just delivered, perhaps re-read at a newer revision: not news.
            let revision = if t.epoch == last_epoch {
                last.revision.max(n.revision)
            } else {
                n.revision
            };
            if let Some(l) = st.last.get_mut(&n.service, &n.category) {
                l.n.revision = revision;
                l.epoch = t.epoch;
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
            st.last.protect(&n.service, &n.category);
            return false;
        }
    }
    st.last.insert(t.clone());
    true
}
