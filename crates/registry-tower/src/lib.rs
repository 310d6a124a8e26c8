//! # registry-tower
//!
//! A registry subscription as a [`tower::discover::Discover`] stream, so that a Rust client
//! always talks to the current providers of a service: [`discover`] turns each notification
//! (a full list) into [`Change::Insert`] / [`Change::Remove`] of tower services, which
//! `tower::balance` (or anything else that reads a `Discover`) balances over. With the
//! `tonic` feature, `balance_channel` returns a `tonic::transport::Channel` kept in sync with
//! the providers.
//!
//! ```
//! # async fn demo() -> registry_core::Result<()> {
//! use futures_util::StreamExt;
//! use registry_tower::{Change, discover};
//!
//! let registry = registry_core::get_registry("memory://tower-doc").await?;
//! registry.register(&"tri://10.0.0.1:50051/helloworld.Greeter".parse()?).await?;
//!
//! // The service value is whatever the function builds from a provider URL; here its address.
//! let query = "consumer://10.0.0.9/helloworld.Greeter".parse()?;
//! let mut changes = discover(registry.clone(), query, |url: &registry_core::Url| {
//!     Ok::<_, std::convert::Infallible>(url.address())
//! })
//! .await?;
//! match changes.next().await {
//!     Some(Ok(Change::Insert(key, address))) => {
//!         assert_eq!(key.to_string(), "tri://10.0.0.1:50051/helloworld.Greeter");
//!         assert_eq!(address, "10.0.0.1:50051");
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # registry.destroy().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! ## The rules
//!
//! - **Identity.** A provider is identified by protocol, host, port and path ([`ProviderKey`]).
//!   A list is diffed against the previous one of the same service: a new key is inserted, a
//!   key that is gone is removed, and a key whose URL changed (any parameter other than
//!   `timestamp`) is inserted again with the new URL, which replaces the old service. An
//!   identical list yields no change. Within one list, inserts come before removes, so a
//!   balancer is never left empty while one provider replaces another. Two URLs with one key
//!   in the same list (a provider registered twice with different parameters) count once: the
//!   one whose full string sorts last.
//! - **`empty://`.** The marker of an empty list removes every provider of that service.
//! - **Only `providers`.** The query's `category` is set to `providers`; discovery is about
//!   whom to call.
//! - **Disabled providers.** A provider with `enabled=false` is never inserted (and is
//!   removed when it becomes disabled), even when the query says `enabled=*`: it must get no
//!   traffic.
//! - **`weight`.** Not used for choosing: `tower::balance` picks the less loaded of two
//!   random providers (power of two choices) and has no weights. It is a parameter, so a
//!   change of weight re-inserts the provider; the URL passed to the function carries it for
//!   a caller that wants to act on it.
//! - **Lists from the cache** (`Source::Cache`: the registry is unreachable and the list is
//!   the last one saved). They are used, since the providers they name are likely still up,
//!   but they only add and update: stale information never removes a provider. The next
//!   live list is applied in full and removes whatever it does not name.
//! - **`enable-empty-protection=true`** on the registry URL: the registry does not deliver an
//!   empty providers list, so the stream removes nothing and the last providers stay in the
//!   balancer (calls to them fail rather than wait for a provider that may never come).
//! - **A provider the function refuses** (it returns `Err`) is skipped with a warning; if it
//!   was inserted before with other parameters, it is removed.
//! - **Dropping the stream unsubscribes** (see [`registry_core::NotificationStream`]).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use registry_core::url::PROVIDERS_CATEGORY;
use registry_core::{Notification, NotificationStream, Registry, Source, Url};

pub use tower::discover::Change;

#[cfg(feature = "tonic")]
mod channel;
#[cfg(feature = "tonic")]
pub use channel::{
    BalancedChannel, UnsupportedProvider, balance_channel, balance_channel_with, endpoint_for,
};

/// The identity of a provider: protocol, host, port and path. Its `Display` is
/// `protocol://host:port/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderKey {
    protocol: String,
    host: String,
    port: u16,
    path: String,
}

