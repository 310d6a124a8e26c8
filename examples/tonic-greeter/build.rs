//! Compiles `proto/helloworld.proto` with the protoc of the `protoc-bin-vendored` crate, so
//! the example builds on a machine without a system protoc (a `PROTOC` variable still wins).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()
            .map_err(|e| format!("no vendored protoc for this platform ({e}); set PROTOC"))?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/helloworld.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
