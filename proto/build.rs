//! Compiles `proto/**/*.proto` with protox (pure Rust, no system `protoc`)
//! into `$OUT_DIR`, with `bytes` fields as `bytes::Bytes` and a file
//! descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/petrel/v1/common.proto",
        "proto/petrel/v1/client.proto",
        "proto/petrel/v1/broker.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("petrel_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_build::configure()
        .bytes(["."])
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // RocketMQ 5's protocol (apache.rocketmq.v2), served by the proxy as a
    // second front end; well-known types come from prost-types.
    let rocketmq = [
        "rocketmq/apache/rocketmq/v2/definition.proto",
        "rocketmq/apache/rocketmq/v2/service.proto",
    ];
    for f in &rocketmq {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(["apache/rocketmq/v2/service.proto"], ["rocketmq"])?;
    tonic_build::configure()
        .bytes(["."])
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
