//! The FlashAttention kernel on WGPU (lavapipe in CI) against the materialised reference.
//!
//! Truth is `reference_attention` on `NdArray<f64>`. f32 runs must agree with it to an
//! absolute bound; f16/bf16 runs must stay within 2x the error of the reference computed
//! in the same low precision on the same device (DESIGN.md, "Tests").
//!
//! Without a Vulkan device these tests fail (never pass unrun): build without the `wgpu`
//! feature to run the CPU suite alone.
#![cfg(feature = "wgpu")]

use std::sync::OnceLock;

use burn::tensor::{DType, Device, DeviceKind, Tensor};

mod half_precision;
mod kernel_common;
use burn_attn_core::kernels::launch::flash_forward_with;
use burn_attn_core::kernels::plan::{BandArgs, ForcedPlan, ForwardKernel, Unsupported};
use burn_attn_core::KernelPolicy;
use half_precision::check_half_precision_cores;
use kernel_common::*;

/// The default WGPU device (Burn's `Cube` backend, fused), where every check here runs;
/// the launcher checks take its tensors' CubeCL primitives.
struct Gpu;

impl On for Gpu {
    fn device() -> Device {
        Device::wgpu(DeviceKind::DefaultDevice)
    }
}

/// Panics, saying what to install, where no usable WGPU adapter exists: a kernel test that
/// cannot run fails rather than pass without running.
fn require_gpu() {
    static PROBE: OnceLock<bool> = OnceLock::new();
    let ok = *PROBE.get_or_init(|| {
        std::panic::catch_unwind(|| {
            let t = Tensor::<1>::from_floats([1.0, 2.0], &Gpu::device());
            t.sum().into_scalar::<f32>()
        })
        .is_ok()
    });
    assert!(
        ok,
        "no WGPU/Vulkan device: install mesa-vulkan-drivers (lavapipe), or run the suite \
         without the `wgpu` feature"
    );
}

/// The block-sparse plan builds with WGPU's device ops (32-bit integers) as on the CPU.
#[test]
fn block_mask_builds_on_the_device() {
    require_gpu();
    check_block_mask_on_device::<Gpu>();
}

