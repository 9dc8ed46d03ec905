// Generates the Rust types of entity.v1, store.v1 and mesh.v1 from proto/ with a
// vendored protoc (the build needs nothing installed beyond cargo), and the encoded
// descriptor set that gRPC server reflection serves.
fn main() -> std::io::Result<()> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path().unwrap());
    println!("cargo:rerun-if-changed=proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    prost_build::Config::new()
        .btree_map(["."])
        .file_descriptor_set_path(out.join("descriptors.bin"))
        .compile_protos(
            &["proto/entity/v1/entity.proto", "proto/store/v1/store.proto", "proto/mesh/v1/mesh.proto"],
            &["proto"],
        )
}
