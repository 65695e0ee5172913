//! Training with the sequence split across peers (context parallelism): a one-layer causal
//! model learns to continue a sequence that repeats its first half, which it can only do by
//! attending from each slice into earlier slices.
//!
//! ```sh
//! cargo run --release --example context_parallel                       # CPU, 2 peers
//! cargo run --release --example context_parallel -- --peers 4
//! cargo run --release --example context_parallel -- --peers 2 --zigzag
//! cargo run --release --example context_parallel --features cuda -- --gpus 2
//! ```
//!
//! Each step splits every sequence into `--peers` contiguous slices (with `--zigzag`, into
//! `2 x peers` chunks, peer `p` holding chunks `p` and `2 x peers - 1 - p`, which balances
//! the causal work), puts peer `p`'s slices on device `p % gpus` (on the CPU all peers
//! share the one device) and runs the model slice
//! by slice: the per-token layers on each slice's device with the weights copied there,
//! attention through `FlashAttention::forward_context_parallel` (key/value blocks visit the
//! peers one at a time). The loss is the sum over slices; its gradients return to
//! the one set of weights. At the end the split forward is compared with the whole-sequence
//! forward of the same model, and the accuracy on the repeated half is printed.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_attn::{FlashAttention, FlashAttentionConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Trains a one-layer causal model with its sequences split across peers.
#[derive(clap::Parser)]
struct Args {
    /// Adam steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Sequence length (a random half, then the half again).
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Peers the sequence is split across (contiguous slices).
    #[arg(long, default_value_t = 2)]
    peers: usize,
    /// Split into the zigzag layout (two chunks per peer, one early and one late).
    #[arg(long)]
    zigzag: bool,
    /// GPUs to spread the peers over (with a GPU feature; peer `p` on GPU `p % gpus`).
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// Vocabulary of the random tokens.
    #[arg(long, default_value_t = 16)]
    vocab: usize,
}

/// Token and position embeddings, one causal attention layer, a head.
#[derive(Module, Debug)]
struct Model {
    tokens: Embedding,
    positions: Embedding,
    attn: FlashAttention,
    head: Linear,
}

impl Model {
    fn new(args: &Args, device: &Device) -> Self {
        let d = 64;
        Self {
            tokens: EmbeddingConfig::new(args.vocab, d).init(device),
            positions: EmbeddingConfig::new(args.seq, d).init(device),
            attn: FlashAttentionConfig::new(d, 4)
                .with_causal(true)
                .init(device),
            head: LinearConfig::new(d, args.vocab).init(device),
        }
    }

    /// The logits of each slice (`[batch, rows]` token ids, in order, each on its peer's
    /// device), on that device.
    fn forward_split(&self, slices: Vec<Tensor<2, Int>>) -> Vec<Tensor<3>> {
        let mut start = 0;
        let mut hidden = Vec::with_capacity(slices.len());
        for ids in slices {
            let rows = ids.dims()[1];
            hidden.push(self.embed(ids, start));
            start += rows;
        }
        let mixed = self.attn.forward_context_parallel(hidden.clone());
        hidden
            .into_iter()
            .zip(mixed)
            .map(|(x, a)| self.head.clone().to_device(&x.device()).forward(x + a))
            .collect()
    }

    /// The logits of whole sequences on one device.
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embed(ids, 0);
        self.head.forward(x.clone() + self.attn.forward(x))
    }

    /// Token plus position embeddings of `ids` (`[batch, rows]`) at positions from `start`,
    /// on `ids`' device (the embeddings copied there).
    fn embed(&self, ids: Tensor<2, Int>, start: usize) -> Tensor<3> {
        let [batch, rows] = ids.dims();
        let device = ids.device();
        let pos: Vec<i64> = (0..batch)
            .flat_map(|_| (start..start + rows).map(|p| p as i64))
            .collect();
        let pos = Tensor::<2, Int>::from_data(TensorData::new(pos, [batch, rows]), &device);
        let tokens = self.tokens.clone().to_device(&device);
        let positions = self.positions.clone().to_device(&device);
        tokens.forward(ids) + positions.forward(pos)
    }
}

/// `batch` sequences of `seq` tokens: a random first half, then the same half again.
fn repeated(rng: &mut StdRng, batch: usize, seq: usize, vocab: usize) -> Vec<i64> {
    let half = seq / 2;
    (0..batch)
        .flat_map(|_| {
            let first: Vec<i64> = (0..half)
                .map(|_| rng.random_range(0..vocab as i64))
                .collect();
            let mut row = first.clone();
            row.extend(first.iter().cycle().take(seq - half));
            row
        })
        .collect()
}

