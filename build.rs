// Generates the Rust types of entity.v1 from proto/ with a vendored protoc, so the
// build needs nothing installed beyond cargo.
fn main() -> std::io::Result<()> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path().unwrap());
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .btree_map(["."])
        .compile_protos(&["proto/entity/v1/entity.proto"], &["proto"])
}
