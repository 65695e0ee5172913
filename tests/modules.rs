//! The modules as a user meets them: through the facade, inside a model of their own.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use burn_attn::*;

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

/// A pre-norm residual block holding one of every variant: they compose as ordinary
/// Burn modules.
#[derive(Module, Debug)]
struct EveryVariant<B: Backend> {
    norm: LayerNorm<B>,
    flash: FlashAttention<B>,
    sparse: SparseAttention<B>,
    learned: LearnedSparseAttention<B>,
    linear: LinearAttention<B>,
    causal_linear: CausalLinearAttention<B>,
    window: SlidingWindowAttention<B>,
    adaptive: AdaptiveSlidingWindowAttention<B>,
    hybrid: HybridAttention<B>,
}

impl<B: AttentionBackend> EveryVariant<B> {
    fn new(d: usize, device: &B::Device) -> Self {
        Self {
            norm: LayerNormConfig::new(d).init(device),
            flash: FlashAttentionConfig::new(d, 4)
                .with_causal(true)
                .init(device),
            sparse: SparseAttentionConfig::new(d, 4)
                .with_pattern(SparsePattern::Random {
                    density: 0.5,
                    block: 4,
                    seed: 9,
                })
                .init(device),
            learned: LearnedSparseAttentionConfig::new(d, 4)
                .with_ratio(0.5)
                .init(device),
            linear: LinearAttentionConfig::new(d, 4).init(device),
            causal_linear: CausalLinearAttentionConfig::new(d, 4)
                .with_chunk_size(4)
                .init(device),
            window: SlidingWindowAttentionConfig::new(d, 4)
                .with_window(4)
                .with_n_kv_heads(Some(2))
                .init(device),
            adaptive: AdaptiveSlidingWindowAttentionConfig::new(d, 4)
                .with_min_window(2)
                .with_max_window(8)
                .with_ramp(2.0)
                .init(device),
            hybrid: HybridAttentionConfig::new(d, 4)
                .with_flash_max_len(4)
                .with_sparse_max_len(8)
                .init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.norm.forward(x.clone());
        x + self.flash.forward(h.clone())
            + self.sparse.forward(h.clone())
            + self.learned.forward(h.clone())
            + self.linear.forward(h.clone())
            + self.causal_linear.forward(h.clone())
            + self.window.forward(h.clone())
            + self.adaptive.forward(h.clone())
            + self.hybrid.forward(h)
    }
}

fn randn<B: Backend>(shape: [usize; 3]) -> Tensor<B, 3> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

#[test]
fn a_model_of_every_variant_trains_and_reloads() {
    let device = Default::default();
    // Seeded weights and inputs: the run is the same every time.
    AD::seed(&device, 5);
    let mut model = EveryVariant::<AD>::new(32, &device);
    let x = randn::<AD>([2, 12, 32]);
    let target = randn::<AD>([2, 12, 32]);
    let mut optim = AdamConfig::new().init();
    let loss_of = |m: &EveryVariant<AD>| {
        (m.forward(x.clone()) - target.clone())
            .powi_scalar(2)
            .mean()
    };
    let first: f32 = loss_of(&model).into_scalar();
    for _ in 0..10 {
        let grads = GradientsParams::from_grads(loss_of(&model).backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let last: f32 = loss_of(&model).into_scalar();
    assert!(last.is_finite() && last < first, "loss {first} -> {last}");

    // Save, reload into a fresh model, and get identical outputs.
    let inference = model.valid();
    let xi = randn::<B>([1, 12, 32]);
    let want: Vec<f32> = inference.forward(xi.clone()).into_data().to_vec().unwrap();
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(inference.into_record(), ()).unwrap();
    let fresh =
        EveryVariant::<B>::new(32, &device).load_record(recorder.load(bytes, &device).unwrap());
    let got: Vec<f32> = fresh.forward(xi).into_data().to_vec().unwrap();
    assert_eq!(got, want);
}

#[test]
fn configs_round_trip_through_json() {
    fn round_trip<C: burn::config::Config>(c: &C) {
        let json = serde_json::to_string(c).unwrap();
        let back: C = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }
    round_trip(&FlashAttentionConfig::new(64, 8).with_window_left(Some(3)));
    round_trip(
        &SparseAttentionConfig::new(64, 8).with_pattern(SparsePattern::Strided {
            stride: 8,
            local: 2,
        }),
    );
    round_trip(&LearnedSparseAttentionConfig::new(64, 8).with_ratio(0.25));
    round_trip(&LinearAttentionConfig::new(64, 8).with_feature_map(FeatureMap::Softplus));
    round_trip(&CausalLinearAttentionConfig::new(64, 8).with_chunk_size(16));
    round_trip(&SlidingWindowAttentionConfig::new(64, 8).with_causal(true));
    round_trip(&AdaptiveSlidingWindowAttentionConfig::new(64, 8).with_ramp(4.0));
    round_trip(&HybridAttentionConfig::new(64, 8).with_sparse_max_len(4096));
}

/// Bad input is refused with a message that names the values.
#[test]
fn bad_input_names_the_values() {
    let panics = |f: Box<dyn Fn() + std::panic::RefUnwindSafe>, needle: &str| {
        let err = std::panic::catch_unwind(&f).expect_err("should have panicked");
        let msg = err
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap();
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    };
    let device = Default::default();
    panics(
        Box::new(move || {
            FlashAttentionConfig::new(30, 4).init::<B>(&device);
        }),
        "d_model (30) must be divisible by n_heads (4)",
    );
    panics(
        Box::new(move || {
            SlidingWindowAttentionConfig::new(32, 4)
                .with_n_kv_heads(Some(3))
                .init::<B>(&device);
        }),
        "query heads (4) must be a positive multiple of key/value heads (3)",
    );
    panics(
        Box::new(move || {
            SlidingWindowAttentionConfig::new(32, 4)
                .with_window(0)
                .init::<B>(&device);
        }),
        "window must be at least 1, got 0",
    );
    panics(
        Box::new(move || {
            SparseAttentionConfig::new(32, 4)
                .with_pattern(SparsePattern::Random {
                    density: 1.5,
                    block: 8,
                    seed: 0,
                })
                .init::<B>(&device);
        }),
        "density must be in (0, 1], got 1.5",
    );
    panics(
        Box::new(move || {
            AdaptiveSlidingWindowAttentionConfig::new(32, 4)
                .with_min_window(600)
                .init::<B>(&device);
        }),
        "minimum (600) is above maximum (512)",
    );
    panics(
        Box::new(move || {
            let m = LinearAttentionConfig::new(32, 4).init::<B>(&device);
            m.forward(randn::<B>([1, 3, 31]));
        }),
        "[1, 3, 31], expected [batch, seq, 32]",
    );
    panics(
        Box::new(move || {
            let q = Tensor::<B, 4>::zeros([1, 4, 5, 8], &device);
            let k = Tensor::<B, 4>::zeros([1, 3, 5, 8], &device);
            attention(q, k.clone(), k, &AttentionOptions::new());
        }),
        "query heads (4) must be a positive multiple of key/value heads (3)",
    );
    panics(
        Box::new(move || {
            let q = Tensor::<B, 4>::zeros([1, 4, 5, 8], &device);
            let k = Tensor::<B, 4>::zeros([1, 4, 5, 6], &device);
            attention(q, k.clone(), k, &AttentionOptions::new());
        }),
        "key has shape [1, 4, 5, 6]",
    );
}
