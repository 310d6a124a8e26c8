//! [`EtcdRegistry`]: the raw `etcd://` backend (CONTRACT §7 etcd).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, GetOptions, KvClient, LeaseClient, PutOptions, WatchClient,
};
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::url::ANY_VALUE;
use registry_core::{
    Error, NotifyListener, Registry, RegistryEvent, Result, Url, is_match, listener_id,
};
use tokio::sync::{broadcast, mpsc, watch};

use crate::errors::{self, Kind};
use crate::options::Options;
use crate::paths;
use crate::session::{self, Cmd};
use crate::watches::{Scope, Sub, WatchState, parse_entries};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The clients of one connection, with the raised decoding limit.
#[derive(Clone)]
pub(crate) struct Clients {
    pub client: Client,
    pub kv: KvClient,
    pub watch: WatchClient,
    pub lease: LeaseClient,
}

/// The state shared by the registry handle and its session task.
pub(crate) struct Inner {
    pub url: Url,
    /// The registry URL for messages (password hidden).
    pub label: String,
    pub opts: Options,
    pub clients: RwLock<Option<Clients>>,
    /// The current lease; 0 while there is none.
    pub lease: AtomicI64,
    pub available: AtomicBool,
    pub destroyed: AtomicBool,
    pub events: broadcast::Sender<RegistryEvent>,
    pub subs: Mutex<HashMap<(Url, usize), Arc<Sub>>>,
    /// watch id -> watch.
    pub watches: Mutex<HashMap<i64, WatchState>>,
    pub next_watch_id: AtomicI64,
    pub cmds: mpsc::UnboundedSender<Cmd>,
    pub shutdown: watch::Sender<bool>,
    /// The session task, joined by `destroy`.
    pub session: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    pub fn clients(&self) -> Option<Clients> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.label.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn connected(&self) -> Result<Clients> {
        self.alive()?;
        self.clients().ok_or_else(|| Error::Unavailable {
            registry: self.label.clone(),
            reason: "not connected to etcd yet (connecting in the background)".to_owned(),
        })
    }

    /// Converts an operation's error; asks the session to check the lease or the token
    /// when the error says they are gone.
    pub fn fail(&self, (e, kind): (Error, Kind)) -> Error {
        // "user name is empty" with credentials: the request went out without a token (it is
        // being renewed); like etcd's Go client, authenticate again and retry.
        if kind == Kind::Denied
            && self.opts.user.is_some()
            && e.to_string().contains("user name is empty")
        {
            let _ = self.cmds.send(Cmd::Reauthenticate);
            return Error::Backend {
                registry: self.label.clone(),
                message: e.to_string(),
                retryable: true,
                source: Some(Box::new(e)),
            };
        }
        match kind {
            Kind::LeaseNotFound => {
                let _ = self.cmds.send(Cmd::CheckLease);
            }
            Kind::TokenInvalid => {
                let _ = self.cmds.send(Cmd::Reauthenticate);
            }
            _ => {}
        }
        e
    }

    pub fn emit(&self, e: RegistryEvent) {
        if self.destroyed.load(Ordering::Acquire) {
            return;
        }
        tracing::info!(registry = %self.label, event = ?e, "etcd registry event");
        let _ = self.events.send(e);
    }

