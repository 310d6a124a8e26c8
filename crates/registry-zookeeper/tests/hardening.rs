//! Failures in the middle of recovery: a watch that cannot be armed or read after a
//! reconnect or a new session, a wildcard service whose first read fails, revisions across
//! re-created watches, destroy racing with subscribe, a blackholed host. Lists are made
//! unreadable with an ACL (no READ permission for anyone), which is what a slow or refusing
//! server looks like to the watch task: its arm or read fails.

mod common;

use std::time::Duration;

use common::*;
use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::{Registry, RegistryEvent, Url, encode};
use registry_test_servers::{Kind, shared_address};
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;

const DEADLINE: Duration = Duration::from_secs(30);

async fn registry(url: &str) -> ZookeeperRegistry {
    ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"))
}

/// Anyone may create children and change the ACL, nobody may read.
fn unreadable() -> Vec<zk::Acl> {
    vec![zk::Acl::new(
        zk::Permission::CREATE | zk::Permission::DELETE | zk::Permission::ADMIN,
        zk::AuthId::anyone(),
    )]
}

fn readable() -> Vec<zk::Acl> {
    vec![zk::Acl::new(zk::Permission::ALL, zk::AuthId::anyone())]
}

/// After a reconnect of the same session the list cannot be read (nor, on servers that
/// check READ for AddWatch, watched). The watch task keeps trying: once the list is readable
/// again the change made during the disconnection arrives, and later changes arrive by event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reread_after_reconnect_is_retried() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "failed_reread_after_reconnect") else {
        return;
    };
    let group = unique_group("reread");
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = registry(&format!(
        "zookeeper://{}?group={group}&session=10000&timeout=1000",
        proxy.address()
    ))
    .await;
    let w = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let s = unique_service("reread");
    let first = provider(&s, 1, "");
    w.register(&first).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&first), DEADLINE)
        .await;

    let mut events = r.events();
    let raw = raw_client(&addr).await;
    let path = r.category_path(&s, "providers");
    proxy.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    let later = provider(&s, 2, "");
    w.register(&later).await.expect("register while r is away");
    raw.set_acl(&path, &unreadable(), None)
        .await
        .expect("close the list");
    proxy.restore();
    // Reconnected comes once the lists are read again or, when that keeps failing, after a
    // bound; either way at least one attempt failed by then.
    wait_event(&mut events, RegistryEvent::Reconnected, DEADLINE).await;
    raw.set_acl(&path, &readable(), None)
        .await
        .expect("open the list");
    rec.wait_for_entries(&s, "providers", &[first.clone(), later.clone()], DEADLINE)
        .await;
    let third = provider(&s, 3, "");
    w.register(&third).await.expect("register");
    rec.wait_for_entries(&s, "providers", &[first, later, third], DEADLINE)
        .await;
    r.destroy().await;
    w.destroy().await;
}

/// Same after a new session: the new session's watch cannot read the list at first; it
/// keeps trying, and the change made while the old session was dying arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_read_on_a_new_session_is_retried() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "failed_read_on_a_new_session") else {
        return;
    };
    let group = unique_group("newsession");
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = registry(&format!(
        "zookeeper://{}?group={group}&session=10000&timeout=1000",
        proxy.address()
    ))
    .await;
    let w = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let s = unique_service("newsession");
    let first = provider(&s, 1, "");
    w.register(&first).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&first), DEADLINE)
        .await;

    let mut events = r.events();
    let raw = raw_client(&addr).await;
    let path = r.category_path(&s, "providers");
    let info = r.session_info().expect("session info");
    proxy.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    close_session(&addr, info, DEADLINE).await;
    let later = provider(&s, 2, "");
    w.register(&later).await.expect("register while r is away");
    raw.set_acl(&path, &unreadable(), None)
        .await
        .expect("close the list");
    proxy.restore();
    wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
    raw.set_acl(&path, &readable(), None)
        .await
        .expect("open the list");
    rec.wait_for_entries(&s, "providers", &[first.clone(), later.clone()], DEADLINE)
        .await;
    let third = provider(&s, 3, "");
    w.register(&third).await.expect("register");
    rec.wait_for_entries(&s, "providers", &[first, later, third], DEADLINE)
        .await;
    r.destroy().await;
    w.destroy().await;
}

