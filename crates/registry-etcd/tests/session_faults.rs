//! Session faults that need no cluster, each on its own etcd (or the shared one where it is
//! not disturbed): the granted lease TTL, unregister of an entry another registry put since,
//! a watch etcd refuses on one prefix, and reconnections that must not authenticate again.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{DEADLINE, EventLog, OwnEtcd, Proxy, lease_of, raw, raw_as, registry};
use etcd_client::{Permission, RoleRevokePermissionOptions};
use registry_core::testkit::{Recorder, consumer, provider, unique_service, wait_until};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Error, Registry, RegistryEvent, RegistryManager, Url, encode};
use registry_etcd::EtcdRegistry;
use registry_test_servers::{Kind, shared_address};

fn entry_key(group: &str, service: &str, u: &Url) -> String {
    format!(
        "/{group}/{}/{}/{}",
        encode(service),
        u.category(),
        encode(&u.to_full_string())
    )
}

/// The sum of the samples of `metric` whose labels contain `label`, from etcd's `/metrics`.
fn metric(addr: &str, metric: &str, label: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connection");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("metrics request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .filter(|l| l.starts_with(metric) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn authentications(addr: &str) -> f64 {
    metric(
        addr,
        "grpc_server_started_total",
        "grpc_method=\"Authenticate\"",
    )
}

fn watch_streams(addr: &str) -> f64 {
    metric(addr, "grpc_server_started_total", "grpc_method=\"Watch\"")
}

/// etcd grants at least its minimum TTL (1.5 election timeouts: 8 s with a 500 ms heartbeat
/// and a 5 s election timeout), more than `session=4000` asks (2 s). A cut of 4 s, longer
/// than the requested TTL but shorter than the granted one, must not be taken for a lost
/// lease: the registry reconnects with the same lease, reports no `SessionLost`, and the
/// entry never leaves its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_granted_ttl_counts_not_the_requested_one() {
    let Some(etcd) = OwnEtcd::start(
        "granted_ttl",
        &["--heartbeat-interval", "500", "--election-timeout", "5000"],
    ) else {
        return;
    };
    let addr = etcd.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let s = unique_service("granted");
    let r = registry(&format!(
        "etcd://{}?session=4000&timeout=1000",
        proxy.address()
    ))
    .await;
    let log = EventLog::attach(&r);
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    let mut rawc = raw(&addr).await;
    let key = entry_key("dubbo", &s, &p);
    let lease = lease_of(&mut rawc, &key).await.expect("entry");
    let granted = rawc
        .lease_time_to_live(lease, None)
        .await
        .expect("lease ttl")
        .granted_ttl();
    assert!(
        granted >= 5,
        "the premise: etcd grants more than the 2 s asked, here {granted} s"
    );

    let cut = Instant::now();
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let healed = Instant::now();
    proxy.restore();
    let back = log
        .wait_for(RegistryEvent::Reconnected, healed, DEADLINE)
        .await;
    eprintln!(
        "granted {granted} s for 2 s asked: cut 4 s, Reconnected {:?} after healing; events {:?}",
        back - healed,
        log.events()
    );
    assert_eq!(
        log.first_after(RegistryEvent::SessionLost, cut),
        None,
        "no SessionLost within the granted TTL: {:?}",
        log.events()
    );
    assert_eq!(lease_of(&mut rawc, &key).await, Some(lease), "same lease");
    r.destroy().await;
}

/// Fault 8 on one server: a provider restarts on the same host:port (same URL) and the new
/// instance registers before the old instance's unregister arrives. The late unregister
/// deletes nothing: the entry is on the new instance's lease. The new instance's unregister
/// deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_unregister_of_an_old_instance_keeps_the_new_instances_entry() {
    common::init_tracing();
    let Some(addr) = shared_address(Kind::Etcd, "late_unregister") else {
        return;
    };
    let s = unique_service("restart");
    let group = format!("kit-own-{}", s.rsplit('.').next().unwrap_or("x"));
    let url = format!("etcd://{addr}?session=60000&file=false&group={group}");
    let old = registry(&url).await;
    let new = registry(&url).await;
    let p = provider(&s, 1, "");
    let key = entry_key(&group, &s, &p);
    let mut rawc = raw(&addr).await;

    old.register(&p).await.expect("old instance registers");
    let old_lease = lease_of(&mut rawc, &key).await.expect("entry");
    new.register(&p).await.expect("new instance registers");
    let new_lease = lease_of(&mut rawc, &key).await.expect("entry");
    assert_ne!(old_lease, new_lease, "the new instance's put moved the key");

    old.unregister(&p).await.expect("late unregister");
    assert_eq!(
        lease_of(&mut rawc, &key).await,
        Some(new_lease),
        "the old instance's late unregister must not delete the new instance's entry"
    );
    // Nor does the old instance's end (its lease revoked).
    old.destroy().await;
    assert_eq!(lease_of(&mut rawc, &key).await, Some(new_lease));

    new.unregister(&p).await.expect("unregister");
    assert_eq!(
        lease_of(&mut rawc, &key).await,
        None,
        "the owner deletes it"
    );

    // Persistent entries (no lease) are deleted by an unregister of any registry.
    let q = provider(&s, 2, "dynamic=false");
    new.register(&q).await.expect("register persistent");
    let qkey = entry_key(&group, &s, &q);
    assert_eq!(lease_of(&mut rawc, &qkey).await, Some(0));
    let third = registry(&url).await;
    third.unregister(&q).await.expect("unregister persistent");
    assert_eq!(lease_of(&mut rawc, &qkey).await, None);
    third.destroy().await;
    new.destroy().await;
}

