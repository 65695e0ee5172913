//! A small causal attention layer from burn-attn, on the default CPU backend.
//!
//! `cargo run --example quickstart`

use burn::tensor::{Device, Distribution, Tensor};
use burn_attn::{FlashAttentionConfig, HybridAttentionConfig, SlidingWindowAttentionConfig};

fn main() {
    // Burn 0.22 deprecates burn-ndarray; it stays this crate's default CPU backend.
    #[allow(deprecated)]
    let device = Device::ndarray();
    let x = Tensor::<3>::random([2, 256, 128], Distribution::Normal(0.0, 1.0), &device);

    let flash = FlashAttentionConfig::new(128, 8)
        .with_causal(true)
        .init(&device);
    let exact = flash.projection().exact(x.clone(), true);
    let err: f32 = (flash.forward(x.clone()) - exact)
        .abs()
        .max()
        .into_scalar::<f32>();
    println!("flash vs materialised attention: max abs error {err:.2e}");

    let window = SlidingWindowAttentionConfig::new(128, 8)
        .with_window(64)
        .with_causal(true)
        .init(&device);
    println!(
        "sliding window output: {:?}",
        window.forward(x.clone()).dims()
    );

    let hybrid = HybridAttentionConfig::new(128, 8).init(&device);
    println!(
        "hybrid picks {:?} at 256 tokens, {:?} at 4096, {:?} at 16384",
        hybrid.choose(256),
        hybrid.choose(4096),
        hybrid.choose(16384)
    );
}
