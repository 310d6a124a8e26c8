//! Node layout, Dubbo interoperability, ephemeral ownership and digest auth, on the shared
//! ZooKeeper (`REGISTRY_TEST_ZOOKEEPER`), checked with a plain zookeeper-client.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use registry_core::testkit::dubbo_provider;
use registry_core::testkit::{Recorder, consumer, provider, unique_service};
use registry_core::{Registry, Url, decode, encode};
use registry_test_servers::{Kind, shared_address};
use registry_zookeeper::ZookeeperRegistry;
use registry_zookeeper::zookeeper_client as zk;

const DEADLINE: Duration = Duration::from_secs(15);

async fn registry(url: &str) -> ZookeeperRegistry {
    ZookeeperRegistry::new(url.parse().expect("registry url"))
        .await
        .unwrap_or_else(|e| panic!("registry {url}: {e}"))
}

/// The node names we write are exactly Dubbo's, under the default root `/dubbo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_names_equal_dubbo_encoding() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "node_names_equal_dubbo_encoding") else {
        return;
    };
    let r = registry(&format!("zookeeper://{addr}")).await;
    let dubbo_p = Url::from_encoded(DUBBO_PROVIDER_NODE).expect("Dubbo's provider node decodes");
    let dubbo_c = Url::from_encoded(DUBBO_CONSUMER_NODE).expect("Dubbo's consumer node decodes");
    assert_eq!(encode(&dubbo_p.to_full_string()), DUBBO_PROVIDER_NODE);
    r.register(&dubbo_p).await.expect("register provider");
    r.register(&dubbo_c).await.expect("register consumer");

    let want_provider =
        format!("/dubbo/org.apache.dubbo.demo.DemoService/providers/{DUBBO_PROVIDER_NODE}");
    let want_consumer =
        format!("/dubbo/org.apache.dubbo.demo.DemoService/consumers/{DUBBO_CONSUMER_NODE}");
    assert_eq!(r.entry_path(&dubbo_p), want_provider);
    assert_eq!(r.entry_path(&dubbo_c), want_consumer);

    let raw = raw_client(&addr).await;
    let children = raw
        .list_children("/dubbo/org.apache.dubbo.demo.DemoService/providers")
        .await
        .expect("list providers");
    assert!(
        children.iter().any(|c| c == DUBBO_PROVIDER_NODE),
        "the provider node name is Dubbo's: {children:?}"
    );
    let consumers = raw
        .list_children("/dubbo/org.apache.dubbo.demo.DemoService/consumers")
        .await
        .expect("list consumers");
    assert!(consumers.iter().any(|c| c == DUBBO_CONSUMER_NODE));

    // Entries are ephemeral and owned by our session, with empty data; parents persistent.
    let (data, stat) = raw.get_data(&want_provider).await.expect("entry data");
    assert!(data.is_empty(), "node data is empty");
    assert_eq!(
        Some(stat.ephemeral_owner),
        r.session_id(),
        "ephemeral, ours"
    );
    for parent in [
        "/dubbo",
        "/dubbo/org.apache.dubbo.demo.DemoService",
        "/dubbo/org.apache.dubbo.demo.DemoService/providers",
    ] {
        let (_, stat) = raw.get_data(parent).await.expect("parent");
        assert_eq!(stat.ephemeral_owner, 0, "{parent} is persistent");
    }
    // dynamic=false is persistent.
    let s = unique_service("layout");
    let persistent = provider(&s, 1, "dynamic=false");
    r.register(&persistent).await.expect("register persistent");
    let (_, stat) = raw
        .get_data(&r.entry_path(&persistent))
        .await
        .expect("persistent entry");
    assert_eq!(stat.ephemeral_owner, 0, "dynamic=false is persistent");
    r.unregister(&persistent).await.expect("unregister");
    r.unregister(&dubbo_p).await.expect("unregister");
    r.unregister(&dubbo_c).await.expect("unregister");
    assert!(
        raw.check_stat(&want_provider)
            .await
            .expect("stat")
            .is_none()
    );
    r.destroy().await;
}

