//! The whole conformance suite on the shared ZooKeeper (`REGISTRY_TEST_ZOOKEEPER`), one test
//! per behaviour. Each test uses its own group (root), so `interface=*` only sees its own
//! services; every `registry()` call builds a new registry with its own session.

use std::sync::Arc;

use registry_core::testkit::{self, Harness};
use registry_core::{Registry, RegistryManager};
use registry_test_servers::{Kind, shared_address};
use registry_zookeeper as _;

struct Zk(String);

#[async_trait::async_trait]
impl Harness for Zk {
    async fn registry(&self) -> Arc<dyn Registry> {
        RegistryManager::new()
            .get_registry(&self.0)
            .await
            .unwrap_or_else(|e| panic!("zookeeper registry {}: {e}", self.0))
    }
}

fn harness(test: &str) -> Option<Zk> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let addr = shared_address(Kind::Zookeeper, test)?;
    let group = format!("conformance-{test}-{}", std::process::id());
    Some(Zk(format!("zookeeper://{addr}?group={group}")))
}

registry_core::conformance_tests!(harness);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_passes_on_zookeeper() {
    let Some(h) = harness("run_all") else { return };
    testkit::run_all(&h).await;
}
