//! `cargo xtask <task>`: the project's tasks, in Rust so they run wherever cargo does
//! (matklad's xtask pattern; the alias is in `.cargo/config.toml`).
//!
//! - `demo`: runs `examples/quickstart` on `memory://` (or on `REGISTRY_URL` when set).
//! - `test`: starts ZooKeeper and etcd (installing Debian's packages when missing and running
//!   as root), exports their addresses, runs every test of the workspace, stops them.
//! - `bench`: starts ZooKeeper and etcd, runs `registry-bench` in release mode against them
//!   (ours against the raw clients; `--quick` for small sizes), stops them.
//! - `soak [--cases N] [--time 10m] [--seed S]`: runs the reliability layer's randomized model
//!   test (crates/registry-failback/tests/model.rs) in release mode for many cases.
//! - `servers`: starts ZooKeeper and etcd, prints their addresses, runs until Ctrl-C;
//!   `servers --cluster`: a 3-member etcd cluster and a 3-server ZooKeeper ensemble instead,
//!   with commands on stdin to inject faults (`help` lists them).
//! - `fuzz [--time 60s] [--runs N] [--sanitizer address] [TARGET...] [-- LIBFUZZER ARGS]`:
//!   builds the cargo-fuzz targets in `fuzz/` with the nightly toolchain (installing
//!   cargo-fuzz when missing) and runs each for the given time (see fuzz/README.md).
//! - `clippy`: `cargo clippy --workspace --all-targets -- -D warnings` (with `PROTOC` set).
//! - `package`: `cargo package --workspace` for every crate that may be published (members with
//!   `publish = false` are excluded), each verified by a build against crates.io dependencies —
//!   with `PROTOC` set, as a user of `registry-etcd` sets it (the workspace's etcd-client patch
//!   does not apply there).
//! - `ci`: `cargo fmt --check`, `clippy`, then `test`.

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use registry_test_servers::{
    Cluster, ClusterOptions, ETCD_ENV, Kind, REQUIRE_ENV, Server, ZOOKEEPER_ENV, ensure_installed,
};

const USAGE: &str =
    "usage: cargo xtask <demo|test|bench|soak|fuzz|servers|clippy|package|ci> [args]

  demo   run examples/quickstart on memory:// (set REGISTRY_URL to use another backend)
  test   start ZooKeeper and etcd, run every test of the workspace against them, stop them
  bench  start ZooKeeper and etcd, benchmark ours against the raw clients on them, stop them
         (`--quick`: small sizes; `--only scale,fanout`: some workloads; `--backend etcd`;
         results in target/bench/{results.jsonl,report.md})
  soak   run the reliability layer's model test for many cases, in release mode
         (`--cases 100000` (default) or `--time 10m`; `--seed S` to start from a seed)
  fuzz   build the fuzz targets (nightly; installs cargo-fuzz when missing) and run each
         (`--time 60s` each (default), `--runs N`, `--sanitizer address|none` (default none),
         target names to run only those, `-- ARGS` for libFuzzer)
  servers  start ZooKeeper and etcd on free loopback ports until Ctrl-C
         (`--cluster`: 3-member clusters of each, with fault commands on stdin)
  clippy cargo clippy on every target, warnings as errors
  package  cargo package --workspace, without the members that have publish = false
  ci     cargo fmt --check, cargo clippy -D warnings, then test";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result = match task.as_deref() {
        Some("demo") => demo(&rest),
        Some("test") => test(&rest),
        Some("bench") => bench(&rest),
        Some("soak") => soak(&rest),
        Some("fuzz") => fuzz(&rest),
        Some("servers") => servers(&rest),
        Some("ci") => ci(&rest),
        Some("clippy") => clippy(&rest),
        Some("package") => package(&rest),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task `{other}`\n{USAGE}")),
        None => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// A `cargo` command in the workspace root, with `PROTOC` set when no `protoc` is on PATH, so
