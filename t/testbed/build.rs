//! Compiles `proto/echo.proto` without a `protoc` binary: `protox` parses it into a
//! FileDescriptorSet, which is written to `OUT_DIR/echo_descriptor.bin` (for JSON
//! transcoding) and handed to `tonic-prost-build` to generate the client and server.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let fds = protox::compile(["proto/echo.proto"], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("echo_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).build_transport(true).compile_fds(fds)?;
    Ok(())
}
