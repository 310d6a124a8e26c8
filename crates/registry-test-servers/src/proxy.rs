//! [`Proxy`]: a TCP proxy in front of a server that a test cuts and restores, a network
//! partition for the clients behind it only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A TCP proxy on a free loopback port: [`Proxy::cut`] closes every connection and refuses
/// new ones; [`Proxy::restore`] lets connections through again. Needs a tokio runtime.
pub struct Proxy {
    address: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (target, c2, k2) = (target.to_owned(), cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c2.load(Ordering::Acquire) {
                    continue; // dropped: refused while cut
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                lock(&k2).push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(Proxy {
            address,
            cut,
            conns,
            accept,
        })
    }

    /// The proxy's address (`127.0.0.1:<port>`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        for c in lock(&self.conns).drain(..) {
            c.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
