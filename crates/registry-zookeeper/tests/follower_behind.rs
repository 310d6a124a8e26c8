//! Fault 6 of the cluster matrix, ZooKeeper only: a client that reconnects to a follower that
//! is behind never delivers an older list.
//!
//! ZooKeeper lets a session reconnect to any server whose data is not older than the last
//! reply the session had; watch events do not count. Here the subscriber's list runs ahead
//! through events from one follower, then its connection moves to another follower that was
//! cut off from its peers while thousands of entries were created: when the cut ends, that
//! follower takes the session back at once, with the backlog still being applied. Its own
//! ensemble (not the shared one of `cluster.rs`): ticks of 2 s give 10 s (`syncLimit`) before
//! the leader drops the cut-off follower, room for the backlog.

mod common;

use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::dubbo_provider;
use registry_core::testkit::{Recorder, consumer, unique_service};
use registry_core::{Registry, RegistryEvent, encode};
use registry_test_servers::{Cluster, ClusterOptions, Kind, Proxy};
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;

const DEADLINE: Duration = Duration::from_secs(60);
/// Entries created while the follower is cut off.
const BACKLOG: u32 = 4000;

fn count(rec: &Recorder, service: &str) -> usize {
    rec.latest_entries(service, "providers")
        .map(|v| v.iter().filter(|u| !u.is_empty_marker()).count())
        .unwrap_or(0)
}

async fn wait_count(rec: &Recorder, service: &str, want: usize, what: &str) {
    let t = Instant::now();
    while count(rec, service) != want {
        assert!(
            t.elapsed() < DEADLINE,
            "{what}: the subscription holds {} entries after {DEADLINE:?}, not {want}",
            count(rec, service)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_to_a_follower_behind_never_delivers_an_older_list() {
    init_tracing();
    let started = tokio::task::block_in_place(|| {
        Cluster::start(
            Kind::Zookeeper,
            ClusterOptions {
                tick_ms: 2000,
                ..ClusterOptions::default()
            },
        )
    });
    let mut c = match started {
        Ok(c) => c,
        Err(e) if !registry_test_servers::required() => {
            eprintln!("follower_behind: skipped, no ZooKeeper ensemble: {e}");
            return;
        }
        Err(e) => panic!("cannot start a ZooKeeper ensemble: {e}"),
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(DEADLINE)).expect("a leader");
    let (ahead, behind) = ((leader + 1) % 3, (leader + 2) % 3);
    let proxy_ahead = Proxy::start(&c.address(ahead)).await.expect("proxy");
    let proxy_behind = Proxy::start(&c.address(behind)).await.expect("proxy");

    // The subscriber starts on the follower `ahead` (the other one is refused for now).
    proxy_behind.cut();
    let b = ZookeeperRegistry::new(
        format!(
            "zookeeper://{},{}?session=30000&timeout=8000",
            proxy_ahead.address(),
            proxy_behind.address()
        )
        .parse()
        .expect("url"),
    )
    .await
    .expect("subscriber registry");
    let mut events = b.events();
    let service = unique_service("behind");
    let rec = Recorder::new();
    b.subscribe(&consumer(&service, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for(
        "the first list",
        DEADLINE,
        |n: &[registry_core::Notification]| n.iter().any(|n| n.category == "providers"),
    )
    .await;

    // The writer talks to the leader and `ahead` only.
    let writer = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(30))
        .connect(&format!("{},{}", c.address(leader), c.address(ahead)))
        .await
        .expect("writer");
    let parent = b.category_path(&service, "providers");
    writer
        .mkdir(
            &parent,
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .expect("category path");

    tokio::task::block_in_place(|| c.isolate(behind));
    let cut = Instant::now();
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let names: Vec<String> = (0..BACKLOG)
        .map(|i| {
            format!(
                "{parent}/{}",
                encode(&dubbo_provider(&service, i).to_full_string())
            )
        })
        .collect();
    for chunk in names.chunks(500) {
        let creates: Vec<_> = chunk
            .iter()
            .map(|p| writer.create(p, &[], &ephemeral))
            .collect();
        for r in futures_util::future::join_all(creates).await {
            r.expect("create");
        }
    }
    wait_count(&rec, &service, BACKLOG as usize, "before the move").await;
    let seen_all = rec.len();
    eprintln!(
        "follower_behind: {BACKLOG} entries created and seen {:?} after cutting member {behind} off",
        cut.elapsed()
    );

    // Move the subscriber's connection to `behind`, then end its cut.
    proxy_behind.restore();
    proxy_ahead.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    // Let the client's reconnect reach `behind` (it waits there for the leader).
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| c.heal(behind));
    let cut_for = cut.elapsed();
    eprintln!("follower_behind: member {behind} cut off for {cut_for:?}");
    if cut_for > Duration::from_secs(9) {
        eprintln!(
            "follower_behind: WARNING: cut off for longer than syncLimit (10 s): the leader may \
             have dropped the follower, which then catches up before serving, and this run \
             does not exercise the fault"
        );
    }
    wait_event(&mut events, RegistryEvent::Reconnected, DEADLINE).await;
    wait_count(&rec, &service, BACKLOG as usize, "after the move").await;

    let after: Vec<(u64, usize)> = rec.all()[seen_all..]
        .iter()
        .filter(|n| n.service == service && n.category == "providers")
        .map(|n| {
            (
                n.revision,
                n.entries().filter(|u| !u.is_empty_marker()).count(),
            )
        })
        .collect();
    eprintln!("follower_behind: lists delivered after the move (revision, entries): {after:?}");
    assert!(
        after.iter().all(|&(_, n)| n == BACKLOG as usize),
        "an older list was delivered after the reconnect to member {behind}: {after:?}"
    );
    drop(writer);
    b.destroy().await;
}
