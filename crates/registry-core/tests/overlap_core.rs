//! Regression tests for the core pieces of the "last call wins" rule (CONTRACT §6): delivery
//! order and epochs, the manager and streams after destroy, and passwords in URLs.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::{Notification, NotifyListener, RegistryManager, Source, Url};

const DEADLINE: Duration = Duration::from_secs(10);

fn list(category: &str, revision: u64, host: u8) -> Notification {
    let u: Url = format!("dubbo://10.0.0.{host}:20880/S?category={category}")
        .parse()
        .unwrap();
    Notification::new("S", category, vec![u], revision, Source::Live)
}

/// A listener that blocks in its first call until released, and records every call.
struct Gate {
    seen: Mutex<Vec<(String, u64, String)>>,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
}

impl NotifyListener for Gate {
    fn notify(&self, n: Notification) {
        let host = n.urls[0].host().to_owned();
        self.seen
            .lock()
            .unwrap()
            .push((n.category.clone(), n.revision, host));
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
            if let Some(rx) = self.release.lock().unwrap().take() {
                let _ = rx.recv_timeout(DEADLINE);
            }
        }
    }
}

fn gate() -> (Arc<Gate>, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    (
        Arc::new(Gate {
            seen: Mutex::new(Vec::new()),
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(Some(release_rx)),
        }),
        entered_rx,
        release_tx,
    )
}

// Defect 8: coalescing kept a replaced list in its old queue position, so a newer
// `providers` list overtook an older `routers` change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_list_does_not_overtake_an_older_change() {
    let (g, entered, release) = gate();
    let d = Delivery::spawn_isolated(g.clone(), DeliveryOptions::default());
    d.push(list("configurators", 1, 9));
    tokio::task::spawn_blocking(move || entered.recv_timeout(DEADLINE).unwrap())
        .await
        .unwrap();
    // The listener is busy: these queue up.
    d.push(list("providers", 1, 1));
    d.push(list("routers", 1, 2));
    d.push(list("providers", 2, 3));
    release.send(()).unwrap();
    d.flush().await;
    let seen = g.seen.lock().unwrap().clone();
    let order: Vec<(&str, u64)> = seen[1..].iter().map(|(c, r, _)| (c.as_str(), *r)).collect();
    assert_eq!(order, vec![("routers", 1), ("providers", 2)]);
}

// Defect 8: rebase reset only the last delivered revision; a list still pending from the old
// source (revision 50) blocked the new source's lists (revision 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_lets_the_new_source_replace_pending_lists_of_the_old_one() {
    let (g, entered, release) = gate();
    let d = Delivery::spawn_isolated(g.clone(), DeliveryOptions::default());
    d.push(list("providers", 40, 1));
    tokio::task::spawn_blocking(move || entered.recv_timeout(DEADLINE).unwrap())
        .await
        .unwrap();
    d.push(list("providers", 50, 2));
    d.rebase();
    d.push(list("providers", 3, 3));
    release.send(()).unwrap();
    d.flush().await;
    let last = d.last_delivered_for("S", "providers").unwrap();
    assert_eq!(last.revision, 3);
    assert_eq!(last.urls[0].host(), "10.0.0.3");
    assert!(
        !g.seen.lock().unwrap().iter().any(|(_, r, _)| *r == 50),
        "the old source's pending list is never delivered after the new source's"
    );
}

// Defect 6: the manager kept returning a registry after it was destroyed directly.
#[tokio::test]
async fn the_manager_builds_a_new_registry_in_place_of_a_destroyed_one() {
    let m = RegistryManager::new();
    let a = m.get_registry("memory://manager-rebuild").await.unwrap();
    a.destroy().await;
    let b = m.get_registry("memory://manager-rebuild").await.unwrap();
    assert!(!b.is_destroyed());
    let p: Url = "dubbo://10.0.0.1:1/S".parse().unwrap();
    b.register(&p).await.unwrap();
    b.destroy().await;
}

// Defect 7: a notification stream never ended after destroy.
#[tokio::test]
async fn a_stream_ends_when_its_registry_is_destroyed() {
    let r = registry_core::get_registry("memory://stream-end")
        .await
        .unwrap();
    let q: Url = "consumer://10.0.0.2/com.foo.Ends".parse().unwrap();
    let mut stream = registry_core::subscribe_stream(r.clone(), q).await.unwrap();
    assert!(stream.next().await.is_some(), "the first list");
    r.destroy().await;
    let end = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("the stream ends after destroy");
    assert!(end.is_none());
}

// Defect 10: the parser cut at `#` first, so a password holding `#` failed with a port error.
#[test]
fn a_password_may_hold_a_hash() {
    let u: Url = "zookeeper://admin:p#ss@h1:2181?timeout=100"
        .parse()
        .unwrap();
    assert_eq!(u.username(), Some("admin"));
    assert_eq!(u.password(), Some("p#ss"));
    assert_eq!(u.host(), "h1");
    assert_eq!(u.port(), 2181);
    // A fragment after the authority is still dropped.
    let v: Url = "dubbo://h:1/path#frag".parse().unwrap();
    assert_eq!(v.path(), "path");
}

