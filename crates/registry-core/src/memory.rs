//! `memory://name`: the in-process backend, the embedded default that needs no server.
//!
//! It is a real backend with the whole contract: set semantics, per-category full lists,
//! `empty://` markers, `interface=*`, lookup, and destroy dropping the dynamic entries it made.
//! Registries built from the same `memory://name` (and group) share one store for the life of
//! the process, so a provider and a consumer in one process find each other, and persistent
//! (`dynamic=false`) entries outlive the registry that wrote them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::delivery::{Delivery, DeliveryOptions};
use crate::error::{Error, Result};
use crate::matching::is_match;
use crate::registry::{
    Notification, NotifyListener, Registry, RegistryEvent, RegistryFactory, Source, listener_id,
};
use crate::url::{ANY_VALUE, GROUP_KEY, Url};

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

struct Entry {
    url: Url,
    owner: u64,
}

struct Sub {
    url: Url,
    categories: Vec<String>,
    wildcard: bool,
    owner: u64,
    delivery: Delivery,
    /// Services a wildcard subscription has been told about.
    known: HashSet<String>,
}

#[derive(Default)]
struct Data {
    revision: u64,
    /// interface -> category -> entries
    services: BTreeMap<String, BTreeMap<String, HashMap<Url, Entry>>>,
    subs: HashMap<u64, Sub>,
}

#[derive(Default)]
struct Store {
    data: Mutex<Data>,
}

impl Data {
    fn list(&self, sub_url: &Url, service: &str, category: &str) -> Vec<Url> {
        let mut urls: Vec<Url> = self
            .services
            .get(service)
            .and_then(|c| c.get(category))
            .map(|entries| {
                entries
                    .values()
                    .filter(|e| is_match(sub_url, &e.url))
                    .map(|e| e.url.clone())
                    .collect()
            })
            .unwrap_or_default();
        urls.sort_by_cached_key(Url::to_full_string);
        if urls.is_empty() {
            urls.push(sub_url.to_empty_marker_for(service, category));
        }
        urls
    }

    fn notify(&self, sub: &Sub, service: &str, category: &str) {
        let urls = self.list(&sub.url, service, category);
        sub.delivery.push(Notification::new(
            service,
            category,
            urls,
            self.revision,
            Source::Live,
        ));
    }

    /// Tells every subscription that watches (`service`, `category`) its new list.
    fn changed(&mut self, service: &str, category: &str) {
        self.revision += 1;
        let mut subs = std::mem::take(&mut self.subs);
        for sub in subs.values_mut() {
            if sub.wildcard && !sub.known.contains(service) {
                // A service this wildcard subscription has not seen: its first notification
                // covers every category.
                sub.known.insert(service.to_owned());
                for c in &sub.categories {
                    self.notify(sub, service, c);
                }
            } else if (sub.wildcard || sub.url.service_interface() == service)
                && sub.categories.iter().any(|c| c == category)
            {
                self.notify(sub, service, category);
            }
        }
        self.subs = subs;
    }
}

/// The in-process registry; see the module documentation.
pub struct MemoryRegistry {
    url: Url,
    id: u64,
    store: Arc<Store>,
    /// (subscription URL, listener id) -> subscription id in the store
    subs: Mutex<HashMap<(Url, usize), u64>>,
    destroyed: AtomicBool,
    events: broadcast::Sender<RegistryEvent>,
}

