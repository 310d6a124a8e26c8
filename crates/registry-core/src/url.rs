//! The URL type that carries everything: registry addresses, providers, consumers (subscriptions)
//! and `empty://` markers (CONTRACT §1).
//!
//! ```text
//! protocol://[username[:password]@]host[:port]/path?key=value&key=value
//! ```
//!
//! The parser is Dubbo's `URL.valueOf`, not RFC 3986: Dubbo URLs are written without escaping
//! their values (`?methods=a,b&anyhost=true`), may list several hosts
//! (`zookeeper://h1:2181,h2:2181`), and must round-trip byte for byte through
//! [`Url::to_full_string`] so node names match what Dubbo Java and Dubbo Go write.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Parameter `interface`.
pub const INTERFACE_KEY: &str = "interface";
/// Parameter `group`.
pub const GROUP_KEY: &str = "group";
/// Parameter `version`.
pub const VERSION_KEY: &str = "version";
/// Parameter `classifier`.
pub const CLASSIFIER_KEY: &str = "classifier";
/// Parameter `category`.
pub const CATEGORY_KEY: &str = "category";
/// Parameter `dynamic`.
pub const DYNAMIC_KEY: &str = "dynamic";
/// Parameter `check`.
pub const CHECK_KEY: &str = "check";
/// Parameter `enabled`.
pub const ENABLED_KEY: &str = "enabled";
/// Parameter `timestamp` (ignored by equality).
pub const TIMESTAMP_KEY: &str = "timestamp";
/// Parameter `backup`: more addresses of the same cluster.
pub const BACKUP_KEY: &str = "backup";
/// Parameter `anyhost`.
pub const ANYHOST_KEY: &str = "anyhost";
/// The wildcard value `*`.
pub const ANY_VALUE: &str = "*";
/// The prefix that excludes a value from a list (`-routers`).
pub const REMOVE_VALUE_PREFIX: &str = "-";
/// The prefix of parameters that supply a default (`default.version=1.0`).
pub const DEFAULT_KEY_PREFIX: &str = "default.";
/// Protocol of the marker URL notified for an empty category.
pub const EMPTY_PROTOCOL: &str = "empty";
/// The address that means "any host"; not a valid registry address.
pub const ANYHOST_VALUE: &str = "0.0.0.0";

/// Category `providers` (the default).
pub const PROVIDERS_CATEGORY: &str = "providers";
/// Category `consumers`.
pub const CONSUMERS_CATEGORY: &str = "consumers";
/// Category `routers`.
pub const ROUTERS_CATEGORY: &str = "routers";
/// Category `configurators`.
pub const CONFIGURATORS_CATEGORY: &str = "configurators";
/// The default category.
pub const DEFAULT_CATEGORY: &str = PROVIDERS_CATEGORY;
/// The four categories, in the order `category=*` expands to.
pub const ALL_CATEGORIES: [&str; 4] = [
    PROVIDERS_CATEGORY,
    CONSUMERS_CATEGORY,
    ROUTERS_CATEGORY,
    CONFIGURATORS_CATEGORY,
];

/// A Dubbo-style URL: protocol, optional credentials, host, port, path and sorted parameters.
///
/// Parameters are kept sorted by key. Equality and hashing cover everything but the
/// `timestamp` parameter. Parsing never panics: bad input is [`Error::InvalidUrl`] quoting it.
///
/// ```
/// use registry_core::Url;
///
/// let url: Url = "dubbo://10.0.0.1:20880/com.foo.Bar?version=1.0&application=demo".parse()?;
/// assert_eq!(url.host(), "10.0.0.1");
/// assert_eq!(url.port(), 20880);
/// assert_eq!(url.service_interface(), "com.foo.Bar");
/// assert_eq!(url.service_key(), "com.foo.Bar:1.0");
/// assert_eq!(
///     url.to_full_string(),
///     "dubbo://10.0.0.1:20880/com.foo.Bar?application=demo&version=1.0"
/// );
/// # Ok::<(), registry_core::Error>(())
/// ```
///
/// A `Url` is a pointer to one shared, immutable allocation that holds its full string and
/// the offsets of its parts: cloning one (into a list, a cache, a notification) copies a
/// pointer, [`Url::to_full_string`] copies one string, and a parsed provider costs its full
/// string plus 4 bytes per parameter (8 beyond 64 KiB). The builders make a new one.
#[derive(Clone)]
pub struct Url {
    d: Arc<UrlData>,
}

/// A range of [`UrlData::buf`].
#[derive(Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
}

/// One parameter: the key is `buf[start..eq]`, the value `buf[eq + 1..end]`.
#[derive(Clone, Copy)]
struct Param {
    start: u32,
    eq: u32,
    end: u32,
}

/// The compact form: the full string, and where each part of it is.
struct UrlData {
    buf: Box<str>,
    protocol: Span,
    username: Span,
    password: Span,
    host: Span,
    port: u16,
    path: Span,
    /// Where the first parameter starts (after `?`).
    query: u32,
    /// The parameters, sorted by key (and laid out in that order).
    params: Offsets,
}

/// Where each parameter's `=` and end are: 16-bit offsets when the full string is shorter
/// than 64 KiB (4 bytes a parameter), else 32-bit. A parameter starts one byte after the
/// previous one ends (the `&`), the first at [`UrlData::query`].
enum Offsets {
    Short(Box<[[u16; 2]]>),
    Long(Box<[[u32; 2]]>),
}

impl Offsets {
    /// 16-bit offsets when every one fits (the full string is `len` bytes long).
    fn of(params: Vec<[u32; 2]>, len: usize) -> Offsets {
        if len <= usize::from(u16::MAX) {
            Offsets::Short(
                params
                    .iter()
                    .map(|[eq, end]| {
                        let short = |x: u32| u16::try_from(x).unwrap_or(u16::MAX);
                        [short(*eq), short(*end)]
                    })
                    .collect(),
            )
        } else {
            Offsets::Long(params.into_boxed_slice())
        }
    }

    fn len(&self) -> usize {
        match self {
            Offsets::Short(v) => v.len(),
            Offsets::Long(v) => v.len(),
        }
    }

    /// (`=`, end) of parameter `i`.
    fn get(&self, i: usize) -> (u32, u32) {
        match self {
            Offsets::Short(v) => (u32::from(v[i][0]), u32::from(v[i][1])),
            Offsets::Long(v) => (v[i][0], v[i][1]),
        }
    }
}

