//! Session expiry and server restarts, each on a private ZooKeeper (so the shared one is
//! never disturbed). The recovery times are printed with `eprintln!`
//! (`cargo test -- --nocapture` shows them).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::{Recorder, consumer, provider, unique_service, wait_until};
use registry_core::{Registry, RegistryEvent};
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;

const DEADLINE: Duration = Duration::from_secs(30);

async fn registry(url: &str) -> ZookeeperRegistry {
    ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"))
}

/// A second client attaches to our session and closes it: SessionLost then NewSession are
/// reported, the existing subscription works again, and register works on the new session.
///
/// Our registry reaches the server through a proxy that is cut while the second client
/// does its work: two live clients on one session take it from each other on every
/// reconnect (the server drops the older connection), and zookeeper-client reconnects at
/// once, so without the cut the close can lose that race for a long time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_reported_and_recovered() {
    init_tracing();
    let Some(server) = private_zookeeper("session_expiry", 500) else {
        return;
    };
    let addr = server.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = registry(&format!(
        "zookeeper://{}?session=10000&timeout=3000",
        proxy.address()
    ))
    .await;
    let w = registry(&format!("zookeeper://{addr}?session=10000&timeout=3000")).await;
    let mut events = r.events();
    let s = unique_service("expiry");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let mine = provider(&s, 1, "");
    let theirs = provider(&s, 2, "");
    r.register(&mine).await.expect("register");
    w.register(&theirs).await.expect("register");
    rec.wait_for_entries(&s, "providers", &[mine.clone(), theirs.clone()], DEADLINE)
        .await;

    let old = r.session_id().expect("a session");
    eprintln!(
        "session_expiry: negotiated session timeout {:?}",
        r.negotiated_session_timeout()
    );
    let info = r.session_info().expect("session info");
    proxy.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    close_session(&addr, info, DEADLINE).await;
    let expired = Instant::now();
    proxy.restore();

    let seen = wait_event(&mut events, RegistryEvent::SessionLost, DEADLINE).await;
    let lost_after = expired.elapsed();
    let seen2 = wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
    let new_after = expired.elapsed();
    eprintln!(
        "session_expiry: after the session was closed and the network restored: SessionLost in {lost_after:?}, NewSession in {new_after:?} ({:?} from SessionLost to NewSession); events {seen:?} {seen2:?}",
        new_after - lost_after
    );
    let new = r.session_id().expect("a new session");
    assert_ne!(new, old, "a new session");
    assert!(r.is_available());

    // The old session's entry is gone (the raw backend does not re-register by itself).
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&theirs), DEADLINE)
        .await;
    // A change made after the expiry reaches the existing subscription.
    let later = provider(&s, 3, "");
    w.register(&later).await.expect("register");
    rec.wait_for_entries(&s, "providers", &[theirs.clone(), later.clone()], DEADLINE)
        .await;
    // Register works on the new session, and the entry is owned by it.
    r.register(&mine)
        .await
        .expect("register on the new session");
    rec.wait_for_entries(
        &s,
        "providers",
        &[mine.clone(), theirs.clone(), later.clone()],
        DEADLINE,
    )
    .await;
    let raw = raw_client(&addr).await;
    let (_, stat) = raw.get_data(&r.entry_path(&mine)).await.expect("entry");
    assert_eq!(stat.ephemeral_owner, new);
    r.destroy().await;
    w.destroy().await;
}

/// Collects the events of a raw persistent recursive watch on `path` (an independent
/// observer). zookeeper-client 0.11.2 does not restore persistent watches after a reconnect,
/// so the observer adds its watch again on every reconnect.
/// Also returns how many times the watch was added.
async fn observe(
    client: zk::Client,
    path: String,
) -> (Arc<Mutex<Vec<zk::WatchedEvent>>>, Arc<AtomicUsize>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let armed = Arc::new(AtomicUsize::new(1));
    let armed2 = armed.clone();
    let mut watcher = client
        .watch(&path, zk::AddWatchMode::PersistentRecursive)
        .await
        .expect("raw watch");
    tokio::spawn(async move {
        loop {
            let ev = watcher.changed().await;
            let end = ev.event_type == zk::EventType::Session && ev.session_state.is_terminated();
            let reconnected = ev.event_type == zk::EventType::Session
                && ev.session_state == zk::SessionState::SyncConnected;
            out.lock().unwrap_or_else(|p| p.into_inner()).push(ev);
            if end {
                return;
            }
            if reconnected {
                drop(watcher);
                watcher = match client
                    .watch(&path, zk::AddWatchMode::PersistentRecursive)
                    .await
                {
                    Ok(w) => w,
                    Err(e) => panic!("observer cannot watch again: {e}"),
                };
                armed2.fetch_add(1, Ordering::AcqRel);
            }
        }
    });
    (seen, armed)
}

