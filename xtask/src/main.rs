//! `cargo xtask <task>`: the project's tasks, in Rust so they run wherever cargo does
//! (matklad's xtask pattern; the alias is in `.cargo/config.toml`).
//!
//! - `demo`: runs `examples/quickstart` on `memory://` (or on `REGISTRY_URL` when set).
//! - `test`: runs every test of the workspace.
//! - `clippy`: `cargo clippy --workspace --all-targets -- -D warnings` (with `PROTOC` set).
//! - `ci`: `cargo fmt --check`, `clippy`, then `test`.

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: cargo xtask <demo|test|ci> [args passed on to cargo]

  demo   run examples/quickstart on memory:// (set REGISTRY_URL to use another backend)
  test   run every test of the workspace
  clippy cargo clippy on every target, warnings as errors
  ci     cargo fmt --check, cargo clippy -D warnings, then test";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result = match task.as_deref() {
        Some("demo") => demo(&rest),
        Some("test") => test(&rest),
        Some("ci") => ci(&rest),
        Some("clippy") => clippy(&rest),
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

fn test(rest: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--all-features"])
        .args(rest);
    run(cmd)
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
