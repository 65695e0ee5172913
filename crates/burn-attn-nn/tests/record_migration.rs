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

/// Loads `bytes` into `module`, asserting every parameter was applied and none is left over.
fn load<M: ModuleSnapshot>(module: &mut M, bytes: &[u8]) {
    let mut store = SafetensorsStore::from_bytes(Some(bytes.to_vec()));
    let result = module.load_from(&mut store).unwrap();
    assert!(
        result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty(),
        "{result:?}"
    );
    assert!(!result.applied.is_empty(), "nothing applied: {result:?}");
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

#[test]
fn learned_sparse_weights_saved_by_burn_021_load() {
    let device = Device::ndarray();
    let mut module = LearnedSparseAttentionConfig::new(16, 4)
        .with_n_kv_heads(Some(2))
        .with_ratio(0.25)
        .init(&device);
    let want = expected("learned_sparse");
    // A fresh module computes something else: the comparison below sees the load.
    assert!(max_diff(module.forward(input(&device)), &want) > 1e-2);
    load(&mut module, LEARNED_SPARSE);
    let diff = max_diff(module.forward(input(&device)), &want);
    assert!(diff < 1e-5, "largest difference {diff}");
}

#[test]
fn adaptive_window_weights_saved_by_burn_021_load() {
    let device = Device::ndarray();
    let mut module = AdaptiveSlidingWindowAttentionConfig::new(16, 4)
        .with_n_kv_heads(Some(2))
        .with_min_window(2)
        .with_max_window(8)
        .with_ramp(2.0)
        .init(&device);
    let want = expected("adaptive_window");
    assert!(max_diff(module.forward(input(&device)), &want) > 1e-2);
    load(&mut module, ADAPTIVE_WINDOW);
    let diff = max_diff(module.forward(input(&device)), &want);
    assert!(diff < 1e-5, "largest difference {diff}");
}
