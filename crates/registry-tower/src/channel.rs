//! Feature `tonic`: a `tonic::transport::Channel` balanced over the current providers.

use std::collections::BTreeMap;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures_core::Stream;
use registry_core::{Registry, Url};
use tokio::sync::{mpsc, watch};
use tonic::transport::channel::Change as TonicChange;
use tonic::transport::{Channel, Endpoint};

use crate::{Change, Discovered, ProviderKey, discover};

/// How many changes may wait for the channel's balancer.
const CHANGE_CAPACITY: usize = 64;

/// Why [`endpoint_for`] cannot build an endpoint for a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot call provider {provider} through a plaintext gRPC channel: {reason}")]
pub struct UnsupportedProvider {
    /// The provider, without parameters or password.
    pub provider: String,
    /// What is wrong.
    pub reason: String,
}

/// The `Endpoint` [`balance_channel`] uses for a provider URL:
///
/// - protocols `tri` (Dubbo's triple, which is gRPC-compatible), `grpc`, `http` and `h2c`
///   become `http://host:port`: gRPC over plaintext HTTP/2;
/// - a provider that asks for TLS (protocol `https` or `grpcs`, or `tls=true` or
///   `ssl-enabled=true`) is refused: TLS needs a client configuration (roots, client
///   certificate, the name to verify) that a URL does not carry, and tonic's TLS features.
///   Build such endpoints yourself with [`balance_channel_with`] and
///   `Endpoint::tls_config`;
/// - any other protocol (`dubbo`, `rest`, ...) is refused: it is not gRPC;
/// - a URL without a host or a port is refused.
///
/// No other parameter of the URL is applied (timeouts and limits are the caller's, on the
/// `Endpoint` it builds with [`balance_channel_with`]).
pub fn endpoint_for(url: &Url) -> Result<Endpoint, UnsupportedProvider> {
    let refuse = |reason: String| UnsupportedProvider {
        provider: url.to_identity_string_redacted(),
        reason,
    };
    let tls = url.parameter_bool("tls", false) || url.parameter_bool("ssl-enabled", false);
    match url.protocol() {
        "https" | "grpcs" => {
            return Err(refuse(format!(
                "protocol `{}` needs TLS; build its Endpoint with balance_channel_with and Endpoint::tls_config",
                url.protocol()
            )));
        }
        "tri" | "grpc" | "http" | "h2c" if tls => {
            return Err(refuse(
                "the provider asks for TLS; build its Endpoint with balance_channel_with and Endpoint::tls_config"
                    .to_owned(),
            ));
        }
        "tri" | "grpc" | "http" | "h2c" => {}
        other => {
            return Err(refuse(format!(
                "protocol `{other}` is not gRPC (supported: tri, grpc, http, h2c)"
            )));
        }
    }
    if url.host().is_empty() || url.port() == 0 {
        return Err(refuse("the URL has no host or no port".to_owned()));
    }
    let host = if url.host().contains(':') && !url.host().starts_with('[') {
        format!("[{}]", url.host())
    } else {
        url.host().to_owned()
    };
    Endpoint::from_shared(format!("http://{host}:{}", url.port()))
        .map_err(|e| refuse(format!("not a valid address: {e}")))
}

/// A channel balanced over the providers of a subscription, and the providers it balances
/// over now.
#[derive(Debug, Clone)]
pub struct BalancedChannel {
    channel: Channel,
    providers: watch::Receiver<Vec<Url>>,
}

impl BalancedChannel {
    /// The channel: clone it into as many clients as needed.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Takes the channel.
    pub fn into_channel(self) -> Channel {
        self.channel
    }

    /// The providers the channel balances over, updated after each change was handed to its
    /// balancer (a request made after seeing a change is routed by it). Providers refused by
    /// the endpoint function are not in it.
    pub fn providers(&self) -> watch::Receiver<Vec<Url>> {
        self.providers.clone()
    }
}

/// A `Channel` that balances requests over the providers matching `query` and follows them:
/// providers that come are inserted, providers that go are removed, a provider whose URL
/// changed is reconnected. Endpoints are built by [`endpoint_for`] (plaintext gRPC; see there
/// what is supported). Returns after the first list was handed to the channel. When every
/// clone of the channel is dropped, the subscription ends.
///
/// Needs a tokio runtime. With no provider, a request waits for one: put a timeout on calls.
pub async fn balance_channel(
    registry: Arc<dyn Registry>,
    query: Url,
) -> registry_core::Result<Channel> {
    Ok(balance_channel_with(registry, query, endpoint_for)
        .await?
        .into_channel())
}

