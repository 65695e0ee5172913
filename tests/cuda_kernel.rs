//! The FlashAttention kernels on CUDA against the materialised reference (rules of
//! `wgpu_kernel.rs`, plus bf16). f16/bf16 run the matrix-unit kernel, f32 the portable one.
//! CI has no GPU: build with `--features burn-attn/cuda` and run the binary on a CUDA
//! machine (`scripts/device/run.sh grid`).
//!
//! The low-precision reference of the forward checks runs on the host
//! (`check_low_host`): on the device, Burn's kernels compile and tune per shape for about a
//! minute per case. The default grid is the CI grid's cases at the head dims of the fast
//! paths and the odd/large ones, every mask kind, plus long sequences;
//! `BURN_ATTN_FULL_GRID=1` runs the whole CI grid. The tf32 forward (f32 on the matrix
//! units, opt-in) is launched directly and checked against a host tf32 reference
//! (`check_tf32_kernel`). The backward kernel tests go through the op's backward
//! dispatch, so f16/bf16 run the matrix-unit backward and f32 the portable one;
//! their low-precision reference is the host-evaluated one
//! (`host_low_precision_gradients`), checked against Burn's device reference on two cases.

/// Without the `cuda` feature nothing here is built; this ignored test says so in every
/// test run instead of the file silently running zero tests.
#[cfg(not(feature = "cuda"))]
#[test]
#[ignore = "CUDA kernel tests not built: needs `--features burn-attn/cuda` and a CUDA device \
            (scripts/device/run.sh grid)"]
fn cuda_kernel_tests_need_the_cuda_feature() {}

#[cfg(feature = "cuda")]
mod kernel_common;

#[cfg(feature = "cuda")]
mod on_cuda {
    use burn::backend::Cuda;
    use burn::cubecl::cuda::CudaRuntime;
    use burn::tensor::DType;
    use burn_attn_core::kernels::CubeBackend;

    use super::kernel_common::*;

    /// The fusion-wrapped type users get (`burn::backend::Cuda`); its custom op runs the
    /// `CubeBackend` impl, so both impls are exercised. (`burn` does not re-export the plain
    /// CUDA `CubeBackend`.)
    type Fused = Cuda;
    /// The plain CubeCL CUDA backend, for launching the tf32 and backward kernels directly.
    type Plain = CubeBackend<CudaRuntime, f32, i32, u8>;

    /// The CI grid trimmed as the header says, plus long sequences.
    fn cuda_grid() -> Vec<Case> {
        if std::env::var("BURN_ATTN_FULL_GRID").is_ok_and(|v| v == "1") {
            return grid();
        }
        let mut cases: Vec<Case> = grid()
            .into_iter()
            .filter(|c| matches!(c.dim, 32 | 64 | 80 | 128 | 256))
            .enumerate()
            .filter(|(i, c)| c.dim != 64 || i % 2 == 0 || c.window != burn_attn_core::Window::FULL)
            .map(|(_, c)| c)
            .collect();
        // Value dims whose output vectors (the matrix-unit epilogue's stores) are 4, 2 and 1
        // wide, and one wider than the head dim (the unstaged epilogue).
        for (dim, value_dim) in [(36, 36), (64, 34), (40, 33), (32, 80)] {
            let mut c = Case::new(70, 90, dim).gqa(4, 2).causal();
            c.value_dim = value_dim;
            cases.push(c);
        }
        // Synchronous staging (head dim not a multiple of 8) in cubes that see no key: the
        // staged epilogue's cube barrier orders the Q writes before the output rows.
        cases.push(Case::new(97, 17, 36).causal());
        cases.push(Case::new(1025, 1025, 128).causal());
        cases.push(Case::new(700, 2048, 128));
        cases.push(Case::new(2048, 2048, 64).window(Some(300), Some(20)));
        // A two-sided band past 512 keys: two row tiles per plane (narrower bands take one).
        cases.push(Case::new(1200, 1200, 128).window(Some(600), Some(20)));
        cases
    }

    #[test]
    fn cuda_kernel_f32_matches_reference_fused() {
        for case in cuda_grid() {
            check_f32::<Fused>(case);
        }
    }

    #[test]
    fn cuda_kernel_long_sequence() {
        let mut case = Case::new(1025, 1025, 64).causal();
        case.heads = 1;
        case.kv_heads = 1;
        check_f32::<Fused>(case);
        check_f32::<Fused>(case.window(Some(100), Some(0)));
        check_low_host::<Fused>(case, DType::F16);
    }

    #[test]
    fn cuda_kernel_f16_within_twice_reference_error() {
        for case in cuda_grid() {
            check_low_host::<Fused>(case, DType::F16);
        }
    }

    #[test]
    fn cuda_kernel_bf16_within_twice_reference_error() {
        for case in cuda_grid() {
            check_low_host::<Fused>(case, DType::BF16);
        }
    }

