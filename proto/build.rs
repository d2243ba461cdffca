//! Generates the Rust of `follow/**/*.proto` with protox (a pure-Rust protobuf compiler), so a
//! fresh machine needs nothing but cargo: no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "follow/events/v1/events.proto",
    "follow/api/v1/types.proto",
    "follow/api/v1/route_service.proto",
    "follow/api/v1/image_service.proto",
    "follow/gateway/v1/gateway_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=follow");

    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;

    // Served by gRPC reflection, so it must hold the imports (google/protobuf/timestamp.proto) too.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("follow_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