/// A provider written by another client in Dubbo's format is decoded and delivered; a
/// child that is not an encoded URL is skipped (with a warning), the rest still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_dubbo_nodes_are_decoded_and_bad_children_skipped() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "foreign_dubbo_nodes") else {
        return;
    };
    let group = unique_group("foreign");
    let service = "org.apache.dubbo.demo.DemoService";
    let raw = raw_client(&addr).await;
    let dir = format!("/{group}/{service}/providers");
    raw.mkdir(
        &dir,
        &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .expect("mkdir");
    let eph = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    for name in [
        DUBBO_PROVIDER_NODE,
        "not-a-url",
        "bad%ZZescape",
        "%E2%28%A1",
    ] {
        raw.create(&format!("{dir}/{name}"), b"192.168.56.1", &eph)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    let r = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let rec = Recorder::new();
    let sub = consumer(service, "");
    r.subscribe(&sub, rec.listener()).await.expect("subscribe");
    let dubbo = Url::from_encoded(DUBBO_PROVIDER_NODE).expect("decodes");
    assert_eq!(
        rec.latest_entries(service, "providers"),
        Some(vec![dubbo.clone()]),
        "Dubbo's provider delivered, undecodable children skipped"
    );
    // A change made by the foreign client reaches the subscription; bad children stay out.
    let second = dubbo_provider(service, 7);
    raw.create(
        &format!("{dir}/{}", encode(&second.to_full_string())),
        b"",
        &eph,
    )
    .await
    .expect("create second");
    raw.create(&format!("{dir}/another%junk"), b"", &eph)
        .await
        .expect("create junk");
    rec.wait_for_entries(
        service,
        "providers",
        &[dubbo.clone(), second.clone()],
        DEADLINE,
    )
    .await;
    raw.delete(&format!("{dir}/{DUBBO_PROVIDER_NODE}"), None)
        .await
        .expect("delete");
    rec.wait_for_entries(
        service,
        "providers",
        std::slice::from_ref(&second),
        DEADLINE,
    )
    .await;
    // lookup skips them too.
    assert_eq!(r.lookup(&sub).await.expect("lookup"), vec![second]);
    assert!(decode("bad%ZZescape").is_err());
    r.destroy().await;
}

/// Re-registering our own entry leaves it alone (same czxid); an entry left by another
/// session is replaced by one of ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_ownership_on_re_register() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "ephemeral_ownership") else {
        return;
    };
    let group = unique_group("owner");
    let r = registry(&format!("zookeeper://{addr}?group={group}")).await;
    let raw = raw_client(&addr).await;
    let s = unique_service("owner");
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register");
    let path = r.entry_path(&p);
    let (_, first) = raw.get_data(&path).await.expect("entry");
    assert_eq!(Some(first.ephemeral_owner), r.session_id());
    r.register(&p).await.expect("register again");
    let (_, again) = raw.get_data(&path).await.expect("entry");
    assert_eq!(again.czxid, first.czxid, "our own entry is not re-created");

    // An entry left by another session (its client gone, the session not yet expired).
    let p2 = provider(&s, 2, "");
    let path2 = r.entry_path(&p2);
    let ghost = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(30))
        .with_detached()
        .connect(&addr)
        .await
        .expect("ghost client");
    let ghost_id = ghost.session_id().0;
    ghost
        .create(
            &path2,
            b"",
            &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .expect("ghost entry");
    drop(ghost); // detached: the session lingers on the server, as after a crash
    let (_, left) = raw.get_data(&path2).await.expect("ghost entry");
    assert_eq!(left.ephemeral_owner, ghost_id);
    r.register(&p2)
        .await
        .expect("register over the ghost entry");
    let (_, mine) = raw.get_data(&path2).await.expect("entry");
    assert_eq!(
        Some(mine.ephemeral_owner),
        r.session_id(),
        "replaced by ours"
    );
    assert_ne!(mine.czxid, left.czxid);
    r.destroy().await;
    assert!(
        raw.check_stat(&path).await.expect("stat").is_none(),
        "destroy closed the session"
    );
    assert!(raw.check_stat(&path2).await.expect("stat").is_none());
}

