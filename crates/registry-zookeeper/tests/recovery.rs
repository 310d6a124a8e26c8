//! The whole stack a factory returns, FailbackRegistry over the ZooKeeper backend, on a
//! private ZooKeeper: after a session expiry or an outage longer than the session, every
//! ephemeral registration comes back by itself and every subscription sees later changes.
//! The recovery times are printed (`-- --nocapture`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::{Recorder, consumer, provider, unique_service, wait_until};
use registry_core::{Registry, RegistryEvent, Url};
use registry_failback::FailbackRegistry;
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;

const DEADLINE: Duration = Duration::from_secs(30);

async fn stack(url: &str) -> Arc<FailbackRegistry<ZookeeperRegistry>> {
    let raw = ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"));
    FailbackRegistry::new(raw).expect("failback")
}

/// Whether every entry exists and is owned by `session`.
async fn owned_by(raw: &zk::Client, r: &ZookeeperRegistry, urls: &[Url], session: i64) -> bool {
    for u in urls {
        match raw.get_data(&r.entry_path(u)).await {
            Ok((_, stat)) if stat.ephemeral_owner == session => {}
            _ => return false,
        }
    }
    true
}

/// A second client closes the session: the registrations are back on the new session and
/// the subscriptions current, without the application doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_restores_everything() {
    init_tracing();
    let Some(server) = private_zookeeper("session_expiry_restores", 500) else {
        return;
    };
    let addr = server.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = stack(&format!(
        "zookeeper://{}?session=10000&timeout=3000&file=false",
        proxy.address()
    ))
    .await;
    let w = stack(&format!(
        "zookeeper://{addr}?session=10000&timeout=3000&file=false"
    ))
    .await;
    let mut events = r.events();
    let s = unique_service("zk-heal");
    let mine: Vec<Url> = (1..=10).map(|i| provider(&s, i, "")).collect();
    for p in &mine {
        r.register(p).await.expect("register");
    }
    let recs: Vec<Arc<Recorder>> = (0..3).map(|_| Recorder::new()).collect();
    for rec in &recs {
        r.subscribe(&consumer(&s, ""), rec.listener())
            .await
            .expect("subscribe");
    }
    for rec in &recs {
        rec.wait_for_entries(&s, "providers", &mine, DEADLINE).await;
    }
    let old = r.raw().session_id().expect("a session");
    let info = r.raw().session_info().expect("session info");
    proxy.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    close_session(&addr, info, DEADLINE).await;
    let expired = Instant::now();
    proxy.restore();
    wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
    let new = r.raw().session_id().expect("a new session");
    assert_ne!(new, old);
    let raw = raw_client(&addr).await;
    wait_until(
        "every registration back on the new session",
        DEADLINE,
        || owned_by(&raw, r.raw(), &mine, new),
    )
    .await;
    let restored = expired.elapsed();
    let later = provider(&s, 50, "");
    w.register(&later).await.expect("register after the expiry");
    let mut want = mine.clone();
    want.push(later.clone());
    for rec in &recs {
        rec.wait_for_entries(&s, "providers", &want, DEADLINE).await;
    }
    eprintln!(
        "zookeeper session expiry: 10 registrations back {restored:?} after the session was closed \
         (network restored at the same moment); 3 subscriptions current after {:?}",
        expired.elapsed()
    );
    assert!(r.status().is_healthy(), "{:?}", r.status());
    r.destroy().await;
    w.destroy().await;
}

/// The server is down for longer than the session: on restart everything is restored, and is
/// still there once the server has reaped the old session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_outage_restores_everything_after_the_old_session_is_reaped() {
    init_tracing();
    let Some(mut server) = private_zookeeper("long_outage_restores", 500) else {
        return;
    };
    let addr = server.address();
    let r = stack(&format!(
        "zookeeper://{addr}?session=4000&timeout=2000&file=false"
    ))
    .await;
    let mut events = r.events();
    let s = unique_service("zk-outage");
    let mine: Vec<Url> = (1..=5).map(|i| provider(&s, i, "")).collect();
    for p in &mine {
        r.register(p).await.expect("register");
    }
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, "providers", &mine, DEADLINE).await;
    let old = r.raw().session_info().expect("session info");

    tokio::task::block_in_place(|| server.stop());
    wait_event(&mut events, RegistryEvent::SessionLost, DEADLINE).await;
    tokio::task::block_in_place(|| server.start()).expect("restart");
    let back = Instant::now();
    wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
    let new = r.raw().session_id().expect("a new session");
    let raw = raw_client(&addr).await;
    wait_until("every registration on the new session", DEADLINE, || {
        owned_by(&raw, r.raw(), &mine, new)
    })
    .await;
    eprintln!(
        "zookeeper outage longer than the session: 5 registrations back {:?} after the server came back",
        back.elapsed()
    );
    // The restarted server still knows the old session until it times it out; wait until
    // attaching to it fails, then check nothing went with it.
    wait_until("the old session to be reaped", DEADLINE, || {
        let addr = addr.clone();
        let old = old.clone();
        async move {
            zk::Client::connector()
                .with_session(old)
                .with_session_timeout(Duration::from_secs(4))
                .connect(&addr)
                .await
                .is_err()
        }
    })
    .await;
    assert!(
        owned_by(&raw, r.raw(), &mine, new).await,
        "an entry went with the old session"
    );
    let later = provider(&s, 50, "");
    raw.create(
        &r.raw().entry_path(&later),
        b"",
        &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .expect("raw create");
    let mut want = mine.clone();
    want.push(later);
    rec.wait_for_entries(&s, "providers", &want, DEADLINE).await;
    r.destroy().await;
}