/// The server is killed and restarted within the session timeout: the session survives,
/// an independent watcher sees no entry deleted, Reconnected is reported, and a change made
/// after the restart reaches the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_within_session_timeout_keeps_the_session() {
    init_tracing();
    let Some(mut server) = private_zookeeper("restart_within", 500) else {
        return;
    };
    let addr = server.address();
    let url = format!("zookeeper://{addr}?session=10000&timeout=2000");
    let r = registry(&url).await;
    let w = registry(&url).await;
    eprintln!(
        "restart_within: negotiated session timeout {:?}",
        r.negotiated_session_timeout()
    );
    let mut events = r.events();
    let s = unique_service("restart");
    let mine = provider(&s, 1, "");
    r.register(&mine).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&mine), DEADLINE)
        .await;
    let raw = raw_client(&addr).await;
    let category = r.category_path(&s, "providers");
    let (observed, armed) = observe(raw.clone(), category.clone()).await;
    let (_, before) = raw.get_data(&r.entry_path(&mine)).await.expect("entry");
    let session = r.session_id();

    let down = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    // An outage of a few seconds, well within the 10 s session (this sleep is the fault's
    // length, not a wait for a condition).
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| server.start()).expect("restart the server");
    let up = Instant::now();
    let seen = wait_event(&mut events, RegistryEvent::Reconnected, DEADLINE).await;
    eprintln!(
        "restart_within: server down for {:?}; Reconnected {:?} after the server was back; events {seen:?}",
        up - down,
        up.elapsed()
    );
    assert!(
        !seen.contains(&RegistryEvent::SessionLost),
        "the session survived: {seen:?}"
    );
    assert_eq!(r.session_id(), session);

    // The observer's own client reconnects too; it must watch again before the change.
    wait_until("the observer to watch again", DEADLINE, || {
        let armed = armed.clone();
        async move { armed.load(Ordering::Acquire) >= 2 }
    })
    .await;
    let later = provider(&s, 2, "");
    wait_until("the writer to reconnect and register", DEADLINE, || async {
        w.register(&later).await.is_ok()
    })
    .await;
    rec.wait_for_entries(&s, "providers", &[mine.clone(), later.clone()], DEADLINE)
        .await;
    let later_path = w.entry_path(&later);
    wait_until("the observer to see the change", DEADLINE, || {
        let observed = observed.clone();
        let later_path = later_path.clone();
        async move {
            observed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|e| e.event_type == zk::EventType::NodeCreated && e.path == later_path)
        }
    })
    .await;
    let deleted: Vec<_> = observed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|e| e.event_type == zk::EventType::NodeDeleted)
        .cloned()
        .collect();
    assert!(deleted.is_empty(), "an entry was deleted: {deleted:?}");
    let (_, after) = raw.get_data(&r.entry_path(&mine)).await.expect("entry");
    assert_eq!(after.czxid, before.czxid, "the entry was never re-created");
    r.destroy().await;
    w.destroy().await;
}

/// The server is down longer than the session timeout: SessionLost, then NewSession once it
/// is back, and the subscription works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_session_timeout_makes_a_new_session() {
    init_tracing();
    let Some(mut server) = private_zookeeper("outage", 500) else {
        return;
    };
    let addr = server.address();
    let url = format!("zookeeper://{addr}?session=4000&timeout=1000");
    let r = registry(&url).await;
    eprintln!(
        "outage: asked 4000 ms, negotiated session timeout {:?}",
        r.negotiated_session_timeout()
    );
    let mut events = r.events();
    let s = unique_service("outage");
    let mine = provider(&s, 1, "");
    r.register(&mine).await.expect("register");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let old = r.session_id();

    let down = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    let seen = wait_event(&mut events, RegistryEvent::SessionLost, DEADLINE).await;
    eprintln!(
        "outage: SessionLost {:?} after the server stopped; events {seen:?}",
        down.elapsed()
    );
    assert!(!r.is_available());
    tokio::task::block_in_place(|| server.start()).expect("restart the server");
    let up = Instant::now();
    let seen = wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
    eprintln!(
        "outage: NewSession {:?} after the server was back ({:?} after it stopped); events {seen:?}",
        up.elapsed(),
        down.elapsed()
    );
    assert!(r.is_available());
    assert_ne!(r.session_id(), old);

    // The old session's entry expires on the server; a new writer's entry is delivered.
    let w = registry(&url).await;
    let theirs = provider(&s, 2, "");
    w.register(&theirs).await.expect("register");
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&theirs), DEADLINE)
        .await;
    r.register(&mine)
        .await
        .expect("register on the new session");
    rec.wait_for_entries(&s, "providers", &[mine.clone(), theirs.clone()], DEADLINE)
        .await;
    r.destroy().await;
    w.destroy().await;
}

/// `check=false`: the registry is returned at once while the server is down, is not
/// available, reports Connected once the server is up, and then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_false_connects_in_the_background() {
    init_tracing();
    let Some(mut server) = private_zookeeper("check_false", 500) else {
        return;
    };
    let addr = server.address();
    tokio::task::block_in_place(|| server.stop());
    let url = format!("zookeeper://{addr}?timeout=1000&check=false");
    let started = Instant::now();
    let r = registry(&url).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "returned at once"
    );
    assert!(!r.is_available());
    let s = unique_service("check");
    assert!(
        r.register(&provider(&s, 1, ""))
            .await
            .is_err_and(|e| e.is_retryable()),
        "a retryable error while there is no session"
    );
    let strict = ZookeeperRegistry::new(
        format!("zookeeper://{addr}?timeout=500")
            .parse()
            .expect("url"),
    )
    .await;
    match strict {
        Err(e) => {
            assert!(e.is_retryable(), "{e}");
            assert!(
                e.to_string().contains(&addr),
                "the error names the address: {e}"
            );
        }
        Ok(_) => panic!("check=true must fail while the server is down"),
    }
    let mut events = r.events();
    tokio::task::block_in_place(|| server.start()).expect("start the server");
    wait_event(&mut events, RegistryEvent::Connected, DEADLINE).await;
    assert!(r.is_available());
    r.register(&provider(&s, 1, ""))
        .await
        .expect("register once connected");
    r.destroy().await;
    assert!(!r.is_available());
}
