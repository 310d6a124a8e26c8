//! Real ZooKeeper and etcd servers for tests: each on free loopback ports, in its own
//! temporary directory, killed and removed on drop. Fault tests stop and restart them
//! ([`Server::stop`], [`Server::start`]) with the same ports and data.
//!
//! Servers come from Debian's packages (`zookeeper`, `etcd-server`). [`ensure_installed`]
//! installs them with apt when they are missing and the process runs as root; otherwise it
//! says exactly what to install.
//!
//! Tests find the shared servers that `cargo xtask test` starts through the environment:
//! [`ZOOKEEPER_ENV`] and [`ETCD_ENV`] hold their addresses; with [`REQUIRE_ENV`]`=1` a test
//! that finds no server fails instead of skipping.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod cluster;
mod proxy;
mod relay;

pub use cluster::{Cluster, ClusterOptions, MemberState};
pub use proxy::Proxy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable with the address (`127.0.0.1:port`) of a running ZooKeeper.
pub const ZOOKEEPER_ENV: &str = "REGISTRY_TEST_ZOOKEEPER";
/// Environment variable with the address (`127.0.0.1:port`) of a running etcd.
pub const ETCD_ENV: &str = "REGISTRY_TEST_ETCD";
/// With this set to `1`, a test whose server is missing fails instead of skipping.
pub const REQUIRE_ENV: &str = "REGISTRY_TEST_REQUIRE";

const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Apache ZooKeeper (Debian package `zookeeper`).
    Zookeeper,
    /// etcd (Debian package `etcd-server`).
    Etcd,
}

impl Kind {
    fn package(self) -> &'static str {
        match self {
            Kind::Zookeeper => "zookeeper",
            Kind::Etcd => "etcd-server",
        }
    }

    fn installed(self) -> bool {
        match self {
            Kind::Zookeeper => Path::new(ZOOKEEPER_JAR).is_file() && find_program("java").is_some(),
            Kind::Etcd => find_program("etcd").is_some(),
        }
    }
}

/// The address of the shared server of `kind` from the environment, if any. When there is
/// none and [`REQUIRE_ENV`] is `1`, panics with the variable to set; otherwise prints why the
/// caller skips and returns `None`.
pub fn shared_address(kind: Kind, test: &str) -> Option<String> {
    let var = match kind {
        Kind::Zookeeper => ZOOKEEPER_ENV,
        Kind::Etcd => ETCD_ENV,
    };
    match std::env::var(var) {
        Ok(a) if !a.trim().is_empty() => Some(a.trim().to_owned()),
        _ => {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!(
                    "{test}: {var} is not set but {REQUIRE_ENV}=1; run through `cargo xtask test`"
                );
            }
            eprintln!("{test}: skipped, {var} is not set (run through `cargo xtask test`)");
            None
        }
    }
}

/// Whether tests must fail rather than skip when a server cannot be had.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).as_deref() == Ok("1")
}

/// Makes sure the packages for `kinds` are installed: installs the missing ones with
/// `apt-get` when running as root, else returns an error that names what to install.
pub fn ensure_installed(kinds: &[Kind]) -> Result<(), String> {
    let missing: Vec<&str> = kinds
        .iter()
        .filter(|k| !k.installed())
        .map(|k| k.package())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let wanted = missing.join(" ");
    if !is_root || find_program("apt-get").is_none() {
        return Err(format!(
            "missing servers: install Debian's packages with `sudo apt-get install -y {wanted}`"
        ));
    }
    eprintln!("installing {wanted} with apt-get");
    let run = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))
    };
    let mut status = run(&["install", "-y", "-q"]
        .iter()
        .copied()
        .chain(missing.iter().copied())
        .collect::<Vec<_>>())?;
    if !status.success() {
        // A fresh machine may have no package lists yet.
        run(&["update", "-q"])?;
        status = run(&["install", "-y", "-q"]
            .iter()
            .copied()
            .chain(missing.iter().copied())
            .collect::<Vec<_>>())?;
    }
    if !status.success() {
        return Err(format!("`apt-get install -y {wanted}` failed ({status})"));
    }
    match kinds.iter().find(|k| !k.installed()) {
        Some(k) => Err(format!(
            "{} is still missing after apt-get install",
            k.package()
        )),
        None => Ok(()),
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, String> {
    Ok(free_ports::<1>()?[0])
}

/// `N` distinct free TCP ports on 127.0.0.1 (all sockets are held until every port is chosen,
/// so the same port cannot come back twice).
pub fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for p in &mut ports {
        let l =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free loopback port: {e}"))?;
        *p = l.local_addr().map_err(|e| e.to_string())?.port();
        held.push(l);
    }
    Ok(ports)
}