/// With `username:password`, nodes get creator-only ACLs: a client without the
/// credentials cannot delete our entries; one with them can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_auth_protects_entries() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "digest_auth") else {
        return;
    };
    let group = unique_group("auth");
    let r = registry(&format!("zookeeper://alice:s3cret@{addr}?group={group}")).await;
    let s = unique_service("auth");
    let p = provider(&s, 1, "");
    r.register(&p).await.expect("register with auth");
    let path = r.entry_path(&p);
    let parent = r.category_path(&s, "providers");

    let stranger = raw_client(&addr).await;
    match stranger.delete(&path, None).await {
        Err(zk::Error::NoAuth) => {}
        other => panic!("a client without credentials deleted our entry: {other:?}"),
    }
    match stranger.list_children(&parent).await {
        Err(zk::Error::NoAuth) => {}
        other => panic!("a client without credentials listed our entries: {other:?}"),
    }

    // Our own subscription (same credentials) sees it.
    let rec = Recorder::new();
    let listener: Arc<dyn registry_core::NotifyListener> = rec.listener();
    r.subscribe(&consumer(&s, ""), listener)
        .await
        .expect("subscribe");
    assert_eq!(rec.latest_entries(&s, "providers"), Some(vec![p.clone()]));

    let wrong = zk::Client::connector()
        .with_auth("digest", b"alice:wrong")
        .connect(&addr)
        .await
        .expect("client with wrong password");
    assert!(matches!(
        wrong.delete(&path, None).await,
        Err(zk::Error::NoAuth)
    ));
    let friend = zk::Client::connector()
        .with_auth("digest", b"alice:s3cret")
        .connect(&addr)
        .await
        .expect("client with the credentials");
    let (acls, _) = friend.get_acl(&path).await.expect("acl");
    assert!(
        !acls.is_empty() && acls.iter().all(|a| a.scheme() == "digest"),
        "creator-only ACL: {acls:?}"
    );
    friend
        .delete(&path, None)
        .await
        .expect("the owner's credentials may delete");
    rec.wait_for_entries(&s, "providers", &[], DEADLINE).await;
    r.destroy().await;
}

/// Unsubscribing the last subscription of a path and subscribing again at once leaves a
/// working watch: the old watch's removal never removes the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_keeps_the_watch() {
    init_tracing();
    let Some(addr) = shared_address(Kind::Zookeeper, "resubscribing_keeps_the_watch") else {
        return;
    };
    let group = unique_group("resub");
    let url = format!("zookeeper://{addr}?group={group}");
    let r = registry(&url).await;
    let w = registry(&url).await;
    let s = unique_service("resub");
    let q = consumer(&s, "");
    let wild: Url = "consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*"
        .parse()
        .expect("url");
    for _ in 0..20 {
        let rec = Recorder::new();
        r.subscribe(&q, rec.listener()).await.expect("subscribe");
        r.unsubscribe(&q, &rec.listener())
            .await
            .expect("unsubscribe");
        let rec = Recorder::new();
        r.subscribe(&wild, rec.listener())
            .await
            .expect("subscribe *");
        r.unsubscribe(&wild, &rec.listener())
            .await
            .expect("unsubscribe *");
    }
    let rec = Recorder::new();
    r.subscribe(&q, rec.listener()).await.expect("subscribe");
    let all = Recorder::new();
    r.subscribe(&wild, all.listener())
        .await
        .expect("subscribe *");
    let p = provider(&s, 1, "");
    w.register(&p).await.expect("register");
    rec.wait_for_entries(&s, "providers", std::slice::from_ref(&p), DEADLINE)
        .await;
    let later = unique_service("resub");
    let p2 = provider(&later, 1, "");
    w.register(&p2).await.expect("register");
    all.wait_for_entries(&later, "providers", std::slice::from_ref(&p2), DEADLINE)
        .await;
    r.destroy().await;
    w.destroy().await;
}
