//! # registry-localdir
//!
//! `localdir:///some/abs/path`: a host-local service registry on a shared directory, so
//! several processes on one machine (development, CI, single-host deployments) find each
//! other without a server. It is written exactly as a third-party backend crate is: it depends
//! only on the public `registry-core` and `registry-failback` crates, registers its scheme with
//! [`registry_core::submit_factory!`], and its factory returns the raw backend wrapped in
//! [`registry_failback::FailbackRegistry`].
//!
//! ```no_run
//! use registry_localdir as _; // links the `localdir` scheme (see below)
//!
//! # async fn demo() -> registry_core::Result<()> {
//! let registry = registry_core::get_registry("localdir:///tmp/my-registry").await?;
//! registry.register(&"tri://127.0.0.1:50051/com.example.Greeter".parse()?).await?;
//! registry.destroy().await;
//! # Ok(()) }
//! ```
//!
//! **Layout** (CONTRACT §7, with the URL's directory as the root):
//! `<dir>/<group>/<encode(interface)>/<category>/<encode(url.to_full_string())>`. Each entry is
//! a small JSON file written atomically (temporary file + rename). An entry name longer than
//! 240 bytes (file names are limited to 255) is `~<hash>~<start of the name>` instead, and its
//! file holds the full URL.
//!
//! **Dynamic entries** (the default) record their owner process (pid, start time, boot id, pid
//! namespace, host name) and the registry instance. An entry whose owner process is gone is
//! treated as gone and deleted by whoever notices: the host-local equivalent of a ZooKeeper
//! ephemeral node. The check uses `/proc` and so works on Linux only; on other platforms, and
//! for entries written from another host or pid namespace, owners are treated as alive and
//! their entries stay until unregistered. Persistent entries (`dynamic=false`) have no owner.
//!
//! **Subscriptions** are served by one poller task per registry, which re-reads the category
//! directories the subscriptions need every `poll` milliseconds (default 100, and at once after
//! a register or unregister through the same instance). A directory that changed while it was
//! read is read again shortly after, so a notification only ever holds a list that existed.
//!
//! **Registry URL parameters**: `poll` (ms, default 100), `group` (default `dubbo`), `check`
//! (default true: the directory must be creatable and writable), and every parameter of
//! `FailbackRegistry` (`file`, `retry.period`, `enable-empty-protection`, ...).
//!
//! **Linking.** The scheme is registered at link time. A binary or test that reaches the
//! backend only through its scheme string must name the crate once, or `localdir` stays an
//! unknown scheme: `use registry_localdir as _;`.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod owner;
mod registry;
mod store;

use std::sync::Arc;

use async_trait::async_trait;
use registry_core::{Registry, RegistryFactory, Result, Url};

pub use registry::{DEFAULT_POLL_MS, LocalDirRegistry};

/// The scheme of this backend.
pub const SCHEME: &str = "localdir";

/// Builds `localdir://` registries: a [`LocalDirRegistry`] behind
/// [`registry_failback::FailbackRegistry`]. Registered under [`SCHEME`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalDirFactory;

#[async_trait]
impl RegistryFactory for LocalDirFactory {
    async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>> {
        let raw = LocalDirRegistry::open(url.clone()).await?;
        Ok(registry_failback::FailbackRegistry::new(raw)?)
    }
}

registry_core::submit_factory!("localdir", LocalDirFactory);
