//! `registry-bench`: our registries (what `registry_core` factories return: `FailbackRegistry`
//! over each backend) against the raw `zookeeper-client` and `etcd-client` doing the minimal
//! operations, on the same local servers, in the same process and run.
//!
//! Sides alternate in blocks (ABAB) so that drift of a shared machine hits both alike; where
//! one event can be observed by both sides at once (notify latency, fan-out) the measurement
//! is paired instead: every event is timed on both sides. Every workload warms up first and
//! reports its size and iteration counts. Results: one JSON line per measurement appended to
//! `<out>/results.jsonl`, the Markdown table in `<out>/report.md`, and the table on stdout.
//!
//! Run it through `cargo xtask bench [--quick]`, which starts the servers.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod alloc;
mod raw;
mod report;
mod scale;
mod util;
mod workloads;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use registry_etcd as _;
use registry_zookeeper as _;

use crate::report::Measurement;

/// Which backend a workload runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `zookeeper://`.
    Zookeeper,
    /// `etcd://`.
    Etcd,
}

impl Backend {
    /// The name in reports, which is also the scheme.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Zookeeper => "zookeeper",
            Backend::Etcd => "etcd",
        }
    }
}

/// Command line.
#[derive(Debug, Parser)]
#[command(
    about = "Benchmarks our registries against the raw clients (run via `cargo xtask bench`)"
)]
struct Args {
    /// ZooKeeper address (host:port).
    #[arg(long, env = "REGISTRY_TEST_ZOOKEEPER")]
    zookeeper: Option<String>,
    /// etcd address (host:port).
    #[arg(long, env = "REGISTRY_TEST_ETCD")]
    etcd: Option<String>,
    /// Small sizes: the whole run in under two minutes (for CI).
    #[arg(long)]
    quick: bool,
    /// Where results.jsonl and report.md go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Run only these workloads (register, notify, cold, churn, fanout, recovery, scale;
    /// `scale-many` or `scale-big` for one part of scale).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only these backends.
    #[arg(long, value_delimiter = ',')]
    backend: Vec<Backend>,
}

/// The sizes of every workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sizes {
    /// Registrations per side.
    pub register_n: usize,
    /// ABAB block size of register.
    pub register_block: usize,
    /// Warm-up registrations per side.
    pub register_warmup: usize,
    /// Measured notifications.
    pub notify_n: usize,
    /// Warm-up notifications.
    pub notify_warmup: usize,
    /// Providers present for cold subscribe.
    pub cold_n: usize,
    /// Cold subscribes per side.
    pub cold_iters: usize,
    /// Changes per churn run.
    pub churn_n: usize,
    /// Churn runs per side.
    pub churn_iters: usize,
    /// Fan-out services.
    pub fan_services: usize,
    /// Listeners per fan-out service.
    pub fan_listeners: usize,
    /// Measured fan-out changes.
    pub fan_changes: usize,
    /// Registrations and subscriptions in recovery.
    pub recovery_n: usize,
    /// Recoveries per side.
    pub recovery_iters: usize,
    /// Scale (a): subscriptions of the one large service.
    pub scale_subs: usize,
    /// Scale (a): providers of that service.
    pub scale_providers: usize,
    /// Scale (a): measured changes (alternately a provider added and the same one removed).
    pub scale_changes: usize,
    /// Scale (a): the set-up of the subscriptions stops when it has taken this long (s)...
    pub scale_setup_secs: u64,
    /// ... or when the subscriptions hold this much heap (MiB); the rest of the workload then
    /// runs with the subscriptions made so far, and says so.
    pub scale_heap_mib: u64,
    /// Scale (b): providers of the one very large service.
    pub scale_big: usize,
    /// Scale (b): subscribes per side.
    pub scale_big_iters: usize,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            register_n: 2000,
            register_block: 100,
            register_warmup: 100,
            notify_n: 1000,
            notify_warmup: 50,
            cold_n: 10_000,
            cold_iters: 8,
            churn_n: 1000,
            churn_iters: 3,
            fan_services: 100,
            fan_listeners: 10,
            fan_changes: 50,
            recovery_n: 100,
            recovery_iters: 3,
            scale_subs: 1000,
            scale_providers: 10_000,
            scale_changes: 10,
            scale_setup_secs: 120,
            scale_heap_mib: 2048,
            scale_big: 100_000,
            scale_big_iters: 2,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            register_n: 200,
            register_block: 50,
            register_warmup: 20,
            notify_n: 100,
            notify_warmup: 10,
            cold_n: 1000,
            cold_iters: 3,
            churn_n: 300,
            churn_iters: 1,
            fan_services: 20,
            fan_listeners: 10,
            fan_changes: 10,
            recovery_n: 100,
            recovery_iters: 1,
            scale_subs: 50,
            scale_providers: 1000,
            scale_changes: 4,
            scale_setup_secs: 30,
            scale_heap_mib: 512,
            scale_big: 5000,
            scale_big_iters: 1,
        }
    }
}

/// What a workload needs: the backend, its server, the sizes, and where results go.
pub struct Ctx {
    /// The backend.
    pub backend: Backend,
    /// The server's address.
    pub addr: String,
    /// The sizes.
    pub sizes: Sizes,
    /// A tag unique to this run, so runs never share paths.
    pub run_id: String,
    /// Results so far.
    pub out: Vec<Measurement>,
}

