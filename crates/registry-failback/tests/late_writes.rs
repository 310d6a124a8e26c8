//! A randomized test of how soon the reliability layer converges after writes whose outcome
//! is unknown (CONTRACT §6.1): the application registers and unregisters a few URLs while
//! calls fail, lose their replies, are applied late (after a later opposite call, as a
//! request buffered by a frozen etcd leader is), are delayed, and the connection drops. Tokio's
//! clock is paused, so the backend's real settings are used (`timeout` 5 s, so a late write
//! may land up to 30 s after its call failed; `retry.period` 5 s) and a case takes
//! milliseconds.
//!
//! The property: from [`BOUND`] after the last fault took effect (the wrapper's
//! `last_fault_at`: a failed call returned, a late write landed) and after the application's
//! last call, the backend holds every URL's last call's intent, and keeps holding it. A late
//! write that lands after a later opposite call is undone within `retry.period` (plus a
//! moment), not at the end of the 30 s during which it could land; a key that fails again
//! while its task waits for a confirmation pass is retried at once.
//!
//! Every case runs from a seed: `LATE_CASES` (default 300) cases from `LATE_SEED` (default
//! 1). The layer's jitter is seeded from the case's seed too (each retry task draws from a
//! generator of its own, so tasks woken at the same instant may run in any order), and a case
//! runs on one thread with a paused clock: a failing (or panicking) case prints its seed and
//! its plan, and `LATE_SEED=<seed> LATE_CASES=1` reruns the same course. The bound here
//! cannot tell whether a key's new failure wakes its task; `late_windows.rs` tests that.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use registry_core::testkit::{Fault, FaultyRegistry, Op};
use registry_core::{MemoryRegistry, Registry, Url};
use registry_failback::{FailbackConfig, FailbackRegistry};
use tokio::time::Instant;

const SERVICE: &str = "org.late.Svc";
/// `retry.period`: the longest wait between two retries, and between two confirmations.
const PERIOD: Duration = Duration::from_secs(5);
/// How soon after the last fault the backend must hold the intent: one `retry.period`, a
/// short wait after a wake-up, and a moment.
const BOUND: Duration = Duration::from_millis(5000 + 1000);
/// How long the backend is watched after the application's last call (a late write lands at
/// most 20 s after its call, plus retries meanwhile).
const WATCH: Duration = Duration::from_secs(90);

static CASE: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
enum Step {
    /// Queue `fault` for the next call of `op` (the application's or a retry's), then call.
    Call {
        register: bool,
        fault: Option<(Op, Fault)>,
    },
    /// The connection drops for this long (operations fail, `Disconnected`, `Reconnected`).
    Outage(Duration),
    Pause(Duration),
}

/// URL `slot`: dynamic or persistent, `check` true or false, as the seed says.
fn provider(slot: usize, check: bool, dynamic: bool) -> Url {
    format!(
        "dubbo://10.1.0.{}:20880/{SERVICE}?interface={SERVICE}&side=provider&dynamic={dynamic}&check={check}",
        slot + 1
    )
    .parse()
    .unwrap()
}

fn query() -> Url {
    format!("consumer://10.1.0.250/{SERVICE}?interface={SERVICE}&category=providers")
        .parse()
        .unwrap()
}

struct Plan {
    urls: Vec<Url>,
    /// One sequence of steps per task; the tasks run at once.
    tasks: Vec<Vec<Step>>,
}

fn plan(seed: u64) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let n_urls = rng.random_range(1..=3);
    let urls: Vec<Url> = (0..n_urls)
        .map(|i| provider(i, rng.random_bool(0.5), rng.random_bool(0.7)))
        .collect();
    // One task per URL, so each URL's last call is well defined; faults are queued per
    // operation, so a fault meant for one call may hit another URL or a retry.
    let tasks = (0..n_urls)
        .map(|_| {
            (0..rng.random_range(2..10))
                .map(|_| match rng.random_range(0..10) {
                    0..=6 => {
                        let register = rng.random_bool(0.5);
                        let op = if register {
                            Op::Register
                        } else {
                            Op::Unregister
                        };
                        // No hangs: a hung call times out after 15 s, a fault the wrapper
                        // cannot date (the model test has them). Delays stay short, so a
                        // delayed retry still lands inside the bound.
                        let fault = match rng.random_range(0..6) {
                            0 => None,
                            1 => Some(Fault::Fail),
                            2 => Some(Fault::LoseReply),
                            3 | 4 => Some(Fault::ApplyLate(Duration::from_millis(
                                rng.random_range(0..20_000),
                            ))),
                            _ => Some(Fault::Delay(Duration::from_millis(
                                rng.random_range(1..300),
                            ))),
                        };
                        Step::Call {
                            register,
                            fault: fault.map(|f| (op, f)),
                        }
                    }
                    7 => Step::Outage(Duration::from_millis(rng.random_range(10..8000))),
                    _ => Step::Pause(Duration::from_millis(rng.random_range(0..12_000))),
                })
                .collect()
        })
        .collect();
    Plan { urls, tasks }
}

