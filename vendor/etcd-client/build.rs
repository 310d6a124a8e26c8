// Local change against etcd-client 0.17.0: when PROTOC is not set, use the protoc binary that the
// `protoc-bin-vendored` crate ships, so the build needs no system protoc. An explicit PROTOC still
// wins; the generated code does not depend on which protoc ran, so PROTOC is not a rerun
// trigger. Everything outside the marked block is the published build script unchanged.

#[cfg(feature = "build-server")]
fn should_build_server() -> bool {
    true
}

#[cfg(not(feature = "build-server"))]
fn should_build_server() -> bool {
    false
}

fn main() {
    // --- local change ---
    if std::env::var_os("PROTOC").is_none() {
        match protoc_bin_vendored::protoc_bin_path() {
            // Edition 2021: set_var is safe; the build script has no other threads.
            Ok(path) => std::env::set_var("PROTOC", path),
            Err(e) => println!(
                "cargo:warning=no vendored protoc for this platform ({e}); \
                 set PROTOC to a protoc binary or put protoc on PATH"
            ),
        }
    }
    // --- end of local change ---

    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");

    tonic_prost_build::configure()
        .build_server(should_build_server())
        .compile_protos(
            &[
                "proto/auth.proto",
                "proto/kv.proto",
                "proto/rpc.proto",
                "proto/v3election.proto",
                "proto/v3lock.proto",
            ],
            &[proto_root],
        )
        .expect("Failed to compile proto files");
}
