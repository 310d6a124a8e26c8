//! Fault tests, each on its own private etcd (registry-test-servers) so the shared one is
//! not disturbed: restart within the TTL, down longer than the TTL, a partition longer than
//! the TTL, compaction while disconnected, authentication, a 10,000-entry list, and
//! `check=false` connecting in the background.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEADLINE, EventLog, Proxy, keys_under, lease_of, raw, raw_as, registry};
use registry_core::testkit::{Recorder, consumer, provider, unique_service, wait_until};
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Error, Registry, RegistryEvent, RegistryManager, Url, encode};
use registry_etcd::EtcdRegistry;
use registry_test_servers::{Server, required};

fn private_server(test: &str) -> Option<Server> {
    common::init_tracing();
    // The servers pick a free port and bind it later; another test may take it meanwhile.
    let mut last = String::new();
    for _ in 0..3 {
        match tokio::task::block_in_place(Server::etcd) {
            Ok(s) => return Some(s),
            Err(e) => last = e,
        }
    }
    if required() {
        panic!("{test}: cannot start a private etcd: {last}");
    }
    eprintln!("{test}: skipped, cannot start a private etcd: {last}");
    None
}

fn restart(server: &mut Server) {
    let mut last = String::new();
    for _ in 0..5 {
        match tokio::task::block_in_place(|| server.start()) {
            Ok(()) => return,
            // Its port may have been taken meanwhile (another test's client or proxy).
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("etcd does not restart: {last}");
}

fn entry_key(service: &str, u: &Url) -> String {
    format!(
        "/dubbo/{}/{}/{}",
        encode(service),
        u.category(),
        encode(&u.to_full_string())
    )
}

const WILDCARD: &str =
    "consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*&category=providers";

/// etcd killed and restarted within the TTL: no entry vanishes (the lease survives), the
/// registries report Disconnected then Reconnected, and every subscription sees changes made
/// after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_within_ttl_keeps_entries_and_subscriptions() {
    let Some(mut server) = private_server("restart_within_ttl") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("restart");
    // TTL 10 s.
    let a = registry(&format!("etcd://{addr}?session=20000")).await;
    let b = registry(&format!("etcd://{addr}?session=20000")).await;
    let (a_log, b_log) = (EventLog::attach(&a), EventLog::attach(&b));
    let p1 = provider(&s, 1, "");
    let p2 = provider(&s, 2, "dynamic=false");
    a.register(&p1).await.expect("register");
    a.register(&p2).await.expect("register");
    let mut rawc = raw(&addr).await;
    let lease_before = lease_of(&mut rawc, &entry_key(&s, &p1))
        .await
        .expect("entry");
    let on_a = Recorder::new();
    let on_b = Recorder::new();
    let wild = Recorder::new();
    a.subscribe(&consumer(&s, ""), on_a.listener())
        .await
        .expect("subscribe");
    b.subscribe(&consumer(&s, ""), on_b.listener())
        .await
        .expect("subscribe");
    b.subscribe(&WILDCARD.parse().expect("url"), wild.listener())
        .await
        .expect("subscribe");
    let both = [p1.clone(), p2.clone()];
    on_b.wait_for_entries(&s, PROVIDERS_CATEGORY, &both, DEADLINE)
        .await;

    let stopped = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    let down = a_log
        .wait_for(RegistryEvent::Disconnected, stopped, DEADLINE)
        .await;
    restart(&mut server);
    let started = Instant::now();
    eprintln!(
        "etcd restart: Disconnected {:?} after the kill, etcd back {:?} after the kill",
        down - stopped,
        started - stopped
    );
    let a_back = a_log
        .wait_for(RegistryEvent::Reconnected, stopped, DEADLINE)
        .await;
    let b_back = b_log
        .wait_for(RegistryEvent::Reconnected, stopped, DEADLINE)
        .await;
    eprintln!(
        "etcd restart: Reconnected {:?} (a) and {:?} (b) after etcd was back, {:?} after the kill",
        a_back.saturating_duration_since(started),
        b_back.saturating_duration_since(started),
        a_back.max(b_back) - stopped
    );
    assert!(a.is_available() && b.is_available());
    for log in [&a_log, &b_log] {
        let ev = log.events();
        assert!(
            !ev.contains(&RegistryEvent::SessionLost) && !ev.contains(&RegistryEvent::NewSession),
            "the lease survived a restart within its TTL: {ev:?}"
        );
    }

    let mut rawc = raw(&addr).await;
    assert_eq!(
        lease_of(&mut rawc, &entry_key(&s, &p1)).await,
        Some(lease_before),
        "the dynamic entry is still there on its lease"
    );
    assert_eq!(lease_of(&mut rawc, &entry_key(&s, &p2)).await, Some(0));

    // Changes after the restart reach every subscription, from a raw client and a registry.
    let p3 = provider(&s, 3, "");
    let written = Instant::now();
    rawc.put(entry_key(&s, &p3), p3.to_full_string(), None)
        .await
        .expect("raw put");
    let all = [p1.clone(), p2.clone(), p3.clone()];
    on_a.wait_for_entries(&s, PROVIDERS_CATEGORY, &all, DEADLINE)
        .await;
    on_b.wait_for_entries(&s, PROVIDERS_CATEGORY, &all, DEADLINE)
        .await;
    wild.wait_for_entries(&s, PROVIDERS_CATEGORY, &all, DEADLINE)
        .await;
    eprintln!(
        "etcd restart: a change after the restart reached all 3 subscriptions in {:?}",
        written.elapsed()
    );
    let p4 = provider(&s, 4, "");
    a.register(&p4).await.expect("register after restart");
    let all4 = [p1.clone(), p2.clone(), p3.clone(), p4.clone()];
    on_b.wait_for_entries(&s, PROVIDERS_CATEGORY, &all4, DEADLINE)
        .await;
    wild.wait_for_entries(&s, PROVIDERS_CATEGORY, &all4, DEADLINE)
        .await;
    for rec in [&on_a, &on_b] {
        for n in rec.all() {
            assert!(
                n.entries().any(|u| *u == p1),
                "p1 never vanished from a subscription: {n:?}"
            );
        }
    }
    a.destroy().await;
    b.destroy().await;
}

/// etcd down for longer than the TTL, then back: the registry reports SessionLost once the
/// TTL has passed without a renewal, then NewSession when etcd is back (etcd renews leases when
/// it restarts, so the old lease may live on; either way the entries are put again, as
/// FailbackRegistry does), and subscriptions work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_longer_than_ttl_gives_a_new_session() {
    let Some(mut server) = private_server("down_longer_than_ttl") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("longdown");
    // TTL 2 s for the registrant.
    let a = registry(&format!("etcd://{addr}?session=4000&timeout=1000")).await;
    let b = registry(&format!("etcd://{addr}?session=60000&timeout=1000")).await;
    let a_log = EventLog::attach(&a);
    let p1 = provider(&s, 1, "");
    a.register(&p1).await.expect("register");
    let rec = Recorder::new();
    b.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p1), DEADLINE)
        .await;

    let stopped = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    let lost = a_log
        .wait_for(RegistryEvent::SessionLost, stopped, DEADLINE)
        .await;
    eprintln!(
        "etcd down: SessionLost {:?} after the kill (TTL 2 s)",
        lost - stopped
    );
    // The TTL runs from the last renewal, at most one keep-alive period (667 ms) before the kill.
    assert!(
        lost - stopped >= Duration::from_millis(2000 - 667),
        "not before the TTL"
    );
    assert!(!a.is_available());
    match a.register(&provider(&s, 5, "")).await {
        Err(e) => assert!(e.is_retryable(), "a retryable error while down: {e}"),
        Ok(()) => panic!("register while etcd is down"),
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // longer down than the TTL
    restart(&mut server);
    let started = Instant::now();
    let new = a_log
        .wait_for(RegistryEvent::NewSession, stopped, DEADLINE)
        .await;
    eprintln!(
        "etcd down {:?}: NewSession {:?} after etcd was back; events {:?}",
        started - stopped,
        new.saturating_duration_since(started),
        a_log.events()
    );
    assert!(a.is_available());
    // What FailbackRegistry does on NewSession:
    a.register(&p1).await.expect("register again");
    let p2 = provider(&s, 2, "");
    a.register(&p2).await.expect("register");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[p1.clone(), p2.clone()], DEADLINE)
        .await;
    let mut rawc = raw(&addr).await;
    let lease = lease_of(&mut rawc, &entry_key(&s, &p1))
        .await
        .expect("entry");
    assert_ne!(lease, 0);
    let ttl = rawc.lease_time_to_live(lease, None).await.expect("ttl");
    assert_eq!(ttl.granted_ttl(), 2);
    a.destroy().await;
    b.destroy().await;
}

