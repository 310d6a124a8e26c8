//! The fault matrix on a real 3-member cluster (registry-test-servers' [`Cluster`], one per
//! test binary, the tests taking turns), shared by the etcd and ZooKeeper test binaries (each
//! sets `SCHEME` and `KIND` and includes this file): a registry with a registered provider and
//! a subscription on another registry, `session=6000`. For each fault nothing is lost (the
//! provider's entry is there at the end, the subscription's last list equals the cluster's
//! truth), and the times to converge are printed. Target: every subscription current within
//! 10 s of a change, the provider's entry back within 10 s of the fault's end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Registry, RegistryManager, Url};
use registry_test_servers::Cluster;

use super::{KIND, SCHEME};

const SESSION_MS: u64 = 6000;
/// The target for a subscription to see a change, and for the entry to come back.
const TARGET: Duration = Duration::from_secs(10);
/// Beyond this, something is lost rather than late.
const LOST: Duration = Duration::from_secs(60);

fn url(addresses: &[String]) -> String {
    format!("{SCHEME}://{}?session={SESSION_MS}", addresses.join(","))
}

/// A registry on `addresses`. Opening checks the cluster, and a request that reaches it in
/// the middle of an election may wait for etcd's request timeout: tries again for a while.
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

fn sorted(mut v: Vec<Url>) -> Vec<Url> {
    v.sort_by_cached_key(Url::to_full_string);
    v
}

/// The cluster's truth for `service`: a lookup through a new registry on the members in
/// `through`.
async fn truth(through: &[String], service: &str) -> Option<Vec<Url>> {
    let r = RegistryManager::new()
        .get_registry(&url(through))
        .await
        .ok()?;
    let found = tokio::time::timeout(
        Duration::from_secs(5),
        r.lookup(&consumer(service, "category=providers")),
    )
    .await;
    r.destroy().await;
    match found {
        Ok(Ok(v)) => Some(sorted(v)),
        _ => None,
    }
}

/// The addresses of every member but `except`.
fn others(c: &Cluster, except: usize) -> Vec<String> {
    (0..c.size())
        .filter(|&i| i != except)
        .map(|i| c.address(i))
        .collect()
}

/// The addresses with member `first` first (clients start on it).
fn first_on(c: &Cluster, first: usize) -> Vec<String> {
    let mut a = vec![c.address(first)];
    a.extend(others(c, first));
    a
}

struct Scene {
    service: String,
    p: Url,
    a: Arc<dyn Registry>,
    b: Arc<dyn Registry>,
    /// Makes the changes during the fault, on the members other than the faulty one.
    other: Arc<dyn Registry>,
    seen: Arc<Recorder>,
}

impl Scene {
    /// Provider registry `a` and subscriber registry `b`, both starting on member `on` (the
    /// one the fault will hit), and a registry for changes on the other members.
    async fn new(c: &Cluster, on: usize, tag: &str) -> Scene {
        let service = unique_service(tag);
        let p = provider(&service, 1, "");
        let a = open(&first_on(c, on)).await;
        let b = open(&first_on(c, on)).await;
        let other = open(&others(c, on)).await;
        a.register(&p).await.expect("register");
        let seen = Recorder::new();
        b.subscribe(&consumer(&service, ""), seen.listener())
            .await
            .expect("subscribe");
        seen.wait_for_entries(&service, PROVIDERS_CATEGORY, std::slice::from_ref(&p), LOST)
            .await;
        Scene {
            service,
            p,
            a,
            b,
            other,
            seen,
        }
    }

    /// A change during the fault: the other registry registers a second provider, then
    /// removes it. Returns how long the subscription took to see each.
    async fn change(&self, n: u8) -> (Duration, Duration) {
        let other = &self.other;
        let q = provider(&self.service, n, "");
        // A call may fail in the middle of an election (a time-out): the change is made when
        // a call returns Ok, and the subscription's time counts from there.
        while let Err(e) = other.register(&q).await {
            eprintln!("register during the fault: {e}; again");
        }
        let t = Instant::now();
        let both = [self.p.clone(), q.clone()];
        self.seen
            .wait_for_entries(&self.service, PROVIDERS_CATEGORY, &both, LOST)
            .await;
        let added = t.elapsed();
        while let Err(e) = other.unregister(&q).await {
            eprintln!("unregister during the fault: {e}; again");
        }
        let t = Instant::now();
        self.seen
            .wait_for_entries(
                &self.service,
                PROVIDERS_CATEGORY,
                std::slice::from_ref(&self.p),
                LOST,
            )
            .await;
        let removed = t.elapsed();
        (added, removed)
    }

