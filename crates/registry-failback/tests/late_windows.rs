//! What the confirmation of unknown-outcome writes (CONTRACT §6.1) costs and bounds, on a
//! paused tokio clock over the memory backend and the kit's fault wrapper: which failures
//! open a late window, how many calls an outage costs after it, `retry.times` with
//! confirmations, how long `destroy` waits, backoff while the application keeps calling, and
//! how soon a key that fails again while its task waits for a far confirmation pass is
//! corrected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use registry_core::testkit::{Fault, FaultyRegistry, Op, Recorder, wait_until};
use registry_core::{MemoryRegistry, Registry, Url};
use registry_failback::{FailbackConfig, FailbackRegistry, Health};
use tokio::time::Instant;

type Fb = Arc<FailbackRegistry<Arc<FaultyRegistry>>>;

static STORE: AtomicU64 = AtomicU64::new(0);

/// A memory store of its own (`timeout` 5 s unless `params` says otherwise), the fault
/// wrapper over it, the layer over that, and another registry on the store to inspect it.
fn setup(params: &str) -> (Fb, Arc<FaultyRegistry>, MemoryRegistry) {
    let n = STORE.fetch_add(1, Ordering::Relaxed);
    let url: Url = format!(
        "memory://late-windows-{}-{n}?file=false&{params}",
        std::process::id()
    )
    .parse()
    .unwrap();
    let faulty = FaultyRegistry::new(Arc::new(MemoryRegistry::new(url.clone())));
    let mut config = FailbackConfig::from_url(&url).unwrap();
    config.jitter_seed = Some(n);
    let fb = FailbackRegistry::with_config(faulty.clone(), config);
    (fb, faulty, MemoryRegistry::new(url))
}

const SERVICE: &str = "org.late.Windows";

fn provider(i: usize) -> Url {
    format!(
        "dubbo://10.2.{}.{}:20880/{SERVICE}?interface={SERVICE}&side=provider",
        i / 250,
        i % 250 + 1
    )
    .parse()
    .unwrap()
}

fn consumer() -> Url {
    format!("consumer://10.2.255.1/{SERVICE}?interface={SERVICE}&category=providers")
        .parse()
        .unwrap()
}

async fn held(inspect: &MemoryRegistry) -> usize {
    inspect.lookup(&consumer()).await.unwrap().len()
}

