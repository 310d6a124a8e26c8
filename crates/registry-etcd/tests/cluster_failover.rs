//! Member faults on a real 3-member etcd cluster (registry-test-servers' shared [`Cluster`] of
//! this test binary) that the session must survive *inside its lease*: a frozen member and a
//! member silently cut off from its peers, each under both the provider's lease keep-alive
//! and the subscriber's watch stream. `session=6000` (TTL 3 s): the registries must move to
//! a live member without losing the lease (no `SessionLost`, the entry stays on its lease),
//! and the subscription must see a change made through the other members.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{EventLog, lease_of, raw};
use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Registry, RegistryEvent, RegistryManager, Url, encode};
use registry_etcd as _;
use registry_test_servers::{Cluster, Kind};

const SESSION_MS: u64 = 6000;
const TARGET: Duration = Duration::from_secs(10);
const LOST: Duration = Duration::from_secs(60);

fn url(addresses: &[String]) -> String {
    format!("etcd://{}?session={SESSION_MS}", addresses.join(","))
}

async fn open(addresses: &[String]) -> Arc<dyn Registry> {
    let u = url(addresses);
    let t = Instant::now();
    loop {
        match RegistryManager::new().get_registry(&u).await {
            Ok(r) => return r,
            Err(e) if t.elapsed() > LOST => panic!("{u}: {e}"),
            Err(e) => eprintln!("{u}: {e}; trying again"),
        }
    }
}

fn others(c: &Cluster, except: usize) -> Vec<String> {
    (0..c.size())
        .filter(|&i| i != except)
        .map(|i| c.address(i))
        .collect()
}

fn first_on(c: &Cluster, first: usize) -> Vec<String> {
    let mut a = vec![c.address(first)];
    a.extend(others(c, first));
    a
}

fn entry_key(service: &str, u: &Url) -> String {
    format!(
        "/dubbo/{}/providers/{}",
        encode(service),
        encode(&u.to_full_string())
    )
}

/// A provider registry and a subscriber registry, both starting on member `on`, a registry
/// on the other members for changes.
struct Scene {
    service: String,
    p: Url,
    a: Arc<dyn Registry>,
    b: Arc<dyn Registry>,
    other: Arc<dyn Registry>,
    seen: Arc<Recorder>,
    a_log: EventLog,
    b_log: EventLog,
    lease: i64,
    live: String,
}

impl Scene {
    async fn new(c: &Cluster, on: usize, tag: &str) -> Scene {
        let service = unique_service(tag);
        let p = provider(&service, 1, "");
        let a = open(&first_on(c, on)).await;
        let b = open(&first_on(c, on)).await;
        let other = open(&others(c, on)).await;
        let (a_log, b_log) = (EventLog::attach(&a), EventLog::attach(&b));
        a.register(&p).await.expect("register");
        let seen = Recorder::new();
        b.subscribe(&consumer(&service, ""), seen.listener())
            .await
            .expect("subscribe");
        seen.wait_for_entries(&service, PROVIDERS_CATEGORY, std::slice::from_ref(&p), LOST)
            .await;
        let live = others(c, on)[0].clone();
        let lease = lease_of(&mut raw(&live).await, &entry_key(&service, &p))
            .await
            .expect("entry");
        Scene {
            service,
            p,
            a,
            b,
            other,
            seen,
            a_log,
            b_log,
            lease,
            live,
        }
    }

    /// A provider added through the other members: how long until the subscription sees it.
    async fn change(&self, n: u8) -> Duration {
        let q = provider(&self.service, n, "");
        while let Err(e) = self.other.register(&q).await {
            eprintln!("register during the fault: {e}; again");
        }
        let t = Instant::now();
        self.seen
            .wait_for_entries(
                &self.service,
                PROVIDERS_CATEGORY,
                &[self.p.clone(), q.clone()],
                LOST,
            )
            .await;
        let took = t.elapsed();
        while let Err(e) = self.other.unregister(&q).await {
            eprintln!("unregister during the fault: {e}; again");
        }
        took
    }

