//! What the backend keeps per subscription and per watched path, and how a watched path's
//! reads and events reach the registry's [`ListKeeper`], which owns everything else: the
//! entries (each held once), the matching per subscription, the lists, `empty://` markers,
//! revisions and the pushes to each subscription's [`Delivery`].
//!
//! A watched category path is one [`Scope::Category`]: a full read is
//! [`ListKeeper::replace`], a batch of created/deleted events one [`ListKeeper::change`] (only
//! the changed children are decoded). The root watch of `interface=*` subscriptions marks
//! [`Scope::Root`] loaded once every service it listed is attached (see [`mark_root_loaded`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use registry_core::Url;
use registry_core::delivery::Delivery;
use registry_core::keeper::{ListKeeper, Scope, SubscriptionId};
use zookeeper_client as zk;

use crate::session::lock;

/// A subscription's key: its URL and the listener's id.
pub(crate) type SubKey = (Url, usize);

/// One subscription.
pub(crate) struct Sub {
    /// Its URL and listener.
    pub(crate) key: SubKey,
    pub(crate) categories: Vec<String>,
    pub(crate) wildcard: bool,
    pub(crate) delivery: Arc<Delivery>,
    pub(crate) active: AtomicBool,
    /// Its id in the keeper, once its first reads are done.
    pub(crate) id: Mutex<Option<SubscriptionId>>,
    /// Services attached (their reads succeeded; wildcard: every service seen) and the
    /// watched paths the subscription is on.
    pub(crate) attached: Mutex<(HashSet<String>, Vec<String>)>,
}

/// What the backend keeps of one watched category path (the entries are in the keeper).
pub(crate) struct WatchData {
    /// The session generation of the task allowed to feed this path.
    pub(crate) generation: u64,
    /// Whether a read of this generation succeeded. Until then events are not fed: a read
    /// is due, and it gives the whole list.
    pub(crate) primed: bool,
    /// Whether the watch is armed and its list read, with no read pending.
    pub(crate) ready: bool,
    /// Whether the list was ever read (a read after a reconnect is then synced).
    pub(crate) read_once: bool,
    /// About how many bytes a read of the list brings (names and their length prefixes).
    pub(crate) bytes: u64,
}

/// A generation no task has: set when a watch is dropped, so its ending task feeds nothing.
pub(crate) const RETIRED: u64 = u64::MAX;

/// One watched category path.
pub(crate) struct Watch {
    pub(crate) path: String,
    pub(crate) service: String,
    pub(crate) category: String,
    pub(crate) scope: Scope,
    pub(crate) keeper: ListKeeper,
    /// Taken by everything that feeds the keeper, so [`mark_root_loaded`] sees a steady state.
    pub(crate) feed: Arc<Mutex<()>>,
    pub(crate) data: Mutex<WatchData>,
}

/// The URL a child node name decodes to, or `None` (with a warning when `warn`).
pub(crate) fn decode_child(path: &str, name: &str, warn: bool) -> Option<Url> {
    match Url::from_encoded(name) {
        Ok(u) => Some(u),
        Err(e) => {
            if warn {
                tracing::warn!(path, child = name, error = %e, "skipped a child node that is not an encoded URL");
            }
            None
        }
    }
}

/// The net effect of a batch of events on the children of `path`: added and removed URLs
/// (the last event of a child decides), the bytes they change, and the highest zxid (3.9+
/// servers send it with events; 0 otherwise).
fn net(path: &str, batch: &[zk::WatchedEvent]) -> (Vec<Url>, Vec<Url>, i64, u64) {
    let mut last: BTreeMap<&str, bool> = BTreeMap::new();
    let mut zxid = 0i64;
    for ev in batch {
        let Some(child) = ev
            .path
            .strip_prefix(path)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|c| !c.is_empty() && !c.contains('/'))
        else {
            continue;
        };
        match ev.event_type {
            zk::EventType::NodeCreated => last.insert(child, true),
            zk::EventType::NodeDeleted => last.insert(child, false),
            _ => continue,
        };
        zxid = zxid.max(ev.zxid);
    }
    let (mut added, mut removed, mut bytes) = (Vec::new(), Vec::new(), 0i64);
    for (name, present) in last {
        let size = name.len() as i64 + 4;
        if present {
            bytes += size;
            added.extend(decode_child(path, name, true));
        } else {
            bytes -= size;
            removed.extend(decode_child(path, name, false));
        }
    }
    (added, removed, bytes, u64::try_from(zxid).unwrap_or(0))
}

impl Watch {
    fn feed(&self, data: &mut WatchData, batch: &[zk::WatchedEvent]) {
        let (added, removed, bytes, zxid) = net(&self.path, batch);
        data.bytes = data.bytes.saturating_add_signed(bytes);
        if added.is_empty() && removed.is_empty() {
            return;
        }
        let _feed = lock(&self.feed);
        self.keeper
            .change(&self.service, &self.category, added, removed, zxid);
    }

    /// Feeds a batch of events from the task of `generation` (nothing before a read of this
    /// generation: one is due and gives the whole list).
    pub(crate) fn apply_batch(&self, generation: u64, batch: &[zk::WatchedEvent]) {
        let mut data = lock(&self.data);
        if data.generation != generation || !data.primed {
            return;
        }
        self.feed(&mut data, batch);
    }

    /// Feeds a read (`None`: the node does not exist) and the events that arrived with it.
    /// Returns whether the keeper took it: not when the task of `generation` no longer feeds
    /// this path (a new session's task took over, or the watch was dropped), in which case
    /// nobody may be told the list was read.
    #[must_use]
    pub(crate) fn replace(
        &self,
        generation: u64,
        read: Option<(Vec<String>, i64)>,
        batch: &[zk::WatchedEvent],
    ) -> bool {
        let mut data = lock(&self.data);
        if data.generation != generation {
            return false;
        }
        let (names, pzxid) = read.unwrap_or_default();
        data.bytes = names.iter().map(|n| n.len() as u64 + 4).sum();
        let entries: Vec<(String, String, Url)> = names
            .iter()
            .filter_map(|n| decode_child(&self.path, n, true))
            .map(|u| (self.service.clone(), self.category.clone(), u))
            .collect();
        {
            let _feed = lock(&self.feed);
            self.keeper
                .replace(&self.scope, entries, u64::try_from(pzxid).unwrap_or(0));
        }
        // Events that came before the reply are already in the read; applied again on top of
        // it they leave the same list (the last event of each child decides).
        self.feed(&mut data, batch);
        data.primed = true;
        data.read_once = true;
        true
    }
}

/// Marks [`Scope::Root`] loaded in `keeper` without changing what it holds, so `interface=*`
/// subscriptions get their lists: the services are attached one category path at a time, and
/// this says they all are. Under `feed`, so no change slips in between.
pub(crate) fn mark_root_loaded(keeper: &ListKeeper, feed: &Mutex<()>) {
    let _feed = lock(feed);
    if !keeper.is_loaded(&Scope::Root) {
        let held = keeper.entries(&Scope::Root);
        keeper.replace(&Scope::Root, held, 0);
    }
}

/// The root watch of `interface=*` subscriptions.
pub(crate) struct RootWatch {
    pub(crate) data: Mutex<RootData>,
}

pub(crate) struct RootData {
    pub(crate) generation: u64,
    /// Whether the services were listed before (a new listing after a reconnect is synced).
    pub(crate) listed: bool,
    pub(crate) subs: Vec<Arc<Sub>>,
}
