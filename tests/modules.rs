//! The modules as a user meets them: through the facade, inside a model of their own.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Distribution, Tensor};
use burn_attn::*;

/// The CPU device (ndarray, which Burn 0.22 deprecates; our default CPU backend).
#[allow(deprecated)]
fn cpu() -> Device {
    Device::ndarray()
}

/// A pre-norm residual block holding one of every variant: they compose as ordinary
/// Burn modules.
#[derive(Module, Debug)]
struct EveryVariant {
    norm: LayerNorm,
    flash: FlashAttention,
    sparse: SparseAttention,
    learned: LearnedSparseAttention,
    linear: LinearAttention,
    causal_linear: CausalLinearAttention,
    window: SlidingWindowAttention,
    adaptive: AdaptiveSlidingWindowAttention,
    hybrid: HybridAttention,
}

impl EveryVariant {
    fn new(d: usize, device: &Device) -> Self {
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

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
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

fn randn(shape: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn a_model_of_every_variant_trains_and_reloads() {
    let device = cpu().autodiff();
    // Seeded weights and inputs: the run is the same every time.
    device.seed(5);
    let mut model = EveryVariant::new(32, &device);
    let x = randn([2, 12, 32], &device);
    let target = randn([2, 12, 32], &device);
    let mut optim = AdamConfig::new().init();
    let loss_of = |m: &EveryVariant| {
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
    let xi = randn([1, 12, 32], &cpu());
    let want: Vec<f32> = inference
        .forward(xi.clone())
        .into_data()
        .try_to_vec()
        .unwrap();
    let bytes = inference.into_record().into_bytes().unwrap();
    let fresh = EveryVariant::new(32, &cpu()).load_record(ModuleRecord::from_bytes(bytes).unwrap());
    let got: Vec<f32> = fresh.forward(xi).into_data().try_to_vec().unwrap();
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
    panics(
        Box::new(move || {
            FlashAttentionConfig::new(30, 4).init(&cpu());
        }),
        "d_model (30) must be divisible by n_heads (4)",
    );
    panics(
        Box::new(move || {
            SlidingWindowAttentionConfig::new(32, 4)
                .with_n_kv_heads(Some(3))
                .init(&cpu());
        }),
        "query heads (4) must be a positive multiple of key/value heads (3)",
    );
    panics(
        Box::new(move || {
            SlidingWindowAttentionConfig::new(32, 4)
                .with_window(0)
                .init(&cpu());
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
                .init(&cpu());
        }),
        "density must be in (0, 1], got 1.5",
    );
    panics(
        Box::new(move || {
            AdaptiveSlidingWindowAttentionConfig::new(32, 4)
                .with_min_window(600)
                .init(&cpu());
        }),
        "minimum (600) is above maximum (512)",
    );
    panics(
        Box::new(move || {
            let m = LinearAttentionConfig::new(32, 4).init(&cpu());
            m.forward(randn([1, 3, 31], &cpu()));
        }),
        "[1, 3, 31], expected [batch, seq, 32]",
    );
    panics(
        Box::new(move || {
            let q = Tensor::<4>::zeros([1, 4, 5, 8], &cpu());
            let k = Tensor::<4>::zeros([1, 3, 5, 8], &cpu());
            attention(q, k.clone(), k, &AttentionOptions::new());
        }),
        "query heads (4) must be a positive multiple of key/value heads (3)",
    );
    panics(
        Box::new(move || {
            let q = Tensor::<4>::zeros([1, 4, 5, 8], &cpu());
            let k = Tensor::<4>::zeros([1, 4, 5, 6], &cpu());
            attention(q, k.clone(), k, &AttentionOptions::new());
        }),
        "key has shape [1, 4, 5, 6]",
    );
}