    /// One range read of `prefix`: the parsed entries and the read's revision.
    pub async fn read(
        &self,
        clients: &Clients,
        prefix: &str,
        scope: &Scope,
    ) -> std::result::Result<(std::collections::BTreeMap<String, Url>, i64), (Error, Kind)> {
        let mut kv = clients.kv.clone();
        let resp = errors::timed(
            &self.label,
            || format!("reading {prefix}"),
            self.opts.timeout,
            kv.get(
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let entries = parse_entries(
            &self.label,
            prefix,
            scope,
            resp.kvs().iter().map(|kv| kv.key()),
        );
        Ok((entries, revision))
    }
}

/// Connects to etcd: builds the client (authenticating when the URL has credentials).
pub(crate) async fn connect(inner: &Inner) -> std::result::Result<Clients, (Error, Kind)> {
    let o = &inner.opts;
    let base = ConnectOptions::new()
        .with_timeout(o.timeout)
        .with_connect_timeout(o.timeout)
        .with_keep_alive(std::time::Duration::from_secs(10), o.timeout)
        .with_keep_alive_while_idle(false);
    let what = || format!("connecting to {}", o.endpoints.join(","));
    let client = match &o.user {
        Some((user, password)) => {
            let with_user = base.clone().with_user(user.clone(), password.clone());
            match errors::timed(
                &inner.label,
                what,
                o.timeout,
                Client::connect(&o.endpoints, Some(with_user)),
            )
            .await
            {
                Err((e, _)) if e.to_string().contains("authentication is not enabled") => {
                    tracing::warn!(
                        registry = %inner.label,
                        "etcd has authentication off: connecting without the user name and password of the URL"
                    );
                    errors::timed(
                        &inner.label,
                        what,
                        o.timeout,
                        Client::connect(&o.endpoints, Some(base)),
                    )
                    .await?
                }
                other => other?,
            }
        }
        None => {
            errors::timed(
                &inner.label,
                what,
                o.timeout,
                Client::connect(&o.endpoints, Some(base)),
            )
            .await?
        }
    };
    let kv = client
        .kv_client()
        .max_decoding_message_size(o.max_message_size);
    let watch = client
        .watch_client()
        .max_decoding_message_size(o.max_message_size);
    let lease = client.lease_client();
    Ok(Clients {
        client,
        kv,
        watch,
        lease,
    })
}

/// Grants a lease of the configured TTL.
pub(crate) async fn grant(
    inner: &Inner,
    clients: &Clients,
) -> std::result::Result<i64, (Error, Kind)> {
    let mut lease = clients.lease.clone();
    let resp = errors::timed(
        &inner.label,
        || {
            format!(
                "granting a lease of {} s at {}",
                inner.opts.ttl_secs,
                inner.opts.endpoints.join(",")
            )
        },
        inner.opts.timeout,
        lease.grant(inner.opts.ttl_secs, None),
    )
    .await?;
    if !resp.error().is_empty() {
        return Err((
            Error::backend(
                &inner.url,
                format!("granting a lease: {}", resp.error()),
                true,
            ),
            Kind::Transient,
        ));
    }
    Ok(resp.id())
}

/// The `etcd://` (and `etcd3://`) registry: entries are keys whose value is the URL, dynamic
/// ones on one lease per registry; subscriptions are a range read and a watch from the
/// revision after it, all watches on one watch stream. See the crate documentation.
pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

impl EtcdRegistry {
    /// Builds a registry for `url`. With `check=true` (the default) it connects, authenticates
    /// and grants the lease first, and fails with a clear error when etcd cannot be reached
    /// within `timeout`; with `check=false` it returns at once and connects in the
    /// background ([`Registry::is_available`] is false until then).
    pub async fn new(url: Url) -> Result<EtcdRegistry> {
        let opts = Options::from_url(&url)?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            label: url.to_identity_string_redacted(),
            url,
            clients: RwLock::new(None),
            lease: AtomicI64::new(0),
            available: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            events: broadcast::channel(64).0,
            subs: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            next_watch_id: AtomicI64::new(session::FIRST_WATCH_ID),
            cmds,
            shutdown: watch::channel(false).0,
            session: Mutex::new(None),
            opts,
        });
        if inner.opts.check {
            let clients = connect(&inner).await.map_err(|(e, _)| e)?;
            let id = grant(&inner, &clients).await.map_err(|(e, _)| e)?;
            // Leases need no permission: check that the root can be read too, so missing or
            // insufficient credentials fail here rather than on the first operation.
            let mut kv = clients.kv.clone();
            let root = paths::root_prefix(&inner.opts.root);
            let probe = errors::timed(
                &inner.label,
                || format!("reading {root}"),
                inner.opts.timeout,
                kv.get(
                    root.as_str(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                ),
            )
            .await;
            if let Err((e, _)) = probe {
                let mut lease = clients.lease.clone();
                let _ = tokio::time::timeout(inner.opts.timeout, lease.revoke(id)).await;
                return Err(e);
            }
            *inner.clients.write().unwrap_or_else(|p| p.into_inner()) = Some(clients);
            inner.lease.store(id, Ordering::Release);
            inner.available.store(true, Ordering::Release);
            tracing::info!(registry = %inner.label, lease = id, "connected to etcd");
        }
        let task = tokio::spawn(session::run(inner.clone(), cmd_rx));
        *lock(&inner.session) = Some(task);
        Ok(EtcdRegistry { inner })
    }

    /// The lease the dynamic entries are put on now (`None` while there is none).
    pub fn lease_id(&self) -> Option<i64> {
        Some(self.inner.lease.load(Ordering::Acquire)).filter(|l| *l != 0)
    }

    /// The key prefix of this registry (`/` + group).
    pub fn root(&self) -> &str {
        &self.inner.opts.root
    }

    async fn put(&self, url: &Url) -> Result<()> {
        let clients = self.inner.connected()?;
        let key = paths::entry_key(&self.inner.opts.root, url);
        let options = if url.is_dynamic() {
            let lease = self.inner.lease.load(Ordering::Acquire);
            if lease == 0 {
                return Err(Error::Unavailable {
                    registry: self.inner.label.clone(),
                    reason: format!("no lease to put {key} on yet (a new one is being granted)"),
                });
            }
            PutOptions::new().with_lease(lease)
        } else {
            PutOptions::new()
        };
        let mut kv = clients.kv.clone();
        errors::timed(
            &self.inner.label,
            || format!("putting {key}"),
            self.inner.opts.timeout,
            kv.put(key.clone(), url.to_full_string(), Some(options)),
        )
        .await
        .map_err(|e| self.inner.fail(e))?;
        Ok(())
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        // Stops the session task; the lease then expires by itself.
        self.inner.shutdown.send_replace(true);
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn url(&self) -> &Url {
        &self.inner.url
    }

    fn is_available(&self) -> bool {
        !self.inner.destroyed.load(Ordering::Acquire)
            && self.inner.available.load(Ordering::Acquire)
    }

    async fn register(&self, url: &Url) -> Result<()> {
        self.inner.alive()?;
        registry_core::check_accepts(&self.inner.url, url)?;
        self.put(url).await
    }

    async fn unregister(&self, url: &Url) -> Result<()> {
        let clients = self.inner.connected()?;
        let key = paths::entry_key(&self.inner.opts.root, url);
        let mut kv = clients.kv.clone();
        errors::timed(
            &self.inner.label,
            || format!("deleting {key}"),
            self.inner.opts.timeout,
            kv.delete(key.clone(), None),
        )
        .await
        .map_err(|e| self.inner.fail(e))?;
        Ok(())
    }

    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        let clients = inner.connected()?;
        let key = (url.clone(), listener_id(&listener));
        let wildcard = url.service_interface() == ANY_VALUE;
        let sub = {
            let mut subs = lock(&inner.subs);
            // `destroy` sets `destroyed` under this lock before draining the subscriptions:
            // one inserted after that would never be closed.
            inner.alive()?;
            if subs.contains_key(&key) {
                return Ok(());
            }
            let sub = Arc::new(Sub {
                url: url.clone(),
                categories: url.categories(),
                delivery: Delivery::for_listener(
                    listener,
                    DeliveryOptions {
                        empty_protection: inner.opts.empty_protection,
                        label: url.to_redacted_string(),
                    },
                ),
            });
            subs.insert(key.clone(), sub.clone());
            sub
        };
        // One range read per prefix, then a watch from the read's revision + 1.
        let scopes: Vec<(String, Scope)> = if wildcard {
            vec![(paths::root_prefix(&inner.opts.root), Scope::Root)]
        } else {
            let service = url.service_interface();
            sub.categories
                .iter()
                .map(|c| {
                    (
                        paths::category_prefix(&inner.opts.root, service, c),
                        Scope::Category {
                            service: service.to_owned(),
                            category: c.clone(),
                        },
                    )
                })
                .collect()
        };
        let mut states = Vec::with_capacity(scopes.len());
        for (prefix, scope) in scopes {
            match inner.read(&clients, &prefix, &scope).await {
                Ok((entries, revision)) => states.push(WatchState {
                    sub: sub.clone(),
                    prefix,
                    scope,
                    entries,
                    known: Default::default(),
                    revision,
                    armed: 0,
                    resyncing: false,
                }),
                Err(e) => {
                    let removed = {
                        let mut subs = lock(&inner.subs);
                        match subs.get(&key) {
                            Some(s) if Arc::ptr_eq(s, &sub) => subs.remove(&key),
                            _ => None,
                        }
                    };
                    if let Some(s) = removed {
                        s.delivery.close().await;
                    }
                    return Err(inner.fail(e));
                }
            }
        }
        let flush = {
            let mut watches = lock(&inner.watches);
            // An unsubscribe or destroy that ran meanwhile wins.
            let current = lock(&inner.subs)
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, &sub));
            if current && !inner.destroyed.load(Ordering::Acquire) {
                for mut w in states {
                    w.notify_initial();
                    let id = inner.next_watch_id.fetch_add(1, Ordering::Relaxed);
                    watches.insert(id, w);
                }
            }
            sub.delivery.flush_handle()
        };
        let _ = inner.cmds.send(Cmd::Arm);
        flush.await;
        inner.alive()
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        self.inner.alive()?;
        let Some(sub) = lock(&self.inner.subs).remove(&(url.clone(), listener_id(listener))) else {
            return Ok(());
        };
        let cancels: Vec<(i64, u64)> = {
            let mut watches = lock(&self.inner.watches);
            let ids: Vec<i64> = watches
                .iter()
                .filter(|(_, w)| Arc::ptr_eq(&w.sub, &sub))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| watches.remove(&id).map(|w| (id, w.armed)))
                .collect()
        };
        for (id, armed) in cancels {
            let _ = self.inner.cmds.send(Cmd::Cancel(id, armed));
        }
        sub.delivery.close().await;
        Ok(())
    }

    async fn lookup(&self, url: &Url) -> Result<Vec<Url>> {
        let inner = &self.inner;
        let clients = inner.connected()?;
        let root = &inner.opts.root;
        let categories = url.categories();
        let mut out = Vec::new();
        if url.service_interface() == ANY_VALUE {
            let prefix = paths::root_prefix(root);
            let (entries, _) = inner
                .read(&clients, &prefix, &Scope::Root)
                .await
                .map_err(|e| inner.fail(e))?;
            let mut by_cat: Vec<(usize, String, Url)> = entries
                .into_iter()
                .filter_map(|(k, u)| {
                    let rest = k.strip_prefix(&prefix)?;
                    let (_, c, _) = paths::split_under_root(rest)?;
                    let pos = categories.iter().position(|x| x == c)?;
                    Some((pos, u.to_full_string(), u))
                })
                .filter(|(_, _, u)| is_match(url, u))
                .collect();
            by_cat.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            out.extend(by_cat.into_iter().map(|(_, _, u)| u));
        } else {
            let service = url.service_interface();
            for c in &categories {
                let prefix = paths::category_prefix(root, service, c);
                let scope = Scope::Category {
                    service: service.to_owned(),
                    category: c.clone(),
                };
                let (entries, _) = inner
                    .read(&clients, &prefix, &scope)
                    .await
                    .map_err(|e| inner.fail(e))?;
                let mut found: Vec<Url> =
                    entries.into_values().filter(|u| is_match(url, u)).collect();
                found.sort_by_cached_key(Url::to_full_string);
                out.extend(found);
            }
        }
        Ok(out)
    }

    async fn destroy(&self) {
        let inner = &self.inner;
        let subs: Vec<Arc<Sub>> = {
            let mut subs = lock(&inner.subs);
            if inner.destroyed.swap(true, Ordering::AcqRel) {
                return;
            }
            subs.drain().map(|(_, s)| s).collect()
        };
        inner.available.store(false, Ordering::Release);
        lock(&inner.watches).clear();
        for s in &subs {
            s.delivery.close().await;
        }
        // Stop the session task and wait for it, so no grant it has in flight stores a lease
        // after the revoke below. It stops at its next step, each bounded by `timeout`; past
        // that it is aborted (a lease granted by an aborted grant has no entry and expires).
        inner.shutdown.send_replace(true);
        let task = lock(&inner.session).take();
        if let Some(mut task) = task
            && tokio::time::timeout(inner.opts.timeout, &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        // Revoking the lease drops every dynamic entry at once.
        let lease = inner.lease.swap(0, Ordering::AcqRel);
        if let (Some(clients), true) = (inner.clients(), lease != 0) {
            let mut l = clients.lease.clone();
            match errors::timed(
                &inner.label,
                || format!("revoking lease {lease:x}"),
                inner.opts.timeout,
                l.revoke(lease),
            )
            .await
            {
                Ok(_) => tracing::debug!(registry = %inner.label, lease, "lease revoked"),
                Err((e, _)) => tracing::warn!(
                    registry = %inner.label,
                    error = %e,
                    "could not revoke the lease; its entries expire with its TTL"
                ),
            }
        }
        *inner.clients.write().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::debug!(registry = %inner.label, "etcd registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }
}