// Defect 10: InvalidUrl repeated the whole input, password included.
#[test]
fn a_password_never_shows_in_a_parse_error() {
    for bad in [
        "zookeeper://admin:s3cr3t@h1:notaport",
        "zookeeper://admin:s3/cr3t@h1:2181",
        "etcd://u:s3cr3t@h1:2379,h2:x",
        "zookeeper:/admin:s3cr3t@zk1:2181",
        "admin:s3cr3t@zk1:2181",
    ] {
        let e = bad.parse::<Url>().unwrap_err().to_string();
        assert!(!e.contains("s3cr3t") && !e.contains("cr3t"), "{e}");
        assert!(e.contains("***"), "says it was redacted: {e}");
    }
}

// A flush taken before the delivery was dropped (without close) used to wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_returns_when_the_delivery_is_dropped_without_close() {
    let (g, entered, release) = gate();
    let d = Delivery::spawn_isolated(g.clone(), DeliveryOptions::default());
    d.push(list("providers", 1, 1));
    tokio::task::spawn_blocking(move || entered.recv_timeout(DEADLINE).unwrap())
        .await
        .unwrap();
    d.push(list("routers", 2, 2));
    let flush = d.flush_handle();
    drop(d);
    release.send(()).unwrap();
    tokio::time::timeout(DEADLINE, flush)
        .await
        .expect("the flush returned after the drop");
}

// The keeper pushed after releasing its lock: a subscription's first lists (providers, then
// routers) could reach it after a later change of routers from another thread, so its first
// notification was routers. Subscriptions race a writer; every subscription must see its
// categories in order first, and revisions never go back across categories.
#[test]
fn keeper_lists_reach_each_subscription_in_the_order_of_the_changes() {
    use registry_core::keeper::{ListKeeper, Scope};
    type Seen = Arc<Mutex<Vec<(String, u64)>>>;
    struct Rec(Seen);
    impl NotifyListener for Rec {
        fn notify(&self, n: Notification) {
            self.0
                .lock()
                .unwrap()
                .push((n.category.clone(), n.revision));
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let keeper = ListKeeper::new("order");
    keeper.replace(&Scope::service("S"), Vec::new(), 0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (keeper, stop) = (keeper.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let u: Url = format!("dubbo://10.0.{}.{}:1/S?category=routers", i / 250, i % 250)
                    .parse()
                    .unwrap();
                keeper.put("S", "routers", u, 0);
                i += 1;
            }
        })
    };
    let consumer: Url = "consumer://10.9.9.9/S?category=providers,routers"
        .parse()
        .unwrap();
    let mut subs = Vec::new();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (keeper, consumer) = (keeper.clone(), consumer.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for _ in 0..200 {
                    let s: Seen = Arc::default();
                    let d = Arc::new(Delivery::inline(
                        Arc::new(Rec(s.clone())),
                        DeliveryOptions::default(),
                    ));
                    keeper.subscribe(&consumer, d);
                    seen.push(s);
                }
                seen
            })
        })
        .collect();
    for t in threads {
        subs.extend(t.join().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    for s in subs {
        let seen = s.lock().unwrap().clone();
        let firsts: Vec<&str> = seen.iter().take(2).map(|(c, _)| c.as_str()).collect();
        assert_eq!(firsts, ["providers", "routers"], "{seen:?}");
        assert!(
            seen.windows(2).all(|w| w[0].1 <= w[1].1),
            "revisions went back: {seen:?}"
        );
    }
}

// Two watches of one store covering the same entries (an `interface=*` one and a category
// one) feed the keeper at their own pace: a read taken before a change one of them already
// applied, or an event replayed after a newer one, must not take the list back.
#[test]
fn keeper_never_takes_a_list_back_to_an_older_store_revision() {
    use registry_core::keeper::{ListKeeper, Scope};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let keeper = ListKeeper::new("marks");
    let p: Url = "dubbo://10.0.0.1:1/S".parse().unwrap();
    let q: Url = "dubbo://10.0.0.2:1/S".parse().unwrap();
    let entry = |u: &Url| ("S".to_owned(), "providers".to_owned(), u.clone());
    keeper.replace(&Scope::Root, [entry(&p)], 100);
    // The root watch sees q put at 101; a category read taken at 100 arrives after it.
    keeper.put("S", "providers", q.clone(), 101);
    keeper.replace(&Scope::category("S", "providers"), [entry(&p)], 100);
    let c: Url = "consumer://10.0.0.9/S".parse().unwrap();
    assert_eq!(keeper.lookup(&c), Some(vec![p.clone(), q.clone()]));
    // p deleted at 105 through one watch; the other replays its put of 101.
    keeper.remove("S", "providers", &p, 105);
    keeper.put("S", "providers", p.clone(), 101);
    assert_eq!(keeper.lookup(&c), Some(vec![q.clone()]));
    // A newer read applies.
    keeper.replace(&Scope::category("S", "providers"), [entry(&p)], 106);
    assert_eq!(keeper.lookup(&c), Some(vec![p]));
}
