//! FailbackRegistry over the memory backend, with the conformance kit's fault-injecting
//! wrapper in between: Dubbo's FailbackRegistryTest restated, the #6810 regression, recovery,
//! ordering, the disk cache, and `check`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use registry_core::testkit::{
    FaultyRegistry, Op, Recorder, consumer, provider, unique_service, wait_until,
};
use registry_core::{Error, MemoryRegistry, Notification, NotifyListener, Registry, Source, Url};
use registry_failback::{FailbackRegistry, Health};

const DEADLINE: Duration = Duration::from_secs(10);

type Fb = Arc<FailbackRegistry<Arc<FaultyRegistry>>>;

/// A memory store of its own, a fault wrapper over one registry of it, and FailbackRegistry
/// over that; the third value is another registry on the same store, to change and inspect
/// the store from outside (it outlives the wrapped one's destroy).
fn setup(params: &str) -> (Fb, Arc<FaultyRegistry>, Arc<dyn Registry>) {
    let name = unique_service("store").replace('.', "-");
    let url: Url = format!("memory://{name}?file=false&{params}")
        .parse()
        .unwrap();
    let faulty = FaultyRegistry::new(Arc::new(MemoryRegistry::new(url.clone())));
    let fb = FailbackRegistry::new(faulty.clone()).unwrap();
    (fb, faulty, Arc::new(MemoryRegistry::new(url)))
}

async fn holds(inner: &Arc<dyn Registry>, s: &str, want: &[Url]) -> bool {
    let mut got = inner.lookup(&consumer(s, "")).await.unwrap_or_default();
    got.sort_by_cached_key(Url::to_full_string);
    let mut want = want.to_vec();
    want.sort_by_cached_key(Url::to_full_string);
    got == want
}

fn health_of(fb: &Fb, url: &Url) -> Option<Health> {
    fb.status()
        .registrations
        .into_iter()
        .find(|r| &r.url == url)
        .map(|r| r.health)
}

// Dubbo FailbackRegistryTest.testDoRetry: every failed operation is retried until it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_operations_are_retried_until_they_work() {
    let (fb, faulty, inner) = setup("check=false&retry.period=200");
    let s = unique_service("retry");
    let p1 = provider(&s, 1, "");
    let p2 = provider(&s, 2, "");
    fb.register(&p2).await.unwrap();
    faulty.fail_next(Op::Register, 3);
    faulty.fail_next(Op::Unregister, 3);
    faulty.fail_next(Op::Subscribe, 3);
    fb.register(&p1)
        .await
        .expect("check=false: a failed register is not an error");
    fb.unregister(&p2)
        .await
        .expect("check=false: a failed unregister is not an error");
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    assert!(matches!(health_of(&fb, &p1), Some(Health::Retrying { .. })));
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&p1), DEADLINE)
        .await;
    wait_until("p1 in and p2 out of the store", DEADLINE, || {
        holds(&inner, &s, std::slice::from_ref(&p1))
    })
    .await;
    wait_until("a healthy status", DEADLINE, || {
        let ok = fb.status().is_healthy();
        async move { ok }
    })
    .await;
    wait_until("no retry task left", DEADLINE, || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    // One success before, then 3 failures and a success. The injected failures are refused
    // before anything is sent, so no write can land late and nothing is confirmed.
    let calls = faulty.calls(Op::Register);
    assert_eq!(
        calls, 5,
        "one success before, then 3 failures and 1 success: {calls} calls"
    );
    fb.destroy().await;
}

// Dubbo FailbackRegistryTest.testDoRetryRegister.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_register_is_retried_with_status() {
    let (fb, faulty, inner) = setup("check=false&retry.period=300");
    let s = unique_service("retry-reg");
    let p = provider(&s, 1, "");
    faulty.fail_next(Op::Register, 2);
    fb.register(&p).await.unwrap();
    match health_of(&fb, &p) {
        Some(Health::Retrying { last_error, .. }) => {
            assert!(last_error.contains("injected"), "{last_error}")
        }
        other => panic!("expected Retrying, got {other:?}"),
    }
    wait_until("the retried registration", DEADLINE, || {
        holds(&inner, &s, std::slice::from_ref(&p))
    })
    .await;
    wait_until("status ok", DEADLINE, || {
        let h = health_of(&fb, &p);
        async move { h == Some(Health::Ok) }
    })
    .await;
    fb.destroy().await;
}

