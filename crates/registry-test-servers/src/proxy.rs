//! [`Proxy`]: a TCP proxy in front of a server (a member's client port) that a test cuts and
//! restores, whose replies it can lose, and whose bandwidth it can limit: the network faults
//! of the clients behind it only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// A TCP proxy on a free loopback port. [`Proxy::cut`] closes every connection and refuses
/// new ones; [`Proxy::restore`] lets connections through again. [`Proxy::drop_replies`]
/// silently discards what the server sends (the requests still reach it: a write is applied,
/// its reply lost) until [`Proxy::deliver_replies`]. [`Proxy::limit`] caps the bandwidth of
/// each direction, shared by all connections (a slow link). Needs a tokio runtime.
pub struct Proxy {
    address: String,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    drop_replies: AtomicBool,
    /// Bytes per second of each direction; 0: unlimited.
    rate: AtomicU64,
    conns: Mutex<Vec<Conn>>,
    /// When each direction's link is free again (the pacing of [`Proxy::limit`]).
    next_free: [Mutex<Option<Instant>>; 2],
    forwarded: [AtomicU64; 2],
    dropped: AtomicU64,
}

struct Conn {
    task: AbortHandle,
    /// Set when a reply of this connection was dropped: the stream has a gap, so it is
    /// closed when replies are delivered again (as TCP gives up after its retransmissions).
    damaged: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const TO_SERVER: usize = 0;
const TO_CLIENT: usize = 1;

impl Proxy {
    /// Starts a proxy to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot bind the proxy: {e}"))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("no proxy address: {e}"))?
            .to_string();
        let shared = Arc::new(Shared::default());
        let (target, s2) = (target.to_owned(), shared.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if s2.cut.load(Ordering::Acquire) {
                    continue; // dropped: refused while cut
                }
                let damaged = Arc::new(AtomicBool::new(false));
                let (target, s3, d2) = (target.clone(), s2.clone(), damaged.clone());
                let task = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    // Either direction ending ends the connection.
                    tokio::select! {
                        () = pump(&s3, TO_SERVER, ir, ow, &d2) => {}
                        () = pump(&s3, TO_CLIENT, or, iw, &d2) => {}
                    }
                });
                let mut conns = lock(&s2.conns);
                conns.retain(|c| !c.task.is_finished());
                conns.push(Conn {
                    task: task.abort_handle(),
                    damaged,
                });
            }
        })
        .abort_handle();
        Ok(Proxy {
            address,
            shared,
            accept,
        })
    }

    /// The proxy's address (`127.0.0.1:<port>`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::Release);
        for c in lock(&self.shared.conns).drain(..) {
            c.task.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::Release);
    }

    /// From now on, what the server sends is read and discarded, silently: the client's
    /// requests still reach the server and are applied, the client sees no answer and no
    /// error. New connections are made (their replies dropped too).
    pub fn drop_replies(&self) {
        self.shared.drop_replies.store(true, Ordering::Release);
    }

    /// Ends [`Proxy::drop_replies`]: the connections that lost a reply are closed (their
    /// streams have a gap), the others carry on, new ones work.
    pub fn deliver_replies(&self) {
        self.shared.drop_replies.store(false, Ordering::Release);
        lock(&self.shared.conns).retain(|c| {
            if c.damaged.load(Ordering::Acquire) {
                c.task.abort();
                false
            } else {
                true
            }
        });
    }

    /// Limits each direction to `bytes_per_second` (all connections together); `None`
    /// lifts the limit.
    pub fn limit(&self, bytes_per_second: Option<u64>) {
        self.shared
            .rate
            .store(bytes_per_second.unwrap_or(0), Ordering::Release);
    }

    /// Bytes forwarded so far to the server and to the client.
    pub fn forwarded(&self) -> (u64, u64) {
        (
            self.shared.forwarded[TO_SERVER].load(Ordering::Acquire),
            self.shared.forwarded[TO_CLIENT].load(Ordering::Acquire),
        )
    }

    /// Bytes of replies dropped so far ([`Proxy::drop_replies`]).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Acquire)
    }
}

/// Copies one direction of a connection, dropping replies and pacing as configured.
async fn pump(
    shared: &Shared,
    dir: usize,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    damaged: &AtomicBool,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let rate = shared.rate.load(Ordering::Acquire);
        // Small reads on a slow link, so the pacing is smooth (about 20 steps a second).
        let max = if rate == 0 {
            buf.len()
        } else {
            usize::try_from(rate / 20)
                .unwrap_or(buf.len())
                .clamp(512, buf.len())
        };
        let n = match from.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if dir == TO_CLIENT && shared.drop_replies.load(Ordering::Acquire) {
            damaged.store(true, Ordering::Release);
            shared.dropped.fetch_add(n as u64, Ordering::AcqRel);
            continue;
        }
        if rate > 0 {
            let due = {
                let mut next = lock(&shared.next_free[dir]);
                let now = Instant::now();
                let start = next.filter(|t| *t > now).unwrap_or(now);
                let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                *next = Some(due);
                due
            };
            tokio::time::sleep_until(due).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        shared.forwarded[dir].fetch_add(n as u64, Ordering::AcqRel);
    }
    let _ = to.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
