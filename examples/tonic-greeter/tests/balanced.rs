//! Real processes, real gRPC over loopback: greeter servers that register themselves and a
//! greeter client balanced over them through a registry subscription, on `localdir://`,
//! ZooKeeper and etcd (the last two need the servers of `cargo xtask test`).
//!
//! The scenario: two servers, a client; replies come from both. One server is killed with
//! SIGKILL: once the client's list no longer has it, no request fails. A third server starts:
//! replies reach it. Another server gets SIGTERM: it unregisters before it stops serving, so
//! no request fails at all. Every wait is on an output line or an exit, with a deadline.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use registry_test_servers::{Kind, shared_address};

/// For lines that follow from what the test did.
const DEADLINE: Duration = Duration::from_secs(20);
/// For the registry to drop a killed server (ZooKeeper session expiry is the slowest).
const EXPIRY_DEADLINE: Duration = Duration::from_secs(40);

/// A child process that is killed if the test ends early, with its stdout as lines.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn start(name: String, bin: &str, registry: &str, args: &[&str]) -> Proc {
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

    /// Reads lines until one satisfies `want`; returns its index in `seen`.
    fn wait_for(&mut self, what: &str, deadline: Duration, want: impl Fn(&str) -> bool) -> usize {
        let start = Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = want(&line);
                    self.seen.push(line);
                    if hit {
                        return self.seen.len() - 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {what} within {deadline:?}; last lines: {:?}",
                    self.name,
                    self.tail()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait();
                    panic!(
                        "{}: exited before {what}; last lines: {:?}, status {status:?}",
                        self.name,
                        self.tail(),
                    )
                }
            }
        }
    }

    fn tail(&self) -> &[String] {
        &self.seen[self.seen.len().saturating_sub(20)..]
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

    /// Waits for the process to exit (and reaps it), with the deadline.
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
                self.tail()
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A greeter server on a free port, once it has registered.
fn server(registry: &str) -> (Proc, u16) {
    let port = free_port();
    let mut p = Proc::start(
        format!("greeter-server {port}"),
        env!("CARGO_BIN_EXE_greeter-server"),
        registry,
        &["--port", &port.to_string()],
    );
    let line = p.wait_for("registered line", DEADLINE, |l| {
        l.starts_with("registered ")
    });
    let want = format!("registered tri://127.0.0.1:{port}/helloworld.Greeter?");
    assert!(p.seen[line].starts_with(&want), "{}", p.seen[line]);
    (p, port)
}

fn is_providers_line_without(line: &str, port: u16) -> bool {
    line.starts_with("providers: ") && !line.contains(&format!("127.0.0.1:{port}"))
}

fn scenario(registry: &str) {
    let (mut a, pa) = server(registry);
    let (mut b, pb) = server(registry);
    let mut client = Proc::start(
        "greeter-client".to_owned(),
        env!("CARGO_BIN_EXE_greeter-client"),
        registry,
        &[
            "--requests",
            "1000000",
            "--interval",
            "50ms",
            "--timeout",
            "1s",
            "--show-providers",
        ],
    );
    let (ra, rb) = (format!("reply from {pa}"), format!("reply from {pb}"));
    client.wait_for(&ra, DEADLINE, |l| l == ra);
    client.wait_for(&rb, DEADLINE, |l| l == rb);

    // SIGKILL: the server cannot unregister; the registry drops it when its session or
    // owner is found dead. Until then requests to it may fail; after, none may.
    a.signal("KILL");
    a.wait_exit();
    let killed = Instant::now();
    let dropped = client.wait_for("list without the killed server", EXPIRY_DEADLINE, |l| {
        is_providers_line_without(l, pa)
    });
    eprintln!(
        "{registry}: the killed server left the client's list after {:?}",
        killed.elapsed()
    );

    // A third server: replies reach it.
    let (mut c, pc) = server(registry);
    let started = Instant::now();
    let rc = format!("reply from {pc}");
    client.wait_for(&rc, DEADLINE, |l| l == rc);
    eprintln!(
        "{registry}: the first reply from the new server came {:?} after it registered",
        started.elapsed()
    );

    // SIGTERM: unregister, drain, stop; nothing fails.
    b.signal("TERM");
    b.wait_for("unregistered line", DEADLINE, |l| {
        l.starts_with("unregistered ")
    });
    client.wait_for("list without the stopped server", DEADLINE, |l| {
        is_providers_line_without(l, pb)
    });
    b.wait_for("stopped line", DEADLINE, |l| l == "stopped");
    let status = b.wait_exit();
    assert!(status.success(), "SIGTERM: exit 0, got {status:?}");
    // Requests after the server is gone for good still succeed, on the third server.
    for _ in 0..5 {
        client.wait_for(&rc, DEADLINE, |l| l == rc);
    }

    let errors: Vec<&String> = client.seen[dropped..]
        .iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert!(
        errors.is_empty(),
        "{registry}: requests failed after the killed server left the list: {errors:?}\nall: {:?}",
        client.seen
    );
    let before_kill_errors = client.seen[..dropped]
        .iter()
        .filter(|l| l.starts_with("error:"))
        .count();
    eprintln!("{registry}: {before_kill_errors} requests failed between the kill and the drop");
    assert!(
        !client.seen[dropped..].contains(&ra),
        "no reply from the killed server after it left the list"
    );

    c.signal("TERM");
    assert!(c.wait_exit().success());
}

#[test]
fn localdir_two_servers_kill_add_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(&format!("localdir://{}?file=false", dir.path().display()));
}

