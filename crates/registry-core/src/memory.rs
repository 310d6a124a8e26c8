//! `memory://name`: the in-process backend, the embedded default that needs no server.
//!
//! It is a real backend with the whole contract: set semantics, per-category full lists,
//! `empty://` markers, `interface=*`, lookup, and destroy dropping the dynamic entries it made.
//! Registries built from the same `memory://name` (and group) share one store for the life of
//! the process, so a provider and a consumer in one process find each other, and persistent
//! (`dynamic=false`) entries outlive the registry that wrote them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::delivery::{Delivery, DeliveryOptions};
use crate::error::{Error, Result};
use crate::keeper::{ListKeeper, Scope, SubscriptionId};
use crate::registry::{NotifyListener, Registry, RegistryEvent, RegistryFactory, listener_id};
use crate::url::{GROUP_KEY, Url};

/// The scheme of the memory backend.
pub const MEMORY_SCHEME: &str = "memory";

/// Builds [`MemoryRegistry`] instances; registered under `memory`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFactory;

#[async_trait]
impl RegistryFactory for MemoryFactory {
    async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>> {
        Ok(Arc::new(MemoryRegistry::new(url.clone())))
    }
}

crate::submit_factory!(MEMORY_SCHEME, MemoryFactory);

static STORES: LazyLock<Mutex<HashMap<String, Arc<Store>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An entry and the registry that wrote it last.
struct Owned {
    url: Url,
    owner: u64,
}

/// One named store: the entries (one per identity, see [`Url`]'s equality), who owns them,
/// and the keeper that holds the lists of every subscription on the store. The keeper's root
/// scope is loaded from the start: the store is the truth.
struct Store {
    entries: Mutex<HashMap<Url, Owned>>,
    keeper: ListKeeper,
}

impl Store {
    fn new(name: &str) -> Store {
        let keeper = ListKeeper::new(format!("memory://{name}"));
        keeper.replace(&Scope::Root, [], 0);
        Store {
            entries: Mutex::new(HashMap::new()),
            keeper,
        }
    }
}

/// A subscription of one registry: its id in the store's keeper and its delivery.
type Subscribed = (SubscriptionId, Arc<Delivery>);

/// The in-process registry; see the module documentation.
pub struct MemoryRegistry {
    url: Url,
    id: u64,
    store: Arc<Store>,
    /// (subscription URL, listener id) -> its subscription in the store's keeper
    subs: Mutex<HashMap<(Url, usize), Subscribed>>,
    destroyed: AtomicBool,
    events: broadcast::Sender<RegistryEvent>,
}

impl MemoryRegistry {
    /// A registry on the store named by `url` (`memory://name`, group from `group`).
    pub fn new(url: Url) -> MemoryRegistry {
        let name = format!("{}/{}", url.address(), url.parameter_or(GROUP_KEY, "dubbo"));
        let store = lock(&STORES)
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Store::new(&name)))
            .clone();
        MemoryRegistry {
            url,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            store,
            subs: Mutex::new(HashMap::new()),
            destroyed: AtomicBool::new(false),
            events: broadcast::channel(16).0,
        }
    }

    fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.url.to_identity_string_redacted(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    fn url(&self) -> &Url {
        &self.url
    }

    fn is_available(&self) -> bool {
        !self.destroyed.load(Ordering::Acquire)
    }

    async fn register(&self, url: &Url) -> Result<()> {
        self.alive()?;
        crate::check_accepts(&self.url, url)?;
        let (service, category) = (url.service_interface(), url.category());
        let mut entries = lock(&self.store.entries);
        match entries.get_mut(url) {
            Some(e) => {
                e.owner = self.id;
                // One entry per identity: a re-register with another timestamp replaces it.
                if e.url.as_full_str() != url.as_full_str() {
                    let old = std::mem::replace(&mut e.url, url.clone());
                    self.store
                        .keeper
                        .change(service, category, vec![url.clone()], vec![old], 0);
                }
            }
            None => {
                entries.insert(
                    url.clone(),
                    Owned {
                        url: url.clone(),
                        owner: self.id,
                    },
                );
                self.store.keeper.put(service, category, url.clone(), 0);
            }
        }
        Ok(())
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        self.alive()?;
        let mut entries = lock(&self.store.entries);
        if let Some(e) = entries.remove(url) {
            self.store
                .keeper
                .remove(url.service_interface(), url.category(), &e.url, 0);
        }
        Ok(())
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        self.alive()?;
        let key = (url.clone(), listener_id(&listener));
        let flush = {
            let mut subs = lock(&self.subs);
            if subs.contains_key(&key) {
                return Ok(());
            }
            // Application listeners: isolated from the runtime; a forwarding layer's: inline.
            let delivery = Arc::new(Delivery::for_listener(
                listener,
                DeliveryOptions {
                    empty_protection: self.url.parameter_bool("enable-empty-protection", false),
                    label: url.to_redacted_string(),
                },
            ));
            // The root is loaded: the first lists are pushed before this returns.
            let id = self.store.keeper.subscribe(url, delivery.clone());
            let flush = delivery.flush_handle();
            subs.insert(key, (id, delivery));
            flush
        };
        flush.await;
        Ok(())
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        self.alive()?;
        let Some((id, delivery)) = lock(&self.subs).remove(&(url.clone(), listener_id(listener)))
        else {
            return Ok(());
        };
        self.store.keeper.unsubscribe(id);
        delivery.close().await;
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        self.alive()?;
        Ok(self.store.keeper.lookup(url).unwrap_or_default())
    }

    async fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        let subs: Vec<Subscribed> = lock(&self.subs).drain().map(|(_, s)| s).collect();
        for (id, _) in &subs {
            self.store.keeper.unsubscribe(*id);
        }
        {
            let mut entries = lock(&self.store.entries);
            let mut gone: BTreeMap<(String, String), Vec<Url>> = BTreeMap::new();
            entries.retain(|u, e| {
                let mine = e.owner == self.id && u.is_dynamic();
                if mine {
                    gone.entry((u.service_interface().to_owned(), u.category().to_owned()))
                        .or_default()
                        .push(e.url.clone());
                }
                !mine
            });
            for ((service, category), removed) in gone {
                self.store
                    .keeper
                    .change(&service, &category, Vec::new(), removed, 0);
            }
        }
        for (_, delivery) in subs {
            delivery.close().await;
        }
        let _ = self.events.send(RegistryEvent::Destroyed);
        tracing::debug!(registry = %self.url.to_identity_string_redacted(), "memory registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }
}
