//! etcd-specific behaviour on the shared etcd of `cargo xtask test` (`REGISTRY_TEST_ETCD`):
//! keys, values and leases as a raw client sees them, a lease revoked from outside, sibling
//! paths, and failing fast when etcd is unreachable.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEADLINE, EventLog, keys_under, lease_of, raw, registry};
use registry_core::testkit::{Recorder, consumer, provider, unique_service, wait_until};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Error, RegistryEvent, Url, encode};
use registry_etcd as _;
use registry_test_servers::{Kind, shared_address};

/// Keys are exactly the Dubbo layout, values the full URL; dynamic entries carry the
/// registry's lease (TTL = session / 2), persistent ones none; the group is the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_values_and_leases_as_a_raw_client_sees_them() {
    let Some(addr) = shared_address(Kind::Etcd, "keys_values_and_leases") else {
        return;
    };
    let s = unique_service("keys");
    let r = registry(&format!("etcd://{addr}?session=20000&group=kit-keys")).await;
    let dynamic = provider(&s, 1, "");
    let persistent = provider(&s, 2, "dynamic=false");
    let route: registry_core::Url = format!("route://0.0.0.0/{s}?category=routers&name=x")
        .parse()
        .expect("url");
    for u in [&dynamic, &persistent, &route] {
        r.register(u).await.expect("register");
    }
    let mut raw = raw(&addr).await;
    let key = |u: &registry_core::Url, cat: &str| {
        format!(
            "/kit-keys/{}/{cat}/{}",
            encode(&s),
            encode(&u.to_full_string())
        )
    };
    let dkey = key(&dynamic, "providers");
    assert!(dkey.starts_with(&format!(
        "/kit-keys/{s}/providers/dubbo%3A%2F%2F10.0.0.1%3A20880%2F"
    )));
    let resp = raw.get(dkey.as_str(), None).await.expect("get");
    let kv = resp
        .kvs()
        .first()
        .expect("the dynamic entry's key, byte for byte");
    assert_eq!(kv.key(), dkey.as_bytes());
    assert_eq!(kv.value_str().expect("utf-8"), dynamic.to_full_string());
    let lease = kv.lease();
    assert_ne!(lease, 0, "a dynamic entry is on the registry's lease");
    let ttl = raw
        .lease_time_to_live(lease, None)
        .await
        .expect("lease ttl");
    assert_eq!(ttl.granted_ttl(), 10, "TTL = session / 2");
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 10);
    eprintln!(
        "dynamic entry on lease {lease:x}, granted TTL {} s, remaining {} s",
        ttl.granted_ttl(),
        ttl.ttl()
    );

    let pkey = key(&persistent, "providers");
    assert_eq!(
        lease_of(&mut raw, &pkey).await,
        Some(0),
        "a persistent entry has no lease"
    );
    let resp = raw.get(pkey.as_str(), None).await.expect("get");
    assert_eq!(
        resp.kvs()[0].value_str().expect("utf-8"),
        persistent.to_full_string()
    );
    let rkey = key(&route, "routers");
    assert_eq!(
        lease_of(&mut raw, &rkey).await,
        Some(lease),
        "the category decides the path"
    );

    let mut all = keys_under(&mut raw, &format!("/kit-keys/{}/", encode(&s))).await;
    all.sort();
    let mut want = vec![dkey.clone(), pkey.clone(), rkey.clone()];
    want.sort();
    assert_eq!(all, want, "nothing else is written (no parent keys)");

    r.destroy().await;
    assert_eq!(
        lease_of(&mut raw, &dkey).await,
        None,
        "destroy revoked the lease"
    );
    assert_eq!(lease_of(&mut raw, &rkey).await, None);
    assert_eq!(
        lease_of(&mut raw, &pkey).await,
        Some(0),
        "persistent entries stay"
    );
    raw.delete(pkey.as_str(), None).await.expect("clean up");
}

/// A lease revoked from outside: SessionLost then NewSession within a second, from the lease
/// sentinel's DELETE event (not the next keep-alive; see tests/lease_sentinel.rs for a long
/// keep-alive period); registering again puts the entry on the new lease, and subscriptions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_from_outside_gives_a_new_session() {
    let Some(addr) = shared_address(Kind::Etcd, "lease_revoked_from_outside") else {
        return;
    };
    let s = unique_service("revoke");
    // TTL 3 s, renewed every second.
    let r = registry(&format!("etcd://{addr}?session=6000")).await;
    let log = EventLog::attach(&r);
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
        .await;

    let mut raw = raw(&addr).await;
    let key = format!(
        "/dubbo/{}/providers/{}",
        encode(&s),
        encode(&p.to_full_string())
    );
    let old = lease_of(&mut raw, &key).await.expect("entry").max(0);
    let revoked = Instant::now();
    raw.lease_revoke(old).await.expect("revoke from outside");
    // No wait for the empty list here: the factory's reliability layer puts the entry back
    // within milliseconds of NewSession, so the subscription may never see the gap (the
    // DELETE and the PUT can arrive in one watch response, or the empty list be replaced
    // before delivery).
    let lost = log
        .wait_for(RegistryEvent::SessionLost, revoked, DEADLINE)
        .await;
    let new = log
        .wait_for(RegistryEvent::NewSession, revoked, DEADLINE)
        .await;
    eprintln!(
        "lease revoked from outside: SessionLost after {:?}, NewSession after {:?} (lease sentinel; keep-alive period 1 s)",
        lost - revoked,
        new - revoked
    );
    assert!(lost <= new);
    assert!(
        new - revoked < Duration::from_millis(1000),
        "NewSession within 1 s (the sentinel's DELETE, milliseconds on an idle machine)"
    );
    // What FailbackRegistry does on NewSession:
    r.register(&p).await.expect("register again");
    let now = lease_of(&mut raw, &key).await.expect("entry again");
    assert!(
        now != 0 && now != old,
        "the entry is on the new lease ({now:x}, old {old:x})"
    );
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
        .await;
    assert!(r.is_available());
    r.destroy().await;
    assert_eq!(lease_of(&mut raw, &key).await, None);
}

