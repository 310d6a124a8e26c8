//! Service names that come and go under an `interface=*` subscription: when a service leaves
//! the root, its watches, tasks and lists go too, in the registry and on the server, so
//! memory does not grow with churned names.

mod common;

use std::time::Duration;

use common::*;
use registry_core::Registry;
use registry_core::testkit::{Recorder, consumer, provider, wait_until};
use registry_test_servers::{Kind, shared_address};
use registry_zookeeper::ZookeeperRegistry;

const DEADLINE: Duration = Duration::from_secs(30);

async fn registry(url: &str) -> ZookeeperRegistry {
    ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"))
}

/// The paths the server holds watches on for `session` (ZooKeeper's `wchc` command).
async fn server_watches(addr: &str, session: i64) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect for wchc");
    conn.write_all(b"wchc").await.expect("send wchc");
    let mut out = String::new();
    conn.read_to_string(&mut out).await.expect("read wchc");
    let id = format!("0x{:x}", session as u64);
    let mut paths = Vec::new();
    let mut ours = false;
    for line in out.lines() {
        if let Some(path) = line.strip_prefix('\t') {
            if ours {
                paths.push(path.trim().to_owned());
            }
        } else if !line.trim().is_empty() {
            ours = line.trim() == id;
        }
    }
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_that_leave_the_root_leave_no_watch_or_list_behind() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "services_that_leave_the_root") else {
        return;
    };
    let group = unique_group("churn");
    let r = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let w = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let raw = raw_client(&addr).await;
    let session = r.session_id().expect("a session");
    let rec = Recorder::new();
    r.subscribe(&consumer("*", "category=providers,routers"), rec.listener())
        .await
        .expect("subscribe to every service");
    // A service a plain subscription names keeps its watch whatever happens to the root.
    let kept = "com.churn.Kept";
    let kept_rec = Recorder::new();
    r.subscribe(&consumer(kept, ""), kept_rec.listener())
        .await
        .expect("subscribe to one service");
    let before = (r.watch_count(), server_watches(&addr, session).await);
    eprintln!("before: {} watches, on the server {:?}", before.0, before.1);
    // The root, and Kept's providers.
    assert_eq!(before.0, 2);

    const SERVICES: usize = 40;
    let mut peak = 0;
    for i in 0..SERVICES {
        let s = format!("com.churn.S{i}");
        let p = provider(&s, 1, "");
        w.register(&p).await.expect("register");
        rec.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
            .await;
        peak = peak.max(r.watch_count());
        // The service goes: its entry, then its nodes (as an operator's cleanup does).
        w.unregister(&p).await.expect("unregister");
        let providers = r.category_path(&s, "providers");
        let service = providers
            .strip_suffix("/providers")
            .expect("a category path")
            .to_owned();
        raw.delete(&providers, None)
            .await
            .expect("delete providers");
        if let Err(e) = raw.delete(&r.category_path(&s, "routers"), None).await {
            assert_eq!(e, registry_zookeeper::zookeeper_client::Error::NoNode);
        }
        raw.delete(&service, None)
            .await
            .expect("delete the service");
        rec.wait_for_entries(&s, "providers", &[], DEADLINE).await;
    }
    // Every service was seen with its entry, then empty.
    assert!(
        peak >= 3,
        "a service's watches were there while it was: {peak}"
    );
    wait_until(
        "the watches of the services gone to be dropped",
        DEADLINE,
        || async { r.watch_count() == before.0 },
    )
    .await;
    wait_until("the server to drop their watches", DEADLINE, || async {
        server_watches(&addr, session).await.len() == before.1.len()
    })
    .await;
    let stats = r.keeper_stats();
    let after = server_watches(&addr, session).await;
    eprintln!(
        "after {SERVICES} services came and went: {} watches (peak {peak}), on the server {after:?}, keeper {stats:?}",
        r.watch_count()
    );
    assert_eq!(after, before.1);
    assert_eq!(stats.entries, 0, "{stats:?}");
    // Nothing of the services gone (Kept never had an entry).
    assert_eq!(stats.topics, 0, "{stats:?}");
    assert_eq!(stats.told, 0, "{stats:?}");
    // The root and Kept's providers scope.
    assert_eq!(stats.loaded_scopes, 2, "{stats:?}");

    // The named service comes and goes: its watch stays for the subscription that names it,
    // and still sees what comes next.
    let k1 = provider(kept, 1, "");
    w.register(&k1).await.expect("register kept");
    rec.wait_for_entries(kept, "providers", std::slice::from_ref(&k1), DEADLINE)
        .await;
    w.unregister(&k1).await.expect("unregister kept");
    let providers = r.category_path(kept, "providers");
    raw.delete(&providers, None)
        .await
        .expect("delete providers");
    raw.delete(providers.strip_suffix("/providers").expect("path"), None)
        .await
        .expect("delete the service");
    rec.wait_for_entries(kept, "providers", &[], DEADLINE).await;
    kept_rec
        .wait_for_entries(kept, "providers", &[], DEADLINE)
        .await;
    // The wildcard lets go of the service on its next relisting of the root; the watch the
    // named subscription uses stays.
    wait_until(
        "the wildcard's watches of the service to be dropped",
        DEADLINE,
        || async { r.watch_count() == before.0 },
    )
    .await;
    let k2 = provider(kept, 2, "");
    w.register(&k2).await.expect("register kept again");
    kept_rec
        .wait_for_entries(kept, "providers", std::slice::from_ref(&k2), DEADLINE)
        .await;
    rec.wait_for_entries(kept, "providers", std::slice::from_ref(&k2), DEADLINE)
        .await;

    // A name that comes back is seen again.
    let s = "com.churn.S0";
    let p = provider(s, 2, "");
    w.register(&p).await.expect("register again");
    rec.wait_for_entries(s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    w.unregister(&p).await.expect("unregister");
    rec.wait_for_entries(s, "providers", &[], DEADLINE).await;
    r.destroy().await;
    w.destroy().await;
}
