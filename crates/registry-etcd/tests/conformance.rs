//! The whole conformance suite on a real etcd, for `etcd://` and for `etcd3://`: one test
//! per behaviour and scheme. The server is the shared one of `cargo xtask test`
//! (`REGISTRY_TEST_ETCD`); without it the tests say they are skipped.

use std::sync::Arc;

use registry_core::testkit::{self, Harness};
use registry_core::{Registry, RegistryManager};
use registry_etcd as _;
use registry_test_servers::{Kind, shared_address};

struct Etcd(String);

#[async_trait::async_trait]
impl Harness for Etcd {
    async fn registry(&self) -> Arc<dyn Registry> {
        // A new manager each time: a new instance with its own lease.
        RegistryManager::new()
            .get_registry(self.0.as_str())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.0))
    }
}

fn harness(scheme: &str, test: &str) -> Option<Etcd> {
    shared_address(Kind::Etcd, test).map(|a| Etcd(format!("{scheme}://{a}?session=10000")))
}

macro_rules! cases {
    ($scheme:literal, $module:ident: $($f:ident),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $f() {
                    let Some(h) = harness($scheme, stringify!($f)) else { return };
                    testkit::$f(&h).await;
                }
            )*
        }
    };
}

cases!(
    "etcd", etcd:
    register_is_idempotent,
    urls_differing_in_parameters_coexist,
    first_notification_covers_all_categories_in_order,
    empty_category_is_a_marker,
    categories_are_filtered,
    group_version_classifier_matching,
    wildcard_interface_sees_later_services,
    same_listener_twice_is_one_subscription,
    unsubscribe_stops_notifications,
    lookup_is_a_pull_without_subscription,
    wildcard_lookup_finds_every_service,
    unregister_of_missing_url_is_ok,
    destroy_removes_dynamic_keeps_persistent,
    notifications_are_ordered_under_a_burst,
);

cases!(
    "etcd3", etcd3:
    register_is_idempotent,
    urls_differing_in_parameters_coexist,
    first_notification_covers_all_categories_in_order,
    empty_category_is_a_marker,
    categories_are_filtered,
    group_version_classifier_matching,
    wildcard_interface_sees_later_services,
    same_listener_twice_is_one_subscription,
    unsubscribe_stops_notifications,
    lookup_is_a_pull_without_subscription,
    wildcard_lookup_finds_every_service,
    unregister_of_missing_url_is_ok,
    destroy_removes_dynamic_keeps_persistent,
    notifications_are_ordered_under_a_burst,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_passes_on_etcd() {
    let Some(h) = harness("etcd", "run_all_passes_on_etcd") else {
        return;
    };
    testkit::run_all(&h).await;
}
