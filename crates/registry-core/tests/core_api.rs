//! The scheme table, the manager's cache key, delivery ordering, streams and the fault wrapper.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::testkit::{FaultyRegistry, Op, Recorder, consumer, provider, unique_service};
use registry_core::{
    Error, MemoryFactory, Notification, NotifyListener, Registry, RegistryEvent, RegistryFactory,
    RegistryManager, Source, Url, registry_key,
};

const DEADLINE: Duration = Duration::from_secs(10);

fn url(s: &str) -> Url {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_scheme_names_it_and_lists_the_registered_ones() {
    let err = RegistryManager::new()
        .get_registry("nacos://10.0.0.1:8848")
        .await
        .err()
        .expect("an unknown scheme is an error");
    assert!(matches!(err, Error::UnknownScheme { .. }));
    let msg = err.to_string();
    assert!(msg.contains("`nacos`"), "{msg}");
    assert!(
        msg.contains("memory"),
        "lists the registered schemes: {msg}"
    );
    assert!(
        msg.contains("use registry_x as _"),
        "says how to link a backend: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_registration_and_duplicates() {
    registry_core::register_factory("rt-mem", Arc::new(MemoryFactory)).unwrap();
    assert!(registry_core::schemes().contains(&"rt-mem".to_owned()));
    let reg = RegistryManager::new()
        .get_registry("rt-mem://x")
        .await
        .unwrap();
    assert!(reg.is_available());
    let dup = registry_core::register_factory("rt-mem", Arc::new(MemoryFactory)).unwrap_err();
    assert!(matches!(dup, Error::DuplicateScheme { .. }), "{dup}");
    let dup = registry_core::register_factory("memory", Arc::new(MemoryFactory)).unwrap_err();
    assert!(dup.to_string().contains("memory"), "{dup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registry_urls_are_clear_errors() {
    let m = RegistryManager::new();
    for (input, needle) in [
        ("memory://0.0.0.0:1", "anyhost"),
        ("memory://h?anyhost=true", "anyhost"),
        ("://h:1", "missing protocol"),
        ("memory://h:70000", "port"),
        ("", "empty"),
    ] {
        let err = m.get_registry(input).await.err().expect(input);
        assert!(err.to_string().contains(needle), "{input}: {err}");
    }
}

#[test]
fn registry_key_follows_address_group_and_credentials() {
    let k = |s: &str| registry_key(&url(s));
    assert_eq!(
        k("zookeeper://h:2181?check=false&timeout=3"),
        "zookeeper://h:2181/org.apache.dubbo.registry.RegistryService"
    );
    assert_eq!(k("zookeeper://h:2181"), k("zookeeper://h:2181?session=1"));
    assert_ne!(k("zookeeper://h:2181"), k("zookeeper://h:2181?group=g"));
    assert_eq!(
        k("zookeeper://u:p@h:2181?group=g"),
        "zookeeper://u:p@h:2181/g/org.apache.dubbo.registry.RegistryService"
    );
    assert_ne!(k("zookeeper://u:p@h:2181"), k("zookeeper://u:q@h:2181"));
    assert_ne!(k("localdir:///srv/a"), k("localdir:///srv/b"));
    assert_eq!(
        k("zookeeper://h:2181/org.apache.dubbo.registry.RegistryService"),
        k("zookeeper://h:2181")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_caches_per_key_and_destroy_all_destroys() {
    let m = RegistryManager::new();
    let a = m.get_registry("memory://cache-key").await.unwrap();
    let b = m
        .get_registry("memory://cache-key?check=false")
        .await
        .unwrap();
    let c = m
        .get_registry("memory://cache-key?group=other")
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b), "same address and group: same instance");
    assert!(!Arc::ptr_eq(&a, &c), "another group: another instance");
    assert_eq!(m.registries().len(), 2);
    m.destroy_all().await;
    assert!(!a.is_available() && !c.is_available());
    let d = m.get_registry("memory://cache-key").await.unwrap();
    assert!(d.is_available(), "a new instance after destroy_all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_build_one_instance() {
    let m = Arc::new(RegistryManager::new());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.get_registry("memory://concurrent").await.unwrap() })
        })
        .collect();
    let mut regs = Vec::new();
    for t in tasks {
        regs.push(t.await.unwrap());
    }
    assert!(regs.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_registries_of_one_name_share_a_store_and_others_do_not() {
    let s = unique_service("share");
    let a = MemoryFactory
        .create(&url("memory://shared-a"))
        .await
        .unwrap();
    let b = MemoryFactory
        .create(&url("memory://shared-a"))
        .await
        .unwrap();
    let other = MemoryFactory
        .create(&url("memory://shared-b"))
        .await
        .unwrap();
    let p = provider(&s, 1, "");
    a.register(&p).await.unwrap();
    assert_eq!(b.lookup(&consumer(&s, "")).await.unwrap(), vec![p.clone()]);
    assert!(other.lookup(&consumer(&s, "")).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_limits_what_may_be_registered() {
    let s = unique_service("accepts");
    let allow = MemoryFactory
        .create(&url("memory://accepts?accepts=tri,dubbo"))
        .await
        .unwrap();
    allow.register(&provider(&s, 1, "")).await.unwrap();
    let rest = url(&format!("rest://10.0.0.1:80/{s}"));
    let err = allow.register(&rest).await.unwrap_err();
    assert!(matches!(err, Error::NotAccepted { .. }), "{err}");
    let deny = MemoryFactory
        .create(&url("memory://accepts?accepts=-rest"))
        .await
        .unwrap();
    assert!(deny.register(&rest).await.is_err());
    deny.register(&provider(&s, 2, "")).await.unwrap();
}

fn note(rev: u64, hosts: &[u8], source: Source) -> Notification {
    let urls: Vec<Url> = if hosts.is_empty() {
        vec![url("empty://h/S?category=providers")]
    } else {
        hosts.iter().map(|h| provider("S", *h, "")).collect()
    };
    Notification::new("S", "providers", urls, rev, source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_drops_stale_and_coalesces_for_a_slow_listener() {
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let gate = Arc::new(std::sync::Barrier::new(2));
    let (seen2, gate2) = (seen.clone(), gate.clone());
    let first = Arc::new(AtomicUsize::new(0));
    let entered = first.clone();
    let listener: Arc<dyn NotifyListener> = Arc::new(move |n: Notification| {
        // The first call blocks until the test has pushed a backlog.
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            gate2.wait();
        }
        seen2.lock().unwrap().push(n.revision);
    });
    let d = Delivery::spawn(listener, DeliveryOptions::default());
    d.push(note(1, &[1], Source::Live));
    registry_core::testkit::wait_until("the listener to take revision 1", DEADLINE, || {
        let n = entered.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    let blocker = tokio::task::spawn_blocking(move || gate.wait());
    for rev in 2..=50 {
        d.push(note(rev, &[1, (rev % 200) as u8], Source::Live));
    }
    d.push(note(10, &[9], Source::Live)); // stale: older than the pending 50
    blocker.await.unwrap();
    d.flush().await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.first(), Some(&1));
    assert_eq!(got.last(), Some(&50), "ends on the latest list: {got:?}");
    assert!(
        got.len() < 50,
        "a slow listener does not get every list: {got:?}"
    );
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "never back in time: {got:?}"
    );
    // A stale list after delivery is dropped too.
    d.push(note(3, &[7], Source::Live));
    d.flush().await;
    assert_eq!(seen.lock().unwrap().last(), Some(&50));
}

/// An `interface=*` subscription is told about every service that comes and goes: its
/// delivery keeps the lists of the services that hold entries, and only a bounded number of
/// those that went empty, however many names churn through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_keeps_a_bounded_number_of_empty_lists() {
    let rec = Recorder::new();
    let d = Delivery::spawn(rec.listener(), DeliveryOptions::default());
    let list = |service: &str, rev: u64, entries: bool| {
        let urls = if entries {
            vec![provider(service, 1, "")]
        } else {
            vec![url(&format!("empty://h/{service}?category=providers"))]
        };
        Notification::new(service, "providers", urls, rev, Source::Live)
    };
    // Ten services that stay.
    for i in 0..10 {
        d.push(list(&format!("Stay{i}"), 1, true));
    }
    // 5,000 that appear, and leave.
    for i in 0..5_000u64 {
        let s = format!("Churn{i}");
        d.push(list(&s, 2 * i + 1, true));
        d.push(list(&s, 2 * i + 2, false));
    }
    d.flush().await;
    let held = d.last_delivered();
    assert!(
        held.len() <= 10 + 256,
        "{} lists held after 5,000 services came and went",
        held.len()
    );
    for i in 0..10 {
        let s = format!("Stay{i}");
        let n = d
            .last_delivered_for(&s, "providers")
            .expect("a staying service's list");
        assert_eq!(n.entries().count(), 1, "{s} keeps its entry");
    }
    // The latest services to leave are still known as empty: a repeat is not news.
    let before = rec.all().len();
    d.push(list("Churn4999", 10_000, false));
    d.flush().await;
    assert_eq!(
        rec.all().len(),
        before,
        "a repeated empty list of a recent service is not news"
    );
    // A service that comes back is delivered again.
    d.push(list("Churn0", 20_000, true));
    d.flush().await;
    assert_eq!(
        d.last_delivered_for("Churn0", "providers")
            .map(|n| n.entries().count()),
        Some(1)
    );
}

/// With empty protection, the list kept in place of an empty one of a service that left
/// ages out like an empty list: the delivery stays bounded however many names churn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_with_empty_protection_keeps_a_bounded_number_of_kept_lists() {
    let rec = Recorder::new();
    let d = Delivery::spawn(
        rec.listener(),
        DeliveryOptions {
            empty_protection: true,
            label: "protected".into(),
        },
    );
    for i in 0..3_000u64 {
        let s = format!("Churn{i}");
        d.push(Notification::new(
            s.as_str(),
            "providers",
            vec![provider(&s, 1, "")],
            2 * i + 1,
            Source::Live,
        ));
        // Delivered before it goes (else the two coalesce, and the empty one is news).
        d.flush().await;
        d.push(Notification::new(
            s.as_str(),
            "providers",
            vec![url(&format!("empty://h/{s}?category=providers"))],
            2 * i + 2,
            Source::Live,
        ));
    }
    d.flush().await;
    let held = d.last_delivered();
    assert!(held.len() <= 256, "{} lists held", held.len());
    // Also those kept while the delivery still held few lists age out.
    assert!(d.last_delivered_for("Churn0", "providers").is_none());
    // The most recent service that left still has its list kept by the protection.
    let last = d
        .last_delivered_for("Churn2999", "providers")
        .expect("kept");
    assert_eq!(last.entries().count(), 1);
    // No listener call was an empty providers list.
    assert!(rec.all().iter().all(|n| !n.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_takes_live_after_cache_and_skips_repeats() {
    let rec = Recorder::new();
    let d = Delivery::spawn(rec.listener(), DeliveryOptions::default());
    d.push(note(100, &[1], Source::Cache));
    d.flush().await;
    d.push(note(5, &[2], Source::Live)); // lower revision, but live beats cache
    d.flush().await;
    d.push(note(5, &[2], Source::Live)); // the same list again
    d.flush().await;
    let got: Vec<(u64, Source)> = rec.all().iter().map(|n| (n.revision, n.source)).collect();
    assert_eq!(got, vec![(100, Source::Cache), (5, Source::Live)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_empty_protection_keeps_the_last_providers() {
    let rec = Recorder::new();
    let d = Delivery::spawn(
        rec.listener(),
        DeliveryOptions {
            empty_protection: true,
            label: "t".into(),
        },
    );
    d.push(note(1, &[], Source::Live)); // nothing before: an empty list is delivered
    d.flush().await;
    d.push(note(2, &[1], Source::Live));
    d.flush().await;
    d.push(note(3, &[], Source::Live));
    d.flush().await;
    d.push(note(4, &[2], Source::Live));
    d.flush().await;
    let revs: Vec<u64> = rec.all().iter().map(|n| n.revision).collect();
    assert_eq!(revs, vec![1, 2, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_listener_does_not_harm_others() {
    let s = unique_service("panic");
    let reg = MemoryFactory.create(&url("memory://panics")).await.unwrap();
    // The panicking listener records each list it is given, then panics.
    let seen = Recorder::new();
    let seen2 = seen.clone();
    let bad: Arc<dyn NotifyListener> = Arc::new(move |n: Notification| {
        seen2.notify(n);
        panic!("listener bug");
    });
    let good = Recorder::new();
    reg.subscribe(&consumer(&s, ""), bad).await.unwrap();
    reg.subscribe(&consumer(&s, ""), good.listener())
        .await
        .unwrap();
    let p = provider(&s, 1, "");
    reg.register(&p).await.unwrap();
    good.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    let p2 = provider(&s, 2, "");
    reg.register(&p2).await.unwrap();
    let both = [p, p2];
    good.wait_for_entries(&s, "providers", &both, DEADLINE)
        .await;
    // The panicking subscription itself goes on: it still ends on the latest list.
    seen.wait_for_entries(&s, "providers", &both, DEADLINE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_waits_for_a_running_listener() {
    let s = unique_service("unsub-wait");
    let reg = MemoryFactory
        .create(&url("memory://unsub-wait"))
        .await
        .unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (i2, d2) = (inside.clone(), done.clone());
    let slow: Arc<dyn NotifyListener> = Arc::new(move |n: Notification| {
        if !n.is_empty() {
            i2.store(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            d2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let q = consumer(&s, "");
    reg.subscribe(&q, slow.clone()).await.unwrap();
    reg.register(&provider(&s, 1, "")).await.unwrap();
    registry_core::testkit::wait_until("the listener to start", DEADLINE, || {
        let v = inside.load(Ordering::SeqCst);
        async move { v == 1 }
    })
    .await;
    reg.unsubscribe(&q, &slow).await.unwrap();
    let after_unsubscribe = done.load(Ordering::SeqCst);
    assert_eq!(
        after_unsubscribe, 1,
        "unsubscribe returned while the listener ran"
    );
    reg.register(&provider(&s, 2, "")).await.unwrap();
    reg.lookup(&q).await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_stream_yields_lists_and_unsubscribes_on_drop() {
    let s = unique_service("stream");
    let reg = MemoryFactory
        .create(&url("memory://streams"))
        .await
        .unwrap();
    let mut stream = registry_core::subscribe_stream(reg.clone(), consumer(&s, ""))
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_empty());
    let p = provider(&s, 1, "");
    reg.register(&p).await.unwrap();
    let n = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.urls.to_vec(), vec![p]);
    drop(stream);
    // The subscription is gone: a second identical subscription is a new one and sees the list.
    let rec = Recorder::new();
    reg.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    assert_eq!(rec.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_wrapper_fails_counts_and_expires() {
    let s = unique_service("faulty");
    let inner = MemoryFactory.create(&url("memory://faulty")).await.unwrap();
    let f = FaultyRegistry::new(inner.clone());
    let mut events = f.events();
    let p = provider(&s, 1, "");
    f.fail_next(Op::Register, 2);
    assert!(f.register(&p).await.unwrap_err().is_retryable());
    assert!(f.register(&p).await.is_err());
    f.register(&p).await.unwrap();
    assert_eq!(f.calls(Op::Register), 3);
    let persistent = provider(&s, 2, "dynamic=false");
    f.register(&persistent).await.unwrap();

    let rec = Recorder::new();
    f.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    assert_eq!(f.subscription_count(), 1);

    f.disconnect();
    assert!(!f.is_available());
    assert!(matches!(
        f.lookup(&consumer(&s, "")).await,
        Err(Error::NotConnected { .. })
    ));
    f.reconnect();
    assert_eq!(events.recv().await.unwrap(), RegistryEvent::Disconnected);
    assert_eq!(events.recv().await.unwrap(), RegistryEvent::Reconnected);

    f.expire_session().await;
    assert_eq!(events.recv().await.unwrap(), RegistryEvent::SessionLost);
    assert_eq!(events.recv().await.unwrap(), RegistryEvent::NewSession);
    assert_eq!(
        inner.lookup(&consumer(&s, "")).await.unwrap(),
        vec![persistent.clone()],
        "the dynamic entry went with the session; the persistent one stayed"
    );
    assert_eq!(f.subscription_count(), 0);
    let seen = rec.len();
    inner.register(&provider(&s, 3, "")).await.unwrap();
    inner.lookup(&consumer(&s, "")).await.unwrap();
    assert_eq!(rec.len(), seen, "the subscription went with the session");
    inner.unregister(&persistent).await.unwrap();
}

// A listener that blocks does not stall the runtime, even a current-thread one: another
// subscription is notified while it is still blocked.
#[tokio::test(flavor = "current_thread")]
async fn a_blocking_listener_does_not_stall_a_current_thread_runtime() {
    let s1 = unique_service("blocking");
    let s2 = unique_service("witness");
    let reg = MemoryFactory
        .create(&url("memory://blocking"))
        .await
        .unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let blocked = Arc::new(AtomicUsize::new(0));
    let b2 = blocked.clone();
    let slow: Arc<dyn NotifyListener> = Arc::new(move |n: Notification| {
        if !n.is_empty() {
            b2.store(1, Ordering::SeqCst);
            // Blocks the calling thread until released (10 s at most).
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            b2.store(2, Ordering::SeqCst);
        }
    });
    reg.subscribe(&consumer(&s1, ""), slow).await.unwrap();
    let witness = Recorder::new();
    reg.subscribe(&consumer(&s2, ""), witness.listener())
        .await
        .unwrap();
    reg.register(&provider(&s1, 1, "")).await.unwrap();
    registry_core::testkit::wait_until("the slow listener to block", DEADLINE, || {
        let v = blocked.load(Ordering::SeqCst);
        async move { v == 1 }
    })
    .await;
    let p = provider(&s2, 1, "");
    reg.register(&p).await.unwrap();
    witness
        .wait_for_entries(&s2, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    assert_eq!(
        blocked.load(Ordering::SeqCst),
        1,
        "the witness was notified while the slow listener blocked"
    );
    release_tx.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_takes_a_renumbered_list_and_repeats_are_not_news() {
    let rec = Recorder::new();
    let d = Delivery::spawn(rec.listener(), DeliveryOptions::default());
    d.push(note(10, &[1], Source::Live));
    d.flush().await;
    d.push(note(12, &[1], Source::Live)); // the same list re-read at a newer revision
    d.flush().await;
    d.push(note(11, &[2], Source::Live)); // older than the repeat: stale
    d.flush().await;
    d.rebase();
    d.push(note(3, &[3], Source::Live)); // a re-established source numbering afresh
    d.flush().await;
    d.push(note(2, &[4], Source::Live)); // after that, the guard holds again
    d.flush().await;
    let got: Vec<u64> = rec.all().iter().map(|n| n.revision).collect();
    assert_eq!(got, vec![10, 3]);
}
