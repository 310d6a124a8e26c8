//! [`ListKeeper`]: the lists of every subscription of one registry, kept in one place for
//! every backend (built-in or third-party).
//!
//! A backend does I/O and sessions only. It reads and watches *scopes* ([`Scope`]: one
//! category of one service, one service, or everything under the root) and feeds what it sees:
//! an entry added ([`ListKeeper::put`]), an entry removed ([`ListKeeper::remove`]), or a full
//! (re-)read of a scope ([`ListKeeper::replace`]). The keeper owns everything else:
//!
//! - each entry held once, as a parsed [`Url`] (no node name or key beside it: a delete event
//!   is decoded to its URL and removed by it; entries are told apart by their full string);
//! - per-subscription matching ([`is_match`]: category tokens,
//!   group/version/classifier, `enabled`, `interface=*`), maintained one entry per event: no
//!   full rebuild, no sort;
//! - subscriptions that ask the same query (same interface, categories, group, version,
//!   classifier, `enabled`) share one matched set, and every subscription of a query is handed
//!   the same immutable list (`Arc<[Url]>`, built once per change);
//! - `empty://` markers, revisions (never smaller than the backend's, always growing), and
//!   the first lists of a subscription once every scope it needs was read;
//! - lookups from what is already held.
//!
//! Lists go to each subscription's [`Delivery`], which a backend builds with
//! [`Delivery::for_listener`]: with the reliability layer's listener the list reaches the
//! application's delivery on the backend's own task (one hand-off in all). The keeper never
//! holds its state lock while it pushes: it collects the lists under that lock and pushes
//! them under a second one taken before the first is released, so lists reach deliveries in
//! the order the changes were applied (across categories too) while lookups go on.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use registry_core::delivery::{Delivery, DeliveryOptions};
//! use registry_core::keeper::{ListKeeper, Scope};
//! use registry_core::{Notification, NotifyListener, Url};
//!
//! let keeper = ListKeeper::new("example");
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = seen.clone();
//! let listener: Arc<dyn NotifyListener> =
//!     Arc::new(move |n: Notification| sink.lock().unwrap().push(n.urls.len()));
//! let delivery = Arc::new(Delivery::inline(listener, DeliveryOptions::default()));
//! let consumer: Url = "consumer://10.0.0.2/com.foo.Bar".parse()?;
//! keeper.subscribe(&consumer, delivery);
//! // The backend read the scope (one category of one service) and found one entry...
//! let provider: Url = "dubbo://10.0.0.1:20880/com.foo.Bar".parse()?;
//! let scope = Scope::category("com.foo.Bar", "providers");
//! keeper.replace(&scope, [("com.foo.Bar".into(), "providers".into(), provider.clone())], 7);
//! // ...then saw it deleted.
//! keeper.remove("com.foo.Bar", "providers", &provider, 8);
//! assert_eq!(*seen.lock().unwrap(), vec![1, 1]); // the entry, then the empty:// marker
//! # Ok::<(), registry_core::Error>(())
//! ```

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::delivery::Delivery;
use crate::matching::is_match;
use crate::registry::{Notification, Source};
use crate::url::{
    ANY_VALUE, CATEGORY_KEY, CLASSIFIER_KEY, ENABLED_KEY, GROUP_KEY, Url, VERSION_KEY,
};

/// What a backend reads and watches as one unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One category of one service (etcd: a category prefix; ZooKeeper: a category node).
    Category {
        /// The service interface.
        service: String,
        /// The category.
        category: String,
    },
    /// Every category of one service.
    Service {
        /// The service interface.
        service: String,
    },
    /// Everything under the registry's root (what `interface=*` subscriptions need).
    Root,
}

impl Scope {
    /// [`Scope::Category`].
    pub fn category(service: impl Into<String>, category: impl Into<String>) -> Scope {
        Scope::Category {
            service: service.into(),
            category: category.into(),
        }
    }

