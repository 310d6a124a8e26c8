//! Regression tests for the reliability layer under overlapping calls and outcome-unknown
//! faults (CONTRACT §6, "the last call wins"), one per defect; the randomized search for the
//! next one is tests/model.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use registry_core::testkit::{
    Fault, FaultyRegistry, Op, Recorder, consumer, provider, unique_service, wait_until,
};
use registry_core::{MemoryRegistry, Notification, NotifyListener, Registry, Url};
use registry_failback::{FailbackRegistry, Health};

const DEADLINE: Duration = Duration::from_secs(10);

type Fb = Arc<FailbackRegistry<Arc<FaultyRegistry>>>;

fn setup(params: &str) -> (Fb, Arc<FaultyRegistry>, Arc<dyn Registry>) {
    setup_with(params, None)
}

/// [`setup`], with the first retry's wait ceiling set to `retry_base` when given (a long one
/// keeps every retry task asleep until something else wakes it).
fn setup_with(
    params: &str,
    retry_base: Option<Duration>,
) -> (Fb, Arc<FaultyRegistry>, Arc<dyn Registry>) {
    let name = unique_service("overlap").replace('.', "-");
    let url: Url = format!("memory://{name}?file=false&{params}")
        .parse()
        .unwrap();
    let faulty = FaultyRegistry::new(Arc::new(MemoryRegistry::new(url.clone())));
    let mut config = registry_failback::FailbackConfig::from_url(&url).unwrap();
    if let Some(base) = retry_base {
        config.retry_base = base;
    }
    let fb = FailbackRegistry::with_config(faulty.clone(), config);
    (fb, faulty, Arc::new(MemoryRegistry::new(url)))
}

async fn held(inspect: &Arc<dyn Registry>, s: &str) -> Vec<String> {
    let mut got: Vec<String> = inspect
        .lookup(&consumer(s, ""))
        .await
        .expect("lookup on the inspecting registry")
        .iter()
        .map(Url::to_full_string)
        .collect();
    got.sort();
    got
}

async fn wait_held(inspect: &Arc<dyn Registry>, s: &str, want: &[&Url], what: &str) {
    let mut want: Vec<String> = want.iter().map(|u| u.to_full_string()).collect();
    want.sort();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = held(inspect, s).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: held {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// Defect 1: recovery snapshots the intents, then an unregister made while it runs was undone
// (the entry came back as a zombie).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregister_during_recovery_is_not_undone() {
    let (fb, faulty, inspect) = setup("retry.period=100");
    let s = unique_service("zombie");
    let a = provider(&s, 1, "");
    fb.register(&a).await.unwrap();
    // Recovery's register of A will take a while to reach the backend.
    faulty.inject(Op::Register, Fault::Delay(Duration::from_millis(300)), 1);
    faulty.expire_session().await;
    // Let recovery start and pick up A.
    wait_until("faulty.calls(Op::Register) >= 2", DEADLINE, || async {
        faulty.calls(Op::Register) >= 2
    })
    .await;
    fb.unregister(&a).await.unwrap();
    // Recovery's delayed register has reached the backend by now (or was never sent).
    wait_until("recovery's register returned", DEADLINE, || async {
        faulty.returned(Op::Register) >= 2
    })
    .await;
    wait_held(&inspect, &s, &[], "after unregister during recovery").await;
    // And it stays gone once everything settled.
    wait_until("fb.pending_retries() == 0", DEADLINE, || async {
        fb.pending_retries() == 0
    })
    .await;
    wait_held(&inspect, &s, &[], "after recovery finished").await;
    assert!(fb.status().registrations.is_empty());
}

// Defect 2: a register with check=true whose write was applied but whose reply was lost
// returned an error and left the entry for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_register_leaves_no_entry_even_if_the_write_was_applied() {
    let (fb, faulty, inspect) = setup("retry.period=100");
    let s = unique_service("lost-reply");
    let a = provider(&s, 1, "");
    faulty.inject(Op::Register, Fault::LoseReply, 1);
    assert!(
        fb.register(&a).await.is_err(),
        "check=true: the error is returned"
    );
    wait_held(&inspect, &s, &[], "the applied write is undone").await;
    wait_until("fb.pending_retries() == 0", DEADLINE, || async {
        fb.pending_retries() == 0
    })
    .await;
}