/// crates that compile protobuf (etcd-client) build on a machine without a system package.
fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(root());
    if env::var_os("PROTOC").is_none() && !on_path("protoc") {
        match protoc_bin_vendored::protoc_bin_path() {
            Ok(p) => {
                cmd.env("PROTOC", p);
            }
            Err(e) => {
                eprintln!("xtask: no protoc on PATH and no vendored one for this platform: {e}")
            }
        }
    }
    cmd
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn run(mut cmd: Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn demo(rest: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--package", "quickstart", "--"])
        .args(rest);
    run(cmd)
}

/// Starts both servers, installing them first when needed.
fn start_servers() -> Result<(Server, Server), String> {
    ensure_installed(&[Kind::Zookeeper, Kind::Etcd])?;
    let zk = Server::zookeeper()?;
    let etcd = Server::etcd()?;
    eprintln!(
        "xtask: ZooKeeper on {} and etcd on {} (data in {} and {})",
        zk.address(),
        etcd.address(),
        zk.dir().display(),
        etcd.dir().display()
    );
    Ok((zk, etcd))
}

fn test(rest: &[String]) -> Result<(), String> {
    let (zk, etcd) = start_servers()?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--all-features"])
        .args(rest)
        .env(ZOOKEEPER_ENV, zk.address())
        .env(ETCD_ENV, etcd.address())
        .env(REQUIRE_ENV, "1");
    let result = run(cmd);
    drop((zk, etcd));
    result
}

/// Builds the bench binary in release mode, then runs it against fresh servers. Arguments
/// go to the binary (`--quick`, `--only register,notify`, `--backend etcd`).
fn bench(rest: &[String]) -> Result<(), String> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "registry-bench",
    ]);
    run(build)?;
    let (zk, etcd) = start_servers()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "registry-bench",
        "--",
        "--zookeeper",
    ])
    .arg(zk.address())
    .arg("--etcd")
    .arg(etcd.address())
    .arg("--out")
    .arg(root().join("target").join("bench"))
    .args(rest);
    let result = run(cmd);
    // A server that died during the run (out of memory, say) takes its log with it: show it.
    let (mut zk, mut etcd) = (zk, etcd);
    for (name, server) in [("ZooKeeper", &mut zk), ("etcd", &mut etcd)] {
        if !server.is_running() {
            eprintln!(
                "xtask: {name} was no longer running at the end of the bench; its log:\n{}",
                server.log_tail()
            );
        }
    }
    drop((zk, etcd));
    result
}

/// Runs the model test of registry-failback with a case count or a time budget. A failure
/// prints the seed and the plan that reproduce it.
fn soak(rest: &[String]) -> Result<(), String> {
    let mut cases: Option<String> = None;
    let mut time: Option<String> = None;
    let mut seed: Option<String> = None;
    let mut args = rest.iter();
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--cases" => {
                let v = value("--cases")?;
                v.parse::<u64>()
                    .map_err(|_| format!("--cases takes a number, not `{v}`"))?;
                cases = Some(v);
            }
            "--time" => {
                let v = value("--time")?;
                let d = humantime::parse_duration(&v)
                    .map_err(|e| format!("--time takes a duration such as 90s or 10m: {e}"))?;
                time = Some(d.as_secs().max(1).to_string());
            }
            "--seed" => {
                let v = value("--seed")?;
                v.parse::<u64>()
                    .map_err(|_| format!("--seed takes a number, not `{v}`"))?;
                seed = Some(v);
            }
            other => return Err(format!("soak: unknown argument `{other}`\n{USAGE}")),
        }
    }
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "--package",
        "registry-failback",
        "--test",
        "model",
        "--",
        "--nocapture",
    ]);
    match (&time, &cases) {
        (Some(t), _) => {
            cmd.env("MODEL_TIME_SECS", t);
        }
        (None, Some(c)) => {
            cmd.env("MODEL_CASES", c);
        }
        (None, None) => {
            cmd.env("MODEL_CASES", "100000");
        }
    }
    // Each soak starts somewhere new unless told where.
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
            .to_string()
    });
    println!("soak: first seed {seed}");
    cmd.env("MODEL_SEED", seed);
    cmd.env("MODEL_PARALLEL", "32");
    run(cmd)
}