    /// [`Scope::Service`].
    pub fn service(service: impl Into<String>) -> Scope {
        Scope::Service {
            service: service.into(),
        }
    }

    /// Whether the entries of (`service`, `category`) are inside this scope.
    pub fn covers(&self, service: &str, category: &str) -> bool {
        match self {
            Scope::Root => true,
            Scope::Service { service: s } => s == service,
            Scope::Category {
                service: s,
                category: c,
            } => s == service && c == category,
        }
    }
}

/// The id of a subscription in a [`ListKeeper`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(u64);

/// Counts of what a keeper holds, for tests, metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeeperStats {
    /// Entries held (each once, whatever the number of subscriptions that see it).
    pub entries: usize,
    /// Distinct queries (subscriptions asking the same share one).
    pub queries: usize,
    /// Matched sets (one per query and (service, category) it has seen).
    pub views: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Scopes read at least once and not forgotten.
    pub loaded_scopes: usize,
    /// (service, category) pairs held: the ones with entries, and empty ones a subscription
    /// names (an `interface=*` subscription names none).
    pub topics: usize,
    /// Services the `interface=*` subscriptions were told about, summed over them.
    pub told: usize,
}

/// A URL compared, hashed and ordered by its full string: two entries are the same entry only
/// when they are the same string (a re-registration with another timestamp is another entry
/// until the old one is removed).
#[derive(Clone)]
struct Exact(Url);

impl PartialEq for Exact {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_full_str() == other.0.as_full_str()
    }
}
impl Eq for Exact {}
impl PartialOrd for Exact {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Exact {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.as_full_str().cmp(other.0.as_full_str())
    }
}
impl Borrow<str> for Exact {
    fn borrow(&self) -> &str {
        self.0.as_full_str()
    }
}

/// (service, category)
type TopicKey = (String, String);

/// What [`is_match`] reads of a subscription URL: subscriptions with equal keys see the same
/// entries.
#[derive(Clone, PartialEq, Eq, Hash)]
struct QueryKey {
    interface: String,
    category: Option<String>,
    enabled_any: bool,
    group: Option<String>,
    version: Option<String>,
    classifier: Option<String>,
}

impl QueryKey {
    fn of(url: &Url) -> QueryKey {
        let p = |k: &str| url.parameter(k).map(str::to_owned);
        QueryKey {
            interface: url.service_interface().to_owned(),
            category: p(CATEGORY_KEY),
            enabled_any: url.parameter(ENABLED_KEY) == Some(ANY_VALUE),
            group: p(GROUP_KEY),
            version: p(VERSION_KEY),
            classifier: p(CLASSIFIER_KEY),
        }
    }
}

/// The entries of one (service, category) one query selects.
#[derive(Default)]
struct View {
    matched: BTreeSet<Exact>,
    /// The list handed out, built on first use after a change.
    snapshot: Option<Arc<[Url]>>,
    /// The `empty://` marker of the query's first subscription URL, shared by every
    /// subscription with the same URL.
    marker: Option<Arc<[Url]>>,
}

impl View {
    fn list(&mut self) -> Option<Arc<[Url]>> {
        if self.matched.is_empty() {
            return None;
        }
        Some(
            self.snapshot
                .get_or_insert_with(|| self.matched.iter().map(|e| e.0.clone()).collect())
                .clone(),
        )
    }

    fn changed(&mut self) {
        self.snapshot = None;
    }
}

struct Query {
    /// The first subscription URL of the query: what entries are matched against.
    repr: Url,
    categories: Vec<String>,
    wildcard: bool,
    subs: Vec<SubscriptionId>,
    views: HashMap<TopicKey, View>,
}

impl Query {
    fn watches(&self, service: &str, category: &str) -> bool {
        (self.wildcard || self.repr.service_interface() == service)
            && self.categories.iter().any(|c| c == category)
    }
}