impl ProviderKey {
    /// The identity of `url`.
    pub fn of(url: &Url) -> ProviderKey {
        ProviderKey {
            protocol: url.protocol().to_owned(),
            host: url.host().to_owned(),
            port: url.port(),
            path: url.path().to_owned(),
        }
    }

    /// The protocol (`tri`, `grpc`, ...).
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// The host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (0 when the URL has none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path (the service interface, without a leading `/`).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for ProviderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:{}/{}",
            self.protocol, self.host, self.port, self.path
        )
    }
}

/// The current providers of a subscription, and the diff of each new list against them (the
/// rules are in the [crate documentation](crate)). [`discover`] uses it; it is public for
/// callers that feed their own load balancer.
#[derive(Debug, Default, Clone)]
pub struct ProviderSet {
    /// Per service (a wildcard subscription is notified per service), its providers.
    services: HashMap<String, BTreeMap<ProviderKey, Url>>,
}

impl ProviderSet {
    /// An empty set.
    pub fn new() -> ProviderSet {
        ProviderSet::default()
    }

    /// Applies one notification and returns what changed: inserts (new or changed
    /// providers, in key order), then removes. Notifications of other categories than
    /// `providers` change nothing.
    pub fn apply(&mut self, n: &Notification) -> Vec<Change<ProviderKey, Url>> {
        if n.category != PROVIDERS_CATEGORY {
            return Vec::new();
        }
        let mut next: BTreeMap<ProviderKey, Url> = BTreeMap::new();
        for url in n.entries().filter(|u| u.is_enabled()) {
            let key = ProviderKey::of(url);
            match next.get(&key) {
                Some(kept) if kept.to_full_string() >= url.to_full_string() => {}
                _ => {
                    next.insert(key, url.clone());
                }
            }
        }
        let old = self.services.remove(&n.service).unwrap_or_default();
        let mut changes = Vec::new();
        for (key, url) in &next {
            if old.get(key) != Some(url) {
                changes.push(Change::Insert(key.clone(), url.clone()));
            }
        }
        if n.source == Source::Cache {
            // Stale information adds and updates, and never removes.
            for (key, url) in old {
                next.entry(key).or_insert(url);
            }
        } else {
            for key in old.keys().filter(|k| !next.contains_key(*k)) {
                changes.push(Change::Remove(key.clone()));
            }
        }
        if !next.is_empty() {
            self.services.insert(n.service.clone(), next);
        }
        changes
    }

    /// Every current provider, by service then key.
    pub fn providers(&self) -> Vec<Url> {
        let mut services: Vec<&String> = self.services.keys().collect();
        services.sort();
        services
            .into_iter()
            .flat_map(|s| self.services[s].values().cloned())
            .collect()
    }

    /// How many providers there are.
    pub fn len(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The query as discovery uses it: `category=providers`.
fn providers_query(query: Url) -> Url {
    query.with_parameter("category", PROVIDERS_CATEGORY)
}

/// Subscribes to the providers matching `query` and returns them as a stream of
/// [`Change`]s of services built by `make` from each provider URL: a
/// [`tower::discover::Discover`] for `tower::balance` or any other consumer of one. Like
/// [`Registry::subscribe`], it returns after the first list was delivered; the changes it
/// makes are the first items of the stream. Dropping the stream unsubscribes.
///
/// `make` may refuse a provider (`Err`): it is skipped with a warning naming it and the
/// reason. The stream never yields an error (its error type is [`Infallible`]); it ends
/// only when the subscription ends.
pub async fn discover<S, E, F>(
    registry: Arc<dyn Registry>,
    query: Url,
    make: F,
) -> registry_core::Result<Discovered<S, F>>
where
    F: FnMut(&Url) -> Result<S, E>,
    E: fmt::Display,
{
    let notifications = registry_core::subscribe_stream(registry, providers_query(query)).await?;
    Ok(Discovered {
        notifications,
        set: ProviderSet::new(),
        make,
        inserted: HashSet::new(),
        pending: VecDeque::new(),
    })
}

/// The stream [`discover`] returns: `Result<Change<ProviderKey, S>, Infallible>` items, which
/// makes it a [`tower::discover::Discover`].
pub struct Discovered<S, F> {
    notifications: NotificationStream,
    set: ProviderSet,
    make: F,
    inserted: HashSet<ProviderKey>,
    pending: VecDeque<Change<ProviderKey, S>>,
}

// No field is ever pinned: the stream is polled through `&mut Self`.
impl<S, F> Unpin for Discovered<S, F> {}

impl<S, F> fmt::Debug for Discovered<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovered")
            .field("providers", &self.set.providers())
            .field("pending_changes", &self.pending.len())
            .finish()
    }
}