    /// The matrix-unit forwards' online-softmax step through its probe kernel.
    #[test]
    fn cuda_mma_online_softmax_step_matches_host() {
        check_online_softmax_probe::<Plain, CudaRuntime>();
    }

    /// Which implementation served each pass, through the fusion stream: f32 runs the
    /// portable kernel, or the tf32 one when the options allow it.
    #[test]
    fn cuda_dispatch_is_recorded_per_call() {
        check_dispatch::<Fused>(
            burn_attn_core::Implementation::FlashUnit,
            burn_attn_core::Implementation::FlashTf32,
        );
    }

    /// The heavy-first cube order (every kernel's block and head) through its probe kernel.
    #[test]
    fn cuda_cube_order_matches_host() {
        check_cube_order::<Plain, CudaRuntime>();
    }

    /// Two calls of the matrix-unit and portable forwards with the same inputs give the
    /// same bits (output and lse).
    #[test]
    fn cuda_forward_is_deterministic() {
        let case = Case::new(97, 97, 64).causal().gqa(4, 2).batch(2);
        let x = inputs(&case, 9);
        for dtype in [DType::BF16, DType::F32] {
            let (o1, l1, _) = kernel::<Plain>(&case, &x, dtype);
            let (o2, l2, _) = kernel::<Plain>(&case, &x, dtype);
            assert!(same_bits(&o1, &o2), "{dtype:?}");
            assert!(same_bits(&l1, &l2), "{dtype:?}");
        }
    }

    /// The tf32 forward (opt-in through `AttentionOptions::tf32`), launched directly on the trimmed grid plus head dim 36 (4 padded
    /// columns zeroed under asynchronous staging) and 33 (rows not a multiple of 16 bytes:
    /// synchronous staging), within 3x the host tf32 reference's error.
    #[test]
    fn cuda_tf32_kernel_within_tolerance() {
        let mut cases = cuda_grid();
        cases.push(Case::new(70, 90, 36).causal().gqa(4, 2));
        cases.push(Case::new(65, 33, 33).window(Some(9), Some(4)));
        // Synchronous staging across several key tiles (one buffer reused, the online
        // softmax carried across tiles).
        cases.push(Case::new(130, 200, 33).causal());
        for case in cases {
            check_tf32_kernel::<Plain, CudaRuntime>(case);
        }
    }

    #[test]
    fn cuda_training_gradients_match_reference() {
        for case in gradient_grid() {
            check_gradients::<burn::backend::Autodiff<Fused>>(case);
        }
    }

    #[test]
    fn cuda_backward_kernel_f32_matches_reference() {
        for case in backward_grid() {
            check_backward_kernel::<Plain, CudaRuntime>(case, DType::F32);
        }
    }

    /// The backward grid plus head dims 96/128 (the matrix-unit backward's main case) at
    /// lengths past one tile and head dims 40/72 (padded columns), in f16 and bf16, against the host-evaluated low-precision
    /// reference gradients (`host_low_precision_gradients`).
    #[test]
    fn cuda_backward_kernel_low_precision_grid_host_reference() {
        let mut cases = backward_grid();
        cases.push(Case::new(200, 300, 128).causal());
        cases.push(Case::new(257, 257, 128).gqa(4, 2));
        cases.push(Case::new(130, 129, 96).window(Some(40), Some(7)));
        cases.push(Case::new(300, 300, 64).causal().gqa(8, 1));
        // Head dims that are 8 mod 16: the padded columns the staging must zero.
        cases.push(Case::new(70, 90, 40).causal().gqa(4, 2));
        cases.push(Case::new(65, 33, 72).window(Some(9), Some(4)));
        // Gradient rows stored 4, 2 and 1 values at a time (the staged epilogues).
        let mut c = Case::new(70, 90, 36).causal().gqa(4, 2);
        c.value_dim = 34;
        cases.push(c);
        cases.push(Case::new(65, 33, 33).window(Some(9), Some(4)));
        for case in cases {
            check_backward_kernel_host::<Plain, CudaRuntime>(case, DType::F16);
            check_backward_kernel_host::<Plain, CudaRuntime>(case, DType::BF16);
        }
    }

    /// Two cases (one with GQA 8:1 and a window) against Burn's own low-precision autodiff
    /// on the device, which compiles and tunes per shape (tens of seconds a case): it checks
    /// the host reference of the test above on the cases both can afford.
    #[test]
    fn cuda_backward_kernel_low_precision_within_thrice_reference_error() {
        let grid = backward_grid();
        for case in [grid[3], grid[9]] {
            check_backward_kernel::<Plain, CudaRuntime>(case, DType::F16);
            check_backward_kernel::<Plain, CudaRuntime>(case, DType::BF16);
        }
    }
}
