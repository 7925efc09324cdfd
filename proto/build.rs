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
    // The encoded descriptor set also serves gRPC server reflection.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("fedq_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