struct Sub {
    url: Url,
    delivery: Arc<Delivery>,
    query: QueryKey,
    ready: bool,
    /// Services an `interface=*` subscription has been told about.
    known: BTreeSet<String>,
}

/// Lists to push once the lock is released.
type Pushes = Vec<(Arc<Delivery>, Notification)>;

#[derive(Default)]
struct State {
    rev: u64,
    next_id: u64,
    /// service -> category -> entries
    topics: BTreeMap<String, BTreeMap<String, BTreeSet<Exact>>>,
    queries: HashMap<QueryKey, Query>,
    subs: HashMap<SubscriptionId, Sub>,
    loaded: Vec<Scope>,
    /// The highest store revision applied to each (service, category), for stores that
    /// number their changes (see [`ListKeeper::change`]).
    marks: HashMap<TopicKey, u64>,
    /// The marks of the last [`RETIRED_MARKS`] (service, category) pairs dropped because
    /// nothing was left in them (with the sequence number of their entry in `retired_order`):
    /// a read taken before the last removal and fed after it must still not bring the entries
    /// back. Bounded, so churned service names do not grow the keeper.
    retired: HashMap<TopicKey, (u64, u64)>,
    retired_order: VecDeque<(TopicKey, u64)>,
    retired_seq: u64,
    /// The store numbers every change in one sequence and a read carries the revision it was
    /// taken at (etcd), see [`ListKeeper::with_global_revisions`].
    global_revisions: bool,
    /// With `global_revisions`: the highest mark let go of from `retired`; a pair with no
    /// mark takes it as its mark.
    evicted_floor: u64,
}

/// How many marks of dropped (service, category) pairs are kept (see `State::retired`).
const RETIRED_MARKS: usize = 1024;

/// The lists of one registry's subscriptions; see the module documentation. Cloning gives
/// another handle on the same keeper.
#[derive(Clone)]
pub struct ListKeeper {
    inner: Arc<Inner>,
}

struct Inner {
    label: String,
    state: Mutex<State>,
    /// Taken before the state lock is released and held while the lists are pushed, so lists
    /// reach every delivery in the order the changes were applied (across categories too),
    /// while lookups and reads of the state do not wait for the pushes.
    order: Mutex<()>,
}

