//! Compiles `proto/hexveil/v1/*.proto` with the pure-Rust `protox` compiler (no system
//! `protoc` needed) and writes the descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/hexveil/v1/common.proto",
    "proto/hexveil/v1/consent.proto",
    "proto/hexveil/v1/transparency.proto",
    "proto/hexveil/v1/presence.proto",
    "proto/hexveil/v1/merchant.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Named explicitly: once any rerun-if-changed is printed, cargo watches only those files,
    // and a change here (the codec path, say) must regenerate the services.
    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    // prost-build ignores `file_descriptor_set_path` when handed a compiled set, so the
    // reflection descriptor is written here.
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hexveil_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Undecodable requests are INVALID_ARGUMENT, not tonic-prost's INTERNAL.
        .codec_path("crate::api::codec::HexveilCodec")
        .compile_fds(fds)?;
    Ok(())
}