/// A partition longer than the TTL (etcd keeps running): etcd expires the lease and drops
/// the entries; when the partition heals the registry finds the lease gone, grants a new
/// one and reports NewSession; putting the entries again (FailbackRegistry's job) works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_longer_than_ttl_gives_a_new_lease() {
    let Some(server) = private_server("partition_longer_than_ttl") else {
        return;
    };
    let addr = server.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let s = unique_service("partition");
    let a = registry(&format!(
        "etcd://{}?session=4000&timeout=1000",
        proxy.address()
    ))
    .await;
    let b = registry(&format!("etcd://{addr}")).await;
    let a_log = EventLog::attach(&a);
    let p1 = provider(&s, 1, "");
    a.register(&p1).await.expect("register");
    let mut rawc = raw(&addr).await;
    let old = lease_of(&mut rawc, &entry_key(&s, &p1))
        .await
        .expect("entry");
    let rec = Recorder::new();
    let a_rec = Recorder::new();
    b.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    a.subscribe(&consumer(&s, ""), a_rec.listener())
        .await
        .expect("subscribe");

    let cut = Instant::now();
    proxy.cut();
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[], DEADLINE)
        .await;
    eprintln!(
        "partition: etcd expired the lease, the entry vanished {:?} after the cut (TTL 2 s)",
        cut.elapsed()
    );
    a_log
        .wait_for(RegistryEvent::SessionLost, cut, DEADLINE)
        .await;
    // A change a cannot see while cut off.
    let p9 = provider(&s, 9, "");
    rawc.put(entry_key(&s, &p9), p9.to_full_string(), None)
        .await
        .expect("raw put");
    let healed = Instant::now();
    proxy.restore();
    let new = a_log
        .wait_for(RegistryEvent::NewSession, healed, DEADLINE)
        .await;
    eprintln!(
        "partition: NewSession {:?} after healing; events {:?}",
        new - healed,
        a_log.events()
    );
    // The reliability layer re-registers p1 on the new lease by itself; the change made
    // during the cut (p9) is there too.
    let both = [p1.clone(), p9.clone()];
    wait_until("p1 restored beside p9", DEADLINE, || async {
        let mut now = a.lookup(&consumer(&s, "")).await.unwrap_or_default();
        now.sort_by_cached_key(Url::to_full_string);
        now == both
    })
    .await;
    let lease = lease_of(&mut rawc, &entry_key(&s, &p1))
        .await
        .expect("entry");
    assert!(
        lease != 0 && lease != old,
        "a new lease ({lease:x}, old {old:x})"
    );
    let both = [p1.clone(), p9.clone()];
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &both, DEADLINE)
        .await;
    a_rec
        .wait_for_entries(&s, PROVIDERS_CATEGORY, &both, DEADLINE)
        .await;
    a.destroy().await;
    b.destroy().await;
    rawc.delete(entry_key(&s, &p9), None)
        .await
        .expect("clean up");
}

