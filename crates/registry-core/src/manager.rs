//! [`RegistryManager`]: registries cached per registry key (CONTRACT §5).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::OnceCell;

use crate::error::{Error, Result};
use crate::factory::factory_for;
use crate::registry::Registry;
use crate::url::{GROUP_KEY, Url};

/// The service path Dubbo puts in its registry cache key.
const REGISTRY_SERVICE: &str = "org.apache.dubbo.registry.RegistryService";

/// The cache key of a registry URL: `protocol://[user[:pass]@]host[:port]/[group/]RegistryService`
/// (Dubbo's `createRegistryCacheKey`). The same address and group give the same registry; a
/// different group or different credentials give another. Beyond Dubbo: a registry URL with a
/// path of its own (a path-addressed backend such as `localdir:///srv/registry`) keeps it in
/// the key, so two directories are two registries.
pub fn registry_key(url: &Url) -> String {
    let mut path = String::new();
    let own_path = url.path().trim_matches('/');
    if !own_path.is_empty() && own_path != REGISTRY_SERVICE {
        path.push_str(own_path);
        path.push('/');
    }
    if let Some(g) = url.parameter(GROUP_KEY).filter(|g| !g.is_empty()) {
        path.push_str(g);
        path.push('/');
    }
    path.push_str(REGISTRY_SERVICE);
    Url::new(url.protocol(), url.host(), url.port(), path)
        .with_credentials(url.username(), url.password())
        .to_full_string()
}

/// Something that names a registry URL: a `&str`, `String` or [`Url`].
pub trait IntoRegistryUrl {
    /// The URL.
    fn into_registry_url(self) -> Result<Url>;
}
impl IntoRegistryUrl for &str {
    fn into_registry_url(self) -> Result<Url> {
        Url::parse(self)
    }
}
impl IntoRegistryUrl for String {
    fn into_registry_url(self) -> Result<Url> {
        Url::parse(&self)
    }
}
impl IntoRegistryUrl for &String {
    fn into_registry_url(self) -> Result<Url> {
        Url::parse(self)
    }
}
impl IntoRegistryUrl for Url {
    fn into_registry_url(self) -> Result<Url> {
        Ok(self)
    }
}
impl IntoRegistryUrl for &Url {
    fn into_registry_url(self) -> Result<Url> {
        Ok(self.clone())
    }
}

/// Checks that `url` can be a registry address: not anyhost (`0.0.0.0`, `anyhost=true`).
pub fn validate_registry_url(url: &Url) -> Result<()> {
    if url.is_anyhost() {
        return Err(Error::InvalidRegistryUrl {
            url: url.to_identity_string_redacted(),
            reason: "0.0.0.0 / anyhost=true is not a registry address; give the server's address"
                .to_owned(),
        });
    }
    Ok(())
}

type Slot = Arc<OnceCell<Arc<dyn Registry>>>;

/// Builds registries through the scheme table and caches them per [`registry_key`].
#[derive(Default)]
pub struct RegistryManager {
    slots: Mutex<HashMap<String, Slot>>,
}

impl RegistryManager {
    /// An empty manager.
    pub fn new() -> RegistryManager {
        RegistryManager::default()
    }

    /// The registry for `url`, built by its scheme's factory the first time and cached.
    /// Concurrent calls for the same key build it once.
    pub async fn get_registry(&self, url: impl IntoRegistryUrl) -> Result<Arc<dyn Registry>> {
        let url = url.into_registry_url()?;
        validate_registry_url(&url)?;
        let factory = factory_for(url.protocol())?;
        let key = registry_key(&url);
        for _ in 0..2 {
            let slot = {
                let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                slots.entry(key.clone()).or_default().clone()
            };
            let reg = slot
                .get_or_try_init(|| async { factory.create(&url).await })
                .await?;
            if !reg.is_destroyed() {
                return Ok(reg.clone());
            }
            // Destroyed directly (not through this manager): forget it and build a new one.
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(&key);
            }
        }
        Err(Error::Destroyed {
            registry: url.to_identity_string_redacted(),
        })
    }

    /// The registries built so far.
    pub fn registries(&self) -> Vec<Arc<dyn Registry>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter_map(|s| s.get().cloned())
            .filter(|r| !r.is_destroyed())
            .collect()
    }

    /// Destroys the registry for `url`, if one was built, and forgets it.
    pub async fn destroy(&self, url: impl IntoRegistryUrl) -> Result<()> {
        let key = registry_key(&url.into_registry_url()?);
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.remove(&key)
        };
        if let Some(reg) = slot.and_then(|s| s.get().cloned()) {
            reg.destroy().await;
        }
        Ok(())
    }

    /// Destroys every registry and forgets them; later calls build new ones.
    pub async fn destroy_all(&self) {
        let all: Vec<Slot> = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.drain().map(|(_, s)| s).collect()
        };
        for slot in all {
            if let Some(reg) = slot.get() {
                reg.destroy().await;
            }
        }
    }
}

static DEFAULT: LazyLock<RegistryManager> = LazyLock::new(RegistryManager::new);

/// The process-wide manager used by [`get_registry`].
pub fn default_manager() -> &'static RegistryManager {
    &DEFAULT
}

/// The registry for a URL such as `"zookeeper://10.0.0.1:2181"`, from the process-wide
/// [`RegistryManager`].
pub async fn get_registry(url: impl IntoRegistryUrl) -> Result<Arc<dyn Registry>> {
    DEFAULT.get_registry(url).await
}