// Dubbo FailbackRegistryTest.testDoRetrySubscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscribe_is_retried_and_then_notifies() {
    let (fb, faulty, inner) = setup("check=false&retry.period=300");
    let s = unique_service("retry-sub");
    let p = provider(&s, 1, "");
    inner.register(&p).await.unwrap();
    faulty.fail_next(Op::Subscribe, 2);
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    wait_until("no retry task left", DEADLINE, || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    // The call, a failed retry, the retry that worked; a subscription is never confirmed.
    assert_eq!(faulty.calls(Op::Subscribe), 3);
    fb.destroy().await;
}

// Dubbo FailbackRegistryTest.testRecover, and recovery speed: after a new session every
// registration and subscription is back within one backoff step, not one retry period (the
// period here is a minute, longer than the test's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_restores_everything_at_once() {
    let (fb, faulty, inner) = setup("check=false&retry.period=60000");
    let s = unique_service("recover");
    let ps: Vec<Url> = (1..=20).map(|i| provider(&s, i, "")).collect();
    for p in &ps {
        fb.register(p).await.unwrap();
    }
    let persistent = provider(&s, 99, "dynamic=false");
    fb.register(&persistent).await.unwrap();
    let mut all = ps.clone();
    all.push(persistent.clone());
    let recs: Vec<Arc<Recorder>> = (0..5).map(|_| Recorder::new()).collect();
    for r in &recs {
        fb.subscribe(&consumer(&s, ""), r.listener()).await.unwrap();
    }
    let start = Instant::now();
    // The wrapper drops every subscription with the session; recovery may already be
    // re-subscribing by now, so only the end state is checked.
    faulty.expire_session().await;
    wait_until("every registration back", DEADLINE, || {
        holds(&inner, &s, &all)
    })
    .await;
    let after = provider(&s, 50, "");
    inner.register(&after).await.unwrap();
    let mut want = all.clone();
    want.push(after.clone());
    for r in &recs {
        r.wait_for_entries(&s, "providers", &want, DEADLINE).await;
    }
    let elapsed = start.elapsed();
    eprintln!("recovery after a new session: 20 registrations + 5 subscriptions in {elapsed:?}");
    // The wrapper records a subscription only after the inner subscribe returned, and that
    // subscription is live (and notifies) before then: a recorder can hold the full list while
    // its re-subscribe has not been recorded yet. Wait for the bookkeeping, then check that
    // each subscription was restored by exactly one call (5 first subscribes + 5 restores,
    // no retry: the retry period is longer than the deadline).
    wait_until(
        "the wrapper to record 5 restored subscriptions",
        DEADLINE,
        || {
            let n = faulty.subscription_count();
            async move { n == 5 }
        },
    )
    .await;
    assert_eq!(faulty.calls(Op::Subscribe), 5 + 5);
    inner.unregister(&after).await.unwrap();
    fb.destroy().await;
    assert!(
        holds(&inner, &s, std::slice::from_ref(&persistent)).await,
        "destroy keeps persistent entries"
    );
    inner.unregister(&persistent).await.unwrap();
}

// A reconnect of the same session restores nothing: no register is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_of_the_same_session_does_not_reregister() {
    let (fb, faulty, _inner) = setup("check=false");
    let s = unique_service("reconnect");
    fb.register(&provider(&s, 1, "")).await.unwrap();
    let mut events = fb.events();
    faulty.disconnect();
    faulty.reconnect();
    assert_eq!(
        events.recv().await.unwrap(),
        registry_core::RegistryEvent::Disconnected
    );
    assert_eq!(
        events.recv().await.unwrap(),
        registry_core::RegistryEvent::Reconnected
    );
    // A later new session is the only thing that re-registers; use it as the witness that
    // the event task has handled the reconnect.
    faulty.expire_session().await;
    wait_until("re-registration after the new session", DEADLINE, || {
        let n = faulty.calls(Op::Register);
        async move { n == 2 }
    })
    .await;
    fb.destroy().await;
}

