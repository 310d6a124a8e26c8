//! # registry-etcd
//!
//! The `etcd://` registry backend (also registered as `etcd3://`, Dubbo's name for it), on the
//! [`etcd_client`] crate (etcd v3 API).
//!
//! ```no_run
//! use registry_etcd as _; // links the backend, so the schemes are known
//!
//! # async fn demo() -> registry_core::Result<()> {
//! let registry = registry_core::get_registry("etcd://127.0.0.1:2379?session=60000").await?;
//! registry.register(&"tri://10.0.0.1:50051/com.example.Greeter".parse()?).await?;
//! registry.destroy().await;
//! # Ok(()) }
//! ```
//!
//! Storage (CONTRACT §7), byte-identical to Dubbo Java and Go:
//!
//! ```text
//! /dubbo/<encode(interface)>/<category>/<encode(url.to_full_string())>  =  url.to_full_string()
//! ```
//!
//! - Dynamic entries (`dynamic=true`, the default) are put on one lease per registry, whose TTL
//!   is `session / 2` (30 s by default), renewed by the registry every TTL/3. When the lease is
//!   lost (expired or revoked) a new one is granted and [`RegistryEvent::SessionLost`] then
//!   [`RegistryEvent::NewSession`] are reported, so the reliability layer puts every entry
//!   again. Persistent entries (`dynamic=false`) carry no lease.
//! - The loss is noticed within milliseconds: each registry puts a sentinel key,
//!   `<etcd.lease-prefix><root>/<lease id in hex>` (`/.registry-leases/dubbo/…` by default,
//!   outside the Dubbo tree, so no Dubbo subscriber or Dubbo Admin sees it), on its lease and
//!   watches it; etcd deletes it with the lease. The keep-alive is the fallback. A sentinel
//!   deleted by hand makes the registry revoke its lease before moving to a new one.
//! - Clusters: one client per member, one member in use at a time (lease keep-alive and watch
//!   stream on the same member); when a step fails or a member does not answer, the registry
//!   moves to the next member at once. Each step of re-establishing has a deadline of a sixth
//!   of the granted TTL, so a hung member is left inside the lease. Requests carry etcd's
//!   require-leader flag: a member cut off from the majority ends its streams.
//! - `unregister` deletes an entry only while it is on this registry's lease (a transaction),
//!   so a late unregister of an old instance never deletes a new instance's entry.
//! - A subscription is one range read of `category path + "/"` (with the trailing slash, so
//!   `providersX` never leaks into `providers`), then a watch from the read's revision + 1.
//!   One watch per prefix, shared by every subscription that needs it, all on one watch
//!   stream; the events, which carry the changed key, feed the registry's
//!   [`ListKeeper`](registry_core::keeper::ListKeeper), which keeps every list. After a broken stream every watch resumes from its
//!   last revision + 1; a compacted watch is read again. A periodic re-read guards against
//!   events the server loses.
//! - `interface=*` watches the whole root, so services created later are seen.
//! - [`Registry::destroy`] revokes the lease: the dynamic entries vanish at once.
//!
//! Registry URL parameters: the address plus `backup` (or `etcd://h1:2379,h2:2379`) are the
//! endpoints; `timeout` (ms, default 5000) is the connect and request timeout; `session` (ms,
//! default 60000) gives the lease TTL; `username:password@` authenticates; `group` (default
//! `dubbo`) is the root; `check=false` returns at once and connects in the background;
//! `etcd.reread.period` (ms, default 180000, 0 disables), `etcd.max-message-size` (bytes,
//! default 64 MiB, so a 10,000-provider range reply works) and `etcd.lease-prefix` (default
//! `/.registry-leases`, outside the root) tune the backend.
//!
//! [`RegistryEvent::SessionLost`]: registry_core::RegistryEvent::SessionLost
//! [`RegistryEvent::NewSession`]: registry_core::RegistryEvent::NewSession
//! [`Registry::destroy`]: registry_core::Registry::destroy

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod errors;
mod options;
mod paths;
mod registry;
mod session;
mod shared;
mod watches;

use std::sync::Arc;

use async_trait::async_trait;
use registry_core::{Registry, RegistryFactory, Result, Url};

/// The checked registry URL parameters, for the fuzz targets (`fuzz/`) only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use options::Options;
pub use options::{
    DEFAULT_LEASE_PREFIX, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_REREAD_PERIOD_MS, LEASE_PREFIX_KEY,
    MAX_MESSAGE_SIZE_KEY, REREAD_PERIOD_KEY,
};
pub use registry::EtcdRegistry;

/// The scheme of this backend.
pub const ETCD_SCHEME: &str = "etcd";
/// Dubbo's name for the same backend.
pub const ETCD3_SCHEME: &str = "etcd3";

/// Builds [`EtcdRegistry`] instances; registered under `etcd` and `etcd3`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdFactory;

#[async_trait]
impl RegistryFactory for EtcdFactory {
    async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>> {
        let raw = EtcdRegistry::new(url.clone()).await?;
        Ok(registry_failback::FailbackRegistry::new(raw)?)
    }
}

registry_core::submit_factory!(ETCD_SCHEME, EtcdFactory);
registry_core::submit_factory!(ETCD3_SCHEME, EtcdFactory);
