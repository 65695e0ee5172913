//! Helpers shared by the module tests.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::{PagedKvCache, SequenceId};

/// The CPU device of the tests (ndarray, f32: this crate's default CPU backend, which
/// Burn 0.22 deprecates).
#[allow(deprecated)]
pub fn cpu() -> Device {
    Device::ndarray()
}

/// The CPU device with autodiff.
pub fn cpu_ad() -> Device {
    cpu().autodiff()
}

/// Fresh standard-normal input on `device`.
pub fn randn<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Largest absolute difference.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d: Vec<f32> = (a - b)
        .abs()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    d.iter()
        .fold(0.0f32, |m, x| if x.is_nan() { f32::NAN } else { m.max(*x) })
}

/// Asserts the two tensors agree within `tol` and are finite.
#[track_caller]
pub fn assert_close<const D: usize>(got: Tensor<D>, want: Tensor<D>, tol: f32) {
    let err = max_abs_diff(got, want);
    assert!(err <= tol, "max abs error {err} > {tol}");
}

/// Asserts a tensor has no NaN or infinity.
#[track_caller]
pub fn assert_finite<const D: usize>(x: Tensor<D>) {
    let v: Vec<f32> = x.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    assert!(
        v.iter().all(|x| x.is_finite()),
        "non-finite values in output"
    );
}

/// Trains `module` (on the CPU autodiff device) for `steps` Adam steps on a fixed
/// regression target and returns the loss before and after.
pub fn train_steps<M: Module>(
    module: M,
    forward: impl Fn(&M, Tensor<3>) -> Tensor<3>,
    shape: [usize; 3],
    steps: usize,
) -> (f32, f32) {
    let x = randn(shape, &cpu_ad());
    let target = randn(shape, &cpu_ad());
    let mut optim = AdamConfig::new().init();
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

/// Saves and reloads a module through the binary record format.
pub fn record_round_trip<M: Module>(module: M, fresh: M) -> M {
    let bytes = module.into_record().into_bytes().unwrap();
    let record = ModuleRecord::from_bytes(bytes).unwrap();
    fresh.load_record(record)
}

/// Packed self-attention (`packed(x, documents)`) against each document run alone
/// (`alone(x)`): two rows of 13 tokens, documents of 5, 1 and 7 tokens in the first and
/// one of 13 in the second, `d_model` wide.
pub fn check_packed(
    d_model: usize,
    packed: impl Fn(Tensor<3>, Tensor<2, Int>) -> Tensor<3>,
    alone: impl Fn(Tensor<3>) -> Tensor<3>,
) {
    let device = cpu();
    let seq = 13;
    let x = randn([2, seq, d_model], &device);
    let rows: [&[usize]; 2] = [&[5, 1, 7], &[13]];
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|lengths| {
            lengths
                .iter()
                .enumerate()
                .flat_map(|(doc, &len)| std::iter::repeat_n(doc as i64, len))
        })
        .collect();
    let docs = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, seq]), &device);
    let got = packed(x.clone(), docs);
    for (row, lengths) in rows.iter().enumerate() {
        let mut start = 0;
        for &len in *lengths {
            let span = start..start + len;
            let part = |t: Tensor<3>| t.slice([row..row + 1, span.clone(), 0..d_model]);
            assert_close(part(got.clone()), alone(part(x.clone())), 2e-5);
            start += len;
        }
    }
}

/// Key padding hides keys: with the last `padded` positions of `[batch, seq, d]` inputs
/// padded, replacing those positions' inputs leaves the other positions' outputs of
/// `forward(x, padding)` unchanged (the padded queries' own rows may change).
pub fn assert_padding_hides_keys(
    forward: impl Fn(Tensor<3>, Tensor<2, burn::tensor::Bool>) -> Tensor<3>,
    [batch, seq, d]: [usize; 3],
    padded: usize,
) {
    use burn::tensor::Int;
    let device = cpu();
    let pad = Tensor::<1, Int>::arange(0..seq as i64, &device)
        .reshape([1, seq])
        .expand([batch, seq])
        .greater_equal_elem((seq - padded) as i64);
    let x = randn([batch, seq, d], &device);
    let kept = seq - padded;
    let other = Tensor::cat(
        vec![
            x.clone().slice([0..batch, 0..kept]),
            randn([batch, padded, d], &device),
        ],
        1,
    );
    let a = forward(x, pad.clone()).slice([0..batch, 0..kept]);
    let b = forward(other, pad).slice([0..batch, 0..kept]);
    assert_finite(a.clone());
    assert_close(a, b, 1e-5);
}

/// Decodes sequences of `prompts` tokens through one paged cache of `pages` pages of 4:
/// each prompt alone, then `steps` tokens of every sequence together through
/// `forward_paged`; asserts every step's rows equal `forward` over each sequence's prefix
/// (1e-5). Inputs are `[1, len, d_model]`. Returns the cache and the sequences' ids.
pub fn check_paged_decoding(
    prompts: &[usize],
    steps: usize,
    d_model: usize,
    pages: usize,
    forward_paged: &dyn Fn(Tensor<3>, &mut PagedKvCache, &[SequenceId]) -> Tensor<3>,
    forward: &dyn Fn(Tensor<3>) -> Tensor<3>,
) -> (PagedKvCache, Vec<SequenceId>) {
    let xs: Vec<_> = prompts
        .iter()
        .map(|&p| randn([1, p + steps, d_model], &cpu()))
        .collect();
    let mut cache = PagedKvCache::new(pages, 4).unwrap();
    let ids: Vec<_> = prompts.iter().map(|_| cache.add_sequence()).collect();
    for (s, &p) in prompts.iter().enumerate() {
        let prompt = xs[s].clone().slice([0..1, 0..p, 0..d_model]);
        forward_paged(prompt, &mut cache, &[ids[s]]);
    }
    for step in 0..steps {
        let at = |s: usize| prompts[s] + step;
        let x = Tensor::cat(
            (0..prompts.len())
                .map(|s| xs[s].clone().slice([0..1, at(s)..at(s) + 1, 0..d_model]))
                .collect(),
            0,
        );
        let out = forward_paged(x, &mut cache, &ids);
        for (s, x) in xs.iter().enumerate() {
            let want = forward(x.clone().slice([0..1, 0..at(s) + 1, 0..d_model])).slice([
                0..1,
                at(s)..at(s) + 1,
                0..d_model,
            ]);
            assert_close(out.clone().narrow(0, s, 1), want, 1e-5);
        }
    }
    (cache, ids)
}