/// The parts of a URL as owned values: what the parser and the builders work on.
#[derive(Clone)]
struct Parts {
    protocol: String,
    username: Option<String>,
    password: Option<String>,
    host: String,
    port: u16,
    path: String,
    params: BTreeMap<String, String>,
}

impl UrlData {
    fn str(&self, s: Span) -> &str {
        &self.buf[s.start as usize..s.end as usize]
    }

    fn opt(&self, s: Span) -> Option<&str> {
        (s.end > s.start).then(|| self.str(s))
    }

    fn key(&self, p: &Param) -> &str {
        &self.buf[p.start as usize..p.eq as usize]
    }

    fn value(&self, p: &Param) -> &str {
        &self.buf[p.eq as usize + 1..p.end as usize]
    }

    fn param(&self, i: usize) -> Param {
        let (eq, end) = self.params.get(i);
        let start = if i == 0 {
            self.query
        } else {
            self.params.get(i - 1).1 + 1
        };
        Param { start, eq, end }
    }

    fn param_list(&self) -> impl Iterator<Item = Param> + '_ {
        (0..self.params.len()).map(|i| self.param(i))
    }

    fn get(&self, key: &str) -> Option<&str> {
        let (mut lo, mut hi) = (0, self.params.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let p = self.param(mid);
            match self.key(&p).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.value(&p)),
            }
        }
        None
    }

    /// The layout of `buf` when it already is a full string exactly as [`UrlData::build`]
    /// writes it (what every node name and key this registry writes decodes to): the parts
    /// are found in place, with no copy and no map of parameters. `None` for anything else
    /// (credentials, several hosts, IPv6 literals, unsorted or repeated parameters, blanks,
    /// a port written unlike `u16::to_string`, ...), which [`Url::parse`] then reads through
    /// the parts; both give the same URL.
    fn canonical(buf: Box<str>) -> Option<UrlData> {
        let s: &str = &buf;
        // The full parser trims the input (Unicode white space, as `str::trim`).
        if s.len() > u32::MAX as usize / 2 || s.trim().len() != s.len() {
            return None;
        }
        let at = |x: usize| u32::try_from(x).ok();
        let sep = s.find("://")?;
        let protocol = &s[..sep];
        if protocol.is_empty()
            || !protocol
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_'))
        {
            return None;
        }
        let authority_start = sep + 3;
        let query_mark = s.find('?');
        let head_end = query_mark.unwrap_or(s.len());
        let head = &s[authority_start..head_end];
        // Blanks anywhere before the parameters, credentials, fragments and host lists are
        // left to the full parser.
        if head
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '@' | '#' | ','))
        {
            return None;
        }
        let (authority, path) = match head.find('/') {
            Some(i) => (&head[..i], Some(&head[i + 1..])),
            None => (head, None),
        };
        // The builder writes `/path` only for a non-empty path.
        if path.is_some_and(str::is_empty) {
            return None;
        }
        if !authority
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b':'))
        {
            return None;
        }
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => {
                // One colon, and the port as `u16::to_string` writes it (not 0).
                if p.contains(':') || p.is_empty() || p.starts_with('0') {
                    return None;
                }
                (h, p.parse::<u16>().ok()?)
            }
            None => (authority, 0),
        };
        let host_start = authority_start;
        let host = Span {
            start: at(host_start)?,
            end: at(host_start + host.len())?,
        };
        let path = match path {
            Some(p) => {
                let start = authority_start + authority.len() + 1;
                Span {
                    start: at(start)?,
                    end: at(start + p.len())?,
                }
            }
            None => Span::default(),
        };
        let mut params: Vec<[u32; 2]> = Vec::new();
        let mut query = at(head_end + 1)?;
        if let Some(q) = query_mark {
            query = at(q + 1)?;
            let mut pos = q + 1;
            let mut previous: Option<&str> = None;
            for part in s[q + 1..].split('&') {
                let eq = part.find('=')?;
                let (k, v) = (&part[..eq], &part[eq + 1..]);
                if k.is_empty()
                    || k.len() != k.trim().len()
                    || v.len() != v.trim().len()
                    || previous.is_some_and(|p| p >= k)
                {
                    return None;
                }
                previous = Some(k);
                params.push([at(pos + eq)?, at(pos + part.len())?]);
                pos += part.len() + 1;
            }
        }
        let params = Offsets::of(params, s.len());
        Some(UrlData {
            protocol: Span {
                start: 0,
                end: at(sep)?,
            },
            username: Span::default(),
            password: Span::default(),
            host,
            port,
            path,
            query,
            params,
            buf,
        })
    }

    /// Lays `p` out as its full string (CONTRACT §1) and records where each part is.
    fn build(p: &Parts) -> UrlData {
        let params_len: usize = p.params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut buf =
            String::with_capacity(p.protocol.len() + p.host.len() + p.path.len() + params_len + 16);
        let at = |buf: &String| u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let push = |buf: &mut String, s: &str| -> Span {
            let start = at(buf);
            buf.push_str(s);
            Span {
                start,
                end: at(buf),
            }
        };
        let protocol = push(&mut buf, &p.protocol);
        buf.push_str("://");
        let (mut username, mut password) = (Span::default(), Span::default());
        if p.username.is_some() || p.password.is_some() {
            username = push(&mut buf, p.username.as_deref().unwrap_or(""));
            if let Some(pw) = &p.password {
                buf.push(':');
                password = push(&mut buf, pw);
            }
            buf.push('@');
        }
        let host = push(&mut buf, &p.host);
        if p.port != 0 {
            buf.push(':');
            buf.push_str(&p.port.to_string());
        }
        let mut path = Span::default();
        if !p.path.is_empty() {
            buf.push('/');
            path = push(&mut buf, &p.path);
        }
        let mut params: Vec<[u32; 2]> = Vec::with_capacity(p.params.len());
        let mut query = at(&buf) + 1;
        for (i, (k, v)) in p.params.iter().enumerate() {
            buf.push(if i == 0 { '?' } else { '&' });
            if i == 0 {
                query = at(&buf);
            }
            buf.push_str(k);
            let eq = at(&buf);
            buf.push('=');
            buf.push_str(v);
            params.push([eq, at(&buf)]);
        }
        let params = Offsets::of(params, buf.len());
        UrlData {
            buf: buf.into_boxed_str(),
            protocol,
            username,
            password,
            host,
            port: p.port,
            path,
            query,
            params,
        }
    }

    fn parts(&self) -> Parts {
        Parts {
            protocol: self.str(self.protocol).to_owned(),
            username: self.opt(self.username).map(str::to_owned),
            password: self.opt(self.password).map(str::to_owned),
            host: self.str(self.host).to_owned(),
            port: self.port,
            path: self.str(self.path).to_owned(),
            params: self
                .param_list()
                .map(|p| (self.key(&p).to_owned(), self.value(&p).to_owned()))
                .collect(),
        }
    }
}