/// `interface=*`: a service appears whose list cannot be read yet. Once it can, the
/// subscription gets it (the service was not marked attached by the failed read, and the
/// root task tries again), and its first notification is the whole list, never the part
/// learnt from events before the first read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_service_whose_first_read_failed_is_attached_later() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "wildcard_first_read_failed") else {
        return;
    };
    let group = unique_group("wild");
    let r = registry(&format!("zookeeper://{addr}?group={group}&timeout=2000")).await;
    let w = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let s1 = unique_service("wild-a");
    let one = provider(&s1, 1, "");
    w.register(&one).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer("*", ""), rec.listener())
        .await
        .expect("subscribe *");
    rec.wait_for_entries(&s1, "providers", std::slice::from_ref(&one), DEADLINE)
        .await;

    // s2 appears in one transaction, its providers list unreadable.
    let raw = raw_client(&addr).await;
    let s2 = unique_service("wild-b");
    let service_path = format!("/{group}/{}", encode(&s2));
    let path = r.category_path(&s2, "providers");
    let entries: Vec<Url> = (1..=4).map(|i| provider(&s2, i, "")).collect();
    let node = |u: &Url| format!("{path}/{}", encode(&u.to_full_string()));
    let open = readable();
    let closed = unreadable();
    let open_opts = zk::CreateMode::Persistent.with_acls(zk::Acls::from(open.as_slice()));
    let closed_opts = zk::CreateMode::Persistent.with_acls(zk::Acls::from(closed.as_slice()));
    let mut multi = raw.new_multi_writer();
    multi
        .add_create(&service_path, &[], &open_opts)
        .expect("create");
    multi.add_create(&path, &[], &closed_opts).expect("create");
    for u in &entries[..3] {
        multi.add_create(&node(u), &[], &open_opts).expect("create");
    }
    multi.commit().await.expect("create s2");
    // The first read of s2 failed by the time a later service is delivered: the root
    // task attaches in name order and one session's requests are answered in order.
    let s3 = unique_service("wild-c");
    let three = provider(&s3, 1, "");
    w.register(&three).await.expect("register");
    rec.wait_for_entries(&s3, "providers", std::slice::from_ref(&three), DEADLINE)
        .await;
    // An event on the unread list: it must not be delivered as a list of one.
    raw.create(&node(&entries[3]), &[], &open_opts)
        .await
        .expect("create the fourth");
    let s4 = unique_service("wild-d");
    let four = provider(&s4, 1, "");
    w.register(&four).await.expect("register");
    rec.wait_for_entries(&s4, "providers", std::slice::from_ref(&four), DEADLINE)
        .await;
    raw.set_acl(&path, &open, None)
        .await
        .expect("open the list");
    rec.wait_for_entries(&s2, "providers", &entries, DEADLINE)
        .await;
    let partial: Vec<usize> = rec
        .all()
        .iter()
        .filter(|n| n.service == s2 && n.category == "providers")
        .map(|n| n.entries().count())
        .filter(|&n| n != entries.len())
        .collect();
    assert!(
        partial.is_empty(),
        "s2 was delivered with {partial:?} entries before its whole list"
    );
    r.destroy().await;
    w.destroy().await;
}

