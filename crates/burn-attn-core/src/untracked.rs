//! Tensors cut from the autodiff graph.

use burn::tensor::Tensor;

/// `t`'s values without a graph, for computations whose gradients come from elsewhere (the
/// taps). Burn's `detach` keeps a leaf's require-grad, so ops on a detached leaf would
/// still be recorded, holding their saved tensors until a backward; this gives a fresh,
/// untracked tensor.
pub(crate) fn untracked<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.set_require_grad(false)
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// A leaf that requires gradients stays tracked through `detach`, not through
    /// `untracked`; neither does an op's result.
    #[test]
    fn untracked_cuts_leaves_that_require_grad() {
        let device = Device::ndarray().autodiff();
        let leaf = Tensor::<2>::ones([2, 3], &device).require_grad();
        assert!(
            leaf.clone().detach().is_tracked(),
            "detach keeps require-grad"
        );
        assert!(!untracked(leaf.clone()).is_tracked());
        assert!(!untracked(leaf.clone().narrow(1, 1, 2) * 2.0).is_tracked());
        assert!(!(untracked(leaf) * 2.0).is_tracked());
    }
}
