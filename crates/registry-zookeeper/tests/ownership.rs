//! Who an entry belongs to: unregister deletes only what one of our sessions owns (CONTRACT
//! §7 ZooKeeper), and a register whose reply was lost converges.

mod common;

use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::{provider, unique_service};
use registry_core::{Registry, RegistryEvent};
use registry_zookeeper::ZookeeperRegistry;

const DEADLINE: Duration = Duration::from_secs(30);

async fn registry(url: &str) -> ZookeeperRegistry {
    ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"))
}

fn shared(test: &str) -> Option<String> {
    registry_test_servers::shared_address(registry_test_servers::Kind::Zookeeper, test)
}

/// A restart on the same host:port: the new instance registers the same URL (its register
/// replaces the old instance's entry), then the old instance's unregister arrives late. The
/// new instance's entry must survive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_unregister_of_the_old_instance_leaves_the_new_entry() {
    init_tracing();
    let Some(addr) = shared("late_unregister") else {
        return;
    };
    let group = unique_group("late-unregister");
    let url = format!("zookeeper://{addr}?group={group}&session=10000");
    let old = registry(&url).await;
    let new = registry(&url).await;
    let p = provider(&unique_service("restart"), 1, "");
    let path = old.entry_path(&p);
    old.register(&p).await.expect("old instance registers");
    new.register(&p).await.expect("new instance registers");
    let raw = raw_client(&addr).await;
    let owner =
        |stat: Option<registry_zookeeper::zookeeper_client::Stat>| stat.map(|s| s.ephemeral_owner);
    let new_id = new.session_id().expect("a session");
    assert_eq!(
        owner(raw.check_stat(&path).await.expect("stat")),
        Some(new_id),
        "the new instance's register replaced the old entry"
    );

    old.unregister(&p).await.expect("late unregister");
    assert_eq!(
        owner(raw.check_stat(&path).await.expect("stat")),
        Some(new_id),
        "the old instance's late unregister deleted the new instance's entry"
    );

    // The owner's unregister deletes it.
    new.unregister(&p).await.expect("unregister");
    assert_eq!(owner(raw.check_stat(&path).await.expect("stat")), None);
    old.destroy().await;
    new.destroy().await;
}

/// A persistent entry (`dynamic=false`) belongs to no session: any registry's unregister of
/// its URL deletes it, as Dubbo's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_entry_is_deleted_by_any_unregister() {
    init_tracing();
    let Some(addr) = shared("persistent_unregister") else {
        return;
    };
    let group = unique_group("persistent-unregister");
    let url = format!("zookeeper://{addr}?group={group}&session=10000");
    let a = registry(&url).await;
    let b = registry(&url).await;
    let p = provider(&unique_service("static"), 1, "dynamic=false");
    let path = a.entry_path(&p);
    a.register(&p).await.expect("register");
    let raw = raw_client(&addr).await;
    let stat = raw.check_stat(&path).await.expect("stat").expect("entry");
    assert_eq!(
        stat.ephemeral_owner, 0,
        "dynamic=false makes a persistent node"
    );
    b.unregister(&p).await.expect("unregister");
    assert!(raw.check_stat(&path).await.expect("stat").is_none());
    a.destroy().await;
    b.destroy().await;
}

/// Our client gives up on a session the ensemble still keeps (here a second client keeps it
/// alive; in production, a whole-ensemble outage restarts every session's clock): the entry
/// that session made stays. It is still ours: a register on the new session takes it over
/// (the reliability layer re-registers after `NewSession`), and an unregister deletes it
/// even before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_an_old_session_of_ours_are_ours() {
    init_tracing();
    let Some(server) = private_zookeeper("old_session_of_ours", 500) else {
        return;
    };
    let addr = server.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = registry(&format!(
        "zookeeper://{}?session=4000&timeout=2000",
        proxy.address()
    ))
    .await;
    let mut events = r.events();
    let s = unique_service("old-session");
    let kept = provider(&s, 1, "");
    let dropped = provider(&s, 2, "");
    r.register(&kept).await.expect("register");
    r.register(&dropped).await.expect("register");
    let old = r.session_id().expect("a session");
    let info = r.session_info().expect("session info");

    // Cut our client off, and keep its session alive from another client.
    proxy.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    let keeper = registry_zookeeper::zookeeper_client::Client::connector()
        .with_session(info)
        .with_session_timeout(Duration::from_secs(4))
        .connect(&addr)
        .await
        .expect("attach to the old session");
    let t = Instant::now();
    wait_event(&mut events, RegistryEvent::SessionLost, DEADLINE).await;
    eprintln!(
        "old_session_of_ours: our client gave up on the session after {:?}",
        t.elapsed()
    );
    proxy.restore();
    wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
    let new = r.session_id().expect("a new session");
    assert_ne!(new, old);

    let raw = raw_client(&addr).await;
    let owner =
        |stat: Option<registry_zookeeper::zookeeper_client::Stat>| stat.map(|s| s.ephemeral_owner);
    assert_eq!(
        owner(raw.check_stat(&r.entry_path(&kept)).await.expect("stat")),
        Some(old),
        "the old session is alive in the ensemble, with its entries"
    );
    // Re-registering takes the entry over: it no longer depends on the old session.
    r.register(&kept).await.expect("register again");
    assert_eq!(
        owner(raw.check_stat(&r.entry_path(&kept)).await.expect("stat")),
        Some(new)
    );
    // Unregistering deletes an entry of the old session.
    r.unregister(&dropped).await.expect("unregister");
    assert_eq!(
        owner(raw.check_stat(&r.entry_path(&dropped)).await.expect("stat")),
        None,
        "unregister left an entry of an old session of ours"
    );
    drop(keeper);
    r.destroy().await;
}