#[test]
fn zookeeper_two_servers_kill_add_stop() {
    let Some(addr) = shared_address(Kind::Zookeeper, "zookeeper_two_servers_kill_add_stop") else {
        return;
    };
    // The shortest session the test server allows (2 ticks of 3 s), so a killed server's
    // ephemeral node goes quickly; a group of its own keeps other tests' entries apart.
    scenario(&format!(
        "zookeeper://{addr}?session=6000&file=false&group=greeter{}",
        std::process::id()
    ));
}

#[test]
fn etcd_two_servers_kill_add_stop() {
    let Some(addr) = shared_address(Kind::Etcd, "etcd_two_servers_kill_add_stop") else {
        return;
    };
    // A short lease, so a killed server's key expires quickly.
    scenario(&format!(
        "etcd://{addr}?session=4000&file=false&group=greeter{}",
        std::process::id()
    ));
}

/// The client exits 0 after N requests, one line each, even with no server at all.
#[test]
fn the_client_exits_0_after_n_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_greeter-client"))
        .env_remove("REGISTRY_URL")
        .arg("--registry")
        .arg(format!("localdir://{}?file=false", dir.path().display()))
        .args([
            "--requests",
            "3",
            "--interval",
            "10ms",
            "--timeout",
            "200ms",
        ])
        .output()
        .expect("run greeter-client");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["error: no reply within 200ms"; 3]);
}

/// Bad input: one line on stderr, exit code 2.
#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: [(&str, &[&str], &str); 5] = [
        (
            "greeter-client",
            &["--registry", "localdir:///tmp/x", "--requests", "x"],
            "--requests",
        ),
        ("greeter-client", &["--requests", "1"], "--registry"),
        (
            "greeter-client",
            &["--registry", "nosuch://h:1", "--requests", "1"],
            "nosuch",
        ),
        (
            "greeter-server",
            &["--registry", "localdir:///tmp/x", "--port", "0"],
            "--port",
        ),
        (
            "greeter-client",
            &[
                "--registry",
                "localdir:///tmp/x",
                "--requests",
                "1",
                "--interval",
                "soon",
            ],
            "--interval",
        ),
    ];
    for (bin, args, names) in cases {
        let path = if bin == "greeter-client" {
            env!("CARGO_BIN_EXE_greeter-client")
        } else {
            env!("CARGO_BIN_EXE_greeter-server")
        };
        let out = Command::new(path)
            .env_remove("REGISTRY_URL")
            .args(args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{bin} {args:?}: {err}");
        assert!(err.contains(names), "{bin} {args:?}: {err}");
    }
}
