//! The raw clients doing the minimal operations: `zookeeper-client` and `etcd-client`
//! straight, on the same layout as ours.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::{
    EventType, GetOptions, KvClient, LeaseClient, PutOptions, Txn, TxnOp, WatchClient, WatchOptions,
};
use registry_zookeeper::zookeeper_client as zk;

use crate::Backend;
use crate::util::Track;

/// The etcd lease TTL of the raw side: long enough that no keep-alive is needed in a run.
const RAW_LEASE_TTL: i64 = 600;
/// The decoding limit of the raw etcd client (a 10,000-provider range reply is ~6 MB).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// One raw client: a ZooKeeper session, or an etcd connection with one lease.
#[allow(clippy::large_enum_variant)] // a handful exist at a time
pub enum Raw {
    /// A ZooKeeper session.
    Zk(zk::Client),
    /// An etcd connection and the lease its entries are put on.
    Etcd {
        /// KV with the raised decoding limit.
        kv: KvClient,
        /// Watches.
        watch: WatchClient,
        /// Leases.
        lease_client: LeaseClient,
        /// The lease of this client's entries.
        lease: i64,
    },
}

/// Which keys a raw watch counts.
#[derive(Clone)]
pub enum Counted {
    /// Direct children of the watched path.
    Children,
    /// Exactly these keys.
    Set(Arc<HashSet<String>>),
}

impl Counted {
    fn counts(&self, watched: &str, key: &str) -> bool {
        match self {
            Counted::Children => key
                .strip_prefix(watched)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|c| !c.is_empty() && !c.contains('/')),
            Counted::Set(s) => s.contains(key),
        }
    }
}

/// Background watch tasks; aborted on drop.
pub struct WatchTasks(Vec<tokio::task::AbortHandle>);

impl Drop for WatchTasks {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

const ZK_SESSION: Duration = Duration::from_secs(60);

impl Raw {
    /// Connects (and, on etcd, grants a lease).
    pub async fn connect(backend: Backend, addr: &str) -> anyhow::Result<Raw> {
        match backend {
            Backend::Zookeeper => Ok(Raw::Zk(
                zk::Client::connector()
                    .with_session_timeout(ZK_SESSION)
                    .connect(addr)
                    .await
                    .with_context(|| format!("raw ZooKeeper client to {addr}"))?,
            )),
            Backend::Etcd => {
                let client = etcd_client::Client::connect([format!("http://{addr}")], None)
                    .await
                    .with_context(|| format!("raw etcd client to {addr}"))?;
                let mut lease_client = client.lease_client();
                let lease = lease_client.grant(RAW_LEASE_TTL, None).await?.id();
                Ok(Raw::Etcd {
                    kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                    watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                    lease_client,
                    lease,
                })
            }
        }
    }

    /// Makes sure a persistent parent path exists (ZooKeeper; nothing to do on etcd).
    pub async fn ensure_dir(&self, path: &str) -> anyhow::Result<()> {
        if let Raw::Zk(c) = self {
            match c
                .mkdir(
                    path,
                    &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
                )
                .await
            {
                Ok(()) | Err(zk::Error::NodeExists) => {}
                Err(e) => bail!("mkdir {path}: {e}"),
            }
        }
        Ok(())
    }

    /// The minimal register: one ephemeral create (ZooKeeper) / one put with the lease (etcd).
    pub async fn create(&self, key: &str, value: &str) -> anyhow::Result<()> {
        match self {
            Raw::Zk(c) => {
                c.create(
                    key,
                    &[],
                    &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
                )
                .await
                .with_context(|| format!("create {key}"))?;
            }
            Raw::Etcd { kv, lease, .. } => {
                let mut kv = kv.clone();
                kv.put(key, value, Some(PutOptions::new().with_lease(*lease)))
                    .await
                    .with_context(|| format!("put {key}"))?;
            }
        }
        Ok(())
    }

