//! The cluster fault matrix (registry-etcd's tests/matrix, shared) on a real
//! 3-server ZooKeeper ensemble.

mod common;

#[path = "../../registry-etcd/tests/matrix/mod.rs"]
mod matrix;

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