/// Revisions never go back for a path, even across a dropped and re-created watch: many
/// entries created in one transaction give as many events (each one revision more than the
/// last) but a single zxid, so the real `pzxid` a new watch reads is lower than what was
/// reported; the new watch must still report at least the old revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_stay_monotonic_across_a_recreated_watch() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "revisions_monotonic") else {
        return;
    };
    let group = unique_group("rev");
    let r = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let s = unique_service("rev");
    let sub = consumer(&s, "");
    let raw = raw_client(&addr).await;
    let path = r.category_path(&s, "providers");
    let opts = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    raw.mkdir(&path, &opts).await.expect("mkdir");
    let rec = Recorder::new();
    r.subscribe(&sub, rec.listener()).await.expect("subscribe");
    let entries: Vec<Url> = (1..=50).map(|i| provider(&s, i, "")).collect();
    let mut multi = raw.new_multi_writer();
    for u in &entries {
        multi
            .add_create(
                &format!("{path}/{}", encode(&u.to_full_string())),
                &[],
                &opts,
            )
            .expect("create");
    }
    multi.commit().await.expect("create 50 entries at once");
    rec.wait_for_entries(&s, "providers", &entries, DEADLINE)
        .await;
    let before = rec.latest(&s, "providers").expect("a list").revision;
    r.unsubscribe(&sub, &rec.listener())
        .await
        .expect("unsubscribe");
    // The same listener again: a new watch on the same path.
    r.subscribe(&sub, rec.listener())
        .await
        .expect("subscribe again");
    let after = rec.latest(&s, "providers").expect("a list").revision;
    assert!(
        after >= before,
        "the re-created watch reported revision {after:#x}, lower than {before:#x} reported before"
    );
    r.destroy().await;
}

/// Destroy while subscribes are racing with it: every subscribe either finished before
/// (and destroy cleaned it up) or fails with `Destroyed`, and the session is closed by
/// destroy itself: our ephemeral entry vanishes while the registry value still exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_racing_subscribes_closes_the_session() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "destroy_racing_subscribes") else {
        return;
    };
    let group = unique_group("destroy");
    let raw = raw_client(&addr).await;
    for round in 0..5 {
        let r = std::sync::Arc::new(registry(&format!("zookeeper://{addr}?group={group}")).await);
        let s = unique_service(&format!("destroy{round}"));
        let mine = provider(&s, 1, "");
        r.register(&mine).await.expect("register");
        let path = r.entry_path(&mine);
        let subscribers: Vec<_> = (0..20)
            .map(|i| {
                let r = r.clone();
                let s = unique_service(&format!("destroy{round}-{i}"));
                tokio::spawn(async move {
                    let rec = Recorder::new();
                    r.subscribe(&consumer(&s, ""), rec.listener()).await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        r.destroy().await;
        for t in subscribers {
            match t.await.expect("subscriber") {
                Ok(()) => {}
                Err(registry_core::Error::Destroyed { .. }) => {}
                Err(e) if e.is_retryable() => {}
                Err(e) => panic!("subscribe racing destroy: {e}"),
            }
        }
        wait_until_gone(&raw, &path).await;
        assert!(matches!(
            r.subscribe(&consumer(&s, ""), Recorder::new().listener())
                .await,
            Err(registry_core::Error::Destroyed { .. })
        ));
        drop(r);
    }
}

async fn wait_until_gone(raw: &zk::Client, path: &str) {
    registry_core::testkit::wait_until(
        &format!("{path} to vanish with the closed session"),
        Duration::from_secs(10),
        || async { matches!(raw.check_stat(path).await, Ok(None)) },
    )
    .await;
}

/// A host that accepts connections and never answers (a blackhole as the client sees it)
/// in front of the real server: creation with `check=true` succeeds every time, whichever
/// host the client tries first (it shuffles them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreachable_host_does_not_fail_startup() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "one_unreachable_host") else {
        return;
    };
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the blackhole");
    let hole_addr = hole.local_addr().expect("address").to_string();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            conns.push(c); // held open, never answered
        }
    });
    for round in 0..5 {
        let url = format!("zookeeper://{hole_addr},{addr}?timeout=1000&session=10000");
        let r = ZookeeperRegistry::new(url.parse().expect("url"))
            .await
            .unwrap_or_else(|e| panic!("round {round}: creation failed: {e}"));
        assert!(r.is_available());
        r.destroy().await;
    }
    held.abort();
}
