//! The lease sentinel (`/.registry-leases<root>/<lease hex>`, outside the Dubbo tree, on the
//! registry's lease) on the
//! shared etcd of `cargo xtask test` (`REGISTRY_TEST_ETCD`): a lease revoked from outside is
//! noticed from the sentinel's DELETE event within milliseconds, not at the next keep-alive
//! (10 s with the default session=60000), and the sentinel never reaches a subscription or a
//! lookup, not even `interface=*` ones. `destroy` leaves neither sentinel nor lease behind.

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, EventLog, keys_under, lease_of, raw, registry};
use etcd_client::Client;
use registry_core::testkit::{Recorder, consumer, provider, unique_service, wait_until};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{RegistryEvent, Url, encode};
use registry_etcd as _;
use registry_test_servers::{Kind, shared_address};

/// The default sentinel prefix (`etcd.lease-prefix`).
const SENTINELS: &str = "/.registry-leases";

const WILDCARD: &str = "consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*&category=providers,consumers";

/// The sentinels under `/.registry-leases/<group>/`: (key, value, lease).
async fn sentinels(raw: &mut Client, group: &str) -> Vec<(String, String, i64)> {
    let resp = raw
        .get(
            format!("{SENTINELS}/{group}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("raw get");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().expect("utf-8").to_owned(),
                kv.value_str().expect("utf-8").to_owned(),
                kv.lease(),
            )
        })
        .collect()
}

/// Waits until `n` sentinels are under `/.registry-leases/<group>/` (the session task puts
/// a registry's sentinel right after `new` returns) and returns them.
async fn wait_sentinels(addr: &str, group: &str, n: usize) -> Vec<(String, String, i64)> {
    wait_until(
        &format!("{n} sentinels under /{group}"),
        DEADLINE,
        || async { sentinels(&mut raw(addr).await, group).await.len() == n },
    )
    .await;
    sentinels(&mut raw(addr).await, group).await
}

/// Whether etcd still knows `lease` (a revoked or expired one answers TTL -1).
async fn lease_alive(raw: &mut Client, lease: i64) -> bool {
    match raw.lease_time_to_live(lease, None).await {
        Ok(r) => r.ttl() > 0,
        Err(_) => false,
    }
}

fn key(group: &str, service: &str, u: &Url) -> String {
    format!(
        "/{group}/{}/providers/{}",
        encode(service),
        encode(&u.to_full_string())
    )
}

