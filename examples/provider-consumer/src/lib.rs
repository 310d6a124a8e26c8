//! What the `provider` and `consumer` binaries share: the registry from configuration, the
//! shutdown signal, one-line errors, and the line printed for a notification.
//!
//! The registry URL comes from configuration only: a `--config <file.toml>` file (a
//! [`registry_core::RegistryConfig`]: `[registry] address = "..."`) and/or the `REGISTRY_URL`
//! environment variable, which overrides the file. The same binaries work on every backend
//! they link (see the `use registry_x as _;` lines at the top of each binary).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use registry_core::{Notification, Registry, RegistryConfig};

/// The service both binaries use unless `--service` says otherwise.
pub const DEFAULT_SERVICE: &str = "org.apache.dubbo.demo.GreetingService";

/// A failure: printed as one line on stderr, exit code 2.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

/// Logs go to stderr, off unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Parses the command line; `--help` and `--version` print and exit 0, anything wrong is one
/// line on stderr and exit code 2.
pub fn parse_args<T: clap::Parser>(program: &str) -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(args) => Ok(args),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Err(ExitCode::SUCCESS);
            }
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let line = lines.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            Err(fail(program, &Failure(format!("{line} (see --help)"))))
        }
    }
}

/// Prints `program: message` on stderr and returns exit code 2.
pub fn fail(program: &str, f: &Failure) -> ExitCode {
    eprintln!("{program}: {}", f.0.replace('\n', " "));
    ExitCode::from(2)
}

/// The registry named by the configuration: `--config` file, then `REGISTRY_URL` and the
/// other `REGISTRY_*` variables on top.
pub async fn registry_from_config(config: Option<&Path>) -> Result<Arc<dyn Registry>, Failure> {
    let url = RegistryConfig::load(config)?.to_url()?;
    Ok(registry_core::get_registry(url).await?)
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, so call it
/// before announcing anything a supervisor may react to.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, Failure>
{
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async move {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// `providers: <n> [<host:port>, ...] (<source>)`.
pub fn providers_line(n: &Notification) -> String {
    let addresses: Vec<String> = n.entries().map(|u| u.address()).collect();
    format!(
        "providers: {} [{}] ({})",
        addresses.len(),
        addresses.join(", "),
        n.source.as_str()
    )
}

/// The whole `main` of both binaries: logging, arguments (usage errors are one line and exit
/// code 2), a runtime, then `run`; a failure is one line on stderr and exit code 2.
pub fn main_with<A, F, Fut>(program: &str, run: F) -> ExitCode
where
    A: clap::Parser,
    F: FnOnce(A) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    init_logging();
    let args = match parse_args::<A>(program) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(program, &Failure(format!("cannot start the runtime: {e}"))),
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(program, &f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_core::{Source, Url};

    #[test]
    fn the_providers_line() {
        let p: Url = "tri://127.0.0.1:50051/S".parse().expect("url");
        let q: Url = "tri://127.0.0.1:50052/S".parse().expect("url");
        let n = Notification::new("S", "providers", vec![p, q], 1, Source::Live);
        assert_eq!(
            providers_line(&n),
            "providers: 2 [127.0.0.1:50051, 127.0.0.1:50052] (live)"
        );
        let marker: Url = "empty://10.0.0.1/S?category=providers"
            .parse()
            .expect("url");
        let n = Notification::new("S", "providers", vec![marker], 2, Source::Cache);
        assert_eq!(providers_line(&n), "providers: 0 [] (cache)");
    }
}
