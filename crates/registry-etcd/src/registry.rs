//! [`EtcdRegistry`]: the raw `etcd://` backend (CONTRACT §7 etcd).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp};
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
use crate::shared::{Clients, Cmd, Inner, Sub, connect, grant, lock};
use crate::watches::{Scope, WatchState};

/// Connects to one member, grants the lease and reads one key under the root (leases need no
/// permission: missing credentials fail here rather than on the first operation). A user
/// whose role may read only some prefixes of the root gets "permission denied" for that read:
/// the member answered and took the credentials, so that counts as reachable (the
/// permissions of each prefix show on the operations that use it). Revokes the lease when the
/// read fails.
async fn open(
    inner: &Inner,
    endpoint: &str,
    within: std::time::Duration,
) -> std::result::Result<(Clients, i64), (Error, errors::Kind)> {
    let clients = connect(inner, endpoint, within).await?;
    let id = grant(inner, &clients, within).await?;
    let mut kv = clients.kv.clone();
    let root = paths::root_prefix(&inner.opts.root);
    match crate::shared::probe(&inner.label, &mut kv, &root, within).await {
        Ok(()) => {}
        Err((e, errors::Kind::Denied))
            if inner.opts.user.is_some() && e.to_string().contains("permission denied") =>
        {
            tracing::debug!(
                registry = %inner.label,
                root,
                "the user may not read the whole root; connected (each prefix's permissions show on its operations)"
            );
        }
        Err(e) => {
            let mut lease = clients.lease.clone();
            let _ = tokio::time::timeout(within, lease.revoke(id)).await;
            return Err(e);
        }
    }
    Ok((clients, id))
}

/// Uses the watch of `prefix` when there is one (counts one more user); false when there is
/// none.
fn claim(inner: &Inner, prefix: &str) -> bool {
    match lock(&inner.watches)
        .values_mut()
        .find(|w| w.prefix == prefix)
    {
        Some(w) => {
            w.users += 1;
            true
        }
        None => false,
    }
}

/// Gives back one use of each watch of `prefixes`; a watch nobody uses any more is cancelled
/// and the keeper forgets its scope.
fn release(inner: &Inner, prefixes: &[String]) {
    let mut cancels = Vec::new();
    {
        let mut watches = lock(&inner.watches);
        for p in prefixes {
            let Some((&id, w)) = watches.iter_mut().find(|(_, w)| w.prefix == *p) else {
                continue;
            };
            w.users = w.users.saturating_sub(1);
            if w.users == 0
                && let Some(w) = watches.remove(&id)
            {
                // Under the lock: a subscription that reads and watches the prefix again
                // right after must not have its read forgotten.
                inner.keeper.forget(&w.scope.to_keeper());
                cancels.push((id, w.armed));
            }
        }
    }
    for (id, armed) in cancels {
        let _ = inner.cmds.send(Cmd::Cancel(id, armed));
    }
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

    /// What the session does in the background, for tests: how many refused watches wait to
    /// be tried again (at most one retry per watch), how many watch creations etcd refused,
    /// and how many reads were done again after a failure (a refused watch's prefix, a resync
    /// that failed or was too large).
    #[doc(hidden)]
    pub fn retry_counts(&self) -> (usize, u64, u64) {
        (
            self.inner.refused_retries.load(Ordering::Acquire),
            self.inner.refusals.load(Ordering::Acquire),
            self.inner.reads_again.load(Ordering::Acquire),
        )
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

    /// One server watch per prefix, shared by every subscription that needs it: a prefix
    /// nobody watches yet is read (fed to the keeper) and then watched from the read's
    /// revision + 1; one already watched is just used. The keeper gives the subscription its
    /// first lists once every prefix it needs was read.
    async fn subscribe(&self, url: &Url, listener: Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        let clients = inner.connected()?;
        let key = (url.clone(), listener_id(&listener));
        if lock(&inner.subs).contains_key(&key) {
            return inner.alive();
        }
        let scopes: Vec<(String, Scope)> = if url.service_interface() == ANY_VALUE {
            vec![(paths::root_prefix(&inner.opts.root), Scope::Root)]
        } else {
            let service = url.service_interface();
            url.categories()
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
        let mut claimed: Vec<String> = Vec::with_capacity(scopes.len());
        for (prefix, scope) in scopes {
            if claim(inner, &prefix) {
                claimed.push(prefix);
                continue;
            }
            let (entries, revision) = match inner.read(&clients, &prefix, &scope).await {
                Ok(r) => r,
                Err(e) => {
                    release(inner, &claimed);
                    return Err(inner.fail(e));
                }
            };
            {
                let mut watches = lock(&inner.watches);
                match watches.values_mut().find(|w| w.prefix == prefix) {
                    // Another subscription read and watched it meanwhile: its watch serves both.
                    Some(w) => w.users += 1,
                    None => {
                        inner.keeper.replace(
                            &scope.to_keeper(),
                            entries,
                            u64::try_from(revision).unwrap_or(0),
                        );
                        let id = inner.next_watch_id.fetch_add(1, Ordering::Relaxed);
                        watches.insert(
                            id,
                            WatchState {
                                prefix: prefix.clone(),
                                scope,
                                revision,
                                armed: 0,
                                resyncing: false,
                                refused: false,
                                refusals: 0,
                                users: 1,
                            },
                        );
                    }
                }
            }
            claimed.push(prefix);
        }
        let delivery = Arc::new(Delivery::for_listener(
            listener,
            DeliveryOptions {
                empty_protection: inner.opts.empty_protection,
                label: url.to_redacted_string(),
            },
        ));
        let added = {
            let mut subs = lock(&inner.subs);
            // `destroy` sets `destroyed` under this lock before draining the subscriptions:
            // one inserted after that would never be closed.
            if inner.destroyed.load(Ordering::Acquire) || subs.contains_key(&key) {
                false
            } else {
                let id = inner.keeper.subscribe(url, delivery.clone());
                subs.insert(
                    key,
                    Sub {
                        id,
                        delivery: delivery.clone(),
                        prefixes: std::mem::take(&mut claimed),
                    },
                );
                true
            }
        };
        if !added {
            release(inner, &claimed);
            delivery.close().await;
            return inner.alive();
        }
        let _ = inner.cmds.send(Cmd::Arm);
        delivery.flush_handle().await;
        inner.alive()
    }

    async fn unsubscribe(&self, url: &Url, listener: &Arc<dyn NotifyListener>) -> Result<()> {
        let inner = &self.inner;
        inner.alive()?;
        let Some(sub) = lock(&inner.subs).remove(&(url.clone(), listener_id(listener))) else {
            return Ok(());
        };
        inner.keeper.unsubscribe(sub.id);
        release(inner, &sub.prefixes);
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
                .filter_map(|(_, c, u)| {
                    let pos = categories.iter().position(|x| *x == c)?;
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
                let mut found: Vec<Url> = entries
                    .into_iter()
                    .map(|(_, _, u)| u)
                    .filter(|u| is_match(url, u))
                    .collect();
                found.sort_by_cached_key(Url::to_full_string);
                out.extend(found);
            }
        }
        Ok(out)
    }

    async fn destroy(&self) {
        let inner = &self.inner;
        let subs: Vec<Sub> = {
            let mut subs = lock(&inner.subs);
            if inner.destroyed.swap(true, Ordering::AcqRel) {
                return;
            }
            subs.drain().map(|(_, s)| s).collect()
        };
        inner.available.store(false, Ordering::Release);
        lock(&inner.watches).clear();
        for s in &subs {
            inner.keeper.unsubscribe(s.id);
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