/// The parameters of a [`Url`], sorted by key: a view into the URL, compared with and
/// convertible to a `BTreeMap`.
#[derive(Clone, Copy)]
pub struct Parameters<'a> {
    d: &'a UrlData,
}

impl<'a> Parameters<'a> {
    /// The value of `key` (no `default.` fallback; see [`Url::parameter`]).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.d.get(key)
    }
    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.d.get(key).is_some()
    }
    /// How many parameters there are.
    pub fn len(&self) -> usize {
        self.d.params.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.d.params.len() == 0
    }
    /// `(key, value)` pairs in key order.
    pub fn iter(self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let d = self.d;
        d.param_list().map(move |p| (d.key(&p), d.value(&p)))
    }
    /// The keys in order.
    pub fn keys(self) -> impl Iterator<Item = &'a str> + 'a {
        let d = self.d;
        d.param_list().map(move |p| d.key(&p))
    }
    /// A copy as a map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

impl<'a> IntoIterator for Parameters<'a> {
    type Item = (&'a str, &'a str);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a str)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl PartialEq for Parameters<'_> {
    fn eq(&self, other: &Parameters<'_>) -> bool {
        self.iter().eq(other.iter())
    }
}

impl PartialEq<BTreeMap<String, String>> for Parameters<'_> {
    fn eq(&self, other: &BTreeMap<String, String>) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|((a, b), (c, d))| a == c && b == d)
    }
}

impl PartialEq<&BTreeMap<String, String>> for Parameters<'_> {
    fn eq(&self, other: &&BTreeMap<String, String>) -> bool {
        *self == **other
    }
}

impl fmt::Debug for Parameters<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Url {
    /// A URL with the given protocol, host, port (0 for none) and path (without leading `/`).
    pub fn new(
        protocol: impl Into<String>,
        host: impl Into<String>,
        port: u16,
        path: impl Into<String>,
    ) -> Url {
        let path: String = path.into();
        Url::from_parts(&Parts {
            protocol: protocol.into(),
            username: None,
            password: None,
            host: host.into(),
            port,
            path: path.trim_start_matches('/').to_owned(),
            params: BTreeMap::new(),
        })
    }

    fn from_parts(p: &Parts) -> Url {
        Url {
            d: Arc::new(UrlData::build(p)),
        }
    }

    /// A new URL from this one's parts changed by `f`.
    fn edit(self, f: impl FnOnce(&mut Parts)) -> Url {
        let mut p = self.d.parts();
        f(&mut p);
        Url::from_parts(&p)
    }

    /// Parses a URL in Dubbo's form; see the module documentation.
    ///
    /// Several hosts (`zookeeper://h1:2181,h2:2181`) become the first host plus a `backup`
    /// parameter listing the others, which is Dubbo's own form.
    pub fn parse(input: &str) -> Result<Url> {
        if let Some(d) = UrlData::canonical(input.into()) {
            return Ok(Url { d: Arc::new(d) });
        }
        Url::parse_slow(input)
    }