// Defect 2: an unregister with check=true that failed returned the error and retried
// nothing, so the entry stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unregister_is_carried_out_in_the_background() {
    let (fb, faulty, inspect) = setup("retry.period=100");
    let s = unique_service("unreg");
    let a = provider(&s, 1, "");
    fb.register(&a).await.unwrap();
    faulty.fail_next(Op::Unregister, 2);
    assert!(
        fb.unregister(&a).await.is_err(),
        "check=true: the error is returned"
    );
    assert_eq!(fb.status().unregistrations.len(), 1, "reported in status");
    wait_held(&inspect, &s, &[], "the unregister is retried").await;
    wait_until(
        "fb.status().unregistrations.is_empty()",
        DEADLINE,
        || async { fb.status().unregistrations.is_empty() },
    )
    .await;
}

// Defect 3: a subscription whose retries gave up stayed in the map, so subscribing again
// returned Ok and did nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_revives_a_subscription_that_gave_up() {
    let (fb, faulty, inspect) = setup("check=false&retry.period=20&retry.times=1");
    let s = unique_service("revive");
    let rec = Recorder::new();
    faulty.fail_next(Op::Subscribe, 2);
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    wait_until("a subscription gave up", DEADLINE, || async {
        fb.status()
            .subscriptions
            .iter()
            .any(|x| matches!(x.health, Health::GivenUp { .. }))
    })
    .await;
    let calls = faulty.calls(Op::Subscribe);
    fb.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .unwrap();
    assert!(
        faulty.calls(Op::Subscribe) > calls,
        "subscribing again tries the backend again"
    );
    let p = provider(&s, 1, "");
    inspect.register(&p).await.unwrap();
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    assert!(
        fb.status()
            .subscriptions
            .iter()
            .all(|x| x.health == Health::Ok)
    );
}

// Defect 4: an unsubscribe that ran while the raw subscribe was in flight leaked the raw
// subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_racing_the_raw_subscribe_leaks_nothing() {
    let (fb, faulty, _inspect) = setup("");
    let s = unique_service("leak");
    let q = consumer(&s, "");
    let rec = Recorder::new();
    let listener = rec.listener();
    faulty.inject(Op::Subscribe, Fault::Delay(Duration::from_millis(300)), 1);
    let subscribing = {
        let (fb, q, l) = (fb.clone(), q.clone(), listener.clone());
        tokio::spawn(async move { fb.subscribe(&q, l).await })
    };
    wait_until("faulty.calls(Op::Subscribe) >= 1", DEADLINE, || async {
        faulty.calls(Op::Subscribe) >= 1
    })
    .await;
    fb.unsubscribe(&q, &listener).await.unwrap();
    let _ = subscribing.await.unwrap();
    wait_until("faulty.subscription_count() == 0", DEADLINE, || async {
        faulty.subscription_count() == 0
    })
    .await;
    assert!(fb.status().subscriptions.is_empty());
}

// Defect 4: a subscribe racing destroy: nothing reaches the listener after destroy returned
// and no raw subscription is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_racing_destroy_leaves_nothing_behind() {
    let (fb, faulty, inspect) = setup("");
    let s = unique_service("race-destroy");
    let q = consumer(&s, "");
    let calls = Arc::new(AtomicU64::new(0));
    let listener: Arc<dyn NotifyListener> = {
        let calls = calls.clone();
        Arc::new(move |_n: Notification| {
            calls.fetch_add(1, Ordering::SeqCst);
        })
    };
    faulty.inject(Op::Subscribe, Fault::Delay(Duration::from_millis(200)), 1);
    let subscribing = {
        let (fb, q, l) = (fb.clone(), q.clone(), listener.clone());
        tokio::spawn(async move { fb.subscribe(&q, l).await })
    };
    wait_until("faulty.calls(Op::Subscribe) >= 1", DEADLINE, || async {
        faulty.calls(Op::Subscribe) >= 1
    })
    .await;
    fb.destroy().await;
    let after_destroy = calls.load(Ordering::SeqCst);
    let _ = subscribing.await.unwrap();
    // Changes after destroy reach nobody.
    for n in 1..=3 {
        inspect.register(&provider(&s, n, "")).await.unwrap();
    }
    let probe = Recorder::new();
    inspect.subscribe(&q, probe.listener()).await.unwrap();
    probe
        .wait_for_entries(
            &s,
            "providers",
            &[
                provider(&s, 1, ""),
                provider(&s, 2, ""),
                provider(&s, 3, ""),
            ],
            DEADLINE,
        )
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), after_destroy);
    assert_eq!(faulty.subscription_count(), 0);
}

