//! `discover` on a real subscription (the memory backend, and the kit's FaultyRegistry to
//! count subscriptions and hand over cache lists): the changes it yields, the rules for
//! disabled providers, empty protection and cache lists, unsubscribing on drop, and a
//! `tower::balance` over it with plain tower services (no tonic).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use registry_core::testkit::{FaultyRegistry, unique_service, wait_until};
use registry_core::{Notification, Registry, RegistryManager, Source, Url};
use registry_tower::{Change, ProviderKey, discover};
use tower::{Service, ServiceExt};

const DEADLINE: Duration = Duration::from_secs(10);

fn url(s: &str) -> Url {
    s.parse().expect("url")
}

fn provider(service: &str, host: u8, extra: &str) -> Url {
    url(&format!(
        "tri://10.0.0.{host}:50051/{service}?interface={service}&side=provider{extra}"
    ))
}

fn query(service: &str, extra: &str) -> Url {
    url(&format!(
        "consumer://10.0.0.250/{service}?interface={service}&side=consumer{extra}"
    ))
}

async fn memory(tag: &str, params: &str) -> Arc<dyn Registry> {
    RegistryManager::new()
        .get_registry(&format!("memory://{tag}{}?{params}", std::process::id()))
        .await
        .expect("memory registry")
}

/// The next change as `+url` or `-key`, within the deadline.
async fn next<S>(
    stream: &mut (impl futures_util::Stream<Item = Result<Change<ProviderKey, S>, Infallible>> + Unpin),
    show: impl Fn(&S) -> String,
) -> String {
    match tokio::time::timeout(DEADLINE, stream.next()).await {
        Ok(Some(Ok(Change::Insert(_, s)))) => format!("+{}", show(&s)),
        Ok(Some(Ok(Change::Remove(k)))) => format!("-{k}"),
        Ok(Some(Err(never))) => match never {},
        Ok(None) => panic!("the stream ended"),
        Err(_) => panic!("no change within {DEADLINE:?}"),
    }
}

fn identity(u: &Url) -> Result<Url, Infallible> {
    Ok(u.clone())
}

fn key(u: &Url) -> String {
    ProviderKey::of(u).to_string()
}

#[tokio::test]
async fn changes_follow_the_list() {
    let registry = memory("follow", "").await;
    let s = unique_service("tower");
    let (a, b) = (provider(&s, 1, ""), provider(&s, 2, ""));
    registry.register(&a).await.unwrap();
    let mut d = discover(registry.clone(), query(&s, ""), identity)
        .await
        .unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{a}"));

    registry.register(&b).await.unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{b}"));

    registry.unregister(&a).await.unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("-{}", key(&a)));

    // The last one goes: the `empty://` marker removes it.
    registry.unregister(&b).await.unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("-{}", key(&b)));
    assert!(d.providers().is_empty());

    // A provider that comes back with other parameters is inserted with them.
    let b2 = provider(&s, 2, "&weight=50");
    registry.register(&b2).await.unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{b2}"));
    assert_eq!(d.providers(), [b2]);
    registry.destroy().await;
}

#[tokio::test]
async fn the_function_builds_the_service_and_may_refuse_one() {
    let registry = memory("refuse", "").await;
    let s = unique_service("tower");
    let good = provider(&s, 1, "");
    let refused = url(&format!("dubbo://10.0.0.2:20880/{s}?interface={s}"));
    registry.register(&refused).await.unwrap();
    registry.register(&good).await.unwrap();
    let mut d = discover(registry.clone(), query(&s, ""), |u: &Url| {
        if u.protocol() == "tri" {
            Ok(u.port())
        } else {
            Err(format!("{} is not spoken here", u.protocol()))
        }
    })
    .await
    .unwrap();
    assert_eq!(next(&mut d, u16::to_string).await, "+50051");
    // The refused one leaves without a Remove (it was never inserted); the next change is
    // the good one's.
    registry.unregister(&refused).await.unwrap();
    registry.unregister(&good).await.unwrap();
    assert_eq!(
        next(&mut d, u16::to_string).await,
        format!("-{}", key(&good))
    );
    registry.destroy().await;
}

#[tokio::test]
async fn disabled_providers_get_no_traffic_even_for_enabled_star() {
    let registry = memory("disabled", "").await;
    let s = unique_service("tower");
    let off = provider(&s, 1, "&enabled=false");
    let on = provider(&s, 2, "");
    registry.register(&off).await.unwrap();
    registry.register(&on).await.unwrap();
    // `enabled=*` makes the registry deliver the disabled provider too.
    let mut d = discover(registry.clone(), query(&s, "&enabled=*"), identity)
        .await
        .unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{on}"));
    // Enabling it (a new registration with the parameter changed) inserts it.
    registry.unregister(&off).await.unwrap();
    let back = provider(&s, 1, "&enabled=true");
    registry.register(&back).await.unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{back}"));
    registry.destroy().await;
}

