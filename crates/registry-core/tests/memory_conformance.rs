//! The memory backend runs the whole conformance suite, one test per behaviour.

use std::sync::Arc;

use registry_core::testkit::{self, Harness};
use registry_core::{Registry, RegistryManager};

struct Memory;

#[async_trait::async_trait]
impl Harness for Memory {
    async fn registry(&self) -> Arc<dyn Registry> {
        // A new manager each time: a new instance on the shared `memory://conformance` store.
        RegistryManager::new()
            .get_registry("memory://conformance")
            .await
            .expect("memory registry")
    }
}

macro_rules! cases {
    ($($f:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $f() {
            testkit::$f(&Memory).await;
        }
    )*};
}

cases!(
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
async fn run_all_passes_on_memory() {
    testkit::run_all(&Memory).await;
}
