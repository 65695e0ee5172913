// A stable hash of the kernels' source. Every kernel takes it as a comptime argument, so
// it is part of each kernel's CubeCL id and keys CubeCL's on-disk compilation cache: that
// cache keys a kernel by its name and launch configuration, which stay the same when the
// code changes, so without it an upgraded crate could run a cached older kernel. The build
// script and this crate's tests compute it with the same function.

use std::path::{Path, PathBuf};

/// The folders, relative to the crate root, that hold cube code.
pub const KERNEL_SOURCE_DIRS: [&str; 2] = ["src/kernels", "src/components"];

/// FNV-1a (64-bit) of `bytes`, continuing from `hash`.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The hash of `version` and of every file under `dirs` of `root`, each file's relative
/// path and bytes, in path order.
pub fn source_hash(root: &Path, dirs: &[&str], version: &str) -> std::io::Result<u64> {
    let mut files = Vec::new();
    for dir in dirs {
        collect_files(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut hash = fnv1a(0xcbf2_9ce4_8422_2325, version.as_bytes());
    for file in files {
        let relative = file.strip_prefix(root).unwrap_or(&file);
        for part in relative.components() {
            hash = fnv1a(hash, part.as_os_str().as_encoded_bytes());
            hash = fnv1a(hash, b"/");
        }
        hash = fnv1a(hash, &std::fs::read(&file)?);
    }
    Ok(hash)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(root: &Path) -> u64 {
        source_hash(root, &KERNEL_SOURCE_DIRS, env!("CARGO_PKG_VERSION")).unwrap()
    }

    /// The constant the kernels are launched with is the hash of the source as it is now
    /// (the build script reruns when a file under the kernel folders changes).
    #[test]
    fn kernel_source_is_the_hash_of_the_kernels_now() {
        assert_eq!(
            hash(Path::new(env!("CARGO_MANIFEST_DIR"))),
            crate::KERNEL_SOURCE
        );
    }

    /// A copy of the kernel folders hashes the same; one changed byte, a renamed file or
    /// another crate version changes the hash, hence every kernel's CubeCL id.
    #[test]
    fn a_changed_kernel_changes_the_hash() {
        let root = std::env::temp_dir().join(format!("burn-attn-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let crate_root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in KERNEL_SOURCE_DIRS {
            let mut files = Vec::new();
            collect_files(&crate_root.join(dir), &mut files).unwrap();
            for file in files {
                let to = root.join(file.strip_prefix(crate_root).unwrap());
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(&file, &to).unwrap();
            }
        }
        let original = hash(&root);
        assert_eq!(original, crate::KERNEL_SOURCE);
        let kernel = root.join("src/kernels/flash_unit.rs");
        let mut bytes = std::fs::read(&kernel).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&kernel, &bytes).unwrap();
        let edited = hash(&root);
        bytes[last] ^= 1;
        std::fs::write(&kernel, &bytes).unwrap();
        assert_eq!(hash(&root), original);
        std::fs::rename(&kernel, root.join("src/kernels/flash_unit2.rs")).unwrap();
        let renamed = hash(&root);
        let other_version = source_hash(&root, &KERNEL_SOURCE_DIRS, "0.0.0").unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_ne!(edited, original);
        assert_ne!(renamed, original);
        assert_ne!(other_version, renamed);
    }
}