/// Sets up etcd authentication: `root`, and `app` whose role may read and write the
/// sentinels of group `g` and the services `services` only.
async fn app_user(addr: &str, group: &str, services: &[&str]) {
    let mut rawc = raw(addr).await;
    common::add_root(&mut rawc).await;
    rawc.user_add("app", "apppw", None).await.expect("user add");
    rawc.role_add("app").await.expect("role add");
    let mut prefixes = vec![format!("/.registry-leases/{group}/")];
    prefixes.extend(services.iter().map(|s| format!("/{group}/{}/", encode(s))));
    for p in prefixes {
        rawc.role_grant_permission("app", Permission::read_write(p).with_prefix())
            .await
            .expect("grant");
    }
    rawc.user_grant_role("app", "app")
        .await
        .expect("grant role");
    rawc.auth_enable().await.expect("auth enable");
}

/// A user whose role may use only some prefixes under the root connects with the default
/// check (`check=true`): the check's read of the root is refused with "permission denied",
/// which says etcd answered and took the credentials. The user then works on its prefixes.
/// A wrong password and missing credentials are still refused when connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_allowed_only_some_prefixes_connects_with_the_check() {
    let Some(etcd) = OwnEtcd::start("some_prefixes", &[]) else {
        return;
    };
    let addr = etcd.address();
    let s = unique_service("allowed");
    let group = "part";
    app_user(&addr, group, &[&s]).await;
    let r = registry(&format!(
        "etcd://app:apppw@{addr}?session=6000&group={group}"
    ))
    .await;
    assert!(r.is_available(), "connected at once");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, "category=providers"), rec.listener())
        .await
        .expect("subscribe on an allowed prefix");
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register on an allowed prefix");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
        .await;
    for (what, url) in [
        (
            "wrong password",
            format!("etcd://app:wrong@{addr}?group={group}"),
        ),
        ("no credentials", format!("etcd://{addr}?group={group}")),
    ] {
        match RegistryManager::new().get_registry(&url).await {
            Err(e @ Error::AccessDenied { .. }) => eprintln!("{what}: {e}"),
            other => panic!("{what}: expected AccessDenied, got {:?}", other.err()),
        }
    }
    r.destroy().await;
}