// Dubbo #6810 / #7665: an exhausted task leaves the queue, so a new failure of the same key
// is retried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_leave_the_queue() {
    let (fb, faulty, inner) = setup("check=false&retry.times=2&retry.period=50");
    let s = unique_service("exhaust");
    let p = provider(&s, 1, "");
    faulty.fail_next(Op::Register, 1000);
    fb.register(&p).await.unwrap();
    wait_until("giving up", DEADLINE, || {
        let h = health_of(&fb, &p);
        async move { matches!(h, Some(Health::GivenUp { attempts: 2, .. })) }
    })
    .await;
    assert_eq!(
        faulty.calls(Op::Register),
        3,
        "the first call and two retries"
    );
    faulty.clear_faults(Op::Register);
    faulty.fail_next(Op::Register, 1);
    fb.register(&p).await.unwrap();
    wait_until("the new failure retried to success", DEADLINE, || {
        holds(&inner, &s, std::slice::from_ref(&p))
    })
    .await;
    wait_until("status ok", DEADLINE, || {
        let h = health_of(&fb, &p);
        async move { h == Some(Health::Ok) }
    })
    .await;
    fb.destroy().await;
}

// Register and unregister cancel each other's pending retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_cancels_a_pending_register() {
    let (fb, faulty, inner) = setup("check=false&retry.period=100");
    let s = unique_service("cancel");
    let p = provider(&s, 1, "");
    faulty.fail_next(Op::Register, 1000);
    fb.register(&p).await.unwrap();
    assert!(matches!(health_of(&fb, &p), Some(Health::Retrying { .. })));
    faulty.clear_faults(Op::Register);
    fb.unregister(&p).await.unwrap();
    let st = fb.status();
    assert!(
        st.registrations.is_empty() && st.unregistrations.is_empty(),
        "{st:?}"
    );
    // A later, unrelated registration goes through; the cancelled one never does.
    let q = provider(&s, 2, "");
    fb.register(&q).await.unwrap();
    assert!(holds(&inner, &s, std::slice::from_ref(&q)).await);
    fb.destroy().await;
}

// check=true: a failure is returned and nothing is retried; port 0 or check=false on the URL
// turn the failure into a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_decides_between_error_and_retry() {
    let (fb, faulty, inner) = setup("retry.period=100");
    let s = unique_service("check");
    let p = provider(&s, 1, "");
    faulty.fail_next(Op::Register, 1);
    let e = fb.register(&p).await.unwrap_err();
    assert!(matches!(e, Error::Injected { .. }), "{e}");
    assert!(
        fb.status().registrations.is_empty(),
        "a failed checked register is not an intent"
    );

    let unchecked = provider(&s, 2, "check=false");
    faulty.fail_next(Op::Register, 1);
    fb.register(&unchecked).await.unwrap();
    let port0: Url = format!("dubbo://10.0.0.3/{s}?interface={s}")
        .parse()
        .unwrap();
    faulty.fail_next(Op::Register, 1);
    fb.register(&port0).await.unwrap();
    let both = [unchecked.clone(), port0.clone()];
    wait_until("both retried", DEADLINE, || holds(&inner, &s, &both)).await;

    faulty.fail_next(Op::Subscribe, 1);
    let rec = Recorder::new();
    let e = fb
        .subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(fb.status().subscriptions.is_empty());

    // Bad input is an error whatever `check` says.
    let (fb2, _, _) = setup("check=false&accepts=dubbo");
    let rest: Url = format!("rest://10.0.0.1:80/{s}").parse().unwrap();
    assert!(matches!(
        fb2.register(&rest).await,
        Err(Error::NotAccepted { .. })
    ));
    fb.destroy().await;
    fb2.destroy().await;
}

