//! A small transformer language model built from burn-attn modules, trained on
//! associative recall: a sequence of key-value pairs, a separator, then one of the keys;
//! the model must output that key's value. Solving it needs attention that can look
//! back to the right pair, so accuracy separates the mechanisms.
//!
//! ```sh
//! cargo run --release --example associative_recall        # CPU, every kind, ~40 s each
//! cargo run --release --example associative_recall -- --kinds flash,linear --steps 800
//! cargo run --release --example associative_recall --features cuda -- --d-model 256 --pairs 64
//! cargo run --release --example associative_recall --features cuda -- --kinds flash --max-seconds 120
//! ```

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_attn::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

/// The attention mechanisms the example can train.
const KINDS: &[&str] = &[
    "flash",
    "sliding-window",
    "sparse-strided",
    "sparse-random",
    "learned-sparse",
    "linear",
    "causal-linear",
    "adaptive-window",
    "hybrid",
];

/// The attention of `kind`: causal where the mechanism has a causal form; learned sparse
/// and plain linear attention look at the whole sequence.
fn attention_config(kind: &str, d: usize, heads: usize, seq: usize) -> AnyAttentionConfig {
    let window = (seq / 4).max(2);
    match kind {
        "flash" => AnyAttentionConfig::Flash(FlashAttentionConfig::new(d, heads).with_causal(true)),
        "sliding-window" => AnyAttentionConfig::SlidingWindow(
            SlidingWindowAttentionConfig::new(d, heads)
                .with_window(window)
                .with_causal(true),
        ),
        "sparse-strided" => AnyAttentionConfig::Sparse(
            SparseAttentionConfig::new(d, heads)
                .with_pattern(SparsePattern::Strided {
                    stride: 4,
                    local: 2,
                })
                .with_causal(true),
        ),
        "sparse-random" => AnyAttentionConfig::Sparse(
            SparseAttentionConfig::new(d, heads)
                .with_pattern(SparsePattern::Random {
                    density: 0.3,
                    block: 4,
                    seed: 7,
                })
                .with_causal(true),
        ),
        // Blocks of two keys: a key and its value, which the gate keeps together.
        "learned-sparse" => AnyAttentionConfig::LearnedSparse(
            LearnedSparseAttentionConfig::new(d, heads)
                .with_ratio(0.3)
                .with_block(2),
        ),
        "linear" => AnyAttentionConfig::Linear(LinearAttentionConfig::new(d, heads)),
        "causal-linear" => AnyAttentionConfig::CausalLinear(
            CausalLinearAttentionConfig::new(d, heads).with_chunk_size(16),
        ),
        "adaptive-window" => AnyAttentionConfig::AdaptiveWindow(
            AdaptiveSlidingWindowAttentionConfig::new(d, heads)
                .with_min_window(2)
                .with_max_window(seq)
                .with_ramp(2.0)
                .with_causal(true),
        ),
        "hybrid" => AnyAttentionConfig::Hybrid(
            HybridAttentionConfig::new(d, heads)
                .with_causal(true)
                .with_flash_max_len(seq / 2)
                .with_sparse_max_len(seq * 2)
                .with_sparse_pattern(SparsePattern::Strided {
                    stride: 4,
                    local: 2,
                }),
        ),
        other => panic!("unknown attention kind {other:?}; one of {KINDS:?}"),
    }
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
struct Block {
    norm_attn: LayerNorm,
    attn: AnyAttention,
    norm_mlp: LayerNorm,
    up: Linear,
    down: Linear,
}

/// Token and position embeddings, blocks, and a head over the vocabulary.
#[derive(Module, Debug)]
struct Model {
    tokens: Embedding,
    positions: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
}

impl Model {
    fn new(kind: &str, args: &Args, task: &Task, device: &Device) -> Self {
        let d = args.d_model;
        let blocks = (0..args.layers)
            .map(|_| Block {
                norm_attn: LayerNormConfig::new(d).init(device),
                attn: attention_config(kind, d, args.heads, task.seq_len()).init(device),
                norm_mlp: LayerNormConfig::new(d).init(device),
                up: LinearConfig::new(d, 4 * d).init(device),
                down: LinearConfig::new(4 * d, d).init(device),
            })
            .collect();
        Self {
            tokens: EmbeddingConfig::new(task.vocab(), d).init(device),
            positions: EmbeddingConfig::new(task.seq_len(), d).init(device),
            blocks,
            norm: LayerNormConfig::new(d).init(device),
            head: LinearConfig::new(d, task.vocab()).init(device),
        }
    }

    /// Logits of the last position, `[batch, vocab]`.
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<2> {
        let [batch, seq] = ids.dims();
        let pos = Tensor::<1, Int>::arange(0..seq as i64, &ids.device())
            .reshape([1, seq])
            .repeat_dim(0, batch);
        let mut x = self.tokens.forward(ids) + self.positions.forward(pos);
        for block in &self.blocks {
            x = x.clone() + block.attn.forward(block.norm_attn.forward(x));
            let h = block.norm_mlp.forward(x.clone());
            x = x + block.down.forward(gelu(block.up.forward(h)));
        }
        let last = self.norm.forward(x).slice([0..batch, seq - 1..seq]);
        self.head.forward(last).squeeze_dim(1)
    }
}

/// The associative-recall task: `k1 v1 ... kP vP SEP kq` -> `vq`.
struct Task {
    pairs: usize,
    keys: usize,
    values: usize,
}

impl Task {
    fn seq_len(&self) -> usize {
        2 * self.pairs + 2
    }

    fn vocab(&self) -> usize {
        self.keys + self.values + 1
    }

    /// A batch of sequences and targets.
    fn batch(
        &self,
        rng: &mut StdRng,
        batch: usize,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<1, Int>) {
        let sep = (self.keys + self.values) as i64;
        let mut ids = Vec::with_capacity(batch * self.seq_len());
        let mut targets = Vec::with_capacity(batch);
        let mut keys: Vec<i64> = (0..self.keys as i64).collect();
        for _ in 0..batch {
            keys.shuffle(rng);
            let values: Vec<i64> = (0..self.pairs)
                .map(|_| (self.keys + rng.random_range(0..self.values)) as i64)
                .collect();
            for p in 0..self.pairs {
                ids.push(keys[p]);
                ids.push(values[p]);
            }
            let q = rng.random_range(0..self.pairs);
            ids.push(sep);
            ids.push(keys[q]);
            targets.push(values[q]);
        }
        (
            Tensor::from_data(TensorData::new(ids, [batch, self.seq_len()]), device),
            Tensor::from_data(TensorData::new(targets, [batch]), device),
        )
    }
}

/// Trains a small transformer on associative recall with each attention kind in turn.
#[derive(clap::Parser)]
struct Args {
    /// Attention kinds, comma separated, or `all`.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    kinds: Vec<String>,
    /// Adam steps per kind.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Key-value pairs per sequence (chance is 1 / (2 * pairs)).
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Training time per kind in seconds, after which training stops early and the
    /// accuracy is measured anyway (bounded GPU runs, where the first steps compile).
    #[arg(long)]
    max_seconds: Option<f64>,
}

/// The options, with `all` expanded and every kind checked.
fn parse_args() -> Args {
    let mut args = <Args as clap::Parser>::parse();
    if args.kinds.iter().any(|k| k == "all") {
        args.kinds = KINDS.iter().map(|s| s.to_string()).collect();
    }
    if let Some(bad) = args.kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        eprintln!(
            "unknown kind {bad:?}; the kinds are {} (or all)",
            KINDS.join(",")
        );
        std::process::exit(2);
    }
    if args.steps == 0 || args.batch == 0 || args.pairs == 0 || args.heads == 0 {
        eprintln!("--steps, --batch, --pairs and --heads take at least 1");
        std::process::exit(2);
    }
    args
}