/// The auth token goes bad (the user's password is changed: etcd refuses every token of the
/// older auth revision) and authenticating again fails (the registry has the old password)
/// for 12 s, four lease TTLs, with a broken connection at the start: the registry's
/// authentications are paced (1 s, 2 s, 4 s, 8 s apart), but keep-alives need no token and
/// the lease is renewed while they wait. Once the password is back, the registry authenticates,
/// its entry is still on its first lease, and it never reported `SessionLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_authentication_waits() {
    let Some(etcd) = OwnEtcd::start("renewed_while_auth_waits", &[]) else {
        return;
    };
    let addr = etcd.address();
    let s = unique_service("authwait");
    let group = "authwait";
    app_user(&addr, group, &[&s]).await;
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = registry(&format!(
        "etcd://app:apppw@{}?session=6000&group={group}",
        proxy.address()
    ))
    .await;
    let log = EventLog::attach(&r);
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    let key = entry_key(group, &s, &p);
    let admin = || raw_as(&addr, Some(("root", "rootpw")));
    let first = lease_of(&mut admin().await, &key).await.expect("the entry");
    assert_ne!(first, 0, "the entry is on a lease");

    admin()
        .await
        .user_change_password("app", "changed")
        .await
        .expect("change the password");
    let cut = Instant::now();
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();
    // The fault lasts 12 s (4 TTLs), measured from the cut.
    while cut.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = lease_of(&mut admin().await, &key).await;
        assert_eq!(
            now,
            Some(first),
            "{:?} after the cut, while authentication fails: the entry left its lease; events {:?}",
            cut.elapsed(),
            log.events()
        );
    }
    admin()
        .await
        .user_change_password("app", "apppw")
        .await
        .expect("restore the password");
    let p2 = provider(&s, 2, "");
    wait_until("a register with the password back", DEADLINE, || async {
        r.register(&p2).await.is_ok()
    })
    .await;
    assert_eq!(lease_of(&mut admin().await, &key).await, Some(first));
    let events = log.events();
    eprintln!("authentication failing for 12 s: events {events:?}");
    assert!(
        !events.contains(&RegistryEvent::SessionLost),
        "the lease was renewed: {events:?}"
    );
    r.destroy().await;
}

/// Fault 10: the permission on one watched prefix is revoked, then the connection breaks
/// (so every watch is created again on a new stream). etcd refuses that one watch; the other
/// subscription keeps working, and the registry neither loops reconnecting nor
/// authenticating again (counted on etcd's own metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_disturbs_no_other_subscription_and_loops_nowhere() {
    let Some(etcd) = OwnEtcd::start("refused_watch", &[]) else {
        return;
    };
    let addr = etcd.address();
    let (a, b) = (unique_service("allowed"), unique_service("revoked"));
    let group = "perm";
    app_user(&addr, group, &[&a, &b]).await;
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let r = registry(&format!(
        "etcd://app:apppw@{}?session=6000&group={group}",
        proxy.address()
    ))
    .await;
    let root = registry(&format!("etcd://root:rootpw@{addr}?group={group}")).await;
    wait_until("the app registry connects", DEADLINE, || async {
        r.is_available()
    })
    .await;
    let log = EventLog::attach(&r);
    let (seen_a, seen_b) = (Recorder::new(), Recorder::new());
    r.subscribe(&consumer(&a, "category=providers"), seen_a.listener())
        .await
        .expect("subscribe a");
    r.subscribe(&consumer(&b, "category=providers"), seen_b.listener())
        .await
        .expect("subscribe b");
    let pa1 = provider(&a, 1, "");
    root.register(&pa1).await.expect("register");
    seen_a
        .wait_for_entries(&a, PROVIDERS_CATEGORY, std::slice::from_ref(&pa1), DEADLINE)
        .await;

    let mut admin = raw_as(&addr, Some(("root", "rootpw"))).await;
    admin
        .role_revoke_permission(
            "app",
            format!("/{group}/{}/", encode(&b)),
            Some(RoleRevokePermissionOptions::new().with_prefix()),
        )
        .await
        .expect("revoke the permission on b");
    let cut = Instant::now();
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    log.wait_for(RegistryEvent::Reconnected, cut, DEADLINE)
        .await;
    let (auth0, streams0) = (authentications(&addr), watch_streams(&addr));
    assert!(
        auth0 >= 1.0 && streams0 >= 1.0,
        "etcd's metrics count authentications and watch streams"
    );
    let pa2 = provider(&a, 2, "");
    root.register(&pa2).await.expect("register");
    let t = Instant::now();
    seen_a
        .wait_for_entries(
            &a,
            PROVIDERS_CATEGORY,
            &[pa1.clone(), pa2.clone()],
            DEADLINE,
        )
        .await;
    let current = t.elapsed();
    // Long enough for a loop (the old behaviour authenticated again about every second).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let pa3 = provider(&a, 3, "");
    root.register(&pa3).await.expect("register");
    seen_a
        .wait_for_entries(
            &a,
            PROVIDERS_CATEGORY,
            &[pa1.clone(), pa2.clone(), pa3.clone()],
            DEADLINE,
        )
        .await;
    let (auth1, streams1) = (authentications(&addr), watch_streams(&addr));
    eprintln!(
        "refused watch: the other subscription current {current:?} after a change; in 6 s: \
         {} authentications, {} watch streams opened; events {:?}",
        auth1 - auth0,
        streams1 - streams0,
        log.events()
    );
    assert!(
        auth1 - auth0 <= 1.0,
        "no authentication loop: {} in 6 s",
        auth1 - auth0
    );
    assert!(
        streams1 - streams0 <= 1.0,
        "no reconnection loop: {} watch streams in 6 s",
        streams1 - streams0
    );
    let disconnects = log
        .events()
        .iter()
        .filter(|e| **e == RegistryEvent::Disconnected)
        .count();
    assert_eq!(disconnects, 1, "only the cut: {:?}", log.events());
    r.destroy().await;
    root.destroy().await;
}

