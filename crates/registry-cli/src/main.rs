//! `registryctl`: register, unregister, look up and watch services in any registry backend.
//!
//! ```text
//! registryctl --registry zookeeper://127.0.0.1:2181 register 'tri://10.0.0.1:50051/com.foo.Greeter'
//! registryctl --registry etcd://127.0.0.1:2379 watch 'consumer://10.0.0.9/com.foo.Greeter' --json
//! registryctl --registry 'zookeeper://127.0.0.1:2181?check=false' watch 'consumer://10.0.0.9/com.foo.A' 'consumer://10.0.0.9/com.foo.B'
//! ```
//!
//! `--registry` falls back to `REGISTRY_URL`. Bad input prints one line on stderr and exits
//! with code 2.
//!
//! `register` and `watch` take `--metrics <ADDR>` (e.g. `127.0.0.1:9464`): they then serve
//! Prometheus text at `http://ADDR/metrics` (any path answers) while they run — the
//! reliability layer's `registry_*` metrics and registryctl's own `registryctl_*` ones (the
//! README's Metrics section lists them).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
// Link every built-in backend, so each scheme is in the table (see the README's rule).
use registry_core::{Notification, Registry, Url};
use registry_etcd as _;
use registry_localdir as _;
use registry_zookeeper as _;

/// Register, look up and watch services in a registry.
#[derive(Debug, Parser)]
#[command(name = "registryctl", version, about)]
struct Cli {
    /// The registry URL, e.g. zookeeper://127.0.0.1:2181 or etcd://127.0.0.1:2379.
    #[arg(long, short = 'r', env = "REGISTRY_URL", global = true)]
    registry: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register URLs and hold them until interrupted (Ctrl-C or SIGTERM) or for a fixed time.
    Register {
        /// The URLs to register.
        #[arg(required = true)]
        urls: Vec<String>,
        /// Hold for this long (e.g. 30s, 5m), then unregister and exit.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        hold: Option<Duration>,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) while holding.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Unregister URLs.
    Unregister {
        /// The URLs to unregister.
        #[arg(required = true)]
        urls: Vec<String>,
    },
    /// Print the URLs that match a query, one full string per line.
    Lookup {
        /// The query (a consumer URL: interface, group, version, category...).
        url: String,
    },
    /// Print every notification of one or more subscriptions.
    Watch {
        /// The subscription URLs.
        #[arg(required = true)]
        urls: Vec<String>,
        /// Exit after this many notifications.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) while watching.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// The services under the root, with their provider and consumer counts.
    List,
    /// The registered backend schemes.
    Schemes,
}

/// A failure: one line on stderr, and the exit code.
struct Failure(String, u8);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string(), 2)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REGISTRYCTL_LOG")
                .unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line that names the problem, like every other bad input.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            return fail(&Failure(format!("{message} (see --help)"), 2));
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(&Failure(format!("cannot start the runtime: {e}"), 1)),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(&f),
    }
}

fn fail(f: &Failure) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "registryctl: {}", f.0);
    ExitCode::from(f.1)
}

fn parse(kind: &str, s: &str) -> Result<Url, Failure> {
    Url::parse(s).map_err(|e| Failure(format!("bad {kind} URL: {e}"), 2))
}

async fn connect(registry: Option<&str>) -> Result<Arc<dyn Registry>, Failure> {
    let Some(r) = registry else {
        return Err(Failure(
            "no registry: pass --registry <URL> or set REGISTRY_URL".to_owned(),
            2,
        ));
    };
    let url = parse("registry", r)?;
    registry_core::get_registry(url)
        .await
        .map_err(|e| Failure(e.to_string(), 2))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Schemes = cli.command {
        let mut out = std::io::stdout().lock();
        for s in registry_core::schemes() {
            writeln!(out, "{s}")?;
        }
        return Ok(());
    }
    // Validate every URL before connecting, so bad input fails fast.
    let registry = cli.registry.as_deref();
    match cli.command {
        Command::Schemes => Ok(()),
        Command::Register {
            urls,
            hold,
            metrics,
        } => {
            let urls: Vec<Url> = urls
                .iter()
                .map(|u| parse("service", u))
                .collect::<Result<_, _>>()?;
            if let Some(addr) = metrics {
                serve_metrics(addr)?;
            }
            let reg = connect(registry).await?;
            let scheme = reg.url().protocol().to_owned();
            if metrics.is_some() {
                watch_backend(reg.clone());
            }
            let held = gauge!(REGISTERED_URLS, "scheme" => scheme);
            for u in &urls {
                reg.register(u).await?;
                held.increment(1.0);
                println!("registered {u}");
            }
            match hold {
                Some(d) => tokio::time::sleep(d).await,
                None => interrupted().await?,
            }
            for u in &urls {
                reg.unregister(u).await?;
            }
            reg.destroy().await;
            Ok(())
        }
        Command::Unregister { urls } => {
            let urls: Vec<Url> = urls
                .iter()
                .map(|u| parse("service", u))
                .collect::<Result<_, _>>()?;
            let reg = connect(registry).await?;
            for u in &urls {
                reg.unregister(u).await?;
            }
            reg.destroy().await;
            Ok(())
        }
        Command::Lookup { url } => {
            let q = parse("query", &url)?;
            let reg = connect(registry).await?;
            let found = reg.lookup(&q).await?;
            let mut out = std::io::stdout().lock();
            for u in found {
                writeln!(out, "{u}")?;
            }
            drop(out);
            reg.destroy().await;
            Ok(())
        }
        Command::Watch {
            urls,
            count,
            json,
            metrics,
        } => {
            let queries: Vec<Url> = urls
                .iter()
                .map(|u| parse("subscription", u))
                .collect::<Result<_, _>>()?;
            if let Some(addr) = metrics {
                serve_metrics(addr)?;
            }
            let reg = connect(registry).await?;
            if metrics.is_some() {
                watch_backend(reg.clone());
            }
            let mut streams = Vec::with_capacity(queries.len());
            for q in queries {
                streams.push(registry_core::subscribe_stream(reg.clone(), q).await?);
            }
            let mut stream = futures_util::stream::select_all(streams);
            let mut seen = 0u64;
            loop {
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
                let next = tokio::select! {
                    n = stream.next() => n,
                    r = interrupted() => { r?; None }
                };
                let Some(n) = next else { break };
                record_notification(&n);
                print_notification(&n, json)?;
                seen += 1;
            }
            for s in stream {
                s.unsubscribe().await?;
            }
            reg.destroy().await;
            Ok(())
        }
        Command::List => {
            let reg = connect(registry).await?;
            let q = parse(
                "query",
                "consumer://127.0.0.1/*?interface=*&group=*&version=*&classifier=*&enabled=*&category=providers,consumers",
            )?;
            let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
            for u in reg.lookup(&q).await? {
                let c = counts.entry(u.service_interface().to_owned()).or_default();
                if u.category() == "consumers" {
                    c.1 += 1;
                } else {
                    c.0 += 1;
                }
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<60} {:>9} {:>9}",
                "SERVICE", "PROVIDERS", "CONSUMERS"
            )?;
            for (s, (p, c)) in counts {
                writeln!(out, "{s:<60} {p:>9} {c:>9}")?;
            }
            drop(out);
            reg.destroy().await;
            Ok(())
        }
    }
}