/// Changes and a compaction past a subscription's revision while its stream is broken:
/// the watch cannot resume, so the prefix is read again and the subscriber ends with the
/// true list; later changes are still seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_ends_with_the_true_list() {
    let Some(server) = private_server("compaction_while_disconnected") else {
        return;
    };
    let addr = server.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let s = unique_service("compact");
    let a = registry(&format!(
        "etcd://{}?session=30000&timeout=1000",
        proxy.address()
    ))
    .await;
    let log = EventLog::attach(&a);
    let mut rawc = raw(&addr).await;
    let p: Vec<Url> = (1..=4).map(|i| provider(&s, i, "")).collect();
    rawc.put(entry_key(&s, &p[0]), p[0].to_full_string(), None)
        .await
        .expect("put");
    let rec = Recorder::new();
    let wild = Recorder::new();
    a.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    a.subscribe(&WILDCARD.parse().expect("url"), wild.listener())
        .await
        .expect("subscribe");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &p[..1], DEADLINE)
        .await;

    let cut = Instant::now();
    proxy.cut();
    log.wait_for(RegistryEvent::Disconnected, cut, DEADLINE)
        .await;
    rawc.put(entry_key(&s, &p[1]), p[1].to_full_string(), None)
        .await
        .expect("put");
    rawc.put(entry_key(&s, &p[2]), p[2].to_full_string(), None)
        .await
        .expect("put");
    rawc.delete(entry_key(&s, &p[0]), None)
        .await
        .expect("delete");
    let rev = rawc
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    rawc.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .expect("compact");
    let healed = Instant::now();
    proxy.restore();
    let want = [p[1].clone(), p[2].clone()];
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    wild.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    eprintln!(
        "compaction at revision {rev} while disconnected: the true list {:?} after healing",
        healed.elapsed()
    );
    assert!(log.events().contains(&RegistryEvent::Reconnected));
    let last = rec.latest(&s, PROVIDERS_CATEGORY).expect("latest");
    assert!(
        last.revision >= rev as u64,
        "the list is from after the compaction"
    );
    rawc.put(entry_key(&s, &p[3]), p[3].to_full_string(), None)
        .await
        .expect("put");
    let want = [p[1].clone(), p[2].clone(), p[3].clone()];
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    wild.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    a.destroy().await;
}