impl Ctx {
    /// A group (root path) for one workload of this run.
    pub fn group(&self, workload: &str) -> String {
        format!("bench-{}-{workload}", self.run_id)
    }

    /// Our registry on `group`, fresh (not the manager's cached instance): exactly what the
    /// backend's factory returns (FailbackRegistry over the backend), default settings but no
    /// disk cache file.
    pub async fn ours(
        &self,
        group: &str,
    ) -> anyhow::Result<std::sync::Arc<dyn registry_core::Registry>> {
        let url: registry_core::Url = format!(
            "{}://{}?file=false&group={group}",
            self.backend.name(),
            self.addr
        )
        .parse()?;
        let reg = registry_core::factory_for(self.backend.name())?
            .create(&url)
            .await?;
        // Connected before anything is measured on it.
        let end = Instant::now() + std::time::Duration::from_secs(30);
        while !reg.is_available() {
            anyhow::ensure!(
                Instant::now() < end,
                "our {} registry did not connect within 30 s",
                self.backend.name()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(reg)
    }

    /// Adds a measurement and prints it.
    pub fn push(&mut self, m: Measurement) {
        println!("{}", m.console_line());
        self.out.push(m);
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,registry_bench=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The 1-minute load average (other work on the machine during the run), or `?`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let started = Instant::now();
    let load_before = loadavg();
    let run_id = format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    let mut backends = Vec::new();
    for b in [Backend::Zookeeper, Backend::Etcd] {
        if !args.backend.is_empty() && !args.backend.contains(&b) {
            continue;
        }
        let addr = match b {
            Backend::Zookeeper => args.zookeeper.clone(),
            Backend::Etcd => args.etcd.clone(),
        };
        let addr = addr.with_context(|| {
            format!(
                "no {} address: pass --{} or run through `cargo xtask bench`",
                b.name(),
                b.name()
            )
        })?;
        backends.push((b, addr));
    }
    const KNOWN: [&str; 9] = [
        "register",
        "notify",
        "cold",
        "churn",
        "fanout",
        "recovery",
        "scale",
        "scale-many",
        "scale-big",
    ];
    if let Some(bad) = args.only.iter().find(|o| !KNOWN.contains(&o.as_str())) {
        anyhow::bail!(
            "--only {bad}: no such workload (known: {})",
            KNOWN.join(", ")
        );
    }
    let wanted = |w: &str| args.only.is_empty() || args.only.iter().any(|o| o == w);
    let mut all = Vec::new();
    for (backend, addr) in backends {
        let mut ctx = Ctx {
            backend,
            addr,
            sizes: sizes.clone(),
            run_id: run_id.clone(),
            out: Vec::new(),
        };
        tracing::info!(backend = backend.name(), addr = %ctx.addr, "benchmarking");
        let workloads = [
            ("register", "register"),
            ("notify", "notify"),
            ("cold", "cold subscribe"),
            ("churn", "churn"),
            ("fanout", "fan-out"),
            ("recovery", "recovery"),
            ("scale", "scale"),
        ];
        for (key, name) in workloads {
            let scale_part = key == "scale" && (wanted("scale-many") || wanted("scale-big"));
            if !wanted(key) && !scale_part {
                continue;
            }
            let result = match key {
                "register" => workloads::register(&mut ctx).await,
                "notify" => workloads::notify(&mut ctx).await,
                "cold" => workloads::cold_subscribe(&mut ctx).await,
                "churn" => workloads::churn(&mut ctx).await,
                "fanout" => workloads::fan_out(&mut ctx).await,
                "recovery" => workloads::recovery(&mut ctx).await,
                _ => {
                    let many = wanted("scale") || wanted("scale-many");
                    let big = wanted("scale") || wanted("scale-big");
                    scale::scale(&mut ctx, many, big).await
                }
            };
            // A workload that fails is reported as such; the others still run.
            if let Err(e) = result {
                tracing::error!(backend = backend.name(), workload = name, error = %format!("{e:#}"), "workload failed");
                ctx.push(Measurement::failed(
                    backend.name(),
                    name,
                    "the whole workload",
                    0,
                    "",
                    format!("{e:#}"),
                ));
            }
        }
        all.append(&mut ctx.out);
    }
    let elapsed = started.elapsed();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let run = serde_json::json!({
        "run_id": run_id,
        "quick": args.quick,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "sizes": sizes,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    report::write_jsonl(&args.out.join("results.jsonl"), &run, &all)?;
    let header = format!(
        "## registry-bench {} run `{run_id}` ({:.0} s; load average before {load_before}, after {})",
        if args.quick { "quick" } else { "full" },
        elapsed.as_secs_f64(),
        loadavg()
    );
    let md = report::markdown(&header, &all);
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("\n{md}");
    println!(
        "wrote {} and {}",
        args.out.join("results.jsonl").display(),
        args.out.join("report.md").display()
    );
    let failed = all.iter().filter(|m| m.error.is_some()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} measurement(s) failed; the report above says what went wrong"
    );
    Ok(())
}
