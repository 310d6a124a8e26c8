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

registry_core::conformance_tests!(|_case: &str| Some(LocalDir::new()));

/// `run_all` in one directory, as a backend's own suite runs it: the cases share the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_in_one_directory() {
    testkit::run_all(&LocalDir::new()).await;
}