impl std::fmt::Debug for ListKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListKeeper")
            .field("label", &self.inner.label)
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ListKeeper {
    /// An empty keeper; `label` names it in logs (the registry URL, redacted).
    pub fn new(label: impl Into<String>) -> ListKeeper {
        ListKeeper {
            inner: Arc::new(Inner {
                label: label.into(),
                state: Mutex::new(State::default()),
                order: Mutex::new(()),
            }),
        }
    }

    /// An empty keeper for a store whose revisions are one sequence for the whole store,
    /// where a read carries the revision it was taken at (etcd's header revision; not
    /// ZooKeeper, whose `pzxid` of a list that did not change for long is old whatever the
    /// time of the read). The marks of dropped pairs are kept for the last 1,024 pairs only;
    /// with this, a read older than the highest mark let go of is ignored for every pair
    /// without a mark, so a read taken before a removal and fed after more than 1,024 other
    /// pairs were dropped still cannot bring entries back.
    pub fn with_global_revisions(label: impl Into<String>) -> ListKeeper {
        let keeper = ListKeeper::new(label);
        lock(&keeper.inner.state).global_revisions = true;
        keeper
    }

    /// Runs `f` on the state, then pushes the lists it collected, in the order the changes
    /// were applied.
    fn update<T>(&self, f: impl FnOnce(&mut State, &mut Pushes) -> T) -> T {
        let mut st = lock(&self.inner.state);
        let mut out = Pushes::new();
        let result = f(&mut st, &mut out);
        let _order = lock(&self.inner.order);
        drop(st);
        for (delivery, n) in out {
            delivery.push(n);
        }
        result
    }

    /// An entry of (`service`, `category`) was added (or seen again). `revision` is the
    /// backend's revision of the change, 0 when it has none.
    pub fn put(&self, service: &str, category: &str, url: Url, revision: u64) {
        self.change(service, category, vec![url], Vec::new(), revision);
    }

    /// An entry of (`service`, `category`) was removed; nothing happens when it was not held.
    pub fn remove(&self, service: &str, category: &str, url: &Url, revision: u64) {
        self.change(service, category, Vec::new(), vec![url.clone()], revision);
    }

    /// Applies added and removed entries of one (service, category) at once: subscriptions
    /// hear of the result in one list. `revision` is the store's number of the change (0 when
    /// the store has none): a change numbered below what (service, category) already holds is
    /// ignored, and a [`ListKeeper::replace`] read at a revision below it leaves that
    /// (service, category) as it is, so two watches covering the same entries (an
    /// `interface=*` one and a category one, each at its own pace) never take a list back.
    pub fn change(
        &self,
        service: &str,
        category: &str,
        added: Vec<Url>,
        removed: Vec<Url>,
        revision: u64,
    ) {
        let added: BTreeSet<Exact> = added.into_iter().map(Exact).collect();
        let removed: BTreeSet<Exact> = removed
            .into_iter()
            .map(Exact)
            .filter(|e| !added.contains(e))
            .collect();
        self.update(|st, out| {
            if st.is_older(service, category, revision) {
                return;
            }
            st.mark(service, category, revision);
            st.apply(service, category, added, removed, revision, out);
        });
    }

    /// A full read of `scope`: its entries are now exactly `entries` (service, category, URL;
    /// anything outside the scope is ignored). The scope counts as loaded from now on:
    /// subscriptions that were waiting for it get their first lists; the others hear of what
    /// changed.
    pub fn replace(
        &self,
        scope: &Scope,
        entries: impl IntoIterator<Item = (String, String, Url)>,
        revision: u64,
    ) {
        let mut fresh: BTreeMap<TopicKey, BTreeSet<Exact>> = BTreeMap::new();
        let mut outside = 0usize;
        for (service, category, url) in entries {
            if scope.covers(&service, &category) {
                fresh
                    .entry((service, category))
                    .or_default()
                    .insert(Exact(url));
            } else {
                outside += 1;
            }
        }
        if outside > 0 {
            tracing::debug!(keeper = %self.inner.label, ?scope, outside, "ignored entries outside the scope that was read");
        }
        self.update(|st, out| {
            // Every (service, category) held inside the scope, and every one read.
            let mut keys: BTreeSet<TopicKey> = fresh.keys().cloned().collect();
            for (s, cats) in &st.topics {
                for c in cats.keys() {
                    if scope.covers(s, c) {
                        keys.insert((s.clone(), c.clone()));
                    }
                }
            }
            for key in keys {
                let new = fresh.remove(&key).unwrap_or_default();
                if st
                    .mark_of(&key)
                    .is_some_and(|m| revision > 0 && m > revision)
                {
                    // Changed after this read was taken (another watch covering it was
                    // faster): what is held is newer.
                    continue;
                }
                st.mark(&key.0, &key.1, revision);
                let old = st.topics.get(&key.0).and_then(|c| c.get(&key.1));
                let (added, removed) = match old {
                    Some(old) => (
                        new.difference(old).cloned().collect(),
                        old.difference(&new).cloned().collect(),
                    ),
                    None => (new, BTreeSet::new()),
                };
                st.apply(&key.0, &key.1, added, removed, revision, out);
            }
            if !st.loaded.contains(scope) {
                st.loaded.push(scope.clone());
            }
            st.wake_ready(out);
        });
    }

    /// The backend stopped watching `scope`: entries no other loaded scope covers are dropped,
    /// and subscriptions that need them wait for the next [`ListKeeper::replace`] (which gives
    /// them full lists again).
    pub fn forget(&self, scope: &Scope) {
        let mut st = lock(&self.inner.state);
        st.loaded.retain(|s| s != scope);
        let st = &mut *st;
        let loaded = &st.loaded;
        let covered = |s: &str, c: &str| loaded.iter().any(|l| l.covers(s, c));
        let mut dropped: Vec<TopicKey> = Vec::new();
        for (s, cats) in st.topics.iter_mut() {
            cats.retain(|c, _| {
                let keep = !scope.covers(s, c) || covered(s, c);
                if !keep {
                    dropped.push((s.clone(), c.clone()));
                }
                keep
            });
        }
        st.topics.retain(|_, cats| !cats.is_empty());
        for key in &dropped {
            st.marks.remove(key);
            st.retired.remove(key);
        }
        for q in st.queries.values_mut() {
            for key in &dropped {
                q.views.remove(key);
            }
        }
        let ids: Vec<SubscriptionId> = st.subs.keys().copied().collect();
        for id in ids {
            if !st.is_ready(id)
                && let Some(sub) = st.subs.get_mut(&id)
            {
                sub.ready = false;
            }
        }
    }

    /// Adds a subscription whose lists go to `delivery`. It gets its first lists now when every
    /// scope it needs was read, else at the [`ListKeeper::replace`] that completes them. The
    /// caller keeps a clone of `delivery` to flush or close it.
    pub fn subscribe(&self, url: &Url, delivery: Arc<Delivery>) -> SubscriptionId {
        self.update(|st, out| {
            st.next_id += 1;
            let id = SubscriptionId(st.next_id);
            let key = QueryKey::of(url);
            st.queries
                .entry(key.clone())
                .or_insert_with(|| Query {
                    repr: url.clone(),
                    categories: url.categories(),
                    wildcard: url.service_interface() == ANY_VALUE,
                    subs: Vec::new(),
                    views: HashMap::new(),
                })
                .subs
                .push(id);
            st.subs.insert(
                id,
                Sub {
                    url: url.clone(),
                    delivery,
                    query: key,
                    ready: false,
                    known: BTreeSet::new(),
                },
            );
            st.wake_ready(out);
            id
        })
    }

    /// Removes a subscription, returning its delivery (for the caller to close). A query no
    /// subscription asks any more is dropped with its matched sets.
    pub fn unsubscribe(&self, id: SubscriptionId) -> Option<Arc<Delivery>> {
        let mut st = lock(&self.inner.state);
        let sub = st.subs.remove(&id)?;
        if let Some(q) = st.queries.get_mut(&sub.query) {
            q.subs.retain(|s| *s != id);
            if q.subs.is_empty()
                && let Some(q) = st.queries.remove(&sub.query)
                && !q.wildcard
            {
                // Empty (service, category) pairs only this query named go too.
                let service = q.repr.service_interface();
                for c in &q.categories {
                    st.drop_if_empty(service, c);
                }
            }
        }
        Some(sub.delivery)
    }

    /// Whether the subscription got its first lists (every scope it needs was read).
    pub fn is_ready(&self, id: SubscriptionId) -> bool {
        lock(&self.inner.state)
            .subs
            .get(&id)
            .is_some_and(|s| s.ready)
    }

    /// Whether a full read of `scope` was fed and not forgotten.
    pub fn is_loaded(&self, scope: &Scope) -> bool {
        lock(&self.inner.state).loaded.contains(scope)
    }

    /// The entries `url` selects from what is held (services in name order, then the
    /// subscription's categories in order, each sorted), or `None` when a scope it needs was
    /// not read: the backend reads it instead.
    pub fn lookup(&self, url: &Url) -> Option<Vec<Url>> {
        let st = lock(&self.inner.state);
        let wildcard = url.service_interface() == ANY_VALUE;
        let categories = url.categories();
        let needed = if wildcard {
            st.loaded.contains(&Scope::Root)
        } else {
            categories
                .iter()
                .all(|c| st.covered(url.service_interface(), c))
        };
        if !needed {
            return None;
        }
        let mut out = Vec::new();
        for (service, cats) in &st.topics {
            if !wildcard && service != url.service_interface() {
                continue;
            }
            for c in &categories {
                if let Some(entries) = cats.get(c) {
                    out.extend(
                        entries
                            .iter()
                            .filter(|e| is_match(url, &e.0))
                            .map(|e| e.0.clone()),
                    );
                }
            }
        }
        Some(out)
    }

    /// Every entry held inside `scope`, sorted by (service, category, full string).
    pub fn entries(&self, scope: &Scope) -> Vec<(String, String, Url)> {
        let st = lock(&self.inner.state);
        let mut out = Vec::new();
        for (s, cats) in &st.topics {
            for (c, entries) in cats {
                if scope.covers(s, c) {
                    out.extend(entries.iter().map(|e| (s.clone(), c.clone(), e.0.clone())));
                }
            }
        }
        out
    }

    /// What the keeper holds.
    pub fn stats(&self) -> KeeperStats {
        let st = lock(&self.inner.state);
        KeeperStats {
            entries: st
                .topics
                .values()
                .flat_map(|c| c.values())
                .map(BTreeSet::len)
                .sum(),
            queries: st.queries.len(),
            views: st.queries.values().map(|q| q.views.len()).sum(),
            subscriptions: st.subs.len(),
            loaded_scopes: st.loaded.len(),
            topics: st.topics.values().map(BTreeMap::len).sum(),
            told: st.subs.values().map(|s| s.known.len()).sum(),
        }
    }
}

