//! Probe for the move to Burn 0.22 (see Cargo.toml). In one binary built offline with the
//! repository's cubecl-llvm stand-in:
//! - the kernel crate's cube code (`components/`, `kernels/`: every kernel) compiled from
//!   this branch's source against CubeCL 0.11; its cube-order probe kernel runs on the first
//!   CUDA device through NVRTC and is checked against the order it must give;
//! - Burn 0.22.1's own tensor ops run attention on that device, checked against f64.
//!
//! Build here with `cargo build --release` (about 20 minutes cold on 2 cores) and run the
//! binary on a CUDA machine; `cargo test --release -p cubecl-llvm` tests the stand-in.
//! Prints one line per check and exits non-zero on a failure. The launchers, plans' device
//! reads and the crates above are not ported yet.

#![allow(dead_code)]

#[path = "../../../crates/burn-attn-kernels/src/components/mod.rs"]
pub mod components;
#[path = "../../../crates/burn-attn-kernels/src/kernels/mod.rs"]
pub mod kernels;
#[path = "../../../crates/burn-attn-kernels/src/launch/mod.rs"]
pub mod launch;
#[path = "../../../crates/burn-attn-kernels/src/plan/mod.rs"]
pub mod plan;
/// The probe's stand-in for the kernel crate's source hash.
pub const KERNEL_SOURCE: u64 = 0;
use components::schedule;

use cubecl::prelude::*;
use cubecl_runtime::runtime::Runtime;
use cubecl_cuda::{CudaDevice, CudaRuntime};

/// The (block, head) each launch index got from `cube_block`, run on the device.
fn cube_order(blocks: usize, heads: usize, group: u32, heaviest_last: bool) -> Vec<(usize, usize)> {
    let client = CudaRuntime::client(&CudaDevice::new(0));
    let order = client.empty(blocks * heads * 2 * 4);
    let shape = [blocks * heads, 2];
    let arg = unsafe { TensorArg::from_raw_parts(order.clone(), [2, 1].into(), shape.into()) };
    schedule::cube_order_probe_kernel::launch(
        &client,
        CubeCount::Static(blocks as u32, heads as u32, 1),
        CubeDim::new_1d(32),
        arg,
        group,
        heaviest_last,
    );
    let bytes = client.read_one(order).expect("the order reads back");
    f32::from_bytes(&bytes)
        .chunks(2)
        .map(|p| (p[0] as usize, p[1] as usize))
        .collect()
}

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

const S: [usize; 4] = [2, 4, 97, 64];

/// The inputs of the attention checks: q, k, v of shape `S`.
fn inputs() -> [Vec<f32>; 3] {
    let len = S.iter().product();
    [seeded(len, 1), seeded(len, 2), seeded(len, 3)]
}

/// Full softmax attention in f64 on the host, scale `1 / sqrt(d)`.
fn reference(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let (n, d) = (S[2], S[3]);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; q.len()];
    for bh in 0..S[0] * S[1] {
        let at = |i: usize| bh * n * d + i * d;
        for i in 0..n {
            let s: Vec<f64> = (0..n)
                .map(|j| (0..d).map(|c| q[at(i) + c] as f64 * k[at(j) + c] as f64).sum::<f64>() * scale)
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            for c in 0..d {
                out[at(i) + c] = (0..n).map(|j| w[j] * v[at(j) + c] as f64).sum::<f64>() / sum;
            }
        }
    }
    out
}

fn max_error(got: &[f32], want: &[f64]) -> f32 {
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs() as f32).fold(0.0, f32::max)
}

