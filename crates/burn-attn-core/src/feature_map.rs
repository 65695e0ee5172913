//! The positive feature maps of linear attention, applied by the tensor ops or fused into
//! the linear kernel's loads.

use burn::tensor::activation::{elu, relu, sigmoid, softplus};
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
            FeatureMap::EluPlusOne => elu(x, 1.0) + 1.0,
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
