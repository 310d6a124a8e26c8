//! registryctl end to end, as a separate process, against memory://: every subcommand and
//! every bad-input case.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;

fn ctl() -> Command {
    let mut c = Command::cargo_bin("registryctl").expect("the registryctl binary");
    c.env_remove("REGISTRY_URL");
    c
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Out {
    let o = ctl().args(args).output().expect("run registryctl");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

const PROVIDER: &str = "tri://10.0.0.1:50051/com.example.Greeter?application=cli-test&version=1.0";
const QUERY: &str = "consumer://10.0.0.9/com.example.Greeter?version=1.0";

#[test]
fn schemes_lists_the_registered_backends() {
    let o = run(&["schemes"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.lines().any(|l| l == "memory"), "{}", o.stdout);
}

#[test]
fn lookup_list_and_unregister_on_an_empty_registry() {
    let o = run(&["--registry", "memory://cli", "lookup", QUERY]);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{}", o.stderr);
    let o = run(&["--registry", "memory://cli", "list"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("SERVICE"), "{}", o.stdout);
    let o = run(&["--registry", "memory://cli", "unregister", PROVIDER]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn watch_json_prints_the_empty_marker_and_stops_after_count() {
    let o = run(&[
        "-r",
        "memory://cli",
        "watch",
        QUERY,
        "--count",
        "1",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.stdout);
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON object per line");
    assert_eq!(v["category"], "providers");
    assert_eq!(v["source"], "live");
    assert!(v["revision"].is_u64());
    let urls = v["urls"].as_array().expect("urls");
    assert_eq!(urls.len(), 1);
    assert!(
        urls[0]
            .as_str()
            .unwrap()
            .starts_with("empty://10.0.0.9/com.example.Greeter?"),
        "{urls:?}"
    );
}

#[test]
fn register_for_a_fixed_time_then_exits() {
    let o = run(&["-r", "memory://cli", "register", PROVIDER, "--for", "50ms"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("registered tri://10.0.0.1:50051/com.example.Greeter"),
        "{}",
        o.stdout
    );
}

#[test]
fn the_registry_comes_from_registry_url_too() {
    let o = ctl()
        .env("REGISTRY_URL", "memory://from-env")
        .args(["lookup", QUERY])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[cfg(unix)]
#[test]
fn sigterm_unregisters_and_exits_zero() {
    let mut child = ctl()
        .args(["-r", "memory://cli", "register", PROVIDER])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("registered"), "{line}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "registryctl did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// Bad input: exit code 2, exactly one line on stderr naming the problem, no panic.
fn bad(args: &[&str], needle: &str) {
    let o = run(args);
    assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{args:?}: {}", o.stderr);
    assert_eq!(
        o.stderr.trim_end().lines().count(),
        1,
        "{args:?}: {}",
        o.stderr
    );
    assert!(
        o.stderr.contains(needle),
        "{args:?}: expected {needle:?} in {}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "{args:?}: {}", o.stdout);
}

#[test]
fn bad_input_is_one_line_and_exit_code_two() {
    bad(
        &["-r", "memory://cli", "lookup", "not a url"],
        "bad query URL",
    );
    bad(
        &["-r", "memory://cli", "register", "://10.0.0.1:1/x"],
        "missing protocol",
    );
    bad(
        &["-r", "memory://cli", "register", "tri://10.0.0.1:99999/x"],
        "port",
    );
    bad(&["-r", "nacos://10.0.0.1:8848", "lookup", QUERY], "`nacos`");
    bad(&["-r", "nacos://10.0.0.1:8848", "lookup", QUERY], "memory");
    bad(&["-r", "memory://cli:70000", "lookup", QUERY], "port");
    bad(&["-r", "memory://0.0.0.0", "lookup", QUERY], "anyhost");
    bad(&["lookup", QUERY], "REGISTRY_URL");
    bad(
        &["-r", "memory://cli", "register", PROVIDER, "--for", "soon"],
        "soon",
    );
}

#[test]
fn usage_errors_exit_two() {
    bad(&["frobnicate"], "frobnicate");
    bad(&["-r", "memory://cli", "register"], "<URLS>");
    let o = run(&["--help"]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("watch"), "{}", o.stdout);
}