/// [`balance_channel`] with endpoints built by `make_endpoint` (TLS, timeouts, limits, ...),
/// and a view of the providers. A provider `make_endpoint` refuses is skipped with a
/// warning.
pub async fn balance_channel_with<F, E>(
    registry: Arc<dyn Registry>,
    query: Url,
    mut make_endpoint: F,
) -> registry_core::Result<BalancedChannel>
where
    F: FnMut(&Url) -> Result<Endpoint, E> + Send + 'static,
    E: fmt::Display,
{
    let mut discovered = discover(registry, query, move |url: &Url| {
        make_endpoint(url)
            .map(|e| (url.clone(), e))
            .map_err(|e| e.to_string())
    })
    .await?;
    let (channel, tx) = Channel::balance_channel::<ProviderKey>(CHANGE_CAPACITY);
    let (providers_tx, providers) = watch::channel(Vec::new());
    let mut forwarder = Forwarder {
        tx,
        providers: providers_tx,
        current: BTreeMap::new(),
    };
    // The first list is handed over before returning.
    while let Some(change) = poll_fn(|cx| match Pin::new(&mut discovered).poll_next(cx) {
        Poll::Ready(Some(Ok(c))) => Poll::Ready(Some(c)),
        Poll::Ready(None) | Poll::Pending => Poll::Ready(None),
    })
    .await
    {
        if !forwarder.forward(change).await {
            break;
        }
    }
    tokio::spawn(forwarder.run(discovered));
    Ok(BalancedChannel { channel, providers })
}

type EndpointChange = Change<ProviderKey, (Url, Endpoint)>;

struct Forwarder {
    tx: mpsc::Sender<TonicChange<ProviderKey, Endpoint>>,
    providers: watch::Sender<Vec<Url>>,
    current: BTreeMap<ProviderKey, Url>,
}

impl Forwarder {
    /// Hands one change to the balancer, then publishes the providers. False when the
    /// channel is gone.
    async fn forward(&mut self, change: EndpointChange) -> bool {
        let sent = match change {
            Change::Insert(key, (url, endpoint)) => {
                let sent = self
                    .tx
                    .send(TonicChange::Insert(key.clone(), endpoint))
                    .await;
                self.current.insert(key, url);
                sent
            }
            Change::Remove(key) => {
                let sent = self.tx.send(TonicChange::Remove(key.clone())).await;
                self.current.remove(&key);
                sent
            }
        };
        if sent.is_err() {
            return false;
        }
        self.providers
            .send_replace(self.current.values().cloned().collect());
        true
    }

    /// Forwards changes until the channel is dropped (its balancer drops the receiving end)
    /// or the subscription ends; dropping `discovered` then unsubscribes.
    async fn run<F>(mut self, mut discovered: Discovered<(Url, Endpoint), F>)
    where
        F: FnMut(&Url) -> Result<(Url, Endpoint), String>,
    {
        loop {
            let next = tokio::select! {
                () = self.tx.closed() => break,
                next = poll_fn(|cx| Pin::new(&mut discovered).poll_next(cx)) => next,
            };
            match next {
                Some(Ok(change)) => {
                    if !self.forward(change).await {
                        break;
                    }
                }
                None => break,
            }
        }
        tracing::debug!("balanced channel dropped or subscription ended; unsubscribing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        s.parse().expect("url")
    }

    #[test]
    fn plaintext_grpc_protocols_become_http_endpoints() {
        for p in ["tri", "grpc", "http", "h2c"] {
            let e = endpoint_for(&url(&format!("{p}://10.0.0.1:50051/S?weight=3")))
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(e.uri().to_string(), "http://10.0.0.1:50051/");
        }
        let e = endpoint_for(&url("tri://[::1]:50051/S")).expect("ipv6");
        assert_eq!(e.uri().to_string(), "http://[::1]:50051/");
    }

    #[test]
    fn tls_other_protocols_and_missing_ports_are_refused_with_a_reason() {
        let cases = [
            ("grpcs://10.0.0.1:50051/S", "needs TLS"),
            ("https://10.0.0.1:50051/S", "needs TLS"),
            ("tri://10.0.0.1:50051/S?tls=true", "asks for TLS"),
            ("tri://10.0.0.1:50051/S?ssl-enabled=true", "asks for TLS"),
            ("dubbo://10.0.0.1:20880/S", "`dubbo` is not gRPC"),
            ("tri://10.0.0.1/S", "no host or no port"),
        ];
        for (u, why) in cases {
            let e = endpoint_for(&url(u)).expect_err(u);
            let text = e.to_string();
            assert!(text.contains(why), "{u}: {text}");
            assert!(text.contains(&url(u).to_identity_string()), "{u}: {text}");
        }
        let e = endpoint_for(&url("dubbo://user:secret@10.0.0.1:20880/S")).expect_err("dubbo");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
