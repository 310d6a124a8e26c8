//! The list keeper against a brute-force model: random sequences of entries added, removed,
//! scopes read and forgotten, subscriptions added and removed (exact, group/version/category
//! lists, `enabled=*`, `interface=*`). After every step, each subscription that got its first
//! lists holds, for every (service, category) it was told about, exactly what filtering every
//! entry with `is_match` and sorting gives (or the `empty://` marker). proptest prints the
//! failing sequence and keeps its seed in `proptest-regressions/`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::keeper::{ListKeeper, Scope, SubscriptionId};
use registry_core::{Notification, NotifyListener, Url, is_match};

const SERVICES: [&str; 3] = ["com.a.A", "com.b.B", "com.c.C"];
const CATEGORIES: [&str; 4] = ["providers", "routers", "consumers", "configurators"];

#[derive(Debug, Clone)]
enum Op {
    Put(usize, usize, usize),
    Remove(usize, usize, usize),
    Replace(usize, Vec<(usize, usize, usize)>),
    Forget(usize),
    Subscribe(usize),
    Unsubscribe(usize),
}

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
        let mut lists = self.0.lock().unwrap();
        let key = (n.service.clone(), n.category.clone());
        if let Some((rev, _)) = lists.get(&key) {
            assert!(n.revision >= *rev, "a list went back in revision");
        }
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
            .unwrap();
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

    fn check(&self, subs: &[ModelSub], keeper: &ListKeeper) -> Result<(), TestCaseError> {
        for sub in subs {
            let ready = self.ready(&sub.url);
            prop_assert_eq!(keeper.is_ready(sub.id), ready, "readiness of {}", sub.url);
            if !ready {
                continue;
            }
            let lists = sub.lists.lock().unwrap();
            let wildcard = sub.url.service_interface() == "*";
            let mut keys: BTreeSet<(usize, usize)> = BTreeSet::new();
            for (s, c) in lists.keys() {
                let s = SERVICES.iter().position(|x| x == s).unwrap();
                let c = CATEGORIES.iter().position(|x| x == c).unwrap();
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
                        let c = CATEGORIES.iter().position(|x| *x == c).unwrap();
                        keys.insert((s, c));
                    }
                }
            }
            for (s, c) in keys {
                let got = lists
                    .get(&(SERVICES[s].to_owned(), CATEGORIES[c].to_owned()))
                    .map(|(_, l)| l.clone());
                prop_assert_eq!(
                    got,
                    Some(self.expected(&sub.url, s, c)),
                    "subscription {} on ({}, {})",
                    sub.url,
                    SERVICES[s],
                    CATEGORIES[c]
                );
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

fn op() -> impl Strategy<Value = Op> {
    let e = (0..3usize, 0..3usize, 0..10usize);
    prop_oneof![
        4 => e.clone().prop_map(|(s, c, v)| Op::Put(s, c, v)),
        3 => e.clone().prop_map(|(s, c, v)| Op::Remove(s, c, v)),
        2 => (0..7usize, proptest::collection::vec(e, 0..6)).prop_map(|(sc, v)| Op::Replace(sc, v)),
        1 => (0..7usize).prop_map(Op::Forget),
        2 => (0..360usize).prop_map(Op::Subscribe),
        1 => (0..16usize).prop_map(Op::Unsubscribe),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn keeper_lists_equal_brute_force_matching(ops in proptest::collection::vec(op(), 1..60)) {
        let keeper = ListKeeper::new("model");
        let mut model = Model::default();
        let mut subs: Vec<ModelSub> = Vec::new();
        let mut rev = 0u64;
        for op in ops {
            rev += 1;
            match op {
                Op::Put(s, c, v) => {
                    let u = entry(s, c, v);
                    model.put(s, c, u.clone());
                    keeper.put(SERVICES[s], CATEGORIES[c], u, rev);
                }
                Op::Remove(s, c, v) => {
                    let u = entry(s, c, v);
                    if let Some(t) = model.topics.get_mut(&(s, c)) {
                        t.remove(&u.to_full_string());
                    }
                    keeper.remove(SERVICES[s], CATEGORIES[c], &u, rev);
                }
                Op::Replace(sc, entries) => {
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
                Op::Forget(sc) => {
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
                Op::Subscribe(i) => {
                    let url = subscription(i);
                    let lists: Lists = Arc::default();
                    let listener: Arc<dyn NotifyListener> = Arc::new(Recorder(lists.clone()));
                    let delivery = Arc::new(Delivery::inline(listener, DeliveryOptions::default()));
                    let id = keeper.subscribe(&url, delivery);
                    subs.push(ModelSub { url, id, lists });
                }
                Op::Unsubscribe(i) => {
                    if !subs.is_empty() {
                        let sub = subs.remove(i % subs.len());
                        prop_assert!(keeper.unsubscribe(sub.id).is_some());
                    }
                }
            }
            model.check(&subs, &keeper)?;
            let held: usize = model.topics.values().map(BTreeSet::len).sum();
            prop_assert_eq!(keeper.stats().entries, held);
        }
    }
}
