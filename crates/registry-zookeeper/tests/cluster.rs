//! The cluster fault matrix (registry-etcd's tests/matrix, shared) on a real
//! 3-server ZooKeeper ensemble.

mod common;

#[path = "../../registry-etcd/tests/matrix/mod.rs"]
mod matrix;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_core::{Registry, Url};
use registry_test_servers::Kind;
use registry_zookeeper as _;

const SCHEME: &str = "zookeeper";
const KIND: Kind = Kind::Zookeeper;

/// Fault 1: kill -9 the leader (the member both registries start on); a change while it is
/// down; restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_and_restart() {
    common::init_tracing();
    matrix::kill_leader_and_restart("zookeeper cluster kill_leader_and_restart").await;
}

/// Fault 2: SIGSTOP each member in turn for longer than the session, a change while it is
/// frozen (through the others), SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_each_member_longer_than_the_session() {
    common::init_tracing();
    matrix::pause_each_member_longer_than_the_session("zookeeper cluster pause_each_member").await;
}

/// Fault 3: one member (a follower, then the leader) cut off from its peers, silently, while
/// both registries are connected to it, for longer than the session; a change meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolate_member_with_clients() {
    common::init_tracing();
    matrix::isolate_member_with_clients("zookeeper cluster isolate_member_with_clients").await;
}

/// Fault 4: a rolling restart of every member (followers first), a change while each is
/// down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart() {
    common::init_tracing();
    matrix::rolling_restart("zookeeper cluster rolling_restart").await;
}

/// Fault 5: the whole cluster down for longer than the session, then up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_down_longer_than_the_session() {
    common::init_tracing();
    matrix::whole_cluster_down_longer_than_the_session("zookeeper cluster whole_cluster_down")
        .await;
}

/// Fault 6: a follower behind; a subscriber forced onto it never delivers an older list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_never_goes_back() {
    common::init_tracing();
    matrix::follower_behind_never_goes_back("zookeeper cluster follower_behind").await;
}

/// Fault 7: write applied, reply lost (register, then unregister): the layer converges to
/// the intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_lost() {
    common::init_tracing();
    matrix::reply_lost("zookeeper cluster reply_lost").await;
}

/// Fault 8: restart on the same host:port, the old instance's unregister arriving late: the
/// new entry survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_unregister_after_restart_on_same_address() {
    common::init_tracing();
    matrix::late_unregister_after_restart_on_same_address("zookeeper cluster late_unregister")
        .await;
}

/// Fault 9: a slow link (1 MB/s) with a list of 10,000 providers: the subscription becomes
/// current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_with_a_large_list() {
    common::init_tracing();
    matrix::slow_link_with_a_large_list("zookeeper cluster slow_link", register_all).await;
}

/// A [`matrix::Populate`] that registers the providers on the registry.
fn register_all(
    r: Arc<dyn Registry>,
    _members: Vec<String>,
    urls: Vec<Url>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move { register_chunks(&r, &urls).await })
}

/// Registers `urls` on `r`, 500 at a time.
async fn register_chunks(r: &Arc<dyn Registry>, urls: &[Url]) {
    for chunk in urls.chunks(500) {
        let mut calls = tokio::task::JoinSet::new();
        for u in chunk {
            let (r, u) = (r.clone(), u.clone());
            calls.spawn(async move { r.register(&u).await });
        }
        let mut failed = Vec::new();
        while let Some(done) = calls.join_next().await {
            if let Err(e) = done.expect("register task") {
                failed.push(e);
            }
        }
        // Under this load a call may time out; the layer restores what it was told on a new
        // session, and a call made again settles the rest.
        if let Some(e) = failed.first() {
            eprintln!(
                "{} of {} registrations failed ({e}); again",
                failed.len(),
                chunk.len()
            );
            for u in chunk {
                let t = Instant::now();
                while let Err(e) = r.register(u).await {
                    assert!(t.elapsed() < Duration::from_secs(60), "register: {e}");
                }
            }
        }
    }
}
