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
#[ignore = "intermittent, 5 of 11 runs 27 s over the target; in the 4 logged, the provider's \
            entry was back at once, but the change registry's put that timed out during the election (outcome unknown) \
            is applied by etcd 3.4 after the test's unregister (the frozen old leader forwards \
            its buffered proposal), and the reliability layer withdraws it only ~30 s later: \
            the cluster's truth is [p, q] for 27 s (fault 7, convergence)"]
async fn pause_each_member_longer_than_the_session() {
    common::init_tracing();
    matrix::pause_each_member_longer_than_the_session("etcd cluster pause_each_member").await;
}