/// Trains one kind on `device` (with autodiff) and returns its accuracy on fresh
/// sequences.
fn train(kind: &str, args: &Args, task: &Task, device: &Device) -> f64 {
    // Same data and same initial weights for every kind: only the attention differs.
    let mut rng = StdRng::seed_from_u64(0);
    device.seed(0);
    let mut model = Model::new(kind, args, task, device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let start = Instant::now();
    for step in 1..=args.steps {
        let (ids, targets) = task.batch(&mut rng, args.batch, device);
        let loss = loss_fn.forward(model.forward(ids), targets);
        if step % (args.steps / 4).max(1) == 0 || step == 1 {
            let value: f32 = loss.clone().into_scalar::<f32>();
            println!(
                "  {kind:<16} step {step:>5}/{}  loss {value:.3}  ({:.1?})",
                args.steps,
                start.elapsed()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(args.lr, model, grads);
        if args
            .max_seconds
            .is_some_and(|limit| start.elapsed().as_secs_f64() > limit)
        {
            println!("  {kind:<16} stopped after step {step}: --max-seconds reached");
            break;
        }
    }
    let model = model.valid();
    let mut correct = 0usize;
    let trials = 8;
    for _ in 0..trials {
        let (ids, targets) = task.batch(&mut rng, args.batch, &device.clone().without_autodiff());
        let predicted = model.forward(ids).argmax(1).reshape([args.batch]);
        let hits: i64 = predicted.equal(targets).int().sum().into_scalar::<i64>();
        correct += hits as usize;
    }
    correct as f64 / (trials * args.batch) as f64
}

fn main() {
    let args = parse_args();
    let task = Task {
        pairs: args.pairs,
        keys: (2 * args.pairs).max(8),
        values: (2 * args.pairs).max(8),
    };

    #[cfg(feature = "cuda")]
    let device = Device::cuda(0);
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    // Burn 0.22 deprecates burn-ndarray; it stays this crate's default CPU backend.
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    #[allow(deprecated)]
    let device = Device::ndarray();
    let device = device.autodiff();

    println!(
        "associative recall: {} pairs, sequence {}, vocabulary {}, chance {:.1}%",
        task.pairs,
        task.seq_len(),
        task.vocab(),
        100.0 / task.values as f64
    );
    let mut results = Vec::new();
    for kind in &args.kinds {
        let accuracy = train(kind, &args, &task, &device);
        println!("{kind:<16} accuracy {:.1}%", accuracy * 100.0);
        results.push((kind.clone(), accuracy));
    }
    println!("\n| attention | accuracy |\n| --- | --- |");
    for (kind, accuracy) in results {
        println!("| {kind} | {:.1}% |", accuracy * 100.0);
    }
}