/// Gauge: 1, labelled with registryctl's version.
const BUILD_INFO: &str = "registryctl_build_info";
/// Gauge, by `scheme`: 1 while the backend is reachable, 0 while it is not.
const BACKEND_UP: &str = "registryctl_backend_up";
/// Gauge, by `scheme`: the URLs `register` has registered and holds.
const REGISTERED_URLS: &str = "registryctl_registered_urls";
/// Counter, by `source` (`live`, `cache`): the lists `watch` received.
const NOTIFICATIONS: &str = "registryctl_notifications_total";
/// Gauge, by `category`: the entries (without `empty://` markers) of the last list `watch`
/// received.
const WATCHED_ENTRIES: &str = "registryctl_watched_entries";
/// Gauge: when `watch` last received a list, in seconds since the Unix epoch.
const LAST_NOTIFICATION: &str = "registryctl_last_notification_timestamp_seconds";

/// Installs the Prometheus exporter on `addr`, in the current runtime. Binding happens here,
/// so an address in use fails before anything is registered.
fn serve_metrics(addr: SocketAddr) -> Result<(), Failure> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use registry_failback::metrics as m;
    let built = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(m::NOTIFICATION_DELAY.to_owned()),
            m::NOTIFICATION_DELAY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(m::RECOVERY_DURATION.to_owned()),
                m::RECOVERY_DURATION_BUCKETS,
            )
        })
        .and_then(|b| b.install());
    if let Err(e) = built {
        return Err(Failure(format!("cannot serve metrics on {addr}: {e}"), 2));
    }
    m::describe();
    describe_gauge!(BUILD_INFO, "registryctl's version, as a label; always 1");
    describe_gauge!(
        BACKEND_UP,
        "1 while the registry backend is reachable, 0 while it is not"
    );
    describe_gauge!(
        REGISTERED_URLS,
        Unit::Count,
        "URLs registered by this registryctl and held"
    );
    describe_counter!(
        NOTIFICATIONS,
        Unit::Count,
        "Lists received by watch, by source (live, cache)"
    );
    describe_gauge!(
        WATCHED_ENTRIES,
        Unit::Count,
        "Entries of the last list received by watch, by category"
    );
    describe_gauge!(
        LAST_NOTIFICATION,
        Unit::Seconds,
        "When watch last received a list, in seconds since the Unix epoch"
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// Keeps `registryctl_backend_up` current: at once, on every backend event, and every second.
fn watch_backend(reg: Arc<dyn Registry>) {
    let up = gauge!(BACKEND_UP, "scheme" => reg.url().protocol().to_owned());
    let mut events = reg.events();
    tokio::spawn(async move {
        loop {
            up.set(if reg.is_available() { 1.0 } else { 0.0 });
            tokio::select! {
                e = events.recv() => {
                    if matches!(e, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}

fn record_notification(n: &Notification) {
    counter!(NOTIFICATIONS, "source" => n.source.as_str()).increment(1);
    gauge!(WATCHED_ENTRIES, "category" => n.category.clone()).set(n.entries().count() as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    gauge!(LAST_NOTIFICATION).set(now.as_secs_f64());
}

#[derive(serde::Serialize)]
struct JsonNotification<'a> {
    service: &'a str,
    category: &'a str,
    source: &'static str,
    revision: u64,
    urls: Vec<String>,
}

fn print_notification(n: &Notification, json: bool) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::to_string(&JsonNotification {
            service: &n.service,
            category: &n.category,
            source: n.source.as_str(),
            revision: n.revision,
            urls: n.urls.iter().map(Url::to_full_string).collect(),
        })?;
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "{} {} revision {} ({}):",
            n.service,
            n.category,
            n.revision,
            n.source.as_str()
        )?;
        for u in n.urls.iter() {
            writeln!(out, "  {u}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() -> Result<(), Failure> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}
