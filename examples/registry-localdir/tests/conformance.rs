//! The whole conformance suite through the `localdir` scheme: every registry is built by
//! `RegistryManager::get_registry`, so it goes through the scheme table and
//! `FailbackRegistry`, exactly as an application gets it. One temporary directory per test.

use std::sync::Arc;
use std::time::Duration;

use registry_core::testkit::{self, Harness};
use registry_core::{Registry, RegistryManager};
// This test reaches the backend only through its scheme string: link it.
use registry_localdir as _;

struct LocalDir {
    url: String,
    _dir: tempfile::TempDir,
}

impl LocalDir {
    fn new() -> LocalDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("localdir://{}?file=false", dir.path().display());
        LocalDir { url, _dir: dir }
    }
}

#[async_trait::async_trait]
impl Harness for LocalDir {
    async fn registry(&self) -> Arc<dyn Registry> {
        // A new manager each time: a fresh instance, as if from another process.
        RegistryManager::new()
            .get_registry(&self.url)
            .await
            .unwrap_or_else(|e| panic!("get_registry({}): {e}", self.url))
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(10)
    }
}

macro_rules! cases {
    ($($f:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $f() {
            testkit::$f(&LocalDir::new()).await;
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
    unregister_of_missing_url_is_ok,
    destroy_removes_dynamic_keeps_persistent,
    notifications_are_ordered_under_a_burst,
);

/// `run_all` in one directory, as a backend's own suite runs it: the cases share the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_in_one_directory() {
    testkit::run_all(&LocalDir::new()).await;
}