/// Burn 0.22's softmax attention on `Device::cuda(0)` against f64 on the host: max |diff|.
fn burn_attention_error() -> f32 {
    use burn::tensor::{activation::softmax, Device, Tensor, TensorData};
    let [q, k, v] = inputs();
    let scale = 1.0 / (S[3] as f32).sqrt();
    let device = Device::cuda(0);
    let tensor = |x: &[f32]| Tensor::<4>::from_data(TensorData::new(x.to_vec(), S), &device);
    let scores = tensor(&q).matmul(tensor(&k).swap_dims(2, 3)) * scale;
    let ours = softmax(scores, 3).matmul(tensor(&v));
    let ours = ours.into_data().try_to_vec::<f32>().expect("f32 output");
    max_error(&ours, &reference(&q, &k, &v))
}

/// This branch's forward `kernel` through its launcher on CubeCL 0.11 (CUDA device 0), in
/// `dtype` (f32 or bf16), against f64: max |diff| of the output.
fn our_forward_error(kernel: plan::ForwardKernel, dtype: burn_backend::DType) -> f32 {
    use burn::tensor::bf16;
    use burn_backend::DType;
    let client = CudaRuntime::client(&CudaDevice::new(0));
    let device = cubecl::Device::Cuda(CudaDevice::new(0));
    let [q, k, v] = inputs();
    let encode = |x: &[f32]| -> Vec<u8> {
        match dtype {
            DType::BF16 => x.iter().flat_map(|&f| bf16::from_f32(f).to_bits().to_le_bytes()).collect(),
            _ => x.iter().flat_map(|f| f.to_le_bytes()).collect(),
        }
    };
    let tensor = |x: &[f32]| {
        let handle = client.create_from_slice(&encode(x));
        burn_cubecl::tensor::CubeTensor::new_contiguous(client.clone(), device.clone(), S.into(), handle, dtype)
    };
    let band = plan::BandArgs { scale: 1.0 / (S[3] as f32).sqrt(), left: None, right: None };
    let (out, _lse) = launch::flash_forward_with(kernel, tensor(&q), tensor(&k), tensor(&v), band, &plan::ForcedPlan::default())
        .unwrap_or_else(|why| panic!("{kernel:?} declined: {why}"));
    let bytes = client.read_one(out.handle).expect("the output reads back");
    let got: Vec<f32> = match dtype {
        DType::BF16 => bytes.chunks(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        _ => bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    };
    max_error(&got[..q.len()], &reference(&q, &k, &v))
}

fn main() {
    let mut failed = false;
    let mut check = |ok: bool, what: String| {
        failed |= !ok;
        println!("{what}: {}", if ok { "ok" } else { "FAILED" });
    };

    let (blocks, heads) = (7, 10);
    let natural = cube_order(blocks, heads, 0, true);
    let expected: Vec<_> = (0..heads).flat_map(|h| (0..blocks).map(move |b| (b, h))).collect();
    check(natural == expected, format!("cube_order_probe_kernel (CubeCL 0.11, NVRTC) natural order, {blocks} x {heads}"));
    for (group, heaviest_last) in [(3, true), (4, false)] {
        let order = cube_order(blocks, heads, group, heaviest_last);
        let mut sorted = order.clone();
        sorted.sort_by_key(|&(b, h)| (h, b));
        let first = if heaviest_last { blocks - 1 } else { 0 };
        check(
            sorted == expected && order[0] == (first, 0) && order[1] == (first, 1),
            format!("cube_order_probe_kernel heavy-first, group {group}: each (block, head) once, heaviest block first"),
        );
    }
    for (kernel, dtype, tolerance) in [
        (plan::ForwardKernel::Mma, burn_backend::DType::BF16, 2e-2),
        (plan::ForwardKernel::Unit, burn_backend::DType::F32, 1e-5),
    ] {
        let err = our_forward_error(kernel, dtype);
        check(err < tolerance, format!("burn-attn {kernel:?} forward (CubeCL 0.11, NVRTC), {dtype:?} {S:?}: max |ours - f64| = {err:.2e}"));
    }
    let err = burn_attention_error();
    check(err < 1e-4, format!("Burn 0.22.1 softmax attention on Device::cuda(0), f32 [2, 4, 97, 64]: max |Burn - f64| = {err:.2e}"));
    std::process::exit(i32::from(failed));
}
