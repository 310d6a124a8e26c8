//! The etcd-only faults of the cluster fault matrix (see `mod.rs`): a permission revoked on
//! one watched prefix, and the lease sentinel deleted by hand.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, GetOptions, Permission, PutOptions, RoleRevokePermissionOptions, Txn, TxnOp,
};
use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Registry, RegistryEvent, Url, encode};
use registry_test_servers::{Cluster, Kind};

use super::matrix::{LOST, Proxies, SESSION_MS, Scene, check_targets, open_url, until};

/// A raw etcd client (no registry code) on every member, authenticated when `user` is given.
async fn raw(c: &Cluster, user: Option<(&str, &str)>) -> Client {
    let options = user.map(|(u, p)| etcd_client::ConnectOptions::new().with_user(u, p));
    let endpoints: Vec<String> = c
        .addresses()
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    Client::connect(endpoints, options)
        .await
        .expect("a raw etcd client")
}

/// Every key of the cluster with its lease (0: none).
async fn keys_with_leases(raw: &mut Client) -> Vec<(String, i64)> {
    let resp = raw
        .get(
            "\0",
            Some(GetOptions::new().with_from_key().with_keys_only()),
        )
        .await
        .expect("list every key");
    resp.kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect()
}

/// The remaining TTL of `lease` (-1: revoked or expired).
async fn ttl(raw: &mut Client, lease: i64) -> i64 {
    raw.lease_time_to_live(lease, None)
        .await
        .map_or(-1, |r| r.ttl())
}

