//! The `provider` and `consumer` binaries as two separate processes on one `localdir://`
//! registry: the consumer sees the provider come, and go when it is stopped. Every wait is on
//! an output line or an exit, with a deadline.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);
const SERVICE: &str = "org.apache.dubbo.demo.TwoProcessService";

/// A child process that is killed if the test ends early, with its stdout as lines.
struct Proc {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn start(name: &'static str, bin: &str, registry: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .env("REGISTRY_URL", registry)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            name,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the next line; fails when it is not `want` or does not come in time.
    fn expect_line(&mut self, want: &str) {
        let line = match self.lines.recv_timeout(DEADLINE) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!(
                "{}: no line within {DEADLINE:?} (wanted {want:?}); printed so far: {:?}",
                self.name, self.seen
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "{}: exited before printing {want:?}; printed: {:?}, status {:?}",
                self.name,
                self.seen,
                self.child.try_wait()
            ),
        };
        self.seen.push(line.clone());
        assert_eq!(line, want, "{}: printed so far: {:?}", self.name, self.seen);
    }

    /// Waits for a line starting with `prefix` and returns it.
    fn expect_prefix(&mut self, prefix: &str) -> String {
        let line = self.lines.recv_timeout(DEADLINE).unwrap_or_else(|e| {
            panic!(
                "{}: no line starting with {prefix:?} ({e}); printed: {:?}",
                self.name, self.seen
            )
        });
        self.seen.push(line.clone());
        assert!(line.starts_with(prefix), "{}: {line:?}", self.name);
        line
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Waits for the process to exit, with the deadline.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{} did not exit within {DEADLINE:?}; printed: {:?}",
                self.name,
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on now (the example only registers it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run_provider_then_stop_it(signal: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = format!("localdir://{}?file=false", dir.path().display());
    let mut consumer = Proc::start(
        "consumer",
        env!("CARGO_BIN_EXE_consumer"),
        &registry,
        &["--service", SERVICE, "--count", "3"],
    );
    consumer.expect_line("providers: 0 [] (live)");

    let port = free_port();
    let mut provider = Proc::start(
        "provider",
        env!("CARGO_BIN_EXE_provider"),
        &registry,
        &["--service", SERVICE, "--port", &port.to_string()],
    );
    let registered = provider.expect_prefix("registered ");
    assert!(
        registered.starts_with(&format!("registered tri://127.0.0.1:{port}/{SERVICE}?")),
        "{registered}"
    );
    consumer.expect_line(&format!("providers: 1 [127.0.0.1:{port}] (live)"));

    provider.signal(signal);
    let status = provider.wait_exit();
    if signal == "TERM" {
        assert!(
            status.success(),
            "the provider exits 0 on SIGTERM: {status:?}"
        );
        provider.expect_prefix("unregistered ");
    }
    consumer.expect_line("providers: 0 [] (live)");
    let status = consumer.wait_exit();
    assert!(
        status.success(),
        "the consumer exits 0 after --count 3: {status:?}"
    );
}

/// SIGTERM: the provider unregisters, destroys and exits 0; the consumer sees 0 providers.
#[test]
fn consumer_sees_the_provider_come_and_go() {
    run_provider_then_stop_it("TERM");
}

/// SIGKILL: the provider cannot clean up; its entry names a process that is gone, so the
/// consumer's registry treats it as gone (localdir's dead-process rule).
#[test]
fn a_killed_provider_disappears_too() {
    run_provider_then_stop_it("KILL");
}

/// Bad configuration: one line on stderr, exit code 2.
#[test]
fn errors_are_one_line_and_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_consumer"))
        .env("REGISTRY_URL", "nosuch://127.0.0.1:1")
        .output()
        .expect("run consumer");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nosuch") && err.contains("localdir"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .env("REGISTRY_URL", "localdir:///tmp/x")
        .arg("--port")
        .arg("not-a-port")
        .output()
        .expect("run provider");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--port"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .env_remove("REGISTRY_URL")
        .args(["--port", "1", "--config", "/nonexistent/registry.toml"])
        .output()
        .expect("run provider");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/registry.toml"), "{err}");
}

/// The sample configuration files parse and name the backends they are for.
#[test]
fn sample_configurations_parse() {
    for (file, scheme) in [
        ("etcd.toml", "etcd"),
        ("zookeeper.toml", "zookeeper"),
        ("localdir.toml", "localdir"),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let url = registry_core::RegistryConfig::from_toml_file(&path)
            .and_then(|c| c.to_url())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(url.protocol(), scheme, "{file}");
    }
}
