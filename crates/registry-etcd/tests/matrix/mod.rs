//! The fault matrix on a real 3-member cluster (registry-test-servers' [`Cluster`], one per
//! test binary, the tests taking turns), shared by the etcd and ZooKeeper test binaries (each
//! sets `SCHEME` and `KIND` and includes this file): a registry with a registered provider and
//! a subscription on another registry, `session=6000`. For each fault nothing is lost (the
//! provider's entry is there at the end, the subscription's last list equals the cluster's
//! truth), and the times to converge are printed. Target: every subscription current within
//! 10 s of a change, the provider's entry back within 10 s of the fault's end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_core::testkit::{
    Recorder, consumer, dubbo_provider as big_provider, provider, unique_service,
};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Registry, RegistryManager, Url};
use registry_test_servers::{Cluster, Proxy};

use super::{KIND, SCHEME};

pub(crate) const SESSION_MS: u64 = 6000;
/// The target for a subscription to see a change, and for the entry to come back.
pub(crate) const TARGET: Duration = Duration::from_secs(10);
/// Beyond this, something is lost rather than late.
pub(crate) const LOST: Duration = Duration::from_secs(60);

pub(crate) fn url(addresses: &[String]) -> String {
    format!("{SCHEME}://{}?session={SESSION_MS}", addresses.join(","))
}

/// A registry on `addresses`. Opening checks the cluster, and a request that reaches it in
/// the middle of an election may wait for etcd's request timeout: tries again for a while.
pub(crate) async fn open(addresses: &[String]) -> Arc<dyn Registry> {
    open_with(addresses, "").await
}

/// [`open`] with more parameters (`"&check=false"`).
pub(crate) async fn open_with(addresses: &[String], more: &str) -> Arc<dyn Registry> {
    open_url(format!("{}{more}", url(addresses))).await
}

/// A registry for `u`, tried again while the cluster is in an election.
pub(crate) async fn open_url(u: String) -> Arc<dyn Registry> {
    let t = Instant::now();
    // Never a password in the output.
    let shown = Url::parse(&u).map_or_else(
        |_| "a registry URL".to_owned(),
        |x| x.to_identity_string_redacted(),
    );
    loop {
        match RegistryManager::new().get_registry(&u).await {
            Ok(r) => return r,
            Err(e) if t.elapsed() > LOST => panic!("{shown}: {e}"),
            Err(e) => eprintln!("{shown}: {e}; trying again"),
        }
    }
}

fn sorted(mut v: Vec<Url>) -> Vec<Url> {
    v.sort_by_cached_key(Url::to_full_string);
    v
}

