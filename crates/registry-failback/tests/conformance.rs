//! The memory backend behind FailbackRegistry passes the whole conformance suite.

use std::sync::Arc;

use registry_core::testkit::Harness;
use registry_core::{MemoryRegistry, Registry};
use registry_failback::FailbackRegistry;

struct FailbackOverMemory;

#[async_trait::async_trait]
impl Harness for FailbackOverMemory {
    async fn registry(&self) -> Arc<dyn Registry> {
        let url = "memory://failback-conformance?file=false"
            .parse()
            .expect("url");
        FailbackRegistry::new(MemoryRegistry::new(url)).expect("failback registry")
    }
}

registry_core::conformance_tests!(|_case: &str| Some(FailbackOverMemory));