/// With `enable-empty-protection=true` the emptied service keeps its provider. A wildcard
/// subscription makes it observable: its notifications are delivered in the order of the
/// changes, so the next change is the other service's, with no remove before it.
#[tokio::test]
async fn empty_protection_keeps_the_last_providers() {
    for protected in [true, false] {
        let registry = memory(
            if protected {
                "protected"
            } else {
                "unprotected"
            },
            &format!("enable-empty-protection={protected}"),
        )
        .await;
        let (s1, s2) = (unique_service("tower"), unique_service("tower"));
        let (a, x) = (provider(&s1, 1, ""), provider(&s2, 2, ""));
        let all = url("consumer://10.0.0.250/*?interface=*&group=*&version=*&classifier=*");
        let mut d = discover(registry.clone(), all, identity).await.unwrap();
        registry.register(&a).await.unwrap();
        assert_eq!(next(&mut d, Url::to_string).await, format!("+{a}"));
        registry.unregister(&a).await.unwrap();
        registry.register(&x).await.unwrap();
        let first = next(&mut d, Url::to_string).await;
        if protected {
            assert_eq!(first, format!("+{x}"), "protected: nothing removed");
            assert_eq!(d.providers().len(), 2);
        } else {
            assert_eq!(first, format!("-{}", key(&a)), "unprotected: removed");
            assert_eq!(next(&mut d, Url::to_string).await, format!("+{x}"));
        }
        registry.destroy().await;
    }
}

/// A list from the cache (the registry unreachable) adds and updates, and never removes; the
/// next live list is applied in full.
#[tokio::test]
async fn cache_lists_never_remove() {
    let faulty = FaultyRegistry::new(memory("cache", "").await);
    let registry: Arc<dyn Registry> = faulty.clone();
    let s = unique_service("tower");
    let (a, b) = (provider(&s, 1, ""), provider(&s, 2, ""));
    registry.register(&a).await.unwrap();
    let mut d = discover(registry.clone(), query(&s, ""), identity)
        .await
        .unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{a}"));

    faulty.deliver_to_subscribers(Notification::new(
        s.as_str(),
        "providers",
        vec![b.clone()],
        u64::MAX - 1,
        Source::Cache,
    ));
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{b}"));
    assert_eq!(
        d.providers().len(),
        2,
        "a is kept: the cache does not remove"
    );

    // A live change: the list is [a, c], so the cache-only b is removed.
    let c = provider(&s, 3, "");
    registry.register(&c).await.unwrap();
    assert_eq!(next(&mut d, Url::to_string).await, format!("+{c}"));
    assert_eq!(next(&mut d, Url::to_string).await, format!("-{}", key(&b)));
    registry.destroy().await;
}

#[tokio::test]
async fn dropping_the_stream_unsubscribes() {
    let faulty = FaultyRegistry::new(memory("drop", "").await);
    let registry: Arc<dyn Registry> = faulty.clone();
    let s = unique_service("tower");
    let d = discover(registry.clone(), query(&s, ""), identity)
        .await
        .unwrap();
    assert_eq!(faulty.subscription_count(), 1);
    drop(d);
    wait_until("the dropped stream's unsubscribe", DEADLINE, || async {
        faulty.subscription_count() == 0
    })
    .await;
    registry.destroy().await;
}

/// Any tower service, not only tonic: a p2c balancer over services that answer with their
/// provider's port follows the registry.
#[tokio::test]
async fn a_tower_balancer_follows_the_providers() {
    let registry = memory("balance", "").await;
    let s = unique_service("tower");
    let a = url(&format!("tri://10.0.0.1:1001/{s}?interface={s}"));
    let b = url(&format!("tri://10.0.0.1:1002/{s}?interface={s}"));
    registry.register(&a).await.unwrap();
    registry.register(&b).await.unwrap();
    let d = discover(registry.clone(), query(&s, ""), |u: &Url| {
        let port = u.port();
        let svc = tower::service_fn(move |()| async move { Ok::<u16, Infallible>(port) });
        Ok::<_, Infallible>(tower::load::Constant::new(svc, 1))
    })
    .await
    .unwrap();
    let mut balance = tower::balance::p2c::Balance::new(d);
    let mut call = async || -> u16 {
        tokio::time::timeout(DEADLINE, balance.ready())
            .await
            .expect("ready within the deadline")
            .expect("ready")
            .call(())
            .await
            .expect("reply")
    };
    let mut seen = HashSet::new();
    for _ in 0..200 {
        seen.insert(call().await);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, HashSet::from([1001, 1002]), "both providers answer");

    registry.unregister(&a).await.unwrap();
    // Once the balancer has the change, only b answers: 50 replies in a row from b (with a
    // still in, each reply is a's about half the time).
    let mut in_a_row = 0;
    let start = tokio::time::Instant::now();
    while in_a_row < 50 {
        assert!(start.elapsed() < DEADLINE, "a is still called");
        in_a_row = if call().await == 1002 {
            in_a_row + 1
        } else {
            0
        };
        tokio::task::yield_now().await;
    }
    registry.destroy().await;
}