impl State {
    /// Whether a change at `revision` is older than what (`service`, `category`) holds.
    fn is_older(&self, service: &str, category: &str, revision: u64) -> bool {
        revision > 0
            && self
                .mark_of(&(service.to_owned(), category.to_owned()))
                .is_some_and(|m| m > revision)
    }

    /// The highest revision applied to (service, category), kept or retired.
    fn mark_of(&self, key: &TopicKey) -> Option<u64> {
        self.marks
            .get(key)
            .or_else(|| self.retired.get(key).map(|(m, _)| m))
            .copied()
            .or((self.global_revisions && self.evicted_floor > 0).then_some(self.evicted_floor))
    }

    fn mark(&mut self, service: &str, category: &str, revision: u64) {
        if revision > 0 {
            let key = (service.to_owned(), category.to_owned());
            let retired = self.retired.remove(&key).map_or(0, |(m, _)| m);
            let m = self.marks.entry(key).or_insert(retired);
            *m = (*m).max(revision);
        }
    }

    /// Moves the mark of a dropped (service, category) to the bounded retired marks.
    fn retire_mark(&mut self, key: TopicKey) {
        let Some(m) = self.marks.remove(&key) else {
            return;
        };
        self.retired_seq += 1;
        let seq = self.retired_seq;
        self.retired.insert(key.clone(), (m, seq));
        self.retired_order.push_back((key, seq));
        while self.retired_order.len() > RETIRED_MARKS {
            let Some((old, seq)) = self.retired_order.pop_front() else {
                break;
            };
            // Only when it was not retired again (or revived) since.
            if self.retired.get(&old).is_some_and(|(_, s)| *s == seq)
                && let Some((m, _)) = self.retired.remove(&old)
            {
                self.evicted_floor = self.evicted_floor.max(m);
            }
        }
    }