/// With the reliability layer in the factory, a lease revoked from outside heals by itself:
/// every dynamic entry is put again on the new lease and every subscription sees changes
/// made afterwards, within a second (the lease sentinel's DELETE event, not the keep-alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_entries_come_back_by_themselves() {
    let Some(addr) = shared_address(Kind::Etcd, "revoked_lease_entries_come_back") else {
        return;
    };
    let s = unique_service("heal");
    // TTL 3 s, renewed every second.
    let r = registry(&format!("etcd://{addr}?session=6000&file=false")).await;
    let ps: Vec<Url> = (1..=10).map(|i| provider(&s, i, "")).collect();
    for p in &ps {
        r.register(p).await.expect("register");
    }
    let recs: Vec<Arc<Recorder>> = (0..3).map(|_| Recorder::new()).collect();
    for rec in &recs {
        r.subscribe(&consumer(&s, ""), rec.listener())
            .await
            .expect("subscribe");
    }
    let mut raw = raw(&addr).await;
    let key = |u: &Url| {
        format!(
            "/dubbo/{}/providers/{}",
            encode(&s),
            encode(&u.to_full_string())
        )
    };
    let old = lease_of(&mut raw, &key(&ps[0])).await.expect("entry");
    let revoked = Instant::now();
    raw.lease_revoke(old).await.expect("revoke from outside");
    wait_until("every entry back on a new lease", DEADLINE, || {
        let keys: Vec<String> = ps.iter().map(key).collect();
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
    let later = provider(&s, 50, "");
    r.register(&later).await.expect("register after recovery");
    let mut want = ps.clone();
    want.push(later.clone());
    for rec in &recs {
        rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
            .await;
    }
    eprintln!(
        "lease revoked from outside: 10 entries back on a new lease after {restored:?}, \
         3 subscriptions current after {:?} (lease sentinel; keep-alive period 1 s)",
        revoked.elapsed()
    );
    assert!(
        restored < Duration::from_secs(1),
        "restored within 1 s of the revoke"
    );
    r.destroy().await;
}

/// Keys of a sibling category (`providersX`), the category path itself and deeper keys,
/// written by a raw client, never reach a `providers` subscription or lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sibling_paths_never_leak() {
    let Some(addr) = shared_address(Kind::Etcd, "sibling_paths_never_leak") else {
        return;
    };
    let s = unique_service("sibling");
    let mut raw = raw(&addr).await;
    let lease = raw.lease_grant(60, None).await.expect("grant").id();
    let opts = || Some(etcd_client::PutOptions::new().with_lease(lease));
    let base = format!("/dubbo/{}", encode(&s));
    let stray = provider(&s, 9, "");
    let enc = encode(&stray.to_full_string());
    for key in [
        format!("{base}/providersX/{enc}"),
        format!("{base}/providers"),
        format!("{base}/providers/{enc}/deeper"),
        format!("{base}/providers/not-a-url%zz"),
    ] {
        raw.put(key, stray.to_full_string(), opts())
            .await
            .expect("raw put");
    }
    let r = registry(&format!("etcd://{addr}")).await;
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    assert!(
        rec.latest(&s, PROVIDERS_CATEGORY)
            .expect("first")
            .is_empty()
    );
    assert_eq!(r.lookup(&consumer(&s, "")).await.expect("lookup"), vec![]);
    // Later writes to the siblings are not notified either; a real entry is.
    raw.put(
        format!(
            "{base}/providersX/{}",
            encode(&provider(&s, 8, "").to_full_string())
        ),
        "x",
        opts(),
    )
    .await
    .expect("raw put");
    let p = provider(&s, 1, "");
    raw.put(
        format!("{base}/providers/{}", encode(&p.to_full_string())),
        p.to_full_string(),
        opts(),
    )
    .await
    .expect("raw put");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
        .await;
    for n in rec.all() {
        assert!(
            n.entries().all(|u| *u == p),
            "only the real entry was ever notified: {n:?}"
        );
    }
    assert_eq!(
        r.lookup(&consumer(&s, "")).await.expect("lookup"),
        vec![p.clone()]
    );
    r.destroy().await;
    raw.lease_revoke(lease).await.expect("clean up");
}

/// `check=true` (default) and nothing listening: a clear, retryable error within `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_fails_fast_with_check() {
    let port = registry_test_servers::free_port().expect("port");
    let url = format!("etcd://127.0.0.1:{port}?timeout=1000");
    let start = Instant::now();
    let err = registry_core::RegistryManager::new()
        .get_registry(url.as_str())
        .await
        .err()
        .expect("no etcd there");
    eprintln!(
        "unreachable etcd with check=true: {err} after {:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    match registry_core::RegistryManager::new()
        .get_registry(format!("etcd://127.0.0.1:{port}?session=abc").as_str())
        .await
    {
        Err(Error::InvalidParameter { key, .. }) => assert_eq!(key, "session"),
        other => panic!("expected InvalidParameter, got {:?}", other.err()),
    }
}
