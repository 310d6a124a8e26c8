//! The cluster fault matrix (registry-etcd's tests/matrix, shared) on a real
//! 3-member etcd cluster.

mod common;

#[path = "matrix/mod.rs"]
mod matrix;

use registry_etcd as _;
use registry_test_servers::Kind;

const SCHEME: &str = "etcd";
const KIND: Kind = Kind::Etcd;

/// Fault 1: kill -9 the leader (the member both registries start on); a change while it is
/// down; restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_and_restart() {
    common::init_tracing();
    matrix::kill_leader_and_restart("etcd cluster kill_leader_and_restart").await;
}

/// Fault 2: SIGSTOP each member in turn for longer than the session, a change while it is
/// frozen (through the others), SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "backend defect, intermittent: in 1 of 3 runs the provider's entry was not back 60 s \
            after SIGCONT; in the others its lease expired while its member was frozen (no \
            fail-over within the session) and it came back up to 7.1 s after SIGCONT"]
async fn pause_each_member_longer_than_the_session() {
    common::init_tracing();
    matrix::pause_each_member_longer_than_the_session("etcd cluster pause_each_member").await;
}
