//! Matching a subscription (consumer URL) against registered URLs (CONTRACT §2), Dubbo's
//! `UrlUtils.isMatch` and friends.
//!
//! One deliberate difference from Dubbo: categories are compared as comma-separated tokens.
//! Dubbo tests `categories.contains(category)` on the raw string, so a subscription to
//! `routers` also matched a provider whose category is `router`, and `-routers` excluded
//! `router`. Here `router` matches only `router`.

use crate::url::{
    ANY_VALUE, CATEGORY_KEY, CLASSIFIER_KEY, DEFAULT_CATEGORY, EMPTY_PROTOCOL, ENABLED_KEY,
    GROUP_KEY, INTERFACE_KEY, REMOVE_VALUE_PREFIX, Url, VERSION_KEY,
};

/// Whether the registered URL `provider` is one the subscription `consumer` asks for:
/// interface, category, enabled, group, version and classifier, in that order.
///
/// ```
/// use registry_core::{is_match, Url};
/// let consumer: Url = "consumer://10.0.0.2/com.foo.Bar?group=a,b&version=1.0".parse()?;
/// let provider: Url = "dubbo://10.0.0.1:20880/com.foo.Bar?group=b&version=1.0".parse()?;
/// assert!(is_match(&consumer, &provider));
/// # Ok::<(), registry_core::Error>(())
/// ```
pub fn is_match(consumer: &Url, provider: &Url) -> bool {
    let ci = consumer.service_interface();
    let pi = provider.service_interface();
    if !(ci == ANY_VALUE || pi == ANY_VALUE || ci == pi) {
        return false;
    }
    if !is_match_category(
        provider.parameter_or(CATEGORY_KEY, DEFAULT_CATEGORY),
        consumer.parameter(CATEGORY_KEY),
    ) {
        return false;
    }
    if !provider.parameter_bool(ENABLED_KEY, true)
        && consumer.parameter(ENABLED_KEY) != Some(ANY_VALUE)
    {
        return false;
    }
    let cg = consumer.parameter(GROUP_KEY);
    let pg = provider.parameter(GROUP_KEY);
    let group_ok = cg == Some(ANY_VALUE)
        || empty_as_none(cg) == empty_as_none(pg)
        || match (cg, pg) {
            (Some(list), Some(g)) => list.split(',').map(str::trim).any(|x| x == g),
            _ => false,
        };
    let cv = consumer.parameter(VERSION_KEY);
    let version_ok = cv == Some(ANY_VALUE)
        || empty_as_none(cv) == empty_as_none(provider.parameter(VERSION_KEY));
    let cc = consumer.parameter_or(CLASSIFIER_KEY, ANY_VALUE);
    let pc = provider.parameter_or(CLASSIFIER_KEY, ANY_VALUE);
    group_ok && version_ok && (cc == ANY_VALUE || cc == pc)
}

fn empty_as_none(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.is_empty())
}

/// Whether `category` is selected by a subscription's category list (`None`: the default,
/// `providers`). Tokens: `*` selects all; if any token is `-x`, everything but the excluded
/// ones; otherwise the listed ones.
pub fn is_match_category(category: &str, categories: Option<&str>) -> bool {
    let Some(list) = categories.filter(|c| !c.trim().is_empty()) else {
        return category == DEFAULT_CATEGORY;
    };
    let tokens = || list.split(',').map(str::trim).filter(|t| !t.is_empty());
    if tokens().any(|t| t == ANY_VALUE) {
        return true;
    }
    if tokens().any(|t| t.starts_with(REMOVE_VALUE_PREFIX)) {
        return !tokens().any(|t| t.strip_prefix(REMOVE_VALUE_PREFIX) == Some(category));
    }
    tokens().any(|t| t == category)
}

/// Dubbo's `isItemMatch`: `None` matches only `None`; `*` matches anything present or absent;
/// otherwise equality.
pub fn is_item_match(pattern: Option<&str>, value: Option<&str>) -> bool {
    match pattern {
        None => value.is_none(),
        Some(p) => p == ANY_VALUE || Some(p) == value,
    }
}

/// Dubbo's `isServiceKeyMatch`: same `interface` parameter, and group and version matched with
/// [`is_item_match`].
pub fn is_service_key_match(pattern: &Url, value: &Url) -> bool {
    pattern.parameter(INTERFACE_KEY) == value.parameter(INTERFACE_KEY)
        && is_item_match(pattern.parameter(GROUP_KEY), value.parameter(GROUP_KEY))
        && is_item_match(pattern.parameter(VERSION_KEY), value.parameter(VERSION_KEY))
}

/// Dubbo's `isMatchGlobPattern`: a pattern with at most one `*`; a pattern starting with `$`
/// names a parameter of `param` whose value is the pattern. One difference: the prefix and
/// suffix around `*` may not overlap (`ab*ba` does not match `aba`; Dubbo says it does).
pub fn is_match_glob_pattern(pattern: &str, value: Option<&str>, param: Option<&Url>) -> bool {
    if let (Some(u), Some(key)) = (param, pattern.strip_prefix('$')) {
        return is_match_glob_pattern(u.parameter_or(key, ""), value, None);
    }
    if pattern == ANY_VALUE {
        return true;
    }
    // As in Dubbo, an empty value counts as a missing one.
    let value = match value.filter(|v| !v.is_empty()) {
        None => return pattern.is_empty(),
        Some(v) => v,
    };
    if pattern.is_empty() {
        return false;
    }
    match pattern.rfind('*') {
        None => value == pattern,
        Some(i) if i == pattern.len() - 1 => value.starts_with(&pattern[..i]),
        Some(0) => value.ends_with(&pattern[1..]),
        Some(i) => {
            let (pre, post) = (&pattern[..i], &pattern[i + 1..]);
            value.len() >= pre.len() + post.len() && value.starts_with(pre) && value.ends_with(post)
        }
    }
}

/// Dubbo's `UrlUtils.getEmptyUrl(service, category)`: `empty://0.0.0.0/<interface>?category=..`
/// with `group` and `version` taken from a `[group/]interface[:version]` service key.
pub fn empty_url(service_key: &str, category: &str) -> Url {
    let (group, rest) = match service_key.find('/') {
        Some(i) if i > 0 => (Some(&service_key[..i]), &service_key[i + 1..]),
        _ => (None, service_key),
    };
    let (interface, version) = match rest.rfind(':') {
        Some(i) if i > 0 => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let mut u = Url::new(EMPTY_PROTOCOL, crate::url::ANYHOST_VALUE, 0, interface)
        .with_parameter(CATEGORY_KEY, category);
    if let Some(g) = group {
        u = u.with_parameter(GROUP_KEY, g);
    }
    if let Some(v) = version {
        u = u.with_parameter(VERSION_KEY, v);
    }
    u
}