/// etcd with authentication on: wrong or missing credentials give `AccessDenied` naming the
/// registry (never the password); the right ones work, also after a restart of etcd (which
/// invalidates the auth token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication() {
    let Some(mut server) = private_server("authentication") else {
        return;
    };
    let addr = server.address();
    {
        let mut rawc = raw(&addr).await;
        rawc.user_add("root", "rootpw", None)
            .await
            .expect("user add");
        let _ = rawc.role_add("root").await;
        rawc.user_grant_role("root", "root")
            .await
            .expect("grant role");
        rawc.auth_enable().await.expect("auth enable");
    }
    let s = unique_service("auth");
    let manager = RegistryManager::new();
    match manager
        .get_registry(format!("etcd://root:wrong@{addr}").as_str())
        .await
    {
        Err(e @ Error::AccessDenied { .. }) => {
            let text = e.to_string();
            eprintln!("wrong password: {text}");
            assert!(text.contains(&addr), "names the registry: {text}");
            assert!(
                !text.contains("wrong"),
                "does not show the password: {text}"
            );
            assert!(!e.is_retryable());
        }
        other => panic!(
            "wrong password: expected AccessDenied, got {:?}",
            other.err()
        ),
    }
    match manager
        .get_registry(format!("etcd://{addr}?group=noauth").as_str())
        .await
    {
        Err(e @ Error::AccessDenied { .. }) => eprintln!("no credentials: {e}"),
        other => panic!(
            "no credentials: expected AccessDenied, got {:?}",
            other.err()
        ),
    }
    let url = format!("etcd://root:rootpw@{addr}?session=20000");
    let r = registry(&url).await;
    let log = EventLog::attach(&r);
    let p1 = provider(&s, 1, "");
    r.register(&p1)
        .await
        .expect("register with the right credentials");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let p2 = provider(&s, 2, "");
    r.register(&p2).await.expect("register");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[p1.clone(), p2.clone()], DEADLINE)
        .await;
    assert_eq!(r.lookup(&consumer(&s, "")).await.expect("lookup").len(), 2);

    // A restart invalidates the token: the registry authenticates again.
    let stopped = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    restart(&mut server);
    log.wait_for(RegistryEvent::Reconnected, stopped, DEADLINE)
        .await;
    let p3 = provider(&s, 3, "");
    wait_until("register after the restart", DEADLINE, || async {
        match r.register(&p3).await {
            Ok(()) => true,
            Err(e) => {
                eprintln!("register after the restart: {e}");
                false
            }
        }
    })
    .await;
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        &[p1.clone(), p2.clone(), p3.clone()],
        DEADLINE,
    )
    .await;
    eprintln!(
        "auth: working again {:?} after the restart; events {:?}",
        stopped.elapsed(),
        log.events()
    );
    let mut rawc = raw_as(&addr, Some(("root", "rootpw"))).await;
    assert_eq!(
        keys_under(&mut rawc, &format!("/dubbo/{}/providers/", encode(&s)))
            .await
            .len(),
        3
    );
    r.destroy().await;
}

fn big_provider(service: &str, i: u32) -> Url {
    let methods: Vec<String> = (0..24).map(|m| format!("operationNumber{m}")).collect();
    format!(
        "dubbo://10.{}.{}.{}:20880/{service}?anyhost=true&application=big-provider&deprecated=false\
         &dubbo=2.0.2&dynamic=true&generic=false&interface={service}&methods={}&pid={}\
         &release=3.2.0&side=provider&timestamp=1700000000000",
        i / 65536,
        (i / 256) % 256,
        i % 256,
        methods.join(","),
        10000 + i
    )
    .parse()
    .expect("url")
}

