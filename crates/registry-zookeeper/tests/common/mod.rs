//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use registry_core::RegistryEvent;
use registry_zookeeper::zookeeper_client as zk;
use tokio::sync::broadcast;

/// A real provider node name written by Dubbo Java (from the Dubbo ZooKeeper registry
/// article in shared/seeds): `/dubbo/org.apache.dubbo.demo.DemoService/providers/<this>`.
pub const DUBBO_PROVIDER_NODE: &str = "dubbo%3A%2F%2F192.168.56.1%3A20880%2Forg.apache.dubbo.demo.DemoService%3Fanyhost%3Dtrue%26application%3Ddubbo-demo-api-provider%26default%3Dtrue%26deprecated%3Dfalse%26dubbo%3D2.0.2%26dynamic%3Dtrue%26generic%3Dfalse%26interface%3Dorg.apache.dubbo.demo.DemoService%26methods%3DsayHello%2CsayHelloAsync%26pid%3D112756%26release%3D%26side%3Dprovider%26timestamp%3D1588548412331";

/// A real consumer node name from the same article (under `.../consumers/`).
pub const DUBBO_CONSUMER_NODE: &str = "consumer%3A%2F%2F192.168.1.4%2Forg.apache.dubbo.rpc.service.GenericService%3Fapplication%3Ddubbo-demo-api-consumer%26category%3Dconsumers%26check%3Dfalse%26dubbo%3D2.0.2%26generic%3Dtrue%26interface%3Dorg.apache.dubbo.demo.DemoService%26pid%3D139620%26side%3Dconsumer%26sticky%3Dfalse%26timestamp%3D1588596195728";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "registry_zookeeper=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A group (root) no other test uses.
pub fn unique_group(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("zk-{tag}-{}-{:x}", std::process::id(), t & 0xffff_ffff)
}

/// A plain client, as another process (or Dubbo) would use.
pub async fn raw_client(addr: &str) -> zk::Client {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(addr)
        .await
        .unwrap_or_else(|e| panic!("raw client to {addr}: {e}"))
}

/// Waits until `want` arrives; returns every event seen on the way (with `want` last).
pub async fn wait_event(
    rx: &mut broadcast::Receiver<RegistryEvent>,
    want: RegistryEvent,
    deadline: Duration,
) -> Vec<RegistryEvent> {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) => {
                seen.push(ev);
                if ev == want {
                    return seen;
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                panic!("lagged {n} events waiting for {want:?}; seen {seen:?}")
            }
            Ok(Err(e)) => panic!("event channel closed waiting for {want:?}: {e}; seen {seen:?}"),
            Err(_) => panic!("timed out after {deadline:?} waiting for {want:?}; seen {seen:?}"),
        }
    }
}

/// A private ZooKeeper with `tick_ms` ticks, for tests that stop it or expire sessions.
/// Skips (returns `None`) when it cannot be started, unless `REGISTRY_TEST_REQUIRE=1`.
pub fn private_zookeeper(test: &str, tick_ms: u32) -> Option<registry_test_servers::Server> {
    let started = tokio::task::block_in_place(|| {
        registry_test_servers::Server::zookeeper_with(registry_test_servers::ZookeeperOptions {
            tick_ms,
        })
    });
    match started {
        Ok(s) => Some(s),
        Err(e) if !registry_test_servers::required() => {
            eprintln!("{test}: skipped, no private ZooKeeper: {e}");
            None
        }
        Err(e) => panic!("{test}: cannot start a private ZooKeeper: {e}"),
    }
}

#[allow(unused_imports)]
pub use registry_test_servers::Proxy;

/// Closes a session from outside, as a server-side expiry would: a second client attaches to
/// it with its id and password and closes it. Cut the victim's connection first (see
/// [`Proxy`]): two live clients on one session take it from each other on every reconnect.
pub async fn close_session(addr: &str, info: zk::SessionInfo, deadline: Duration) {
    let id = info.id();
    let killer = zk::Client::connector()
        .with_session(info)
        .with_session_timeout(Duration::from_secs(10))
        .connect(addr)
        .await
        .expect("attach to the session");
    assert_eq!(killer.session_id(), id, "attached to the victim's session");
    let mut state = killer.state_watcher();
    drop(killer); // closes the session
    tokio::time::timeout(deadline, async {
        while !state.peek_state().is_terminated() {
            state.changed().await;
        }
    })
    .await
    .expect("the second client closed the session");
}
