//! Fault 9 of the cluster matrix, on one private ZooKeeper: a 10,000-entry list (about 4 MB)
//! over a slow link (2 MiB/s from the server, a relay below) with `timeout=1000`. A read of
//! it takes about 2 s, twice the request timeout: the subscription must still become current,
//! and again after a reconnect (a re-read of the whole list).
//!
//! The relay here only throttles; it should give way to the bandwidth-limiting proxy of
//! registry-test-servers when that exists.

mod common;

use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::dubbo_provider;
use registry_core::testkit::{Recorder, consumer, unique_service};
use registry_core::{Registry, RegistryEvent, Url, encode};
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const N: u32 = 10_000;
const RATE: u64 = 2 * 1024 * 1024;
const DEADLINE: Duration = Duration::from_secs(90);

/// Copies `from` to `to` at no more than `rate` bytes per second.
async fn throttled(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let start = tokio::time::Instant::now();
    let mut sent: u64 = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n as u64;
        let due = start + Duration::from_micros(sent * 1_000_000 / rate);
        tokio::time::sleep_until(due).await;
    }
    let _ = to.shutdown().await;
}

/// A relay to `target` whose server-to-client direction runs at `rate` bytes per second.
async fn slow_relay(target: String, rate: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                continue;
            };
            let (in_r, in_w) = inbound.into_split();
            let (out_r, mut out_w) = outbound.into_split();
            tokio::spawn(throttled(out_r, in_w, rate));
            tokio::spawn(async move {
                let mut in_r = in_r;
                let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
                let _ = out_w.shutdown().await;
            });
        }
    });
    address
}

fn count(rec: &Recorder, service: &str) -> usize {
    rec.latest_entries(service, "providers")
        .map(|v| v.iter().filter(|u| !u.is_empty_marker()).count())
        .unwrap_or(0)
}

async fn wait_count(rec: &Recorder, service: &str, want: usize, what: &str) -> Duration {
    let t = Instant::now();
    while count(rec, service) != want {
        assert!(
            t.elapsed() < DEADLINE,
            "{what}: the subscription holds {} entries after {DEADLINE:?}, not {want}",
            count(rec, service)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_entries_over_a_slow_link() {
    init_tracing();
    let Some(server) = private_zookeeper("slow_link", 2000) else {
        return;
    };
    let addr = server.address();
    let group = unique_group("slow");
    let s = unique_service("slow");

    // 10,000 Dubbo-style providers, written straight to the server.
    let raw = raw_client(&addr).await;
    let dir = format!("/{group}/{}/providers", encode(&s));
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    raw.mkdir(&dir, &options).await.expect("mkdir");
    let urls: Vec<Url> = (0..N).map(|i| dubbo_provider(&s, i)).collect();
    let names: Vec<String> = urls.iter().map(|u| encode(&u.to_full_string())).collect();
    let bytes: usize = names.iter().map(|n| n.len() + 4).sum();
    let mut commits = Vec::new();
    for chunk in names.chunks(500) {
        let mut w = raw.new_multi_writer();
        for name in chunk {
            w.add_create(&format!("{dir}/{name}"), b"", &options)
                .expect("add create");
        }
        commits.push(w.commit());
    }
    for c in futures_util::future::join_all(commits).await {
        c.expect("multi create");
    }

    let relay = slow_relay(addr.clone(), RATE).await;
    // The proxy in front cuts the connection for the reconnect below.
    let proxy = Proxy::start(&relay).await.expect("proxy");
    let r = ZookeeperRegistry::new(
        format!(
            "zookeeper://{}?group={group}&timeout=1000&session=30000",
            proxy.address()
        )
        .parse()
        .expect("url"),
    )
    .await
    .expect("registry");
    let mut events = r.events();
    eprintln!(
        "slow_link: a child list of {bytes} bytes takes about {:?} at {RATE} B/s; timeout 1 s",
        Duration::from_millis(bytes as u64 * 1000 / RATE)
    );

    let rec = Recorder::new();
    let t = Instant::now();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe over the slow link");
    assert_eq!(count(&rec, &s), N as usize, "every provider delivered");
    eprintln!(
        "slow_link: subscribe delivered {N} providers in {:?}",
        t.elapsed()
    );

    // A change while the connection is down is seen by the re-read after the reconnect.
    proxy.cut();
    wait_event(&mut events, RegistryEvent::Disconnected, DEADLINE).await;
    raw.create(
        &format!("{dir}/{}", encode(&dubbo_provider(&s, N).to_full_string())),
        b"",
        &options,
    )
    .await
    .expect("create one more");
    proxy.restore();
    let took = wait_count(&rec, &s, N as usize + 1, "after the reconnect").await;
    eprintln!(
        "slow_link: the re-read after the reconnect delivered {} providers {took:?} after the network came back",
        N + 1
    );
    r.destroy().await;
}
