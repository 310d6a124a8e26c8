//! [`Cluster`]: a 3-member etcd cluster or a 3-server ZooKeeper ensemble on loopback, with
//! the faults a test injects into one member: kill -9 and restart (same data), SIGSTOP and
//! SIGCONT, a silent cut from its peers while clients still reach it, and a delay of the
//! peer traffic it receives (a follower that lags behind).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::relay::{Net, Relay, lock};
use crate::{
    Kind, ZOOKEEPER_JAR, ensure_installed, find_program, free_ports, port_taken, required,
};

/// Options of a [`Cluster`].
#[derive(Debug, Clone, Copy)]
pub struct ClusterOptions {
    /// Number of members (3 or 5 make sense).
    pub members: usize,
    /// ZooKeeper `tickTime` in milliseconds: sessions may last 2 to 20 ticks, a follower
    /// is dropped after `syncLimit` (5) ticks without an answer.
    pub tick_ms: u32,
    /// etcd `--heartbeat-interval` in milliseconds.
    pub heartbeat_ms: u32,
    /// etcd `--election-timeout` in milliseconds.
    pub election_ms: u32,
    /// etcd `--pre-vote` (the default from etcd 3.5 on): an isolated member does not
    /// disturb the leader when it comes back.
    pub pre_vote: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            members: 3,
            tick_ms: 500,
            heartbeat_ms: 100,
            election_ms: 1000,
            pre_vote: true,
        }
    }
}

/// What a member says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// It leads a quorum.
    Leader,
    /// It follows a leader.
    Follower,
    /// It runs and answers but has no leader (no quorum, or an election is going on).
    NoLeader,
    /// It runs but does not answer (paused, or busy starting).
    Unresponsive,
    /// Its process is not running.
    Down,
}

struct Member {
    dir: PathBuf,
    client_port: u16,
    /// etcd: the peer port; ZooKeeper: the quorum and election ports.
    peer_ports: Vec<u16>,
    child: Option<Child>,
    paused: bool,
}

/// A cluster of real servers on loopback. Each member's peer ports are reached by the others
/// through relays (see [`Cluster::isolate`]); clients connect straight to the client ports.
/// Every process is killed and the directory removed on drop, and also when the owning
/// process dies without dropping it (a watchdog process waits for that).
pub struct Cluster {
    kind: Kind,
    options: ClusterOptions,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    net: Arc<Net>,
    relays: Vec<Relay>,
    /// For each member, the relay ports the others dial (etcd: peer; ZooKeeper: quorum,
    /// election).
    relay_ports: Vec<Vec<u16>>,
    watchdog: Option<(Child, ChildStdin)>,
    token: String,
}

const WATCHDOG: &str = r#"read _ignored; for p in $(cat "$1/pids" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done; rm -rf "$1""#;

impl Cluster {
    /// Starts a 3-member etcd cluster with default options.
    pub fn etcd() -> Result<Cluster, String> {
        Cluster::start(Kind::Etcd, ClusterOptions::default())
    }

    /// Starts a 3-server ZooKeeper ensemble with default options.
    pub fn zookeeper() -> Result<Cluster, String> {
        Cluster::start(Kind::Zookeeper, ClusterOptions::default())
    }