    /// Writes many entries as a workload's set-up (not measured): on etcd in transactions of
    /// 128 puts (etcd's default `--max-txn-ops`), 8 in flight; on ZooKeeper as single creates,
    /// 64 in flight.
    pub async fn create_all(&self, entries: Vec<(String, String)>) -> anyhow::Result<()> {
        match self {
            Raw::Zk(_) => {
                concurrently(
                    entries,
                    64,
                    |(k, v)| async move { self.create(&k, &v).await },
                )
                .await
            }
            Raw::Etcd { kv, lease, .. } => {
                let chunks: Vec<Vec<(String, String)>> =
                    entries.chunks(128).map(<[_]>::to_vec).collect();
                concurrently(chunks, 8, |chunk| {
                    let mut kv = kv.clone();
                    let lease = *lease;
                    async move {
                        let first = chunk.first().map(|(k, _)| k.clone()).unwrap_or_default();
                        let ops: Vec<TxnOp> = chunk
                            .into_iter()
                            .map(|(k, v)| {
                                TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease)))
                            })
                            .collect();
                        kv.txn(Txn::new().and_then(ops))
                            .await
                            .with_context(|| format!("a transaction of puts from {first}"))?;
                        Ok(())
                    }
                })
                .await
            }
        }
    }

    /// Deletes an entry (one `delete` / one etcd delete).
    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self {
            Raw::Zk(c) => c
                .delete(key, None)
                .await
                .with_context(|| format!("delete {key}"))?,
            Raw::Etcd { kv, .. } => {
                kv.clone()
                    .delete(key, None)
                    .await
                    .with_context(|| format!("delete {key}"))?;
            }
        }
        Ok(())
    }

    /// The minimal read of a list: one `get_children` (ZooKeeper) / one keys-only range read
    /// of `path/` (etcd, as ours reads). Returns the number of entries.
    pub async fn read(&self, path: &str) -> anyhow::Result<usize> {
        match self {
            Raw::Zk(c) => Ok(c.get_children(path).await?.0.len()),
            Raw::Etcd { kv, .. } => {
                let mut kv = kv.clone();
                let r = kv
                    .get(
                        format!("{path}/"),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await?;
                Ok(r.kvs().len())
            }
        }
    }

    /// One read, keeping the names (ZooKeeper) / keys (etcd) as Strings.
    pub async fn read_names(&self, path: &str) -> anyhow::Result<Vec<String>> {
        match self {
            Raw::Zk(c) => Ok(c.get_children(path).await?.0),
            Raw::Etcd { kv, .. } => {
                let mut kv = kv.clone();
                let r = kv
                    .get(
                        format!("{path}/"),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await?;
                Ok(r.kvs()
                    .iter()
                    .filter_map(|kv| kv.key_str().ok().map(str::to_owned))
                    .collect())
            }
        }
    }

    /// The lease of an etcd key (`None`: no such key, or ZooKeeper).
    pub async fn lease_of(&self, key: &str) -> anyhow::Result<Option<i64>> {
        match self {
            Raw::Zk(_) => Ok(None),
            Raw::Etcd { kv, .. } => {
                let mut kv = kv.clone();
                let r = kv.get(key, None).await?;
                Ok(r.kvs().first().map(|kv| kv.lease()))
            }
        }
    }

    /// Revokes an etcd lease (from outside its owner).
    pub async fn revoke(&self, lease: i64) -> anyhow::Result<()> {
        if let Raw::Etcd { lease_client, .. } = self {
            lease_client.clone().revoke(lease).await?;
        }
        Ok(())
    }

    /// Watches each path (ZooKeeper: one persistent recursive watch per path on this
    /// session; etcd: one watch per `path/` prefix, all on one watch stream) and tracks how
    /// many counted keys are present, starting from none. Returns once every watch is in
    /// place.
    pub async fn watch_many(
        &self,
        paths: &[(String, Counted)],
    ) -> anyhow::Result<(Vec<Arc<Track>>, WatchTasks)> {
        let tracks: Vec<Arc<Track>> = paths.iter().map(|_| Track::new()).collect();
        let mut tasks = Vec::new();
        match self {
            Raw::Zk(c) => {
                for ((path, counted), track) in paths.iter().zip(&tracks) {
                    let mut watcher = c
                        .watch(path, zk::AddWatchMode::PersistentRecursive)
                        .await
                        .with_context(|| format!("watch {path}"))?;
                    let (path, counted, track) = (path.clone(), counted.clone(), track.clone());
                    let h = tokio::spawn(async move {
                        let mut present = HashSet::new();
                        loop {
                            let ev = watcher.changed().await;
                            let changed = match ev.event_type {
                                zk::EventType::Session => {
                                    if ev.session_state.is_terminated() {
                                        return;
                                    }
                                    false
                                }
                                zk::EventType::NodeCreated if counted.counts(&path, &ev.path) => {
                                    present.insert(ev.path)
                                }
                                zk::EventType::NodeDeleted if counted.counts(&path, &ev.path) => {
                                    present.remove(&ev.path)
                                }
                                _ => false,
                            };
                            if changed {
                                track.record(present.len());
                            }
                        }
                    });
                    tasks.push(h.abort_handle());
                }
            }
            Raw::Etcd { watch, .. } => {
                let mut wc = watch.clone();
                let Some((first, _)) = paths.first() else {
                    return Ok((tracks, WatchTasks(tasks)));
                };
                let (mut watcher, mut stream) = wc
                    .watch(
                        format!("{first}/"),
                        Some(WatchOptions::new().with_prefix().with_watch_id(1)),
                    )
                    .await?;
                for (i, (path, _)) in paths.iter().enumerate().skip(1) {
                    watcher
                        .watch(
                            format!("{path}/"),
                            Some(
                                WatchOptions::new()
                                    .with_prefix()
                                    .with_watch_id(i as i64 + 1),
                            ),
                        )
                        .await?;
                }
                let created = Arc::new(AtomicUsize::new(1));
                let routes: HashMap<i64, (String, Counted, Arc<Track>)> = paths
                    .iter()
                    .zip(&tracks)
                    .enumerate()
                    .map(|(i, ((p, c), t))| (i as i64 + 1, (p.clone(), c.clone(), t.clone())))
                    .collect();
                let c2 = created.clone();
                let h = tokio::spawn(async move {
                    let _watcher = watcher;
                    let mut present: HashMap<i64, HashSet<String>> = HashMap::new();
                    while let Ok(Some(r)) = stream.message().await {
                        if r.created() && r.watch_id() != 1 {
                            c2.fetch_add(1, Ordering::Release);
                        }
                        let Some((path, counted, track)) = routes.get(&r.watch_id()) else {
                            continue;
                        };
                        let set = present.entry(r.watch_id()).or_default();
                        let mut changed = false;
                        for ev in r.events() {
                            let Some(key) = ev.kv().and_then(|kv| kv.key_str().ok()) else {
                                continue;
                            };
                            if !counted.counts(path, key) {
                                continue;
                            }
                            changed |= match ev.event_type() {
                                EventType::Put => set.insert(key.to_owned()),
                                EventType::Delete => set.remove(key),
                            };
                        }
                        if changed {
                            track.record(set.len());
                        }
                    }
                });
                tasks.push(h.abort_handle());
                let end = Instant::now() + Duration::from_secs(30);
                while created.load(Ordering::Acquire) < paths.len() {
                    if Instant::now() > end {
                        bail!("etcd did not create {} watches in 30 s", paths.len());
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        Ok((tracks, WatchTasks(tasks)))
    }

    /// Closes the session / revokes the lease, so every entry of this client goes.
    pub async fn close(self) {
        match self {
            Raw::Zk(c) => drop(c),
            Raw::Etcd {
                mut lease_client,
                lease,
                ..
            } => {
                let _ = lease_client.revoke(lease).await;
            }
        }
    }
}

/// Runs `f` over `items` with at most `n` at once; the first error is returned.
pub async fn concurrently<T, F, Fut>(items: Vec<T>, n: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures_util::StreamExt;
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(items)
        .map(f)
        .buffer_unordered(n)
        .collect()
        .await;
    results.into_iter().collect()
}
