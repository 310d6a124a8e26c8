//! `registryctl register|watch --metrics ADDR`: the Prometheus endpoint is scraped over HTTP
//! while the processes run, on the `localdir://` backend (a directory the two processes share),
//! so no server is needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;

const DEADLINE: Duration = Duration::from_secs(30);

fn ctl() -> Command {
    let mut c = Command::cargo_bin("registryctl").expect("the registryctl binary");
    c.env_remove("REGISTRY_URL");
    c
}

/// Kills the child when the test ends, whatever happened.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = ctl()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn registryctl");
    let out = lines(child.stdout.take().expect("stdout"));
    (Running(child), out)
}

fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("no line within {DEADLINE:?} while waiting for {what}"))
}

/// One `GET /metrics`: the status line, the content type and the body.
fn get(addr: &str) -> std::io::Result<(String, String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.lines().next().unwrap_or("").to_owned();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

/// Scrapes `addr` until every sample in `want` (a full line of the text format) is there.
fn scrape_until(addr: &str, want: &[&str]) -> String {
    let start = Instant::now();
    let mut last = String::from("(no answer yet)");
    while start.elapsed() < DEADLINE {
        if let Ok((status, content_type, body)) = get(addr) {
            assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
            assert!(content_type.starts_with("text/plain"), "{content_type}");
            if want.iter().all(|w| body.lines().any(|l| l == *w)) {
                return body;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr} did not serve {want:?} within {DEADLINE:?}; last answer:\n{last}");
}

fn free_addr() -> String {
    let port = registry_test_servers::free_port().expect("a free port");
    format!("127.0.0.1:{port}")
}

#[test]
fn register_and_watch_serve_prometheus_metrics() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let registry = format!("localdir://{}?file=false", dir.path().display());
    let service = format!("org.example.Metrics{}", std::process::id());
    let provider = format!("tri://10.0.0.1:50051/{service}?application=metrics-test");
    let query = format!("consumer://10.0.0.9/{service}");
    let version = env!("CARGO_PKG_VERSION");

    let reg_addr = free_addr();
    let (_reg, reg_out) = spawn(&[
        "-r",
        &registry,
        "register",
        "--metrics",
        &reg_addr,
        &provider,
    ]);
    assert!(next_line(&reg_out, "registered").starts_with("registered "));
    let body = scrape_until(
        &reg_addr,
        &[
            &format!("registryctl_build_info{{version=\"{version}\"}} 1"),
            "registryctl_registered_urls{scheme=\"localdir\"} 1",
            "registryctl_backend_up{scheme=\"localdir\"} 1",
            // From the reliability layer.
            "registry_registrations{scheme=\"localdir\",state=\"ok\"} 1",
        ],
    );
    assert!(
        body.contains("# TYPE registryctl_registered_urls gauge"),
        "{body}"
    );

    let watch_addr = free_addr();
    let (_watch, watch_out) = spawn(&[
        "-r",
        &registry,
        "watch",
        "--json",
        "--metrics",
        &watch_addr,
        &query,
    ]);
    let first: serde_json::Value =
        serde_json::from_str(&next_line(&watch_out, "the first list")).expect("a JSON line");
    assert_eq!(first["urls"][0], provider.as_str(), "{first}");
    let body = scrape_until(
        &watch_addr,
        &[
            "registryctl_watched_entries{category=\"providers\"} 1",
            "registryctl_notifications_total{source=\"live\"} 1",
            "registryctl_backend_up{scheme=\"localdir\"} 1",
            // From the reliability layer.
            "registry_subscriptions{scheme=\"localdir\",state=\"ok\"} 1",
            "registry_notifications_total{scheme=\"localdir\",source=\"live\"} 1",
        ],
    );
    assert!(
        body.contains("# TYPE registryctl_notifications_total counter"),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("registryctl_last_notification_timestamp_seconds ")),
        "{body}"
    );
}

#[test]
fn a_metrics_address_in_use_or_malformed_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let o = ctl()
        .args([
            "-r",
            "memory://metrics-error",
            "register",
            "--metrics",
            &addr,
            "tri://10.0.0.1:50051/org.example.Taken",
        ])
        .output()
        .expect("run registryctl");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!("registryctl: cannot serve metrics on {addr}: ")),
        "{stderr}"
    );
    assert!(o.stdout.is_empty(), "nothing was registered");

    let o = ctl()
        .args([
            "-r",
            "memory://x",
            "watch",
            "--metrics",
            "nonsense",
            "consumer://1.2.3.4/x",
        ])
        .output()
        .expect("run registryctl");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'nonsense' for '--metrics <ADDR>'"),
        "{stderr}"
    );
}
