//! The state shared by a registry handle ([`crate::registry`]) and its session task
//! ([`crate::session`]), and the connection steps both use. Both modules depend on this one,
//! never on each other's internals (the handle only starts the session task).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient, LeaseClient, WatchClient};
use registry_core::delivery::Delivery;
use registry_core::keeper::{ListKeeper, SubscriptionId};
use registry_core::{Error, RegistryEvent, Result, Url};
use tokio::sync::{broadcast, mpsc, watch};

use crate::errors::{self, Kind};
use crate::options::Options;
use crate::watches::{Entries, Scope, WatchState, parse_entries};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// HTTP/2 keep-alive ping interval on every connection. etcd's server refuses pings more
/// often than `--grpc-keepalive-min-time` (5 s by default) with a GOAWAY, so a little more.
pub(crate) const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(6);

/// The shortest per-step timeout, whatever the TTL.
const MIN_STEP: Duration = Duration::from_millis(250);

/// Requests from the registry handle to its session task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Create every watch not yet created on the current stream.
    Arm,
    /// Cancel a watch that was created on stream generation `.1`.
    Cancel(i64, u64),
    /// A request said the lease is gone, or a request went unanswered: check the lease (and
    /// with it the member) now.
    CheckLease,
    /// A request said the auth token is invalid: authenticate again.
    Reauthenticate,
}

/// One subscription: its id in the keeper, its delivery (kept to flush and close it) and the
/// prefixes it watches.
pub(crate) struct Sub {
    pub id: SubscriptionId,
    pub delivery: std::sync::Arc<Delivery>,
    pub prefixes: Vec<String>,
}

/// The clients of one connection (to one member), with the raised decoding limit.
#[derive(Clone)]
pub(crate) struct Clients {
    pub client: Client,
    pub kv: KvClient,
    pub watch: WatchClient,
    pub lease: LeaseClient,
    /// The endpoint (`http://host:port`) these clients talk to.
    pub endpoint: String,
}

/// The state shared by the registry handle and its session task.
pub(crate) struct Inner {
    pub url: Url,
    /// The registry URL for messages (password hidden).
    pub label: String,
    pub opts: Options,
    /// The clients of the member the registry uses now (`None` while there is none).
    pub clients: RwLock<Option<Clients>>,
    /// The index (in `opts.endpoints`) of the member `clients` talk to.
    pub member: AtomicUsize,
    /// The current lease; 0 while there is none.
    pub lease: AtomicI64,
    /// The TTL etcd granted the current lease, in ms (the requested one until a grant).
    pub ttl_ms: AtomicU64,
    pub available: AtomicBool,
    pub destroyed: AtomicBool,
    pub events: broadcast::Sender<RegistryEvent>,
    /// (URL, listener) -> subscription.
    pub subs: Mutex<HashMap<(Url, usize), Sub>>,
    /// watch id -> the one watch of a prefix (shared by the subscriptions that need it).
    pub watches: Mutex<HashMap<i64, WatchState>>,
    /// The lists of every subscription, fed by the watches and reads.
    pub keeper: ListKeeper,
    pub next_watch_id: AtomicI64,
    pub cmds: mpsc::UnboundedSender<Cmd>,
    pub shutdown: watch::Sender<bool>,
    /// The session task, joined by `destroy`.
    pub session: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Retry tasks of refused watches alive (at most one per watch).
    pub refused_retries: Arc<AtomicUsize>,
    /// Reads done again after a failure (a refused watch's, a failed or too large resync's).
    pub reads_again: AtomicU64,
    /// Watch creations etcd refused.
    pub refusals: AtomicU64,
}

impl Inner {
    pub fn new(url: Url, opts: Options, cmds: mpsc::UnboundedSender<Cmd>, first: i64) -> Inner {
        let label = url.to_identity_string_redacted();
        Inner {
            keeper: ListKeeper::with_global_revisions(label.clone()),
            label,
            url,
            clients: RwLock::new(None),
            member: AtomicUsize::new(0),
            lease: AtomicI64::new(0),
            ttl_ms: AtomicU64::new(u64::try_from(opts.ttl_secs).unwrap_or(1) * 1000),
            available: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            events: broadcast::channel(64).0,
            subs: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            next_watch_id: AtomicI64::new(first),
            cmds,
            shutdown: watch::channel(false).0,
            session: Mutex::new(None),
            refused_retries: Arc::new(AtomicUsize::new(0)),
            reads_again: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            opts,
        }
    }

