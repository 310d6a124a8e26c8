//! `greeter-server --port P [--registry URL] [--drain 2s]`: serves `helloworld.Greeter/SayHello`
//! on 127.0.0.1:P (the reply is `hello <name> from <P>`), registers
//! `tri://127.0.0.1:P/helloworld.Greeter?...` and prints `registered <url>`. On SIGTERM or
//! Ctrl-C it unregisters first and prints `unregistered <url>`, keeps serving for the drain
//! time so that clients see it go before it stops, then stops (finishing the calls in
//! progress), prints `stopped` and exits 0. The registry comes from `--registry` or
//! `REGISTRY_URL`. Errors: one line on stderr, exit 2.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use registry_core::Url;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tonic_greeter::proto::greeter_server::{Greeter, GreeterServer};
use tonic_greeter::proto::{HelloReply, HelloRequest};
use tonic_greeter::{Failure, SERVICE, greeting, shutdown_signal};

// Every backend this binary can use, linked so that its scheme is known.
use registry_etcd as _;
use registry_localdir as _;
use registry_zookeeper as _;

/// Serves the Greeter on a loopback port and registers it.
#[derive(Debug, Parser)]
#[command(name = "greeter-server", version, about)]
struct Args {
    /// The port to serve on (127.0.0.1).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// The registry URL (`localdir:///tmp/greeter`, `zookeeper://127.0.0.1:2181`, `etcd://127.0.0.1:2379`).
    #[arg(long, env = "REGISTRY_URL")]
    registry: String,
    /// How long to keep serving after unregistering on SIGTERM / Ctrl-C.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

struct Service {
    port: u16,
}

#[tonic::async_trait]
impl Greeter for Service {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            message: greeting(&request.into_inner().name, self.port),
        }))
    }
}

fn main() -> ExitCode {
    tonic_greeter::main_with("greeter-server", run)
}

async fn run(args: Args) -> Result<(), Failure> {
    let shutdown = shutdown_signal()?;
    let port = args.port;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| Failure(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreeterServer::new(Service { port }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );

    let registry = tonic_greeter::registry(&args.registry).await?;
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let url: Url = format!(
        "tri://127.0.0.1:{port}/{SERVICE}?application=tonic-greeter&deprecated=false\
         &dynamic=true&interface={SERVICE}&methods=SayHello&pid={pid}&release=0.1.0\
         &side=provider&timestamp={timestamp}",
        pid = std::process::id(),
    )
    .parse()?;
    if let Err(e) = registry.register(&url).await {
        registry.destroy().await;
        return Err(e.into());
    }
    println!("registered {url}");

    tokio::select! {
        () = shutdown => {}
        ended = &mut server => {
            registry.destroy().await;
            return Err(Failure(match ended {
                Ok(Ok(())) => "the server stopped by itself".to_owned(),
                Ok(Err(e)) => format!("the server failed: {e}"),
                Err(e) => format!("the server task failed: {e}"),
            }));
        }
    }
    // Unregister first, keep serving while clients learn it, then stop.
    let unregistered = registry.unregister(&url).await;
    if unregistered.is_ok() {
        println!("unregistered {url}");
    }
    tokio::time::sleep(args.drain).await;
    let _ = stop.send(());
    let served = server.await;
    registry.destroy().await;
    unregistered?;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failure(format!("the server failed: {e}"))),
        Err(e) => return Err(Failure(format!("the server task failed: {e}"))),
    }
    println!("stopped");
    Ok(())
}
