//! Compiles the protos with the `protoc` shipped inside the `protoc-bin-vendored` crate, so a
//! fresh machine needs neither a system protoc nor a download at build time.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; this only tells prost-build where protoc is.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Serialize: `tidalctl -o json|yaml` prints the API's messages as they are. The descriptor
    // set is what the daemons' server reflection describes.
    tonic_prost_build::configure()
        .type_attribute(".tidal.v1", "#[derive(serde::Serialize)]")
        .file_descriptor_set_path(out.join("tidal_descriptor.bin"))
        .compile_protos(&["proto/tidal.proto"], &["proto"])?;
    // The Open Inference Protocol (KServe V2) that agents speak beside Tidal's own API.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kserve_v2_descriptor.bin"))
        .compile_protos(&["proto/kserve_v2.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/onnx.proto"], &["proto"])?;
    // Triton's model configuration (config.pbtxt), read as text by `tidalctl task import`.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .file_descriptor_set_path(out.join("triton_model_config_descriptor.bin"))
        .compile_protos(&["proto/triton_model_config.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