/// A registry of a user allowed one service's prefix, through a proxy, with the periodic
/// re-read off (`etcd.reread.period=0`), subscribed to that service's providers: what the
/// refused-watch tests share.
struct OnePrefix {
    _etcd: OwnEtcd,
    addr: String,
    service: String,
    group: &'static str,
    proxy: Proxy,
    typed: std::sync::Arc<EtcdRegistry>,
    r: std::sync::Arc<dyn Registry>,
    log: EventLog,
    seen: std::sync::Arc<Recorder>,
}

impl OnePrefix {
    async fn start(name: &str, group: &'static str) -> Option<OnePrefix> {
        let etcd = OwnEtcd::start(name, &[])?;
        let addr = etcd.address();
        let service = unique_service(group);
        app_user(&addr, group, &[&service]).await;
        let proxy = Proxy::start(&addr).await.expect("proxy");
        let (typed, r) = typed(&format!(
            "etcd://app:apppw@{}?session=6000&group={group}&etcd.reread.period=0",
            proxy.address()
        ))
        .await;
        let log = EventLog::attach(&r);
        let seen = Recorder::new();
        r.subscribe(&consumer(&service, "category=providers"), seen.listener())
            .await
            .expect("subscribe");
        Some(OnePrefix {
            _etcd: etcd,
            addr,
            service,
            group,
            proxy,
            typed,
            r,
            log,
            seen,
        })
    }

    /// A new root client (each one authenticates anew: a client from before a cut may hold
    /// a token the cut made it lose).
    async fn admin(&self) -> etcd_client::Client {
        raw_as(&self.addr, Some(("root", "rootpw"))).await
    }

    fn prefix(&self) -> String {
        format!("/{}/{}/", self.group, encode(&self.service))
    }

    /// Puts provider `n` of the service (as root).
    async fn put(&self, n: u8) -> Url {
        let p = provider(&self.service, n, "");
        self.admin()
            .await
            .put(
                entry_key(self.group, &self.service, &p),
                p.to_full_string(),
                None,
            )
            .await
            .expect("put");
        p
    }

    async fn revoke(&self) {
        self.admin()
            .await
            .role_revoke_permission(
                "app",
                self.prefix(),
                Some(RoleRevokePermissionOptions::new().with_prefix()),
            )
            .await
            .expect("revoke");
    }

    async fn grant(&self) {
        self.admin()
            .await
            .role_grant_permission("app", Permission::read_write(self.prefix()).with_prefix())
            .await
            .expect("grant again");
    }

    /// Breaks the registry's connection (the watch is created again on a new stream) and
    /// waits for it to reconnect.
    async fn cut(&self) {
        let cut = Instant::now();
        self.proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.proxy.restore();
        self.log
            .wait_for(RegistryEvent::Reconnected, cut, DEADLINE)
            .await;
    }
}