    /// After the fault: the provider's entry is back in the cluster and the subscription's
    /// last list equals the truth. Returns how long the entry took to be back.
    async fn settle(&self, c: &Cluster) -> Duration {
        let all = c.addresses();
        let t = Instant::now();
        let want = vec![self.p.clone()];
        let mut last = None;
        while last != Some(want.clone()) {
            assert!(
                t.elapsed() < LOST,
                "the provider's entry is not back after {LOST:?}: the cluster holds {last:?}; \
                 the subscription's last list: {:?}",
                self.seen.latest_entries(&self.service, PROVIDERS_CATEGORY)
            );
            last = truth(&all, &self.service).await;
            if last != Some(want.clone()) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let back = t.elapsed();
        self.seen
            .wait_for_entries(&self.service, PROVIDERS_CATEGORY, &want, LOST)
            .await;
        back
    }

    /// Whether the subscription ever saw the provider's entry missing.
    fn entry_vanished(&self) -> bool {
        self.seen
            .all()
            .iter()
            .filter(|n| n.service == self.service && n.category == PROVIDERS_CATEGORY)
            .skip(1)
            .any(|n| !n.entries().any(|u| *u == self.p))
    }

    async fn close(self) {
        self.other.destroy().await;
        self.b.destroy().await;
        self.a.destroy().await;
    }
}

fn check_targets(test: &str, times: &[(String, Duration)]) {
    for (what, d) in times {
        eprintln!("{test}: {what}: {d:.1?}");
    }
    let late: Vec<_> = times.iter().filter(|(_, d)| *d > TARGET).collect();
    assert!(
        late.is_empty(),
        "{test}: over the {TARGET:?} target: {late:?}"
    );
}

/// Fault 1: kill -9 the leader (the member both registries start on); a change while it is
/// down; restart it.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn kill_leader_and_restart(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let scene = Scene::new(&c, leader, "cluster-kill").await;
    let mut times = Vec::new();

    let t = Instant::now();
    tokio::task::block_in_place(|| c.kill(leader));
    let next = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a new leader");
    times.push((
        format!("new leader {next} after killing {leader}"),
        t.elapsed(),
    ));
    let (added, removed) = scene.change(2).await;
    times.push(("subscription saw an added provider".into(), added));
    times.push(("subscription saw a removed provider".into(), removed));

    tokio::task::block_in_place(|| c.restart(leader)).expect("restart");
    times.push((
        "provider's entry back after the restart".into(),
        scene.settle(&c).await,
    ));
    eprintln!(
        "{test}: the entry vanished meanwhile: {}",
        scene.entry_vanished()
    );
    scene.close().await;
    check_targets(test, &times);
}

/// Fault 2: SIGSTOP each member in turn for longer than the session, a change while it is
/// frozen (through the others), SIGCONT.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn pause_each_member_longer_than_the_session(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let mut times = Vec::new();
    for member in 0..c.size() {
        tokio::task::block_in_place(|| c.wait_healthy(LOST)).expect("healthy");
        let scene = Scene::new(&c, member, "cluster-pause").await;
        let t = Instant::now();
        tokio::task::block_in_place(|| c.pause(member)).expect("SIGSTOP");
        let (added, removed) = scene.change(2).await;
        times.push((
            format!("member {member} frozen: subscription saw an added provider"),
            added,
        ));
        times.push((
            format!("member {member} frozen: subscription saw a removed provider"),
            removed,
        ));
        // Frozen for longer than the session.
        let frozen = Duration::from_millis(SESSION_MS) + Duration::from_secs(2);
        if let Some(rest) = frozen.checked_sub(t.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        tokio::task::block_in_place(|| c.resume(member)).expect("SIGCONT");
        times.push((
            format!("member {member} frozen: provider's entry back after SIGCONT"),
            scene.settle(&c).await,
        ));
        eprintln!(
            "{test}: member {member}: the entry vanished meanwhile: {}",
            scene.entry_vanished()
        );
        scene.close().await;
    }
    check_targets(test, &times);
}