// A stale snapshot delivered after a newer one is dropped; a slow listener ends on the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_snapshots_are_dropped_and_slow_listeners_get_the_latest() {
    let (fb, faulty, inner) = setup("check=false");
    let s = unique_service("order");
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    let p1 = provider(&s, 1, "");
    let p2 = provider(&s, 2, "");
    inner.register(&p1).await.unwrap();
    inner.register(&p2).await.unwrap();
    rec.wait_for_entries(&s, "providers", &[p1.clone(), p2.clone()], DEADLINE)
        .await;
    let newest = rec.latest(&s, "providers").unwrap().revision;
    faulty.deliver_to_subscribers(Notification::new(
        s.as_str(),
        "providers",
        vec![p1.clone()],
        newest - 1,
        Source::Live,
    ));
    let p3 = provider(&s, 3, "");
    inner.register(&p3).await.unwrap();
    rec.wait_for_entries(
        &s,
        "providers",
        &[p1.clone(), p2.clone(), p3.clone()],
        DEADLINE,
    )
    .await;
    let revs: Vec<u64> = rec.all().iter().map(|n| n.revision).collect();
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "the stale list was delivered: {revs:?}"
    );

    // A listener that takes 20 ms per list, under 40 changes.
    let calls = Arc::new(AtomicUsize::new(0));
    let slow_rec = Recorder::new();
    let (c2, r2) = (calls.clone(), slow_rec.clone());
    let slow: Arc<dyn NotifyListener> = Arc::new(move |n: Notification| {
        c2.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        r2.notify(n);
    });
    let s2 = unique_service("slow");
    fb.subscribe(&consumer(&s2, ""), slow).await.unwrap();
    let ps: Vec<Url> = (1..=40).map(|i| provider(&s2, i, "")).collect();
    for p in &ps {
        inner.register(p).await.unwrap();
    }
    slow_rec
        .wait_for_entries(&s2, "providers", &ps, DEADLINE)
        .await;
    let n = calls.load(Ordering::SeqCst);
    assert!(
        n < 41,
        "a slow listener got every intermediate list ({n} calls)"
    );
    eprintln!("slow listener: 40 changes delivered in {n} calls");
    fb.destroy().await;
}

// Empty protection keeps the last providers when the list empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_protection_keeps_the_last_providers() {
    let (fb, _faulty, inner) = setup("check=false&enable-empty-protection=true");
    let s = unique_service("protect");
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, "category=providers,routers"), rec.listener())
        .await
        .unwrap();
    let p = provider(&s, 1, "");
    inner.register(&p).await.unwrap();
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    inner.unregister(&p).await.unwrap();
    // Witness: a later routers change is delivered, so the empty providers list was processed.
    let route: Url = format!("route://0.0.0.0/{s}?category=routers&name=w")
        .parse()
        .unwrap();
    inner.register(&route).await.unwrap();
    rec.wait_for_entries(&s, "routers", std::slice::from_ref(&route), DEADLINE)
        .await;
    assert_eq!(
        rec.latest_entries(&s, "providers"),
        Some(vec![p.clone()]),
        "the empty list was not pushed"
    );
    inner.unregister(&route).await.unwrap();
    fb.destroy().await;
}

// lookup answers from the last notified lists when subscribed, and leaves no subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_uses_notified_lists_and_leaves_no_subscription() {
    let (fb, faulty, inner) = setup("check=false");
    let s = unique_service("lookup");
    let p = provider(&s, 1, "");
    inner.register(&p).await.unwrap();
    assert_eq!(fb.lookup(&consumer(&s, "")).await.unwrap(), vec![p.clone()]);
    assert_eq!(faulty.calls(Op::Lookup), 1);
    assert!(
        fb.status().subscriptions.is_empty(),
        "lookup left a subscription"
    );
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    faulty.fail_next(Op::Lookup, 1);
    assert_eq!(fb.lookup(&consumer(&s, "")).await.unwrap(), vec![p.clone()]);
    assert_eq!(
        faulty.calls(Op::Lookup),
        1,
        "answered from the notified list"
    );
    fb.destroy().await;
}

// destroy: unregisters dynamic intents, keeps persistent ones, stops retries, is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_stops_everything() {
    let (fb, faulty, inner) = setup("check=false&retry.period=50");
    let s = unique_service("destroy");
    let d = provider(&s, 1, "");
    let keep = provider(&s, 2, "dynamic=false");
    fb.register(&d).await.unwrap();
    fb.register(&keep).await.unwrap();
    let stuck = provider(&s, 3, "");
    faulty.fail_next(Op::Register, 1000);
    fb.register(&stuck).await.unwrap();
    faulty.clear_faults(Op::Register);
    fb.destroy().await;
    fb.destroy().await;
    assert!(!fb.is_available());
    assert!(matches!(
        fb.register(&d).await,
        Err(Error::Destroyed { .. })
    ));
    let st = fb.status();
    assert!(st.destroyed && st.registrations.is_empty());
    assert!(holds(&inner, &s, std::slice::from_ref(&keep)).await);
    inner.unregister(&keep).await.unwrap();
}

