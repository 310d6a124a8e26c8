//! Shared pieces: provider URLs, the layout paths, event trackers, a TCP proxy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use registry_core::{Notification, NotifyListener, Url, encode};
use tokio::sync::watch;

/// A Dubbo-style provider URL of about 300 bytes (the shape Dubbo 3 writes).
pub fn provider(service: &str, i: u32) -> Url {
    registry_core::testkit::dubbo_provider_of("bench-provider", service, i)
}

/// The consumer URL that subscribes to `service`'s providers.
pub fn consumer(service: &str) -> Url {
    format!("consumer://10.0.0.9/{service}?application=bench-consumer&side=consumer")
        .parse()
        .unwrap_or_else(|e| panic!("bad consumer URL: {e}"))
}

/// `/group/encode(service)/providers`: the category path (ZooKeeper node, etcd prefix without
/// the trailing slash).
pub fn category_path(group: &str, service: &str) -> String {
    format!("/{group}/{}/providers", encode(service))
}

/// The entry path/key of a provider.
pub fn entry_path(group: &str, url: &Url) -> String {
    format!(
        "{}/{}",
        category_path(group, url.service_interface()),
        encode(&url.to_full_string())
    )
}

/// Times at which something reached a count: a listener's list size, or a raw watcher's set
/// size. Waiters find the first time a condition held after a given point.
#[derive(Default)]
pub struct Track {
    history: Mutex<Vec<(Instant, usize)>>,
    bump: Mutex<Option<watch::Sender<u64>>>,
    calls: AtomicU64,
}

impl Track {
    /// A new tracker.
    pub fn new() -> Arc<Track> {
        let t = Track::default();
        *lock(&t.bump) = Some(watch::channel(0).0);
        Arc::new(t)
    }

    /// Records that the count is `count` now.
    pub fn record(&self, count: usize) {
        let now = Instant::now();
        self.calls.fetch_add(1, Ordering::Relaxed);
        lock(&self.history).push((now, count));
        if let Some(tx) = lock(&self.bump).as_ref() {
            tx.send_modify(|g| *g += 1);
        }
    }

    /// How many records so far (a cursor for [`Track::wait`]).
    pub fn len(&self) -> usize {
        lock(&self.history).len()
    }

    /// How many times [`Track::record`] was called.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The last count recorded.
    pub fn last(&self) -> Option<usize> {
        lock(&self.history).last().map(|(_, c)| *c)
    }

    /// The time of the first record at or after index `since` whose count satisfies `pred`,
    /// waiting up to `deadline` for it.
    pub async fn wait(
        &self,
        since: usize,
        pred: impl Fn(usize) -> bool,
        deadline: Duration,
    ) -> anyhow::Result<Instant> {
        Ok(self.wait_at(since, pred, deadline).await?.1)
    }

    /// Like [`Track::wait`], also giving the index of the record (a cursor for the next wait).
    pub async fn wait_at(
        &self,
        since: usize,
        pred: impl Fn(usize) -> bool,
        deadline: Duration,
    ) -> anyhow::Result<(usize, Instant)> {
        let mut rx = lock(&self.bump)
            .as_ref()
            .map(|tx| tx.subscribe())
            .context("tracker without a channel")?;
        let end = Instant::now() + deadline;
        let mut from = since;
        loop {
            {
                let h = lock(&self.history);
                if let Some((i, (t, _))) =
                    h.iter().enumerate().skip(from).find(|(_, (_, c))| pred(*c))
                {
                    return Ok((i, *t));
                }
                from = h.len().max(since);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {deadline:?}; last count {:?}", self.last());
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }
}

/// A listener that records the number of entries of every list it is given.
pub fn listener(track: &Arc<Track>) -> Arc<dyn NotifyListener> {
    let t = track.clone();
    Arc::new(move |n: Notification| {
        t.record(n.entries().count());
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cut-able TCP proxy of the test servers crate: how the victim of a ZooKeeper session
/// expiry is kept from taking its session back.
pub use registry_test_servers::Proxy;