// An outage during which every call fails before it is sent (not connected) opens no late
// window: after the reconnect each URL costs one register, not a dozen confirmations over
// the next 30 s.
#[tokio::test(start_paused = true)]
async fn an_outage_of_unsent_calls_costs_one_call_per_url_after_it() {
    const URLS: usize = 200;
    let (fb, faulty, inspect) = setup("check=false&timeout=5000");
    faulty.disconnect();
    for i in 0..URLS {
        fb.register(&provider(i)).await.unwrap();
    }
    assert_eq!(fb.pending_retries(), URLS);
    // A minute of outage: every retry fails at once.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let before = faulty.calls(Op::Register);
    faulty.reconnect();
    let start = Instant::now();
    wait_until(
        "every URL in the store",
        Duration::from_secs(10),
        || async { held(&inspect).await == URLS },
    )
    .await;
    wait_until("no retry task left", Duration::from_secs(120), || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    let after = faulty.calls(Op::Register) - before;
    eprintln!(
        "{URLS} URLs after a 60 s outage of unsent calls: {after} register calls after the reconnect ({:.2} per URL), tasks gone {:?} after it",
        after as f64 / URLS as f64,
        start.elapsed()
    );
    assert!(
        after <= 2 * URLS as u64,
        "{after} register calls after the reconnect for {URLS} URLs"
    );
    fb.destroy().await;
}

// Confirmation passes run at most `recovery.concurrency` at a time, and a reconnect does not
// send every confirming task to the backend at once.
#[tokio::test(start_paused = true)]
async fn confirmation_passes_are_bounded_and_a_reconnect_does_not_hurry_them() {
    const URLS: usize = 100;
    let (fb, faulty, inspect) =
        setup("check=false&timeout=5000&retry.period=5000&recovery.concurrency=4");
    // Each first register reaches the store but its reply is lost: a window opens.
    faulty.inject(Op::Register, Fault::LoseReply, URLS as u32);
    for i in 0..URLS {
        fb.register(&provider(i)).await.unwrap();
    }
    wait_until("every task confirming", Duration::from_secs(5), || {
        let n = fb.pending_retries();
        async move { n == 0 }
    })
    .await;
    // Faults are queued per operation: a retry may take one meant for a later call, so a few
    // keys may have had no lost reply.
    let confirming = fb.retry_tasks();
    assert!(confirming >= URLS - 10, "{confirming} confirming tasks");
    let status = fb.status();
    assert_eq!(status.confirming, confirming);
    assert!(status.is_healthy(), "confirming intents are in place");
    // Slow calls: 100 tasks with a pass every few seconds would overlap by the dozen.
    faulty.inject(Op::Register, Fault::Delay(Duration::from_secs(1)), 100_000);
    let mut peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        let in_flight = faulty.calls(Op::Register) - faulty.returned(Op::Register);
        peak = peak.max(in_flight);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(peak >= 1, "confirmation passes ran");
    assert!(peak <= 4, "{peak} confirmation passes at once");
    // Quick calls again; a reconnect in the middle of the windows hurries no pass.
    faulty.clear_all_faults();
    faulty.inject(
        Op::Register,
        Fault::Delay(Duration::from_millis(10)),
        100_000,
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = faulty.calls(Op::Register);
    faulty.disconnect();
    faulty.reconnect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let hurried = faulty.calls(Op::Register) - before;
    // Passes are 2.5 to 5 s apart now: about 15 fall due in 600 ms; all 100 would run if
    // the reconnect woke them.
    eprintln!("register calls within 600 ms of a reconnect, 100 confirming tasks: {hurried}");
    assert!(
        hurried < URLS as u64 / 2,
        "{hurried} register calls within 600 ms of a reconnect"
    );
    assert_eq!(held(&inspect).await, URLS);
    faulty.clear_all_faults();
    fb.destroy().await;
}

// A subscription opens no late window: a subscribe or unsubscribe whose reply was lost is
// retried once and is done (the backend's subscription is the listener's own, so a late one
// cannot undo a later call; a late one after an unsubscribe reaches a closed listener).
#[tokio::test(start_paused = true)]
async fn a_subscription_whose_reply_was_lost_is_not_confirmed() {
    let (fb, faulty, inspect) = setup("check=false&timeout=5000");
    inspect.register(&provider(0)).await.unwrap();
    faulty.inject(Op::Subscribe, Fault::LoseReply, 1);
    let rec = Recorder::new();
    fb.subscribe(&consumer(), rec.listener()).await.unwrap();
    rec.wait_for_entries(SERVICE, "providers", &[provider(0)], Duration::from_secs(5))
        .await;
    wait_until("no retry task left", Duration::from_secs(5), || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    assert_eq!(faulty.calls(Op::Subscribe), 2, "the call and one retry");
    faulty.inject(Op::Unsubscribe, Fault::LoseReply, 1);
    fb.unsubscribe(&consumer(), &rec.listener()).await.unwrap();
    wait_until("no retry task left", Duration::from_secs(5), || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(faulty.calls(Op::Subscribe), 2);
    assert_eq!(faulty.calls(Op::Unsubscribe), 2, "the call and one retry");
    assert_eq!(faulty.subscription_count(), 0);
    fb.destroy().await;
}

// With a finite `retry.times`, a confirmation pass that fails starts the budget again: the
// intent was in place, so the retries it needs now are new ones.
#[tokio::test(start_paused = true)]
async fn a_failed_confirmation_starts_the_retry_budget_again() {
    let (fb, faulty, inspect) = setup("check=false&timeout=5000&retry.times=3");
    let p = provider(0);
    // The call's reply is lost (a window opens), two retries fail, the third works, then
    // the first confirmation pass fails.
    faulty.inject(Op::Register, Fault::LoseReply, 1);
    faulty.inject(Op::Register, Fault::Fail, 2);
    faulty.inject(Op::Register, Fault::Delay(Duration::from_millis(1)), 1);
    faulty.inject(Op::Register, Fault::Fail, 1);
    fb.register(&p).await.unwrap();
    wait_until(
        "the confirmation pass failed",
        Duration::from_secs(10),
        || {
            let n = faulty.calls(Op::Register);
            async move { n >= 5 }
        },
    )
    .await;
    wait_until("the task ends", Duration::from_secs(60), || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    let status = fb.status();
    assert_eq!(
        status.registrations[0].health,
        Health::Ok,
        "not given up: {status:?}"
    );
    assert_eq!(held(&inspect).await, 1);
    fb.destroy().await;
}

// `destroy` waits for late writes of pending unregistrations at most one `timeout` in all,
// not one per batch of `recovery.concurrency` URLs.
#[tokio::test(start_paused = true)]
async fn destroy_waits_at_most_one_timeout_for_late_writes() {
    const URLS: usize = 100;
    let (fb, faulty, inspect) = setup("check=false&timeout=5000");
    for i in 0..URLS {
        fb.register(&provider(i)).await.unwrap();
    }
    // Each unregister reaches the store but its reply is lost: a window opens per URL.
    faulty.inject(Op::Unregister, Fault::LoseReply, URLS as u32);
    for i in 0..URLS {
        fb.unregister(&provider(i)).await.unwrap();
    }
    wait_until("every task confirming", Duration::from_secs(5), || {
        let n = fb.pending_retries();
        async move { n == 0 }
    })
    .await;
    // Faults are queued per operation: a retry may take one meant for a later call.
    assert!(fb.retry_tasks() >= URLS - 10, "{} tasks", fb.retry_tasks());
    let start = Instant::now();
    fb.destroy().await;
    let took = start.elapsed();
    eprintln!("destroy with {URLS} unregistrations in their late window: {took:?}");
    assert!(
        took <= Duration::from_millis(5000 + 500),
        "destroy took {took:?}"
    );
    assert_eq!(held(&inspect).await, 0);
}

// `destroy` with the backend down does not wait for late writes (its calls fail anyway).
#[tokio::test(start_paused = true)]
async fn destroy_with_the_backend_down_does_not_wait() {
    let (fb, faulty, _inspect) = setup("check=false&timeout=5000");
    fb.register(&provider(0)).await.unwrap();
    faulty.inject(Op::Unregister, Fault::LoseReply, 1);
    fb.unregister(&provider(0)).await.unwrap();
    wait_until("the task confirming", Duration::from_secs(5), || {
        let n = fb.pending_retries();
        async move { n == 0 }
    })
    .await;
    faulty.disconnect();
    let start = Instant::now();
    fb.destroy().await;
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "destroy took {:?}",
        start.elapsed()
    );
}

// An application that keeps calling during an outage does not make the key's task retry at
// the shortest wait: it keeps its backoff.
#[tokio::test(start_paused = true)]
async fn application_calls_during_an_outage_keep_the_backoff() {
    let (fb, faulty, _inspect) = setup("check=false&timeout=5000&retry.period=5000");
    let p = provider(0);
    faulty.disconnect();
    let start = Instant::now();
    let mut app_calls = 0u64;
    while start.elapsed() < Duration::from_secs(20) {
        fb.register(&p).await.unwrap();
        app_calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retries = faulty.calls(Op::Register) - app_calls;
    eprintln!("20 s outage, the application calling every 100 ms: {retries} retries");
    // Backoff 0.1, 0.2, 0.4 ... 5 s (full jitter): about a dozen in 20 s, not 200.
    assert!(retries <= 30, "{retries} retries in 20 s");
    faulty.reconnect();
    fb.destroy().await;
}

// A key that fails again while its task waits for a confirmation pass far off
// (`retry.period` 60 s) is corrected at once: a late register that lands after the
// application's unregister is undone within a few hundred milliseconds.
#[tokio::test(start_paused = true)]
async fn a_new_failure_while_confirming_is_corrected_at_once() {
    let (fb, faulty, inspect) = setup("check=false&timeout=30000&retry.period=60000");
    let p = provider(0);
    // A lost reply: the task confirms the intent for 180 s, at growing waits.
    faulty.inject(Op::Register, Fault::LoseReply, 1);
    fb.register(&p).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fb.pending_retries(), 0);
    assert_eq!(
        fb.retry_tasks(),
        1,
        "confirming, the next pass tens of seconds off"
    );
    // The application registers again and the write is applied 100 ms late, after its
    // unregister.
    faulty.inject(
        Op::Register,
        Fault::ApplyLate(Duration::from_millis(100)),
        1,
    );
    fb.register(&p).await.unwrap();
    fb.unregister(&p).await.unwrap();
    // Watch the store every 5 ms: the late register lands, then is undone.
    let watch = Instant::now();
    let mut landed = None;
    let mut undone = None;
    while watch.elapsed() < Duration::from_secs(120) {
        let n = held(&inspect).await;
        if n == 1 && landed.is_none() {
            landed = Some(Instant::now());
        }
        if n == 0 && landed.is_some() {
            undone = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let landed = landed.expect("the late register landed");
    let took = undone.map(|u| u - landed);
    eprintln!("a late register undone {took:?} after it landed");
    assert!(
        took.is_some_and(|t| t <= Duration::from_millis(500)),
        "undone after {took:?} (retry.period is 60 s)"
    );
    // And it stays undone.
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(held(&inspect).await, 0);
    fb.destroy().await;
}

// Every confirmation pass is counted in `registry_confirmations_total`; a window of 30 s (the
// default `timeout`) costs about a dozen.
#[tokio::test(start_paused = true)]
async fn confirmation_passes_are_counted() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (fb, faulty, inspect) = setup("check=false&timeout=5000&retry.period=5000");
    faulty.inject(Op::Register, Fault::LoseReply, 1);
    fb.register(&provider(0)).await.unwrap();
    wait_until("the task ends", Duration::from_secs(60), || {
        let n = fb.retry_tasks();
        async move { n == 0 }
    })
    .await;
    let series = format!(
        "{}{{scheme=\"memory\",operation=\"register\"}} ",
        registry_failback::metrics::CONFIRMATIONS
    );
    let text = recorder.handle().render();
    let counted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap();
    // The call whose reply was lost, the retry that put the intent in place, then the passes.
    let calls = faulty.calls(Op::Register);
    eprintln!("one lost reply: {calls} register calls, {counted} confirmation passes");
    assert_eq!(counted, calls - 2);
    assert!(
        (8..=20).contains(&counted),
        "{counted} passes in a 30 s window"
    );
    assert_eq!(held(&inspect).await, 1);
    fb.destroy().await;
}