/// 10,000 providers put by a raw client: a subscription delivers all of them (the range
/// reply is over etcd-client's default 4 MiB limit, so this needs the raised limit), later
/// changes still arrive, and a too-small limit is a clear `TooLarge` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_list_of_ten_thousand_providers() {
    const N: u32 = 10_000;
    let Some(server) = private_server("large_list") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("large");
    let mut rawc = raw(&addr).await;
    let started = Instant::now();
    let mut bytes = 0usize;
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let u = big_provider(&s, *i);
                let k = entry_key(&s, &u);
                bytes += k.len() + u.to_full_string().len();
                etcd_client::TxnOp::put(k, u.to_full_string(), None)
            })
            .collect();
        rawc.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("txn");
    }
    eprintln!(
        "large list: {N} providers ({:.1} MB of keys and values) put in {:?}",
        bytes as f64 / 1e6,
        started.elapsed()
    );

    let r = registry(&format!("etcd://{addr}?timeout=20000")).await;
    let rec = Recorder::new();
    let t = Instant::now();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe to 10,000");
    let first = rec.latest(&s, PROVIDERS_CATEGORY).expect("first");
    eprintln!(
        "large list: subscribe delivered {} providers in {:?}",
        first.urls.len(),
        t.elapsed()
    );
    assert_eq!(first.urls.len(), N as usize);
    assert!(first.entries().all(|u| u.service_interface() == s));

    let extra = big_provider(&s, N);
    let t = Instant::now();
    r.register(&extra).await.expect("register");
    rec.wait_for("the 10,001st provider", DEADLINE, |all| {
        all.last().is_some_and(|n| n.urls.len() == N as usize + 1)
    })
    .await;
    eprintln!(
        "large list: one more provider notified as the full list in {:?}",
        t.elapsed()
    );

    // Lists are read in pages: a decoding limit far below the whole list (1 MB for ~4 MB of
    // keys) still reads it all.
    let small = registry(&format!(
        "etcd://{addr}?etcd.max-message-size=1000000&timeout=20000"
    ))
    .await;
    let rec_small = Recorder::new();
    small
        .subscribe(&consumer(&s, ""), rec_small.listener())
        .await
        .expect("a list larger than the decoding limit is read in pages");
    let got = rec_small
        .latest(&s, PROVIDERS_CATEGORY)
        .expect("the first list");
    assert_eq!(got.urls.len(), N as usize + 1);
    small.destroy().await;
    r.destroy().await;
}

/// `check=false`: the registry is returned at once while etcd is down, is not available,
/// operations fail with retryable errors; when etcd comes up it connects (Connected) and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_false_connects_in_the_background() {
    let Some(mut server) = private_server("check_false") else {
        return;
    };
    let addr = server.address();
    tokio::task::block_in_place(|| server.stop());
    let t = Instant::now();
    let r: Arc<dyn Registry> = registry(&format!("etcd://{addr}?check=false&timeout=1000")).await;
    assert!(t.elapsed() < Duration::from_secs(1), "returned at once");
    assert!(!r.is_available());
    let log = EventLog::attach(&r);
    let s = unique_service("nocheck");
    let p = provider(&s, 1, "");
    // With check=false the reliability layer accepts both and retries in the background.
    r.register(&p)
        .await
        .expect("check=false: register is retried, not an error");
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("check=false: subscribe is retried, not an error");
    assert!(
        rec.is_empty(),
        "nothing cached, nothing live: no notification yet"
    );
    restart(&mut server);
    let started = Instant::now();
    let up = log.wait_for(RegistryEvent::Connected, t, DEADLINE).await;
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p), DEADLINE)
        .await;
    eprintln!(
        "check=false: Connected {:?} after etcd came up; the pending register and subscribe done {:?} after",
        up.saturating_duration_since(started),
        started.elapsed()
    );
    assert!(r.is_available());
    let mut rawc = raw(&addr).await;
    assert!(
        lease_of(&mut rawc, &entry_key(&s, &p))
            .await
            .is_some_and(|l| l != 0)
    );
    r.destroy().await;
}