// Defect 5: destroy aborted every retry first, so a pending unregister of a persistent URL
// was never attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_carries_out_a_pending_unregister() {
    // The retry would not come before destroy: destroy itself must carry it out.
    let (fb, faulty, inspect) = setup_with(
        "check=false&retry.period=60000",
        Some(Duration::from_secs(60)),
    );
    let s = unique_service("pending-unreg");
    let p = provider(&s, 1, "dynamic=false");
    fb.register(&p).await.unwrap();
    faulty.fail_next(Op::Unregister, 1);
    fb.unregister(&p).await.unwrap();
    assert_eq!(fb.status().unregistrations.len(), 1);
    fb.destroy().await;
    wait_held(
        &inspect,
        &s,
        &[],
        "the persistent entry is removed by destroy",
    )
    .await;
}

// Defect 12: a raw call that hangs blocked its key for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_call_is_bounded_by_the_timeout() {
    let (fb, faulty, inspect) = setup("check=false&timeout=200&retry.period=100");
    let s = unique_service("hang");
    let a = provider(&s, 1, "");
    faulty.inject(Op::Register, Fault::Hang, 1);
    tokio::time::timeout(Duration::from_secs(5), fb.register(&a))
        .await
        .expect("register returns although the backend call hangs")
        .unwrap();
    wait_held(&inspect, &s, &[&a], "registered by a retry").await;
    faulty.release_hung();
}

// Defect 12: unsubscribe waited without limit for a listener that blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_does_not_wait_for_ever_for_a_stuck_listener() {
    let (fb, _faulty, inspect) = setup("timeout=200");
    let s = unique_service("stuck");
    let q = consumer(&s, "");
    let entered = Arc::new(AtomicU64::new(0));
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    let listener: Arc<dyn NotifyListener> = {
        let entered = entered.clone();
        Arc::new(move |n: Notification| {
            if !n.is_empty() {
                entered.fetch_add(1, Ordering::SeqCst);
                // Stuck until the test lets it go (at the latest after the deadline).
                let _ = release_rx.lock().unwrap().recv_timeout(DEADLINE);
            }
        })
    };
    fb.subscribe(&q, listener.clone()).await.unwrap();
    inspect.register(&provider(&s, 1, "")).await.unwrap();
    wait_until("the listener is stuck", DEADLINE, || async {
        entered.load(Ordering::SeqCst) == 1
    })
    .await;
    // Returns while the listener call is still stuck (it is released only afterwards).
    tokio::time::timeout(DEADLINE / 2, fb.unsubscribe(&q, &listener))
        .await
        .expect("unsubscribe returns although a listener call is stuck")
        .unwrap();
    release_tx.send(()).unwrap();
}