type Fb = Arc<FailbackRegistry<Arc<FaultyRegistry>>>;

/// Runs the steps of one task; returns the last call's intent for its URL (`None`: absent)
/// and when that call returned.
async fn run_task(
    fb: Fb,
    faulty: Arc<FaultyRegistry>,
    url: Url,
    steps: Vec<Step>,
) -> (Option<String>, Instant) {
    let mut last = None;
    let mut ended = Instant::now();
    for step in steps {
        match step {
            Step::Call { register, fault } => {
                if let Some((op, f)) = fault {
                    faulty.inject(op, f, 1);
                }
                let r = if register {
                    fb.register(&url).await
                } else {
                    fb.unregister(&url).await
                };
                // A register that returned Ok ends present; an error (check=true) or an
                // unregister ends absent.
                last = (register && r.is_ok()).then(|| url.to_full_string());
                ended = Instant::now();
            }
            Step::Outage(d) => {
                faulty.disconnect();
                tokio::time::sleep(d).await;
                faulty.reconnect();
            }
            Step::Pause(d) => tokio::time::sleep(d).await,
        }
    }
    (last, ended)
}

/// Runs one case on a paused clock; `Err` says what broke.
async fn run_case(seed: u64) -> Result<(), String> {
    let n = CASE.fetch_add(1, Ordering::Relaxed);
    let store: Url = format!(
        "memory://late-{}-{n}-{seed}?file=false&timeout=5000&retry.period={}",
        std::process::id(),
        PERIOD.as_millis()
    )
    .parse()
    .unwrap();
    let faulty = FaultyRegistry::new(Arc::new(MemoryRegistry::new(store.clone())));
    let mut config = FailbackConfig::from_url(&store).map_err(|e| e.to_string())?;
    // The layer's jitter comes from the seed too, so a case runs the same every time.
    config.jitter_seed = Some(seed);
    let fb = FailbackRegistry::with_config(faulty.clone(), config);
    let inspect = MemoryRegistry::new(store);
    let plan = plan(seed);
    let runs: Vec<_> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, steps)| {
            tokio::spawn(run_task(
                fb.clone(),
                faulty.clone(),
                plan.urls[i].clone(),
                steps.clone(),
            ))
        })
        .collect();
    let mut want: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut calls_end = Instant::now();
    for (i, r) in runs.into_iter().enumerate() {
        let (last, ended) = r.await.map_err(|e| format!("task: {e}"))?;
        want.insert(plan.urls[i].to_full_string(), last);
        calls_end = calls_end.max(ended);
    }
    // No more faults are queued; hung calls go on (a late write); the connection is back.
    faulty.clear_all_faults();
    if !faulty.is_available() {
        faulty.reconnect();
    }
    let start = Instant::now();
    let mut checked = 0;
    while start.elapsed() < WATCH {
        let quiet_since = faulty
            .last_fault_at()
            .map_or(calls_end, |f| f.max(calls_end));
        if quiet_since.elapsed() >= BOUND {
            let held: Vec<String> = inspect
                .lookup(&query())
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(Url::to_full_string)
                .collect();
            let want_held: Vec<&String> = want.values().flatten().collect();
            let mut held_sorted: Vec<&String> = held.iter().collect();
            held_sorted.sort();
            if held_sorted != want_held {
                return Err(format!(
                    "{:.1?} after the last fault ({:.1?} after the last call) the backend holds {held:?}, the last calls want {want_held:?}\n  status: {:#?}",
                    quiet_since.elapsed(),
                    calls_end.elapsed(),
                    fb.status()
                ));
            }
            checked += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if checked == 0 {
        return Err(format!(
            "never quiet for {BOUND:?} in {WATCH:?}: the last fault took effect {:?} ago",
            faulty.last_fault_at().map(|f| f.elapsed())
        ));
    }
    fb.destroy().await;
    Ok(())
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

#[test]
fn unknown_outcome_writes_converge_within_a_retry_period_of_the_last_fault() {
    let first = env_u64("LATE_SEED").unwrap_or(1);
    let cases = env_u64("LATE_CASES").unwrap_or(300);
    for seed in first..first + cases {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(run_case(seed))));
        let outcome = match outcome {
            Ok(r) => r,
            Err(panic) => Err(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
        if let Err(why) = outcome {
            let p = plan(seed);
            panic!(
                "late-write case failed: seed {seed} (reproduce: LATE_SEED={seed} LATE_CASES=1)\n{why}\nplan:\n  urls: {:?}\n  tasks: {:#?}",
                p.urls.iter().map(Url::to_full_string).collect::<Vec<_>>(),
                p.tasks
            );
        }
    }
    println!("late writes: {cases} cases from seed {first} passed");
}
