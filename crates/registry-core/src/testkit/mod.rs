//! The conformance kit (feature `testkit`): the behaviour suite every backend runs against
//! its real server, a [`Recorder`] listener with deadline-based waits, and [`FaultyRegistry`],
//! a wrapper that injects failures and connection events for reliability tests.
//!
//! A backend crate runs the suite from an ordinary test:
//!
//! ```ignore
//! struct Etcd(String);
//! #[async_trait::async_trait]
//! impl registry_core::testkit::Harness for Etcd {
//!     async fn registry(&self) -> std::sync::Arc<dyn registry_core::Registry> {
//!         registry_core::RegistryManager::new().get_registry(&self.0).await.unwrap()
//!     }
//! }
//! #[tokio::test(flavor = "multi_thread")]
//! async fn conformance() {
//!     registry_core::testkit::run_all(&Etcd("etcd://127.0.0.1:2379".into())).await;
//! }
//! ```

mod conformance;
mod faulty;
mod keeper_model;
mod recorder;

pub use conformance::*;
pub use faulty::{Fault, FaultyRegistry, Op};
pub use keeper_model::{KeeperOp, run_keeper_ops};
pub use recorder::{Recorder, wait_until};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A service interface name no other test uses: `org.apache.dubbo.kit.<tag>.S<unique>`, so
/// tests can share a real server.
pub fn unique_service(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "org.apache.dubbo.kit.{tag}.S{:x}{:x}{n}",
        std::process::id(),
        t & 0xff_ffff
    )
}
