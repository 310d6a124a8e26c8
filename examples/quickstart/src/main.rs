//! Quickstart: a provider registers two instances, a consumer subscribes and prints every
//! notification, one instance leaves, then the other, then everything is destroyed.
//!
//! Runs on the embedded `memory://` backend by default; set `REGISTRY_URL`
//! (`zookeeper://127.0.0.1:2181`, `etcd://127.0.0.1:2379`) to run the same program on a server.

use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
// Every backend this program can reach through REGISTRY_URL must be linked by name.
use registry_core::{Notification, NotificationStream, RegistryConfig, Url};
use registry_etcd as _;
use registry_localdir as _;
use registry_zookeeper as _;

const SERVICE: &str = "org.apache.dubbo.demo.GreetingService";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // The registry URL comes from configuration: REGISTRY_URL, else the embedded default.
    let mut config = RegistryConfig::from_env()?;
    if config.address.is_none() {
        config.address = Some("memory://quickstart".to_owned());
    }
    let registry_url = config.to_url()?;
    println!("registry: {}", registry_url.to_identity_string_redacted());
    let registry = registry_core::get_registry(&registry_url).await?;

    let instance = |n: u8| -> Result<Url, registry_core::Error> {
        format!(
            "tri://10.0.0.{n}:50051/{SERVICE}?application=greeter&interface={SERVICE}\
             &methods=greet&side=provider&version=1.0.0"
        )
        .parse()
    };
    let (one, two) = (instance(1)?, instance(2)?);
    let query: Url =
        format!("consumer://10.0.0.100/{SERVICE}?interface={SERVICE}&version=1.0.0").parse()?;

    let mut watch = registry_core::subscribe_stream(registry.clone(), query).await?;
    expect(&mut watch, &[]).await?;

    println!("provider: register {}", one.address());
    registry.register(&one).await?;
    expect(&mut watch, &[&one]).await?;

    println!("provider: register {}", two.address());
    registry.register(&two).await?;
    expect(&mut watch, &[&one, &two]).await?;

    println!("provider: {} leaves", one.address());
    registry.unregister(&one).await?;
    expect(&mut watch, &[&two]).await?;

    println!("provider: {} leaves", two.address());
    registry.unregister(&two).await?;
    expect(&mut watch, &[]).await?;

    watch.unsubscribe().await?;
    registry_core::default_manager().destroy_all().await;
    println!("destroyed: available = {}", registry.is_available());
    Ok(())
}

/// Prints notifications until one holds exactly `want` (a real backend may send an
/// intermediate list); fails after 10 seconds.
async fn expect(watch: &mut NotificationStream, want: &[&Url]) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline, watch.next())
            .await
            .map_err(|_| format!("no notification with {} providers within 10 s", want.len()))?
            .ok_or("the subscription ended")?;
        print_notification(&n);
        let got: Vec<&Url> = n.entries().collect();
        if got.len() == want.len() && want.iter().all(|w| got.contains(w)) {
            return Ok(());
        }
    }
}

fn print_notification(n: &Notification) {
    println!(
        "consumer: {} {} (revision {}, {}):",
        n.service,
        n.category,
        n.revision,
        n.source.as_str()
    );
    for url in n.urls.iter() {
        println!("    {url}");
    }
}