    /// [`Url::parse`] through the parts: for input that is not already a full string.
    fn parse_slow(input: &str) -> Result<Url> {
        let invalid = |reason: &str| invalid_url_redacted(input, reason);
        let mut rest = input.trim();
        if rest.is_empty() {
            return Err(invalid("the URL is empty"));
        }
        let mut params = BTreeMap::new();
        if let Some(q) = rest.find('?') {
            for part in rest[q + 1..].split('&') {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let (k, v) = match part.split_once('=') {
                    Some((k, v)) => (k.trim(), v.trim()),
                    None => (part, part),
                };
                if !k.is_empty() {
                    params.insert(k.to_owned(), v.to_owned());
                }
            }
            rest = &rest[..q];
        }
        // A fragment before the parameters is not part of the URL (Dubbo drops it). A `#` in
        // the credentials (`admin:p#ss@host`) is part of the password, not a fragment.
        let fragment_from = credentials_end(rest).unwrap_or(0);
        if let Some(h) = rest[fragment_from..].find('#') {
            rest = &rest[..fragment_from + h];
        }
        let protocol = match rest.find("://") {
            Some(0) => return Err(invalid("missing protocol")),
            Some(i) => {
                let p = &rest[..i];
                rest = &rest[i + 3..];
                p
            }
            None => return Err(invalid("missing protocol (expected `protocol://...`)")),
        };
        if !protocol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'))
        {
            return Err(invalid(
                "the protocol may only hold letters, digits, `+`, `-`, `.` and `_`",
            ));
        }
        let mut path = "";
        if let Some(i) = rest.find('/') {
            // Trailing blanks are not part of the path: without parameters after it, the full
            // string ends there and the next parse (which trims the input) would drop them.
            path = rest[i + 1..].trim_end();
            rest = &rest[..i];
        }
        let (mut username, mut password) = (None, None);
        if let Some(i) = rest.rfind('@') {
            let creds = &rest[..i];
            rest = &rest[i + 1..];
            match creds.split_once(':') {
                Some((u, p)) => {
                    username = Some(u.to_owned());
                    password = Some(p.to_owned());
                }
                None => username = Some(creds.to_owned()),
            }
        }
        let mut hosts = rest.split(',').map(str::trim).filter(|h| !h.is_empty());
        let (host, port) = match hosts.next() {
            Some(first) => split_host_port(first).map_err(|r| invalid(&r))?,
            None => (String::new(), 0),
        };
        let others: Vec<&str> = hosts.collect();
        if !others.is_empty() {
            for h in &others {
                // These hosts are written into the `backup` value, where a `&` would end it.
                if h.contains('&') {
                    return Err(invalid(&format!(
                        "the host `{h}` may not hold `&` (it goes into the `backup` parameter)"
                    )));
                }
                split_host_port(h).map_err(|r| invalid(&r))?;
            }
            let mut backup: Vec<String> = others.iter().map(|s| (*s).to_owned()).collect();
            if let Some(existing) = params.get(BACKUP_KEY) {
                backup.extend(
                    existing
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            params.insert(BACKUP_KEY.to_owned(), backup.join(","));
        }
        Ok(Url::from_parts(&Parts {
            protocol: protocol.to_owned(),
            username: username.filter(|u| !u.is_empty()),
            password: password.filter(|p| !p.is_empty()),
            host,
            port,
            path: path.to_owned(),
            params,
        }))
    }

    /// Decodes a node name (`encode(url.to_full_string())`) and parses it.
    pub fn from_encoded(encoded: &str) -> Result<Url> {
        let decoded = crate::codec::decode(encoded)?;
        if decoded.len() == decoded.trim().len()
            && let Some(d) = UrlData::canonical(decoded.as_str().into())
        {
            return Ok(Url { d: Arc::new(d) });
        }
        Url::parse_slow(&decoded)
    }

    /// The full string: protocol, credentials, host, `:port` when set, `/path`, then every
    /// parameter as `?k=v&...` in key order. Values are written as they are.
    pub fn to_full_string(&self) -> String {
        self.d.buf.to_string()
    }

    /// The full string with the password, if any, shown as `***`: for logs, labels and error
    /// messages.
    pub fn to_redacted_string(&self) -> String {
        match self.password() {
            Some(_) => self
                .clone()
                .with_credentials(self.username(), Some("***"))
                .to_full_string(),
            None => self.to_full_string(),
        }
    }

    /// [`Url::to_full_string`] without a copy.
    pub fn as_full_str(&self) -> &str {
        &self.d.buf
    }

    /// `protocol://[user[:pass]@]host[:port][/path]`, without parameters.
    pub fn to_identity_string(&self) -> String {
        let mut s = String::new();
        self.write_base(&mut s, true);
        s
    }

    /// `protocol://[user@]host[:port][/path]`: the identity without password or parameters, for
    /// messages and logs.
    pub fn to_identity_string_redacted(&self) -> String {
        let mut s = String::new();
        if let Some(u) = self.username() {
            s.push_str(self.protocol());
            s.push_str("://");
            s.push_str(u);
            s.push('@');
            let mut rest = String::new();
            self.write_base(&mut rest, false);
            s.push_str(rest.split_once("://").map_or("", |(_, r)| r));
        } else {
            self.write_base(&mut s, false);
        }
        s
    }

    fn write_base(&self, s: &mut String, credentials: bool) {
        s.push_str(self.protocol());
        s.push_str("://");
        if credentials && (self.username().is_some() || self.password().is_some()) {
            s.push_str(self.username().unwrap_or(""));
            if let Some(p) = self.password() {
                s.push(':');
                s.push_str(p);
            }
            s.push('@');
        }
        s.push_str(self.host());
        if self.d.port != 0 {
            s.push(':');
            s.push_str(&self.d.port.to_string());
        }
        if !self.path().is_empty() {
            s.push('/');
            s.push_str(self.path());
        }
    }

    /// The protocol (scheme).
    pub fn protocol(&self) -> &str {
        self.d.str(self.d.protocol)
    }
    /// The user name, if any.
    pub fn username(&self) -> Option<&str> {
        self.d.opt(self.d.username)
    }
    /// The password, if any.
    pub fn password(&self) -> Option<&str> {
        self.d.opt(self.d.password)
    }
    /// The host (empty when none).
    pub fn host(&self) -> &str {
        self.d.str(self.d.host)
    }
    /// The port; 0 when none was given.
    pub fn port(&self) -> u16 {
        self.d.port
    }
    /// The path, without the leading `/`.
    pub fn path(&self) -> &str {
        self.d.str(self.d.path)
    }
    /// `host:port`, or `host` when there is no port.
    pub fn address(&self) -> String {
        if self.d.port == 0 {
            self.host().to_owned()
        } else {
            format!("{}:{}", self.host(), self.d.port)
        }
    }
    /// The main address followed by every `backup` address, as `host[:port]` strings.
    pub fn addresses(&self) -> Vec<String> {
        let mut all = Vec::new();
        if !self.host().is_empty() {
            all.push(self.address());
        }
        if let Some(b) = self.d.get(BACKUP_KEY) {
            all.extend(
                b.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
        all
    }

    /// [`Url::addresses`] as `(host, port)` pairs (port 0 when none): the main address, then
    /// each `backup` entry read like a host of the URL itself (`h`, `h:port`, `[v6]:port`, a
    /// bare IPv6 address). A `backup` entry that is no address (a bad port, a `/`, `?`, `#` or
    /// `@` in it) is an [`Error::InvalidParameter`] naming it.
    pub fn host_ports(&self) -> Result<Vec<(String, u16)>> {
        let mut all = Vec::new();
        if !self.host().is_empty() {
            all.push((self.host().to_owned(), self.d.port));
        }
        if let Some(b) = self.d.get(BACKUP_KEY) {
            for entry in b.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let invalid = |reason: String| Error::InvalidParameter {
                    key: BACKUP_KEY.to_owned(),
                    value: entry.to_owned(),
                    reason,
                };
                if entry.contains(['/', '?', '#', '@']) {
                    return Err(invalid(
                        "an address may not hold `/`, `?`, `#` or `@`".into(),
                    ));
                }
                all.push(split_host_port(entry).map_err(invalid)?);
            }
        }
        Ok(all)
    }

    /// Whether the host is `0.0.0.0` or `anyhost=true` is set.
    pub fn is_anyhost(&self) -> bool {
        self.host() == ANYHOST_VALUE || self.parameter_bool(ANYHOST_KEY, false)
    }

    /// The parameters, sorted by key.
    pub fn parameters(&self) -> Parameters<'_> {
        Parameters { d: &self.d }
    }

    /// The value of `key`; when absent, the value of `default.<key>`.
    pub fn parameter(&self, key: &str) -> Option<&str> {
        if let Some(v) = self.d.get(key) {
            return Some(v);
        }
        if key.starts_with(DEFAULT_KEY_PREFIX) {
            return None;
        }
        let mut dk = String::with_capacity(DEFAULT_KEY_PREFIX.len() + key.len());
        dk.push_str(DEFAULT_KEY_PREFIX);
        dk.push_str(key);
        self.d.get(&dk)
    }

    /// The value of `key` (or `default.<key>`), or `default` when absent or empty.
    pub fn parameter_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        match self.parameter(key) {
            Some(v) if !v.is_empty() => v,
            _ => default,
        }
    }

    /// A boolean parameter: `true` (any case) is true, any other present value false,
    /// absent or empty gives `default`.
    pub fn parameter_bool(&self, key: &str, default: bool) -> bool {
        match self.parameter(key) {
            Some(v) if !v.is_empty() => v.eq_ignore_ascii_case("true"),
            _ => default,
        }
    }

    /// A numeric parameter; absent gives `Ok(default)`, a value that is not a number an
    /// [`Error::InvalidParameter`] naming the key and the value.
    pub fn parameter_num<T: FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.parameter(key) {
            None | Some("") => Ok(default),
            Some(v) => v.parse().map_err(|_| Error::InvalidParameter {
                key: key.to_owned(),
                value: v.to_owned(),
                reason: format!("expected a number of type {}", std::any::type_name::<T>()),
            }),
        }
    }

