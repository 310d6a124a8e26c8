//! Helpers of the etcd tests: a raw etcd client, a registry event log, and (from the test
//! servers crate) a TCP proxy that can cut the connection between a registry and a real etcd.

#![allow(dead_code)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use registry_core::{Registry, RegistryEvent, RegistryManager};

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

#[allow(unused_imports)]
pub use registry_test_servers::Proxy;

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

/// An etcd process started by the test itself, with the flags registry-test-servers uses plus
/// `extra` (for options that crate does not offer, such as `--auth-token-ttl`). Killed, and its
/// directory removed, on drop.
pub struct OwnEtcd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    address: String,
}

impl OwnEtcd {
    /// Starts etcd with `extra` flags and waits until it serves; `None` (after a message)
    /// when it cannot be started and the servers are not required.
    pub fn start(test: &str, extra: &[&str]) -> Option<OwnEtcd> {
        init_tracing();
        let mut last = String::new();
        for _ in 0..3 {
            match OwnEtcd::try_start(extra) {
                Ok(e) => return Some(e),
                Err(e) => last = e,
            }
        }
        if registry_test_servers::required() {
            panic!("{test}: cannot start etcd: {last}");
        }
        eprintln!("{test}: skipped, cannot start etcd: {last}");
        None
    }

    fn try_start(extra: &[&str]) -> Result<OwnEtcd, String> {
        use std::io::{Read, Write};
        registry_test_servers::ensure_installed(&[registry_test_servers::Kind::Etcd])?;
        let [client_port, peer_port] = registry_test_servers::free_ports::<2>()?;
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "registry-etcd-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = std::process::Command::new("etcd")
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .arg("--auto-compaction-retention")
            .arg("0")
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start etcd: {e}"))?;
        let mut me = OwnEtcd {
            child,
            dir,
            address: format!("127.0.0.1:{client_port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(&me.address) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.contains("\"health\":\"true\"") {
                    return Ok(me);
                }
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                let log = std::fs::read_to_string(me.dir.join("server.log")).unwrap_or_default();
                return Err(format!("etcd exited ({status}) at start: {log}"));
            }
            if Instant::now() > deadline {
                return Err("etcd did not serve within 60 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn address(&self) -> String {
        self.address.clone()
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Adds the user `root` / `rootpw` with the `root` role (what etcd needs before its
/// authentication can be turned on).
pub async fn add_root(rawc: &mut etcd_client::Client) {
    rawc.user_add("root", "rootpw", None)
        .await
        .expect("user add");
    let _ = rawc.role_add("root").await;
    rawc.user_grant_role("root", "root")
        .await
        .expect("grant role");
}

/// Turns authentication on with the user `root` / `rootpw`.
pub async fn enable_auth(address: &str) {
    let mut rawc = raw(address).await;
    add_root(&mut rawc).await;
    rawc.auth_enable().await.expect("auth enable");
}
