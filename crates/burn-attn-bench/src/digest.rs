//! `digest`: bit-exact fingerprints of the attention op's results over a fixed grid of
//! cases, for checking that a change to the kernels' code leaves every output bit as it
//! was (run the old and the new build on one device and compare the files).
//!
//! Inputs come from a seeded host RNG, so two builds see the same bits. Each case runs
//! the forward (output and log-sum-exp) and one training step (gradients of
//! `sum(out * w)` for Q, K and V) through the public op, and the file gets one line per
//! case: its label, then an FNV-1a hash of each result's raw bytes.

use std::fmt::Write as _;

use burn::tensor::{Device, Tensor, TensorData};
use burn_attn::cores::attention_with_lse;
use burn_attn::{AttentionOptions, Window};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// One case of the grid: shapes and mask.
#[derive(Debug, Clone, Copy)]
pub struct DigestCase {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq_q: usize,
    seq_k: usize,
    dim: usize,
    value_dim: usize,
    causal: bool,
    window: Window,
}

impl DigestCase {
    #[allow(clippy::too_many_arguments)]
    const fn new(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        seq_q: usize,
        seq_k: usize,
        dim: usize,
        value_dim: usize,
        causal: bool,
        window: Window,
    ) -> Self {
        Self {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            dim,
            value_dim,
            causal,
            window,
        }
    }

    /// A line's first field: shapes and mask in words.
    pub fn label(&self) -> String {
        format!(
            "b={} h={}/{} q={} k={} d={}/{} causal={} window={:?}/{:?}",
            self.batch,
            self.heads,
            self.kv_heads,
            self.seq_q,
            self.seq_k,
            self.dim,
            self.value_dim,
            self.causal,
            self.window.left,
            self.window.right
        )
    }

    fn options(&self) -> AttentionOptions {
        AttentionOptions::new()
            .with_causal(self.causal)
            .with_window(self.window)
    }
}

const W: fn(Option<usize>, Option<usize>) -> Window = Window::new;
const FULL: Window = Window::FULL;

/// The grid: tails and odd sizes, GQA and MQA, batch > 1, `seq_q != seq_k`, windows,
/// head dims 32-256, a value dim unlike the head dim.
pub fn digest_cases() -> Vec<DigestCase> {
    vec![
        DigestCase::new(2, 4, 4, 97, 97, 64, 64, false, FULL),
        DigestCase::new(2, 4, 2, 97, 97, 64, 64, true, FULL),
        DigestCase::new(1, 8, 1, 1025, 1025, 128, 128, true, FULL),
        DigestCase::new(2, 2, 2, 17, 300, 80, 80, false, FULL),
        DigestCase::new(1, 4, 4, 1, 513, 128, 128, true, FULL),
        DigestCase::new(1, 4, 4, 256, 256, 32, 32, false, W(Some(16), Some(16))),
        DigestCase::new(1, 2, 2, 700, 700, 96, 96, false, W(Some(64), Some(0))),
        DigestCase::new(1, 2, 2, 129, 129, 256, 256, false, FULL),
        DigestCase::new(1, 4, 4, 512, 512, 128, 64, false, FULL),
        DigestCase::new(1, 2, 2, 2048, 2048, 128, 128, true, FULL),
        DigestCase::new(
            1,
            2,
            2,
            4096,
            4096,
            128,
            128,
            false,
            W(Some(512), Some(512)),
        ),
        DigestCase::new(2, 4, 4, 333, 200, 64, 64, true, FULL),
    ]
}

/// FNV-1a (64-bit) of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The hash of a tensor's bytes in its own dtype.
fn hash<const D: usize>(t: Tensor<D>) -> u64 {
    fnv1a(t.into_data().as_bytes())
}

/// A seeded standard-normal-ish tensor (sum of uniforms), built on the host.
fn seeded(shape: [usize; 4], rng: &mut StdRng, device: &Device) -> Tensor<4> {
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..n)
        .map(|_| (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// One line per case: label, then the hashes of out, lse, dq, dk, dv; `device` has
/// autodiff (the forward runs without it).
pub fn digest(device: &Device) -> String {
    let mut text = String::new();
    for (i, case) in digest_cases().iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(0x5eed + i as u64);
        let q_shape = [case.batch, case.heads, case.seq_q, case.dim];
        let k_shape = [case.batch, case.kv_heads, case.seq_k, case.dim];
        let v_shape = [case.batch, case.kv_heads, case.seq_k, case.value_dim];
        let o_shape = [case.batch, case.heads, case.seq_q, case.value_dim];
        let q = seeded(q_shape, &mut rng, device);
        let k = seeded(k_shape, &mut rng, device);
        let v = seeded(v_shape, &mut rng, device);
        let w = seeded(o_shape, &mut rng, device);
        let options = case.options();

        let (out, lse) = attention_with_lse(
            q.clone().inner(),
            k.clone().inner(),
            v.clone().inner(),
            &options,
        );
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let (out_ad, _) = attention_with_lse(q.clone(), k.clone(), v.clone(), &options);
        let grads = (out_ad * w).sum().backward();
        let grad = |t: &Tensor<4>| hash(t.grad(&grads).expect("a gradient"));
        let _ = writeln!(
            text,
            "{} | out {:016x} lse {:016x} dq {:016x} dk {:016x} dv {:016x}",
            case.label(),
            hash(out),
            hash(lse),
            grad(&q),
            grad(&k),
            grad(&v)
        );
    }
    text
}
