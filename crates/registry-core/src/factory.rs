//! The scheme table: which [`RegistryFactory`] builds registries for which URL scheme.
//!
//! Backend crates register at link time:
//!
//! ```ignore
//! struct MyFactory;
//! #[async_trait::async_trait]
//! impl registry_core::RegistryFactory for MyFactory { /* ... */ }
//! registry_core::submit_factory!("my", MyFactory);
//! ```
//!
//! Link-time registration only sees crates the final binary links. A binary or test that uses
//! a backend only through its scheme (never names one of its items) must still say
//! `use registry_etcd as _;`, or the scheme stays unknown.
//!
//! [`register_factory`] adds a factory at run time instead.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, RwLock};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::registry::{Registry, RegistryFactory};
use crate::url::Url;

/// A link-time registration of a factory under a scheme; made by [`crate::submit_factory!`].
pub struct FactoryRegistration {
    scheme: &'static str,
    factory: &'static dyn RegistryFactory,
}

impl FactoryRegistration {
    /// A registration of `factory` under `scheme`.
    pub const fn new(scheme: &'static str, factory: &'static dyn RegistryFactory) -> Self {
        FactoryRegistration { scheme, factory }
    }
}

inventory::collect!(FactoryRegistration);

/// Registers a factory under a scheme at link time:
/// `registry_core::submit_factory!("etcd", EtcdFactory);` (the factory must be a constant
/// expression, such as a unit struct).
#[macro_export]
macro_rules! submit_factory {
    ($scheme:expr, $factory:expr) => {
        $crate::__inventory::submit! {
            $crate::FactoryRegistration::new($scheme, &$factory)
        }
    };
}

type RuntimeTable = RwLock<Vec<(String, Arc<dyn RegistryFactory>)>>;
static RUNTIME: LazyLock<RuntimeTable> = LazyLock::new(|| RwLock::new(Vec::new()));

struct Static(&'static dyn RegistryFactory);

#[async_trait]
impl RegistryFactory for Static {
    async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>> {
        self.0.create(url).await
    }
}

/// Registers `factory` under `scheme` at run time. A scheme that is already registered (at
/// link time or run time) is an [`Error::DuplicateScheme`].
pub fn register_factory(scheme: &str, factory: Arc<dyn RegistryFactory>) -> Result<()> {
    let scheme = scheme.to_ascii_lowercase();
    let mut table = RUNTIME.write().unwrap_or_else(|p| p.into_inner());
    let existing = inventory::iter::<FactoryRegistration>
        .into_iter()
        .filter(|r| r.scheme.eq_ignore_ascii_case(&scheme))
        .count()
        + table.iter().filter(|(s, _)| *s == scheme).count();
    if existing > 0 {
        return Err(Error::DuplicateScheme {
            scheme,
            count: existing + 1,
        });
    }
    table.push((scheme, factory));
    Ok(())
}

/// The factory for `scheme`: [`Error::UnknownScheme`] (listing the registered schemes) when
/// there is none, [`Error::DuplicateScheme`] when several crates claim it.
pub fn factory_for(scheme: &str) -> Result<Arc<dyn RegistryFactory>> {
    let mut found: Vec<Arc<dyn RegistryFactory>> = inventory::iter::<FactoryRegistration>
        .into_iter()
        .filter(|r| r.scheme.eq_ignore_ascii_case(scheme))
        .map(|r| Arc::new(Static(r.factory)) as Arc<dyn RegistryFactory>)
        .collect();
    let table = RUNTIME.read().unwrap_or_else(|p| p.into_inner());
    found.extend(
        table
            .iter()
            .filter(|(s, _)| s.eq_ignore_ascii_case(scheme))
            .map(|(_, f)| f.clone()),
    );
    match found.len() {
        0 => Err(Error::UnknownScheme {
            scheme: scheme.to_owned(),
            registered: schemes(),
        }),
        1 => Ok(found.remove(0)),
        count => Err(Error::DuplicateScheme {
            scheme: scheme.to_owned(),
            count,
        }),
    }
}

/// Every registered scheme, sorted.
pub fn schemes() -> Vec<String> {
    let mut set: BTreeSet<String> = inventory::iter::<FactoryRegistration>
        .into_iter()
        .map(|r| r.scheme.to_ascii_lowercase())
        .collect();
    let table = RUNTIME.read().unwrap_or_else(|p| p.into_inner());
    set.extend(table.iter().map(|(s, _)| s.clone()));
    set.into_iter().collect()
}
