//! The NaN rule (DESIGN.md) on the CPU path (tiled tensor ops, with autodiff): a NaN in a
//! query row makes that row's output, log-sum-exp and dQ row NaN and leaves every other
//! row's bits as they are without it; a row that sees no key stays 0 with log-sum-exp
//! `-inf` though its query holds a NaN. The kernels' side is `check_nan_rows` in the kernel
//! tests.

use burn::tensor::{Device, Tensor, TensorData};
use burn_attn::cores::attention_with_lse;
use burn_attn::{AttentionOptions, Window};
use rand::{rngs::StdRng, Rng, SeedableRng};

const HEADS: usize = 2;
const SEQ_Q: usize = 40;
const SEQ_K: usize = 24;
const DIM: usize = 16;
/// Sees keys 0..4 (queries aligned to the last key, causal).
const NAN_ROW: usize = 20;
/// Sees no key.
const DEAD_ROW: usize = 3;

fn random(seed: u64, shape: [usize; 4]) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..shape.iter().product())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect()
}

/// Output, log-sum-exp and dQ of `sum(attention(q, k, v) * w)`, flattened row by row.
fn run(q: Vec<f32>) -> [Vec<f32>; 3] {
    #[allow(deprecated)]
    let device = Device::ndarray().autodiff();
    let tensor =
        |x: Vec<f32>, n| Tensor::<4>::from_data(TensorData::new(x, [1, HEADS, n, DIM]), &device);
    let q = tensor(q, SEQ_Q).require_grad();
    let k = tensor(random(2, [1, HEADS, SEQ_K, DIM]), SEQ_K);
    let v = tensor(random(3, [1, HEADS, SEQ_K, DIM]), SEQ_K);
    let w = tensor(random(4, [1, HEADS, SEQ_Q, DIM]), SEQ_Q);
    let options = AttentionOptions::new().with_window(Window::causal(SEQ_K));
    let (out, lse) = attention_with_lse(q.clone(), k, v, &options);
    let grads = (out.clone() * w).sum().backward();
    let dq = q.grad(&grads).expect("q takes part in the output");
    let values = |data: TensorData| data.try_to_vec::<f32>().unwrap();
    [
        values(out.into_data()),
        values(lse.into_data()),
        values(dq.into_data()),
    ]
}

#[test]
fn nan_query_rows_give_nan_rows_only_on_the_cpu_path() {
    let q = random(1, [1, HEADS, SEQ_Q, DIM]);
    let clean = run(q.clone());
    let mut poisoned = q;
    poisoned[NAN_ROW * DIM + 7] = f32::NAN;
    poisoned[DEAD_ROW * DIM + 5] = f32::NAN;
    let got = run(poisoned);
    for ((name, got), clean) in ["output", "lse", "dq"].iter().zip(&got).zip(&clean) {
        let width = got.len() / (HEADS * SEQ_Q);
        for (r, (g, c)) in got.chunks(width).zip(clean.chunks(width)).enumerate() {
            if r == NAN_ROW {
                assert!(g.iter().all(|x| x.is_nan()), "{name} row {r}: {g:?}");
            } else {
                let same = g.iter().zip(c).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} row {r}: {g:?} vs {c:?}");
            }
        }
    }
    assert_eq!(got[1][DEAD_ROW], f32::NEG_INFINITY);
    assert!(got[0][DEAD_ROW * DIM..][..DIM].iter().all(|&x| x == 0.0));
}
