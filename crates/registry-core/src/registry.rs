//! The traits every backend implements and every application calls.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::url::Url;

/// A service registry: providers register their URLs, consumers subscribe and are told the
/// full current list of what matches (CONTRACT §3, §4).
///
/// The trait is object safe: applications hold an `Arc<dyn Registry>` chosen by the registry
/// URL's scheme (see [`crate::get_registry`]).
///
/// ```
/// # async fn demo() -> registry_core::Result<()> {
/// use std::sync::Arc;
/// use registry_core::{get_registry, Notification, NotifyListener, Url};
///
/// let registry = get_registry("memory://docs-example").await?;
/// let provider: Url = "dubbo://10.0.0.1:20880/com.foo.Greeter?version=1.0".parse()?;
/// registry.register(&provider).await?;
///
/// let listener: Arc<dyn NotifyListener> = Arc::new(|n: Notification| {
///     println!("{} {}: {:?}", n.service, n.category, n.urls);
/// });
/// let query: Url = "consumer://10.0.0.2/com.foo.Greeter?version=1.0".parse()?;
/// registry.subscribe(&query, listener.clone()).await?; // returns after the first notification
/// registry.unsubscribe(&query, &listener).await?;
/// registry.destroy().await;
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// The registry URL this instance was built from.
    fn url(&self) -> &Url;

    /// Whether the backend is reachable right now.
    fn is_available(&self) -> bool;

    /// Registers `url` (set semantics; `dynamic=false` makes it persistent; `category`
    /// decides where it is stored).
    async fn register(&self, url: &Url) -> Result<()>;

    /// Removes the entry equal to `url`. Removing what is not there is not an error.
    async fn unregister(&self, url: &Url) -> Result<()>;

    /// Subscribes `listener` to what matches `url`. Returns after the listener has received
    /// the first notification of every category of the subscription. The same
    /// (`url`, listener `Arc`) twice is one subscription.
    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()>;

    /// Ends a subscription. No notification reaches the listener after this returns. An
    /// unknown subscription is not an error.
    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()>;

    /// The URLs that match `url` now, without `empty://` markers. Leaves no subscription.
    async fn lookup(&self, url: &Url) -> Result<Vec<Url>>;

    /// Unregisters every dynamic URL this registry registered, drops every subscription,
    /// stops every task and closes the connection. Idempotent. Afterwards every operation
    /// returns [`crate::Error::Destroyed`] and [`Registry::is_available`] is false.
    async fn destroy(&self);

    /// Connection events of the backend. The reliability layer uses [`RegistryEvent::NewSession`]
    /// to restore registrations and subscriptions. A receiver that lags behind gets
    /// `RecvError::Lagged` and should assume a new session.
    fn events(&self) -> broadcast::Receiver<RegistryEvent>;

    /// Whether [`Registry::destroy`] was called. The [`crate::RegistryManager`] builds a new
    /// registry in place of a destroyed one. The default says `false`: a backend that can be
    /// destroyed should answer.
    fn is_destroyed(&self) -> bool {
        false
    }
}

/// A connection event of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// Connected for the first time.
    Connected,
    /// The connection dropped; the session may still be alive.
    Disconnected,
    /// Reconnected within the same session: registrations are intact, lists were re-read.
    Reconnected,
    /// The session (ZooKeeper session, etcd lease) is gone, and with it every dynamic entry.
    SessionLost,
    /// A new session replaced a lost one: every registration and subscription must be restored.
    NewSession,
    /// [`Registry::destroy`] was called: nothing more will come from this registry.
    Destroyed,
}

/// Where a notification's list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Read from the backend.
    Live,
    /// From the memory or disk cache, because the backend is unreachable: may be stale.
    Cache,
}

impl Source {
    /// `live` or `cache`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Live => "live",
            Source::Cache => "cache",
        }
    }
}