/// session=60000 (TTL 30 s, keep-alive every 10 s): a lease revoked from outside gives
/// `SessionLost` and `NewSession` within a second, and through the factory (FailbackRegistry)
/// every dynamic entry is back on the new lease within a second. Without the sentinel this
/// waits for the next keep-alive: up to 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_noticed_in_milliseconds_with_a_long_keep_alive_period() {
    common::init_tracing();
    let Some(addr) = shared_address(Kind::Etcd, "revoked_lease_noticed_by_the_sentinel") else {
        return;
    };
    let s = unique_service("sentinel");
    let group = format!("kit-sentinel-{}", s.rsplit('.').next().unwrap_or("x"));
    let r = registry(&format!(
        "etcd://{addr}?session=60000&file=false&group={group}"
    ))
    .await;
    let log = EventLog::attach(&r);
    let ps: Vec<Url> = (1..=10).map(|i| provider(&s, i, "")).collect();
    for p in &ps {
        r.register(p).await.expect("register");
    }
    let mut raw = raw(&addr).await;
    let old = lease_of(&mut raw, &key(&group, &s, &ps[0]))
        .await
        .expect("entry");
    assert_ne!(old, 0);
    let before = wait_sentinels(&addr, &group, 1).await;
    assert_eq!(before.len(), 1, "one sentinel per registry: {before:?}");
    assert_eq!(before[0].0, format!("{SENTINELS}/{group}/{old:x}"));
    // Outside the Dubbo tree: under the root there are the entries only.
    let mut under_root = keys_under(&mut raw, &format!("/{group}/")).await;
    under_root.sort();
    let mut entries: Vec<String> = ps.iter().map(|p| key(&group, &s, p)).collect();
    entries.sort();
    assert_eq!(
        under_root, entries,
        "nothing but the entries under the root"
    );
    assert_eq!(before[0].2, old, "the sentinel is on the registry's lease");
    assert!(
        before[0].1.contains(&addr),
        "the sentinel's value is the registry's identity: {}",
        before[0].1
    );

    let revoked = Instant::now();
    raw.lease_revoke(old).await.expect("revoke from outside");
    let lost = log
        .wait_for(RegistryEvent::SessionLost, revoked, DEADLINE)
        .await;
    let new = log
        .wait_for(RegistryEvent::NewSession, revoked, DEADLINE)
        .await;
    wait_until("every entry back on a new lease", DEADLINE, || {
        let keys: Vec<String> = ps.iter().map(|p| key(&group, &s, p)).collect();
        let addr = addr.clone();
        async move {
            let mut raw = common::raw(&addr).await;
            for k in &keys {
                match lease_of(&mut raw, k).await {
                    Some(l) if l != 0 && l != old => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    let restored = revoked.elapsed();
    eprintln!(
        "lease revoked from outside (session=60000, keep-alive every 10 s): SessionLost after \
         {:?}, NewSession after {:?}, 10 entries back on the new lease after {restored:?}",
        lost - revoked,
        new - revoked
    );
    assert!(lost <= new);
    assert!(
        new - revoked < Duration::from_secs(1),
        "NewSession within 1 s of the revoke, not at the next keep-alive (10 s)"
    );
    assert!(
        restored < Duration::from_secs(1),
        "every dynamic entry back within 1 s of the revoke"
    );

    // The new lease has its own sentinel; the old one went with its lease.
    let now = lease_of(&mut raw, &key(&group, &s, &ps[0]))
        .await
        .expect("entry");
    let after = sentinels(&mut raw, &group).await;
    assert_eq!(
        after
            .iter()
            .map(|(k, _, l)| (k.clone(), *l))
            .collect::<Vec<_>>(),
        vec![(format!("{SENTINELS}/{group}/{now:x}"), now)]
    );
    assert!(r.is_available());

    r.destroy().await;
    assert_eq!(
        sentinels(&mut raw, &group).await,
        vec![],
        "no sentinel left"
    );
    assert!(!lease_alive(&mut raw, now).await, "no lease left");
    assert_eq!(
        keys_under(&mut raw, &format!("/{group}/")).await,
        Vec::<String>::new()
    );
}

/// The sentinel is never an entry: not in the notifications or lookups of a service, nor of
/// `interface=*` subscriptions and lookups (which watch and read the whole root), also while
/// sentinels are deleted and put again (a revoke from outside, a new lease); `destroy`
/// leaves no sentinel and no lease behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentinel_never_reaches_subscriptions_or_lookups() {
    common::init_tracing();
    let Some(addr) = shared_address(Kind::Etcd, "sentinel_never_reaches_subscriptions") else {
        return;
    };
    let s = unique_service("hidden");
    let group = format!("kit-hidden-{}", s.rsplit('.').next().unwrap_or("x"));
    let base = format!("etcd://{addr}?session=60000&file=false&group={group}");
    let r = registry(&base).await;
    let log = EventLog::attach(&r);
    let wildcard: Url = WILDCARD.parse().expect("url");
    let all = Recorder::new();
    r.subscribe(&wildcard, all.listener())
        .await
        .expect("subscribe interface=*");
    let one = Recorder::new();
    r.subscribe(&consumer(&s, ""), one.listener())
        .await
        .expect("subscribe");
    let p1 = provider(&s, 1, "");
    r.register(&p1).await.expect("register");
    // A second registry under the same root: its sentinel is seen by the first one's watches.
    let other = registry(&base).await;
    let mut raw = raw(&addr).await;
    wait_sentinels(&addr, &group, 2).await;

    let old = lease_of(&mut raw, &key(&group, &s, &p1))
        .await
        .expect("entry");
    let revoked = Instant::now();
    raw.lease_revoke(old).await.expect("revoke from outside");
    log.wait_for(RegistryEvent::NewSession, revoked, DEADLINE)
        .await;
    let p2 = provider(&s, 2, "");
    r.register(&p2).await.expect("register");
    let want = vec![p1.clone(), p2.clone()];
    all.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    one.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;

    let mut found = r.lookup(&wildcard).await.expect("lookup interface=*");
    found.sort_by_cached_key(Url::to_full_string);
    assert_eq!(found, want, "interface=* lookup sees the entries only");
    let mut found = r.lookup(&consumer(&s, "")).await.expect("lookup");
    found.sort_by_cached_key(Url::to_full_string);
    assert_eq!(found, want);
    for rec in [&all, &one] {
        for n in rec.all() {
            assert_eq!(n.service, s, "only the real service is notified: {n:?}");
            assert!(
                n.urls
                    .iter()
                    .all(|u| !u.to_full_string().contains("registry-leases")),
                "{n:?}"
            );
        }
    }

    other.destroy().await;
    let leases: Vec<i64> = sentinels(&mut raw, &group)
        .await
        .into_iter()
        .map(|(_, _, l)| l)
        .collect();
    assert_eq!(leases.len(), 1, "the destroyed registry's sentinel is gone");
    r.destroy().await;
    assert_eq!(
        sentinels(&mut raw, &group).await,
        vec![],
        "no sentinel left"
    );
    assert!(!lease_alive(&mut raw, leases[0]).await, "no lease left");
    assert_eq!(
        keys_under(&mut raw, &format!("/{group}/")).await,
        Vec::<String>::new()
    );
}

/// Fault 11: an operator deletes a registry's sentinel by hand while its lease lives. The
/// registry revokes that lease before it puts its entries on a new one (a put in flight on the
/// old lease must not end up on a lease nobody renews): the old lease is gone, every entry is
/// on the new, renewed lease, and the new lease has its sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_deleted_by_hand_moves_every_entry_to_a_renewed_lease() {
    common::init_tracing();
    let Some(addr) = shared_address(Kind::Etcd, "sentinel_deleted_by_hand") else {
        return;
    };
    let s = unique_service("deleted");
    let group = format!("kit-deleted-{}", s.rsplit('.').next().unwrap_or("x"));
    // session=6000: TTL 3 s, so a lease nobody renews would be gone within the test.
    let r = registry(&format!(
        "etcd://{addr}?session=6000&file=false&group={group}"
    ))
    .await;
    let log = EventLog::attach(&r);
    let ps: Vec<Url> = (1..=5).map(|i| provider(&s, i, "")).collect();
    for p in &ps {
        r.register(p).await.expect("register");
    }
    let mut raw = raw(&addr).await;
    let old = lease_of(&mut raw, &key(&group, &s, &ps[0]))
        .await
        .expect("entry");
    let before = wait_sentinels(&addr, &group, 1).await;
    assert_eq!(before[0].2, old);

    let deleted = Instant::now();
    raw.delete(before[0].0.as_str(), None)
        .await
        .expect("delete the sentinel by hand");
    log.wait_for(RegistryEvent::NewSession, deleted, DEADLINE)
        .await;
    let keys: Vec<String> = ps.iter().map(|p| key(&group, &s, p)).collect();
    wait_until("every entry on a new lease", DEADLINE, || {
        let (keys, addr) = (keys.clone(), addr.clone());
        async move {
            let mut raw = common::raw(&addr).await;
            for k in &keys {
                match lease_of(&mut raw, k).await {
                    Some(l) if l != 0 && l != old => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;
    let moved = deleted.elapsed();
    assert!(
        !lease_alive(&mut raw, old).await,
        "the lease whose sentinel was deleted is revoked, not left to expire"
    );
    let now = lease_of(&mut raw, &keys[0]).await.expect("entry");
    // The new lease is renewed: still there (with its sentinel) after twice its TTL.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(lease_alive(&mut raw, now).await, "the new lease is renewed");
    for k in &keys {
        assert_eq!(lease_of(&mut raw, k).await, Some(now), "{k}");
    }
    let after = sentinels(&mut raw, &group).await;
    assert_eq!(
        after
            .iter()
            .map(|(k, _, l)| (k.clone(), *l))
            .collect::<Vec<_>>(),
        vec![(format!("{SENTINELS}/{group}/{now:x}"), now)]
    );
    eprintln!("sentinel deleted by hand: 5 entries on a new, renewed lease after {moved:?}");
    r.destroy().await;
}

/// `etcd.lease-prefix` puts the sentinels elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentinel_prefix_is_configurable() {
    common::init_tracing();
    let Some(addr) = shared_address(Kind::Etcd, "sentinel_prefix") else {
        return;
    };
    let s = unique_service("prefix");
    let group = format!("kit-prefix-{}", s.rsplit('.').next().unwrap_or("x"));
    let r = registry(&format!(
        "etcd://{addr}?session=60000&file=false&group={group}&etcd.lease-prefix=/ops/leases"
    ))
    .await;
    r.register(&provider(&s, 1, "")).await.expect("register");
    let mut raw = raw(&addr).await;
    wait_until("the sentinel under /ops/leases", DEADLINE, || {
        let addr = addr.clone();
        let group = group.clone();
        async move {
            keys_under(
                &mut common::raw(&addr).await,
                &format!("/ops/leases/{group}/"),
            )
            .await
            .len()
                == 1
        }
    })
    .await;
    assert_eq!(sentinels(&mut raw, &group).await, vec![]);
    r.destroy().await;
    assert_eq!(
        keys_under(&mut raw, &format!("/ops/leases/{group}/")).await,
        Vec::<String>::new()
    );
}
