//! Weights saved by the Burn 0.21 build (tag `burn-0.21`) through burn-store's SafeTensors
//! store load into today's modules by their unchanged parameter paths, and the modules
//! then give the 0.21 build's outputs: the migration the CHANGELOG describes. The fixtures
//! and how they were written: `tests/fixtures/README.md`.
// The test device is burn-ndarray's, which Burn 0.22 deprecates.
#![allow(deprecated)]

use burn::tensor::{Device, Tensor, TensorData};
use burn_attn_nn::{AdaptiveSlidingWindowAttentionConfig, LearnedSparseAttentionConfig};
use burn_store::{ModuleSnapshot, SafetensorsStore};

const LEARNED_SPARSE: &[u8] = include_bytes!("fixtures/learned_sparse_021.safetensors");
const ADAPTIVE_WINDOW: &[u8] = include_bytes!("fixtures/adaptive_window_021.safetensors");
const OUTPUTS: &str = include_str!("fixtures/outputs_021.json");

/// The input the fixtures' outputs were computed on: `[2, 12, 16]`, `sin(0.37 i)`.
fn input(device: &Device) -> Tensor<3> {
    let values: Vec<f32> = (0..2 * 12 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    Tensor::from_data(TensorData::new(values, [2, 12, 16]), device)
}

/// The 0.21 build's output of the module `name` on [`input`].
fn expected(name: &str) -> Vec<f32> {
    let outputs: serde_json::Value = serde_json::from_str(OUTPUTS).unwrap();
    serde_json::from_value(outputs[name].clone()).unwrap()
}

/// The largest absolute difference between `got` and `want`.
fn max_diff(got: Tensor<3>, want: &[f32]) -> f32 {
    let got = got.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// `module` (freshly initialised, so it computes something else) loads `bytes` with every
/// parameter applied and none left over, and then gives the 0.21 build's output `name`.
fn assert_loads<M: ModuleSnapshot>(
    mut module: M,
    forward: impl Fn(&M, Tensor<3>) -> Tensor<3>,
    bytes: &[u8],
    name: &str,
    device: &Device,
) {
    let want = expected(name);
    // A fresh module computes something else: the comparison below sees the load.
    assert!(max_diff(forward(&module, input(device)), &want) > 1e-2);
    let mut store = SafetensorsStore::from_bytes(Some(bytes.to_vec()));
    let result = module.load_from(&mut store).unwrap();
    assert!(
        result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty(),
        "{result:?}"
    );
    assert!(!result.applied.is_empty(), "nothing applied: {result:?}");
    let diff = max_diff(forward(&module, input(device)), &want);
    assert!(diff < 1e-5, "{name}: largest difference {diff}");
}

#[test]
fn learned_sparse_weights_saved_by_burn_021_load() {
    let device = Device::ndarray();
    // Single-key blocks: the 0.21 build's per-key selection.
    let module = LearnedSparseAttentionConfig::new(16, 4)
        .with_n_kv_heads(Some(2))
        .with_ratio(0.25)
        .with_block(1)
        .init(&device);
    assert_loads(
        module,
        |m, x| m.forward(x),
        LEARNED_SPARSE,
        "learned_sparse",
        &device,
    );
}

#[test]
fn adaptive_window_weights_saved_by_burn_021_load() {
    let device = Device::ndarray();
    let module = AdaptiveSlidingWindowAttentionConfig::new(16, 4)
        .with_n_kv_heads(Some(2))
        .with_min_window(2)
        .with_max_window(8)
        .with_ramp(2.0)
        .init(&device);
    assert_loads(
        module,
        |m, x| m.forward(x),
        ADAPTIVE_WINDOW,
        "adaptive_window",
        &device,
    );
}
