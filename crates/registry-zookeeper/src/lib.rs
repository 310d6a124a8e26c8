//! # registry-zookeeper
//!
//! The `zookeeper://` backend of the registry framework, on the
//! [`zookeeper-client`](https://docs.rs/zookeeper-client) crate (ZooKeeper 3.6+).
//!
//! It writes Dubbo's layout byte for byte (CONTRACT §7), so Dubbo Java and Dubbo Go services
//! find ours and ours find theirs:
//!
//! ```text
//! /dubbo                                      root = "/" + group (persistent)
//! /dubbo/org.foo.Greeter                      service = root + "/" + encode(interface)
//! /dubbo/org.foo.Greeter/providers            category (persistent)
//! /dubbo/org.foo.Greeter/providers/dubbo%3A%2F%2F10.0.0.1%3A20880%2F...
//!                                             entry = encode(url.to_full_string()), ephemeral
//!                                             unless dynamic=false, empty data
//! ```
//!
//! What it does beyond Dubbo's `ZookeeperRegistry`:
//! - Re-registering an entry that exists leaves it alone when our session owns it, and
//!   replaces it (delete with its version, create) only when another session owns it, so
//!   watchers never see a provider vanish and come back on a reconnect.
//! - One persistent recursive watch per category path, shared by every subscription on it;
//!   the registry's [`registry_core::keeper::ListKeeper`] keeps the lists, fed with the
//!   created/deleted events (only the changed child is parsed) and with full reads, which are
//!   made after any reconnect, since ZooKeeper drops events during a disconnection
//!   (ZOOKEEPER-4698). Such a re-read is preceded by a `sync` of the path, so a server that
//!   is behind (a follower we reconnected to) never gives back an older list.
//! - Connection events ([`registry_core::RegistryEvent`]): a lost session is reported, a new
//!   one is made (with the same credentials), every watch is re-armed and re-read, then
//!   `NewSession` is sent so the reliability layer re-registers. Registrations are not
//!   re-created here.
//! - No 1 MiB cap on child lists: 10,000 Dubbo providers (about 3 MB) are read.
//!
//! Registry URL parameters: `backup` (or `zookeeper://h1:2181,h2:2181`), `group`, `session`
//! (ms, default 60000; the server clamps it to 2–20 ticks and the negotiated value is
//! logged), `timeout` (ms, default 5000: connect and request timeout), `username:password@`
//! (digest auth; the nodes we create get creator-only ACLs), `check` (default true: fail at
//! creation when no host answers within `timeout` per host; `false`: connect in the
//! background), `enable-empty-protection`.
//!
//! ```no_run
//! # async fn demo() -> registry_core::Result<()> {
//! use registry_zookeeper as _; // links the `zookeeper` scheme
//! let registry = registry_core::get_registry("zookeeper://127.0.0.1:2181?session=30000").await?;
//! registry.register(&"dubbo://10.0.0.1:20880/com.foo.Greeter".parse()?).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod errors;
mod options;
mod paths;
mod registry;
mod session;
mod tasks;
mod watches;

use std::sync::Arc;

use async_trait::async_trait;
use registry_core::{Registry, RegistryFactory, Result, Url};

/// The checked registry URL parameters, for the fuzz targets (`fuzz/`) only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use options::Config;
pub use options::{DEFAULT_GROUP, DEFAULT_SESSION_MS, DEFAULT_TIMEOUT_MS};
pub use registry::ZookeeperRegistry;
/// The client crate, re-exported so tests and tools use the same types
/// ([`zookeeper_client::SessionInfo`] from [`ZookeeperRegistry::session_info`]).
pub use zookeeper_client;

/// The scheme of this backend.
pub const ZOOKEEPER_SCHEME: &str = "zookeeper";

/// Builds [`ZookeeperRegistry`] instances; registered under `zookeeper`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZookeeperFactory;

#[async_trait]
impl RegistryFactory for ZookeeperFactory {
    async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>> {
        let raw = ZookeeperRegistry::new(url.clone()).await?;
        Ok(registry_failback::FailbackRegistry::new(raw)?)
    }
}

registry_core::submit_factory!(ZOOKEEPER_SCHEME, ZookeeperFactory);
