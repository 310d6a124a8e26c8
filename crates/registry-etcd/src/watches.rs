//! Subscriptions and the state of their watches: each watch covers one prefix (a category
//! path + `/`, or the root + `/` for `interface=*`), holds the entries read from it, and is
//! kept up to date from the watch events, parsing only the entry that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use registry_core::delivery::Delivery;
use registry_core::{Notification, Source, Url, is_match};

use crate::paths::split_under_root;

/// One subscription: (URL, listener) and its delivery task.
pub(crate) struct Sub {
    pub url: Url,
    pub categories: Vec<String>,
    pub delivery: Delivery,
}

impl Sub {
    /// The full list of (`service`, `category`) from `entries` (sorted), filtered by
    /// [`is_match`], or the `empty://` marker.
    fn list<'a>(
        &self,
        service: &str,
        category: &str,
        entries: impl Iterator<Item = &'a Url>,
    ) -> Vec<Url> {
        let mut urls: Vec<Url> = entries
            .filter(|u| is_match(&self.url, u))
            .cloned()
            .collect();
        urls.sort_by_cached_key(Url::to_full_string);
        if urls.is_empty() {
            urls.push(self.url.to_empty_marker_for(service, category));
        }
        urls
    }
}

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One category of one service: keys `prefix + encode(url)`.
    Category { service: String, category: String },
    /// Everything under the root (`interface=*`): keys `prefix + service/category/encode(url)`.
    Root,
}

/// One watch of a subscription.
pub(crate) struct WatchState {
    pub sub: Arc<Sub>,
    /// The key prefix, ending with `/`.
    pub prefix: String,
    pub scope: Scope,
    /// key -> URL, for every key that parsed.
    pub entries: BTreeMap<String, Url>,
    /// Services a wildcard subscription has been told about.
    pub known: BTreeSet<String>,
    /// The state reflects every change up to this revision; the watch resumes after it and
    /// ignores events at or below it.
    pub revision: i64,
    /// The watch stream generation it is armed on (0: not armed).
    pub armed: u64,
    /// Cancelled by the server; its prefix is being read again, after which it is created
    /// again.
    pub resyncing: bool,
    /// etcd refused to create it (no permission on its prefix): not created again on this
    /// stream; the periodic re-read retries it (and creates it once the prefix can be read).
    pub refused: bool,
}

/// A (service, category) whose list changed.
pub(crate) type Changed = BTreeSet<(String, String)>;

/// Parses the entries of a range read under `prefix`; keys that are not entries of the scope
/// are skipped (a URL that does not parse with a warning).
pub(crate) fn parse_entries<'a>(
    registry: &str,
    prefix: &str,
    scope: &Scope,
    kvs: impl Iterator<Item = &'a [u8]>,
) -> BTreeMap<String, Url> {
    let mut out = BTreeMap::new();
    for key in kvs {
        let Ok(key) = std::str::from_utf8(key) else {
            tracing::warn!(registry, "skipped a key that is not UTF-8");
            continue;
        };
        if let Some((_, _, url)) = parse_key(registry, prefix, scope, key) {
            out.insert(key.to_owned(), url);
        }
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

impl WatchState {
    /// The (service, category) of a stored key.
    fn pair_of(&self, key: &str) -> Option<(String, String)> {
        match &self.scope {
            Scope::Category { service, category } => Some((service.clone(), category.clone())),
            Scope::Root => {
                let rest = key.strip_prefix(&self.prefix)?;
                split_under_root(rest).map(|(s, c, _)| (s, c.to_owned()))
            }
        }
    }

    /// The entries of (`service`, `category`).
    fn entries_of<'a>(
        &'a self,
        service: &str,
        category: &str,
    ) -> Box<dyn Iterator<Item = &'a Url> + 'a> {
        match &self.scope {
            Scope::Category { .. } => Box::new(self.entries.values()),
            Scope::Root => {
                let p = format!(
                    "{}{}/{}/",
                    self.prefix,
                    registry_core::encode(service),
                    category
                );
                Box::new(
                    self.entries
                        .range(p.clone()..)
                        .take_while(move |(k, _)| k.starts_with(&p))
                        .map(|(_, u)| u),
                )
            }
        }
    }

    /// Applies one event (`url` is `Some` for a put of an entry, `None` for a delete). Returns
    /// the (service, category) when the list changed.
    pub fn apply(&mut self, key: &str, url: Option<Url>) -> Option<(String, String)> {
        let changed = match url {
            Some(u) => {
                if self.entries.get(key) == Some(&u) {
                    false
                } else {
                    self.entries.insert(key.to_owned(), u);
                    true
                }
            }
            None => self.entries.remove(key).is_some(),
        };
        if changed { self.pair_of(key) } else { None }
    }

    /// Replaces every entry (after a re-read), returning what changed.
    pub fn replace(&mut self, entries: BTreeMap<String, Url>) -> Changed {
        let mut changed = Changed::new();
        for (k, u) in &self.entries {
            if entries.get(k) != Some(u) {
                changed.extend(self.pair_of(k));
            }
        }
        for (k, u) in &entries {
            if self.entries.get(k) != Some(u) {
                changed.extend(self.pair_of(k));
            }
        }
        self.entries = entries;
        changed
    }

    /// Every (service, category) that has entries.
    fn services(&self) -> BTreeSet<String> {
        self.entries
            .keys()
            .filter_map(|k| self.pair_of(k))
            .map(|(s, _)| s)
            .collect()
    }

    /// Pushes the first notifications: every category of the subscription, in its order
    /// (for `interface=*`, per service present).
    pub fn notify_initial(&mut self) {
        match &self.scope {
            Scope::Category { service, category } => {
                let (s, c) = (service.clone(), category.clone());
                self.push(&s, &c);
            }
            Scope::Root => {
                let services = self.services();
                let categories = self.sub.categories.clone();
                for s in &services {
                    for c in &categories {
                        self.push(s, c);
                    }
                }
                self.known = services;
            }
        }
    }

    /// Pushes the lists that changed. A wildcard subscription hears about a new service's
    /// every category at once.
    pub fn notify_changed(&mut self, changed: &Changed) {
        for (service, category) in changed {
            match self.scope {
                Scope::Category { .. } => self.push(service, category),
                Scope::Root => {
                    if !self.known.contains(service) {
                        self.known.insert(service.clone());
                        let categories = self.sub.categories.clone();
                        for c in &categories {
                            self.push(service, c);
                        }
                    } else if self.sub.categories.iter().any(|c| c == category) {
                        self.push(service, category);
                    }
                }
            }
        }
    }

    fn push(&self, service: &str, category: &str) {
        let urls = self
            .sub
            .list(service, category, self.entries_of(service, category));
        self.sub.delivery.push(Notification::new(
            service,
            category,
            urls,
            u64::try_from(self.revision).unwrap_or(0),
            Source::Live,
        ));
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
}