/// A watch etcd refused (the permission on its prefix revoked, then a broken connection so
/// that it is created again) is tried again with a jittered, growing delay, also with the
/// periodic re-read off (`etcd.reread.period=0`): once the permission is granted again, the
/// subscription gets the list and later changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_is_tried_again_until_etcd_accepts_it() {
    let Some(t) = OnePrefix::start("refused_watch_retried", "regranted").await else {
        return;
    };
    let (b, seen) = (&t.service, &t.seen);
    let p1 = t.put(1).await;
    seen.wait_for_entries(b, PROVIDERS_CATEGORY, std::slice::from_ref(&p1), DEADLINE)
        .await;

    t.revoke().await;
    let (_, refusals, again) = t.typed.retry_counts();
    t.cut().await;
    let p2 = t.put(2).await;
    // The watch was created again on the new stream and refused, and its prefix read again
    // (refused too): the change does not arrive.
    wait_until(
        "a refusal, then a read again of the prefix",
        DEADLINE,
        || async {
            let (_, r, a) = t.typed.retry_counts();
            r > refusals && a > again
        },
    )
    .await;
    assert_eq!(
        seen.latest_entries(b, PROVIDERS_CATEGORY),
        Some(vec![p1.clone()]),
        "precondition: etcd refused the watch after the revocation"
    );
    t.grant().await;
    let granted = Instant::now();
    seen.wait_for_entries(b, PROVIDERS_CATEGORY, &[p1.clone(), p2.clone()], DEADLINE)
        .await;
    let p3 = t.put(3).await;
    seen.wait_for_entries(b, PROVIDERS_CATEGORY, &[p1, p2, p3], DEADLINE)
        .await;
    eprintln!(
        "refused watch tried again: the list {:?} after the grant; events {:?}",
        granted.elapsed(),
        t.log.events()
    );
    t.r.destroy().await;
}

/// A registry without the failback layer, with its handle for the background counters.
async fn typed(url: &str) -> (std::sync::Arc<EtcdRegistry>, std::sync::Arc<dyn Registry>) {
    let url: Url = url.parse().expect("url");
    let typed = std::sync::Arc::new(EtcdRegistry::new(url).await.expect("registry"));
    let r: std::sync::Arc<dyn Registry> = typed.clone();
    (typed, r)
}

/// A watch etcd refuses, then the stream opened again three times (each time the watch is
/// created again and refused again): the watch has one retry, not one more per reopened
/// stream, and its subscription is served once the permission is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_has_one_retry_however_often_the_stream_is_opened_again() {
    let Some(t) = OnePrefix::start("refused_watch_one_retry", "oneretry").await else {
        return;
    };
    t.revoke().await;
    for round in 1..=3 {
        let (_, refusals, _) = t.typed.retry_counts();
        t.cut().await;
        wait_until("etcd refuses the watch again", DEADLINE, || async {
            t.typed.retry_counts().1 > refusals
        })
        .await;
        // The refusal is counted before its retry starts and an aborted retry ends a moment
        // later: the count settles at one (every stale retry sleeps longer than this wait).
        wait_until(
            "one retry of the refused watch",
            Duration::from_millis(400),
            || async { t.typed.retry_counts().0 == 1 },
        )
        .await;
        eprintln!("round {round}: one retry of the refused watch");
    }
    t.grant().await;
    let p1 = t.put(1).await;
    t.seen
        .wait_for_entries(
            &t.service,
            PROVIDERS_CATEGORY,
            std::slice::from_ref(&p1),
            Duration::from_secs(40),
        )
        .await;
    wait_until(
        "the retry ends once etcd accepts the watch",
        DEADLINE,
        || async { t.typed.retry_counts().0 == 0 },
    )
    .await;
    t.r.unsubscribe(
        &consumer(&t.service, "category=providers"),
        &t.seen.listener(),
    )
    .await
    .expect("unsubscribe");
    t.r.destroy().await;
}