/// Whether a server's log says its port was taken between choosing and binding it.
fn port_taken(log: &str) -> bool {
    let l = log.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("bindexception")
}

/// A running (or stopped) server process with its own directory.
pub struct Server {
    kind: Kind,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tick_ms: u32,
}

/// Options of a ZooKeeper server.
#[derive(Debug, Clone, Copy)]
pub struct ZookeeperOptions {
    /// `tickTime`; sessions may last 2 to 20 ticks.
    pub tick_ms: u32,
}

impl Default for ZookeeperOptions {
    fn default() -> Self {
        // 20 ticks of 3 s allow the default 60 s session; 2 ticks allow 6 s ones for tests.
        ZookeeperOptions { tick_ms: 3000 }
    }
}

impl Server {
    /// Starts ZooKeeper with default options.
    pub fn zookeeper() -> Result<Server, String> {
        Server::zookeeper_with(ZookeeperOptions::default())
    }

    /// Starts ZooKeeper (standalone) on a free port.
    pub fn zookeeper_with(options: ZookeeperOptions) -> Result<Server, String> {
        Server::new(Kind::Zookeeper, options.tick_ms)
    }

    /// Starts etcd on free client and peer ports.
    pub fn etcd() -> Result<Server, String> {
        Server::new(Kind::Etcd, 0)
    }

    fn new(kind: Kind, tick_ms: u32) -> Result<Server, String> {
        ensure_installed(&[kind])?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("registry-test-{kind:?}-").to_lowercase())
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let [client_port, peer_port] = free_ports::<2>()?;
        let mut s = Server {
            kind,
            dir,
            client_port,
            peer_port,
            child: None,
            tick_ms,
        };
        // Another process may take a chosen port before the server binds it: choose again.
        let mut tries = 0;
        loop {
            if kind == Kind::Zookeeper {
                s.write_zoo_cfg()?;
            }
            match s.start() {
                Ok(()) => return Ok(s),
                Err(e) if tries < 4 && port_taken(&e) => {
                    tries += 1;
                    s.stop();
                    [s.client_port, s.peer_port] = free_ports::<2>()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_zoo_cfg(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data)
            .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
        let cfg = format!(
            "tickTime={}\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n4lw.commands.whitelist=*\nmaxClientCnxns=0\n",
            self.tick_ms,
            data.display(),
            self.client_port
        );
        std::fs::write(self.dir.path().join("zoo.cfg"), cfg)
            .map_err(|e| format!("cannot write zoo.cfg: {e}"))
    }

    /// The client address, `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The server's directory (data and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Which server this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Starts the process (again, with the same ports and data) and waits until it serves.
    pub fn start(&mut self) -> Result<(), String> {
        if self.is_running() {
            return Ok(());
        }
        let log = std::fs::File::create(self.dir.path().join("server.log"))
            .map_err(|e| format!("cannot create the server log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = match self.kind {
            Kind::Zookeeper => {
                let mut c = Command::new(find_program("java").ok_or("java not found")?);
                c.arg("-cp")
                    .arg(format!("{}:{ZOOKEEPER_JAR}", self.dir.path().display()))
                    .arg(format!("-Dzookeeper.log.dir={}", self.dir.path().display()))
                    // ZooKeeper's own default heap (zkEnv.sh): 256 MB ran out with 100,000
                    // ~400-byte nodes and their get_children reply; an out-of-memory error
                    // ends the server with its reason in server.log.
                    .arg("-Xmx1g")
                    .arg("-XX:+ExitOnOutOfMemoryError")
                    .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                    .arg(self.dir.path().join("zoo.cfg"));
                c
            }
            Kind::Etcd => {
                let mut c = Command::new(find_program("etcd").ok_or("etcd not found")?);
                let client = format!("http://127.0.0.1:{}", self.client_port);
                let peer = format!("http://127.0.0.1:{}", self.peer_port);
                c.arg("--name")
                    .arg("test")
                    .arg("--data-dir")
                    .arg(self.dir.path().join("data"))
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
                    .arg("0");
                c
            }
        };
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.kind))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let addr: SocketAddr = self
            .address()
            .parse()
            .map_err(|e| format!("bad address: {e}"))?;
        loop {
            if self.probe(&addr) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!(
                    "{:?} exited at start; its log:\n{}",
                    self.kind,
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{:?} did not serve on {} within {within:?}; its log:\n{}",
                    self.kind,
                    self.address(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn probe(&self, addr: &SocketAddr) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(500)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let (request, expect): (&[u8], &str) = match self.kind {
            Kind::Zookeeper => (b"ruok", "imok"),
            Kind::Etcd => (
                b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
                "\"health\":\"true\"",
            ),
        };
        if s.write_all(request).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains(expect)
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kills the process (as a crash would) and waits for it to exit. Data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
