//! The server watches of a registry: one per watched prefix (a category path + `/`, or the
//! root + `/` for `interface=*`), shared by every subscription that needs it. A watch only
//! turns keys into entries and feeds them to the registry's
//! [`ListKeeper`](registry_core::keeper::ListKeeper), which holds the lists, matches them to the
//! subscriptions and delivers them.

use std::collections::BTreeMap;

use registry_core::Url;
use registry_core::keeper;

use crate::paths::split_under_root;

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One category of one service: keys `prefix + encode(url)`.
    Category { service: String, category: String },
    /// Everything under the root (`interface=*`): keys `prefix + service/category/encode(url)`.
    Root,
}

impl Scope {
    /// The keeper's name for the same scope.
    pub fn to_keeper(&self) -> keeper::Scope {
        match self {
            Scope::Category { service, category } => {
                keeper::Scope::category(service.clone(), category.clone())
            }
            Scope::Root => keeper::Scope::Root,
        }
    }
}

/// The one server watch of a prefix.
pub(crate) struct WatchState {
    /// The key prefix, ending with `/`.
    pub prefix: String,
    pub scope: Scope,
    /// The keeper holds every change of this prefix up to this revision; the watch resumes
    /// after it and ignores events at or below it.
    pub revision: i64,
    /// The watch stream generation it is armed on (0: not armed).
    pub armed: u64,
    /// Cancelled by the server; its prefix is being read again, after which it is created
    /// again.
    pub resyncing: bool,
    /// etcd refused to create it (no permission on its prefix): its prefix is read again
    /// after a jittered, growing delay, and the watch created again after that read.
    pub refused: bool,
    /// Refusals in a row (creations refused, or retry reads failed): the delay before the
    /// next try grows with it; 0 once etcd created the watch.
    pub refusals: u32,
    /// How many subscriptions need it; at 0 it is cancelled.
    pub users: usize,
}

/// Entries as the keeper takes them: (service, category, URL).
pub(crate) type Entries = Vec<(String, String, Url)>;

/// The entries of a range read under `prefix` as (service, category, URL); keys that are not
/// entries of the scope are skipped (a URL that does not parse with a warning).
pub(crate) fn parse_entries<'a>(
    registry: &str,
    prefix: &str,
    scope: &Scope,
    kvs: impl Iterator<Item = &'a [u8]>,
) -> Entries {
    let mut out = Vec::new();
    for key in kvs {
        let Ok(key) = std::str::from_utf8(key) else {
            tracing::warn!(registry, "skipped a key that is not UTF-8");
            continue;
        };
        out.extend(parse_key(registry, prefix, scope, key));
    }
    out
}

/// The (service, category, URL) of `key` under `prefix`, or `None` when the key is not an
/// entry of the scope or does not decode to a URL (logged).
pub(crate) fn parse_key(
    registry: &str,
    prefix: &str,
    scope: &Scope,
    key: &str,
) -> Option<(String, String, Url)> {
    let rest = key.strip_prefix(prefix)?;
    let (service, category, encoded) = match scope {
        Scope::Category { service, category } => {
            if rest.is_empty() || rest.contains('/') {
                return None;
            }
            (service.clone(), category.as_str(), rest)
        }
        Scope::Root => split_under_root(rest)?,
    };
    match Url::from_encoded(encoded) {
        Ok(u) => Some((service, category.to_owned(), u)),
        Err(e) if *scope == Scope::Root => {
            // The root also holds other data (Dubbo's config center, metadata): not entries.
            tracing::debug!(registry, key, error = %e, "skipped a key that is not a URL");
            None
        }
        Err(e) => {
            tracing::warn!(registry, key, error = %e, "skipped a key that is not a URL");
            None
        }
    }
}

/// The changes of one watch response, per (service, category): the last event of each entry
/// wins (a put then a delete of one key in one response is a delete).
#[derive(Default)]
pub(crate) struct Batch {
    /// Per (service, category): the entries changed, and the revision of its last event.
    changes: BTreeMap<(String, String), (Changes, i64)>,
}

/// Entries put (`true`) or deleted, by full string.
type Changes = BTreeMap<String, (Url, bool)>;

impl Batch {
    /// An entry put (`present`) or deleted at `revision`.
    pub fn add(
        &mut self,
        service: String,
        category: String,
        url: Url,
        present: bool,
        revision: i64,
    ) {
        let (entries, last) = self.changes.entry((service, category)).or_default();
        entries.insert(url.to_full_string(), (url, present));
        *last = (*last).max(revision);
    }

    /// Feeds the changes to `keeper`, one list per (service, category), each at the revision
    /// of its own last event (the keeper compares them with reads and other watches of the
    /// same entries).
    pub fn feed(self, keeper: &keeper::ListKeeper) {
        for ((service, category), (entries, last)) in self.changes {
            let revision = u64::try_from(last).unwrap_or(0);
            let (mut added, mut removed) = (Vec::new(), Vec::new());
            for (_, (url, present)) in entries {
                if present {
                    added.push(url);
                } else {
                    removed.push(url);
                }
            }
            keeper.change(&service, &category, added, removed, revision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::{LEASES_DIR, root_prefix};

    /// Older versions kept the lease sentinels under the root: never an entry.
    #[test]
    fn an_old_lease_sentinel_is_not_an_entry_of_the_root() {
        let prefix = root_prefix("/dubbo");
        let key = format!("/dubbo/{LEASES_DIR}/1a2b");
        assert_eq!(parse_key("r", &prefix, &Scope::Root, &key), None);
        let entries = parse_entries("r", &prefix, &Scope::Root, [key.as_bytes()].into_iter());
        assert!(entries.is_empty());
    }

    #[test]
    fn the_last_event_of_an_entry_in_a_response_wins() {
        let u: Url = "dubbo://10.0.0.1:20880/a.B".parse().expect("url");
        let mut b = Batch::default();
        b.add("a.B".into(), "providers".into(), u.clone(), true, 2);
        b.add("a.B".into(), "providers".into(), u.clone(), false, 2);
        let k = keeper::ListKeeper::new("t");
        k.replace(
            &keeper::Scope::category("a.B", "providers"),
            [("a.B".to_owned(), "providers".to_owned(), u.clone())],
            1,
        );
        b.feed(&k);
        let c: Url = "consumer://10.0.0.2/a.B?category=providers"
            .parse()
            .expect("url");
        assert_eq!(k.lookup(&c), Some(vec![]));
    }
}