/// Rows `rows` of `[batch, seq]` ids.
fn columns(ids: &Tensor<2, Int>, rows: std::ops::Range<usize>) -> Tensor<2, Int> {
    let batch = ids.dims()[0];
    ids.clone().slice([0..batch, rows])
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    assert!(
        args.peers >= 1 && args.peers <= args.seq,
        "--peers must be between 1 and --seq"
    );
    #[cfg(feature = "cuda")]
    let base: Vec<Device> = (0..args.gpus.max(1)).map(Device::cuda).collect();
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    let base = vec![Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)];
    // Burn 0.22 deprecates burn-ndarray; it stays this crate's default CPU backend.
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    #[allow(deprecated)]
    let base = vec![Device::ndarray()];
    // Training runs on the devices with autodiff; the final check without.
    let devices: Vec<Device> = base.iter().map(|d| d.clone().autodiff()).collect();
    let peer = |devices: &[Device], p: usize| devices[p % devices.len()].clone();
    devices[0].seed(0);

    // The slices in sequence order, each with its peer: contiguous (as even as the length
    // allows) or zigzag.
    let layout: Vec<(std::ops::Range<usize>, usize)> = if args.zigzag {
        burn_attn::cores::zigzag_chunks(args.seq, args.peers)
            .expect("--seq of at least 2 x --peers")
    } else {
        (0..args.peers)
            .map(|p| {
                (
                    p * args.seq / args.peers..(p + 1) * args.seq / args.peers,
                    p,
                )
            })
            .collect()
    };
    let split = |ids: &Tensor<2, Int>, devices: &[Device]| -> Vec<Tensor<2, Int>> {
        layout
            .iter()
            .map(|(rows, p)| columns(ids, rows.clone()).to_device(&peer(devices, *p)))
            .collect()
    };

    let mut rng = StdRng::seed_from_u64(0);
    let mut model = Model::new(&args, &devices[0]);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&devices[0]);
    let start = Instant::now();
    let (batch, seq, vocab) = (args.batch, args.seq, args.vocab);
    println!(
        "{} peers over {} device(s), slices of rows (and their peers) {:?}",
        args.peers,
        devices.len(),
        layout
    );
    for step in 1..=args.steps {
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(repeated(&mut rng, batch, seq + 1, vocab), [batch, seq + 1]),
            &devices[0],
        );
        let inputs = columns(&ids, 0..seq);
        let targets = split(&columns(&ids, 1..seq + 1), &devices);
        let logits = model.forward_split(split(&inputs, &devices));
        let loss = logits
            .into_iter()
            .zip(targets)
            .map(|(l, t)| {
                let [b, rows, v] = l.dims();
                let loss = loss_fn.forward(l.reshape([b * rows, v]), t.reshape([b * rows]));
                loss.to_device(&devices[0]) * (rows as f32 / seq as f32)
            })
            .reduce(|a, b| a + b)
            .expect("one slice");
        if step == 1 || step % (args.steps / 5).max(1) == 0 {
            println!(
                "step {step:>4}/{}  loss {:.3}  ({:.1?})",
                args.steps,
                loss.clone().into_scalar::<f32>(),
                start.elapsed()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }

    // The split forward against the whole-sequence forward, and the copied half's accuracy.
    let model = model.valid();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(repeated(&mut rng, batch, seq + 1, vocab), [batch, seq + 1]),
        &base[0],
    );
    let inputs = columns(&ids, 0..seq);
    let whole = model.forward(inputs.clone());
    let parts: Vec<_> = model
        .forward_split(split(&inputs, &base))
        .into_iter()
        .map(|l| l.to_device(&whole.device()))
        .collect();
    let split_logits = Tensor::cat(parts, 1);
    let diff = (split_logits.clone() - whole)
        .abs()
        .max()
        .into_scalar::<f32>();
    let half = seq / 2;
    let predicted = split_logits.argmax(2).reshape([batch, seq]);
    let targets = columns(&ids, 1..seq + 1);
    let copied = |t: Tensor<2, Int>| columns(&t, half..seq);
    let correct = copied(predicted)
        .equal(copied(targets))
        .int()
        .sum()
        .into_scalar::<i64>();
    println!(
        "split vs whole-sequence logits: max difference {diff:.2e}; accuracy on the repeated \
         half {:.1}% ({correct} of {})",
        100.0 * correct as f64 / (batch * (seq - half)) as f64,
        batch * (seq - half)
    );
    assert!(
        diff < 1e-3,
        "the split forward differs from the whole forward"
    );
}
