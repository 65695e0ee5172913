//! f16 and bf16 inputs on the CPU path (Burn's Flex backend, whose default float is f32):
//! the tiled tensor ops keep their softmax state and log-sum-exp in f32, as the kernels do,
//! so long rows neither overflow (f16's sum past 65504) nor stall (bf16's sum stops
//! growing at 256), and the log-sum-exp is not rounded to the inputs' 8 or 11 bits.
#![cfg(feature = "flex")]

mod half_precision;

use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_attn::cores::attention_with_lse;
use burn_attn::cores::KeyPattern;
use burn_attn::{masked_attention, AttentionMasks, AttentionOptions};
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

/// Random inputs through the masks and score terms of the tiled path (key padding, ALiBi,
/// a softcap, a causal band) in f16 and bf16 equal the f32 call on the same rounded inputs,
/// within the inputs' precision: every term meets the scores in one dtype.
#[test]
fn masks_and_score_terms_in_f16_and_bf16_follow_the_f32_call() {
    let device = Device::flex();
    let (batch, heads, seq, dim) = (2, 4, 150, 16);
    let shape = [batch, heads, seq, dim];
    let len = batch * heads * seq * dim;
    let data = [random(3, len), random(4, len), random(5, len)];
    let pad: Vec<bool> = (0..batch * seq)
        .map(|i| i % seq >= seq - 20 * (i / seq))
        .collect();
    let pad =
        Tensor::<2, burn::tensor::Bool>::from_data(TensorData::new(pad, [batch, seq]), &device);
    let masks = AttentionMasks {
        key_padding: Some(pad),
        alibi: Some(vec![0.5, 0.25, 0.125, 0.0625]),
        softcap: Some(5.0),
        ..AttentionMasks::default()
    };
    let options = AttentionOptions::new().with_causal(true);
    for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
        let [q, k, v] = data
            .clone()
            .map(|d| Tensor::<4>::from_data(TensorData::new(d, shape), &device).cast(dtype));
        let got = masked_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &KeyPattern::default(),
            &options,
            &masks,
        );
        assert_eq!(got.dtype(), dtype);
        let [q, k, v] = [q, k, v].map(|t| t.cast(DType::F32));
        let want = masked_attention(q, k, v, &KeyPattern::default(), &options, &masks);
        let got: Vec<f32> = got
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let want: Vec<f32> = want.into_data().try_to_vec::<f32>().unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < tol, "{dtype:?}: largest difference {err}");
    }
}

/// The tensor-op cores (causal and plain linear attention, with a carried state in f32 and
/// in the inputs' dtype; the tiled softmax with strided columns and padding; score terms;
/// the reference) with f16 and bf16 inputs on a device whose default float is f32.
#[test]
fn tensor_op_cores_take_half_precision_inputs_on_the_cpu() {
    let tiled = [burn_attn::cores::KernelPolicy::Tiled];
    half_precision::check_half_precision_cores(&Device::flex(), DType::F16, 2e-2, &tiled);
    half_precision::check_half_precision_cores(&Device::flex(), DType::BF16, 5e-2, &tiled);
}
