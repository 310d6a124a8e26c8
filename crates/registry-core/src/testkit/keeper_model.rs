//! A brute-force model of [`ListKeeper`](crate::keeper::ListKeeper), shared by its randomized
//! test and its fuzz target: [`run_keeper_ops`] applies a sequence of [`KeeperOp`]s to a keeper
//! and to a plain model (every entry filtered with `is_match` and sorted, per subscription),
//! and after every step checks that each subscription that got its first lists holds exactly
//! what the model says, for every (service, category) it was told about.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::delivery::{Delivery, DeliveryOptions};
use crate::keeper::{ListKeeper, Scope, SubscriptionId};
use crate::{Notification, NotifyListener, Url, is_match};

/// One step of a keeper model run. Indexes pick from small fixed sets (taken modulo their
/// size), so every sequence is valid.
#[derive(Debug, Clone)]
pub enum KeeperOp {
    /// `put(service, category, entry variant)`.
    Put(usize, usize, usize),
    /// `remove(service, category, entry variant)`.
    Remove(usize, usize, usize),
    /// `replace(scope, entries)`; entries outside the scope are fed too (and must be ignored).
    Replace(usize, Vec<(usize, usize, usize)>),
    /// `forget(scope)`.
    Forget(usize),
    /// `subscribe(subscription variant)`.
    Subscribe(usize),
    /// `unsubscribe` of the n-th live subscription (modulo their number).
    Unsubscribe(usize),
}

const SERVICES: [&str; 3] = ["com.a.A", "com.b.B", "com.c.C"];
const CATEGORIES: [&str; 4] = ["providers", "routers", "consumers", "configurators"];

fn entry(service: usize, category: usize, variant: usize) -> Url {
    let (s, c) = (SERVICES[service], CATEGORIES[category]);
    let mut u = Url::new("dubbo", format!("10.0.0.{}", variant % 4), 20880, s);
    if c != "providers" || variant.is_multiple_of(5) {
        u = u.with_parameter("category", c);
    }
    match variant % 3 {
        1 => u = u.with_parameter("group", "g1"),
        2 => u = u.with_parameter("group", "g2"),
        _ => {}
    }
    if variant % 4 == 3 {
        u = u.with_parameter("version", "1.0");
    }
    if variant % 7 == 6 {
        u = u.with_parameter("enabled", "false");
    }
    if variant >= 8 {
        // Same identity, another timestamp: another entry of its own.
        u = u.with_parameter("timestamp", "2");
    }
    u
}

fn scope(i: usize) -> Scope {
    match i % 7 {
        0 => Scope::Root,
        1..=3 => Scope::service(SERVICES[i % 7 - 1]),
        n => Scope::category(SERVICES[(n - 4) % 3], CATEGORIES[n % 3]),
    }
}

fn subscription(i: usize) -> Url {
    let interfaces = ["com.a.A", "com.b.B", "*"];
    let categories = [
        None,
        Some("routers"),
        Some("providers,routers"),
        Some("*"),
        Some("-routers"),
    ];
    let groups = [None, Some("g1"), Some("*"), Some("g1,g2")];
    let mut u = Url::new("consumer", "10.9.9.9", 0, interfaces[i % 3]);
    if let Some(c) = categories[(i / 3) % 5] {
        u = u.with_parameter("category", c);
    }
    if let Some(g) = groups[(i / 15) % 4] {
        u = u.with_parameter("group", g);
    }
    match (i / 60) % 3 {
        1 => u = u.with_parameter("version", "1.0"),
        2 => u = u.with_parameter("version", "*"),
        _ => {}
    }
    if (i / 180) % 2 == 1 {
        u = u.with_parameter("enabled", "*");
    }
    u
}

type Lists = Arc<Mutex<HashMap<(String, String), (u64, Vec<String>)>>>;

struct Recorder(Lists);

impl NotifyListener for Recorder {
    fn notify(&self, n: Notification) {
        let mut lists = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (n.service.clone(), n.category.clone());
        lists.insert(
            key,
            (n.revision, n.urls.iter().map(Url::to_full_string).collect()),
        );
    }
}

struct ModelSub {
    url: Url,
    id: SubscriptionId,
    lists: Lists,
}