/// The cluster's truth for `service`: a lookup through a new registry on the members in
/// `through`.
pub(crate) async fn truth(through: &[String], service: &str) -> Option<Vec<Url>> {
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
pub(crate) fn others(c: &Cluster, except: usize) -> Vec<String> {
    (0..c.size())
        .filter(|&i| i != except)
        .map(|i| c.address(i))
        .collect()
}

/// The addresses with member `first` first (clients start on it).
pub(crate) fn first_on(c: &Cluster, first: usize) -> Vec<String> {
    let mut a = vec![c.address(first)];
    a.extend(others(c, first));
    a
}

/// A [`Proxy`] in front of each member's client port, in member order: the client side of
/// the network, for the registries that connect through them.
pub(crate) struct Proxies(pub(crate) Vec<Proxy>);

impl Proxies {
    pub(crate) async fn new(c: &Cluster) -> Proxies {
        let mut v = Vec::new();
        for a in c.addresses() {
            v.push(Proxy::start(&a).await.expect("proxy"));
        }
        Proxies(v)
    }

    pub(crate) fn addresses(&self) -> Vec<String> {
        self.0.iter().map(|p| p.address().to_owned()).collect()
    }

    pub(crate) fn each(&self, f: impl Fn(&Proxy)) {
        self.0.iter().for_each(f);
    }
}

pub(crate) struct Scene {
    pub(crate) service: String,
    pub(crate) p: Url,
    pub(crate) a: Arc<dyn Registry>,
    pub(crate) b: Arc<dyn Registry>,
    /// Makes the changes during the fault, on the members other than the faulty one.
    pub(crate) other: Arc<dyn Registry>,
    pub(crate) seen: Arc<Recorder>,
}

impl Scene {
    /// Provider registry `a` and subscriber registry `b`, both starting on member `on` (the
    /// one the fault will hit), and a registry for changes on the other members.
    pub(crate) async fn new(c: &Cluster, on: usize, tag: &str) -> Scene {
        Scene::on(&first_on(c, on), &first_on(c, on), &others(c, on), tag).await
    }

    /// Provider registry `a` on `a_on`, subscriber registry `b` on `b_on`, the registry for
    /// changes on `other_on`.
    async fn on(a_on: &[String], b_on: &[String], other_on: &[String], tag: &str) -> Scene {
        let service = unique_service(tag);
        let p = provider(&service, 1, "");
        let a = open(a_on).await;
        let b = open(b_on).await;
        let other = open(other_on).await;
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
    pub(crate) async fn change(&self, n: u8) -> (Duration, Duration) {
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
    pub(crate) async fn settle(&self, c: &Cluster) -> Duration {
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

    /// Waits until the cluster's truth is `want` (sorted); returns how long it took.
    async fn wait_truth(&self, c: &Cluster, want: &[Url]) -> Duration {
        let all = c.addresses();
        let want = sorted(want.to_vec());
        let t = Instant::now();
        loop {
            let now = truth(&all, &self.service).await;
            if now.as_ref() == Some(&want) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < LOST,
                "the cluster does not hold {want:?} after {LOST:?}: it holds {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks, for `window`, that every lookup of the cluster's truth is `want`.
    async fn truth_stays(&self, c: &Cluster, want: &[Url], window: Duration) {
        let all = c.addresses();
        let want = sorted(want.to_vec());
        let t = Instant::now();
        while t.elapsed() < window {
            if let Some(now) = truth(&all, &self.service).await {
                assert_eq!(
                    now,
                    want,
                    "the cluster's truth changed {:.1?} in",
                    t.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the subscription ever saw the provider's entry missing.
    pub(crate) fn entry_vanished(&self) -> bool {
        self.seen
            .all()
            .iter()
            .filter(|n| n.service == self.service && n.category == PROVIDERS_CATEGORY)
            .skip(1)
            .any(|n| !n.entries().any(|u| *u == self.p))
    }

    pub(crate) async fn close(self) {
        self.other.destroy().await;
        self.b.destroy().await;
        self.a.destroy().await;
    }
}

pub(crate) fn check_targets(test: &str, times: &[(String, Duration)]) {
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

/// Waits (blocking the runtime's worker, not the runtime) for a healthy cluster.
fn healthy(c: &mut Cluster) {
    tokio::task::block_in_place(|| c.wait_healthy(LOST)).expect("a healthy cluster");
}

/// Sleeps until `since + d`.
pub(crate) async fn until(since: Instant, d: Duration) {
    if let Some(rest) = d.checked_sub(since.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}

/// Fault 3: one member (a follower, then the leader) cut off from its peers, silently, while
/// both registries are connected to it, for longer than the session; a change through the
/// others meanwhile; healed.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn isolate_member_with_clients(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let follower = (0..c.size()).find(|&i| i != leader).expect("a follower");
    let mut times = Vec::new();
    for (role, member) in [("follower", follower), ("leader", leader)] {
        healthy(&mut c);
        let scene = Scene::new(&c, member, "cluster-isolate").await;
        let t = Instant::now();
        c.isolate(member);
        let (added, removed) = scene.change(2).await;
        times.push((
            format!("{role} {member} isolated: subscription saw an added provider"),
            added,
        ));
        times.push((
            format!("{role} {member} isolated: subscription saw a removed provider"),
            removed,
        ));
        until(
            t,
            Duration::from_millis(SESSION_MS) + Duration::from_secs(2),
        )
        .await;
        c.heal(member);
        times.push((
            format!("{role} {member} isolated: provider's entry back after healing"),
            scene.settle(&c).await,
        ));
        eprintln!(
            "{test}: {role} {member}: the entry vanished meanwhile: {}",
            scene.entry_vanished()
        );
        scene.close().await;
    }
    check_targets(test, &times);
}

/// Fault 4: a rolling restart: each member in turn (followers first, the leader last) killed,
/// a change while it is down, restarted, and the next one once the cluster is healthy. Both
/// registries start on the first member restarted.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn rolling_restart(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let mut order: Vec<usize> = (0..c.size()).filter(|&i| i != leader).collect();
    order.push(leader);
    let scene = Scene::new(&c, order[0], "cluster-rolling").await;
    let mut times = Vec::new();
    let started = Instant::now();
    for (k, &member) in order.iter().enumerate() {
        healthy(&mut c);
        tokio::task::block_in_place(|| c.kill(member));
        let n = u8::try_from(k + 2).expect("few members");
        let (added, removed) = scene.change(n).await;
        times.push((
            format!("member {member} down: subscription saw an added provider"),
            added,
        ));
        times.push((
            format!("member {member} down: subscription saw a removed provider"),
            removed,
        ));
        let t = Instant::now();
        tokio::task::block_in_place(|| c.restart(member)).expect("restart");
        healthy(&mut c);
        eprintln!(
            "{test}: member {member} back in the cluster after {:.1?}",
            t.elapsed()
        );
    }
    times.push((
        "provider's entry present after the last restart".into(),
        scene.settle(&c).await,
    ));
    eprintln!(
        "{test}: rolling restart of {} members in {:.1?}; the entry vanished meanwhile: {}",
        order.len(),
        started.elapsed(),
        scene.entry_vanished()
    );
    scene.close().await;
    check_targets(test, &times);
}

/// Fault 5: every member killed, the cluster down for longer than the session, then every
/// member restarted: the provider's entry comes back, the subscription ends on the truth, and
/// a change after the restart reaches it.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn whole_cluster_down_longer_than_the_session(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let scene = Scene::new(&c, leader, "cluster-down").await;
    let mut times = Vec::new();
    let t = Instant::now();
    for i in 0..c.size() {
        tokio::task::block_in_place(|| c.kill(i));
    }
    until(
        t,
        Duration::from_millis(SESSION_MS) + Duration::from_secs(2),
    )
    .await;
    let up = Instant::now();
    tokio::task::block_in_place(|| c.restart_all()).expect("restart");
    healthy(&mut c);
    eprintln!(
        "{test}: the cluster is back {:.1?} after the restart",
        up.elapsed()
    );
    scene.settle(&c).await;
    times.push((
        "provider's entry back after the cluster's restart".into(),
        up.elapsed(),
    ));
    let (added, removed) = scene.change(2).await;
    times.push(("after: subscription saw an added provider".into(), added));
    times.push(("after: subscription saw a removed provider".into(), removed));
    eprintln!(
        "{test}: the entry vanished meanwhile: {}",
        scene.entry_vanished()
    );
    scene.close().await;
    check_targets(test, &times);
}

/// Fault 6: a follower behind (its peer traffic delayed by 1.5 s, so it applies every change
/// that much later). The subscriber reaches the members through proxies; three times it sees
/// a new provider on an up-to-date member, then is forced onto the follower that does not
/// have it yet (its other links cut). Only providers are added, so every list it delivers
/// must hold the previous one, with a revision no smaller.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn follower_behind_never_goes_back(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let behind = (0..c.size()).find(|&i| i != leader).expect("a follower");
    let proxies = Proxies::new(&c).await;
    // The subscriber starts on an up-to-date member.
    proxies.0[behind].cut();
    let scene = Scene::on(
        &c.addresses(),
        &proxies.addresses(),
        &others(&c, behind),
        "cluster-behind",
    )
    .await;
    let delay = Duration::from_millis(1500);
    c.delay(behind, delay);
    let mut want = vec![scene.p.clone()];
    let mut times = Vec::new();
    for round in 0..3u8 {
        let q = provider(&scene.service, 10 + round, "");
        while let Err(e) = scene.other.register(&q).await {
            eprintln!("register: {e}; again");
        }
        want.push(q);
        let t = Instant::now();
        scene
            .seen
            .wait_for_entries(&scene.service, PROVIDERS_CATEGORY, &want, LOST)
            .await;
        times.push((
            format!("round {round}: subscription saw the new provider"),
            t.elapsed(),
        ));
        // Onto the follower that does not have it yet.
        let before = proxies.0[behind].forwarded().1;
        proxies.0[behind].restore();
        for (i, p) in proxies.0.iter().enumerate() {
            if i != behind {
                p.cut();
            }
        }
        let t = Instant::now();
        // Until the follower has answered and caught up.
        while proxies.0[behind].forwarded().1 == before && t.elapsed() < LOST {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "{test}: round {round}: the follower answered after {:.1?}",
            t.elapsed()
        );
        until(t, delay * 3).await;
        scene
            .seen
            .wait_for_entries(&scene.service, PROVIDERS_CATEGORY, &want, LOST)
            .await;
        // Back on the others.
        proxies.each(Proxy::restore);
        proxies.0[behind].cut();
    }
    c.delay(behind, Duration::ZERO);
    proxies.each(Proxy::restore);
    let lists: Vec<_> = scene
        .seen
        .all()
        .into_iter()
        .filter(|n| n.service == scene.service && n.category == PROVIDERS_CATEGORY)
        .collect();
    for w in lists.windows(2) {
        let (old, new) = (&w[0], &w[1]);
        assert!(
            new.revision >= old.revision,
            "{test}: a list with revision {} after one with {}",
            new.revision,
            old.revision
        );
        let missing: Vec<_> = old
            .entries()
            .filter(|u| !new.entries().any(|n| n == *u))
            .collect();
        assert!(
            missing.is_empty(),
            "{test}: a list (r{}) went back: it lacks {missing:?} that r{} held",
            new.revision,
            old.revision
        );
    }
    eprintln!("{test}: {} lists delivered, none went back", lists.len());
    scene.wait_truth(&c, &want).await;
    scene.close().await;
    check_targets(test, &times);
}

/// Fault 7: write applied, reply lost. A provider registry reaches the members through
/// proxies that drop every reply while it registers a second provider, and again while it
/// unregisters it: each write reaches the cluster, no answer comes back. Once the replies
/// flow again, the cluster converges to the application's intent and stays there. The
/// intent of a register is what its call said: `Ok` (with `check=false` the layer retries in
/// the background) means present, an error (`check=true`, the default) means absent; an
/// unregister always means absent. Both settings are run.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn reply_lost(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let proxies = Proxies::new(&c).await;
    let scene = Scene::on(
        &proxies.addresses(),
        &c.addresses(),
        &c.addresses(),
        "cluster-reply-lost",
    )
    .await;
    let mut times = Vec::new();
    let lenient = open_with(&proxies.addresses(), "&check=false").await;
    for (check, r, n) in [(true, &scene.a, 2u8), (false, &lenient, 3u8)] {
        let q = provider(&scene.service, n, "");
        for register in [true, false] {
            let what = format!(
                "check={check}: {}",
                if register { "register" } else { "unregister" }
            );
            if !register
                && scene
                    .seen
                    .latest_entries(&scene.service, PROVIDERS_CATEGORY)
                    != Some(sorted(vec![scene.p.clone(), q.clone()]))
            {
                // The register ended absent: register it with the replies flowing first.
                r.register(&q).await.expect("register");
                scene
                    .seen
                    .wait_for_entries(
                        &scene.service,
                        PROVIDERS_CATEGORY,
                        &[scene.p.clone(), q.clone()],
                        LOST,
                    )
                    .await;
            }
            proxies.each(Proxy::drop_replies);
            let t = Instant::now();
            let call = {
                let (r, q) = (r.clone(), q.clone());
                tokio::spawn(async move {
                    if register {
                        r.register(&q).await
                    } else {
                        r.unregister(&q).await
                    }
                })
            };
            // The write reaches the cluster; its reply does not come back.
            let applied_state = if register {
                vec![scene.p.clone(), q.clone()]
            } else {
                vec![scene.p.clone()]
            };
            // Usually the write reaches the cluster while its reply is lost. A call that
            // must read before it writes (ZooKeeper's unregister checks the node's owner
            // first) cannot write before a reply comes: then nothing is applied until the
            // replies flow again, and the layer must still converge to the intent.
            let applied_state = sorted(applied_state);
            let applied = loop {
                if truth(&c.addresses(), &scene.service).await.as_ref() == Some(&applied_state) {
                    break Some(t.elapsed());
                }
                if call.is_finished() || t.elapsed() > Duration::from_secs(15) {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            match applied {
                Some(d) => eprintln!("{test}: {what}: applied after {d:.1?}, no reply"),
                None => eprintln!(
                    "{test}: {what}: not applied while the replies were lost (the call reads first)"
                ),
            }
            // The replies stay lost until the call returns, or for 15 s at most.
            let returned = tokio::time::timeout(Duration::from_secs(15), async {
                while !call.is_finished() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            eprintln!(
                "{test}: {what}: the call {} after {:.1?}; {} reply bytes dropped so far",
                if returned.is_ok() {
                    "returned"
                } else {
                    "was still waiting"
                },
                t.elapsed(),
                proxies.0.iter().map(Proxy::dropped).sum::<u64>()
            );
            let back = Instant::now();
            proxies.each(Proxy::deliver_replies);
            let result = tokio::time::timeout(LOST, call)
                .await
                .expect("the call returns")
                .expect("the call's task");
            let present = register && result.is_ok();
            eprintln!(
                "{test}: {what}: the call ended with {}; the intent: {}",
                match &result {
                    Ok(()) => "Ok".to_owned(),
                    Err(e) => format!(
                        "an error ({})",
                        e.to_string().chars().take(120).collect::<String>()
                    ),
                },
                if present { "present" } else { "absent" }
            );
            let want = if present {
                vec![scene.p.clone(), q.clone()]
            } else {
                vec![scene.p.clone()]
            };
            scene.wait_truth(&c, &want).await;
            scene
                .seen
                .wait_for_entries(&scene.service, PROVIDERS_CATEGORY, &want, LOST)
                .await;
            times.push((
                format!("{what} with its reply lost: converged after replies flow again"),
                back.elapsed(),
            ));
            // And stays there: no retry of a call whose reply was lost undoes the intent.
            scene.truth_stays(&c, &want, Duration::from_secs(6)).await;
        }
    }
    lenient.destroy().await;
    scene.settle(&c).await;
    scene.close().await;
    check_targets(test, &times);
}

/// Fault 8: a provider restarts on the same host:port: the new instance (a new registry, its
/// own session or lease) registers the same URL, then the old instance's unregister arrives
/// late and the old instance goes away. The new instance's entry survives: the cluster holds
/// it throughout and the subscription never loses it.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn late_unregister_after_restart_on_same_address(test: &str) {
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    let leader = tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let scene = Scene::new(&c, leader, "cluster-same-address").await;
    let newer = open(&others(&c, leader)).await;
    newer
        .register(&scene.p)
        .await
        .expect("register of the new instance");
    let t = Instant::now();
    let late = scene.a.unregister(&scene.p).await;
    scene.a.destroy().await;
    eprintln!(
        "{test}: the old instance's late unregister returned {late:?}; destroyed after {:.1?}",
        t.elapsed()
    );
    let want = vec![scene.p.clone()];
    // For a session: the cluster holds the entry all along, the subscription never lost it.
    scene
        .truth_stays(&c, &want, Duration::from_millis(SESSION_MS))
        .await;
    scene
        .seen
        .wait_for_entries(&scene.service, PROVIDERS_CATEGORY, &want, LOST)
        .await;
    assert!(
        !scene.entry_vanished(),
        "{test}: the subscription saw the new instance's entry vanish"
    );
    newer.destroy().await;
    scene.other.destroy().await;
    scene.b.destroy().await;
}

/// Writes the providers of a large list into the cluster: (a provider registry, the
/// members' addresses, the providers).
pub(crate) type Populate =
    fn(Arc<dyn Registry>, Vec<String>, Vec<Url>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Fault 9: a slow link (1 MB/s each way, through proxies) between the subscriber and the
/// cluster, with a list of 10,000 providers (about 3 MB, written by `populate`): the first
/// list arrives, a change reaches it, and after its connections are cut and restored its
/// re-read completes.
#[allow(
    clippy::await_holding_lock,
    reason = "the shared cluster's guard keeps the tests of this binary from running at once; each has its own runtime"
)]
pub async fn slow_link_with_a_large_list(test: &str, populate: Populate) {
    const N: u32 = 10_000;
    const RATE: u64 = 1_000_000;
    let Some(mut c) = tokio::task::block_in_place(|| Cluster::shared(KIND, test)) else {
        return;
    };
    tokio::task::block_in_place(|| c.wait_leader(LOST)).expect("a leader");
    let proxies = Proxies::new(&c).await;
    proxies.each(|p| p.limit(Some(RATE)));
    let service = unique_service("cluster-slow");
    // The provider of the 10,000 is not under test: a longer session keeps the load of
    // writing them from costing it its lease (and a restore of everything).
    let a = open_url(format!(
        "{SCHEME}://{}?session=30000",
        c.addresses().join(",")
    ))
    .await;
    let mut want: Vec<Url> = (0..N).map(|i| big_provider(&service, i)).collect();
    let t = Instant::now();
    populate(a.clone(), c.addresses(), want.clone()).await;
    eprintln!("{test}: {N} providers written in {:.1?}", t.elapsed());
    let mut times = Vec::new();

    let b = open(&proxies.addresses()).await;
    let seen = Recorder::new();
    let t = Instant::now();
    b.subscribe(&consumer(&service, ""), seen.listener())
        .await
        .expect("subscribe over the slow link");
    seen.wait_for_entries(&service, PROVIDERS_CATEGORY, &want, LOST)
        .await;
    let first = t.elapsed();
    let bytes = proxies.0.iter().map(|p| p.forwarded().1).sum::<u64>();
    eprintln!("{test}: first list: {bytes} bytes to the subscriber at {RATE} B/s in {first:.1?}");
    times.push(("first list of 10,000 over the slow link".into(), first));

    // A change: 10 providers go.
    let gone: Vec<Url> = want.drain(..10).collect();
    for u in &gone {
        a.unregister(u).await.expect("unregister");
    }
    let t = Instant::now();
    seen.wait_for_entries(&service, PROVIDERS_CATEGORY, &want, LOST)
        .await;
    times.push(("a change over the slow link".into(), t.elapsed()));

    // Its connections cut and restored: it reconnects and reads again over the slow link; a
    // change meanwhile.
    proxies.each(Proxy::cut);
    let extra = big_provider(&service, N);
    a.register(&extra).await.expect("register");
    want.push(extra);
    let t = Instant::now();
    proxies.each(Proxy::restore);
    seen.wait_for_entries(&service, PROVIDERS_CATEGORY, &want, LOST)
        .await;
    times.push((
        "current after a reconnect over the slow link".into(),
        t.elapsed(),
    ));
    eprintln!(
        "{test}: {} bytes to the subscriber in all",
        proxies.0.iter().map(|p| p.forwarded().1).sum::<u64>()
    );
    b.destroy().await;
    a.destroy().await;
    check_targets(test, &times);
}
