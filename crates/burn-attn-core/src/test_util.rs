//! Helpers shared by this crate's unit tests.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{rngs::StdRng, Rng};

/// Values uniform in `[-1, 1)` of `shape` on `device`.
pub(crate) fn uniform(rng: &mut StdRng, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let data: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// The largest absolute difference.
pub(crate) fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}
