//! Generates the gRPC code for `fedq/v1/*.proto` with pure-Rust tools (protox + tonic-prost-build),
//! so building fedq never needs a system `protoc`.

fn main() -> anyhow::Result<()> {
    let protos = [
        "fedq/v1/common.proto",
        "fedq/v1/node.proto",
        "fedq/v1/coordinator.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
