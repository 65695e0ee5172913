//! Which plan for which shape and device.

use super::*;

fn problem(
    precision: Precision,
    [b, h, n, d]: [usize; 4],
    left: Option<usize>,
    right: Option<usize>,
) -> Problem {
    Problem {
        sizes: Sizes::check([b, h, n, d], [b, h, n, d], [b, h, n, d]).unwrap(),
        precision,
        band: BandArgs {
            scale: 1.0,
            left,
            right,
        },
        aligned_rows: d % 8 == 0,
        span: b * h * n * d,
    }
}

fn mma(p: &Problem, caps: &DeviceCaps, forced: &ForcedPlan) -> Result<MmaPlan, Unsupported> {
    match plan_forward(ForwardKernel::Mma, p, caps, forced)? {
        ForwardPlan::Mma(plan) => Ok(plan),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bf16_d128_full_takes_64_key_tiles_two_row_tiles_async() {
    let p = problem(Precision::BF16, [2, 16, 4096, 128], None, None);
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert_eq!((plan.planes, plan.row_tiles, plan.block_k), (4, 2, 64));
    assert!(plan.async_copy);
    assert_eq!(plan.block_q(), 128);
    assert_eq!(plan.grid, Grid { x: 32, y: 32 });
    assert_eq!(plan.heavy_first, 0);
    assert_eq!(plan.out_vector, 8);
}

#[test]
fn narrow_window_takes_one_row_tile_and_32_keys() {
    let p = problem(Precision::F16, [2, 16, 16384, 128], Some(128), Some(128));
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert_eq!((plan.row_tiles, plan.block_k), (1, 32));
}

#[test]
fn causal_launches_heavy_first_in_groups_of_64_heads() {
    let p = problem(Precision::BF16, [2, 16, 4096, 128], None, Some(0));
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert_eq!(plan.heavy_first, 64);
    // One row block: nothing to reorder.
    let p = problem(Precision::BF16, [2, 16, 64, 128], None, Some(0));
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert_eq!(plan.heavy_first, 0);
}

#[test]
fn head_dim_256_takes_32_key_tiles() {
    let p = problem(Precision::BF16, [1, 2, 512, 256], None, None);
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert_eq!((plan.row_tiles, plan.block_k), (1, 32));
}

#[test]
fn matrix_units_decline_f32_and_other_runtimes_with_typed_reasons() {
    let p = problem(Precision::F32, [1, 2, 64, 64], None, None);
    assert!(matches!(
        mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()),
        Err(Unsupported::Precision { .. })
    ));
    let p = problem(Precision::F16, [1, 2, 64, 64], None, None);
    assert!(matches!(
        mma(&p, &DeviceCaps::lavapipe(), &ForcedPlan::default()),
        Err(Unsupported::Runtime { .. })
    ));
    let bwd = plan_backward(
        BackwardKernel::Mma,
        &problem(Precision::F16, [1, 2, 64, 256], None, None),
        &DeviceCaps::hopper(),
        &ForcedPlan::default(),
    );
    assert_eq!(
        bwd,
        Err(Unsupported::HeadDim {
            dim: 256,
            value_dim: 256,
            max: 128
        })
    );
}

#[test]
fn misaligned_rows_stage_synchronously() {
    let p = problem(Precision::BF16, [1, 2, 256, 80], None, None);
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert!(plan.async_copy, "80 is a multiple of 8");
    let p = problem(Precision::BF16, [1, 2, 256, 36], None, None);
    let plan = mma(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert!(!plan.async_copy);
}

#[test]
fn forced_plans_are_obeyed_or_declined() {
    let p = problem(Precision::BF16, [2, 16, 4096, 128], None, None);
    let forced = ForcedPlan {
        mma_block_k: Some(32),
        mma_planes: Some(2),
        sync_staging: true,
        ..ForcedPlan::default()
    };
    let plan = mma(&p, &DeviceCaps::hopper(), &forced).unwrap();
    assert_eq!((plan.block_k, plan.planes, plan.async_copy), (32, 2, false));
    let bad = ForcedPlan {
        mma_block_k: Some(48),
        ..ForcedPlan::default()
    };
    let err = mma(&p, &DeviceCaps::hopper(), &bad).unwrap_err();
    assert!(err.to_string().contains("mma_block_k = 48"), "{err}");
    let small = DeviceCaps {
        shared_memory: 48 * 1024,
        ..DeviceCaps::hopper()
    };
    let too_big = ForcedPlan {
        mma_block_k: Some(64),
        ..ForcedPlan::default()
    };
    assert!(matches!(
        mma(&p, &small, &too_big),
        Err(Unsupported::Forced(_))
    ));
}

#[test]
fn tf32_takes_f32_only() {
    let p = problem(Precision::F32, [1, 4, 1024, 128], None, None);
    let plan = plan_forward(
        ForwardKernel::Tf32,
        &p,
        &DeviceCaps::hopper(),
        &ForcedPlan::default(),
    )
    .unwrap();
    let ForwardPlan::Tf32(plan) = plan else {
        panic!("{plan:?}")
    };
    assert_eq!((plan.row_tiles, plan.block_k, plan.dim_pad), (1, 32, 128));
    let p = problem(Precision::BF16, [1, 4, 1024, 128], None, None);
    assert!(plan_forward(
        ForwardKernel::Tf32,
        &p,
        &DeviceCaps::hopper(),
        &ForcedPlan::default()
    )
    .is_err());
}

#[test]
fn portable_tiles_fit_the_48_kib_budget() {
    let p = problem(Precision::F32, [8, 16, 4096, 128], None, None);
    let ForwardPlan::Unit(plan) = plan_forward(
        ForwardKernel::Unit,
        &p,
        &DeviceCaps::hopper(),
        &ForcedPlan::default(),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!((plan.tiles.rows, plan.tiles.cols), (32, 32));
}

#[test]
fn lavapipe_declines_bands_past_its_loop_budget() {
    let caps = DeviceCaps::lavapipe();
    let short = problem(Precision::F32, [1, 1, 1024, 128], None, None);
    assert!(plan_forward(ForwardKernel::Unit, &short, &caps, &ForcedPlan::default()).is_ok());
    let long = problem(Precision::F32, [1, 1, 8192, 128], None, None);
    let err = plan_forward(ForwardKernel::Unit, &long, &caps, &ForcedPlan::default());
    assert!(
        matches!(err, Err(Unsupported::LoopBudget { .. })),
        "{err:?}"
    );
    let lifted = ForcedPlan {
        lift_loop_cap: true,
        ..ForcedPlan::default()
    };
    assert!(plan_forward(ForwardKernel::Unit, &long, &caps, &lifted).is_ok());
    let err = plan_backward(BackwardKernel::Unit, &long, &caps, &ForcedPlan::default());
    assert!(
        matches!(err, Err(Unsupported::LoopBudget { .. })),
        "{err:?}"
    );
}

#[test]
fn backward_tiles_at_d128() {
    let p = problem(Precision::BF16, [2, 16, 4096, 128], None, Some(0));
    let BackwardPlan::Mma(plan) = plan_backward(
        BackwardKernel::Mma,
        &p,
        &DeviceCaps::hopper(),
        &ForcedPlan::default(),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!((plan.block_k, plan.block_q), (32, 64));
    assert_eq!((plan.dq_heavy_first, plan.kv_heavy_first), (64, 64));
    let p = problem(Precision::BF16, [2, 16, 4096, 64], None, None);
    let BackwardPlan::Mma(plan) = plan_backward(
        BackwardKernel::Mma,
        &p,
        &DeviceCaps::hopper(),
        &ForcedPlan::default(),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!((plan.block_k, plan.block_q), (64, 64));
}

#[test]
fn sizes_name_the_values_they_reject() {
    let err = Sizes::check([1, 6, 8, 64], [1, 4, 8, 64], [1, 4, 8, 64]).unwrap_err();
    assert!(err.to_string().contains("[1, 6, 8, 64]"), "{err}");
    let err = Sizes::check([1, 2, 8, 300], [1, 2, 8, 300], [1, 2, 8, 300]).unwrap_err();
    assert_eq!(
        err,
        Unsupported::HeadDim {
            dim: 300,
            value_dim: 300,
            max: MAX_HEAD_DIM
        }
    );
    assert!(matches!(
        Grid::new(70_000 * 16, 16, 1),
        Err(Unsupported::Grid { .. })
    ));
}

/// Tensors past `u32::MAX` elements take 64-bit offsets where the device has them (every
/// kernel, forward and backward); elsewhere the kernels decline naming the span.
#[test]
fn past_u32_elements_take_64_bit_offsets_or_decline() {
    let small = problem(Precision::BF16, [1, 63, 1 << 19, 128], Some(63), Some(0));
    let mut big = problem(Precision::BF16, [1, 66, 1 << 19, 128], Some(63), Some(0));
    assert!(small.span <= u32::MAX as usize && big.span > u32::MAX as usize);
    let hopper = DeviceCaps::hopper();
    let none = ForcedPlan::default();
    let (small_plan, big_plan) = (
        mma(&small, &hopper, &none).unwrap(),
        mma(&big, &hopper, &none).unwrap(),
    );
    assert_eq!(small_plan.offsets, Offsets::U32);
    assert_eq!(big_plan.offsets, Offsets::U64);
    // CubeCL's checked `cp.async` does not compile under 64-bit addressing.
    assert!(small_plan.async_copy && !big_plan.async_copy);
    for kernel in [BackwardKernel::Mma, BackwardKernel::Unit] {
        let offsets = match plan_backward(kernel, &big, &hopper, &none).unwrap() {
            BackwardPlan::Mma(plan) => {
                assert!(!plan.async_copy);
                plan.offsets
            }
            BackwardPlan::Unit(plan) => plan.offsets,
        };
        assert_eq!(offsets, Offsets::U64, "{kernel:?}");
    }
    big.precision = Precision::F32;
    let err = plan_forward(ForwardKernel::Unit, &big, &DeviceCaps::lavapipe(), &none).unwrap_err();
    assert_eq!(
        err,
        Unsupported::Offsets {
            span: big.span,
            max: u32::MAX as usize,
            runtime: "wgpu<vulkan>",
        }
    );
    assert!(err.to_string().contains(&big.span.to_string()), "{err}");
}

#[test]
fn span_counts_strided_views() {
    assert_eq!(span(&[2, 3], &[3, 1]), 6);
    // Every other row of a [4, 8] buffer: the last row starts at 48.
    assert_eq!(span(&[2, 8], &[24, 1]), 32);
    assert_eq!(span(&[2, 0, 4], &[4, 4, 1]), 0);
}

#[test]
fn contiguous_problem_of_metadata() {
    let band = BandArgs {
        scale: 0.125,
        left: None,
        right: Some(0),
    };
    let p = Problem::contiguous(
        [2, 8, 100, 64],
        [2, 2, 300, 64],
        [2, 2, 300, 40],
        Precision::BF16,
        band,
    )
    .unwrap();
    assert_eq!(
        (p.sizes.heads, p.sizes.kv_heads, p.sizes.value_dim),
        (8, 2, 40)
    );
    // Rows of 64 and 40 bf16 elements are whole 16-byte pieces.
    assert!(p.aligned_rows);
    // The largest tensor: q (2 * 8 * 100 * 64), above k (2 * 2 * 300 * 64) and the output.
    assert_eq!(p.span, 2 * 8 * 100 * 64);
    // Five rows of `d` columns, q with `heads[0]` heads, k and v with `heads[1]`.
    let small = |heads: [usize; 2], d: usize, precision: Precision| {
        let kv = [1, heads[1], 5, d];
        Problem::contiguous([1, heads[0], 5, d], kv, kv, precision, band)
    };
    let odd = small([1, 1], 36, Precision::F32);
    assert!(odd.unwrap().aligned_rows, "36 f32 = 9 pieces of 16 bytes");
    let odd = small([1, 1], 33, Precision::F16);
    assert!(!odd.unwrap().aligned_rows);
    let mismatched = small([4, 3], 32, Precision::F16);
    assert!(matches!(mismatched, Err(Unsupported::Shapes(_))));
}

#[test]
fn sparse_plans_take_the_matrix_units_backward_where_it_stages_asynchronously() {
    let p = problem(Precision::BF16, [2, 16, 4096, 128], None, None);
    let plan = plan_sparse(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    let SparseBackward::Mma(backward) = plan.backward else {
        panic!("{:?}", plan.backward)
    };
    assert_eq!((backward.block_k, backward.block_q), (32, 64));
    // The list blocks are multiples of every kernel's tiles (query rows x keys).
    assert_eq!(plan.backward.tiles(), [(64, 32), (64, 64)]);
    assert_eq!((plan.block_q, plan.block_k), (128, 64));
    // Synchronous staging, f32 and other runtimes: the portable backward.
    let forced = ForcedPlan {
        sync_staging: true,
        ..ForcedPlan::default()
    };
    let plan = plan_sparse(&p, &DeviceCaps::hopper(), &forced).unwrap();
    assert!(matches!(plan.backward, SparseBackward::Unit(_)), "{plan:?}");
    let p = problem(Precision::F32, [2, 16, 4096, 128], None, None);
    let plan = plan_sparse(&p, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert!(matches!(plan.backward, SparseBackward::Unit(_)), "{plan:?}");
}

#[test]
fn portable_forwards_split_long_keys_of_few_cubes() {
    let decode = |seq_k: usize| Problem {
        sizes: Sizes::check([8, 8, 4, 128], [8, 8, seq_k, 128], [8, 8, seq_k, 128]).unwrap(),
        precision: Precision::F32,
        band: BandArgs {
            scale: 1.0,
            left: None,
            right: Some(0),
        },
        aligned_rows: true,
        span: 8 * 8 * seq_k * 128,
    };
    let unit = |p: &Problem, forced: &ForcedPlan| match plan_forward(
        ForwardKernel::Unit,
        p,
        &DeviceCaps::hopper(),
        forced,
    )
    .unwrap()
    {
        ForwardPlan::Unit(plan) => plan,
        other => panic!("{other:?}"),
    };
    // 64 cubes over 32768 keys: four splits bring them to 256.
    let plan = unit(&decode(32768), &ForcedPlan::default());
    assert_eq!(plan.grid.x * plan.grid.y, 64);
    assert_eq!((plan.key_splits, plan.split_keys), (4, 8192));
    // Too few keys to split, and a grid that fills the device: one split.
    assert_eq!(unit(&decode(300), &ForcedPlan::default()).key_splits, 1);
    let full = problem(Precision::F32, [8, 16, 4096, 128], None, None);
    let plan = unit(&full, &ForcedPlan::default());
    assert_eq!((plan.key_splits, plan.split_keys), (1, 4096));
    // Forced, within 1..=64.
    let forced = |splits| ForcedPlan {
        key_splits: Some(splits),
        ..ForcedPlan::default()
    };
    assert_eq!(unit(&full, &forced(3)).key_splits, 3);
    assert!(plan_forward(
        ForwardKernel::Unit,
        &full,
        &DeviceCaps::hopper(),
        &forced(65)
    )
    .is_err());
    // Partial outputs past 32-bit counts: a forced split count declines, a chosen one is 1.
    let long = problem(Precision::F32, [1, 32, 1 << 20, 128], None, None);
    let err = plan_forward(
        ForwardKernel::Unit,
        &long,
        &DeviceCaps::hopper(),
        &forced(2),
    );
    assert!(
        matches!(&err, Err(Unsupported::Forced(why)) if why.contains("partial outputs")),
        "{err:?}"
    );
    // The matrix-unit forward splits a decoding step's long keys on its own, and as a
    // forced plan asks.
    let bf16 = Problem {
        precision: Precision::BF16,
        ..decode(32768)
    };
    let plan = mma(&bf16, &DeviceCaps::hopper(), &ForcedPlan::default()).unwrap();
    assert!(plan.key_splits > 1, "{plan:?}");
    assert_eq!(plan.split_keys % plan.block_k, 0);
    let plan = mma(&bf16, &DeviceCaps::hopper(), &forced(4)).unwrap();
    assert_eq!((plan.key_splits, plan.split_keys % plan.block_k), (4, 0));
}

#[test]
fn dq_row_tiles_follow_the_visible_keys() {
    let plan = |p: &Problem, forced: &ForcedPlan| match plan_backward(
        BackwardKernel::Mma,
        p,
        &DeviceCaps::hopper(),
        forced,
    ) {
        Ok(BackwardPlan::Mma(plan)) => plan,
        other => panic!("{other:?}"),
    };
    let rows = |dq_rows| ForcedPlan {
        dq_rows: Some(dq_rows),
        ..ForcedPlan::default()
    };
    let default = ForcedPlan::default();
    let full = problem(Precision::BF16, [2, 16, 4096, 128], None, None);
    // By default: two tiles where rows see 2048 keys or more at d = 128.
    let cases = [
        (full, 2),
        (
            problem(Precision::BF16, [2, 16, 4096, 128], None, Some(0)),
            2,
        ),
        (
            problem(Precision::BF16, [2, 16, 1024, 128], None, Some(0)),
            1,
        ),
        (
            problem(Precision::BF16, [2, 16, 16384, 128], Some(512), Some(512)),
            1,
        ),
        (problem(Precision::BF16, [2, 16, 4096, 64], None, None), 1),
    ];
    for (p, tiles) in cases {
        assert_eq!(
            plan(&p, &default).dq_row_tiles,
            tiles,
            "{:?} {:?}",
            p.sizes,
            p.band
        );
    }
    // About 99 KiB of shared memory (sm_86/89): two tiles would take 16-key tiles where one
    // takes 32, so one.
    let small = DeviceCaps {
        shared_memory: 101_376,
        ..DeviceCaps::hopper()
    };
    match plan_backward(BackwardKernel::Mma, &full, &small, &default) {
        Ok(BackwardPlan::Mma(p)) => assert_eq!((p.dq_row_tiles, p.block_k), (1, 32)),
        other => panic!("{other:?}"),
    }
    let (two, one) = (plan(&full, &rows(32)), plan(&full, &rows(16)));
    assert_eq!((one.dq_row_tiles, two.dq_row_tiles), (1, 2));
    assert_eq!(two.dq_grid.x * 2, one.dq_grid.x);
    assert_eq!(two.kv_grid, one.kv_grid);
    let err =
        plan_backward(BackwardKernel::Mma, &full, &DeviceCaps::hopper(), &rows(48)).unwrap_err();
    assert!(err.to_string().contains("dq_rows = 48"), "{err}");
    let sparse = plan_sparse(&full, &DeviceCaps::hopper(), &rows(32)).unwrap();
    assert!(
        matches!(sparse.backward, SparseBackward::Mma(p) if p.dq_row_tiles == 1),
        "the sparse dQ kernel keeps 16 rows a plane: {:?}",
        sparse.backward
    );
}