impl MemoryRegistry {
    /// A registry on the store named by `url` (`memory://name`, group from `group`).
    pub fn new(url: Url) -> MemoryRegistry {
        let name = format!("{}/{}", url.address(), url.parameter_or(GROUP_KEY, "dubbo"));
        let store = lock(&STORES).entry(name).or_default().clone();
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
        let service = url.service_interface().to_owned();
        let category = url.category().to_owned();
        let mut data = lock(&self.store.data);
        let entries = data
            .services
            .entry(service.clone())
            .or_default()
            .entry(category.clone())
            .or_default();
        if let Some(e) = entries.get_mut(url) {
            e.owner = self.id;
            // One entry per identity: a re-register with another timestamp replaces it.
            if e.url.parameter("timestamp") != url.parameter("timestamp") {
                e.url = url.clone();
                data.changed(&service, &category);
            }
            return Ok(());
        }
        entries.insert(
            url.clone(),
            Entry {
                url: url.clone(),
                owner: self.id,
            },
        );
        data.changed(&service, &category);
        Ok(())
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        self.alive()?;
        let service = url.service_interface();
        let category = url.category();
        let mut data = lock(&self.store.data);
        let removed = data
            .services
            .get_mut(service)
            .and_then(|c| c.get_mut(category))
            .and_then(|e| e.remove(url))
            .is_some();
        if removed {
            data.changed(service, category);
        }
        Ok(())
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        self.alive()?;
        let key = (url.clone(), listener_id(&listener));
        let sub_id = {
            let mut subs = lock(&self.subs);
            if subs.contains_key(&key) {
                return Ok(());
            }
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            subs.insert(key, id);
            id
        };
        let wildcard = url.service_interface() == ANY_VALUE;
        let mut sub = Sub {
            url: url.clone(),
            categories: url.categories(),
            wildcard,
            owner: self.id,
            // Application listeners: isolated from the runtime; a forwarding layer's: inline.
            delivery: Delivery::for_listener(
                listener,
                DeliveryOptions {
                    empty_protection: self.url.parameter_bool("enable-empty-protection", false),
                    label: url.to_redacted_string(),
                },
            ),
            known: HashSet::new(),
        };
        let flush = {
            let mut data = lock(&self.store.data);
            let services: Vec<String> = if wildcard {
                data.services
                    .iter()
                    .filter(|(_, cats)| cats.values().any(|e| !e.is_empty()))
                    .map(|(s, _)| s.clone())
                    .collect()
            } else {
                vec![url.service_interface().to_owned()]
            };
            for s in &services {
                for c in &sub.categories {
                    data.notify(&sub, s, c);
                }
                if wildcard {
                    sub.known.insert(s.clone());
                }
            }
            // Keep a handle to wait on after releasing the store lock.
            let flush = sub.delivery.flush_handle();
            data.subs.insert(sub_id, sub);
            flush
        };
        flush.await;
        Ok(())
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        self.alive()?;
        let Some(id) = lock(&self.subs).remove(&(url.clone(), listener_id(listener))) else {
            return Ok(());
        };
        let sub = lock(&self.store.data).subs.remove(&id);
        if let Some(sub) = sub {
            sub.delivery.close().await;
        }
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        self.alive()?;
        let data = lock(&self.store.data);
        let wildcard = url.service_interface() == ANY_VALUE;
        let categories = url.categories();
        let mut out = Vec::new();
        for (service, cats) in &data.services {
            if !wildcard && service != url.service_interface() {
                continue;
            }
            for c in &categories {
                if let Some(entries) = cats.get(c) {
                    let mut found: Vec<Url> = entries
                        .values()
                        .filter(|e| is_match(url, &e.url))
                        .map(|e| e.url.clone())
                        .collect();
                    found.sort_by_cached_key(Url::to_full_string);
                    out.extend(found);
                }
            }
        }
        Ok(out)
    }

    async fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.subs).clear();
        let closing: Vec<Sub> = {
            let mut data = lock(&self.store.data);
            let mut gone: Vec<(String, String)> = Vec::new();
            for (service, cats) in data.services.iter_mut() {
                for (category, entries) in cats.iter_mut() {
                    let before = entries.len();
                    entries.retain(|u, e| !(e.owner == self.id && u.is_dynamic()));
                    if entries.len() != before {
                        gone.push((service.clone(), category.clone()));
                    }
                }
            }
            let mine: Vec<u64> = data
                .subs
                .iter()
                .filter(|(_, s)| s.owner == self.id)
                .map(|(id, _)| *id)
                .collect();
            let closing = mine.iter().filter_map(|id| data.subs.remove(id)).collect();
            for (s, c) in gone {
                data.changed(&s, &c);
            }
            closing
        };
        for sub in closing {
            sub.delivery.close().await;
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
