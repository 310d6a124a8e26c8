//! Relays for the peer traffic of a cluster: every member's peer ports are advertised to the
//! others as a relay's port, so a test can cut one member off from its peers **silently**.
//!
//! A relay forwards to one member (its destination). On each new connection it finds which
//! member dialed it: the connection's source port leads through `/proc/net/tcp{,6}` to a
//! socket inode, and the inode to the member process that holds it (`/proc/<pid>/fd`). A
//! connection is blackholed while its destination or its source is isolated: it stays open,
//! bytes already read are held and nothing more is read, so the sender sees no reset and no
//! answer, as when packets are dropped. New connections are accepted (the dialer sees its
//! connect succeed) but not connected onwards until the isolation ends. When it ends, held
//! bytes and connections go through in order, as TCP's retransmissions would deliver them.
//!
//! A member's incoming peer traffic can also be delayed (see [`Net::set_delay`]): every byte
//! sent to it arrives that much later, in order, so it stays in its cluster but lags behind.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The peer network of a cluster: which members are isolated, and the members' processes.
pub(crate) struct Net {
    isolated: Vec<AtomicBool>,
    /// For each member, how long its incoming peer bytes are held, in microseconds.
    delays: Vec<AtomicU64>,
    pids: Mutex<Vec<Option<u32>>>,
    stop: AtomicBool,
}

impl Net {
    pub(crate) fn new(members: usize) -> Net {
        Net {
            isolated: (0..members).map(|_| AtomicBool::new(false)).collect(),
            delays: (0..members).map(|_| AtomicU64::new(0)).collect(),
            pids: Mutex::new(vec![None; members]),
            stop: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_pid(&self, member: usize, pid: Option<u32>) {
        lock(&self.pids)[member] = pid;
    }

    pub(crate) fn set_isolated(&self, member: usize, on: bool) {
        self.isolated[member].store(on, Ordering::Release);
    }

    pub(crate) fn is_isolated(&self, member: usize) -> bool {
        self.isolated[member].load(Ordering::Acquire)
    }

    /// Delays every byte its peers send to `member` by `delay` (zero: none). Bytes already
    /// on their way keep the delay they had.
    pub(crate) fn set_delay(&self, member: usize, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delays[member].store(micros, Ordering::Release);
    }

    /// The delay of `member`'s incoming peer traffic.
    pub(crate) fn delay(&self, member: usize) -> Duration {
        Duration::from_micros(self.delays[member].load(Ordering::Acquire))
    }

    fn blocked(&self, source: Option<usize>, dest: usize) -> bool {
        self.is_isolated(dest) || source.is_some_and(|s| self.is_isolated(s))
    }

    /// Waits while the link `source -> dest` is blackholed; false when the net stops.
    fn wait_open(&self, source: Option<usize>, dest: usize) -> bool {
        while self.blocked(source, dest) {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        !self.stop.load(Ordering::Acquire)
    }

    /// The member whose process holds the client end of a connection from `src_port` to
    /// `relay_port` on loopback.
    fn identify(&self, src_port: u16, relay_port: u16) -> Option<usize> {
        let inode = socket_inode(src_port, relay_port)?;
        let target = format!("socket:[{inode}]");
        let pids = lock(&self.pids).clone();
        pids.iter().enumerate().find_map(|(member, pid)| {
            let pid = (*pid)?;
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
                })
                .then_some(member)
        })
    }
}

/// The inode of the socket whose local port is `local` and remote port `remote`.
fn socket_inode(local: u16, remote: u16) -> Option<u64> {
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9
                && port(f[1]) == Some(local)
                && port(f[2]) == Some(remote)
                && let Ok(inode) = f[9].parse::<u64>()
                && inode != 0
            {
                return Some(inode);
            }
        }
    }
    None
}

/// A relay on a free loopback port forwarding to one member's peer port.
pub(crate) struct Relay {
    port: u16,
    conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
    accept: Option<thread::JoinHandle<()>>,
    net: Arc<Net>,
}