    /// Starts a cluster of `kind` and waits until it has a leader and every member serves.
    pub fn start(kind: Kind, options: ClusterOptions) -> Result<Cluster, String> {
        if options.members == 0 {
            return Err("a cluster needs at least one member".into());
        }
        ensure_installed(&[kind])?;
        let mut tries = 0;
        loop {
            match Cluster::try_start(kind, options) {
                Ok(c) => return Ok(c),
                // Another process took a chosen port before a member bound it.
                Err(e) if tries < 3 && port_taken(&e) => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(kind: Kind, options: ClusterOptions) -> Result<Cluster, String> {
        let n = options.members;
        let dir = tempfile::Builder::new()
            .prefix(&format!("registry-test-{kind:?}-cluster-").to_lowercase())
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let net = Arc::new(Net::new(n));
        let peers_per_member = match kind {
            Kind::Etcd => 1,
            Kind::Zookeeper => 2,
        };
        let mut members = Vec::with_capacity(n);
        let mut relays = Vec::new();
        let mut relay_ports = Vec::with_capacity(n);
        for i in 0..n {
            let ports = free_ports::<3>()?;
            let mdir = dir.path().join(format!("member{}", i + 1));
            std::fs::create_dir_all(mdir.join("data"))
                .map_err(|e| format!("cannot create {}: {e}", mdir.display()))?;
            let peer_ports = ports[1..=peers_per_member].to_vec();
            let mut mine = Vec::new();
            for p in &peer_ports {
                let r = Relay::start(net.clone(), i, *p)?;
                mine.push(r.port());
                relays.push(r);
            }
            relay_ports.push(mine);
            members.push(Member {
                dir: mdir,
                client_port: ports[0],
                peer_ports,
                child: None,
                paused: false,
            });
        }
        let (watchdog, stdin) = {
            let mut c = Command::new("sh")
                .arg("-c")
                .arg(WATCHDOG)
                .arg("watchdog")
                .arg(dir.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start the cluster's watchdog (sh): {e}"))?;
            let stdin = c.stdin.take().ok_or("no stdin for the watchdog")?;
            (c, stdin)
        };
        let token = dir
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "registry-test".into());
        let mut c = Cluster {
            kind,
            options,
            dir,
            members,
            net,
            relays,
            relay_ports,
            watchdog: Some((watchdog, stdin)),
            token,
        };
        if kind == Kind::Zookeeper {
            for i in 0..n {
                c.write_zoo_cfg(i)?;
            }
        }
        for i in 0..n {
            c.spawn(i)?;
        }
        for i in 0..n {
            c.wait_process_serves(i, Duration::from_secs(60))?;
        }
        c.wait_healthy(Duration::from_secs(60))?;
        Ok(c)
    }

    fn write_zoo_cfg(&self, i: usize) -> Result<(), String> {
        let m = &self.members[i];
        let data = m.dir.join("data");
        std::fs::write(data.join("myid"), format!("{}\n", i + 1))
            .map_err(|e| format!("cannot write myid: {e}"))?;
        let mut cfg = format!(
            "tickTime={}\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\n\
             clientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=*\n\
             maxClientCnxns=0\nreconfigEnabled=false\nstandaloneEnabled=false\n",
            self.options.tick_ms,
            data.display(),
            m.client_port
        );
        for j in 0..self.members.len() {
            // A server binds its own entry; it reaches the others through their relays.
            let ports = if j == i {
                &self.members[j].peer_ports
            } else {
                &self.relay_ports[j]
            };
            cfg.push_str(&format!(
                "server.{}=127.0.0.1:{}:{}\n",
                j + 1,
                ports[0],
                ports[1]
            ));
        }
        std::fs::write(m.dir.join("zoo.cfg"), cfg).map_err(|e| format!("cannot write zoo.cfg: {e}"))
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.join("server.log"))
            .map_err(|e| format!("cannot open the server log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = match self.kind {
            Kind::Zookeeper => {
                let mut c = Command::new(find_program("java").ok_or("java not found")?);
                c.arg("-cp")
                    .arg(format!("{}:{ZOOKEEPER_JAR}", m.dir.display()))
                    .arg(format!("-Dzookeeper.log.dir={}", m.dir.display()))
                    .args([
                        "-Xmx128m",
                        "-Xss512k",
                        "-XX:+UseSerialGC",
                        "-XX:TieredStopAtLevel=1",
                        "-Djava.net.preferIPv4Stack=true",
                        "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                    ])
                    .arg(m.dir.join("zoo.cfg"));
                c
            }
            Kind::Etcd => {
                let mut c = Command::new(find_program("etcd").ok_or("etcd not found")?);
                let client = format!("http://127.0.0.1:{}", m.client_port);
                let initial: Vec<String> = (0..self.members.len())
                    .map(|j| format!("m{}=http://127.0.0.1:{}", j + 1, self.relay_ports[j][0]))
                    .collect();
                c.arg("--name")
                    .arg(format!("m{}", i + 1))
                    .arg("--data-dir")
                    .arg(m.dir.join("data"))
                    .arg("--listen-client-urls")
                    .arg(&client)
                    .arg("--advertise-client-urls")
                    .arg(&client)
                    .arg("--listen-peer-urls")
                    .arg(format!("http://127.0.0.1:{}", m.peer_ports[0]))
                    .arg("--initial-advertise-peer-urls")
                    .arg(format!("http://127.0.0.1:{}", self.relay_ports[i][0]))
                    .arg("--initial-cluster")
                    .arg(initial.join(","))
                    .arg("--initial-cluster-state")
                    .arg("new")
                    .arg("--initial-cluster-token")
                    .arg(&self.token)
                    .arg("--heartbeat-interval")
                    .arg(self.options.heartbeat_ms.to_string())
                    .arg("--election-timeout")
                    .arg(self.options.election_ms.to_string())
                    .arg(format!("--pre-vote={}", self.options.pre_vote))
                    .arg("--auto-compaction-retention")
                    .arg("0");
                c
            }
        };
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?} member {i}: {e}", self.kind))?;
        self.net.set_pid(i, Some(child.id()));
        let m = &mut self.members[i];
        m.child = Some(child);
        m.paused = false;
        self.write_pids();
        Ok(())
    }

    fn write_pids(&self) {
        let pids: Vec<String> = self
            .members
            .iter()
            .filter_map(|m| m.child.as_ref().map(|c| c.id().to_string()))
            .collect();
        let tmp = self.dir.path().join("pids.tmp");
        if std::fs::write(&tmp, pids.join("\n")).is_ok() {
            let _ = std::fs::rename(tmp, self.dir.path().join("pids"));
        }
    }

    fn wait_process_serves(&mut self, i: usize, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if self.probe_alive(i) {
                return Ok(());
            }
            if !self.is_running(i) {
                return Err(format!(
                    "{:?} member {i} exited at start; its log:\n{}",
                    self.kind,
                    self.log_tail(i)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{:?} member {i} did not serve on {} within {within:?}; its log:\n{}",
                    self.kind,
                    self.address(i),
                    self.log_tail(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the member's client port accepts a connection and answers.
    fn probe_alive(&self, i: usize) -> bool {
        match self.kind {
            Kind::Zookeeper => self
                .ask(i, b"ruok", None)
                .is_some_and(|r| r.contains("imok")),
            Kind::Etcd => self
                .ask(i, b"GET /version HTTP/1.0\r\n\r\n", None)
                .is_some_and(|r| r.contains("etcdserver")),
        }
    }

    /// Sends `request` to member `i`'s client port and reads the whole answer.
    fn ask(&self, i: usize, request: &[u8], timeout: Option<Duration>) -> Option<String> {
        let addr: SocketAddr = self.address(i).parse().ok()?;
        let timeout = timeout.unwrap_or(Duration::from_secs(1));
        let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        s.set_write_timeout(Some(timeout)).ok()?;
        s.write_all(request).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Which server.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The options it was started with.
    pub fn options(&self) -> ClusterOptions {
        self.options
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s client address, `127.0.0.1:<port>`.
    pub fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client address.
    pub fn addresses(&self) -> Vec<String> {
        (0..self.size()).map(|i| self.address(i)).collect()
    }

    /// The client addresses joined by commas (a ZooKeeper connect string; a list of etcd
    /// endpoints).
    pub fn connect_string(&self) -> String {
        self.addresses().join(",")
    }

    /// The cluster's directory (a `memberN` directory per member, with its data and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Member `i`'s directory.
    pub fn member_dir(&self, i: usize) -> &Path {
        &self.members[i].dir
    }

    /// Member `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    /// Whether member `i`'s process runs (paused or not).
    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(
            self.members[i].child.as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }

    /// Whether member `i` is paused (SIGSTOP).
    pub fn is_paused(&self, i: usize) -> bool {
        self.members[i].paused
    }

    /// Whether member `i` is cut off from its peers.
    pub fn is_isolated(&self, i: usize) -> bool {
        self.net.is_isolated(i)
    }

    /// What member `i` says about itself (etcd: the maintenance status; ZooKeeper: `srvr`).
    pub fn state(&mut self, i: usize) -> MemberState {
        if !self.is_running(i) {
            return MemberState::Down;
        }
        match self.kind {
            Kind::Zookeeper => match self.ask(i, b"srvr", None) {
                None => MemberState::Unresponsive,
                Some(r) if r.contains("Mode: leader") => MemberState::Leader,
                Some(r) if r.contains("Mode: follower") => MemberState::Follower,
                Some(r) if r.contains("not currently serving") || r.contains("Mode:") => {
                    MemberState::NoLeader
                }
                Some(_) => MemberState::Unresponsive,
            },
            Kind::Etcd => match self.etcd_status(i) {
                None => MemberState::Unresponsive,
                Some((_, 0)) => MemberState::NoLeader,
                Some((me, leader)) if me == leader => MemberState::Leader,
                Some(_) => MemberState::Follower,
            },
        }
    }

    /// etcd member `i`'s own id and its leader's id (0: none), from the maintenance status
    /// through the client port's JSON gateway.
    fn etcd_status(&self, i: usize) -> Option<(u64, u64)> {
        let req = "POST /v3/maintenance/status HTTP/1.0\r\nContent-Type: application/json\r\n\
                   Content-Length: 2\r\n\r\n{}";
        let r = self.ask(i, req.as_bytes(), None)?;
        let body = r.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let num = |v: &serde_json::Value| -> Option<u64> {
            match v {
                serde_json::Value::String(s) => s.parse().ok(),
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::Null => Some(0),
                _ => None,
            }
        };
        let me = num(&v["header"]["member_id"])?;
        let leader = num(&v["leader"]).unwrap_or(0);
        Some((me, leader))
    }

    /// Every member's state.
    pub fn states(&mut self) -> Vec<MemberState> {
        (0..self.size()).map(|i| self.state(i)).collect()
    }

    /// The member that leads now, if exactly one says it leads and (etcd) a majority of the
    /// members name it as their leader.
    pub fn leader(&mut self) -> Option<usize> {
        match self.kind {
            Kind::Zookeeper => {
                let leaders: Vec<usize> = (0..self.size())
                    .filter(|&i| self.state(i) == MemberState::Leader)
                    .collect();
                (leaders.len() == 1).then(|| leaders[0])
            }
            Kind::Etcd => {
                let status: Vec<Option<(u64, u64)>> = (0..self.size())
                    .map(|i| {
                        if self.is_running(i) && !self.is_paused(i) {
                            self.etcd_status(i)
                        } else {
                            None
                        }
                    })
                    .collect();
                let majority = self.size() / 2 + 1;
                status.iter().enumerate().find_map(|(i, s)| {
                    let (me, leader) = (*s)?;
                    if me != leader {
                        return None;
                    }
                    let backing = status
                        .iter()
                        .filter(|o| o.is_some_and(|(_, l)| l == me))
                        .count();
                    (backing >= majority).then_some(i)
                })
            }
        }
    }

    /// Waits until there is a leader ([`Cluster::leader`]) and returns it.
    pub fn wait_leader(&mut self, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() > deadline {
                let states = self.states();
                return Err(format!(
                    "{:?} cluster has no leader after {within:?}: {states:?}",
                    self.kind
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until there is a leader and every member that runs, is not paused and not
    /// isolated leads or follows.
    pub fn wait_healthy(&mut self, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                let ok = (0..self.size()).all(|i| {
                    !self.is_running(i)
                        || self.is_paused(i)
                        || self.is_isolated(i)
                        || matches!(self.state(i), MemberState::Leader | MemberState::Follower)
                });
                if ok {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                let states = self.states();
                return Err(format!(
                    "{:?} cluster is not healthy after {within:?}: {states:?}",
                    self.kind
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until member `i` reports `state`.
    pub fn wait_state(
        &mut self,
        i: usize,
        state: MemberState,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.state(i);
            if now == state {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{:?} member {i} is {now:?}, not {state:?}, after {within:?}",
                    self.kind
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills member `i` with SIGKILL, as a crash would, and reaps it. Its data stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.members[i].paused = false;
        self.net.set_pid(i, None);
        self.write_pids();
    }

    /// Starts member `i` again (same ports, same data) after [`Cluster::kill`] and waits until
    /// its process answers on the client port (not until it has rejoined: see
    /// [`Cluster::wait_healthy`]). Does nothing while it runs.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        if self.is_running(i) {
            return Ok(());
        }
        self.spawn(i)?;
        self.wait_process_serves(i, Duration::from_secs(60))
    }

    /// Starts every member that is down at once (same ports, same data), then waits until
    /// each answers on its client port. After the whole cluster went down this is the way
    /// back: an etcd member does not serve clients before it has reached a quorum, so
    /// [`Cluster::restart`] of one member at a time would wait for ever on the first.
    pub fn restart_all(&mut self) -> Result<(), String> {
        let down: Vec<usize> = (0..self.size()).filter(|&i| !self.is_running(i)).collect();
        for &i in &down {
            self.spawn(i)?;
        }
        for &i in &down {
            self.wait_process_serves(i, Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Freezes member `i` (SIGSTOP): its sockets stay open, it answers nothing.
    pub fn pause(&mut self, i: usize) -> Result<(), String> {
        self.signal(i, Signal::SIGSTOP)?;
        self.members[i].paused = true;
        Ok(())
    }

    /// Lets a paused member `i` run again (SIGCONT).
    pub fn resume(&mut self, i: usize) -> Result<(), String> {
        self.signal(i, Signal::SIGCONT)?;
        self.members[i].paused = false;
        Ok(())
    }

    fn signal(&mut self, i: usize, sig: Signal) -> Result<(), String> {
        let pid = self
            .pid(i)
            .ok_or_else(|| format!("member {i} is not running"))?;
        let pid = i32::try_from(pid).map_err(|_| format!("bad pid {pid}"))?;
        kill(Pid::from_raw(pid), sig).map_err(|e| format!("cannot send {sig} to member {i}: {e}"))
    }

    /// Cuts member `i` off from its peers, silently: the connections stay open and carry
    /// nothing either way, new ones seem to connect and carry nothing. Clients still reach
    /// it on its client port.
    pub fn isolate(&self, i: usize) {
        self.net.set_isolated(i, true);
    }

    /// Ends member `i`'s isolation: held bytes and connections go through.
    pub fn heal(&self, i: usize) {
        self.net.set_isolated(i, false);
    }

    /// Delays the peer traffic member `i` receives by `delay` (zero: no delay), every byte in
    /// order: with a delay well under the cluster's failure detection (ZooKeeper: `syncLimit`
    /// ticks, 2.5 s by default; etcd: the election timeout, 1 s) it stays a follower but
    /// applies every change that much later, a follower that is behind.
    pub fn delay(&self, i: usize, delay: Duration) {
        self.net.set_delay(i, delay);
    }

    /// The delay of member `i`'s incoming peer traffic ([`Cluster::delay`]).
    pub fn delay_of(&self, i: usize) -> Duration {
        self.net.delay(i)
    }

    /// Undoes every fault: removes delays, heals isolations, resumes paused members, restarts killed ones,
    /// then waits until the cluster is healthy.
    pub fn repair(&mut self, within: Duration) -> Result<usize, String> {
        for i in 0..self.size() {
            self.delay(i, Duration::ZERO);
            self.heal(i);
            if self.members[i].paused {
                self.resume(i)?;
            }
        }
        self.restart_all()?;
        self.wait_healthy(within)
    }

    /// The resident memory of every member process, in bytes (Linux `/proc`).
    pub fn memory_bytes(&self) -> u64 {
        (0..self.size())
            .filter_map(|i| self.pid(i))
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .sum::<u64>()
            * 1024
    }

    /// The last lines of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text =
            std::fs::read_to_string(self.members[i].dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// One cluster of `kind` shared by the tests of a test binary, started on first use with
    /// default options. The guard serializes the tests that use it; each gets it healthy
    /// (faults a previous test left are undone). `None` when it cannot be started and
    /// [`crate::REQUIRE_ENV`] is not `1` (the reason is printed); panics when it is.
    pub fn shared(kind: Kind, test: &str) -> Option<MutexGuard<'static, Cluster>> {
        static ETCD: OnceLock<Result<Mutex<Cluster>, String>> = OnceLock::new();
        static ZOOKEEPER: OnceLock<Result<Mutex<Cluster>, String>> = OnceLock::new();
        let cell = match kind {
            Kind::Etcd => &ETCD,
            Kind::Zookeeper => &ZOOKEEPER,
        };
        let started = cell.get_or_init(|| {
            let t = Instant::now();
            let c = Cluster::start(kind, ClusterOptions::default()).map(Mutex::new);
            if let Ok(c) = &c {
                let c = lock(c);
                eprintln!(
                    "{kind:?} cluster on {} started in {:.1?}, {} MiB resident",
                    c.connect_string(),
                    t.elapsed(),
                    c.memory_bytes() / (1 << 20)
                );
            }
            c
        });
        match started {
            Ok(c) => {
                let mut g = lock(c);
                if let Err(e) = g.repair(Duration::from_secs(60)) {
                    panic!("{test}: the shared {kind:?} cluster cannot be repaired: {e}");
                }
                Some(g)
            }
            Err(e) if !required() => {
                eprintln!("{test}: skipped, no {kind:?} cluster: {e}");
                None
            }
            Err(e) => panic!("{test}: cannot start a {kind:?} cluster: {e}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].paused {
                let _ = self.signal(i, Signal::SIGCONT);
            }
            self.kill(i);
        }
        self.relays.clear();
        if let Some((mut w, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = w.wait();
        }
    }
}