    pub fn clients(&self) -> Option<Clients> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_clients(&self, c: Option<Clients>) {
        *self.clients.write().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// The lease's TTL as etcd granted it (it may grant more than requested, never less).
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Acquire).max(1000))
    }

    /// How often the lease is renewed: a third of the granted TTL.
    pub fn keep_alive_period(&self) -> Duration {
        (self.ttl() / 3).max(Duration::from_millis(100))
    }

    /// How long one page of a list read should take: half a step shared by the background
    /// reads that may run at once ([`crate::session::READ_CONCURRENCY`]), so that what waits
    /// behind one page of each on a slow link (a keep-alive answer, a step) still meets its
    /// deadline.
    pub fn page_time(&self) -> Duration {
        let reads = u32::try_from(crate::session::READ_CONCURRENCY).unwrap_or(u32::MAX);
        self.step_timeout() / 2 / reads
    }

    /// The deadline of one step of (re-)establishing the session (connect, authenticate,
    /// grant, renew, sentinel put, watch open): a sixth of the granted TTL, at most the
    /// request timeout. A member that does not answer within it is left for the next one, so
    /// several steps, and a move to another member, fit inside the lease.
    pub fn step_timeout(&self) -> Duration {
        (self.ttl() / 6).max(MIN_STEP).min(self.opts.timeout)
    }

    pub fn alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            Err(Error::Destroyed {
                registry: self.label.clone(),
            })
        } else {
            Ok(())
        }
    }

    pub fn connected(&self) -> Result<Clients> {
        self.alive()?;
        self.clients().ok_or_else(|| Error::NotConnected {
            registry: self.label.clone(),
            reason: "not connected to etcd yet (connecting in the background)".to_owned(),
        })
    }

    /// Converts an operation's error; asks the session to check the lease (and the member)
    /// or the token when the error says they are gone.
    pub fn fail(&self, (e, kind): (Error, Kind)) -> Error {
        // "user name is empty" with credentials: the request went out without a token (it is
        // being renewed); like etcd's Go client, authenticate again and retry.
        if kind == Kind::Denied
            && self.opts.user.is_some()
            && e.to_string().contains("user name is empty")
        {
            let _ = self.cmds.send(Cmd::Reauthenticate);
            return Error::Backend {
                registry: self.label.clone(),
                message: e.to_string(),
                retryable: true,
                source: Some(Box::new(e)),
            };
        }
        match kind {
            // A time-out or an unavailable member: the session checks the member at once
            // (a keep-alive that goes unanswered moves it to another member).
            Kind::LeaseNotFound | Kind::Transient => {
                let _ = self.cmds.send(Cmd::CheckLease);
            }
            Kind::TokenInvalid => {
                let _ = self.cmds.send(Cmd::Reauthenticate);
            }
            _ => {}
        }
        e
    }

    pub fn emit(&self, e: RegistryEvent) {
        if self.destroyed.load(Ordering::Acquire) {
            return;
        }
        tracing::info!(registry = %self.label, event = ?e, "etcd registry event");
        let _ = self.events.send(e);
    }

    /// A range read of `prefix`: the parsed entries (service, category, URL) and the read's
    /// revision. Read in pages, all at the revision of the first, each page bounded by
    /// `timeout` on its own: a large list on a slow link is read as long as it makes progress,
    /// and a stalled read still fails within one `timeout`. Pages start at [`FIRST_PAGE`] keys
    /// and double up to [`READ_PAGE`] while they come back within a quarter of
    /// [`Self::page_time`]; a slower page makes the next one smaller so that it would take
    /// about that time. Only one page of a read is in flight, and the background reads run at
    /// most [`crate::session::READ_CONCURRENCY`] at once, so on a slow link a keep-alive
    /// answer or a step of the session waits behind at most one page of each (half a step
    /// together), within its deadline; reads of subscriptions being made add their pages.
    pub async fn read(
        &self,
        clients: &Clients,
        prefix: &str,
        scope: &Scope,
    ) -> std::result::Result<(Entries, i64), (Error, Kind)> {
        let mut kv = clients.kv.clone();
        let end = prefix_end(prefix.as_bytes());
        let mut from: Vec<u8> = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut entries = Entries::new();
        let mut pages = Pages::new();
        let target = self.page_time();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_keys_only()
                .with_limit(pages.page);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let sent = tokio::time::Instant::now();
            let resp = match errors::timed(
                &self.label,
                || format!("reading {prefix}"),
                self.opts.timeout,
                kv.get(from.clone(), Some(options)),
            )
            .await
            {
                Ok(resp) => resp,
                // A page over the decoding limit (long keys, or a small
                // `etcd.max-message-size`): the same page in halves.
                Err((Error::TooLarge { .. }, _)) if pages.too_large() => continue,
                Err(e) => return Err(e),
            };
            pages.took(sent.elapsed(), target);
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            entries.extend(parse_entries(
                &self.label,
                prefix,
                scope,
                resp.kvs().iter().map(|kv| kv.key()),
            ));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((entries, revision)),
            }
        }
    }
}

