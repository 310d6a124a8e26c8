//! What `greeter-server` and `greeter-client` share: the generated `helloworld` code, the
//! registry from `--registry` / `REGISTRY_URL`, the shutdown signal, and one-line errors.
//!
//! The server registers `tri://127.0.0.1:<port>/helloworld.Greeter?...`; the client calls
//! through a `tonic::transport::Channel` from `registry_tower`, balanced over whatever
//! servers are registered at the moment.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use registry_core::Registry;

/// The code generated from `proto/helloworld.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("helloworld");
}

/// The service interface both sides use in the registry: the gRPC service name.
pub const SERVICE: &str = "helloworld.Greeter";

/// A failure: printed as one line on stderr, exit code 2.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

/// The reply of a server on `port` to `name`: `hello <name> from <port>`.
pub fn greeting(name: &str, port: u16) -> String {
    format!("hello {name} from {port}")
}

/// The port a greeting names, if it is one.
pub fn port_of_greeting(message: &str) -> Option<u16> {
    message.rsplit_once(" from ")?.1.parse().ok()
}

/// The registry named by `--registry` or `REGISTRY_URL`.
pub async fn registry(url: &str) -> Result<Arc<dyn Registry>, Failure> {
    Ok(registry_core::get_registry(url).await?)
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called.
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

/// The whole `main` of both binaries: logging (off unless `RUST_LOG` says otherwise),
/// arguments (`--help` exits 0; a usage error is one line and exit code 2), a runtime, then
/// `run`; a failure is one line on stderr and exit code 2.
pub fn main_with<A, F, Fut>(program: &str, run: F) -> ExitCode
where
    A: clap::Parser,
    F: FnOnce(A) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match A::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
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
            return fail(program, &Failure(format!("{line} (see --help)")));
        }
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

/// Prints `program: message` on stderr and returns exit code 2.
pub fn fail(program: &str, f: &Failure) -> ExitCode {
    eprintln!("{program}: {}", f.0.replace('\n', " "));
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_name_their_port() {
        assert_eq!(greeting("world", 50051), "hello world from 50051");
        assert_eq!(port_of_greeting(&greeting("a from b", 7)), Some(7));
        assert_eq!(port_of_greeting("hello world"), None);
        assert_eq!(port_of_greeting("hello world from here"), None);
    }
}
