//! The positive feature maps of linear attention, applied by the tensor ops or fused into
//! the linear kernel's loads.

use burn::tensor::activation::{relu, sigmoid, softplus};
use burn::tensor::Tensor;
#[cfg(feature = "cube")]
use burn_attn_kernels::plan::LinearMap;
use serde::{Deserialize, Serialize};

/// The positive feature map `phi` of linear attention. For a map not listed here, call the
/// linear cores with your own feature-mapped tensors (and no map in the options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FeatureMap {
    /// `elu(x) + 1` (Katharopoulos et al.), the default.
    #[default]
    EluPlusOne,
    /// `relu(x)`; the normaliser's `eps` keeps all-zero rows finite.
    Relu,
    /// `softplus(x) = ln(1 + e^x)`.
    Softplus,
}

impl FeatureMap {
    /// Applies the map elementwise.
    pub fn apply<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            FeatureMap::EluPlusOne => {
                // The exponential of the non-positive side only: Burn's `elu` takes it of
                // every element, and where it overflows, the hidden side's zero gradient
                // becomes NaN.
                let positive = x.clone().greater_elem(0.0);
                x.clone().clamp_max(0.0).exp().mask_where(positive, x + 1.0)
            }
            FeatureMap::Relu => relu(x),
            FeatureMap::Softplus => softplus(x, 1.0),
        }
    }

    /// The map's derivative elementwise (in `x`'s dtype): `phi'(x)`, which turns a
    /// gradient with respect to `phi(x)` into one with respect to `x`.
    pub fn derivative<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        match self {
            FeatureMap::EluPlusOne => {
                let positive = x.clone().greater_elem(0.0);
                x.exp().mask_fill(positive, 1.0)
            }
            FeatureMap::Relu => x.greater_elem(0.0).float().cast(dtype),
            FeatureMap::Softplus => sigmoid(x),
        }
    }

    /// The map as the linear kernel applies it.
    #[cfg(feature = "cube")]
    pub(crate) fn kernel_map(self) -> LinearMap {
        match self {
            FeatureMap::EluPlusOne => LinearMap::EluPlusOne,
            FeatureMap::Relu => LinearMap::Relu,
            FeatureMap::Softplus => LinearMap::Softplus,
        }
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// Each map's values, and its gradient through autodiff against `derivative`, finite
    /// where the exponential of the input overflows (f32 past 88.7; f16 inputs overflow past
    /// 11.1 the same way, which ndarray cannot hold).
    #[test]
    fn maps_and_their_gradients_are_finite_and_exact() {
        let device = Device::ndarray().autodiff();
        let xs = [-30.0f32, -1.0, -1e-3, 0.0, 1e-3, 0.5, 20.0, 100.0, 1e4];
        let values = |t: Tensor<1>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
        for map in [
            FeatureMap::EluPlusOne,
            FeatureMap::Relu,
            FeatureMap::Softplus,
        ] {
            let x = Tensor::<1>::from_data(TensorData::new(xs.to_vec(), [xs.len()]), &device)
                .require_grad();
            let y = map.apply(x.clone());
            let grads = y.clone().sum().backward();
            let got = values(x.grad(&grads).unwrap());
            let want = values(map.derivative(x.clone().detach()));
            let phi = values(y);
            for (i, &v) in xs.iter().enumerate() {
                let exact = match map {
                    FeatureMap::EluPlusOne if v > 0.0 => v as f64 + 1.0,
                    FeatureMap::EluPlusOne => (v as f64).exp(),
                    FeatureMap::Relu => (v as f64).max(0.0),
                    FeatureMap::Softplus => (v as f64).max(0.0) + (-(v as f64).abs()).exp().ln_1p(),
                };
                let tol = 1e-5 * exact.abs().max(1.0);
                assert!(
                    (phi[i] as f64 - exact).abs() <= tol,
                    "{map:?} phi({v}) = {} vs {exact}",
                    phi[i]
                );
                assert!(got[i].is_finite(), "{map:?} phi'({v}) = {}", got[i]);
                assert!(
                    (got[i] - want[i]).abs() <= 1e-5 * want[i].abs().max(1.0),
                    "{map:?} phi'({v}): autodiff {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
}