/// The first key past every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Fault 11: the registry's lease sentinel deleted by hand (found as the key besides the
/// provider's entry on the registry's lease, wherever the backend keeps it). The entries end
/// on a lease that is renewed: more than a session later the provider's entry is there, on a
/// live lease that has a sentinel again, the old lease is either that one or revoked, and the
/// subscription holds the entry.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn sentinel_deleted_by_hand(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(Kind::Etcd, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let scene = Scene::new(&c, leader, "cluster-sentinel").await;
    let mut raw = raw(&c, None).await;
    let service_path = format!("/{}/", encode(&scene.service));
    let all = keys_with_leases(&mut raw).await;
    let (entry, lease) = all
        .iter()
        .find(|(k, _)| k.contains(&service_path) && k.contains("/providers/"))
        .cloned()
        .expect("the provider's entry");
    assert_ne!(lease, 0, "the entry {entry} is on no lease");
    let sentinels: Vec<String> = all
        .iter()
        .filter(|(k, l)| *l == lease && *k != entry)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        !sentinels.is_empty(),
        "no key besides the entry on the registry's lease {lease:x}"
    );
    let t = Instant::now();
    for s in &sentinels {
        raw.delete(s.as_str(), None)
            .await
            .expect("delete the sentinel");
    }
    eprintln!("{test}: deleted {sentinels:?} (lease {lease:x})");
    let mut times = Vec::new();
    // Back on a renewed lease: the entry on a live lease with a sentinel.
    let renewed = loop {
        let all = keys_with_leases(&mut raw).await;
        if let Some((_, l)) = all.iter().find(|(k, _)| *k == entry)
            && all.iter().any(|(k, x)| x == l && *k != entry)
            && ttl(&mut raw, *l).await > 0
        {
            break *l;
        }
        assert!(
            t.elapsed() < LOST,
            "{test}: the entry is not on a live lease with a sentinel after {LOST:?}: {:?}",
            all.iter()
                .filter(|(k, _)| k.contains(&service_path) || sentinels.contains(k))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    times.push((
        format!("entry on a lease with a sentinel again ({renewed:x})"),
        t.elapsed(),
    ));
    // And it stays: past a whole session (longer than the lease's TTL) it is still there, on
    // a live lease; the old lease, if another, is gone.
    until(
        t,
        Duration::from_millis(SESSION_MS) + Duration::from_secs(1),
    )
    .await;
    let all = keys_with_leases(&mut raw).await;
    let (_, now) = all
        .iter()
        .find(|(k, _)| *k == entry)
        .cloned()
        .unwrap_or_else(|| panic!("{test}: the entry is gone a session after the deletion"));
    assert!(
        ttl(&mut raw, now).await > 0,
        "{test}: the entry is on lease {now:x}, which is not alive"
    );
    if now != lease {
        assert_eq!(
            ttl(&mut raw, lease).await,
            -1,
            "{test}: the old lease {lease:x} is still alive"
        );
        let left: Vec<_> = all.iter().filter(|(_, l)| *l == lease).collect();
        assert!(
            left.is_empty(),
            "{test}: keys left on the old lease: {left:?}"
        );
    }
    eprintln!("{test}: lease {lease:x} -> {now:x}");
    times.push((
        "provider's entry present, subscription current".into(),
        scene.settle(&c).await,
    ));
    assert!(
        !scene.entry_vanished() || now != lease,
        "{test}: the subscription saw the entry vanish though its lease was kept"
    );
    eprintln!(
        "{test}: the entry vanished meanwhile: {}",
        scene.entry_vanished()
    );
    scene.close().await;
    check_targets(test, &times);
}

/// How many `Authenticate` calls the members have handled (their `/metrics`).
fn authentications(c: &Cluster) -> u64 {
    use std::io::{Read, Write};
    c.addresses()
        .iter()
        .filter_map(|a| {
            let mut s = std::net::TcpStream::connect(a).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(
                out.lines()
                    .filter(|l| {
                        l.starts_with("grpc_server_handled_total")
                            && l.contains("grpc_method=\"Authenticate\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64,
            )
        })
        .sum()
}

/// Fault 10: a permission revoked on one watched prefix. On a cluster of its own with
/// authentication on: a user may read and write every key, granted as three ranges (below
/// service B's prefix, B's prefix, above it); a registry as that user (through proxies)
/// subscribes to A and B; B's range is revoked, and the registry's connections are cut once
/// so that it opens its watches again (etcd checks a watch's permission when it is created).
/// The subscription to A keeps working (changes reach it within the target) and the registry
/// does not fall into a reconnect loop: in the 10 s after the cut, the members handle at most
/// a few `Authenticate` calls and the registry reports at most one disconnection.
pub async fn permission_revoked_on_one_prefix(test: &str) {
    let mut c = match tokio::task::block_in_place(Cluster::etcd) {
        Ok(c) => c,
        Err(e) if !registry_test_servers::required() => {
            eprintln!("{test}: skipped, no etcd cluster: {e}");
            return;
        }
        Err(e) => panic!("{test}: cannot start an etcd cluster: {e}"),
    };
    tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let (sa, sb) = (
        unique_service("cluster-perm-a"),
        unique_service("cluster-perm-b"),
    );
    let b_prefix = format!("/dubbo/{}/", encode(&sb));
    {
        let mut admin = raw(&c, None).await;
        admin
            .user_add("root", "rootpw", None)
            .await
            .expect("user root");
        admin.role_add("root").await.expect("role root");
        admin
            .user_grant_role("root", "root")
            .await
            .expect("grant root");
        admin
            .user_add("app", "apppw", None)
            .await
            .expect("user app");
        admin.role_add("app").await.expect("role app");
        admin
            .user_grant_role("app", "app")
            .await
            .expect("grant app");
        for perm in [
            Permission::read_write("\0").with_range_end(b_prefix.as_bytes()),
            Permission::read_write(b_prefix.as_bytes()).with_range_end(prefix_end(&b_prefix)),
            Permission::read_write(prefix_end(&b_prefix)).with_from_key(),
        ] {
            admin
                .role_grant_permission("app", perm)
                .await
                .expect("grant a range");
        }
        admin.auth_enable().await.expect("auth enable");
    }
    let proxies = Proxies::new(&c).await;
    let hosts = c.addresses().join(",");
    let root = open_url(format!("etcd://root:rootpw@{hosts}?session={SESSION_MS}")).await;
    let app = open_url(format!(
        "etcd://app:apppw@{}?session={SESSION_MS}",
        proxies.addresses().join(",")
    ))
    .await;
    let (pa, pb) = (provider(&sa, 1, ""), provider(&sb, 1, ""));
    root.register(&pa).await.expect("register A");
    root.register(&pb).await.expect("register B");
    let (seen_a, seen_b) = (Recorder::new(), Recorder::new());
    app.subscribe(&consumer(&sa, ""), seen_a.listener())
        .await
        .expect("subscribe A");
    app.subscribe(&consumer(&sb, ""), seen_b.listener())
        .await
        .expect("subscribe B");
    seen_a
        .wait_for_entries(&sa, PROVIDERS_CATEGORY, std::slice::from_ref(&pa), LOST)
        .await;
    seen_b
        .wait_for_entries(&sb, PROVIDERS_CATEGORY, std::slice::from_ref(&pb), LOST)
        .await;

    let mut events = app.events();
    let mut admin = raw(&c, Some(("root", "rootpw"))).await;
    admin
        .role_revoke_permission(
            "app",
            b_prefix.as_bytes(),
            Some(RoleRevokePermissionOptions::new().with_range_end(prefix_end(&b_prefix))),
        )
        .await
        .expect("revoke B's range");
    // A reconnect: every watch is opened again, B's now refused.
    proxies.each(registry_test_servers::Proxy::cut);
    proxies.each(registry_test_servers::Proxy::restore);
    let cut = Instant::now();
    let auth_before = tokio::task::block_in_place(|| authentications(&c));
    // A change on B (the app may no longer see it) and one on A (it must).
    root.register(&provider(&sb, 2, ""))
        .await
        .expect("register B2");
    let pa2 = provider(&sa, 2, "");
    root.register(&pa2).await.expect("register A2");
    let t = Instant::now();
    seen_a
        .wait_for_entries(&sa, PROVIDERS_CATEGORY, &[pa.clone(), pa2.clone()], LOST)
        .await;
    let mut times = vec![(
        "subscription to A saw a change after B's revocation and a reconnect".to_owned(),
        t.elapsed(),
    )];
    until(cut, Duration::from_secs(10)).await;
    let auths = tokio::task::block_in_place(|| authentications(&c)) - auth_before;
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    // Still working at the end: another change on A.
    root.unregister(&pa2).await.expect("unregister A2");
    let t = Instant::now();
    seen_a
        .wait_for_entries(&sa, PROVIDERS_CATEGORY, std::slice::from_ref(&pa), LOST)
        .await;
    times.push((
        "subscription to A saw a change 10 s after the reconnect".to_owned(),
        t.elapsed(),
    ));
    eprintln!(
        "{test}: in the 10 s after the reconnect: {auths} Authenticate calls, the app \
         registry's events {seen:?}; B's last list: {:?}",
        seen_b
            .latest_entries(&sb, PROVIDERS_CATEGORY)
            .map(|v| v.len())
    );
    let drops = seen
        .iter()
        .filter(|e| matches!(e, RegistryEvent::Disconnected | RegistryEvent::SessionLost))
        .count();
    app.destroy().await;
    root.destroy().await;
    assert!(
        auths <= 5,
        "{test}: {auths} Authenticate calls in the 10 s after the reconnect: a loop"
    );
    assert!(
        drops <= 1,
        "{test}: {drops} disconnections in the 10 s after the reconnect: {seen:?}"
    );
    check_targets(test, &times);
}

/// The lease of the live registry whose URL is `registry`: the lease of its sentinel (under
/// the default lease prefix, the registry's identity as value), the newest one when there
/// are several.
async fn registry_lease(raw: &mut Client, registry: &Url) -> i64 {
    let label = registry.to_identity_string_redacted();
    let prefix = format!("{}/", registry_etcd::DEFAULT_LEASE_PREFIX);
    let resp = raw
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("list the lease sentinels");
    let mut found: Vec<(i64, i64)> = resp
        .kvs()
        .iter()
        .filter(|kv| kv.value() == label.as_bytes() && kv.lease() != 0)
        .map(|kv| (kv.create_revision(), kv.lease()))
        .collect();
    found.sort_unstable();
    while let Some((_, lease)) = found.pop() {
        if ttl(raw, lease).await > 0 {
            return lease;
        }
    }
    panic!("no live lease sentinel of {label} under {prefix}")
}

/// A [`super::matrix::Populate`] for etcd: registering 10,000 providers one call each takes
/// 90-120 s on a 3-member cluster here, so a raw client writes them in Dubbo's layout
/// (`/dubbo/<service>/providers/<url>`, the URL as value), 128 to a transaction, on the
/// provider registry's own lease (found through its lease sentinel): the registry owns them
/// as if it had registered them, so its `unregister` deletes them (it deletes only entries
/// on its lease) and its `destroy` takes them away.
pub fn put_all(
    registry: Arc<dyn Registry>,
    members: Vec<String>,
    urls: Vec<Url>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let endpoints: Vec<String> = members.iter().map(|a| format!("http://{a}")).collect();
        let mut raw = Client::connect(endpoints, None)
            .await
            .expect("a raw etcd client");
        // The provider's sentinel is found by its value, the registry's identity (its URL,
        // password hidden). Fault 9's provider is the only registry of this test binary opened
        // with `session=30000` (the others use `session={SESSION_MS}` or other URLs), so no
        // other live registry on the shared cluster has the same identity and its lease is
        // the one found.
        let lease = registry_lease(&mut raw, registry.url()).await;
        let mut txns = tokio::task::JoinSet::new();
        for chunk in urls.chunks(128) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|u| {
                    let key = format!(
                        "/dubbo/{}/providers/{}",
                        encode(u.service_interface()),
                        encode(&u.to_full_string())
                    );
                    TxnOp::put(
                        key,
                        u.to_full_string(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            let mut kv = raw.kv_client();
            txns.spawn(async move { kv.txn(Txn::new().and_then(ops)).await });
        }
        while let Some(done) = txns.join_next().await {
            done.expect("txn task").expect("txn");
        }
    })
}
