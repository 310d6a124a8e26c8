//! The disk cache across real processes: registryctl watchers on one host share a registry's
//! cache file without losing each other's lists, a later process started with the backend
//! down is served every list from it, and a restart of a backend whose revisions start again
//! at 1 (localdir) replaces the cached list. Each child gets its own `XDG_CACHE_HOME`, so the
//! default file location and name are the ones in use.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

struct Ctl {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Ctl {
    fn start(registry: &str, cache_home: &Path, args: &[&str]) -> Ctl {
        let mut child = Command::cargo_bin("registryctl")
            .expect("registryctl")
            .env_remove("REGISTRY_URL")
            .env("XDG_CACHE_HOME", cache_home)
            .arg("--registry")
            .arg(registry)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn registryctl");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| Value::String(line.clone()));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Ctl { child, lines }
    }

    /// Waits for a `watch --json` line of `service` whose entries (markers left out) are
    /// `want`; returns it.
    fn wait_list(&self, service: &str, want: &[&str]) -> Value {
        let mut want: Vec<&str> = want.to_vec();
        want.sort();
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no list {want:?} of {service} within {DEADLINE:?}"));
            if v["service"] != service {
                continue;
            }
            let mut got: Vec<&str> = v["urls"]
                .as_array()
                .expect("urls")
                .iter()
                .filter_map(Value::as_str)
                .filter(|u| !u.starts_with("empty://"))
                .collect();
            got.sort();
            if got == want {
                return v;
            }
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, so the process unregisters and destroys its registry; waits for the exit.
    fn terminate(mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < DEADLINE,
                "registryctl did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one cache file under `cache_home`, once there is one.
fn the_file(cache_home: &Path) -> Option<PathBuf> {
    let dir = cache_home.join("rust-registry");
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert!(files.len() <= 1, "one registry, one file: {files:?}");
    files.into_iter().next()
}

/// The saved (service, revision, sorted urls) of each list in the file.
fn saved(cache_home: &Path, service: &str) -> Option<(u64, Vec<String>)> {
    let file = the_file(cache_home)?;
    let v: Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    let l = v["services"][service]
        .as_array()?
        .iter()
        .find(|l| l["category"] == "providers")?;
    let mut urls: Vec<String> = l["urls"]
        .as_array()?
        .iter()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect();
    urls.sort();
    Some((l["revision"].as_u64()?, urls))
}

fn wait_saved(cache_home: &Path, want: &[(&str, &[&str])]) {
    let start = Instant::now();
    loop {
        let ok = want.iter().all(|(s, urls)| {
            let mut urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
            urls.sort();
            saved(cache_home, s).is_some_and(|(_, got)| got == urls)
        });
        if ok {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the cache file never held {want:?}; it holds {:?}",
            the_file(cache_home).and_then(|f| std::fs::read_to_string(f).ok())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Two watchers of different services on one real ZooKeeper save into one file; ZooKeeper is
// stopped; a third process with check=false is served both services from the cache.
#[test]
fn processes_share_the_cache_and_a_cold_start_gets_every_list() {
    let mut server = match registry_test_servers::Server::zookeeper() {
        Ok(s) => s,
        Err(e) if !registry_test_servers::required() => {
            eprintln!("processes_share_the_cache: skipped, no private ZooKeeper: {e}");
            return;
        }
        Err(e) => panic!("cannot start a private ZooKeeper: {e}"),
    };
    let home = tempfile::tempdir().unwrap();
    let registry = format!(
        "zookeeper://{}?session=4000&timeout=2000&file.debounce=10",
        server.address()
    );
    let id = std::process::id();
    let (x, y) = (
        format!("org.apache.dubbo.cache.X{id}"),
        format!("org.apache.dubbo.cache.Y{id}"),
    );
    let px = format!("tri://10.0.0.1:50051/{x}?application=cache-x&side=provider");
    let px2 = format!("tri://10.0.0.2:50051/{x}?application=cache-x&side=provider");
    let py = format!("tri://10.0.0.3:50051/{y}?application=cache-y&side=provider");
    let (qx, qy) = (
        format!("consumer://10.0.0.9/{x}"),
        format!("consumer://10.0.0.9/{y}"),
    );

    let providers = Ctl::start(&registry, home.path(), &["register", &px, &py]);
    let a = Ctl::start(&registry, home.path(), &["watch", &qx, "--json"]);
    let b = Ctl::start(&registry, home.path(), &["watch", &qy, "--json"]);
    a.wait_list(&x, &[&px]);
    b.wait_list(&y, &[&py]);
    wait_saved(home.path(), &[(&x, &[&px]), (&y, &[&py])]);
    // X changes after Y was saved: A's save must keep B's list.
    let more = Ctl::start(&registry, home.path(), &["register", &px2]);
    a.wait_list(&x, &[&px, &px2]);
    wait_saved(home.path(), &[(&x, &[&px, &px2]), (&y, &[&py])]);

    let file = the_file(home.path()).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let port = server.address().rsplit(':').next().unwrap().to_owned();
    assert!(
        name.starts_with(&format!("zookeeper-127.0.0.1_{port}-")),
        "{name}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(file.parent().unwrap()), 0o700, "a private directory");
        assert_eq!(mode(&file), 0o600, "a private file");
    }

    for c in [a, b, providers, more] {
        c.kill();
    }
    server.stop();

    let cold = format!("{registry}&check=false");
    let c = Ctl::start(&cold, home.path(), &["watch", &qx, &qy, "--json"]);
    let vx = c.wait_list(&x, &[&px, &px2]);
    let vy = c.wait_list(&y, &[&py]);
    assert_eq!(vx["source"], "cache", "{vx}");
    assert_eq!(vy["source"], "cache", "{vy}");
    c.kill();
}

// localdir numbers revisions afresh in each process. The first run leaves a list at a
// revision above 1; after a restart the live list arrives at a lower revision and must
// replace the cached one on disk.
#[test]
fn a_restart_replaces_the_cached_list_whatever_its_revision() {
    let shared = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let registry = format!(
        "localdir://{}?poll=50&file.debounce=10",
        shared.path().display()
    );
    let s = format!("org.apache.dubbo.cache.Restart{}", std::process::id());
    let q = format!("consumer://10.0.0.9/{s}");
    let u = |n: u8| format!("tri://10.0.0.{n}:50051/{s}?application=restart&side=provider");
    let (u1, u2, u3) = (u(1), u(2), u(3));
    // The providers keep out of the cache file, so only the watchers write it.
    let providers = format!("{registry}&file=false");

    let w1 = Ctl::start(&registry, home.path(), &["watch", &q, "--json"]);
    w1.wait_list(&s, &[]);
    let r1 = Ctl::start(&providers, home.path(), &["register", &u1]);
    w1.wait_list(&s, &[&u1]);
    let r2 = Ctl::start(&providers, home.path(), &["register", &u2]);
    w1.wait_list(&s, &[&u1, &u2]);
    r2.terminate();
    let last = w1.wait_list(&s, &[&u1]);
    let first_run = last["revision"].as_u64().unwrap();
    wait_saved(home.path(), &[(&s, &[&u1])]);
    assert_eq!(saved(home.path(), &s).unwrap().0, first_run);
    w1.terminate();

    r1.terminate();
    let _r3 = Ctl::start(&providers, home.path(), &["register", &u3]);
    let w2 = Ctl::start(&registry, home.path(), &["watch", &q, "--json"]);
    let live = w2.wait_list(&s, &[&u3]);
    assert_eq!(live["source"], "live");
    let second_run = live["revision"].as_u64().unwrap();
    eprintln!(
        "first run saved revision {first_run}; the restarted one's live list has {second_run}"
    );
    assert!(
        second_run < first_run,
        "the scenario needs the new run's revision ({second_run}) below the old one ({first_run})"
    );
    wait_saved(home.path(), &[(&s, &[&u3])]);
    assert_eq!(saved(home.path(), &s).unwrap().0, second_run);
}
