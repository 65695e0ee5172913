//! A small causal attention layer from burn-attn, on the default CPU backend.
//!
//! `cargo run --example quickstart`

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use burn_attn::{FlashAttentionConfig, HybridAttentionConfig, SlidingWindowAttentionConfig};

fn main() {
    let device = Default::default();
    let x = Tensor::<NdArray, 3>::random([2, 256, 128], Distribution::Normal(0.0, 1.0), &device);

    let flash = FlashAttentionConfig::new(128, 8)
        .with_causal(true)
        .init::<NdArray>(&device);
    let exact = flash.projection().exact(x.clone(), true);
    let err: f32 = (flash.forward(x.clone()) - exact).abs().max().into_scalar();
    println!("flash vs materialised attention: max abs error {err:.2e}");

    let window = SlidingWindowAttentionConfig::new(128, 8)
        .with_window(64)
        .with_causal(true)
        .init::<NdArray>(&device);
    println!(
        "sliding window output: {:?}",
        window.forward(x.clone()).dims()
    );

    let hybrid = HybridAttentionConfig::new(128, 8).init::<NdArray>(&device);
    println!(
        "hybrid picks {:?} at 256 tokens, {:?} at 4096, {:?} at 16384",
        hybrid.choose(256),
        hybrid.choose(4096),
        hybrid.choose(16384)
    );
}