    fn covered(&self, service: &str, category: &str) -> bool {
        self.loaded.iter().any(|l| l.covers(service, category))
    }

    fn is_ready(&self, id: SubscriptionId) -> bool {
        let Some(sub) = self.subs.get(&id) else {
            return false;
        };
        let Some(q) = self.queries.get(&sub.query) else {
            return false;
        };
        if q.wildcard {
            self.loaded.contains(&Scope::Root)
        } else {
            let service = q.repr.service_interface();
            q.categories.iter().all(|c| self.covered(service, c))
        }
    }

    /// Gives every subscription that just became ready its first lists.
    fn wake_ready(&mut self, out: &mut Pushes) {
        let waiting: Vec<SubscriptionId> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.ready)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if self.is_ready(id) {
                self.initial(id, out);
            }
        }
    }

    /// The first (or, after a scope was read again, the full) lists of a subscription: every
    /// category in its order; for `interface=*`, per service that has entries.
    fn initial(&mut self, id: SubscriptionId, out: &mut Pushes) {
        let Some(sub) = self.subs.get_mut(&id) else {
            return;
        };
        sub.ready = true;
        let key = sub.query.clone();
        let Some(q) = self.queries.get(&key) else {
            return;
        };
        let services: Vec<String> = if q.wildcard {
            // Services with entries, and those it was told about before (a scope read again
            // after it was forgotten): they may be gone now.
            let mut services: BTreeSet<String> = self
                .topics
                .iter()
                .filter(|(_, cats)| cats.values().any(|e| !e.is_empty()))
                .map(|(s, _)| s.clone())
                .collect();
            services.extend(sub.known.iter().cloned());
            services.into_iter().collect()
        } else {
            vec![q.repr.service_interface().to_owned()]
        };
        let categories = q.categories.clone();
        if q.wildcard
            && let Some(sub) = self.subs.get_mut(&id)
        {
            // Services with nothing left are told so below, and are then no longer known.
            let topics = &self.topics;
            sub.known = services
                .iter()
                .filter(|s| topics.contains_key(*s))
                .cloned()
                .collect();
        }
        for s in &services {
            for c in &categories {
                self.push_one(id, &key, s, c, out);
            }
        }
    }

    /// Pushes the list of (`service`, `category`) to one subscription.
    fn push_one(
        &mut self,
        id: SubscriptionId,
        key: &QueryKey,
        service: &str,
        category: &str,
        out: &mut Pushes,
    ) {
        let rev = self.rev;
        let (Some(q), Some(sub)) = (self.queries.get_mut(key), self.subs.get(&id)) else {
            return;
        };
        let same_url = sub.url.as_full_str() == q.repr.as_full_str();
        let v = view(&self.topics, q, service, category);
        let urls = match v.list() {
            Some(list) => list,
            None if same_url => v
                .marker
                .get_or_insert_with(|| Arc::from([sub.url.to_empty_marker_for(service, category)]))
                .clone(),
            None => Arc::from([sub.url.to_empty_marker_for(service, category)]),
        };
        out.push((
            sub.delivery.clone(),
            Notification::new(service, category, urls, rev, Source::Live),
        ));
    }

    /// Applies added and removed entries to (`service`, `category`) and to every matched set
    /// that watches it; collects the lists to push. Returns whether anything changed.
    fn apply(
        &mut self,
        service: &str,
        category: &str,
        mut added: BTreeSet<Exact>,
        mut removed: BTreeSet<Exact>,
        revision: u64,
        out: &mut Pushes,
    ) -> bool {
        {
            let topic = self
                .topics
                .entry(service.to_owned())
                .or_default()
                .entry(category.to_owned())
                .or_default();
            added.retain(|e| !topic.contains(e));
            removed.retain(|e| topic.contains(e));
            if added.is_empty() && removed.is_empty() {
                if topic.is_empty() {
                    self.drop_if_empty(service, category);
                }
                return false;
            }
            for e in &removed {
                topic.remove(e);
            }
            topic.extend(added.iter().cloned());
        }
        self.rev = (self.rev + 1).max(revision);
        // Queries that watch this (service, category): update their matched sets.
        let mut notify: Vec<(QueryKey, bool)> = Vec::new();
        for (key, q) in self.queries.iter_mut() {
            let watching = q.watches(service, category);
            // An `interface=*` query hears of a new service whatever category it appears in.
            if !watching && !q.wildcard {
                continue;
            }
            let topic_key = (service.to_owned(), category.to_owned());
            let changed = watching
                && match q.views.get_mut(&topic_key) {
                    Some(v) => {
                        let mut changed = false;
                        for e in &removed {
                            changed |= v.matched.remove(e);
                        }
                        for e in &added {
                            if is_match(&q.repr, &e.0) {
                                changed |= v.matched.insert(e.clone());
                            }
                        }
                        if changed {
                            v.changed();
                        }
                        changed
                    }
                    // Built on first use, from the entries as they are now.
                    None => {
                        added.iter().any(|e| is_match(&q.repr, &e.0))
                            || removed.iter().any(|e| is_match(&q.repr, &e.0))
                    }
                };
            notify.push((key.clone(), changed));
        }
        for (key, changed) in notify {
            let Some(q) = self.queries.get(&key) else {
                continue;
            };
            let ids: Vec<SubscriptionId> = q.subs.clone();
            let categories = q.categories.clone();
            let wildcard = q.wildcard;
            for id in ids {
                let Some(sub) = self.subs.get_mut(&id) else {
                    continue;
                };
                if !sub.ready {
                    continue;
                }
                if wildcard && !sub.known.contains(service) {
                    // A service this subscription has not heard of: every category at once.
                    sub.known.insert(service.to_owned());
                    for c in &categories {
                        self.push_one(id, &key, service, c, out);
                    }
                } else if changed {
                    self.push_one(id, &key, service, category, out);
                }
            }
        }
        self.drop_if_empty(service, category);
        true
    }

    /// Drops an empty (service, category) no subscription names (`interface=*` ones name no
    /// service), with what is kept beside it: the matched sets of `interface=*` queries and,
    /// once the service has nothing left, its place among the services their ready
    /// subscriptions were told about (they were told its lists are empty). So removed services
    /// do not stay behind, whatever the number of names that come and go.
    fn drop_if_empty(&mut self, service: &str, category: &str) {
        let empty = self
            .topics
            .get(service)
            .and_then(|c| c.get(category))
            .is_some_and(BTreeSet::is_empty);
        if !empty
            || self
                .queries
                .values()
                .any(|q| !q.wildcard && q.watches(service, category))
        {
            return;
        }
        let mut gone = false;
        if let Some(cats) = self.topics.get_mut(service) {
            cats.remove(category);
            if cats.is_empty() {
                self.topics.remove(service);
                gone = true;
            }
        }
        self.retire_mark((service.to_owned(), category.to_owned()));
        for q in self.queries.values_mut().filter(|q| q.wildcard) {
            q.views.remove(&(service.to_owned(), category.to_owned()));
            if gone {
                // A query's matched sets are of its own categories.
                for c in &q.categories {
                    q.views.remove(&(service.to_owned(), c.clone()));
                }
            }
        }
        if gone {
            let queries = &self.queries;
            for sub in self.subs.values_mut() {
                if sub.ready && queries.get(&sub.query).is_some_and(|q| q.wildcard) {
                    sub.known.remove(service);
                }
            }
        }
    }
}

/// The matched set of (`service`, `category`) for `q`, built from the entries held when it
/// does not exist yet.
fn view<'a>(
    topics: &BTreeMap<String, BTreeMap<String, BTreeSet<Exact>>>,
    q: &'a mut Query,
    service: &str,
    category: &str,
) -> &'a mut View {
    let repr = &q.repr;
    q.views
        .entry((service.to_owned(), category.to_owned()))
        .or_insert_with(|| View {
            matched: topics
                .get(service)
                .and_then(|c| c.get(category))
                .map(|entries| {
                    entries
                        .iter()
                        .filter(|e| is_match(repr, &e.0))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
            snapshot: None,
            marker: None,
        })
}