/// Runs the cargo-fuzz targets of `fuzz/` (its own crate, outside the workspace): installs
/// cargo-fuzz when missing, builds every target once with nightly (the workspace stays on
/// stable), then runs each target on its corpus (`fuzz/corpus/T`, not checked in) and its
/// checked-in seeds (`fuzz/seeds/T`) with its dictionary. libFuzzer's output goes to
/// `fuzz/artifacts/T.log`; the final statistics are printed. A crash fails the task and names
/// the input libFuzzer saved.
fn fuzz(rest: &[String]) -> Result<(), String> {
    let mut secs: u64 = 60;
    let mut runs: Option<u64> = None;
    let mut sanitizer = "none".to_owned();
    let mut only: Vec<String> = Vec::new();
    let mut extra: Vec<String> = Vec::new();
    let mut args = rest.iter();
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--time" => {
                let v = value("--time")?;
                let d = humantime::parse_duration(&v)
                    .map_err(|e| format!("--time takes a duration such as 20s or 30m: {e}"))?;
                secs = d.as_secs().max(1);
            }
            "--runs" => {
                let v = value("--runs")?;
                runs = Some(
                    v.parse()
                        .map_err(|_| format!("--runs takes a number, not `{v}`"))?,
                );
            }
            "--sanitizer" => sanitizer = value("--sanitizer")?,
            "--" => {
                extra.extend(args.by_ref().cloned());
            }
            t if !t.starts_with('-') => only.push(t.to_owned()),
            other => return Err(format!("fuzz: unknown argument `{other}`\n{USAGE}")),
        }
    }

    let fuzz_dir = root().join("fuzz");
    ensure_cargo_fuzz()?;
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        eprintln!("xtask: no nightly toolchain; building the fuzz targets with RUSTC_BOOTSTRAP=1");
    }
    // `cargo +nightly fuzz ...` through rustup's proxy on PATH, not the stable cargo running
    // xtask; with `PROTOC` as `cargo()` sets it.
    let cargo_fuzz = || {
        let mut cmd = Command::new("cargo");
        for (k, v) in cargo().get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.current_dir(root())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC");
        if nightly {
            cmd.arg("+nightly");
        } else {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd.arg("fuzz");
        cmd
    };

    let listed = cargo_fuzz()
        .arg("list")
        .output()
        .map_err(|e| format!("cannot run cargo fuzz list: {e}"))?;
    if !listed.status.success() {
        return Err(format!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        ));
    }
    let all: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    for t in &only {
        if !all.contains(t) {
            return Err(format!(
                "no fuzz target `{t}`; the targets: {}",
                all.join(", ")
            ));
        }
    }
    let targets = if only.is_empty() { all } else { only };

    let started = std::time::Instant::now();
    let mut build = cargo_fuzz();
    build.args(["build", "--sanitizer", &sanitizer]);
    run(build)?;
    eprintln!(
        "xtask: built the fuzz targets in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let artifacts = fuzz_dir.join("artifacts");
    let mut failed = Vec::new();
    for t in &targets {
        let corpus = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .and_then(|()| std::fs::create_dir_all(&artifacts))
            .map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(t);
        let dict = [
            fuzz_dir.join("dict").join(format!("{t}.dict")),
            fuzz_dir.join("dict").join("url.dict"),
        ]
        .into_iter()
        .find(|d| d.is_file());
        let log_path = artifacts.join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let mut cmd = cargo_fuzz();
        cmd.args(["run", "--sanitizer", &sanitizer, t]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/{t}-", artifacts.display()));
        if let Some(d) = dict {
            cmd.arg(format!("-dict={}", d.display()));
        }
        if let Some(n) = runs {
            cmd.arg(format!("-runs={n}"));
        }
        cmd.args(&extra);
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        cmd.stdout(log).stderr(log_err);
        eprintln!(
            "xtask: fuzzing {t} for {secs} s (log: {})",
            log_path.display()
        );
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run cargo fuzz run {t}: {e}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if status.success() {
            for l in lines.iter().filter(|l| {
                l.starts_with("stat::number_of_executed_units")
                    || l.starts_with("stat::average_exec_per_sec")
                    || l.contains("DONE")
            }) {
                println!("{t}: {l}");
            }
        } else {
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{t}: {l}");
            }
            eprintln!(
                "xtask: {t} FAILED ({status}); the input is saved under {} (see `Test unit written`). \
                 Reproduce: cargo +nightly fuzz run -s {sanitizer} {t} <that file>. Fix it and add it \
                 as a regression test in the crate's own tests.",
                artifacts.display()
            );
            failed.push(t.clone());
        }
    }
    if failed.is_empty() {
        println!("fuzz: {} passed, 0 failed", targets.len());
        Ok(())
    } else {
        Err(format!("fuzz targets found crashes: {}", failed.join(", ")))
    }
}

