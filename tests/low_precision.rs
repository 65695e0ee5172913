//! f16 and bf16 inputs on the CPU path (Burn's Flex backend, whose default float is f32):
//! the tiled tensor ops keep their softmax state and log-sum-exp in f32, as the kernels do,
//! so long rows neither overflow (f16's sum past 65504) nor stall (bf16's sum stops
//! growing at 256), and the log-sum-exp is not rounded to the inputs' 8 or 11 bits.
#![cfg(feature = "flex")]

use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_attn::cores::attention_with_lse;
use burn_attn::AttentionOptions;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// More keys than f16's largest finite value.
const SEQ_K: usize = 70_000;
const DIM: usize = 8;

/// Seeded values uniform in `[-1, 1)`.
fn random(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A query of zeros sees every key with the same weight: its output is the values' mean
/// and its log-sum-exp `ln(SEQ_K)`, whatever the keys.
#[test]
fn long_rows_in_f16_and_bf16_keep_an_f32_softmax_state() {
    let device = Device::flex();
    let values = random(1, SEQ_K * DIM);
    let keys = random(2, SEQ_K * DIM);
    for dtype in [DType::F16, DType::BF16] {
        let tensor = |data: Vec<f32>, rows: usize| {
            Tensor::<4>::from_data(TensorData::new(data, [1, 1, rows, DIM]), &device).cast(dtype)
        };
        let q = tensor(vec![0.0; DIM], 1);
        let (k, v) = (tensor(keys.clone(), SEQ_K), tensor(values.clone(), SEQ_K));
        // The mean of the values as the kernel sees them (rounded to the dtype).
        let rounded: Vec<f32> = v
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let mean: Vec<f32> = (0..DIM)
            .map(|c| (0..SEQ_K).map(|r| rounded[r * DIM + c]).sum::<f32>() / SEQ_K as f32)
            .collect();

        let (out, lse) = attention_with_lse(q, k, v, &AttentionOptions::default());
        assert_eq!(out.dtype(), dtype);
        assert_eq!(lse.dtype(), DType::F32, "{dtype:?}: the lse keeps f32");
        let out: Vec<f32> = out
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let lse: f32 = lse.into_data().try_to_vec::<f32>().unwrap()[0];
        let lse_err = (lse - (SEQ_K as f32).ln()).abs();
        assert!(lse_err < 1e-4, "{dtype:?}: lse {lse}, off by {lse_err}");
        // The mean is about 4e-3: the output's own rounding is below 4e-5.
        for (c, (got, want)) in out.iter().zip(&mean).enumerate() {
            let err = (got - want).abs();
            assert!(err < 1e-4, "{dtype:?}: column {c} is {got}, want {want}");
        }
    }
}
