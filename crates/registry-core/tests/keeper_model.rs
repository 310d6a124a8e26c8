//! The list keeper against a brute-force model (registry-core's testkit `run_keeper_ops`):
//! random sequences of entries added, removed, scopes read and forgotten, subscriptions added
//! and removed (exact, group/version/category lists, `enabled=*`, `interface=*`). After every
//! step, each subscription that got its first lists holds, for every (service, category) it was
//! told about, exactly what filtering every entry with `is_match` and sorting gives (or the
//! `empty://` marker). proptest prints the failing sequence, shrunk, and keeps its seed in
//! `proptest-regressions/`.

use proptest::prelude::*;
use registry_core::testkit::{KeeperOp, run_keeper_ops};

fn op() -> impl Strategy<Value = KeeperOp> {
    let e = (0..3usize, 0..4usize, 0..10usize);
    prop_oneof![
        4 => e.clone().prop_map(|(s, c, v)| KeeperOp::Put(s, c, v)),
        3 => e.clone().prop_map(|(s, c, v)| KeeperOp::Remove(s, c, v)),
        2 => (0..7usize, proptest::collection::vec(e, 0..6)).prop_map(|(sc, v)| KeeperOp::Replace(sc, v)),
        1 => (0..7usize).prop_map(KeeperOp::Forget),
        2 => (0..360usize).prop_map(KeeperOp::Subscribe),
        1 => (0..16usize).prop_map(KeeperOp::Unsubscribe),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn keeper_lists_equal_brute_force_matching(ops in proptest::collection::vec(op(), 1..60)) {
        if let Err(e) = run_keeper_ops(&ops) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// A service whose last entry goes while an `interface=*` subscription exists leaves nothing
/// behind (the model's bound on what the keeper keeps catches it).
#[test]
fn removed_service_leaves_nothing_behind_a_wildcard_subscription() {
    use KeeperOp::*;
    // Root read, an `interface=*` subscription (providers), one entry added then removed;
    // then the same with a subscription naming the service, unsubscribed at the end.
    let ops = [
        Replace(0, vec![]),
        Subscribe(2),
        Put(0, 0, 0),
        Remove(0, 0, 0),
        Subscribe(0),
        Put(0, 0, 1),
        Remove(0, 0, 1),
        Unsubscribe(1),
        Put(1, 1, 2),
        Remove(1, 1, 2),
    ];
    if let Err(e) = run_keeper_ops(&ops) {
        panic!("{e}");
    }
}

/// Service names that come and go under an `interface=*` subscription do not grow the keeper:
/// each one's lists, matched sets and place among the services the subscription was told
/// about go with its last entry. A read taken before that removal and fed after it does not
/// bring the entry back, and a name that comes back is announced again.
#[test]
fn churned_service_names_do_not_grow_the_keeper() {
    use std::sync::{Arc, Mutex};

    use registry_core::delivery::{Delivery, DeliveryOptions};
    use registry_core::keeper::{ListKeeper, Scope};
    use registry_core::{Notification, NotifyListener, Url};

    type Seen = Arc<Mutex<Vec<(String, String, usize, bool)>>>;
    struct Rec(Seen);
    impl NotifyListener for Rec {
        fn notify(&self, n: Notification) {
            let empty = n.urls.iter().all(|u| u.protocol() == "empty");
            self.0.lock().unwrap().push((
                n.service.clone(),
                n.category.clone(),
                n.urls.len(),
                empty,
            ));
        }
    }
    let keeper = ListKeeper::new("churn");
    keeper.replace(&Scope::Root, [], 1);
    let seen: Seen = Arc::default();
    let all: Url = "consumer://10.9.9.9/*?category=providers,routers"
        .parse()
        .unwrap();
    let delivery = Arc::new(Delivery::inline(
        Arc::new(Rec(seen.clone())),
        DeliveryOptions::default(),
    ));
    keeper.subscribe(&all, delivery);
    // One service a subscription names stays (empty) while the subscription does.
    let named: Url = "consumer://10.9.9.9/com.kept.Kept".parse().unwrap();
    let named_id = keeper.subscribe(
        &named,
        Arc::new(Delivery::inline(
            Arc::new(Rec(Arc::default())),
            DeliveryOptions::default(),
        )),
    );
    let mut rev = 1;
    for i in 0..2000 {
        let service = format!("com.churn.S{i}");
        let entry: Url = format!("dubbo://10.0.0.1:1/{service}").parse().unwrap();
        rev += 1;
        keeper.put(&service, "providers", entry.clone(), rev);
        rev += 1;
        keeper.remove(&service, "providers", &entry, rev);
    }
    let kept: Url = "dubbo://10.0.0.1:1/com.kept.Kept".parse().unwrap();
    keeper.put("com.kept.Kept", "providers", kept.clone(), rev + 1);
    keeper.remove("com.kept.Kept", "providers", &kept, rev + 2);
    rev += 2;
    let stats = keeper.stats();
    assert_eq!(stats.entries, 0, "{stats:?}");
    assert_eq!(
        stats.topics, 1,
        "only the named service's providers: {stats:?}"
    );
    // Only the kept service is known to the wildcard subscription, and only its views stay
    // (the named query's providers, the wildcard query's providers and routers).
    assert_eq!(stats.told, 1, "{stats:?}");
    assert_eq!(stats.views, 3, "{stats:?}");
    // Every service was announced (both categories) and then told it is empty.
    {
        let seen = seen.lock().unwrap();
        for i in [0, 1999] {
            let service = format!("com.churn.S{i}");
            let lists: Vec<_> = seen.iter().filter(|n| n.0 == service).collect();
            assert_eq!(lists.len(), 3, "{lists:?}");
            assert!(lists.last().is_some_and(|n| n.1 == "providers" && n.3));
        }
    }
    keeper.unsubscribe(named_id);
    let stats = keeper.stats();
    assert_eq!(
        (stats.topics, stats.told, stats.views),
        (0, 0, 0),
        "{stats:?}"
    );

    // A read of S0 taken before its removal, fed after it: ignored.
    let s0: Url = "dubbo://10.0.0.1:1/com.churn.S1999".parse().unwrap();
    keeper.replace(
        &Scope::category("com.churn.S1999", "providers"),
        [("com.churn.S1999".into(), "providers".into(), s0.clone())],
        rev - 10,
    );
    let stats = keeper.stats();
    assert_eq!(
        (stats.entries, stats.topics, stats.told),
        (0, 0, 0),
        "{stats:?}"
    );
    // The name comes back: announced again (the delivery passes on only what is news: the
    // providers list; routers is still the empty marker it had).
    let before = seen.lock().unwrap().len();
    keeper.put("com.churn.S1999", "providers", s0, rev + 1);
    assert_eq!(keeper.stats().told, 1, "{:?}", keeper.stats());
    let seen = seen.lock().unwrap();
    let again: Vec<_> = seen[before..]
        .iter()
        .map(|n| (n.1.as_str(), n.2, n.3))
        .collect();
    assert_eq!(again, [("providers", 1, false)]);
}

/// With revisions that number the whole store (etcd), a read of a dropped pair taken before
/// its removal and fed after more than 1,024 other pairs were dropped (its own mark let go
/// of) still does not bring the entry back; a later read, and a new pair, are taken.
#[test]
fn an_old_read_of_a_long_dropped_pair_is_ignored_with_global_revisions() {
    use std::sync::Arc;

    use registry_core::Url;
    use registry_core::delivery::{Delivery, DeliveryOptions};
    use registry_core::keeper::{ListKeeper, Scope};
    use registry_core::testkit::Recorder;

    let keeper = ListKeeper::with_global_revisions("global");
    keeper.replace(&Scope::Root, [], 1);
    let rec = Recorder::new();
    let all: Url = "consumer://10.9.9.9/*?category=providers".parse().unwrap();
    keeper.subscribe(
        &all,
        Arc::new(Delivery::inline(rec.listener(), DeliveryOptions::default())),
    );
    let entry = |i: usize| -> Url {
        format!("dubbo://10.0.0.1:1/com.churn.S{i}")
            .parse()
            .unwrap()
    };
    let mut rev = 1;
    for i in 0..1100 {
        let service = format!("com.churn.S{i}");
        rev += 1;
        keeper.put(&service, "providers", entry(i), rev);
        rev += 1;
        keeper.remove(&service, "providers", &entry(i), rev);
    }
    // S0 was put at 2 and removed at 3; a read of it taken at 2 arrives now.
    let scope = Scope::category("com.churn.S0", "providers");
    keeper.replace(
        &scope,
        [("com.churn.S0".into(), "providers".into(), entry(0))],
        2,
    );
    assert_eq!(keeper.stats().entries, 0, "{:?}", keeper.stats());
    // A read taken now holds it again: taken.
    keeper.replace(
        &scope,
        [("com.churn.S0".into(), "providers".into(), entry(0))],
        rev + 1,
    );
    assert_eq!(keeper.stats().entries, 1, "{:?}", keeper.stats());
    // A service never seen before, first heard of at a new revision: taken.
    let fresh: Url = "dubbo://10.0.0.1:1/com.fresh.F".parse().unwrap();
    keeper.put("com.fresh.F", "providers", fresh, rev + 2);
    assert_eq!(keeper.stats().entries, 2, "{:?}", keeper.stats());
}