    /// The service interface: parameter `interface`, else the path.
    pub fn service_interface(&self) -> &str {
        match self.parameter(INTERFACE_KEY) {
            Some(i) if !i.is_empty() => i,
            _ => self.path(),
        }
    }
    /// Parameter `group`.
    pub fn group(&self) -> Option<&str> {
        self.parameter(GROUP_KEY).filter(|g| !g.is_empty())
    }
    /// Parameter `version`.
    pub fn version(&self) -> Option<&str> {
        self.parameter(VERSION_KEY).filter(|v| !v.is_empty())
    }
    /// Parameter `classifier`.
    pub fn classifier(&self) -> Option<&str> {
        self.parameter(CLASSIFIER_KEY).filter(|v| !v.is_empty())
    }
    /// The category this URL is stored under (`category`, default `providers`). For a list
    /// this is the whole raw value; see [`Url::categories`].
    pub fn category(&self) -> &str {
        self.parameter_or(CATEGORY_KEY, DEFAULT_CATEGORY)
    }
    /// The categories a subscription asks for, in order, without duplicates: the comma list
    /// of `category` (default `providers`); `*` expands to all four; `-x` entries remove `x`
    /// from all four.
    pub fn categories(&self) -> Vec<String> {
        let raw = self.category();
        let tokens: Vec<&str> = raw
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let mut out: Vec<String> = Vec::new();
        let has_any = tokens.contains(&ANY_VALUE);
        let has_removal = tokens.iter().any(|t| t.starts_with(REMOVE_VALUE_PREFIX));
        if has_any || has_removal {
            for c in ALL_CATEGORIES {
                if !tokens
                    .iter()
                    .any(|t| t.strip_prefix(REMOVE_VALUE_PREFIX) == Some(c))
                {
                    out.push(c.to_owned());
                }
            }
            return out;
        }
        for t in tokens {
            if !out.iter().any(|o| o == t) {
                out.push(t.to_owned());
            }
        }
        if out.is_empty() {
            out.push(DEFAULT_CATEGORY.to_owned());
        }
        out
    }
    /// `dynamic` (default true): whether the entry disappears when its registrant dies.
    pub fn is_dynamic(&self) -> bool {
        self.parameter_bool(DYNAMIC_KEY, true)
    }
    /// `check` (default true).
    pub fn check(&self) -> bool {
        self.parameter_bool(CHECK_KEY, true)
    }
    /// `enabled` (default true).
    pub fn is_enabled(&self) -> bool {
        self.parameter_bool(ENABLED_KEY, true)
    }

    /// `[group/]interface[:version]`.
    pub fn service_key(&self) -> String {
        build_service_key(self.service_interface(), self.group(), self.version())
    }

    /// Whether this is an `empty://` marker.
    pub fn is_empty_marker(&self) -> bool {
        self.protocol() == EMPTY_PROTOCOL
    }

    /// The marker notified for an empty category: this subscription URL with protocol
    /// `empty` and `category=<category>` (what Dubbo's registries notify).
    pub fn to_empty_marker(&self, category: &str) -> Url {
        self.clone()
            .with_protocol(EMPTY_PROTOCOL)
            .with_parameter(CATEGORY_KEY, category)
    }

    /// The empty marker this subscription is told for `service`: [`Url::to_empty_marker`],
    /// except that an `interface=*` subscription names the service (path and `interface`),
    /// since it is notified per service.
    pub fn to_empty_marker_for(&self, service: &str, category: &str) -> Url {
        if self.service_interface() == ANY_VALUE {
            self.clone()
                .with_path(service)
                .with_parameter(INTERFACE_KEY, service)
                .to_empty_marker(category)
        } else {
            self.to_empty_marker(category)
        }
    }

