//! Writes `KERNEL_SOURCE`, the hash of the kernels' source (see `src/source_hash.rs`).

#[allow(dead_code)]
mod source_hash {
    include!("src/source_hash.rs");
}

fn main() {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap();
    for dir in source_hash::KERNEL_SOURCE_DIRS {
        println!("cargo:rerun-if-changed={dir}");
    }
    let hash = source_hash::source_hash(&root, &source_hash::KERNEL_SOURCE_DIRS, &version)
        .expect("reading the kernels' source");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernel_source.rs");
    std::fs::write(out, format!("{hash:#018x}")).expect("writing kernel_source.rs");
}