/// One notification: the full current list of one category of one service of a subscription
/// (CONTRACT §4). An empty category is one `empty://` marker, so `urls` is never empty.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Notification {
    /// The service interface the list is for. Equal to the subscription's interface, except
    /// for `interface=*` subscriptions, which are notified per service.
    pub service: String,
    /// The category (`providers`, `consumers`, `routers`, `configurators`, ...).
    pub category: String,
    /// The full list, or one `empty://` marker.
    pub urls: Arc<[Url]>,
    /// The backend's revision of this list; a later list never has a smaller one.
    pub revision: u64,
    /// Live backend, or cache while the backend is unreachable.
    pub source: Source,
}

impl Notification {
    /// A notification.
    pub fn new(
        service: impl Into<String>,
        category: impl Into<String>,
        urls: impl Into<Arc<[Url]>>,
        revision: u64,
        source: Source,
    ) -> Notification {
        Notification {
            service: service.into(),
            category: category.into(),
            urls: urls.into(),
            revision,
            source,
        }
    }

    /// Whether the list is only the `empty://` marker.
    pub fn is_empty(&self) -> bool {
        self.urls.iter().all(Url::is_empty_marker)
    }

    /// The URLs without `empty://` markers.
    pub fn entries(&self) -> impl Iterator<Item = &Url> {
        self.urls.iter().filter(|u| !u.is_empty_marker())
    }

    /// The same notification with another source.
    #[must_use]
    pub fn with_source(mut self, source: Source) -> Notification {
        self.source = source;
        self
    }
}

/// Receives notifications. Keep it short: a slow listener gets the latest list, not every
/// intermediate one. Closures `Fn(Notification)` implement it.
///
/// A listener must not block, least of all on the registry that calls it (for example by
/// waiting inside `notify` for an `unsubscribe` of itself): `unsubscribe` and `destroy` wait
/// for a running call only up to the registry's `timeout`, then log it and return.
///
/// Listeners are identified by identity: the same `Arc` is the same listener.
pub trait NotifyListener: Send + Sync + 'static {
    /// Called with one category's full list.
    fn notify(&self, notification: Notification);

    /// `true` for a listener that never blocks and only hands the list on (the reliability
    /// layer's listener, which queues it for its own delivery task): a backend may then call
    /// it inline, on its own event task, instead of through a delivery task of its own
    /// ([`crate::delivery::Delivery::for_listener`]). Application listeners keep the default,
    /// `false`.
    fn is_forwarder(&self) -> bool {
        false
    }
}

impl<F> NotifyListener for F
where
    F: Fn(Notification) + Send + Sync + 'static,
{
    fn notify(&self, notification: Notification) {
        self(notification)
    }
}

/// The identity of a listener: the address of its `Arc` allocation.
pub fn listener_id(listener: &Arc<dyn NotifyListener>) -> usize {
    Arc::as_ptr(listener).cast::<()>() as usize
}

/// Builds registries for one or more schemes. Backend crates register theirs with
/// [`crate::submit_factory!`]; see [`crate::factory`].
#[async_trait]
pub trait RegistryFactory: Send + Sync + 'static {
    /// Builds a registry for `url`. With `check=true` (the default) an unreachable backend is
    /// an error; with `check=false` the registry is returned and connects in the background.
    async fn create(&self, url: &Url) -> Result<Arc<dyn Registry>>;
}

/// An `Arc` of a registry is a registry, so layers such as the reliability layer can wrap an
/// `Arc<dyn Registry>` or a shared instance.
#[async_trait]
impl<T: Registry + ?Sized> Registry for Arc<T> {
    fn url(&self) -> &Url {
        (**self).url()
    }
    fn is_available(&self) -> bool {
        (**self).is_available()
    }
    async fn register(&self, url: &Url) -> Result<()> {
        (**self).register(url).await
    }
    async fn unregister(&self, url: &Url) -> Result<()> {
        (**self).unregister(url).await
    }
    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        (**self).subscribe(url, listener).await
    }
    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        (**self).unsubscribe(url, listener).await
    }
    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        (**self).lookup(url).await
    }
    async fn destroy(&self) {
        (**self).destroy().await
    }
    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        (**self).events()
    }
    fn is_destroyed(&self) -> bool {
        (**self).is_destroyed()
    }
}
