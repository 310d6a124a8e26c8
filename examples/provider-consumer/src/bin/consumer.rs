//! `consumer [--service NAME] [--count N] [--config file.toml]`: subscribes to the providers of
//! a service and prints every notification as one line,
//! `providers: <n> [<host:port>, ...] (<source>)`. Exits 0 after `N` notifications when
//! `--count` is given, or on Ctrl-C / SIGTERM. The registry comes from the configuration
//! (`--config` and/or `REGISTRY_URL`). Errors: one line on stderr, exit 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use provider_consumer::{
    DEFAULT_SERVICE, Failure, providers_line, registry_from_config, shutdown_signal,
};
use registry_core::Url;

// Every backend this binary can use, linked so that its scheme is known.
use registry_etcd as _;
use registry_localdir as _;
use registry_zookeeper as _;

/// Prints every change of a service's providers.
#[derive(Debug, Parser)]
#[command(name = "consumer", version, about)]
struct Args {
    /// The service interface.
    #[arg(long, default_value = DEFAULT_SERVICE)]
    service: String,
    /// Exit after this many notifications.
    #[arg(long)]
    count: Option<u64>,
    /// A registry configuration file (`[registry] address = "..."`); `REGISTRY_URL` overrides it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    provider_consumer::main_with("consumer", run)
}

async fn run(args: Args) -> Result<(), Failure> {
    let shutdown = shutdown_signal()?;
    let registry = registry_from_config(args.config.as_deref()).await?;
    let service = &args.service;
    let query: Url = format!(
        "consumer://127.0.0.1/{service}?application=provider-consumer-example\
         &category=providers&interface={service}&pid={pid}&side=consumer",
        pid = std::process::id(),
    )
    .parse()?;
    let mut watch = match registry_core::subscribe_stream(registry.clone(), query).await {
        Ok(w) => w,
        Err(e) => {
            registry.destroy().await;
            return Err(e.into());
        }
    };
    let mut seen: u64 = 0;
    tokio::pin!(shutdown);
    let ended = loop {
        if args.count.is_some_and(|n| seen >= n) {
            break None;
        }
        tokio::select! {
            () = &mut shutdown => break None,
            next = watch.next() => match next {
                Some(n) => {
                    println!("{}", providers_line(&n));
                    seen += 1;
                }
                None => break Some(Failure("the subscription ended".to_owned())),
            },
        }
    };
    let _ = watch.unsubscribe().await;
    registry.destroy().await;
    ended.map_or(Ok(()), Err)
}