/// The auth token expires while the registry is idle (etcd drops a simple token
/// `--auth-token-ttl` seconds after its last use; keep-alives and watch events do not use
/// it). A subscription then meets the stale token, the registry authenticates again in place
/// (the watch stream stays), and the new watch, created on the stream opened with the old
/// token, is refused: the registry opens its streams again with a good token, and the
/// subscription gets its changes, without a `Disconnected`. etcd 3.4.23 refuses that watch
/// with "invalid auth token" (authenticate again); releases that say "permission denied"
/// instead are told apart by the probe read, which succeeds, and the streams are opened
/// again without authenticating (that answer cannot be produced with the server here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_refused_for_the_streams_stale_token_is_created_on_new_streams() {
    let Some(etcd) = OwnEtcd::start("stale_stream_token", &["--auth-token-ttl", "2"]) else {
        return;
    };
    let addr = etcd.address();
    common::enable_auth(&addr).await;
    let (first, second) = (unique_service("stale1"), unique_service("stale2"));
    let (_typed, r) = typed(&format!(
        "etcd://root:rootpw@{addr}?session=60000&timeout=2000&etcd.reread.period=0"
    ))
    .await;
    let log = EventLog::attach(&r);
    let (seen1, seen2) = (Recorder::new(), Recorder::new());
    r.subscribe(&consumer(&first, "category=providers"), seen1.listener())
        .await
        .expect("subscribe");
    let mut admin = raw_as(&addr, Some(("root", "rootpw"))).await;
    let p1 = provider(&first, 1, "");
    admin
        .put(entry_key("dubbo", &first, &p1), p1.to_full_string(), None)
        .await
        .expect("put");
    seen1
        .wait_for_entries(
            &first,
            PROVIDERS_CATEGORY,
            std::slice::from_ref(&p1),
            DEADLINE,
        )
        .await;

    // The fault: idle for longer than the token's TTL (etcd checks token deadlines every
    // second).
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let since = Instant::now();
    let failures = std::sync::atomic::AtomicUsize::new(0);
    wait_until("a subscription with a fresh token", DEADLINE, || async {
        let ok = r
            .subscribe(&consumer(&second, "category=providers"), seen2.listener())
            .await
            .is_ok();
        if !ok {
            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    })
    .await;
    assert!(
        failures.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "precondition: the token had expired (the first subscribe met it)"
    );
    let p2 = provider(&second, 1, "");
    let mut admin = raw_as(&addr, Some(("root", "rootpw"))).await;
    admin
        .put(entry_key("dubbo", &second, &p2), p2.to_full_string(), None)
        .await
        .expect("put");
    seen2
        .wait_for_entries(
            &second,
            PROVIDERS_CATEGORY,
            std::slice::from_ref(&p2),
            DEADLINE,
        )
        .await;
    let p3 = provider(&first, 3, "");
    admin
        .put(entry_key("dubbo", &first, &p3), p3.to_full_string(), None)
        .await
        .expect("put");
    seen1
        .wait_for_entries(
            &first,
            PROVIDERS_CATEGORY,
            &[p1.clone(), p3.clone()],
            DEADLINE,
        )
        .await;
    eprintln!(
        "stale stream token: the new subscription served {:?} after the token expired; events {:?}",
        since.elapsed(),
        log.events()
    );
    assert!(
        !log.events().contains(&RegistryEvent::Disconnected),
        "opening the streams again is no disconnection: {:?}",
        log.events()
    );
    r.destroy().await;
}

/// A reconnection does not authenticate again while the token is good (Authenticate costs
/// etcd a bcrypt; a fleet reconnecting at once would stampede it): three breaks, no
/// authentication. A token made bad by a restart of etcd still leads to one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnections_authenticate_only_when_the_token_is_bad() {
    let Some(etcd) = OwnEtcd::start("reconnect_no_auth", &[]) else {
        return;
    };
    let addr = etcd.address();
    common::enable_auth(&addr).await;
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let s = unique_service("noauth");
    let r = registry(&format!(
        "etcd://root:rootpw@{}?session=20000",
        proxy.address()
    ))
    .await;
    let log = EventLog::attach(&r);
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let before = authentications(&addr);
    assert!(before >= 1.0, "etcd's metrics count authentications");
    for i in 1..=3u8 {
        let cut = Instant::now();
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.restore();
        log.wait_for(RegistryEvent::Reconnected, cut, DEADLINE)
            .await;
        let p = provider(&s, i, "");
        r.register(&p).await.expect("register after a reconnection");
    }
    let want: Vec<Url> = (1..=3).map(|i| provider(&s, i, "")).collect();
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    let after = authentications(&addr);
    eprintln!("3 reconnections: {} authentications", after - before);
    assert_eq!(after - before, 0.0, "no authentication for a good token");
    r.destroy().await;
}

/// Watchers etcd has open (its own gauge).
fn watchers(addr: &str) -> f64 {
    metric(addr, "etcd_debugging_mvcc_watcher_total", "")
}

/// Range requests etcd has served.
fn ranges(addr: &str) -> f64 {
    metric(addr, "grpc_server_handled_total", "grpc_method=\"Range\"")
}