    /// The registries kept their leases: no `SessionLost` since `since`, the provider's
    /// entry still on its first lease.
    async fn assert_lease_kept(&self, since: Instant, what: &str) {
        for (name, log) in [("provider", &self.a_log), ("subscriber", &self.b_log)] {
            assert_eq!(
                log.first_after(RegistryEvent::SessionLost, since),
                None,
                "{what}: the {name} registry lost its lease; events {:?}",
                log.events()
            );
        }
        assert_eq!(
            lease_of(
                &mut raw(&self.live).await,
                &entry_key(&self.service, &self.p)
            )
            .await,
            Some(self.lease),
            "{what}: the provider's entry is on its first lease"
        );
    }

    /// How long after `since` the provider registry reported `Reconnected`.
    async fn moved(&self, since: Instant) -> Duration {
        self.a_log
            .wait_for(RegistryEvent::Reconnected, since, LOST)
            .await
            - since
    }

    async fn close(self) {
        self.other.destroy().await;
        self.b.destroy().await;
        self.a.destroy().await;
    }
}

fn report(test: &str, times: &[(String, Duration)]) {
    for (what, d) in times {
        eprintln!("{test}: {what}: {d:.1?}");
    }
    let late: Vec<_> = times.iter().filter(|(_, d)| *d > TARGET).collect();
    assert!(
        late.is_empty(),
        "{test}: over the {TARGET:?} target: {late:?}"
    );
}

/// SIGSTOP of the member both registries are on (each member in turn, the leader
/// included), shorter than the TTL would allow a slow failover: the registries move to a
/// live member inside the lease (no `SessionLost`, same lease), and the subscription sees a
/// change made meanwhile.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_is_left_inside_the_lease() {
    common::init_tracing();
    let test = "a_frozen_member_is_left_inside_the_lease";
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(Kind::Etcd, test)) else {
        return;
    };
    let mut times = Vec::new();
    for member in 0..c.size() {
        tokio::task::block_in_place(|| c.wait_healthy(LOST)).expect("healthy");
        let leader = tokio::task::block_in_place(|| c.leader());
        let scene = Scene::new(&c, member, "frozen").await;
        let t = Instant::now();
        tokio::task::block_in_place(|| c.pause(member)).expect("SIGSTOP");
        let moved = scene.moved(t).await;
        let seen = scene.change(2).await;
        // Frozen for longer than the session: the lease would be gone without a move.
        let frozen = Duration::from_millis(SESSION_MS) + Duration::from_secs(1);
        if let Some(rest) = frozen.checked_sub(t.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        scene
            .assert_lease_kept(t, &format!("member {member} frozen"))
            .await;
        tokio::task::block_in_place(|| c.resume(member)).expect("SIGCONT");
        let role = if leader == Some(member) {
            "leader"
        } else {
            "follower"
        };
        times.push((
            format!("member {member} ({role}) frozen: provider registry on a live member"),
            moved,
        ));
        times.push((
            format!("member {member} ({role}) frozen: subscription saw a change"),
            seen,
        ));
        scene.close().await;
    }
    report(test, &times);
}

/// The member both registries are on is silently cut off from its peers (its client port
/// still answers): it loses its leader, and with require-leader it ends the watch and
/// keep-alive streams instead of keeping them open and silent. The registries move to a
/// live member inside the lease; the subscription sees a change made through the majority.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_its_peers_is_left() {
    common::init_tracing();
    let test = "a_member_cut_off_from_its_peers_is_left";
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(Kind::Etcd, test)) else {
        return;
    };
    let mut times = Vec::new();
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    // A follower and the leader.
    let follower = (leader + 1) % c.size();
    for member in [follower, leader] {
        tokio::task::block_in_place(|| c.wait_healthy(LOST)).expect("healthy");
        let scene = Scene::new(&c, member, "isolated").await;
        let t = Instant::now();
        c.isolate(member);
        let seen = scene.change(2).await;
        let moved = scene.moved(t).await;
        let isolated = Duration::from_millis(SESSION_MS) + Duration::from_secs(1);
        if let Some(rest) = isolated.checked_sub(t.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        scene
            .assert_lease_kept(t, &format!("member {member} isolated"))
            .await;
        c.heal(member);
        let role = if member == leader {
            "leader"
        } else {
            "follower"
        };
        times.push((
            format!("member {member} ({role}) isolated: subscription saw a change"),
            seen,
        ));
        times.push((
            format!("member {member} ({role}) isolated: provider registry on a live member"),
            moved,
        ));
        scene.close().await;
    }
    report(test, &times);
}
