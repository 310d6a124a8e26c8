//! Fault 7 of the cluster matrix, on one private ZooKeeper: a register the server applied
//! whose reply never came back (the connection dropped first). The whole stack
//! (FailbackRegistry over the ZooKeeper backend) converges to the application's intent (CONTRACT
//! §6.1): with `check=false` the entry ends present, owned by our session, and watchers never
//! see it vanish; with `check=true` the register fails and the entry ends absent.
//!
//! Between the registry and the server, a relay that holds every byte from the server while
//! told to: the create goes through and is applied, its reply is held until the client gives
//! up on the silent connection and drops it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::{Registry, Url};
use registry_failback::FailbackRegistry;
use registry_zookeeper::ZookeeperRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(30);

/// A relay to `target` that holds what the server sends while `hold` is true.
async fn holding_relay(target: String, hold: watch::Receiver<bool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                continue;
            };
            let (mut in_r, mut in_w) = inbound.into_split();
            let (mut out_r, mut out_w) = outbound.into_split();
            let mut hold = hold.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match out_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if hold.wait_for(|h| !*h).await.is_err() {
                        break;
                    }
                    if in_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = in_w.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
                let _ = out_w.shutdown().await;
            });
        }
    });
    address
}

/// The whole stack on `url`. A server that just started may take longer than the 1 s
/// `timeout` to answer the first connect on a loaded machine: tried again for a while.
async fn stack(url: &str) -> Arc<FailbackRegistry<ZookeeperRegistry>> {
    let t = Instant::now();
    loop {
        match ZookeeperRegistry::new(url.parse().expect("registry url")).await {
            Ok(raw) => return FailbackRegistry::new(raw).expect("failback"),
            Err(e) if t.elapsed() > DEADLINE => panic!("registry {url}: {e}"),
            Err(e) => eprintln!("registry {url}: {e}; trying again"),
        }
    }
}

/// The owner of `url`'s entry, or `None` when it does not exist.
async fn owner(
    raw: &registry_zookeeper::zookeeper_client::Client,
    r: &FailbackRegistry<ZookeeperRegistry>,
    url: &Url,
) -> Option<i64> {
    raw.check_stat(&r.raw().entry_path(url))
        .await
        .expect("stat")
        .map(|s| s.ephemeral_owner)
}

async fn wait_owner(
    raw: &registry_zookeeper::zookeeper_client::Client,
    r: &FailbackRegistry<ZookeeperRegistry>,
    url: &Url,
    want: impl Fn(Option<i64>) -> bool,
    what: &str,
) -> Duration {
    let t = Instant::now();
    loop {
        let now = owner(raw, r, url).await;
        if want(now) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < DEADLINE,
            "{what}: the entry's owner is {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scene(check: bool) {
    init_tracing();
    let Some(server) = private_zookeeper("lost_reply", 500) else {
        return;
    };
    let addr = server.address();
    let (hold, held) = watch::channel(false);
    let relay = holding_relay(addr.clone(), held).await;
    let r = stack(&format!(
        "zookeeper://{relay}?session=10000&timeout=1000&check={check}&file=false"
    ))
    .await;
    let s = unique_service("lost-reply");
    let p = provider(&s, 1, "");
    let observer = stack(&format!("zookeeper://{addr}?session=10000&file=false")).await;
    let seen = Recorder::new();
    observer
        .subscribe(&consumer(&s, ""), seen.listener())
        .await
        .expect("subscribe");
    let raw = raw_client(&addr).await;
    let t = Instant::now();
    let session = loop {
        // With check=false the session is made in the background.
        if let Some(id) = r.raw().session_id() {
            break id;
        }
        assert!(t.elapsed() < DEADLINE, "no session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The category path exists (a create under a missing one fails, and makes it after the
    // reply), so the held create is the one that makes the entry.
    raw.mkdir(
        &r.raw().category_path(&s, "providers"),
        &registry_zookeeper::zookeeper_client::CreateMode::Persistent
            .with_acls(registry_zookeeper::zookeeper_client::Acls::anyone_all()),
    )
    .await
    .expect("category path");

    hold.send_replace(true);
    let result = r.register(&p).await;
    eprintln!("lost_reply check={check}: register with its reply held: {result:?}");
    if check {
        assert!(
            result.is_err(),
            "a register whose reply never came is an error with check=true"
        );
    } else {
        assert!(
            result.is_ok(),
            "with check=false the register is retried in the background"
        );
    }
    // The server applied it.
    seen.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    hold.send_replace(false);

    let took = if check {
        wait_owner(&raw, &r, &p, |o| o.is_none(), "the entry is removed").await
    } else {
        wait_owner(&raw, &r, &p, |o| o == Some(session), "the entry stays ours").await
    };
    let t = Instant::now();
    while !r.status().is_healthy() {
        assert!(
            t.elapsed() < DEADLINE,
            "the layer did not settle: {:?}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "lost_reply check={check}: converged {:?} after the server's bytes flowed again",
        took.max(t.elapsed())
    );
    assert_eq!(
        r.raw().session_id(),
        Some(session),
        "the same session throughout"
    );
    if check {
        assert_eq!(owner(&raw, &r, &p).await, None);
    } else {
        assert_eq!(owner(&raw, &r, &p).await, Some(session));
        // Once the entry appeared, watchers never saw it vanish.
        let lists: Vec<bool> = seen
            .all()
            .iter()
            .filter(|n| n.service == s && n.category == "providers")
            .map(|n| n.entries().any(|u| *u == p))
            .skip_while(|has| !has)
            .collect();
        assert!(
            lists.iter().all(|has| *has),
            "the entry vanished and came back: {lists:?}"
        );
    }
    observer.destroy().await;
    r.destroy().await;
}

/// `check=false`: the register is kept and retried; the retry finds the node our session
/// made and leaves it (no delete and create, which watchers would see).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_create_reply_converges_to_present() {
    scene(false).await;
}

/// `check=true`: the register failed, so the entry the server made anyway is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_create_reply_after_a_failed_register_converges_to_absent() {
    scene(true).await;
}
