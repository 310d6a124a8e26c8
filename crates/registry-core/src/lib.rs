//! # registry-core
//!
//! The core of the service registry: the [`Url`] type and its matching rules, the
//! [`Registry`], [`RegistryFactory`] and [`NotifyListener`] traits, the scheme table that picks
//! a backend by the registry URL's scheme, [`RegistryManager`], configuration, and the
//! in-process `memory://` backend. With the `testkit` feature, the conformance suite every
//! backend runs.
//!
//! ```
//! # async fn demo() -> registry_core::Result<()> {
//! use std::sync::Arc;
//! use registry_core::{get_registry, Notification, NotifyListener};
//!
//! let registry = get_registry("memory://quick").await?;
//! registry.register(&"dubbo://10.0.0.1:20880/com.foo.Greeter".parse()?).await?;
//! let listener: Arc<dyn NotifyListener> = Arc::new(|n: Notification| {
//!     for url in n.entries() { println!("{url}"); }
//! });
//! registry.subscribe(&"consumer://10.0.0.9/com.foo.Greeter".parse()?, listener).await?;
//! registry.destroy().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! Backends in other crates register their schemes at link time; a binary that uses one only
//! through its scheme must name the crate: `use registry_etcd as _;`.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod codec;
pub mod config;
pub mod delivery;
pub mod error;
pub mod factory;
pub mod keeper;
pub mod manager;
pub mod matching;
pub mod memory;
pub mod registry;
pub mod stream;
pub mod url;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use codec::{decode, encode};
pub use config::RegistryConfig;
pub use error::{Error, Result};
pub use factory::{FactoryRegistration, factory_for, register_factory, schemes};
pub use manager::{RegistryManager, default_manager, get_registry, registry_key};
pub use matching::{empty_url, is_match, is_match_category, is_service_key_match};
pub use memory::{MemoryFactory, MemoryRegistry};
pub use registry::{
    Notification, NotifyListener, Registry, RegistryEvent, RegistryFactory, Source, listener_id,
};
pub use stream::{NotificationStream, subscribe_stream};
pub use url::{Parameters, Url};

#[doc(hidden)]
pub use inventory as __inventory;

/// The README's Rust examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// Checks a URL against the registry URL's `accepts` parameter: an allow-list (`dubbo,tri`)
/// or a deny-list (`-rest,-http`) of protocols that may be registered.
pub fn check_accepts(registry: &Url, url: &Url) -> Result<()> {
    let Some(accepts) = registry
        .parameter("accepts")
        .filter(|a| !a.trim().is_empty())
    else {
        return Ok(());
    };
    let tokens: Vec<&str> = accepts
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let p = url.protocol();
    let ok = if tokens.iter().any(|t| t.starts_with('-')) {
        !tokens.iter().any(|t| t.strip_prefix('-') == Some(p))
    } else {
        tokens.contains(&p)
    };
    if ok {
        Ok(())
    } else {
        Err(Error::NotAccepted {
            url: url.to_redacted_string(),
            accepts: accepts.to_owned(),
        })
    }
}
