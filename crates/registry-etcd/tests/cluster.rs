//! The cluster fault matrix (registry-etcd's tests/matrix, shared) on a real
//! 3-member etcd cluster.

mod common;

#[path = "matrix/mod.rs"]
mod matrix;

#[path = "matrix/etcd.rs"]
mod matrix_etcd;

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
async fn pause_each_member_longer_than_the_session() {
    common::init_tracing();
    matrix::pause_each_member_longer_than_the_session("etcd cluster pause_each_member").await;
}

/// Fault 3: one member (a follower, then the leader) cut off from its peers, silently, while
/// both registries are connected to it, for longer than the session; a change meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolate_member_with_clients() {
    common::init_tracing();
    matrix::isolate_member_with_clients("etcd cluster isolate_member_with_clients").await;
}

/// Fault 4: a rolling restart of every member (followers first), a change while each is
/// down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart() {
    common::init_tracing();
    matrix::rolling_restart("etcd cluster rolling_restart").await;
}

/// Fault 5: the whole cluster down for longer than the session, then up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_down_longer_than_the_session() {
    common::init_tracing();
    matrix::whole_cluster_down_longer_than_the_session("etcd cluster whole_cluster_down").await;
}

/// Fault 6: a follower behind; a subscriber forced onto it never delivers an older list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_never_goes_back() {
    common::init_tracing();
    matrix::follower_behind_never_goes_back("etcd cluster follower_behind").await;
}

/// Fault 7: write applied, reply lost (register, then unregister): the layer converges to
/// the intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_lost() {
    common::init_tracing();
    matrix::reply_lost("etcd cluster reply_lost").await;
}

/// Fault 8: restart on the same host:port, the old instance's unregister arriving late: the
/// new entry survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_unregister_after_restart_on_same_address() {
    common::init_tracing();
    matrix::late_unregister_after_restart_on_same_address("etcd cluster late_unregister").await;
}

/// Fault 9: a slow link (1 MB/s) with a list of 10,000 providers: the subscription becomes
/// current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_with_a_large_list() {
    common::init_tracing();
    matrix::slow_link_with_a_large_list("etcd cluster slow_link", matrix_etcd::put_all).await;
}

/// Fault 10: a permission revoked on one watched prefix (and a reconnect, so every watch is
/// opened again): the other subscriptions keep working, no reconnect loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_revoked_on_one_prefix() {
    common::init_tracing();
    matrix_etcd::permission_revoked_on_one_prefix("etcd cluster permission_revoked").await;
}

/// Fault 11: the lease sentinel deleted by hand: the entries end on a renewed lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_deleted_by_hand() {
    common::init_tracing();
    matrix_etcd::sentinel_deleted_by_hand("etcd cluster sentinel_deleted").await;
}
