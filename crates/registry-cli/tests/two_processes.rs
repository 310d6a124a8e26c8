//! registryctl as two processes against a real server: `register` in one, `watch --json` in
//! the other; the first is killed (SIGKILL, so it cannot unregister) and the list is seen to
//! shrink when the server drops its session or lease. Needs the servers of `cargo xtask test`.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use registry_test_servers::{Kind, shared_address};

const DEADLINE: Duration = Duration::from_secs(30);

fn ctl(registry: &str, args: &[&str]) -> Child {
    Command::cargo_bin("registryctl")
        .expect("registryctl")
        .env_remove("REGISTRY_URL")
        .arg("--registry")
        .arg(registry)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn registryctl")
}

/// Lines of a child's stdout, read on a thread, so waits can have deadlines.
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

/// Waits for a `watch --json` line whose provider count is `n`.
fn wait_count(rx: &mpsc::Receiver<String>, n: usize) -> serde_json::Value {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < DEADLINE,
            "no list of {n} providers within {DEADLINE:?}"
        );
        let line = next_line(rx, &format!("a list of {n} providers"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        let urls = v["urls"].as_array().expect("urls");
        let real = urls
            .iter()
            .filter(|u| !u.as_str().unwrap_or("").starts_with("empty://"))
            .count();
        if real == n {
            return v;
        }
    }
}

fn scenario(registry: &str) {
    let service = format!("org.apache.dubbo.cli.Two{}", std::process::id());
    let provider = format!("tri://10.0.0.1:50051/{service}?application=cli-two&side=provider");
    let query = format!("consumer://10.0.0.9/{service}");
    let mut watch = ctl(registry, &["watch", &query, "--json", "--count", "3"]);
    let watched = lines(watch.stdout.take().unwrap());
    wait_count(&watched, 0);
    let mut reg = ctl(registry, &["register", &provider]);
    let registered = lines(reg.stdout.take().unwrap());
    assert!(next_line(&registered, "registered").starts_with("registered "));
    let v = wait_count(&watched, 1);
    assert_eq!(v["urls"][0], provider.as_str());
    let killed = Instant::now();
    reg.kill().unwrap();
    reg.wait().unwrap();
    let v = wait_count(&watched, 0);
    assert!(v["urls"][0].as_str().unwrap().starts_with("empty://"));
    eprintln!(
        "{registry}: the killed provider left the list after {:?}",
        killed.elapsed()
    );
    let status = watch.wait().unwrap();
    assert!(status.success(), "watch --count 3 exits 0");
}

#[test]
fn etcd_register_watch_kill() {
    let Some(addr) = shared_address(Kind::Etcd, "etcd_register_watch_kill") else {
        return;
    };
    // A short lease so the killed provider's entry expires quickly.
    scenario(&format!("etcd://{addr}?session=4000&file=false"));
}

#[test]
fn zookeeper_register_watch_kill() {
    let Some(addr) = shared_address(Kind::Zookeeper, "zookeeper_register_watch_kill") else {
        return;
    };
    // A short session so the killed provider's ephemeral node goes quickly.
    scenario(&format!("zookeeper://{addr}?session=4000&file=false"));
}