#[derive(Default)]
struct Model {
    topics: BTreeMap<(usize, usize), BTreeSet<String>>,
    urls: HashMap<String, Url>,
    loaded: Vec<Scope>,
}

impl Model {
    fn covered(&self, s: usize, c: usize) -> bool {
        self.loaded
            .iter()
            .any(|l| l.covers(SERVICES[s], CATEGORIES[c]))
    }

    fn ready(&self, url: &Url) -> bool {
        if url.service_interface() == "*" {
            return self.loaded.contains(&Scope::Root);
        }
        let s = SERVICES
            .iter()
            .position(|x| *x == url.service_interface())
            .expect("model index");
        url.categories().iter().all(|c| {
            CATEGORIES
                .iter()
                .position(|x| x == c)
                .is_some_and(|c| self.covered(s, c))
        })
    }

    fn expected(&self, sub: &Url, s: usize, c: usize) -> Vec<String> {
        let mut v: Vec<String> = self
            .topics
            .get(&(s, c))
            .into_iter()
            .flatten()
            .filter(|k| is_match(sub, &self.urls[*k]))
            .cloned()
            .collect();
        v.sort();
        if v.is_empty() {
            v.push(
                sub.to_empty_marker_for(SERVICES[s], CATEGORIES[c])
                    .to_full_string(),
            );
        }
        v
    }

    fn check(&self, subs: &[ModelSub], keeper: &ListKeeper) -> Result<(), String> {
        for sub in subs {
            let ready = self.ready(&sub.url);
            if keeper.is_ready(sub.id) != ready {
                return Err(format!(
                    "readiness of {}: keeper says {}, model {ready}",
                    sub.url, !ready
                ));
            }
            if !ready {
                continue;
            }
            let lists = sub.lists.lock().expect("model index");
            let wildcard = sub.url.service_interface() == "*";
            let mut keys: BTreeSet<(usize, usize)> = BTreeSet::new();
            for (s, c) in lists.keys() {
                let s = SERVICES.iter().position(|x| x == s).expect("model index");
                let c = CATEGORIES.iter().position(|x| x == c).expect("model index");
                keys.insert((s, c));
            }
            for (s, svc) in SERVICES.iter().enumerate() {
                let present =
                    (0..4).any(|c| self.topics.get(&(s, c)).is_some_and(|t| !t.is_empty()));
                let watched = if wildcard {
                    present
                } else {
                    *svc == sub.url.service_interface()
                };
                if watched {
                    for c in sub.url.categories() {
                        let c = CATEGORIES
                            .iter()
                            .position(|x| *x == c)
                            .expect("model index");
                        keys.insert((s, c));
                    }
                }
            }
            for (s, c) in keys {
                let got = lists
                    .get(&(SERVICES[s].to_owned(), CATEGORIES[c].to_owned()))
                    .map(|(_, l)| l.clone());
                let want = Some(self.expected(&sub.url, s, c));
                if got != want {
                    return Err(format!(
                        "subscription {} on ({}, {}): got {got:?}, want {want:?}",
                        sub.url, SERVICES[s], CATEGORIES[c]
                    ));
                }
            }
        }
        Ok(())
    }

    fn put(&mut self, s: usize, c: usize, u: Url) {
        let k = u.to_full_string();
        self.urls.insert(k.clone(), u);
        self.topics.entry((s, c)).or_default().insert(k);
    }
}

/// `op` with every index inside its set.
fn normalized(op: &KeeperOp) -> KeeperOp {
    let e = |(s, c, v): (usize, usize, usize)| (s % SERVICES.len(), c % CATEGORIES.len(), v % 10);
    match op {
        KeeperOp::Put(s, c, v) => {
            let (s, c, v) = e((*s, *c, *v));
            KeeperOp::Put(s, c, v)
        }
        KeeperOp::Remove(s, c, v) => {
            let (s, c, v) = e((*s, *c, *v));
            KeeperOp::Remove(s, c, v)
        }
        KeeperOp::Replace(sc, entries) => {
            KeeperOp::Replace(sc % 7, entries.iter().map(|x| e(*x)).collect())
        }
        KeeperOp::Forget(sc) => KeeperOp::Forget(sc % 7),
        KeeperOp::Subscribe(i) => KeeperOp::Subscribe(i % 360),
        KeeperOp::Unsubscribe(i) => KeeperOp::Unsubscribe(*i),
    }
}