impl<S, F> Discovered<S, F> {
    /// The providers of the last list applied (including any `make` refused).
    pub fn providers(&self) -> Vec<Url> {
        self.set.providers()
    }

    /// Unsubscribes now and waits for it. Dropping the stream does the same in the
    /// background.
    pub async fn unsubscribe(self) -> registry_core::Result<()> {
        self.notifications.unsubscribe().await
    }
}

impl<S, E, F> Discovered<S, F>
where
    F: FnMut(&Url) -> Result<S, E>,
    E: fmt::Display,
{
    fn queue(&mut self, n: &Notification) {
        for change in self.set.apply(n) {
            match change {
                Change::Insert(key, url) => match (self.make)(&url) {
                    Ok(service) => {
                        tracing::debug!(provider = %url.to_identity_string_redacted(), "provider inserted");
                        self.inserted.insert(key.clone());
                        self.pending.push_back(Change::Insert(key, service));
                    }
                    Err(e) => {
                        tracing::warn!(
                            provider = %url.to_identity_string_redacted(),
                            error = %e,
                            "provider skipped: no service could be made for it"
                        );
                        if self.inserted.remove(&key) {
                            self.pending.push_back(Change::Remove(key));
                        }
                    }
                },
                Change::Remove(key) => {
                    if self.inserted.remove(&key) {
                        tracing::debug!(provider = %key, "provider removed");
                        self.pending.push_back(Change::Remove(key));
                    }
                }
            }
        }
    }
}

