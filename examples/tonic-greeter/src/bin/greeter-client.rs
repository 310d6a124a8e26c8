//! `greeter-client [--registry URL] --requests N [--interval 100ms] [--timeout 2s]
//! [--name NAME] [--show-providers]`: sends N `SayHello` requests, one after the other,
//! through a `tonic::transport::Channel` balanced over the Greeter servers registered now
//! (`registry_tower::balance_channel`), and prints one line per request: `reply from <P>` or
//! `error: <message>`. A request with no reply within the timeout (for instance while no
//! server is registered) is `error: no reply within <timeout>`. Exits 0 when done; usage and
//! registry errors are one line on stderr and exit 2.
//!
//! `--show-providers` also prints `providers: [<host:port>, ...]` at the start and before
//! the first request that is routed by a new list, so the output shows which requests ran
//! after which change.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use registry_core::Url;
use tonic_greeter::proto::HelloRequest;
use tonic_greeter::proto::greeter_client::GreeterClient;
use tonic_greeter::{Failure, SERVICE, port_of_greeting};

// Every backend this binary can use, linked so that its scheme is known.
use registry_etcd as _;
use registry_localdir as _;
use registry_zookeeper as _;

/// Calls the Greeter through a channel balanced over the registered servers.
#[derive(Debug, Parser)]
#[command(name = "greeter-client", version, about)]
struct Args {
    /// The registry URL (`localdir:///tmp/greeter`, `zookeeper://127.0.0.1:2181`, `etcd://127.0.0.1:2379`).
    #[arg(long, env = "REGISTRY_URL")]
    registry: String,
    /// How many requests to send.
    #[arg(long)]
    requests: u64,
    /// The pause between two requests.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long to wait for one reply.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The name sent in each request.
    #[arg(long, default_value = "world")]
    name: String,
    /// Also print the providers the channel balances over, when they change.
    #[arg(long)]
    show_providers: bool,
}

fn main() -> ExitCode {
    tonic_greeter::main_with("greeter-client", run)
}

fn providers_line(providers: &[Url]) -> String {
    let addresses: Vec<String> = providers.iter().map(Url::address).collect();
    format!("providers: [{}]", addresses.join(", "))
}

async fn run(args: Args) -> Result<(), Failure> {
    if args.timeout.is_zero() {
        return Err(Failure("--timeout must be more than 0".to_owned()));
    }
    let registry = tonic_greeter::registry(&args.registry).await?;
    let query: Url = format!(
        "consumer://127.0.0.1/{SERVICE}?application=tonic-greeter&category=providers\
         &interface={SERVICE}&pid={pid}&side=consumer",
        pid = std::process::id(),
    )
    .parse()?;
    let balanced = match registry_tower::balance_channel_with(
        registry.clone(),
        query,
        registry_tower::endpoint_for,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            registry.destroy().await;
            return Err(e.into());
        }
    };
    let mut providers = balanced.providers();
    let mut client = GreeterClient::new(balanced.into_channel());
    if args.show_providers {
        println!("{}", providers_line(&providers.borrow_and_update()));
    }
    let timeout = humantime::format_duration(args.timeout);
    for i in 0..args.requests {
        if i > 0 && !args.interval.is_zero() {
            tokio::time::sleep(args.interval).await;
        }
        if args.show_providers && providers.has_changed().unwrap_or(false) {
            println!("{}", providers_line(&providers.borrow_and_update()));
        }
        let request = HelloRequest {
            name: args.name.clone(),
        };
        let line = match tokio::time::timeout(args.timeout, client.say_hello(request)).await {
            Ok(Ok(reply)) => {
                let message = reply.into_inner().message;
                match port_of_greeting(&message) {
                    Some(port) => format!("reply from {port}"),
                    None => format!("error: unexpected reply {message:?}"),
                }
            }
            Ok(Err(status)) => {
                let message = status.message();
                if message.is_empty() {
                    format!("error: {}", status.code())
                } else {
                    format!("error: {}", message.replace('\n', " "))
                }
            }
            Err(_) => format!("error: no reply within {timeout}"),
        };
        println!("{line}");
    }
    drop(client);
    registry.destroy().await;
    Ok(())
}