fn cache_url(path: &std::path::Path, name: &str, extra: &str) -> Url {
    format!(
        "memory://{name}?file={}&file.debounce=10&{extra}",
        path.display()
    )
    .parse()
    .unwrap()
}

// Disk cache: a new instance reads what the last one wrote, and delivers it marked as cache
// when the backend cannot be reached; a corrupt file is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_cache_outlives_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nested").join("registry.json");
    let name = unique_service("cache").replace('.', "-");
    let s = unique_service("cached");
    let p = provider(&s, 1, "");
    {
        let inner = Arc::new(MemoryRegistry::new(cache_url(&file, &name, "")));
        inner.register(&p).await.unwrap();
        let fb = FailbackRegistry::new(inner.clone()).unwrap();
        let rec = Recorder::new();
        fb.subscribe(&consumer(&s, "pid=1&timestamp=1"), rec.listener())
            .await
            .unwrap();
        wait_until("the cache file", DEADLINE, || {
            let ok = registry_failback::read_cache_file(&file)
                .ok()
                .flatten()
                .is_some();
            async move { ok }
        })
        .await;
        fb.destroy().await;
    }
    let saved = registry_failback::read_cache_file(&file).unwrap().unwrap();
    assert_eq!(saved.services[&s][0].urls, vec![p.to_full_string()]);

    // Cold start: the backend is down and check=false; a consumer with another pid and
    // timestamp gets the cached list, marked as cache, then the live one when it is back.
    let inner: Arc<dyn Registry> = Arc::new(MemoryRegistry::new(cache_url(
        &file,
        &name,
        "check=false&retry.period=100",
    )));
    let faulty = FaultyRegistry::new(inner.clone());
    faulty.disconnect();
    let fb = FailbackRegistry::new(faulty.clone()).unwrap();
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, "pid=2&timestamp=2"), rec.listener())
        .await
        .unwrap();
    let first = rec
        .latest(&s, "providers")
        .expect("the cached list, before subscribe returns");
    assert_eq!(first.source, Source::Cache);
    assert_eq!(first.urls.to_vec(), vec![p.clone()]);
    let p2 = provider(&s, 2, "");
    inner.register(&p2).await.unwrap();
    faulty.reconnect();
    rec.wait_for("the live list", DEADLINE, |all| {
        // The first registry's destroy removed its dynamic entry: the live list is p2 alone.
        all.last()
            .is_some_and(|n| n.source == Source::Live && n.urls.to_vec() == vec![p2.clone()])
    })
    .await;
    fb.destroy().await;

    // check=true does not turn a cached subscribe into an error either.
    let faulty = FaultyRegistry::new(Arc::new(MemoryRegistry::new(cache_url(&file, &name, ""))));
    faulty.disconnect();
    let fb = FailbackRegistry::new(faulty.clone()).unwrap();
    let rec = Recorder::new();
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("a cached list is never an error");
    assert_eq!(rec.latest(&s, "providers").unwrap().source, Source::Cache);
    fb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_file_is_ignored_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_service("corrupt").replace('.', "-");
    for garbage in [
        &b"{\"format\":1,\"registry\":\"x\",\"serv"[..],
        b"\x00\xff not json",
        b"{\"format\":99}",
    ] {
        let file = dir.path().join(format!("c{}.json", garbage.len()));
        std::fs::write(&file, garbage).unwrap();
        let s = unique_service("corrupt");
        let faulty =
            FaultyRegistry::new(Arc::new(MemoryRegistry::new(cache_url(&file, &name, ""))));
        let fb = FailbackRegistry::new(faulty.clone()).unwrap();
        faulty.disconnect();
        let rec = Recorder::new();
        assert!(
            fb.subscribe(&consumer(&s, ""), rec.listener())
                .await
                .is_err(),
            "nothing usable was cached"
        );
        faulty.reconnect();
        fb.subscribe(&consumer(&s, ""), rec.listener())
            .await
            .unwrap();
        wait_until("a valid file again", DEADLINE, || {
            let ok = registry_failback::read_cache_file(&file).is_ok_and(|f| f.is_some());
            async move { ok }
        })
        .await;
        fb.destroy().await;
    }
}
