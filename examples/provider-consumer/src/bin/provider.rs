//! `provider --port <p> [--service NAME] [--config file.toml]`: registers a Dubbo-style
//! `tri://127.0.0.1:<p>/<service>` URL, prints `registered <url>`, holds it until Ctrl-C or
//! SIGTERM, then unregisters, destroys the registry and exits 0. The registry comes from the
//! configuration (`--config` and/or `REGISTRY_URL`). Errors: one line on stderr, exit 2.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use provider_consumer::{DEFAULT_SERVICE, Failure, registry_from_config, shutdown_signal};
use registry_core::Url;

// Every backend this binary can use, linked so that its scheme is known.
use registry_etcd as _;
use registry_localdir as _;
use registry_zookeeper as _;

/// Registers one provider and holds it until interrupted.
#[derive(Debug, Parser)]
#[command(name = "provider", version, about)]
struct Args {
    /// The port the service listens on (registered in the URL).
    #[arg(long)]
    port: u16,
    /// The service interface.
    #[arg(long, default_value = DEFAULT_SERVICE)]
    service: String,
    /// A registry configuration file (`[registry] address = "..."`); `REGISTRY_URL` overrides it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    provider_consumer::main_with("provider", run)
}

async fn run(args: Args) -> Result<(), Failure> {
    // Install the signal handlers before anything is announced.
    let shutdown = shutdown_signal()?;
    let registry = registry_from_config(args.config.as_deref()).await?;
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let service = &args.service;
    let url: Url = format!(
        "tri://127.0.0.1:{port}/{service}?anyhost=false&application=provider-consumer-example\
         &deprecated=false&dubbo=2.0.2&dynamic=true&generic=false&interface={service}\
         &methods=greet&pid={pid}&release=0.1.0&side=provider&timestamp={timestamp}",
        port = args.port,
        pid = std::process::id(),
    )
    .parse()?;
    if let Err(e) = registry.register(&url).await {
        registry.destroy().await;
        return Err(e.into());
    }
    println!("registered {url}");
    shutdown.await;
    let unregistered = registry.unregister(&url).await;
    registry.destroy().await;
    unregistered?;
    println!("unregistered {url}");
    Ok(())
}
