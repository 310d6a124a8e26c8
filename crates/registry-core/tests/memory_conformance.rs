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

registry_core::conformance_tests!(|_case: &str| Some(Memory));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_passes_on_memory() {
    testkit::run_all(&Memory).await;
}