impl<S, E, F> Stream for Discovered<S, F>
where
    F: FnMut(&Url) -> Result<S, E>,
    E: fmt::Display,
{
    type Item = Result<Change<ProviderKey, S>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match Pin::new(&mut this.notifications).poll_next(cx) {
                Poll::Ready(Some(n)) => this.queue(&n),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        s.parse().expect("url")
    }

    fn list(urls: &[&str], source: Source) -> Notification {
        Notification::new(
            "S",
            "providers",
            urls.iter().map(|u| url(u)).collect::<Vec<_>>(),
            1,
            source,
        )
    }

    fn live(urls: &[&str]) -> Notification {
        list(urls, Source::Live)
    }

    /// The changes as `+key` / `-key` strings, in order.
    fn shown(changes: &[Change<ProviderKey, Url>]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Insert(k, u) => {
                    assert_eq!(&ProviderKey::of(u), k, "an insert carries its own key");
                    format!("+{u}")
                }
                Change::Remove(k) => format!("-{k}"),
            })
            .collect()
    }

    const A: &str = "tri://10.0.0.1:50051/S?weight=100";
    const B: &str = "tri://10.0.0.2:50051/S?weight=100";
    const EMPTY: &str = "empty://10.0.0.9/S?category=providers";

    #[test]
    fn inserts_then_removes() {
        let mut set = ProviderSet::new();
        assert_eq!(
            shown(&set.apply(&live(&[B, A]))),
            [format!("+{A}"), format!("+{B}")]
        );
        let c = "tri://10.0.0.3:50051/S?weight=100";
        assert_eq!(
            shown(&set.apply(&live(&[B, c]))),
            [format!("+{c}"), "-tri://10.0.0.1:50051/S".to_owned()]
        );
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn a_changed_parameter_reinserts_and_timestamp_does_not_count() {
        let mut set = ProviderSet::new();
        set.apply(&live(&[A, B]));
        let a2 = "tri://10.0.0.1:50051/S?weight=50";
        assert_eq!(shown(&set.apply(&live(&[a2, B]))), [format!("+{a2}")]);
        let a3 = "tri://10.0.0.1:50051/S?timestamp=2&weight=50";
        assert!(set.apply(&live(&[a3, B])).is_empty());
        // Another port, protocol or path is another provider.
        let other = "grpc://10.0.0.1:50051/S?weight=50";
        assert_eq!(
            shown(&set.apply(&live(&[other, B]))),
            [format!("+{other}"), "-tri://10.0.0.1:50051/S".to_owned()]
        );
    }

    #[test]
    fn the_empty_marker_removes_everything() {
        let mut set = ProviderSet::new();
        set.apply(&live(&[A, B]));
        assert_eq!(
            shown(&set.apply(&live(&[EMPTY]))),
            ["-tri://10.0.0.1:50051/S", "-tri://10.0.0.2:50051/S"]
        );
        assert!(set.is_empty());
        assert!(set.apply(&live(&[EMPTY])).is_empty());
    }

    #[test]
    fn a_repeated_list_changes_nothing() {
        let mut set = ProviderSet::new();
        assert_eq!(set.apply(&live(&[A, B])).len(), 2);
        assert!(set.apply(&live(&[A, B])).is_empty());
        assert!(
            set.apply(&live(&[B, A])).is_empty(),
            "order does not matter"
        );
        assert_eq!(set.providers(), [url(A), url(B)]);
    }

    #[test]
    fn disabled_providers_are_left_out() {
        let mut set = ProviderSet::new();
        set.apply(&live(&[A, B]));
        let b_off = "tri://10.0.0.2:50051/S?enabled=false&weight=100";
        assert_eq!(
            shown(&set.apply(&live(&[A, b_off]))),
            ["-tri://10.0.0.2:50051/S"]
        );
        assert_eq!(shown(&set.apply(&live(&[A, B]))), [format!("+{B}")]);
    }

    #[test]
    fn cache_lists_add_and_update_but_never_remove() {
        let mut set = ProviderSet::new();
        set.apply(&live(&[A]));
        let a2 = "tri://10.0.0.1:50051/S?weight=7";
        let changes = set.apply(&list(&[B], Source::Cache));
        assert_eq!(shown(&changes), [format!("+{B}")]);
        let changes = set.apply(&list(&[EMPTY], Source::Cache));
        assert!(changes.is_empty(), "{:?}", shown(&changes));
        let changes = set.apply(&list(&[a2], Source::Cache));
        assert_eq!(shown(&changes), [format!("+{a2}")]);
        assert_eq!(set.len(), 2);
        // The next live list is applied in full.
        assert_eq!(shown(&set.apply(&live(&[a2]))), ["-tri://10.0.0.2:50051/S"]);
    }

    #[test]
    fn one_key_twice_in_a_list_counts_once() {
        let mut set = ProviderSet::new();
        let a2 = "tri://10.0.0.1:50051/S?weight=200";
        let changes = set.apply(&live(&[a2, A]));
        assert_eq!(shown(&changes), [format!("+{a2}")]);
        assert!(set.apply(&live(&[A, a2])).is_empty());
    }

    #[test]
    fn services_of_a_wildcard_subscription_are_diffed_apart() {
        let mut set = ProviderSet::new();
        set.apply(&live(&[A]));
        let t = Notification::new(
            "T",
            "providers",
            vec![url("tri://10.0.0.1:50051/T")],
            1,
            Source::Live,
        );
        assert_eq!(shown(&set.apply(&t)), ["+tri://10.0.0.1:50051/T"]);
        assert_eq!(set.len(), 2);
        let t_empty = Notification::new(
            "T",
            "providers",
            vec![url("empty://10.0.0.9/T?category=providers")],
            2,
            Source::Live,
        );
        assert_eq!(shown(&set.apply(&t_empty)), ["-tri://10.0.0.1:50051/T"]);
        assert_eq!(set.providers(), [url(A)]);
    }

    #[test]
    fn other_categories_change_nothing() {
        let mut set = ProviderSet::new();
        let n = Notification::new("S", "routers", vec![url(A)], 1, Source::Live);
        assert!(set.apply(&n).is_empty());
        assert!(set.is_empty());
    }
}