/// Installs cargo-fuzz from crates.io (with its lock file) when `cargo fuzz` is missing.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "cargo-fuzz", "--locked"]);
    run(cmd)
}

fn servers(rest: &[String]) -> Result<(), String> {
    match rest {
        [] => {}
        [a] if a == "--cluster" => return clusters(),
        _ => return Err(format!("servers: unknown arguments {rest:?}\n{USAGE}")),
    }
    let (zk, etcd) = start_servers()?;
    println!("export {ZOOKEEPER_ENV}={}", zk.address());
    println!("export {ETCD_ENV}={}", etcd.address());
    println!(
        "# REGISTRY_URL=zookeeper://{} or etcd://{}; Ctrl-C stops both",
        zk.address(),
        etcd.address()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| format!("cannot catch Ctrl-C: {e}"))?;
    let _ = rx.recv();
    drop((zk, etcd));
    Ok(())
}

const CLUSTER_HELP: &str = "commands: status | leader <etcd|zk> | kill <etcd|zk> <member> | \
restart <etcd|zk> <member> | pause <etcd|zk> <member> | resume <etcd|zk> <member> | \
isolate <etcd|zk> <member> | heal <etcd|zk> <member> | delay <etcd|zk> <member> <ms> | \
repair | quit   (members count from 0; delay 0 ends a delay)";

/// `servers --cluster`: both clusters until Ctrl-C, end of input or `quit`, taking fault
/// commands on stdin.
fn clusters() -> Result<(), String> {
    ensure_installed(&[Kind::Zookeeper, Kind::Etcd])?;
    let started = std::time::Instant::now();
    let zk = std::thread::spawn(|| Cluster::start(Kind::Zookeeper, ClusterOptions::default()));
    let etcd = Cluster::start(Kind::Etcd, ClusterOptions::default());
    let zk = zk.join().map_err(|_| "the ZooKeeper start panicked")??;
    let etcd = etcd?;
    eprintln!(
        "xtask: clusters up in {:.1?}; {} MiB resident (ZooKeeper {} MiB, etcd {} MiB)",
        started.elapsed(),
        (zk.memory_bytes() + etcd.memory_bytes()) >> 20,
        zk.memory_bytes() >> 20,
        etcd.memory_bytes() >> 20
    );
    println!("# ZooKeeper ensemble: zookeeper://{}", zk.connect_string());
    println!("# etcd cluster:       etcd://{}", etcd.connect_string());
    println!(
        "# data in {} and {}",
        zk.dir().display(),
        etcd.dir().display()
    );
    println!("# {CLUSTER_HELP}");
    let clusters = std::sync::Arc::new(std::sync::Mutex::new((zk, etcd)));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let ctrl = tx.clone();
    ctrlc::set_handler(move || {
        let _ = ctrl.send(());
    })
    .map_err(|e| format!("cannot catch Ctrl-C: {e}"))?;
    let shared = clusters.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"quit") {
                break;
            }
            let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
            let (zk, etcd) = &mut *guard;
            match cluster_command(zk, etcd, &words) {
                Ok(out) => println!("{out}"),
                Err(e) => println!("error: {e}"),
            }
        }
        let _ = tx.send(());
    });
    let _ = rx.recv();
    // Dropping the clusters kills every member and removes their directories.
    drop(clusters.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(())
}

