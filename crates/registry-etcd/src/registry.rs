//! [`EtcdRegistry`]: the raw `etcd://` backend (CONTRACT §7 etcd).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use registry_core::delivery::{Delivery, DeliveryOptions};
use registry_core::url::ANY_VALUE;
use registry_core::{
    Error, NotifyListener, Registry, RegistryEvent, Result, Url, is_match, listener_id,
};
use tokio::sync::{broadcast, mpsc};

use crate::errors;
use crate::options::Options;
use crate::paths;
use crate::session;
use crate::shared::{Clients, Cmd, Inner, connect, grant, lock};
use crate::watches::{Scope, Sub, WatchState};

/// Connects to one member, grants the lease and checks that the root can be read (leases
/// need no permission: missing or insufficient credentials fail here rather than on the first
/// operation). Revokes the lease when the read fails.
async fn open(
    inner: &Inner,
    endpoint: &str,
    within: std::time::Duration,
) -> std::result::Result<(Clients, i64), (Error, errors::Kind)> {
    let clients = connect(inner, endpoint, within).await?;
    let id = grant(inner, &clients, within).await?;
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
    if let Err(e) = probe {
        let mut lease = clients.lease.clone();
        let _ = tokio::time::timeout(within, lease.revoke(id)).await;
        return Err(e);
    }
    Ok((clients, id))
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
        let inner = Arc::new(Inner::new(url, opts, cmds, session::FIRST_WATCH_ID));
        if inner.opts.check {
            // Each member in turn, until one answers: a member that is down or hung must not
            // fail the registry when others serve.
            let n = inner.opts.endpoints.len();
            let within = if n == 1 {
                inner.opts.timeout
            } else {
                inner.step_timeout()
            };
            let mut last = None;
            for (i, endpoint) in inner.opts.endpoints.iter().enumerate() {
                match open(&inner, endpoint, within).await {
                    Ok((clients, id)) => {
                        inner.set_clients(Some(clients));
                        inner.member.store(i, Ordering::Release);
                        inner.lease.store(id, Ordering::Release);
                        inner.available.store(true, Ordering::Release);
                        tracing::info!(registry = %inner.label, lease = id, endpoint, "connected to etcd");
                        last = None;
                        break;
                    }
                    // Refused credentials or permissions: the same on every member.
                    Err((e, errors::Kind::Denied)) => return Err(e),
                    Err((e, _)) => {
                        tracing::debug!(registry = %inner.label, endpoint, error = %e, "member unavailable; trying the next one");
                        last = Some(e);
                    }
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
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

    /// Deletes the entry only when it is ours: a dynamic entry only while it is on this
    /// registry's current lease, a persistent one only while it has no lease (one transaction:
    /// compare the key's lease, then delete). An entry that another registry put since (the
    /// same URL after a restart on the same host:port) stays: a late unregister of the old
    /// instance must not delete the new instance's entry. Deleting nothing is not an error.
    async fn unregister(&self, url: &Url) -> Result<()> {
        let inner = &self.inner;
        let clients = inner.connected()?;
        let key = paths::entry_key(&inner.opts.root, url);
        let owner = if url.is_dynamic() {
            let lease = inner.lease.load(Ordering::Acquire);
            if lease == 0 {
                return Err(Error::Unavailable {
                    registry: inner.label.clone(),
                    reason: format!(
                        "no lease to delete {key} from yet (a new one is being granted)"
                    ),
                });
            }
            lease
        } else {
            0
        };
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, owner)])
            .and_then([TxnOp::delete(key.as_str(), None::<DeleteOptions>)]);
        let mut kv = clients.kv.clone();
        let resp = errors::timed(
            &inner.label,
            || format!("deleting {key}"),
            inner.opts.timeout,
            kv.txn(txn),
        )
        .await
        .map_err(|e| inner.fail(e))?;
        if !resp.succeeded() {
            tracing::debug!(
                registry = %inner.label,
                key,
                lease = owner,
                "not deleted: the entry is not on this registry's lease (gone, or put by another registry since)"
            );
        }
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
                    refused: false,
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
        inner.set_clients(None);
        tracing::debug!(registry = %inner.label, "etcd registry destroyed");
    }

    fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }
}