// Review: a second unsubscribe of the same pair returned while the first was still closing,
// so the listener could be called after that second call returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_unsubscribe_returns_only_when_the_listener_is_closed() {
    let (fb, _faulty, inspect) = setup("");
    let s = unique_service("double-unsub");
    let q = consumer(&s, "");
    let entered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    let listener: Arc<dyn NotifyListener> = {
        let (entered, done) = (entered.clone(), done.clone());
        Arc::new(move |n: Notification| {
            if !n.is_empty() {
                entered.fetch_add(1, Ordering::SeqCst);
                let _ = release_rx.lock().unwrap().recv_timeout(DEADLINE);
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    fb.subscribe(&q, listener.clone()).await.unwrap();
    inspect.register(&provider(&s, 1, "")).await.unwrap();
    wait_until("the listener is busy", DEADLINE, || async {
        entered.load(Ordering::SeqCst) == 1
    })
    .await;
    let first = {
        let (fb, q, l) = (fb.clone(), q.clone(), listener.clone());
        tokio::spawn(async move { fb.unsubscribe(&q, &l).await })
    };
    wait_until(
        "the first unsubscribe took the subscription",
        DEADLINE,
        || async { fb.status().subscriptions.is_empty() },
    )
    .await;
    let second = {
        let (fb, q, l) = (fb.clone(), q.clone(), listener.clone());
        tokio::spawn(async move {
            fb.unsubscribe(&q, &l).await.unwrap();
            done.load(Ordering::SeqCst)
        })
    };
    release_tx.send(()).unwrap();
    assert_eq!(
        second.await.unwrap(),
        1,
        "the second unsubscribe returned before the running listener call ended"
    );
    first.await.unwrap().unwrap();
}

// Review: a write whose request was sent before it failed can land later; the layer confirms
// the intent until that could no longer happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_register_that_lands_late_is_undone() {
    let (fb, faulty, inspect) = setup("timeout=300&retry.period=100");
    let s = unique_service("late");
    let a = provider(&s, 1, "");
    faulty.inject(
        Op::Register,
        Fault::ApplyLate(Duration::from_millis(250)),
        1,
    );
    assert!(fb.register(&a).await.is_err());
    let failed_at = faulty.last_fault_at();
    // The late write lands (the wrapper notes when; the entry may be undone before a poll of
    // the store would see it) ...
    wait_until("the late write landed", DEADLINE, || async {
        faulty.last_fault_at() != failed_at
    })
    .await;
    // ... and is undone.
    wait_held(&inspect, &s, &[], "the late write is undone").await;
    wait_until("no task left", DEADLINE, || async { fb.retry_tasks() == 0 }).await;
}

// Defect 11: lookup answered from the lists of a subscription whose retries gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_does_not_serve_the_lists_of_a_subscription_that_gave_up() {
    let (fb, faulty, inspect) = setup("check=false&retry.period=20&retry.times=1");
    let s = unique_service("stale-lookup");
    let q = consumer(&s, "");
    let rec = Recorder::new();
    fb.subscribe(&q, rec.listener()).await.unwrap();
    faulty.fail_next(Op::Subscribe, 10);
    faulty.expire_session().await;
    wait_until("a subscription gave up", DEADLINE, || async {
        fb.status()
            .subscriptions
            .iter()
            .any(|x| matches!(x.health, Health::GivenUp { .. }))
    })
    .await;
    let p = provider(&s, 1, "");
    inspect.register(&p).await.unwrap();
    faulty.clear_faults(Op::Subscribe);
    assert_eq!(fb.lookup(&q).await.unwrap(), vec![p]);
}

// Defect 13: a reconnect woke every pending retry at the same instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_does_not_wake_every_retry_in_step() {
    // Every retry task sleeps long, until the reconnect wakes it.
    let (fb, faulty, inspect) = setup_with(
        "check=false&retry.period=60000",
        Some(Duration::from_secs(60)),
    );
    let s = unique_service("stampede");
    faulty.disconnect();
    let urls: Vec<Url> = (1..=40).map(|n| provider(&s, n, "")).collect();
    for u in &urls {
        fb.register(u).await.unwrap();
    }
    wait_until("fb.pending_retries() == 40", DEADLINE, || async {
        fb.pending_retries() == 40
    })
    .await;
    let before = faulty.call_times(Op::Register).len();
    faulty.reconnect();
    let refs: Vec<&Url> = urls.iter().collect();
    wait_held(&inspect, &s, &refs, "every retry ran after the reconnect").await;
    let times = faulty.call_times(Op::Register);
    let after = &times[before..];
    let spread = *after.iter().max().unwrap() - *after.iter().min().unwrap();
    assert!(
        spread >= Duration::from_millis(200),
        "40 retries woken by a reconnect ran within {spread:?} of each other"
    );
}