fn cluster_command(zk: &mut Cluster, etcd: &mut Cluster, words: &[&str]) -> Result<String, String> {
    let status = |c: &mut Cluster| format!("{:?}: {:?}", c.kind(), c.states());
    let pick = |name: Option<&&str>| match name.copied() {
        Some("etcd") => Ok(true),
        Some("zk" | "zookeeper") => Ok(false),
        other => Err(format!("which cluster: etcd or zk, not {other:?}")),
    };
    match words {
        [] => Ok(String::new()),
        ["status"] => Ok(format!("{}\n{}", status(zk), status(etcd))),
        ["repair"] => {
            let within = std::time::Duration::from_secs(60);
            zk.repair(within)?;
            etcd.repair(within)?;
            Ok(format!("{}\n{}", status(zk), status(etcd)))
        }
        ["help"] => Ok(CLUSTER_HELP.to_owned()),
        ["delay", which, member, ms] => {
            let c = if pick(Some(which))? { etcd } else { zk };
            let member: usize = member
                .parse()
                .ok()
                .filter(|m| *m < c.size())
                .ok_or_else(|| format!("member: 0 to {}, not `{member}`", c.size() - 1))?;
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("delay: milliseconds, not `{ms}`"))?;
            c.delay(member, std::time::Duration::from_millis(ms));
            Ok(status(c))
        }
        [op, which, rest @ ..] => {
            let c = if pick(Some(which))? { etcd } else { zk };
            if *op == "leader" {
                return Ok(format!("leader: {:?}", c.leader()));
            }
            let member: usize = match rest {
                [m] => m
                    .parse()
                    .ok()
                    .filter(|m| *m < c.size())
                    .ok_or_else(|| format!("member: 0 to {}, not `{m}`", c.size() - 1))?,
                _ => {
                    return Err(format!(
                        "`{op}` takes a cluster and a member\n{CLUSTER_HELP}"
                    ));
                }
            };
            match *op {
                "kill" => c.kill(member),
                "restart" => c.restart(member)?,
                "pause" => c.pause(member)?,
                "resume" => c.resume(member)?,
                "isolate" => c.isolate(member),
                "heal" => c.heal(member),
                other => return Err(format!("unknown command `{other}`\n{CLUSTER_HELP}")),
            }
            Ok(status(c))
        }
        _ => Err(format!("unknown command\n{CLUSTER_HELP}")),
    }
}

fn ci(rest: &[String]) -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    clippy(&[])?;
    test(rest)
}

fn clippy(rest: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["clippy", "--workspace", "--all-targets", "--all-features"])
        .args(rest)
        .args(["--", "-D", "warnings"]);
    run(cmd)
}

/// `cargo package --workspace`, excluding the members with `publish = false` (their path
/// dependencies carry no version, so they cannot be packaged, and nobody installs them).
/// Removes cargo's unpacked copies of this workspace's own packaged crates.
///
/// `cargo package --workspace` verifies each crate against the others through a local
/// registry in `target/package/tmp-registry`, and cargo unpacks that registry's crates into
/// `$CARGO_HOME/registry/src/-<hash of the registry's path>/<name>-<version>`. Cargo never
/// unpacks a crate again once that directory exists (registry crates are immutable by
/// version), so a second run at the same path with the same version number verifies against
/// the sources of the first run: a module added since then is "not found". Local registries
/// are the only sources whose directory name starts with `-` (no host name), and only this
/// workspace's `<name>-<version>` directories are removed.
fn forget_unpacked_workspace_crates(crates: &[String]) -> Result<(), String> {
    let home = match env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => match env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cargo"),
            None => return Ok(()),
        },
    };
    let src = home.join("registry").join("src");
    let Ok(sources) = std::fs::read_dir(&src) else {
        return Ok(());
    };
    for source in sources.flatten() {
        if !source.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for krate in crates {
            let dir = source.path().join(krate);
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| format!("cannot remove the stale copy {}: {e}", dir.display()))?;
            }
        }
    }
    Ok(())
}

fn package(rest: &[String]) -> Result<(), String> {
    let mut meta = cargo();
    meta.args(["metadata", "--no-deps", "--format-version", "1"]);
    let out = meta
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
    let mut cmd = cargo();
    cmd.args(["package", "--workspace"]);
    let mut published = Vec::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        let unpublished = p["publish"].as_array().is_some_and(|r| r.is_empty());
        let (Some(name), Some(version)) = (p["name"].as_str(), p["version"].as_str()) else {
            continue;
        };
        if unpublished {
            cmd.args(["--exclude", name]);
        } else {
            published.push(format!("{name}-{version}"));
        }
    }
    forget_unpacked_workspace_crates(&published)?;
    // The verification builds use crates.io's etcd-client, which needs protoc like any user's
    // build: set PROTOC even when cargo() found a protoc on PATH, so the result is the same on
    // every machine.
    if env::var_os("PROTOC").is_none()
        && let Ok(p) = protoc_bin_vendored::protoc_bin_path()
    {
        cmd.env("PROTOC", p);
    }
    cmd.args(rest);
    run(cmd)
}