/// Reads at most one key under `prefix` within `within`: whether the member answers, and
/// whether we may read there.
pub(crate) async fn probe(
    label: &str,
    kv: &mut KvClient,
    prefix: &str,
    within: Duration,
) -> std::result::Result<(), (Error, Kind)> {
    errors::timed(
        label,
        || format!("reading {prefix}"),
        within,
        kv.get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_limit(1),
            ),
        ),
    )
    .await
    .map(|_| ())
}

/// The most keys per page of a list read (keys only: ~2 MB of Dubbo keys, so `timeout` bounds
/// a page on links down to ~0.4 MB/s). Not more pages than needed: etcd counts the keys left
/// in the range for every page, so a read costs O(keys x pages).
const READ_PAGE: i64 = 4096;
/// The first page of a list read: small, so that a slow link is found out before a page that
/// takes seconds (a fast link doubles it up to [`READ_PAGE`] in a few round trips).
const FIRST_PAGE: i64 = 256;
/// The fewest keys per page when pages are made smaller for a slow link.
const MIN_PAGE: i64 = 64;

/// The size of the next page after one of `page` keys took `took`, for pages of about
/// `target` each: doubled (up to [`READ_PAGE`]) when it took under a quarter of `target`,
/// scaled down (not under [`MIN_PAGE`]) when it took longer than `target`.
fn next_page(page: i64, took: Duration, target: Duration) -> i64 {
    if took > target {
        let scaled = page as f64 * target.as_secs_f64() / took.as_secs_f64();
        (scaled as i64).clamp(MIN_PAGE.min(page), page)
    } else if took < target / 4 {
        (page * 2).min(READ_PAGE)
    } else {
        page
    }
}

/// The page size of one list read.
struct Pages {
    /// Keys in the next page.
    page: i64,
    /// The most keys a page may have: lowered to the halved size when a page was over the
    /// decoding limit, so that a fast page does not double it over the limit again.
    ceiling: i64,
}

impl Pages {
    fn new() -> Pages {
        Pages {
            page: FIRST_PAGE,
            ceiling: READ_PAGE,
        }
    }

    /// A page of `page` keys was over the decoding limit: the same page in halves, and no
    /// page larger than that for the rest of the read. `false` when it was a single key.
    fn too_large(&mut self) -> bool {
        if self.page <= 1 {
            return false;
        }
        self.page /= 2;
        self.ceiling = self.page;
        true
    }

    /// A page came back after `took`: the next one sized for pages of about `target`.
    fn took(&mut self, took: Duration, target: Duration) {
        self.page = next_page(self.page, took, target).min(self.ceiling);
    }
}

/// The end of the range of keys starting with `prefix` (etcd's rule: the prefix with its last
/// byte below 0xff incremented; every key when there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Connects to the one member at `endpoint`: builds its clients (authenticating when the URL
/// has credentials) within `within`. Every request carries etcd's require-leader flag, so a
/// member cut off from the majority refuses requests and ends streams instead of hanging or
/// going silent; HTTP/2 keep-alive pings notice a frozen member under a watch stream.
pub(crate) async fn connect(
    inner: &Inner,
    endpoint: &str,
    within: Duration,
) -> std::result::Result<Clients, (Error, Kind)> {
    let o = &inner.opts;
    let base = ConnectOptions::new()
        .with_timeout(o.timeout)
        .with_connect_timeout(within)
        .with_keep_alive(HTTP2_PING_INTERVAL, within.max(Duration::from_secs(1)))
        .with_keep_alive_while_idle(false)
        .with_require_leader(true);
    let connect_with = |options: ConnectOptions| {
        errors::timed(
            &inner.label,
            || format!("connecting to {endpoint}"),
            within,
            Client::connect([endpoint], Some(options)),
        )
    };
    let client = match &o.user {
        Some((user, password)) => {
            let with_user = base.clone().with_user(user.clone(), password.clone());
            match connect_with(with_user).await {
                Err((e, _)) if e.to_string().contains("authentication is not enabled") => {
                    tracing::warn!(
                        registry = %inner.label,
                        "etcd has authentication off: connecting without the user name and password of the URL"
                    );
                    connect_with(base).await?
                }
                other => other?,
            }
        }
        None => connect_with(base).await?,
    };
    let kv = client
        .kv_client()
        .max_decoding_message_size(o.max_message_size);
    let watch = client
        .watch_client()
        .max_decoding_message_size(o.max_message_size);
    let lease = client.lease_client();
    Ok(Clients {
        client,
        kv,
        watch,
        lease,
        endpoint: endpoint.to_owned(),
    })
}

