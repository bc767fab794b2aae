//! Compiles the protos with the `protoc` shipped inside the `protoc-bin-vendored` crate, so a
//! fresh machine needs neither a system protoc nor a download at build time.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; this only tells prost-build where protoc is.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // Serialize: `tidalctl -o json|yaml` prints the API's messages as they are.
    tonic_prost_build::configure()
        .type_attribute(".tidal.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/tidal.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/onnx.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
