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

mod etcd {
    use super::*;
    registry_core::conformance_tests!(|case: &str| harness("etcd", case));
}

mod etcd3 {
    use super::*;
    registry_core::conformance_tests!(|case: &str| harness("etcd3", case));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_passes_on_etcd() {
    let Some(h) = harness("etcd", "run_all_passes_on_etcd") else {
        return;
    };
    testkit::run_all(&h).await;
}