    /// Replaces the protocol.
    #[must_use]
    pub fn with_protocol(self, protocol: impl Into<String>) -> Url {
        let protocol = protocol.into();
        self.edit(|p| p.protocol = protocol)
    }
    /// Replaces the credentials (`None` removes them).
    #[must_use]
    pub fn with_credentials(self, username: Option<&str>, password: Option<&str>) -> Url {
        self.edit(|p| {
            p.username = username.filter(|s| !s.is_empty()).map(str::to_owned);
            p.password = password.filter(|s| !s.is_empty()).map(str::to_owned);
        })
    }
    /// Replaces the host.
    #[must_use]
    pub fn with_host(self, host: impl Into<String>) -> Url {
        let host = host.into();
        self.edit(|p| p.host = host)
    }
    /// Replaces the port (0 for none).
    #[must_use]
    pub fn with_port(self, port: u16) -> Url {
        self.edit(|p| p.port = port)
    }
    /// Replaces the path (a leading `/` is dropped).
    #[must_use]
    pub fn with_path(self, path: impl Into<String>) -> Url {
        let path: String = path.into();
        self.edit(|p| p.path = path.trim_start_matches('/').to_owned())
    }
    /// Sets a parameter. An empty key is ignored, as the parser drops it.
    #[must_use]
    pub fn with_parameter(self, key: impl Into<String>, value: impl Into<String>) -> Url {
        let key: String = key.into();
        if key.is_empty() {
            return self;
        }
        let value = value.into().trim().to_owned();
        self.edit(|p| {
            p.params.insert(key, value);
        })
    }
    /// Sets a parameter unless it is already present.
    #[must_use]
    pub fn with_parameter_if_absent(self, key: &str, value: impl Into<String>) -> Url {
        if self.d.get(key).is_some() {
            self
        } else {
            self.with_parameter(key, value)
        }
    }
    /// Sets several parameters.
    #[must_use]
    pub fn with_parameters<K, V>(self, params: impl IntoIterator<Item = (K, V)>) -> Url
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.edit(|p| {
            for (k, v) in params {
                let k: String = k.into();
                if !k.is_empty() {
                    p.params.insert(k, v.into().trim().to_owned());
                }
            }
        })
    }
    /// Removes a parameter.
    #[must_use]
    pub fn without_parameter(self, key: &str) -> Url {
        if self.d.get(key).is_none() {
            return self;
        }
        self.edit(|p| {
            p.params.remove(key);
        })
    }
    /// Removes several parameters.
    #[must_use]
    pub fn without_parameters<'k>(self, keys: impl IntoIterator<Item = &'k str>) -> Url {
        self.edit(|p| {
            for k in keys {
                p.params.remove(k);
            }
        })
    }

    fn eq_key(&self) -> impl Iterator<Item = (&str, &str)> {
        Parameters { d: &self.d }
            .iter()
            .filter(|(k, _)| *k != TIMESTAMP_KEY)
    }
}

/// `[group/]interface[:version]`.
pub fn build_service_key(interface: &str, group: Option<&str>, version: Option<&str>) -> String {
    let mut s = String::with_capacity(interface.len() + 16);
    if let Some(g) = group.filter(|g| !g.is_empty()) {
        s.push_str(g);
        s.push('/');
    }
    s.push_str(interface);
    if let Some(v) = version.filter(|v| !v.is_empty()) {
        s.push(':');
        s.push_str(v);
    }
    s
}

fn split_host_port(s: &str) -> std::result::Result<(String, u16), String> {
    // IPv6 literal: [::1]:2181
    if let Some(stripped) = s.strip_prefix('[') {
        let Some(end) = stripped.find(']') else {
            return Err(format!("unclosed `[` in host `{s}`"));
        };
        let host = &s[..end + 2];
        let after = &stripped[end + 1..];
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_owned(), parse_port(p, s)?)),
            None if after.is_empty() => Ok((host.to_owned(), 0)),
            None => Err(format!("unexpected `{after}` after the host `{host}`")),
        };
    }
    match s.rfind(':') {
        // A bare IPv6 address (several colons, no brackets). Dubbo writes `host:port` even
        // then and splits at the last colon; do the same when what follows is a port and what
        // precedes is still an address (`::1` and `fe80::1` stay whole).
        // Port 0 is written as no port, so `a:b:0` would read back as host `a`, port `b`:
        // keep it whole. Blanks before the `:` are not part of the host (with no port written,
        // the next parse would trim them).
        Some(i) if s[..i].contains(':') => {
            let (host, port) = (s[..i].trim_end(), &s[i + 1..]);
            match port.parse::<u16>() {
                Ok(p) if p != 0 && !host.ends_with(':') => Ok((host.to_owned(), p)),
                _ => Ok((s.to_owned(), 0)),
            }
        }
        Some(i) => Ok((s[..i].trim_end().to_owned(), parse_port(&s[i + 1..], s)?)),
        None => Ok((s.to_owned(), 0)),
    }
}

/// The byte offset just past the `@` that ends the credentials of `s` (`proto://user:pass@`),
/// if it has any: the last `@` before the first `/` after `://`.
fn credentials_end(s: &str) -> Option<usize> {
    let start = s.find("://")? + 3;
    let authority = &s[start..];
    let end = authority.find('/').unwrap_or(authority.len());
    authority[..end].rfind('@').map(|at| start + at + 1)
}

/// Redacts a password from `input` for an error message: everything between the first `:`
/// of the credentials and their `@` becomes `***`. `None` when there is nothing to redact.
pub(crate) fn redact_credentials(input: &str) -> Option<String> {
    // Without `://` (a typo such as `zookeeper:/u:p@h`, or no scheme at all) the credentials
    // may still be there: look from the start.
    let start = input.find("://").map_or(0, |i| i + 3);
    // The last `@` anywhere after the scheme: a password may hold `/`, `?` or `#`, and the
    // message must not show any of it, even when the URL cannot be parsed.
    let at = start + input[start..].rfind('@')?;
    let colon = start + input[start..at].find(':')?;
    Some(format!("{}***{}", &input[..colon + 1], &input[at..]))
}

/// An [`Error::InvalidUrl`] that never shows a password: with credentials in the input, the
/// input is redacted and the reason loses the parts it quotes (they may come from the password).
fn invalid_url_redacted(input: &str, reason: &str) -> Error {
    match redact_credentials(input) {
        None => Error::invalid_url(input, reason),
        Some(redacted) => {
            let mut safe = String::with_capacity(reason.len());
            for (i, part) in reason.split('`').enumerate() {
                if i % 2 == 1 {
                    safe.push_str("`…`");
                } else {
                    safe.push_str(part);
                }
            }
            Error::invalid_url(&redacted, &safe)
        }
    }
}

fn parse_port(p: &str, whole: &str) -> std::result::Result<u16, String> {
    if p.is_empty() {
        return Ok(0);
    }
    p.parse::<u16>()
        .map_err(|_| format!("the port `{p}` in `{whole}` is not a number from 0 to 65535"))
}

impl PartialEq for Url {
    fn eq(&self, other: &Url) -> bool {
        if Arc::ptr_eq(&self.d, &other.d) {
            return true;
        }
        self.protocol() == other.protocol()
            && self.username() == other.username()
            && self.password() == other.password()
            && self.host() == other.host()
            && self.d.port == other.d.port
            && self.path() == other.path()
            && self.eq_key().eq(other.eq_key())
    }
}
impl Eq for Url {}

impl Hash for Url {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.protocol().hash(state);
        self.username().hash(state);
        self.password().hash(state);
        self.host().hash(state);
        self.d.port.hash(state);
        self.path().hash(state);
        for (k, v) in self.eq_key() {
            k.hash(state);
            v.hash(state);
        }
    }
}

