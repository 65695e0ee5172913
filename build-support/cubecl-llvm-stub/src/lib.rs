//! A stand-in for `cubecl-llvm` 0.11.3 without LLVM.
//!
//! cubecl-cuda 0.11 links `cubecl-llvm`, whose build script downloads a prebuilt LLVM. With
//! cubecl-cuda's `cpp` feature on, CUDA kernels compile through NVRTC and the LLVM backend is
//! never selected, but cubecl-cuda still names these items: the PTX version chosen from the
//! driver (called at every CUDA device start, so it is implemented for real), and the LLVM
//! compiler's types, whose compile step here returns an error naming the missing backend.
//! Pin cubecl-cuda to the version this crate claims, or a newer cubecl-llvm bypasses it.

use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::prelude::KernelDefinition;
use cubecl_runtime::compiler::CompilationError;
use cubecl_runtime::kernel::BufferIOAttr;

/// The NVPTX target's pieces that cubecl-cuda uses.
pub mod nvptx {
    /// The PTX ISA version for the installed driver.
    pub mod ptx_version {
        use core::fmt;
        use std::ffi::CString;

        /// A PTX ISA version as the NVPTX target feature spells it (8.7 is `87`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        /// The first CUDA driver (as `cuDriverGetVersion` reports it: 12.8 is `12080`) that
        /// loads each PTX version, newest first.
        const FIRST_DRIVER: &[(i32, u32)] = &[
            (13030, 93),
            (13020, 92),
            (13010, 91),
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11070, 77),
            (11060, 76),
            (11050, 75),
            (11040, 74),
            (11030, 73),
            (11020, 72),
            (11010, 71),
            (11000, 70),
            (10020, 65),
            (10010, 64),
            (10000, 63),
        ];

        impl PtxVersion {
            /// The newest version driver `driver` loads; `None` before CUDA 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                FIRST_DRIVER
                    .iter()
                    .find(|(first, _)| driver >= *first)
                    .map(|&(_, ptx)| Self(ptx))
            }

            /// The NVPTX target feature selecting this version (`+ptx87`).
            pub fn target_feature(self) -> CString {
                CString::new(format!("+{self}")).expect("no NUL in a target feature")
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }

        #[cfg(test)]
        mod tests {
            use super::PtxVersion;

            #[test]
            fn a_driver_gets_the_newest_version_it_loads() {
                assert_eq!(PtxVersion::for_driver(12080), Some(PtxVersion(87)));
                assert_eq!(PtxVersion::for_driver(12060), Some(PtxVersion(85)));
                assert_eq!(PtxVersion::for_driver(13050), Some(PtxVersion(93)));
                assert_eq!(PtxVersion::for_driver(9000), None);
                assert_eq!(PtxVersion(87).target_feature().as_c_str(), c"+ptx87");
            }
        }
    }
}

/// Device features as the LLVM backend would narrow them.
pub mod shared {
    /// Narrowing of the advertised features to what the LLVM backend lowers.
    pub mod lowered_features {
        use cubecl_core::prelude::DeviceProperties;

        /// A GPU target of the LLVM backend.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            /// NVIDIA PTX.
            Nvptx,
        }

        /// cubecl-cuda calls this only when its LLVM backend is selected, which cannot be
        /// here: without LLVM that backend cannot compile anything.
        pub fn restrict_features(_props: &mut DeviceProperties, target: GpuTarget) {
            panic!(
                "cubecl-llvm stand-in: the LLVM backend ({target:?}) is not built; enable \
                 cubecl-cuda's `cpp` feature (NVRTC)"
            );
        }
    }
}

/// The LLVM backend's targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    /// Host code.
    #[default]
    Cpu,
    /// NVIDIA PTX.
    Nvptx,
}

/// The LLVM compiler: every compilation fails with [`missing_llvm`].
#[derive(Clone, Debug)]
pub struct PlironCompiler {
    /// What it would compile for.
    pub target: LlvmTarget,
}

/// The LLVM compiler's options (the fields cubecl-cuda sets).
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// AMDGPU architecture (unused: no AMDGPU target here).
    pub arch: Option<()>,
    /// NVPTX architecture.
    pub sm_arch: Option<SmArch>,
    /// PTX version to emit.
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    /// Scalars and static metadata in the kernel parameter block.
    pub grid_constants: bool,
}

/// A compiled PTX module (never produced here).
#[derive(Clone, Debug)]
pub struct NvptxModule {
    /// NUL-terminated PTX.
    pub ptx: Vec<core::ffi::c_char>,
    /// Kernel entry point.
    pub entrypoint: String,
    /// IR for logs and cache keys.
    pub ir: String,
    /// Shared memory per launch, in bytes.
    pub shared_memory_size: usize,
    /// Buffer access modes in binding order.
    pub io: Vec<BufferIOAttr>,
}

/// A compiled kernel (never produced here).
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    /// A PTX module.
    NvptxCode(NvptxModule),
}

/// The error every compilation returns: no LLVM backend in this build.
pub fn missing_llvm(target: LlvmTarget) -> CompilationError {
    CompilationError::Generic {
        reason: format!(
            "cubecl-llvm stand-in: no LLVM backend in this build (target {target:?}); \
             CUDA kernels compile with NVRTC when cubecl-cuda's `cpp` feature is on"
        ),
        backtrace: Default::default(),
    }
}

impl PlironCompiler {
    /// Fails: see [`missing_llvm`].
    pub fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(missing_llvm(self.target))
    }

    /// The language tag of its output (LLVM IR).
    pub fn lang_tag(&self) -> &'static str {
        "llvm"
    }

    /// The file extension of its output (LLVM IR).
    pub fn extension(&self) -> &'static str {
        "ll"
    }
}
