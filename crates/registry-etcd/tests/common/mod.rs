//! Helpers of the etcd tests: a raw etcd client, a registry event log, and a TCP proxy that
//! can cut the connection between a registry and a real etcd (a network partition).

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use registry_core::{Registry, RegistryEvent, RegistryManager};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Logs of the code under test, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A raw etcd client (no registry code) on `address`.
pub async fn raw(address: &str) -> Client {
    raw_as(address, None).await
}

/// A raw etcd client, authenticated when `user` is given.
pub async fn raw_as(address: &str, user: Option<(&str, &str)>) -> Client {
    let options = user.map(|(u, p)| etcd_client::ConnectOptions::new().with_user(u, p));
    Client::connect([format!("http://{address}")], options)
        .await
        .unwrap_or_else(|e| panic!("raw etcd client on {address}: {e}"))
}

/// A new registry instance (its own lease) for `url`.
pub async fn registry(url: &str) -> Arc<dyn Registry> {
    RegistryManager::new()
        .get_registry(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Records a registry's events with the time they arrived.
#[derive(Clone)]
pub struct EventLog {
    seen: Arc<Mutex<Vec<(Instant, RegistryEvent)>>>,
}

impl EventLog {
    pub fn attach(r: &Arc<dyn Registry>) -> EventLog {
        let log = EventLog {
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let mut rx = r.events();
        let seen = log.seen.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => seen.lock().unwrap().push((Instant::now(), e)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            }
        });
        log
    }

    pub fn events(&self) -> Vec<RegistryEvent> {
        self.seen.lock().unwrap().iter().map(|(_, e)| *e).collect()
    }

    /// When `e` was first seen after `since`.
    pub fn first_after(&self, e: RegistryEvent, since: Instant) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(t, x)| *x == e && *t >= since)
            .map(|(t, _)| *t)
    }

    /// Waits until `e` is seen after `since`; returns when.
    pub async fn wait_for(&self, e: RegistryEvent, since: Instant, deadline: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if let Some(t) = self.first_after(e, since) {
                return t;
            }
            if start.elapsed() > deadline {
                panic!(
                    "timed out after {deadline:?} waiting for {e:?}; events: {:?}",
                    self.events()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A TCP proxy in front of a real server. `cut()` drops every connection and refuses new
/// ones (a partition); `heal()` lets connections through again.
pub struct Proxy {
    address: String,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let address = listener.local_addr().expect("proxy address").to_string();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let (o, c) = (open.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let up = upstream.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(&up).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            address,
            open,
            conns,
            task,
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// The lease of `key` (0: none), or `None` when the key does not exist.
pub async fn lease_of(raw: &mut Client, key: &str) -> Option<i64> {
    let resp = raw.get(key, None).await.expect("raw get");
    resp.kvs().first().map(|kv| kv.lease())
}

/// Every key under `prefix`.
pub async fn keys_under(raw: &mut Client, prefix: &str) -> Vec<String> {
    let resp = raw
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("raw get");
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}