impl FromStr for Url {
    type Err = Error;
    fn from_str(s: &str) -> Result<Url> {
        Url::parse(s)
    }
}

impl TryFrom<&str> for Url {
    type Error = Error;
    fn try_from(s: &str) -> Result<Url> {
        Url::parse(s)
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.d.buf)
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password in logs.
        write!(f, "Url({})", self.to_redacted_string())
    }
}

impl serde::Serialize for Url {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_full_str())
    }
}

impl<'de> serde::Deserialize<'de> for Url {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Url, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Url::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn described(u: &Url) -> String {
        format!(
            "{}|{:?}|{:?}|{}|{}|{}|{:?}",
            u.as_full_str(),
            u.username(),
            u.password(),
            u.host(),
            u.port(),
            u.path(),
            u.parameters().iter().collect::<Vec<_>>()
        )
    }

    fn input() -> impl Strategy<Value = String> {
        let protocol = prop::sample::select(vec!["dubbo", "tri", "consumer", "a+b", "", "d ubbo"]);
        let host = prop::sample::select(vec![
            "10.0.0.1", "h", "", "[::1]", "a,b", "u:p@h", "::1", "H-x_y", " h",
        ]);
        let port = prop::sample::select(vec!["", ":20880", ":0", ":020", ":65536", ":", ":1"]);
        let path = prop::sample::select(vec![
            "",
            "/",
            "/com.foo.Bar",
            "/a b",
            "/x#y",
            "/a/b",
            "/p ",
            "/p\u{b}",
            "/p\u{a0}",
            "/\u{85}p",
        ]);
        let key = prop::sample::select(vec!["a", "b", "interface", "", " a", "timestamp", "b="]);
        let value = prop::sample::select(vec![
            "1",
            "",
            " x",
            "a=b",
            "*",
            "x#y",
            "v ",
            "v\u{b}",
            "\u{2003}v",
        ]);
        let params = prop::collection::vec((key, value, any::<bool>()), 0..5);
        (
            protocol,
            host,
            port,
            path,
            params,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(protocol, host, port, path, mut params, sorted, query)| {
                if sorted {
                    params.sort();
                    params.dedup_by(|a, b| a.0 == b.0);
                }
                let mut s = format!("{protocol}://{host}{port}{path}");
                if query {
                    s.push('?');
                }
                for (i, (k, v, eq)) in params.iter().enumerate() {
                    if i > 0 {
                        s.push('&');
                    }
                    s.push_str(k);
                    if *eq {
                        s.push('=');
                        s.push_str(v);
                    }
                }
                s
            })
    }

    #[test]
    fn full_strings_of_common_urls_are_read_in_place() {
        for s in [
            "dubbo://10.0.0.1:20880/com.foo.Bar?anyhost=true&application=a&interface=com.foo.Bar&methods=a,b&side=provider&timestamp=1",
            "consumer://10.0.0.9/com.foo.Bar?category=providers,routers&side=consumer",
            "empty://0.0.0.0/com.foo.Bar?category=routers",
            "memory://name",
            "localdir:///var/lib/registry?group=g",
            "tri://host-1.example:50051/a.B?x=",
        ] {
            let u = Url::parse(s).unwrap();
            assert_eq!(u.as_full_str(), s);
            assert!(UrlData::canonical(s.into()).is_some(), "{s}");
            assert_eq!(described(&u), described(&Url::parse_slow(s).unwrap()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// The in-place reading of full strings gives what reading through the parts gives.
        #[test]
        fn the_fast_path_reads_what_the_full_parser_reads(s in input()) {
            let fast = Url::parse(&s).map(|u| described(&u)).map_err(|e| e.to_string());
            let slow = Url::parse_slow(&s).map(|u| described(&u)).map_err(|e| e.to_string());
            prop_assert_eq!(fast, slow);
        }
    }

    #[test]
    fn parameters_are_found_on_both_sides_of_64_kib() {
        let base = "dubbo://10.0.0.1:20880/com.foo.Bar?a=1&big=&z=2&zz=".len();
        // Full strings of exactly 65,535 and 65,536 bytes sit on the two sides of the switch.
        for len in [10, 65_535 - base, 65_536 - base, 70_000, 200_000] {
            let big = "x".repeat(len);
            let u: Url = format!("dubbo://10.0.0.1:20880/com.foo.Bar?a=1&big={big}&z=2&zz=")
                .parse()
                .unwrap();
            assert_eq!(u.as_full_str().len(), base + len);
            assert_eq!(u.parameter("a"), Some("1"), "len {len}");
            assert_eq!(u.parameter("big").map(str::len), Some(len));
            assert_eq!(u.parameter("z"), Some("2"));
            assert_eq!(u.parameter("zz"), Some(""));
            assert_eq!(u.parameter("interface"), None);
            let keys: Vec<&str> = u.parameters().keys().collect();
            assert_eq!(keys, ["a", "big", "z", "zz"]);
            let back: Url = u.as_full_str().parse().unwrap();
            assert_eq!(back.as_full_str(), u.as_full_str());
            assert_eq!(back.parameters(), u.parameters());
        }
    }

    #[test]
    fn parses_every_part() {
        let u = Url::parse("dubbo://admin:hello1234@10.20.130.230:20880/context/path?version=1.0.0&application=morgan").unwrap();
        assert_eq!(u.protocol(), "dubbo");
        assert_eq!(u.username(), Some("admin"));
        assert_eq!(u.password(), Some("hello1234"));
        assert_eq!(u.host(), "10.20.130.230");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.path(), "context/path");
        assert_eq!(u.parameter("version"), Some("1.0.0"));
        assert_eq!(u.parameter("application"), Some("morgan"));
    }

    #[test]
    fn several_hosts_become_backup() {
        let u = Url::parse("zookeeper://h1:2181,h2:2181,h3:2181?backup=h4:2181").unwrap();
        assert_eq!(u.host(), "h1");
        assert_eq!(u.port(), 2181);
        assert_eq!(u.parameter(BACKUP_KEY), Some("h2:2181,h3:2181,h4:2181"));
        assert_eq!(
            u.addresses(),
            vec!["h1:2181", "h2:2181", "h3:2181", "h4:2181"]
        );
        assert_eq!(Url::parse(&u.to_full_string()).unwrap(), u);
    }

    #[test]
    fn ipv6_hosts() {
        let u = Url::parse("dubbo://[::1]:20880/a.B").unwrap();
        assert_eq!(u.host(), "[::1]");
        assert_eq!(u.port(), 20880);
        assert_eq!(u.to_full_string(), "dubbo://[::1]:20880/a.B");
        assert!(Url::parse("dubbo://[::1:20880/a.B").is_err());
    }

    #[test]
    fn bad_ports_are_errors_that_quote_the_input() {
        for bad in ["dubbo://h:99999/x", "dubbo://h:abc/x", "dubbo://h:-1"] {
            let e = Url::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
            assert!(e.contains("port"), "{e}");
        }
    }

    #[test]
    fn categories_expand() {
        let c = |s: &str| {
            Url::parse(&format!("consumer://h/x?category={s}"))
                .unwrap()
                .categories()
        };
        assert_eq!(c("*"), ALL_CATEGORIES.map(String::from).to_vec());
        assert_eq!(
            c("-routers"),
            vec!["providers", "consumers", "configurators"]
        );
        assert_eq!(c("routers,providers,routers"), vec!["routers", "providers"]);
        assert_eq!(
            Url::parse("consumer://h/x").unwrap().categories(),
            vec!["providers"]
        );
    }

    #[test]
    fn clones_share_and_builders_copy_on_write() {
        let a = Url::parse("dubbo://h:1/S?x=1").unwrap();
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.d, &b.d), "a clone is a pointer copy");
        let c = b
            .clone()
            .with_parameter("y", "2")
            .with_port(2)
            .with_protocol("tri");
        assert_eq!(
            a.to_full_string(),
            "dubbo://h:1/S?x=1",
            "the original is untouched"
        );
        assert_eq!(b, a);
        assert_eq!(c.to_full_string(), "tri://h:2/S?x=1&y=2");
        let d = Url::parse("dubbo://h:1/S?x=1").unwrap();
        assert_eq!(a, d, "equal by value without sharing");
    }