/// Grants a lease of the configured TTL within `within`; records the TTL etcd granted.
pub(crate) async fn grant(
    inner: &Inner,
    clients: &Clients,
    within: Duration,
) -> std::result::Result<i64, (Error, Kind)> {
    let mut lease = clients.lease.clone();
    let resp = errors::timed(
        &inner.label,
        || {
            format!(
                "granting a lease of {} s at {}",
                inner.opts.ttl_secs, clients.endpoint
            )
        },
        within,
        lease.grant(inner.opts.ttl_secs, None),
    )
    .await?;
    if !resp.error().is_empty() {
        return Err((
            Error::backend(
                &inner.url,
                format!("granting a lease: {}", resp.error()),
                true,
            ),
            Kind::Transient,
        ));
    }
    if resp.ttl() != inner.opts.ttl_secs {
        tracing::info!(
            registry = %inner.label,
            requested = inner.opts.ttl_secs,
            granted = resp.ttl(),
            "etcd granted a lease TTL other than the requested one; using the granted one"
        );
    }
    inner.ttl_ms.store(
        u64::try_from(resp.ttl().max(1)).unwrap_or(1) * 1000,
        Ordering::Release,
    );
    Ok(resp.id())
}

#[cfg(test)]
mod tests {
    use super::{FIRST_PAGE, MIN_PAGE, Pages, READ_PAGE, next_page, prefix_end};
    use std::time::Duration;

    #[test]
    fn pages_grow_on_a_fast_link_and_shrink_on_a_slow_one() {
        let target = Duration::from_millis(250);
        let fast = Duration::from_millis(10);
        let mut page = FIRST_PAGE;
        for _ in 0..10 {
            page = next_page(page, fast, target);
        }
        assert_eq!(page, READ_PAGE);
        // 4096 keys in 2 s (a 1 MB/s link): about 250 ms worth next.
        assert_eq!(next_page(4096, Duration::from_secs(2), target), 512);
        assert_eq!(next_page(512, Duration::from_millis(200), target), 512);
        assert_eq!(next_page(100, Duration::from_secs(10), target), MIN_PAGE);
        assert_eq!(next_page(10, Duration::from_secs(10), target), 10);
    }

    #[test]
    fn a_page_over_the_limit_is_halved_and_stays_under_it_for_the_rest_of_the_read() {
        let target = Duration::from_millis(250);
        let fast = Duration::from_millis(10);
        let mut pages = Pages::new();
        for _ in 0..10 {
            pages.took(fast, target);
        }
        assert_eq!(pages.page, READ_PAGE);
        assert!(pages.too_large());
        assert!(pages.too_large());
        assert_eq!(pages.page, READ_PAGE / 4);
        // Fast pages after that: no doubling back over the limit.
        for _ in 0..10 {
            pages.took(fast, target);
            assert_eq!(pages.page, READ_PAGE / 4);
        }
        // A slow page still makes the next one smaller, and fast ones grow it back up to the
        // ceiling only.
        pages.took(Duration::from_secs(1), target);
        assert_eq!(pages.page, READ_PAGE / 16);
        for _ in 0..10 {
            pages.took(fast, target);
        }
        assert_eq!(pages.page, READ_PAGE / 4);
        // Down to one key, then no further.
        while pages.page > 1 {
            assert!(pages.too_large());
        }
        assert!(!pages.too_large());
        pages.took(fast, target);
        assert_eq!(pages.page, 1);
    }

    #[test]
    fn the_range_of_a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/dubbo/a/"), b"/dubbo/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
