//! Subscriptions and the lists of their watches: each watched category path keeps its
//! children (node name -> decoded URL), kept up to date from the watch events (only the
//! changed child is parsed) and replaced by full reads; the matching per subscription and the
//! pushes to each subscription's [`Delivery`] live here too. The root watch of `interface=*`
//! subscriptions only keeps its subscriptions.
//!
//! This is the part a shared list keeper in `registry-core` is meant to take over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use registry_core::delivery::Delivery;
use registry_core::{Notification, Source, Url, is_match};
use zookeeper_client as zk;

use crate::session::lock;

/// One subscription.
pub(crate) struct Sub {
    pub(crate) url: Url,
    pub(crate) categories: Vec<String>,
    pub(crate) wildcard: bool,
    pub(crate) delivery: Delivery,
    pub(crate) active: AtomicBool,
    /// Services attached (their first read succeeded; wildcard: every service seen) and the
    /// watched paths the subscription is on.
    pub(crate) attached: Mutex<(HashSet<String>, Vec<String>)>,
    /// The last list pushed per (service, category), so an unchanged list is not pushed again.
    pub(crate) last: Mutex<LastPushed>,
}

/// (service, category) -> the list last pushed.
pub(crate) type LastPushed = HashMap<(String, String), Arc<[Url]>>;

impl Sub {
    pub(crate) fn push(&self, service: &str, category: &str, data: &WatchData) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut urls: Vec<Url> = data
            .children
            .values()
            .flatten()
            .filter(|u| is_match(&self.url, u))
            .cloned()
            .collect();
        if urls.is_empty() {
            urls.push(self.url.to_empty_marker_for(service, category));
        }
        let urls: Arc<[Url]> = urls.into();
        {
            let mut last = lock(&self.last);
            let key = (service.to_owned(), category.to_owned());
            if last.get(&key) == Some(&urls) {
                return;
            }
            last.insert(key, urls.clone());
        }
        self.delivery.push(Notification::new(
            service,
            category,
            urls,
            data.revision,
            Source::Live,
        ));
    }
}

/// The list of one category path.
pub(crate) struct WatchData {
    /// Node name -> the URL it decodes to (`None`: skipped, already warned about).
    pub(crate) children: BTreeMap<String, Option<Url>>,
    /// Never goes back: the parent's `pzxid` on a read, the event's zxid (3.9+) or one more
    /// than before on an event.
    pub(crate) revision: u64,
    /// The session generation of the task allowed to change this list.
    pub(crate) generation: u64,
    /// Whether a read of this generation succeeded. Until then events are applied but
    /// nothing is pushed: the list may be the previous session's, or empty.
    pub(crate) primed: bool,
    /// Whether the watch is armed and its list read, with no read pending.
    pub(crate) ready: bool,
    /// Subscriptions that receive this list.
    pub(crate) subs: Vec<Arc<Sub>>,
    /// Subscriptions waiting for their first read of this list (asked with
    /// [`Cmd::admit`]), so their first notifications come in category order and complete.
    pub(crate) joining: Vec<Arc<Sub>>,
}

impl WatchData {
    pub(crate) fn has(&self, sub: &Arc<Sub>) -> bool {
        self.subs
            .iter()
            .chain(&self.joining)
            .any(|s| Arc::ptr_eq(s, sub))
    }
}

pub(crate) struct Watch {
    pub(crate) path: String,
    pub(crate) service: String,
    pub(crate) category: String,
    pub(crate) data: Mutex<WatchData>,
}

pub(crate) fn decode_child(path: &str, name: &str) -> Option<Url> {
    match Url::from_encoded(name) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(path, child = name, error = %e, "skipped a child node that is not an encoded URL");
            None
        }
    }
}

impl Watch {
    /// Applies one node event; whether the list changed.
    pub(crate) fn apply(&self, data: &mut WatchData, ev: &zk::WatchedEvent) -> bool {
        let Some(rest) = ev.path.strip_prefix(self.path.as_str()) else {
            return false;
        };
        let changed = if rest.is_empty() {
            // The category node itself: deleted means no children.
            ev.event_type == zk::EventType::NodeDeleted && {
                let had = !data.children.is_empty();
                data.children.clear();
                had
            }
        } else {
            match rest.strip_prefix('/') {
                Some(child) if !child.is_empty() && !child.contains('/') => match ev.event_type {
                    zk::EventType::NodeCreated => {
                        if data.children.contains_key(child) {
                            false
                        } else {
                            let url = decode_child(&self.path, child);
                            data.children.insert(child.to_owned(), url);
                            true
                        }
                    }
                    zk::EventType::NodeDeleted => data.children.remove(child).is_some(),
                    _ => false,
                },
                _ => false,
            }
        };
        if changed {
            data.revision = (data.revision + 1).max(u64::try_from(ev.zxid).unwrap_or(0));
        }
        changed
    }

    /// Applies a batch of events from the task of `generation`, then pushes once (only when
    /// a read of this generation succeeded before).
    pub(crate) fn apply_batch(&self, generation: u64, batch: &[zk::WatchedEvent]) {
        let mut data = lock(&self.data);
        if data.generation != generation {
            return;
        }
        let mut changed = false;
        for ev in batch {
            if ev.event_type != zk::EventType::Session {
                changed |= self.apply(&mut data, ev);
            }
        }
        if changed && data.primed {
            self.push_all(&data);
        }
    }

    /// Replaces the list with a read (`None`: the node does not exist), applies the events
    /// that arrived with it, admits the joining subscriptions in `admit`, and pushes to every
    /// subscription.
    pub(crate) fn replace(
        &self,
        generation: u64,
        read: Option<(Vec<String>, i64)>,
        batch: &[zk::WatchedEvent],
        admit: &[Arc<Sub>],
    ) {
        let mut data = lock(&self.data);
        if data.generation != generation {
            return;
        }
        let (names, pzxid) = read.unwrap_or_default();
        let mut old = std::mem::take(&mut data.children);
        let mut changed = old.len() != names.len();
        for name in names {
            let url = match old.remove(&name) {
                Some(u) => u,
                None => {
                    changed = true;
                    decode_child(&self.path, &name)
                }
            };
            data.children.insert(name, url);
        }
        let read_revision = u64::try_from(pzxid).unwrap_or(0);
        data.revision = if read_revision > data.revision {
            read_revision
        } else if changed {
            // Our own revisions ran ahead of the server's (several events per zxid): a
            // changed list still gets a newer revision.
            data.revision + 1
        } else {
            data.revision
        };
        for ev in batch {
            if ev.event_type != zk::EventType::Session {
                self.apply(&mut data, ev);
            }
        }
        data.primed = true;
        for sub in admit {
            if let Some(i) = data.joining.iter().position(|s| Arc::ptr_eq(s, sub)) {
                let s = data.joining.swap_remove(i);
                data.subs.push(s);
            }
        }
        self.push_all(&data);
    }

    pub(crate) fn push_all(&self, data: &WatchData) {
        for sub in &data.subs {
            sub.push(&self.service, &self.category, data);
        }
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
