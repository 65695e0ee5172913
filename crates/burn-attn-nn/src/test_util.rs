//! Helpers shared by the module tests.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{backend::Backend, Distribution, Tensor};

/// The CPU backend of the tests.
pub type TestBackend = NdArray<f32>;
/// The CPU autodiff backend of the tests.
pub type TestAutodiff = Autodiff<NdArray<f32>>;

/// Fresh standard-normal input.
pub fn randn<B: Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// Largest absolute difference.
pub fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d: Vec<f32> = (a - b).abs().into_data().convert::<f32>().to_vec().unwrap();
    d.iter()
        .fold(0.0f32, |m, x| if x.is_nan() { f32::NAN } else { m.max(*x) })
}

/// Asserts the two tensors agree within `tol` and are finite.
#[track_caller]
pub fn assert_close<B: Backend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>, tol: f32) {
    let err = max_abs_diff(got, want);
    assert!(err <= tol, "max abs error {err} > {tol}");
}

/// Asserts a tensor has no NaN or infinity.
#[track_caller]
pub fn assert_finite<B: Backend, const D: usize>(x: Tensor<B, D>) {
    let v: Vec<f32> = x.into_data().convert::<f32>().to_vec().unwrap();
    assert!(
        v.iter().all(|x| x.is_finite()),
        "non-finite values in output"
    );
}

/// Trains `module` for `steps` Adam steps on a fixed regression target and returns the
/// loss before and after.
pub fn train_steps<M>(
    module: M,
    forward: impl Fn(&M, Tensor<TestAutodiff, 3>) -> Tensor<TestAutodiff, 3>,
    shape: [usize; 3],
    steps: usize,
) -> (f32, f32)
where
    M: AutodiffModule<TestAutodiff>,
{
    let x = randn::<TestAutodiff, 3>(shape);
    let target = randn::<TestAutodiff, 3>(shape);
    let mut optim = AdamConfig::new().init::<TestAutodiff, M>();
    let mut module = module;
    let loss_of = |m: &M| {
        (forward(m, x.clone()) - target.clone())
            .powi_scalar(2)
            .mean()
    };
    let first: f32 = loss_of(&module).into_scalar();
    for _ in 0..steps {
        let loss = loss_of(&module);
        let grads = GradientsParams::from_grads(loss.backward(), &module);
        module = optim.step(5e-3, module, grads);
    }
    let last: f32 = loss_of(&module).into_scalar();
    (first, last)
}

/// Saves and reloads a module through the binary recorder.
pub fn record_round_trip<B: Backend, M: Module<B>>(module: M, fresh: M) -> M {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(module.into_record(), ()).unwrap();
    let record = recorder.load(bytes, &Default::default()).unwrap();
    fresh.load_record(record)
}