/// Twelve subscriptions of one service (ten with the same query, two that add `routers`)
/// need two prefixes: etcd holds two watchers for them (plus the registry's lease anchor),
/// not one per subscription and category, and the periodic re-read reads each prefix once.
/// Every subscription still gets every change; the last unsubscribe cancels the watchers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_share_one_watch_and_one_periodic_read_per_prefix() {
    let Some(etcd) = OwnEtcd::start("shared_watches", &[]) else {
        return;
    };
    let addr = etcd.address();
    let s = unique_service("shared");
    let r = registry(&format!(
        "etcd://{addr}?session=60000&etcd.reread.period=1000&file=false"
    ))
    .await;
    // The session task opens the stream with the lease anchor watch right after `new`.
    wait_until(
        "etcd's gauge counts the lease anchor watch",
        DEADLINE,
        || async { watchers(&addr) == 1.0 },
    )
    .await;
    let base = watchers(&addr);
    let mut recs = Vec::new();
    for i in 0..12 {
        let rec = Recorder::new();
        let query = if i < 10 {
            consumer(&s, "category=providers")
        } else {
            consumer(&s, "category=providers,routers")
        };
        r.subscribe(&query, rec.listener())
            .await
            .expect("subscribe");
        recs.push((query, rec));
    }
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    for (_, rec) in &recs {
        rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
            .await;
    }
    let held = watchers(&addr) - base;
    let before = ranges(&addr);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let reads = ranges(&addr) - before;
    eprintln!(
        "12 subscriptions on 2 prefixes: {held} watchers; periodic re-read (every 1 s) made {reads} range reads in 3.2 s"
    );
    assert_eq!(held, 2.0, "one watcher per prefix");
    assert!(
        (2.0..=8.0).contains(&reads),
        "each prefix read once per period: {reads} reads in 3.2 s"
    );
    for (query, rec) in &recs {
        r.unsubscribe(query, &rec.listener())
            .await
            .expect("unsubscribe");
    }
    wait_until("the watchers cancelled", DEADLINE, || async {
        watchers(&addr) == base
    })
    .await;
    r.destroy().await;
}

/// A lease lost while the connection works (revoked from outside) is replaced on the same
/// connection: `SessionLost` then `NewSession`, every entry back on the new lease, and the
/// watch stream with its watches stays (etcd counts no new watch stream; the subscription
/// keeps seeing changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_replaced_on_the_same_watch_stream() {
    let Some(etcd) = OwnEtcd::start("lease_replaced_in_place", &[]) else {
        return;
    };
    let addr = etcd.address();
    let s = unique_service("inplace");
    let r = registry(&format!("etcd://{addr}?session=60000&file=false")).await;
    let log = EventLog::attach(&r);
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let p1 = provider(&s, 1, "");
    r.register(&p1).await.expect("register");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p1), DEADLINE)
        .await;
    let mut rawc = raw(&addr).await;
    let key = entry_key("dubbo", &s, &p1);
    let old = lease_of(&mut rawc, &key).await.expect("entry");
    let streams = watch_streams(&addr);
    assert!(streams >= 1.0, "etcd's metrics count watch streams");

    let revoked = Instant::now();
    rawc.lease_revoke(old).await.expect("revoke from outside");
    log.wait_for(RegistryEvent::NewSession, revoked, DEADLINE)
        .await;
    wait_until("the entry on a new lease", DEADLINE, || {
        let (addr, key) = (addr.clone(), key.clone());
        async move {
            matches!(lease_of(&mut raw(&addr).await, &key).await, Some(l) if l != 0 && l != old)
        }
    })
    .await;
    let back = revoked.elapsed();
    let p2 = provider(&s, 2, "");
    r.register(&p2).await.expect("register");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[p1.clone(), p2.clone()], DEADLINE)
        .await;
    eprintln!(
        "lease revoked from outside: entry on a new lease after {back:?}; watch streams opened meanwhile: {}; events {:?}",
        watch_streams(&addr) - streams,
        log.events()
    );
    assert_eq!(
        watch_streams(&addr),
        streams,
        "the watch stream stays when only the lease is replaced"
    );
    assert!(
        !log.events().contains(&RegistryEvent::Disconnected),
        "{:?}",
        log.events()
    );
    r.destroy().await;
}