    #[test]
    fn empty_markers_name_the_service_for_wildcards() {
        let one = Url::parse("consumer://h/a.B?interface=a.B&version=1").unwrap();
        let m = one.to_empty_marker_for("a.B", "routers");
        assert_eq!(m, one.to_empty_marker("routers"));
        assert_eq!(
            m.to_full_string(),
            "empty://h/a.B?category=routers&interface=a.B&version=1"
        );
        let all = Url::parse("consumer://h/*?interface=*&group=*").unwrap();
        let m = all.to_empty_marker_for("c.D", "providers");
        assert_eq!(
            m.to_full_string(),
            "empty://h/c.D?category=providers&group=*&interface=c.D"
        );
        assert_eq!(m.service_interface(), "c.D");
    }

    /// Inputs the `url_parse` and `url_node_name` fuzz targets found: each parsed, but its full
    /// string read back as another URL (or not at all).
    #[test]
    fn parsed_urls_read_back_from_their_full_string() {
        for (input, host, port, path) in [
            ("-://-q\n://-", "-q", 0, "/-"),
            ("dubbo://h :/p", "h", 0, "p"),
            ("dubbo://h/p \n?", "h", 0, "p"),
            ("dubbo://h/p #x", "h", 0, "p"),
            ("A://\u{8} \u{1a}\n\n//x\n\n?", "\u{8} \u{1a}", 0, "/x"),
            ("dubbo://a:b:0/p", "a:b:0", 0, "p"),
            ("dubbo://a:b \n:80/p", "a:b", 80, "p"),
            ("dubbo://a:: :80/p", "a:: :80", 0, "p"),
        ] {
            let u = Url::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(
                (u.host(), u.port(), u.path()),
                (host, port, path),
                "{input:?}"
            );
            let full = u.to_full_string();
            let back = Url::parse(&full).unwrap_or_else(|e| panic!("{full:?}: {e}"));
            assert_eq!(back, u, "{input:?} -> {full:?}");
            assert_eq!(back.to_full_string(), full);
        }
    }

    /// Found by the `url_parse` fuzz target: a second host holding `&` went into the `backup`
    /// value, and the full string read back as another parameter.
    #[test]
    fn a_backup_host_may_not_hold_an_ampersand() {
        let input = "zr://[::1]:1,fe80:&2:3?backup=::4";
        let e = Url::parse(input).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidUrl { input: i, .. } if i == input),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("`fe80:&2:3` may not hold `&`"),
            "{e}"
        );
        assert!(
            Url::parse("zr://h&x:1/p").is_ok(),
            "the first host is not a parameter"
        );
    }

    /// Found by the `url_node_name` fuzz target: the `backup` value made of several hosts and
    /// a `backup` parameter kept the blank after an entry of the parameter, at its end.
    #[test]
    fn several_hosts_and_backup_make_a_trimmed_value() {
        let u = Url::parse("zk://h1,h2?backup=h3 ,h4 , ").unwrap();
        assert_eq!(u.parameter(BACKUP_KEY), Some("h2,h3,h4"));
        assert_eq!(Url::parse(&u.to_full_string()).unwrap(), u);
    }

    #[test]
    fn host_ports_reads_every_address() {
        let u = Url::parse("zookeeper://::1,[::2]:3,h:4?backup=fe80::1:5,h6,::7").unwrap();
        assert_eq!(
            u.host_ports().unwrap(),
            vec![
                ("::1".to_owned(), 0),
                ("[::2]".to_owned(), 3),
                ("h".to_owned(), 4),
                ("fe80::1".to_owned(), 5),
                ("h6".to_owned(), 0),
                ("::7".to_owned(), 0),
            ]
        );
        for bad in ["h:abc", "h/chroot", "u@h", "h?x", "[::1"] {
            let u = Url::parse("zookeeper://h")
                .unwrap()
                .with_parameter(BACKUP_KEY, bad);
            match u.host_ports() {
                Err(Error::InvalidParameter { key, value, .. }) => {
                    assert_eq!((key.as_str(), value.as_str()), (BACKUP_KEY, bad));
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn debug_hides_password() {
        let u = Url::parse("zookeeper://u:secret@h:2181").unwrap();
        let d = format!("{u:?}");
        assert!(!d.contains("secret"), "{d}");
    }
}