impl Relay {
    /// A relay to `127.0.0.1:target` (member `dest`) on a free port.
    pub(crate) fn start(net: Arc<Net>, dest: usize, target: u16) -> Result<Relay, String> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a relay: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>> = Arc::default();
        let (n2, c2) = (net.clone(), conns.clone());
        let accept = thread::Builder::new()
            .name(format!("relay-{port}"))
            .spawn(move || {
                let next = AtomicU64::new(0);
                for inbound in listener.incoming() {
                    if n2.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(inbound) = inbound else { continue };
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let (net, conns) = (n2.clone(), c2.clone());
                    let _ = thread::Builder::new()
                        .name(format!("relay-{port}-{id}"))
                        .spawn(move || connection(net, conns, id, inbound, port, dest, target));
                }
            })
            .map_err(|e| format!("cannot start a relay thread: {e}"))?;
        Ok(Relay {
            port,
            conns,
            accept: Some(accept),
            net,
        })
    }

    /// The relay's port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection and stops accepting (the net must be stopped first).
    fn close(&mut self) {
        for (_, (a, b)) in lock(&self.conns).drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees the stop flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.net.stop.store(true, Ordering::Release);
        self.close();
    }
}

fn connection(
    net: Arc<Net>,
    conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
    id: u64,
    inbound: TcpStream,
    relay_port: u16,
    dest: usize,
    target: u16,
) {
    let src_port = inbound.peer_addr().map(|a| a.port()).unwrap_or(0);
    let source = (0..3).find_map(|i| {
        if i > 0 {
            thread::sleep(Duration::from_millis(5));
        }
        net.identify(src_port, relay_port)
    });
    if source.is_none() {
        tracing::debug!(
            relay_port,
            src_port,
            "peer connection from an unknown process"
        );
    }
    // A connection made during an isolation waits, like a SYN that gets no answer.
    if !net.wait_open(source, dest) {
        return;
    }
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
        return; // the member is down: the dialer sees the connection closed
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (Ok(i2), Ok(o2), Ok(i3), Ok(o3)) = (
        inbound.try_clone(),
        outbound.try_clone(),
        inbound.try_clone(),
        outbound.try_clone(),
    ) else {
        return;
    };
    lock(&conns).insert(id, (i3, o3));
    let n2 = net.clone();
    let back = thread::spawn(move || pump(&n2, source, dest, source, o2, i2));
    pump(&net, source, dest, Some(dest), inbound, outbound);
    let _ = back.join();
    lock(&conns).remove(&id);
}

/// Copies `from` to `to` (the peer `receiver`), holding bytes while the link is blackholed
/// and delaying them by the receiver's delay. A writer thread does the writing, so bytes read
/// meanwhile are delayed from when they were read, not one after the other.
fn pump(
    net: &Arc<Net>,
    source: Option<usize>,
    dest: usize,
    receiver: Option<usize>,
    mut from: TcpStream,
    to: TcpStream,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = {
        let net = net.clone();
        let from = from.try_clone();
        thread::spawn(move || write_delayed(&net, source, dest, rx, to, from.ok()))
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let due = Instant::now() + receiver.map_or(Duration::ZERO, |r| net.delay(r));
        if !net.wait_open(source, dest) || tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// The writing half of [`pump`]: each chunk when it is due and the link is open; at the end
/// (the reader saw the end or an error) the end is passed on.
fn write_delayed(
    net: &Net,
    source: Option<usize>,
    dest: usize,
    rx: std::sync::mpsc::Receiver<(Instant, Vec<u8>)>,
    mut to: TcpStream,
    from: Option<TcpStream>,
) {
    for (due, bytes) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if !net.wait_open(source, dest) || to.write_all(&bytes).is_err() {
            if let Some(f) = &from {
                let _ = f.shutdown(Shutdown::Both);
            }
            return;
        }
    }
    if net.wait_open(source, dest) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