/// An auth token that expired while the registry was idle (etcd drops a simple token
/// `--auth-token-ttl` seconds after its last use; keep-alives and watch events do not use it),
/// then a broken connection: etcd refuses every watch created with the stale token, so the
/// registry must authenticate again when it re-creates its streams, and changes made after the
/// reconnect must reach the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_auth_token_then_a_reconnect_keeps_subscriptions_alive() {
    let Some(etcd) = common::OwnEtcd::start("expired_auth_token", &["--auth-token-ttl", "2"])
    else {
        return;
    };
    let addr = etcd.address();
    common::enable_auth(&addr).await;
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let s = unique_service("tokenttl");
    let r = registry(&format!(
        "etcd://root:rootpw@{}?session=60000&timeout=2000",
        proxy.address()
    ))
    .await;
    let log = EventLog::attach(&r);
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let mut rawc = raw_as(&addr, Some(("root", "rootpw"))).await;
    let p1 = provider(&s, 1, "");
    rawc.put(entry_key(&s, &p1), p1.to_full_string(), None)
        .await
        .expect("raw put");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p1), DEADLINE)
        .await;

    // Idle for longer than the token's TTL (etcd checks token deadlines every second).
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let cut = Instant::now();
    proxy.cut();
    log.wait_for(RegistryEvent::Disconnected, cut, DEADLINE)
        .await;
    proxy.restore();
    log.wait_for(RegistryEvent::Reconnected, cut, DEADLINE)
        .await;

    let p2 = provider(&s, 2, "");
    let mut rawc = raw_as(&addr, Some(("root", "rootpw"))).await;
    rawc.put(entry_key(&s, &p2), p2.to_full_string(), None)
        .await
        .expect("raw put");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[p1.clone(), p2.clone()], DEADLINE)
        .await;
    eprintln!(
        "expired token: a change after the reconnect arrived; events {:?}",
        log.events()
    );
    r.destroy().await;
}

/// Many watches that all catch up on many changes after a reconnect (about 1.5 MB of events
/// while the registry is still sending create requests): every list ends complete. The watch
/// stream is read by its own task while requests are sent, so a full flow-control window can
/// never leave the session task waiting on a full request channel (this scale did not
/// deadlock the earlier design on etcd 3.4 here either: it guards the behaviour, it does not
/// reproduce the deadlock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watches_catching_up_after_a_reconnect_do_not_deadlock() {
    const CATEGORIES: usize = 150;
    const PER_CATEGORY: u8 = 10;
    let Some(server) = private_server("many_watches_catching_up") else {
        return;
    };
    let addr = server.address();
    let proxy = Proxy::start(&addr).await.expect("proxy");
    let s = unique_service("catchup");
    let categories: Vec<String> = (0..CATEGORIES).map(|c| format!("c{c}")).collect();
    let a = registry(&format!(
        "etcd://{}?session=60000&timeout=5000",
        proxy.address()
    ))
    .await;
    let log = EventLog::attach(&a);
    let rec = Recorder::new();
    a.subscribe(
        &consumer(&s, &format!("category={}", categories.join(","))),
        rec.listener(),
    )
    .await
    .expect("subscribe");

    let cut = Instant::now();
    proxy.cut();
    log.wait_for(RegistryEvent::Disconnected, cut, DEADLINE)
        .await;
    let pad = "x".repeat(1000);
    let mut rawc = raw(&addr).await;
    let mut want = Vec::new();
    for c in &categories {
        let urls: Vec<Url> = (1..=PER_CATEGORY)
            .map(|i| provider(&s, i, &format!("category={c}&pad={pad}")))
            .collect();
        let ops: Vec<etcd_client::TxnOp> = urls
            .iter()
            .map(|u| etcd_client::TxnOp::put(entry_key(&s, u), u.to_full_string(), None))
            .collect();
        rawc.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("txn");
        want.push((c.clone(), urls));
    }
    let healed = Instant::now();
    proxy.restore();
    log.wait_for(RegistryEvent::Reconnected, healed, DEADLINE)
        .await;
    for (c, urls) in &want {
        rec.wait_for_entries(&s, c, urls, DEADLINE).await;
    }
    eprintln!(
        "{CATEGORIES} watches caught up on {} changes {:?} after healing",
        CATEGORIES * usize::from(PER_CATEGORY),
        healed.elapsed()
    );
    a.destroy().await;
}

