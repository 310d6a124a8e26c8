//! 10,000 Dubbo-style providers (a child list of about 3 MB, over the 1 MiB that Java
//! clients accept by default) are delivered to a subscription. On a private ZooKeeper.

mod common;

use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::dubbo_provider;
use registry_core::testkit::{Recorder, consumer, unique_service};
use registry_core::{Registry, Url, encode};
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;

const N: u32 = 10_000;
const BATCH: u32 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_providers_are_delivered() {
    init_tracing();
    let Some(server) = private_zookeeper("large_list", 2000) else {
        return;
    };
    let addr = server.address();
    let group = unique_group("large");
    let s = unique_service("large");
    let r = ZookeeperRegistry::new(
        format!("zookeeper://{addr}?group={group}&timeout=10000")
            .parse()
            .expect("url"),
    )
    .await
    .expect("registry");
    let dir = r.category_path(&s, "providers");

    // A raw client writes the providers in Dubbo's format, 500 per multi-op, pipelined.
    let raw = raw_client(&addr).await;
    raw.mkdir(
        &dir,
        &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .expect("mkdir");
    let urls: Vec<Url> = (0..N).map(|i| dubbo_provider(&s, i)).collect();
    let names: Vec<String> = urls.iter().map(|u| encode(&u.to_full_string())).collect();
    let bytes: usize = names.iter().map(|n| n.len() + 4).sum();
    let started = Instant::now();
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let mut commits = Vec::new();
    for chunk in names.chunks(BATCH as usize) {
        let mut w = raw.new_multi_writer();
        for name in chunk {
            w.add_create(&format!("{dir}/{name}"), b"", &options)
                .expect("add create");
        }
        commits.push(w.commit());
    }
    for (i, c) in futures_util::future::join_all(commits)
        .await
        .into_iter()
        .enumerate()
    {
        c.unwrap_or_else(|e| panic!("multi create batch {i}: {e:?}"));
    }
    eprintln!(
        "large_list: created {N} providers ({} bytes per name on average, a child list of {bytes} bytes) in {:?}",
        bytes / N as usize,
        started.elapsed()
    );

    let rec = Recorder::new();
    let sub = consumer(&s, "");
    let started = Instant::now();
    r.subscribe(&sub, rec.listener())
        .await
        .expect("subscribe to 10,000 providers");
    let took = started.elapsed();
    let first = rec.latest(&s, "providers").expect("a first notification");
    assert_eq!(first.urls.len(), N as usize, "every provider delivered");
    assert!(first.urls.iter().all(|u| !u.is_empty_marker()));
    eprintln!(
        "large_list: subscribe delivered {} providers in {took:?}",
        first.urls.len()
    );

    // One more provider arrives as one event on top of the 10,000.
    let extra = dubbo_provider(&s, N);
    let started = Instant::now();
    raw.create(
        &format!("{dir}/{}", encode(&extra.to_full_string())),
        b"",
        &options,
    )
    .await
    .expect("create one more");
    rec.wait_for("10,001 providers", Duration::from_secs(30), |all| {
        all.last().is_some_and(|n| n.urls.len() == N as usize + 1)
    })
    .await;
    eprintln!(
        "large_list: the 10,001st provider was notified {:?} after its create started",
        started.elapsed()
    );

    let started = Instant::now();
    let found = r.lookup(&sub).await.expect("lookup");
    assert_eq!(found.len(), N as usize + 1);
    eprintln!(
        "large_list: lookup of {} providers took {:?}",
        found.len(),
        started.elapsed()
    );
    r.destroy().await;
}
