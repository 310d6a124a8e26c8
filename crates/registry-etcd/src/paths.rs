//! The key layout (CONTRACT §7), byte-identical to Dubbo Java and Go:
//!
//! ```text
//! root          = "/" + group                      (default /dubbo)
//! service path  = root + "/" + encode(interface)
//! category path = service path + "/" + category
//! entry key     = category path + "/" + encode(url.to_full_string())
//! ```
//!
//! Reads and watches use `category path + "/"`, with the trailing slash, so a sibling such as
//! `providersX` never leaks into `providers`.
//!
//! Besides the entries, each registry keeps one lease sentinel, `lease prefix + root + "/" +
//! lease id (hex)` (`/.registry-leases/dubbo/694d…` by default), on its lease (see the session
//! module). It is outside the root, so Dubbo subscribers and Dubbo Admin never see it. (Older
//! versions put it at `root + "/.registry-leases/…"`: the root scope still skips that folder.)

use registry_core::{Url, encode};

/// `root + "/" + encode(interface)`.
pub(crate) fn service_path(root: &str, service: &str) -> String {
    format!("{root}/{}", encode(service))
}

/// `service path + "/" + category`.
pub(crate) fn category_path(root: &str, service: &str, category: &str) -> String {
    format!("{}/{category}", service_path(root, service))
}

/// The prefix every entry of (`service`, `category`) starts with: the category path and `/`.
pub(crate) fn category_prefix(root: &str, service: &str, category: &str) -> String {
    format!("{}/", category_path(root, service, category))
}

/// The prefix of everything under the root: `root + "/"`.
pub(crate) fn root_prefix(root: &str) -> String {
    format!("{root}/")
}

/// The folder under the root where older versions kept the lease sentinels: never an entry.
pub(crate) const LEASES_DIR: &str = ".registry-leases";

/// The sentinel key of `lease`: `lease_prefix + root + "/" + lease id in hex`. It is put on
/// the lease itself, so etcd deletes it (and the watch on it reports that) the moment the
/// lease is revoked or expires.
pub(crate) fn sentinel_key(lease_prefix: &str, root: &str, lease: i64) -> String {
    format!("{lease_prefix}{root}/{lease:x}")
}

/// The key of an entry: `category path + "/" + encode(url.to_full_string())`.
pub(crate) fn entry_key(root: &str, url: &Url) -> String {
    format!(
        "{}/{}",
        category_path(root, url.service_interface(), url.category()),
        encode(&url.to_full_string())
    )
}

/// Splits the part of a key after `root/` into (service, category, encoded entry). `None`
/// for keys that are not entries (too few or too many segments, an undecodable service).
pub(crate) fn split_under_root(rest: &str) -> Option<(String, &str, &str)> {
    let mut parts = rest.split('/');
    let service = parts.next().filter(|s| !s.is_empty() && *s != LEASES_DIR)?;
    let category = parts.next().filter(|s| !s.is_empty())?;
    let entry = parts.next().filter(|s| !s.is_empty())?;
    if parts.next().is_some() {
        return None;
    }
    let service = registry_core::decode(service).ok()?;
    Some((service, category, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_dubbo() {
        let u: Url =
            "dubbo://10.0.0.1:20880/org.apache.dubbo.demo.DemoService?anyhost=true&side=provider"
                .parse()
                .expect("url");
        assert_eq!(
            entry_key("/dubbo", &u),
            "/dubbo/org.apache.dubbo.demo.DemoService/providers/dubbo%3A%2F%2F10.0.0.1%3A20880%2Forg.apache.dubbo.demo.DemoService%3Fanyhost%3Dtrue%26side%3Dprovider"
        );
        assert_eq!(category_prefix("/g", "a b", "routers"), "/g/a+b/routers/");
        assert_eq!(root_prefix("/dubbo"), "/dubbo/");
    }

    #[test]
    fn split() {
        assert_eq!(
            split_under_root("a+b/providers/x"),
            Some(("a b".to_owned(), "providers", "x"))
        );
        assert_eq!(split_under_root("a/providers"), None);
        assert_eq!(split_under_root("a/providers/x/y"), None);
        assert_eq!(split_under_root("a//x"), None);
        assert_eq!(split_under_root("%zz/providers/x"), None);
        // Lease sentinels are never entries, whatever their depth.
        assert_eq!(split_under_root(".registry-leases/1a2b"), None);
        assert_eq!(split_under_root(".registry-leases/providers/x"), None);
    }

    #[test]
    fn sentinel_is_outside_the_root() {
        let key = sentinel_key("/.registry-leases", "/dubbo", 0x694d_9a1b_22c3_0f11);
        assert_eq!(key, "/.registry-leases/dubbo/694d9a1b22c30f11");
        assert!(!key.starts_with(&root_prefix("/dubbo")));
    }
}
