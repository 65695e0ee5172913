//! Probe for the move to Burn 0.22 (see Cargo.toml): compiles the kernel crate's plans,
//! components and portable forward kernel as they are on main against CubeCL 0.11, runs the
//! kernel on the first CUDA device, and checks it against an f64 host reference and against
//! Burn 0.22's own tensor ops on the same device. Prints one line per check; exits non-zero
//! on a mismatch.

#![allow(dead_code, clippy::all)]

#[path = "../../../crates/burn-attn-kernels/src/plan/mod.rs"]
mod plan;

mod components {
    #[path = "../../../../crates/burn-attn-kernels/src/components/band.rs"]
    pub mod band;
    #[path = "../../../../crates/burn-attn-kernels/src/components/fragments.rs"]
    pub mod fragments;
    #[path = "../../../../crates/burn-attn-kernels/src/components/register_tile.rs"]
    pub mod register_tile;
    #[path = "../../../../crates/burn-attn-kernels/src/components/schedule.rs"]
    pub mod schedule;
    #[path = "../../../../crates/burn-attn-kernels/src/components/softmax.rs"]
    pub mod softmax;
    #[path = "../../../../crates/burn-attn-kernels/src/components/staging.rs"]
    pub mod staging;
}

mod kernels {
    #[path = "../../../../crates/burn-attn-kernels/src/kernels/flash_unit.rs"]
    pub mod flash_unit;
}

use cubecl::prelude::*;
use cubecl_cuda::{CudaDevice, CudaRuntime};

use plan::{
    plan_forward, BandArgs, DeviceCaps, ForcedPlan, ForwardKernel, ForwardPlan, Precision,
    Problem, Sizes,
};

const B: usize = 2;
const H: usize = 4;
const N: usize = 197;
const D: usize = 64;

/// Seeded values in [-1, 1).
fn seeded(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Softmax attention in f64 on the host, causal when `causal`.
fn host_attention(q: &[f32], k: &[f32], v: &[f32], scale: f32, causal: bool) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    for bh in 0..B * H {
        let at = |i: usize| bh * N * D + i * D;
        for i in 0..N {
            let keys = if causal { i + 1 } else { N };
            let scores: Vec<f64> = (0..keys)
                .map(|j| {
                    (0..D).map(|c| q[at(i) + c] as f64 * k[at(j) + c] as f64).sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            for c in 0..D {
                let acc: f64 = (0..keys).map(|j| weights[j] * v[at(j) + c] as f64).sum();
                out[at(i) + c] = (acc / sum) as f32;
            }
        }
    }
    out
}

/// The same attention with Burn 0.22's tensor ops on its CUDA device.
fn burn_attention(q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Vec<f32> {
    use burn::tensor::{activation::softmax, Device, Tensor, TensorData};
    let device = Device::cuda(0);
    let tensor = |x: &[f32]| Tensor::<4>::from_data(TensorData::new(x.to_vec(), [B, H, N, D]), &device);
    let scores = tensor(q).matmul(tensor(k).swap_dims(2, 3)) * scale;
    let out = softmax(scores, 3).matmul(tensor(v));
    out.into_data().to_vec::<f32>().expect("f32 output")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the portable forward planned for this problem; returns the output.
fn run_kernel(
    client: &ComputeClient,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let shape = [B, H, N, D];
    let sizes = Sizes::check(shape, shape, shape).expect("valid sizes");
    let band = BandArgs {
        scale,
        left: None,
        right: if causal { Some(0) } else { None },
    };
    let problem = Problem {
        sizes,
        precision: Precision::F32,
        band,
        aligned_rows: true,
    };
    let ForwardPlan::Unit(plan) = plan_forward(
        ForwardKernel::Unit,
        &problem,
        &DeviceCaps::hopper(),
        &ForcedPlan::default(),
    )
    .expect("the portable forward takes the problem") else {
        unreachable!("the unit kernel plans a unit plan")
    };
    let upload = |x: &[f32]| client.create_from_slice(f32::as_bytes(x));
    let strides = [H * N * D, N * D, D, 1];
    let arg = |handle: cubecl::server::Handle, shape: &[usize], strides: &[usize]| unsafe {
        TensorArg::from_raw_parts(handle, strides.into(), shape.into())
    };
    let out = client.empty(B * H * N * D * 4);
    let lse = client.empty(B * H * N * 4);
    let tiles = plan.tiles;
    kernels::flash_unit::flash_unit_kernel::launch(
        client,
        CubeCount::Static(plan.grid.x, plan.grid.y, 1),
        CubeDim::new_1d(tiles.units() as u32),
        arg(upload(q), &shape, &strides),
        arg(upload(k), &shape, &strides),
        arg(upload(v), &shape, &strides),
        arg(out.clone(), &shape, &strides),
        arg(lse, &[B, H, N], &[H * N, N, 1]),
        scale,
        sizes.side(band.left),
        sizes.side(band.right),
        plan.heavy_first,
        f32::NEG_INFINITY,
        D,
        D,
        tiles.rows,
        tiles.cols,
        tiles.row_threads,
        tiles.col_threads,
        f32::as_type_native_unchecked().storage_type(),
    );
    let bytes = client.read_one(out).expect("the output reads back");
    f32::from_bytes(&bytes).to_vec()
}

fn main() {
    let client = CudaRuntime::client(&CudaDevice::new(0));
    let len = B * H * N * D;
    let (q, k, v) = (seeded(len, 1), seeded(len, 2), seeded(len, 3));
    let scale = 1.0 / (D as f32).sqrt();
    let mut failed = false;
    for causal in [false, true] {
        let ours = run_kernel(&client, &q, &k, &v, scale, causal);
        let host = host_attention(&q, &k, &v, scale, causal);
        let err = max_abs_diff(&ours, &host);
        let ok = err < 1e-4;
        failed |= !ok;
        println!(
            "flash_unit_kernel on CubeCL 0.11 (CUDA), f32 [{B}, {H}, {N}, {D}] {}: max |ours - f64| = {err:.2e} {}",
            if causal { "causal" } else { "full" },
            if ok { "ok" } else { "FAILED" }
        );
    }
    let burn = burn_attention(&q, &k, &v, scale);
    let ours = run_kernel(&client, &q, &k, &v, scale, false);
    let err = max_abs_diff(&ours, &burn);
    let ok = err < 1e-4;
    failed |= !ok;
    println!(
        "Burn 0.22.1 tensor ops on Device::cuda(0), full: max |ours - Burn| = {err:.2e} {}",
        if ok { "ok" } else { "FAILED" }
    );
    std::process::exit(i32::from(failed));
}
