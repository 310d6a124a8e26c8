//! Feature `tonic`: the balanced channel's view of the providers, refused providers, and
//! the subscription ending with the channel. Real gRPC calls through it are in the
//! `tonic-greeter` example's tests.

#![cfg(feature = "tonic")]

use std::sync::Arc;
use std::time::Duration;

use registry_core::testkit::{FaultyRegistry, unique_service, wait_until};
use registry_core::{Registry, RegistryManager, Url};

const DEADLINE: Duration = Duration::from_secs(10);

fn url(s: &str) -> Url {
    s.parse().expect("url")
}

#[tokio::test]
async fn the_channel_follows_the_providers_and_unsubscribes_when_dropped() {
    let memory = RegistryManager::new()
        .get_registry(&format!("memory://channel{}", std::process::id()))
        .await
        .unwrap();
    let faulty = FaultyRegistry::new(memory);
    let registry: Arc<dyn Registry> = faulty.clone();
    let s = unique_service("channel");
    let a = url(&format!("tri://127.0.0.1:1/{s}?interface={s}"));
    let tls = url(&format!("tri://127.0.0.1:2/{s}?interface={s}&tls=true"));
    registry.register(&a).await.unwrap();
    registry.register(&tls).await.unwrap();
    let query = url(&format!("consumer://127.0.0.1/{s}?interface={s}"));
    let balanced =
        registry_tower::balance_channel_with(registry.clone(), query, registry_tower::endpoint_for)
            .await
            .unwrap();
    // The first list is in when it returns; the TLS provider is refused by `endpoint_for`.
    let mut providers = balanced.providers();
    assert_eq!(*providers.borrow_and_update(), std::slice::from_ref(&a));

    let b = url(&format!("grpc://127.0.0.1:3/{s}?interface={s}"));
    registry.register(&b).await.unwrap();
    tokio::time::timeout(DEADLINE, providers.wait_for(|p| p.len() == 2))
        .await
        .expect("b within the deadline")
        .expect("the forwarder runs");
    // In key order: protocol, host, port, path.
    assert_eq!(*providers.borrow(), [b.clone(), a.clone()]);

    assert_eq!(faulty.subscription_count(), 1);
    drop(balanced);
    wait_until(
        "the subscription to end with the channel",
        DEADLINE,
        || async { faulty.subscription_count() == 0 },
    )
    .await;
    registry.destroy().await;
}
