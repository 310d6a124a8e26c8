//! Subscribes while the session is replaced under them (CONTRACT §3: `subscribe` returns only
//! after the listener received its first lists). Whatever the moment a subscribe falls in —
//! before the disconnection, while the session is lost, while the new session's tasks take
//! the watches over, after — it either returns with its lists delivered or fails with an
//! error; it never returns `Ok` with nothing delivered.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::{NotifyListener, Registry, RegistryEvent, Url};
use registry_test_servers::{Kind, shared_address};
use registry_zookeeper::ZookeeperRegistry;

const DEADLINE: Duration = Duration::from_secs(30);
const ROUNDS: usize = 6;

async fn registry(url: &str) -> ZookeeperRegistry {
    ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"))
}

#[derive(Default)]
struct Outcomes {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

/// Subscribes `url` with a fresh listener; on `Ok`, the first lists must already be there:
/// `expected` for each service. Unsubscribes afterwards, so subscriptions do not pile up.
async fn subscribe_once(
    r: &ZookeeperRegistry,
    url: &Url,
    expected: &[(String, Url)],
    outcomes: &Outcomes,
) {
    let rec = Recorder::new();
    let listener: Arc<dyn NotifyListener> = rec.listener();
    match r.subscribe(url, listener.clone()).await {
        Ok(()) => {
            for (service, entry) in expected {
                let got = rec.latest_entries(service, "providers");
                assert_eq!(
                    got.as_deref(),
                    Some(std::slice::from_ref(entry)),
                    "subscribe {url} returned Ok before its first list of {service} was delivered; recorded: {:?}",
                    rec.all()
                );
            }
            outcomes.ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            assert!(
                e.is_retryable(),
                "a subscribe failing in a session change fails with an error the reliability layer retries: {e}"
            );
            tracing::debug!(error = %e, "subscribe failed in the window");
            outcomes.failed.fetch_add(1, Ordering::Relaxed);
            // No session yet: try again in a moment rather than spin.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let _ = r.unsubscribe(url, &listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribes_racing_a_new_session_return_with_their_lists_or_an_error() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "subscribes_racing_a_new_session") else {
        return;
    };
    let group = unique_group("window");
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = Arc::new(
        registry(&format!(
            "zookeeper://{}?group={group}&session=10000&timeout=1000",
            proxy.address()
        ))
        .await,
    );
    let w = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let services: Vec<(String, Url)> = (1..=4)
        .map(|i| {
            let s = unique_service(&format!("window{i}"));
            let p = provider(&s, i, "");
            (s, p)
        })
        .collect();
    for (_, p) in &services {
        w.register(p).await.expect("register");
    }
    let outcomes = Arc::new(Outcomes::default());
    let mut events = r.events();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        // Subscribers that keep subscribing (each service, and `interface=*`) with new
        // listeners through the whole round.
        let subscribers: Vec<_> = (0..services.len() + 1)
            .map(|k| {
                let (r, stop, outcomes) = (r.clone(), stop.clone(), outcomes.clone());
                let (url, expected) = match services.get(k) {
                    Some((s, p)) => (consumer(s, ""), vec![(s.clone(), p.clone())]),
                    None => (consumer("*", ""), services.clone()),
                };
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        subscribe_once(&r, &url, &expected, &outcomes).await;
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20 * (round as u64 % 3 + 1))).await;
        // The session goes: cut, closed from outside, then a new one through the proxy.
        let info = r.session_info().expect("a session");
        proxy.cut();
        wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
        close_session(&addr, info, DEADLINE).await;
        proxy.restore();
        wait_event(&mut events, RegistryEvent::NewSession, DEADLINE).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.store(true, Ordering::Relaxed);
        for s in subscribers {
            s.await.expect("a subscriber panicked");
        }
    }
    let (ok, failed) = (
        outcomes.ok.load(Ordering::Relaxed),
        outcomes.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "{ROUNDS} session changes: {ok} subscribes returned with their lists, {failed} failed"
    );
    assert!(ok > 0, "no subscribe got through ({failed} failed)");
    // Afterwards every subscribe gets through.
    for (s, p) in &services {
        let rec = Recorder::new();
        r.subscribe(&consumer(s, ""), rec.listener())
            .await
            .expect("subscribe after the session changes");
        assert_eq!(
            rec.latest_entries(s, "providers").as_deref(),
            Some(std::slice::from_ref(p))
        );
    }
    r.destroy().await;
    w.destroy().await;
}