/// Strided columns run the band and gathered-column calls on the portable kernels, forward
/// and backward: without masks on the band kernels, with key padding or dropout on the
/// block-sparse ones.
#[test]
fn strided_columns_split_into_band_calls() {
    require_gpu();
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

/// Context parallelism's ring form runs every block visit on the portable kernels, forward
/// and backward, and equals one call over the whole sequence.
#[test]
fn context_parallel_ring_runs_the_kernels() {
    require_gpu();
    check_context_parallel::<Gpu>(
        DType::F32,
        (
            burn_attn_core::Implementation::FlashUnit,
            burn_attn_core::Implementation::FlashUnitBackward,
        ),
    );
}

/// The block-sparse portable forward and backward: patterns, key padding and document ids.
#[test]
fn sparse_kernel_f32_matches_the_host_truth() {
    require_gpu();
    check_sparse_kernels::<Gpu>(
        DType::F32,
        burn_attn_core::kernels::plan::BackwardKernel::Unit,
    );
    check_invalid_list_indices::<Gpu>();
}

/// Training through `pattern_attention` with strided columns, block layouts, key padding
/// and dropout runs the block-sparse kernels, forward and backward.
#[test]
fn sparse_training_runs_the_kernels() {
    require_gpu();
    check_sparse_training::<Gpu>(
        DType::F32,
        (
            burn_attn_core::Implementation::FlashUnitSparse,
            burn_attn_core::Implementation::FlashUnitSparseBackward,
        ),
    );
    check_dropout_training::<Gpu>();
    check_empty_masked_calls::<Gpu>();
    check_block_mask_cache::<Gpu>();
}

/// Document ids (packed sequences) and dense attention masks through `masked_attention`:
/// the block-sparse kernels on WGPU and the tiled tensor ops on the CPU, both against the
/// host truth.
#[test]
fn document_masks_match_the_host_truth() {
    require_gpu();
    check_document_training::<Gpu>(Some((
        burn_attn_core::Implementation::FlashUnitSparse,
        burn_attn_core::Implementation::FlashUnitSparseBackward,
    )));
    check_document_training::<Truth>(None);
    check_attention_mask_training::<Gpu>(Some((
        burn_attn_core::Implementation::FlashUnitSparse,
        burn_attn_core::Implementation::FlashUnitSparseBackward,
    )));
    check_attention_mask_training::<Truth>(None);
}

/// Learned sparsity and adaptive windows on WGPU (score terms in the kernels) give the
/// CPU's outputs and gradients.
#[test]
fn score_term_modules_match_the_cpu() {
    require_gpu();
    check_score_term_modules::<Gpu>(1e-4);
}

/// Decoding with a key/value cache on WGPU equals the full forward's rows.
#[test]
fn cached_decoding_matches_the_full_forward() {
    require_gpu();
    check_cached_decoding::<Gpu>(1e-4);
}

/// Score terms (a per-key bias, a soft window edge) in training through `masked_attention`:
/// the block-sparse kernels on WGPU with the terms' gradients from their backward, and the
/// tiled tensor ops on the CPU, both against the host truth.
#[test]
fn score_terms_match_the_host_truth() {
    require_gpu();
    check_score_term_training::<Gpu>(Some((
        burn_attn_core::Implementation::FlashUnitSparse,
        burn_attn_core::Implementation::FlashUnitSparseBackward,
    )));
    check_score_term_training::<Truth>(None);
}

/// Linear attention on the chunked kernel: causal and not, normalised and not, GQA,
/// lengths chunks do not divide, one row; forward and backward against the quadratic form.
#[test]
fn linear_kernel_matches_the_quadratic_form() {
    require_gpu();
    check_linear_training::<Gpu>(DType::F32, 1e-4);
    check_linear_training::<Gpu>(DType::F16, 5e-3);
    check_linear_streaming::<Gpu>(1e-4);
}

#[test]
fn kernel_f32_matches_reference_plain() {
    require_gpu();
    for case in grid() {
        check_f32::<Gpu>(case);
    }
}

#[test]
fn kernel_f32_matches_reference_fused() {
    require_gpu();
    for case in grid().into_iter().step_by(3) {
        check_f32::<Gpu>(case);
    }
}

#[test]
fn kernel_f16_within_twice_reference_error() {
    require_gpu();
    // Every 4th case: the f16 reference on lavapipe is slow (about 25 s a case).
    for case in grid().into_iter().step_by(4) {
        check_low::<Gpu>(case, DType::F16);
    }
}

/// WGSL has no bf16 type (cubecl-wgpu panics "bf16 is not a valid WgpuElement"), so bf16 is
/// tested on CUDA only (`cuda_kernel.rs`); this says so loudly instead of passing.
#[test]
fn kernel_bf16_not_available_on_wgsl() {
    eprintln!("!!!!!!!! bf16 kernel test NOT run on WGPU: WGSL has no bf16 (tested on CUDA)");
}

/// Which implementation served each pass, through the fusion stream: the portable
/// kernels (WGPU has no matrix units; tf32 declines there too).
#[test]
fn dispatch_is_recorded_per_call() {
    require_gpu();
    check_dispatch::<Gpu>(
        burn_attn_core::Implementation::FlashUnit,
        burn_attn_core::Implementation::FlashUnit,
    );
}

#[test]
fn rows_without_keys_are_zero_with_neg_inf_lse() {
    require_gpu();
    let case = Case::new(40, 3, 32).causal();
    let x = inputs(&case, 5);
    let (o, l, _) = kernel::<Gpu>(&case, &x, DType::F32);
    // Rows 0..37 sit before key 0: no key is visible.
    let per_head = case.seq_q;
    for h in 0..case.heads {
        for i in 0..37 {
            assert_eq!(l[h * per_head + i], f64::NEG_INFINITY, "row {i} lse");
            let row = &o[(h * per_head + i) * case.dim..][..case.dim];
            assert!(row.iter().all(|&x| x == 0.0), "row {i} output");
        }
        assert!(l[h * per_head + 37].is_finite());
    }
    // No key at all.
    let case = Case::new(5, 0, 32).window(Some(3), Some(3));
    let x = inputs(&case, 6);
    let (o, l, _) = kernel::<Gpu>(&case, &x, DType::F32);
    assert!(l.iter().all(|&x| x == f64::NEG_INFINITY), "{l:?}");
    assert!(o.iter().all(|&x| x == 0.0));
}

/// The NaN rule on the portable kernels, forward and backward (`check_nan_rows`).
#[test]
fn nan_query_rows_give_nan_rows_only() {
    require_gpu();
    check_nan_rows::<Gpu>(DType::F32);
}

/// The matrix-unit forwards' online-softmax step (shared by `flash_mma`'s products, which need CUDA's matrix units) through its probe kernel, which needs none: masks,
/// the running maxima and sums, rows with no key yet, against the host in f64.
#[test]
fn mma_online_softmax_step_matches_host() {
    require_gpu();
    check_online_softmax_probe::<Gpu>();
}

/// The heavy-first cube order (which block and head each cube of every kernel computes,
/// causal launches reorder them) through its probe kernel, against the order written out
/// on the host.
#[test]
fn cube_order_matches_host() {
    require_gpu();
    check_cube_order::<Gpu>();
}

/// Long rows and wide head dims: 1025 keys causal and windowed at d = 64, and d = 128
/// past 224 keys (the shape that exposed llvmpipe's loop budget with the v1 kernel).
#[test]
fn kernel_long_sequence() {
    require_gpu();
    let mut case = Case::new(1025, 1025, 64).causal();
    case.heads = 1;
    case.kv_heads = 1;
    check_f32::<Gpu>(case.window(Some(100), Some(0)));
    check_f32::<Gpu>(case.window(Some(200), Some(200)));
    check_f32::<Gpu>(case);
    let mut wide = Case::new(40, 300, 128);
    wide.heads = 1;
    wide.kv_heads = 1;
    check_f32::<Gpu>(wide);
    check_f32::<Gpu>(wide.window(Some(100), Some(100)));
}

/// The portable kernel at the edge of its cap on software adapters: llvmpipe leaves every
/// loop of an invocation once it has run 65535 iterations, silently, so the launcher
/// declines bands its units could not finish. Going down from 17000 keys at head dim 64,
/// the first band the launcher takes must come out right, and it must be within a few
/// percent of the budget (about 15700 keys: a cap that declines far more than it must
/// would send long rows to the slow tiled path). On an adapter without the cap the first
/// band runs and is checked the same way.
#[test]
fn unit_kernel_at_the_software_loop_cap() {
    require_gpu();
    let mut taken = None;
    for seq_k in [17000, 16000, 15744, 15000, 12000] {
        let mut case = Case::new(32, seq_k, 64);
        case.heads = 1;
        case.kv_heads = 1;
        match run_forward_launcher::<Gpu>(&case, 5, ForwardKernel::Unit) {
            Ok(result) => {
                taken = Some((case, result));
                break;
            }
            Err(why) => eprintln!("{seq_k} keys declined: {why}"),
        }
    }
    let (case, (_, [to, tl], [ko, kl])) = taken.expect("the launcher declined 12000 keys");
    assert!(
        case.seq_k >= 15000,
        "the cap declined {} keys: far inside llvmpipe's budget",
        case.seq_k + 1
    );
    let (eo, el) = (max_err(&ko, &to), max_err(&kl, &tl));
    let bound = f32_bound(&case);
    eprintln!("{} keys taken: out err {eo:e}, lse err {el:e}", case.seq_k);
    assert!(
        eo <= bound && el <= bound * 4.0,
        "{case:?}: out err {eo:e}, lse err {el:e}, bound {bound:e}"
    );
}

/// The portable backward kernels at the edge of their cap on software adapters (see
/// `unit_kernel_at_the_software_loop_cap`), each kernel on its long side at head dim 128:
/// the dQ kernel walks the keys of 16 query rows, the dK/dV kernel the query rows of 16
/// keys. Going down, the first call the launcher takes must give the right gradients and
/// lie within a few percent of llvmpipe's budget (3360 keys and 1664 rows by the count).
#[test]
fn unit_backward_at_the_software_loop_cap() {
    require_gpu();
    let sides = [
        ("dQ", [(16, 3600), (16, 3400), (16, 3360), (16, 3000)], 3200),
        (
            "dK/dV",
            [(1800, 16), (1700, 16), (1664, 16), (1500, 16)],
            1600,
        ),
    ];
    for (kernel, shapes, at_least) in sides {
        let mut taken = None;
        for (seq_q, seq_k) in shapes {
            let mut case = Case::new(seq_q, seq_k, 128);
            case.heads = 1;
            case.kv_heads = 1;
            match check_backward_kernel_if_taken::<Gpu>(case, DType::F32) {
                Ok(()) => {
                    taken = Some(case);
                    break;
                }
                Err(why) => eprintln!("{kernel}: {seq_q} x {seq_k} declined: {why}"),
            }
        }
        let case = taken.unwrap_or_else(|| panic!("{kernel}: every size declined"));
        let long_side = case.seq_q.max(case.seq_k);
        eprintln!("{kernel}: {} x {} taken and right", case.seq_q, case.seq_k);
        assert!(
            long_side >= at_least,
            "{kernel}: the cap declined past {long_side}: far inside llvmpipe's budget"
        );
    }
}

/// The forward launcher checks q, k and v against each other itself (it is public): a key
/// head dim other than the query's, a kv head count that does not divide the query heads,
/// or v's length differing from k's is declined with the shapes named, never launched.
#[test]
fn unit_launcher_declines_mismatched_shapes() {
    require_gpu();
    let device = Gpu::device();
    let t = |shape: [usize; 4]| cube_primitive(Tensor::<4>::zeros(shape, &device));
    let band = BandArgs {
        scale: 0.25,
        left: None,
        right: None,
    };
    let q = [1, 4, 8, 16];
    for (k, v) in [
        ([1, 4, 8, 8], [1, 4, 8, 16]),  // k's head dim
        ([1, 3, 8, 16], [1, 3, 8, 16]), // 3 kv heads for 4 query heads
        ([1, 2, 8, 16], [1, 2, 9, 16]), // v longer than k
        ([2, 2, 8, 16], [2, 2, 8, 16]), // batch
    ] {
        let forced = ForcedPlan::default();
        match flash_forward_with(ForwardKernel::Unit, t(q), t(k), t(v), band, &forced) {
            Err(Unsupported::Shapes(why)) => {
                assert!(why.contains("do not match"), "k {k:?}, v {v:?}: {why}")
            }
            Err(other) => panic!("k {k:?}, v {v:?}: declined for another reason: {other}"),
            Ok(_) => panic!("k {k:?}, v {v:?} with q {q:?}: launched"),
        }
    }
}

#[test]
fn training_gradients_match_reference() {
    require_gpu();
    for case in gradient_grid() {
        check_gradients::<Gpu>(case);
    }
    // d = 128 over 300 keys / 300 query rows: past lavapipe's loop budget, where the
    // backward launcher declines and the tiled backward runs; the kernel elsewhere.
    let mut wide = Case::new(40, 300, 128);
    wide.heads = 1;
    wide.kv_heads = 1;
    check_gradients::<Gpu>(wide);
    wide.seq_q = 300;
    wide.seq_k = 40;
    check_gradients::<Gpu>(wide);
}

#[test]
fn backward_kernel_f32_matches_reference() {
    require_gpu();
    for case in backward_grid() {
        check_backward_kernel::<Gpu>(case, DType::F32);
    }
    // Long rows at head dim 128 (the v1 kernels' limit on lavapipe was about 160).
    let mut wide = Case::new(40, 160, 128);
    wide.heads = 1;
    wide.kv_heads = 1;
    check_backward_kernel::<Gpu>(wide, DType::F32);
    wide.seq_q = 160;
    wide.seq_k = 40;
    check_backward_kernel::<Gpu>(wide, DType::F32);
}

#[test]
fn backward_kernel_f16_within_thrice_reference_error() {
    require_gpu();
    // Two cases (one with GQA 8:1 and a window): the f16 reference gradients on lavapipe
    // take tens of seconds a case.
    let grid = backward_grid();
    for case in [grid[3], grid[9]] {
        check_backward_kernel::<Gpu>(case, DType::F16);
    }
}

/// Two calls of the kernel with the same inputs give the same bits (output and lse).
#[test]
fn kernel_forward_is_deterministic() {
    require_gpu();
    let case = Case::new(97, 97, 64).causal().gqa(4, 2).batch(2);
    let x = inputs(&case, 9);
    let (o1, l1, _) = kernel::<Gpu>(&case, &x, DType::F32);
    let (o2, l2, _) = kernel::<Gpu>(&case, &x, DType::F32);
    assert!(same_bits(&o1, &o2));
    assert!(same_bits(&l1, &l2));
}

/// The tensor-op cores with f16 inputs on a backend whose default float is f32 (as a
/// mixed-precision model calls them), and f32 score terms beside f16 inputs on the tiled
/// path and the block-sparse kernels (`check_half_precision_cores`).
#[test]
fn tensor_op_cores_take_half_precision_inputs() {
    require_gpu();
    check_half_precision_cores(
        &Gpu::device(),
        DType::F16,
        2e-2,
        &[KernelPolicy::Tiled, KernelPolicy::Require],
    );
}

/// Calls from several threads on one device give the same bits as the same calls made one
/// after another.
#[test]
fn concurrent_calls_match_serial_calls() {
    require_gpu();
    check_concurrent_calls::<Gpu>(DType::F32);
}

/// The portable forward with its keys split gives the unsplit call's rows.
#[test]
fn key_splits_match_the_unsplit_forward() {
    require_gpu();
    check_key_splits::<Gpu>(DType::F32, burn_attn_core::Implementation::FlashUnit, 1e-5);
}