/// Applies `ops` to a fresh keeper and to the model, checking after every step; the error
/// names the step and what differed.
pub fn run_keeper_ops(ops: &[KeeperOp]) -> Result<(), String> {
    let keeper = ListKeeper::new("model");
    let mut model = Model::default();
    let mut subs: Vec<ModelSub> = Vec::new();
    let mut rev = 0u64;
    for (step, op) in ops.iter().map(normalized).enumerate() {
        let op_text = format!("{op:?}");
        rev += 1;
        match op {
            KeeperOp::Put(s, c, v) => {
                let u = entry(s, c, v);
                model.put(s, c, u.clone());
                keeper.put(SERVICES[s], CATEGORIES[c], u, rev);
            }
            KeeperOp::Remove(s, c, v) => {
                let u = entry(s, c, v);
                if let Some(t) = model.topics.get_mut(&(s, c)) {
                    t.remove(&u.to_full_string());
                }
                keeper.remove(SERVICES[s], CATEGORIES[c], &u, rev);
            }
            KeeperOp::Replace(sc, entries) => {
                let scope = scope(sc);
                for ((s, c), t) in model.topics.iter_mut() {
                    if scope.covers(SERVICES[*s], CATEGORIES[*c]) {
                        t.clear();
                    }
                }
                let mut fed = Vec::new();
                for (s, c, v) in entries {
                    let u = entry(s, c, v);
                    if scope.covers(SERVICES[s], CATEGORIES[c]) {
                        model.put(s, c, u.clone());
                    }
                    fed.push((SERVICES[s].to_owned(), CATEGORIES[c].to_owned(), u));
                }
                keeper.replace(&scope, fed, rev);
                if !model.loaded.contains(&scope) {
                    model.loaded.push(scope);
                }
            }
            KeeperOp::Forget(sc) => {
                let scope = scope(sc);
                model.loaded.retain(|l| *l != scope);
                let keys: Vec<(usize, usize)> = model.topics.keys().copied().collect();
                for (s, c) in keys {
                    if scope.covers(SERVICES[s], CATEGORIES[c]) && !model.covered(s, c) {
                        model.topics.remove(&(s, c));
                    }
                }
                keeper.forget(&scope);
            }
            KeeperOp::Subscribe(i) => {
                let url = subscription(i);
                let lists: Lists = Arc::default();
                let listener: Arc<dyn NotifyListener> = Arc::new(Recorder(lists.clone()));
                let delivery = Arc::new(Delivery::inline(listener, DeliveryOptions::default()));
                let id = keeper.subscribe(&url, delivery);
                subs.push(ModelSub { url, id, lists });
            }
            KeeperOp::Unsubscribe(i) => {
                if !subs.is_empty() {
                    let sub = subs.remove(i % subs.len());
                    if keeper.unsubscribe(sub.id).is_none() {
                        return Err(format!("unsubscribe of {} found nothing", sub.url));
                    }
                }
            }
        }
        model
            .check(&subs, &keeper)
            .map_err(|e| format!("after step {step} ({op_text}): {e}"))?;
        let held: usize = model.topics.values().map(BTreeSet::len).sum();
        let stats = keeper.stats();
        if stats.entries != held {
            return Err(format!(
                "after step {step}: the keeper holds {} entries, the model {held}",
                stats.entries
            ));
        }
        // Nothing is kept for a (service, category) that holds no entry, unless a live
        // subscription names it (an `interface=*` one names none).
        let mut allowed: BTreeSet<(String, String)> = model
            .topics
            .iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|((s, c), _)| (SERVICES[*s].to_owned(), CATEGORIES[*c].to_owned()))
            .collect();
        for sub in subs.iter().filter(|s| s.url.service_interface() != "*") {
            for c in sub.url.categories() {
                allowed.insert((sub.url.service_interface().to_owned(), c));
            }
        }
        if stats.topics > allowed.len() {
            return Err(format!(
                "after step {step}: the keeper keeps {} (service, category) pairs, at most {} \
                 hold entries or are named by a subscription: {allowed:?}",
                stats.topics,
                allowed.len()
            ));
        }
    }
    Ok(())
}