/// Many watches created at once (one subscription of 3,000 categories) with `timeout=500`:
/// a watch creation is due within 500 ms of its request or of the stream's last message.
/// The session task spends a while sending the create requests while etcd's answers arrive
/// and wait for it; the answers that waited keep the member: no `Disconnected` (the session
/// left the healthy member about half the time when it took longer than 500 ms, the deadline
/// firing before the waiting answers were looked at; here the requests are sent faster than
/// that, so this guards the behaviour without reproducing the early exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_creations_answered_while_the_session_is_busy_keep_the_member() {
    const CATEGORIES: usize = 3000;
    let Some(server) = private_server("creations_while_busy") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("busycreate");
    let categories: Vec<String> = (0..CATEGORIES).map(|c| format!("c{c}")).collect();
    let r = registry(&format!(
        "etcd://{addr}?session=60000&timeout=500&etcd.reread.period=0"
    ))
    .await;
    let log = EventLog::attach(&r);
    let rec = Recorder::new();
    let t = Instant::now();
    r.subscribe(
        &consumer(&s, &format!("category={}", categories.join(","))),
        rec.listener(),
    )
    .await
    .expect("subscribe");
    // Every watch created: a change in the last category arrives.
    let mut rawc = raw(&addr).await;
    let last = categories.last().expect("categories");
    let p = provider(&s, 1, &format!("category={last}"));
    rawc.put(entry_key(&s, &p), p.to_full_string(), None)
        .await
        .expect("put");
    rec.wait_for_entries(&s, last, std::slice::from_ref(&p), Duration::from_secs(60))
        .await;
    eprintln!(
        "{CATEGORIES} watches created: a change in the last one arrived {:?} after the \
         subscribe started; events {:?}",
        t.elapsed(),
        log.events()
    );
    assert!(
        !log.events().contains(&RegistryEvent::Disconnected),
        "the member answered every creation: {:?}",
        log.events()
    );
    r.destroy().await;
}

/// `destroy` racing the background connection of a `check=false` registry (connect, grant
/// the lease): when it returns, no lease of the registry is left on the server (a grant that
/// was in flight is revoked too), and a subscribe afterwards is `Destroyed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_the_background_connection_leaves_no_lease() {
    let Some(server) = private_server("destroy_during_connection") else {
        return;
    };
    let addr = server.address();
    let mut rawc = raw(&addr).await;
    let url: Url = format!("etcd://{addr}?check=false&session=60000")
        .parse()
        .expect("url");
    for i in 0..40u64 {
        let r = registry_etcd::EtcdRegistry::new(url.clone())
            .await
            .expect("check=false registry");
        // Spread the destroys over connecting, authenticating and granting.
        tokio::time::sleep(Duration::from_micros(250 * (i % 20))).await;
        r.destroy().await;
        let leases = rawc.leases().await.expect("leases");
        assert!(
            leases.leases().is_empty(),
            "attempt {i}: a lease outlived destroy: {:?}",
            leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>()
        );
        assert_eq!(
            keys_under(&mut rawc, "/dubbo/.registry-leases/").await,
            Vec::<String>::new(),
            "attempt {i}: a lease sentinel outlived destroy"
        );
        match r
            .subscribe(&consumer("x", ""), Recorder::new().listener())
            .await
        {
            Err(Error::Destroyed { .. }) => {}
            other => panic!("subscribe after destroy: {other:?}"),
        }
    }
}

/// One revision whose watch response is over `etcd.max-message-size` (100 puts in one
/// transaction, ~460 kB of keys and values, with a 350 kB limit) while the keys-only read of
/// the prefix fits: the registry reads the prefix again and watches after it, instead of
/// resuming into the same oversized response for ever; later changes still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_watch_response_is_skipped_by_a_resync() {
    let Some(server) = private_server("oversized_watch_response") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("oversized");
    let r = registry(&format!(
        "etcd://{addr}?etcd.max-message-size=350000&timeout=5000"
    ))
    .await;
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let pad = "x".repeat(2000);
    let urls: Vec<Url> = (1..=100u8)
        .map(|i| provider(&s, i, &format!("pad={pad}")))
        .collect();
    let ops: Vec<etcd_client::TxnOp> = urls
        .iter()
        .map(|u| etcd_client::TxnOp::put(entry_key(&s, u), u.to_full_string(), None))
        .collect();
    let mut rawc = raw(&addr).await;
    let t = Instant::now();
    rawc.txn(etcd_client::Txn::new().and_then(ops))
        .await
        .expect("txn");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &urls, DEADLINE)
        .await;
    eprintln!(
        "oversized watch response: the full list by a resync in {:?}",
        t.elapsed()
    );
    let extra = provider(&s, 200, "");
    rawc.put(entry_key(&s, &extra), extra.to_full_string(), None)
        .await
        .expect("put");
    let mut all = urls.clone();
    all.push(extra);
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &all, DEADLINE)
        .await;
    r.destroy().await;
}

