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
mod half_precision;
#[cfg(feature = "cuda")]
mod kernel_common;

#[cfg(feature = "cuda")]
mod on_cuda {
    use burn::tensor::{DType, Device};
    use burn_attn_core::kernels::plan::BackwardKernel;

    use super::kernel_common::*;

    /// CUDA device 0 (Burn's `Cube` backend, fused: the op records its kernel launch in the
    /// fusion stream); the launcher checks take its tensors' CubeCL primitives.
    struct Gpu;

    impl On for Gpu {
        fn device() -> Device {
            Device::cuda(0)
        }
    }

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
            check_f32::<Gpu>(case);
        }
    }

    #[test]
    fn cuda_kernel_long_sequence() {
        let mut case = Case::new(1025, 1025, 64).causal();
        case.heads = 1;
        case.kv_heads = 1;
        check_f32::<Gpu>(case);
        check_f32::<Gpu>(case.window(Some(100), Some(0)));
        check_low_host::<Gpu>(case, DType::F16);
    }

    #[test]
    fn cuda_kernel_f16_within_twice_reference_error() {
        for case in cuda_grid() {
            check_low_host::<Gpu>(case, DType::F16);
        }
    }

    #[test]
    fn cuda_kernel_bf16_within_twice_reference_error() {
        for case in cuda_grid() {
            check_low_host::<Gpu>(case, DType::BF16);
        }
    }

    /// The matrix-unit forwards' online-softmax step through its probe kernel.
    #[test]
    fn cuda_mma_online_softmax_step_matches_host() {
        check_online_softmax_probe::<Gpu>();
    }

    /// Which implementation served each pass, through the fusion stream: f32 runs the
    /// portable kernel, or the tf32 one when the options allow it.
    #[test]
    fn cuda_dispatch_is_recorded_per_call() {
        check_dispatch::<Gpu>(
            burn_attn_core::Implementation::FlashUnit,
            burn_attn_core::Implementation::FlashTf32,
        );
    }

    /// Concurrent calls from several threads give the serial calls' bits (bf16 on the
    /// matrix units, f32 on the portable kernel).
    #[test]
    fn cuda_concurrent_calls_match_serial_calls() {
        check_concurrent_calls::<Gpu>(DType::BF16);
        check_concurrent_calls::<Gpu>(DType::F32);
    }

    /// The block-sparse portable forward and backward: patterns, key padding and document ids.
    #[test]
    fn cuda_sparse_kernel_f32_matches_the_host_truth() {
        check_sparse_kernels::<Gpu>(DType::F32, BackwardKernel::Unit);
        check_invalid_list_indices::<Gpu>();
    }

    /// The block-sparse matrix-unit forward and backward in bf16 and f16, in four parts
    /// each (compiling their kernels takes minutes; run the parts as separate processes).
    macro_rules! sparse_kernel_parts {
        ($($name:ident: $dtype:expr, $part:expr;)*) => {$(
            #[test]
            fn $name() {
                check_sparse_kernels_part::<Gpu>($dtype, BackwardKernel::Mma, $part, 4);
            }
        )*};
    }
    sparse_kernel_parts! {
        cuda_sparse_kernel_bf16_part_0: DType::BF16, 0;
        cuda_sparse_kernel_bf16_part_1: DType::BF16, 1;
        cuda_sparse_kernel_bf16_part_2: DType::BF16, 2;
        cuda_sparse_kernel_bf16_part_3: DType::BF16, 3;
        cuda_sparse_kernel_f16_part_0: DType::F16, 0;
        cuda_sparse_kernel_f16_part_1: DType::F16, 1;
        cuda_sparse_kernel_f16_part_2: DType::F16, 2;
        cuda_sparse_kernel_f16_part_3: DType::F16, 3;
    }

    /// Training through `pattern_attention` with strided columns, block layouts, key
    /// padding and dropout runs the block-sparse kernels, forward and backward.
    #[test]
    fn cuda_sparse_training_runs_the_kernels() {
        check_sparse_training::<Gpu>(
            DType::F32,
            (
                burn_attn_core::Implementation::FlashUnitSparse,
                burn_attn_core::Implementation::FlashUnitSparseBackward,
            ),
        );
        check_dropout_training::<Gpu>();
        check_block_mask_cache::<Gpu>();
        check_document_training::<Gpu>(Some((
            burn_attn_core::Implementation::FlashUnitSparse,
            burn_attn_core::Implementation::FlashUnitSparseBackward,
        )));
        check_attention_mask_training::<Gpu>(Some((
            burn_attn_core::Implementation::FlashUnitSparse,
            burn_attn_core::Implementation::FlashUnitSparseBackward,
        )));
        check_score_term_training::<Gpu>(Some((
            burn_attn_core::Implementation::FlashUnitSparse,
            burn_attn_core::Implementation::FlashUnitSparseBackward,
        )));
    }

    /// Training through `pattern_attention` in bf16 runs the block-sparse matrix-unit
    /// kernels, forward and backward.
    #[test]
    fn cuda_sparse_training_bf16_runs_the_matrix_units() {
        check_sparse_training::<Gpu>(
            DType::BF16,
            (
                burn_attn_core::Implementation::FlashMmaSparse,
                burn_attn_core::Implementation::FlashMmaSparseBackward,
            ),
        );
    }

    /// Strided columns run the band and gathered-column calls on the matrix units (bf16) and
    /// the portable kernels (f32), forward and backward: without masks on the band kernels,
    /// with key padding (and dropout, f32) on the block-sparse ones.
    #[test]
    fn cuda_strided_columns_split_into_band_calls() {
        check_strided_split::<Gpu>(
            DType::BF16,
            (
                burn_attn_core::Implementation::FlashMma,
                burn_attn_core::Implementation::FlashMmaBackward,
            ),
            (
                burn_attn_core::Implementation::FlashMmaSparse,
                burn_attn_core::Implementation::FlashMmaSparseBackward,
            ),
        );
        check_strided_split::<Gpu>(
            DType::F32,
            (
                burn_attn_core::Implementation::FlashUnit,
                burn_attn_core::Implementation::FlashUnitBackward,
            ),
            (
                burn_attn_core::Implementation::FlashUnitSparse,
                burn_attn_core::Implementation::FlashUnitSparseBackward,
            ),
        );
    }

    /// Context parallelism's ring form runs every block visit on the matrix units, forward
    /// and backward, and equals one call over the whole sequence.
    #[test]
    fn cuda_context_parallel_ring_runs_the_kernels() {
        check_context_parallel::<Gpu>(
            DType::BF16,
            (
                burn_attn_core::Implementation::FlashMma,
                burn_attn_core::Implementation::FlashMmaBackward,
            ),
        );
        check_context_parallel::<Gpu>(
            DType::F32,
            (
                burn_attn_core::Implementation::FlashUnit,
                burn_attn_core::Implementation::FlashUnitBackward,
            ),
        );
    }

    /// The portable forward with its keys split gives the unsplit call's rows.
    #[test]
    fn cuda_key_splits_match_the_unsplit_forward() {
        check_key_splits::<Gpu>(DType::F32, burn_attn_core::Implementation::FlashUnit, 1e-5);
        // The matrix-unit forward's partial rows are rounded to bf16 before the merge.
        check_key_splits::<Gpu>(DType::BF16, burn_attn_core::Implementation::FlashMma, 2e-2);
    }

    /// Learned sparsity and adaptive windows on CUDA give the CPU's outputs and gradients.
    #[test]
    fn cuda_score_term_modules_match_the_cpu() {
        // Burn's f32 matmul (the projections) runs on tf32 tensor cores on CUDA.
        check_score_term_modules::<Gpu>(2e-3);
    }

    /// Decoding with a key/value cache on CUDA equals the full forward's rows.
    #[test]
    fn cuda_cached_decoding_matches_the_full_forward() {
        // Burn's f32 matmul (the projections) runs on tf32 tensor cores on CUDA.
        check_cached_decoding::<Gpu>(2e-3);
    }

    /// Linear attention on the chunked kernel, f32 and bf16: causal and not, normalised and
    /// not, GQA, lengths chunks do not divide, one row, streaming; forward and backward
    /// against the quadratic form in f64.
    #[test]
    fn cuda_linear_kernel_matches_the_quadratic_form() {
        check_linear_training::<Gpu>(DType::F32, 1e-4);
        check_linear_streaming::<Gpu>(1e-4);
        check_linear_training::<Gpu>(DType::BF16, 2e-2);
        check_linear_training::<Gpu>(DType::F16, 5e-3);
    }

    /// Linear attention in bf16 at head dims 64 and 128 runs on the matrix-unit kernel,
    /// forward and backward, and matches the quadratic form in f64.
    #[test]
    fn cuda_linear_matrix_kernel_matches_the_quadratic_form() {
        check_linear_cases::<Gpu>(
            linear_matrix_cases(),
            DType::BF16,
            2e-2,
            [
                burn_attn_core::Implementation::LinearChunkMma,
                burn_attn_core::Implementation::LinearChunkMmaBackward,
            ],
        );
    }

    /// The block-sparse plan builds with CUDA's device ops as on the CPU.
    #[test]
    fn cuda_block_mask_builds_on_the_device() {
        check_block_mask_on_device::<Gpu>();
    }

    /// The heavy-first cube order (every kernel's block and head) through its probe kernel.
    #[test]
    fn cuda_cube_order_matches_host() {
        check_cube_order::<Gpu>();
    }

    /// Two calls of the matrix-unit and portable forwards with the same inputs give the
    /// same bits (output and lse).
    #[test]
    fn cuda_forward_is_deterministic() {
        let case = Case::new(97, 97, 64).causal().gqa(4, 2).batch(2);
        let x = inputs(&case, 9);
        for dtype in [DType::BF16, DType::F32] {
            let (o1, l1, _) = kernel::<Gpu>(&case, &x, dtype);
            let (o2, l2, _) = kernel::<Gpu>(&case, &x, dtype);
            assert!(same_bits(&o1, &o2), "{dtype:?}");
            assert!(same_bits(&l1, &l2), "{dtype:?}");
        }
    }

    /// Tensors past `u32::MAX` elements take 64-bit offsets. q, the output and dO are bf16
    /// `[1, 66, 2^19, 128]` (4.4e9 elements, 8.9 GB each) with 6 kv heads and a causal
    /// window of 64 keys; the last kv head's group of 11 query heads straddles element 2^32.
    /// The whole call's output, lse and gradients on that group equal, bit for bit, a call
    /// on copies of that group alone (32-bit offsets, the same tile plans). About 60 GB of
    /// device memory.
    #[test]
    fn cuda_past_u32_offsets_match_a_head_group_alone() {
        use burn::tensor::{Distribution, Tensor};
        use burn_attn_core::{
            attention_with_lse, AttentionOptions, DispatchLog, KernelPolicy, Pass, Window,
        };
        let device = Gpu::device();
        let (heads, kv_heads, seq, dim) = (66, 6, 1 << 19, 128);
        let group = heads / kv_heads;
        assert!(heads * seq * dim > u32::MAX as usize);
        let random = |shape: [usize; 4], seed| {
            device.seed(seed);
            Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device).cast(DType::BF16)
        };
        let q = random([1, heads, seq, dim], 1);
        let k = random([1, kv_heads, seq, dim], 2);
        let v = random([1, kv_heads, seq, dim], 3);
        let d_out = random([1, heads, seq, dim], 4);
        let log = DispatchLog::new();
        let options = AttentionOptions::new()
            .with_window(Window::causal(64))
            .with_kernel(KernelPolicy::Require)
            .with_log(log.clone());
        type T = Tensor<4>;
        let run = |q: T, k: T, v: T, d_out: T| {
            let (out, lse) = attention_with_lse(q.clone(), k.clone(), v.clone(), &options);
            let (dq, dk, dv) =
                op_backward(q, k, v, out.clone(), lse.clone(), d_out, options.clone());
            (out, lse, dq, dk, dv)
        };
        // The group's heads, as contiguous copies.
        let (first, kvh) = (heads - group, kv_heads - 1);
        let alone =
            |t: &T, range: std::ops::Range<usize>| t.clone().slice([0..1, range]).mul_scalar(1.0);
        let small = run(
            alone(&q, first..heads),
            alone(&k, kvh..kv_heads),
            alone(&v, kvh..kv_heads),
            alone(&d_out, first..heads),
        );
        let big = run(q, k, v, d_out);
        let served = log.of(Pass::Forward);
        assert!(served.iter().all(|d| d.served.is_kernel()), "{served:?}");
        let served = log.of(Pass::Backward);
        assert!(served.iter().all(|d| d.served.is_kernel()), "{served:?}");
        let same = |name: &str, a: T, b: T| {
            let differ = a.not_equal(b).int().sum().into_scalar::<i64>();
            assert_eq!(differ, 0, "{name}: {differ} elements differ");
        };
        same("out", big.0.slice([0..1, first..heads]), small.0);
        let lse = |t: Tensor<3>| t.unsqueeze_dim::<4>(3);
        same("lse", lse(big.1).slice([0..1, first..heads]), lse(small.1));
        same("dq", big.2.slice([0..1, first..heads]), small.2);
        same("dk", big.3.slice([0..1, kvh..kv_heads]), small.3);
        same("dv", big.4.slice([0..1, kvh..kv_heads]), small.4);
    }

    /// Every kernel and staging variant once at small shapes (batch 2, GQA, causal and a
    /// two-sided window, head dims with asynchronous (64) and synchronous (36) staging; two
    /// dQ row tiles; key splits; the block-sparse kernels with every element rule, score
    /// term and dropout; the linear kernels' passes): what `scripts/device/run.sh sanitize`
    /// runs under compute-sanitizer.
    #[test]
    fn cuda_sanitizer_sweep() {
        let cases = [
            Case::new(70, 90, 64).causal().gqa(4, 2).batch(2),
            Case::new(65, 33, 36).window(Some(9), Some(4)).batch(2),
        ];
        for case in cases {
            check_low_host::<Gpu>(case, DType::BF16);
            check_f32::<Gpu>(case);
            check_tf32_kernel::<Gpu>(case);
            check_backward_kernel_host::<Gpu>(case, DType::BF16);
            check_backward_kernel::<Gpu>(case, DType::F32);
        }
        let two_row_tiles = burn_attn_core::kernels::plan::ForcedPlan {
            dq_rows: Some(32),
            ..Default::default()
        };
        check_backward_kernel_forced::<Gpu>(cases[0], DType::BF16, &two_row_tiles);
        check_key_splits::<Gpu>(DType::F32, burn_attn_core::Implementation::FlashUnit, 1e-5);
        check_key_splits::<Gpu>(DType::BF16, burn_attn_core::Implementation::FlashMma, 2e-2);
        // Block-sparse cases (of the 34 `check_sparse_kernels` has, 17 per block size): on
        // the band a key bias with ALiBi (8, 25) and padding, dropout, a soft edge and a
        // softcap (9, 26); a causal window with strided columns, a random layout, padding,
        // documents and dropout (16, 33).
        check_sparse_kernels_part::<Gpu>(DType::BF16, BackwardKernel::Mma, 8, 17);
        check_sparse_kernels_part::<Gpu>(DType::BF16, BackwardKernel::Mma, 9, 17);
        check_sparse_kernels_part::<Gpu>(DType::F32, BackwardKernel::Unit, 16, 17);
        // The linear kernels' passes, forward and backward: the matrix-unit one (bf16) and
        // the portable one (f32), causal at a length chunks do not divide.
        let linear = linear_matrix_cases()[..1].to_vec();
        check_linear_cases::<Gpu>(
            linear,
            DType::BF16,
            2e-2,
            [
                burn_attn_core::Implementation::LinearChunkMma,
                burn_attn_core::Implementation::LinearChunkMmaBackward,
            ],
        );
        check_linear_cases::<Gpu>(
            linear_cases()[..1].to_vec(),
            DType::F32,
            1e-4,
            [
                burn_attn_core::Implementation::LinearChunk,
                burn_attn_core::Implementation::LinearChunkBackward,
            ],
        );
    }

    /// The tensor-op cores with bf16 and f16 inputs on CUDA, whose default float is f32 (a
    /// mixed-precision model's calls; causal linear attention in bf16 crashed Burn's graph
    /// builder once), and f32 score terms beside them on the tiled path and the kernels.
    #[test]
    fn cuda_tensor_op_cores_take_half_precision_inputs() {
        use burn_attn_core::KernelPolicy::{Require, Tiled};
        let policies = [Tiled, Require];
        super::half_precision::check_half_precision_cores(
            &Gpu::device(),
            DType::BF16,
            5e-2,
            &policies,
        );
        super::half_precision::check_half_precision_cores(
            &Gpu::device(),
            DType::F16,
            2e-2,
            &policies,
        );
    }

    /// The NaN rule on the matrix-unit (bf16, f16) and portable (f32) kernels, forward and
    /// backward (`check_nan_rows`).
    #[test]
    fn cuda_nan_query_rows_give_nan_rows_only() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            check_nan_rows::<Gpu>(dtype);
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
            check_tf32_kernel::<Gpu>(case);
        }
    }

    #[test]
    fn cuda_training_gradients_match_reference() {
        for case in gradient_grid() {
            check_gradients::<Gpu>(case);
        }
    }

    #[test]
    fn cuda_backward_kernel_f32_matches_reference() {
        for case in backward_grid() {
            check_backward_kernel::<Gpu>(case, DType::F32);
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
            check_backward_kernel_host::<Gpu>(case, DType::F16);
            check_backward_kernel_host::<Gpu>(case, DType::BF16);
        }
    }

    /// The dQ kernel with 32 query rows per plane (two row tiles sharing each K and V
    /// fragment): every band kind, GQA, batch 2, tails, head dims 64, 96 and 128, and 40
    /// (padded columns).
    #[test]
    fn cuda_backward_dq_rows_32_match_the_reference() {
        let forced = burn_attn_core::kernels::plan::ForcedPlan {
            dq_rows: Some(32),
            ..Default::default()
        };
        let cases = [
            Case::new(200, 300, 128).causal(),
            Case::new(257, 257, 128).gqa(4, 2).batch(2),
            Case::new(130, 129, 96).window(Some(40), Some(7)),
            Case::new(300, 300, 64).causal().gqa(8, 1),
            Case::new(70, 90, 40).causal().gqa(4, 2),
            Case::new(1, 17, 128),
        ];
        for case in cases {
            check_backward_kernel_forced::<Gpu>(case, DType::BF16, &forced);
            check_backward_kernel_forced::<Gpu>(case, DType::F16, &forced);
        }
    }

    /// Two cases (one with GQA 8:1 and a window) against Burn's own low-precision autodiff
    /// on the device, which compiles and tunes per shape (tens of seconds a case): it checks
    /// the host reference of the test above on the cases both can afford.
    #[test]
    fn cuda_backward_kernel_low_precision_within_thrice_reference_error() {
        let grid = backward_grid();
        for case in [grid[3], grid[9]] {
            check_backward_kernel::<Gpu>(case, DType::F16);
            check_backward_kernel::<Gpu>(case, DType::BF16);
        }
    }
}