/// A key longer than `etcd.max-message-size` (its watch event is over the limit, and so is a
/// read of one key): the registry cannot read that prefix, but keeps its watch and its
/// subscription's last list, and reads the prefix again with a growing delay. Once the key is
/// gone, the subscription gets the current list and later changes again (the watch used to
/// be dropped for good while the subscription still needed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_the_size_limit_leaves_its_subscription_served_once_it_is_gone() {
    let Some(server) = private_server("key_over_the_size_limit") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("overlimit");
    // Without the failback layer: the registry's own handle counts its reads done again.
    let url: Url = format!("etcd://{addr}?etcd.max-message-size=4096&timeout=5000")
        .parse()
        .expect("url");
    let typed = Arc::new(EtcdRegistry::new(url).await.expect("registry"));
    let r: Arc<dyn Registry> = typed.clone();
    let rec = Recorder::new();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe");
    let mut rawc = raw(&addr).await;
    let p1 = provider(&s, 1, "");
    rawc.put(entry_key(&s, &p1), p1.to_full_string(), None)
        .await
        .expect("put");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, std::slice::from_ref(&p1), DEADLINE)
        .await;
    let huge = provider(&s, 2, &format!("pad={}", "x".repeat(5000)));
    rawc.put(entry_key(&s, &huge), huge.to_full_string(), None)
        .await
        .expect("put the huge entry");
    // The registry meets it (the watch response over the limit, then a read, too large
    // too) and reads the prefix again later, too large again.
    let (.., again) = typed.retry_counts();
    wait_until(
        "the prefix read again after a read too large",
        DEADLINE,
        || async { typed.retry_counts().2 > again },
    )
    .await;
    assert_eq!(
        rec.latest_entries(&s, PROVIDERS_CATEGORY),
        Some(vec![p1.clone()]),
        "the subscription keeps its last list"
    );
    rawc.delete(entry_key(&s, &huge), None)
        .await
        .expect("delete the huge entry");
    let gone = Instant::now();
    let p3 = provider(&s, 3, "");
    rawc.put(entry_key(&s, &p3), p3.to_full_string(), None)
        .await
        .expect("put");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &[p1.clone(), p3.clone()], DEADLINE)
        .await;
    eprintln!(
        "key over the size limit: the subscription current {:?} after the key went",
        gone.elapsed()
    );
    let p4 = provider(&s, 4, "");
    rawc.put(entry_key(&s, &p4), p4.to_full_string(), None)
        .await
        .expect("put");
    rec.wait_for_entries(
        &s,
        PROVIDERS_CATEGORY,
        &[p1.clone(), p3.clone(), p4.clone()],
        DEADLINE,
    )
    .await;
    r.destroy().await;
}

/// A list of 10,000 providers (~4.8 MB of keys) read over a 1 MB/s link with `session=6000`
/// (steps and keep-alive answers due within 500 ms): list pages are sized for the link, so
/// the keep-alive answers and the session's steps that wait behind a page still meet their
/// deadlines. The session never takes the busy member for a lost one (no `Disconnected`,
/// which it reported twice per such read with pages of 4,096 keys), and a change after the
/// list arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_list_over_a_slow_link_costs_the_session_nothing() {
    const N: u32 = 10_000;
    let Some(server) = private_server("large_list_slow_link") else {
        return;
    };
    let addr = server.address();
    let s = unique_service("slowlink");
    let mut rawc = raw(&addr).await;
    let mut want: Vec<Url> = (0..N).map(|i| big_provider(&s, i)).collect();
    for chunk in want.chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|u| etcd_client::TxnOp::put(entry_key(&s, u), u.to_full_string(), None))
            .collect();
        rawc.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("txn");
    }
    let proxy = Proxy::start(&addr).await.expect("proxy");
    proxy.limit(Some(1_000_000));
    let r = registry(&format!("etcd://{}?session=6000", proxy.address())).await;
    let log = EventLog::attach(&r);
    let rec = Recorder::new();
    let t = Instant::now();
    r.subscribe(&consumer(&s, ""), rec.listener())
        .await
        .expect("subscribe over the slow link");
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, Duration::from_secs(60))
        .await;
    let first = t.elapsed();
    let extra = big_provider(&s, N);
    rawc.put(entry_key(&s, &extra), extra.to_full_string(), None)
        .await
        .expect("put");
    want.push(extra);
    let t = Instant::now();
    rec.wait_for_entries(&s, PROVIDERS_CATEGORY, &want, DEADLINE)
        .await;
    eprintln!(
        "slow link: the first list of {N} in {first:?} ({} bytes to the client), a change \
         in {:?}; events {:?}",
        proxy.forwarded().1,
        t.elapsed(),
        log.events()
    );
    assert!(
        log.events().is_empty(),
        "the session stayed on its member: {:?}",
        log.events()
    );
    r.destroy().await;
}
