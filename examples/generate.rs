//! A small causal language model built from `FlashAttention`: trains on generated text,
//! then generates with a key/value cache per layer and without one, and prints the tokens
//! per second of both at the same context.
//!
//! ```sh
//! cargo run --release --example generate                        # CPU
//! cargo run --release --example generate -- --context 2048 --new-tokens 32
//! cargo run --release --example generate --features cuda
//! ```
//!
//! The text is sentences from a small grammar ("the red fox sees a slow cat."), so a few
//! hundred steps learn it and a sample inside the training length reads like it. The
//! timing runs past that length, at `--context`: greedy tokens, asserted equal on both
//! paths. With the cache each new token costs one query row per layer against the cached
//! keys; without it the whole context runs again.
//!
//! Then `--sequences` prompts of different lengths (up to `--context`) generate together,
//! one batch per token through a `PagedKvCache` per layer, as a server decodes its
//! requests; their tokens are asserted equal to each prompt's generation alone.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_attn::{FlashAttention, FlashAttentionConfig, KvCache, PagedKvCache, SequenceId};
use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

/// Trains a small causal LM and times generation with and without the cache.
#[derive(clap::Parser)]
struct Args {
    /// Adam steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Training sequence length.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Context the timed generation starts from (generated text as the prompt).
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Tokens generated per timing.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Prompts of different lengths generated together through paged caches (0: skip).
    #[arg(long, default_value_t = 4)]
    sequences: usize,
    /// Positions per page of the paged caches.
    #[arg(long, default_value_t = 64)]
    page_size: usize,
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
struct Block {
    norm_attn: LayerNorm,
    attn: FlashAttention,
    norm_mlp: LayerNorm,
    up: Linear,
    down: Linear,
}

impl Block {
    /// The block on `x`, its attention over `x` alone or, with a cache, over the cached
    /// prefix too.
    fn forward(&self, x: Tensor<3>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let h = self.norm_attn.forward(x.clone());
        let attended = match cache {
            Some(cache) => self.attn.forward_cache(h, cache),
            None => self.attn.forward(h),
        };
        self.feed_forward(x + attended)
    }

    /// The block on the new tokens `x` of sequences `seqs` (row `b` of sequence `seqs[b]`),
    /// attending through the paged `cache`.
    fn forward_paged(
        &self,
        x: Tensor<3>,
        cache: &mut PagedKvCache,
        seqs: &[SequenceId],
    ) -> Tensor<3> {
        let h = self.norm_attn.forward(x.clone());
        let attended = self.attn.forward_paged(h, cache, seqs);
        self.feed_forward(x + attended)
    }

    fn feed_forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.norm_mlp.forward(x.clone());
        x + self.down.forward(gelu(self.up.forward(h)))
    }
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
    fn new(args: &Args, vocab: usize, max_len: usize, device: &Device) -> Self {
        let d = args.d_model;
        let blocks = (0..args.layers)
            .map(|_| Block {
                norm_attn: LayerNormConfig::new(d).init(device),
                attn: FlashAttentionConfig::new(d, args.heads)
                    .with_causal(true)
                    .init(device),
                norm_mlp: LayerNormConfig::new(d).init(device),
                up: LinearConfig::new(d, 4 * d).init(device),
                down: LinearConfig::new(4 * d, d).init(device),
            })
            .collect();
        Self {
            tokens: EmbeddingConfig::new(vocab, d).init(device),
            positions: EmbeddingConfig::new(max_len, d).init(device),
            blocks,
            norm: LayerNormConfig::new(d).init(device),
            head: LinearConfig::new(d, vocab).init(device),
        }
    }

    /// Logits `[batch, seq, vocab]` of tokens `ids` at positions from `start`; with
    /// `caches` (one per block) the blocks attend over the cached prefix too.
    fn forward(
        &self,
        ids: Tensor<2, Int>,
        start: usize,
        mut caches: Option<&mut [KvCache]>,
    ) -> Tensor<3> {
        let batch = ids.dims()[0];
        let mut x = self.embed(ids, &vec![start; batch]);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, caches.as_deref_mut().map(|c| &mut c[i]));
        }
        self.head.forward(self.norm.forward(x))
    }

    /// Logits of the new tokens `ids` of sequences `seqs` (row `b` of sequence `seqs[b]`,
    /// from position `starts[b]`), through one paged cache per block.
    fn forward_paged(
        &self,
        ids: Tensor<2, Int>,
        starts: &[usize],
        caches: &mut [PagedKvCache],
        seqs: &[SequenceId],
    ) -> Tensor<3> {
        let mut x = self.embed(ids, starts);
        for (block, cache) in self.blocks.iter().zip(caches) {
            x = block.forward_paged(x, cache, seqs);
        }
        self.head.forward(self.norm.forward(x))
    }

    /// Token plus position embeddings of `ids` (`[batch, seq]`), row `b` from position
    /// `starts[b]`.
    fn embed(&self, ids: Tensor<2, Int>, starts: &[usize]) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let pos: Vec<i64> = starts
            .iter()
            .flat_map(|&s| (s..s + seq).map(|p| p as i64))
            .collect();
        let pos = Tensor::<2, Int>::from_data(TensorData::new(pos, [batch, seq]), &ids.device());
        self.tokens.forward(ids) + self.positions.forward(pos)
    }
}

/// Generated text: sentences of a small grammar, as byte ids.
struct Text {
    chars: Vec<u8>,
}

impl Text {
    fn new() -> Self {
        let mut chars: Vec<u8> = b" .abcdefghijklmnopqrstuvwxyz".to_vec();
        chars.sort_unstable();
        Self { chars }
    }

    fn vocab(&self) -> usize {
        self.chars.len()
    }

    /// `len` characters of sentences.
    fn sample(&self, rng: &mut StdRng, len: usize) -> Vec<i64> {
        const ARTICLES: [&str; 2] = ["the", "a"];
        const ADJECTIVES: [&str; 6] = ["red", "slow", "quick", "small", "old", "green"];
        const NOUNS: [&str; 6] = ["fox", "cat", "dog", "bird", "owl", "frog"];
        const VERBS: [&str; 5] = ["sees", "chases", "finds", "hears", "likes"];
        let mut text = String::new();
        while text.len() < len {
            fn pick(rng: &mut StdRng, words: &[&'static str]) -> &'static str {
                words.choose(rng).expect("a word")
            }
            let subject = format!(
                "{} {} {}",
                pick(rng, &ARTICLES),
                pick(rng, &ADJECTIVES),
                pick(rng, &NOUNS)
            );
            let object = if rng.random_bool(0.5) {
                format!("{} {}", pick(rng, &ARTICLES), pick(rng, &NOUNS))
            } else {
                format!(
                    "{} {} {}",
                    pick(rng, &ARTICLES),
                    pick(rng, &ADJECTIVES),
                    pick(rng, &NOUNS)
                )
            };
            text += &format!("{subject} {} {object}. ", pick(rng, &VERBS));
        }
        text.bytes()
            .take(len)
            .map(|c| {
                self.chars
                    .binary_search(&c)
                    .expect("a character of the grammar") as i64
            })
            .collect()
    }

    fn decode(&self, ids: &[i64]) -> String {
        ids.iter()
            .map(|&i| self.chars[i as usize] as char)
            .collect()
    }
}

/// The most likely next token of each row of `logits` (`[batch, seq, vocab]`, last
/// position), as a `[batch, 1]` tensor.
fn next_token(logits: Tensor<3>) -> Tensor<2, Int> {
    let [batch, seq, vocab] = logits.dims();
    logits
        .slice([0..batch, seq - 1..seq, 0..vocab])
        .argmax(2)
        .reshape([batch, 1])
}

/// Generates `new` tokens after `prompt` (`[1, len]`) with caches or by rerunning the whole
/// context, and returns the tokens and the seconds the generation took.
fn generate(model: &Model, prompt: Tensor<2, Int>, new: usize, cached: bool) -> (Vec<i64>, f64) {
    let device = prompt.device();
    let len = prompt.dims()[1];
    let mut caches = vec![KvCache::new(); model.blocks.len()];
    let mut out = Vec::with_capacity(new);
    let start = Instant::now();
    let mut context = prompt.clone();
    let mut token = if cached {
        next_token(model.forward(prompt, 0, Some(&mut caches)))
    } else {
        next_token(model.forward(prompt, 0, None))
    };
    for step in 0..new {
        out.push(token.clone().into_scalar::<i64>());
        if step + 1 == new {
            break;
        }
        token = if cached {
            next_token(model.forward(token, len + step, Some(&mut caches)))
        } else {
            context = Tensor::cat(vec![context, token], 1);
            next_token(model.forward(context.clone(), 0, None))
        };
    }
    let _ = device.sync();
    (out, start.elapsed().as_secs_f64())
}

/// Generates `new` tokens after each of `prompts` (`[1, len]` each), every sequence's
/// prompt filled alone and then all of them one batch per token through a paged cache per
/// block; returns each sequence's tokens and the seconds the generation took.
fn generate_paged(
    model: &Model,
    prompts: &[Tensor<2, Int>],
    new: usize,
    page_size: usize,
) -> (Vec<Vec<i64>>, f64) {
    let device = prompts[0].device();
    let positions: usize = prompts.iter().map(|p| p.dims()[1] + new).sum();
    let pages = positions.div_ceil(page_size) + prompts.len();
    let mut caches: Vec<_> = model
        .blocks
        .iter()
        .map(|_| PagedKvCache::new(pages, page_size).expect("pages of positions"))
        .collect();
    // Every cache numbers its sequences in the order they are added.
    let seqs: Vec<SequenceId> = prompts
        .iter()
        .map(|_| {
            let ids: Vec<_> = caches.iter_mut().map(|c| c.add_sequence()).collect();
            assert!(ids.windows(2).all(|w| w[0] == w[1]));
            ids[0]
        })
        .collect();
    let lens: Vec<usize> = prompts.iter().map(|p| p.dims()[1]).collect();
    let mut out = vec![Vec::with_capacity(new); prompts.len()];
    let start = Instant::now();
    let mut tokens: Vec<Tensor<2, Int>> = prompts
        .iter()
        .zip(&seqs)
        .map(|(prompt, &seq)| {
            next_token(model.forward_paged(prompt.clone(), &[0], &mut caches, &[seq]))
        })
        .collect();
    for step in 0..new {
        for (out, token) in out.iter_mut().zip(&tokens) {
            out.push(token.clone().into_scalar::<i64>());
        }
        if step + 1 == new {
            break;
        }
        let starts: Vec<usize> = lens.iter().map(|len| len + step).collect();
        let next =
            next_token(model.forward_paged(Tensor::cat(tokens, 0), &starts, &mut caches, &seqs));
        tokens = (0..prompts.len())
            .map(|b| next.clone().narrow(0, b, 1))
            .collect();
    }
    let _ = device.sync();
    (out, start.elapsed().as_secs_f64())
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    #[cfg(feature = "cuda")]
    let device = Device::cuda(0);
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    // Burn 0.22 deprecates burn-ndarray; it stays this crate's default CPU backend.
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    #[allow(deprecated)]
    let device = Device::ndarray();

    let text = Text::new();
    let max_len = args.seq.max(args.context + args.new_tokens);
    let train_device = device.clone().autodiff();
    train_device.seed(0);
    let mut rng = StdRng::seed_from_u64(0);
    let mut model = Model::new(&args, text.vocab(), max_len, &train_device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&train_device);
    let start = Instant::now();
    for step in 1..=args.steps {
        let ids: Vec<i64> = (0..args.batch)
            .flat_map(|_| text.sample(&mut rng, args.seq + 1))
            .collect();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(ids, [args.batch, args.seq + 1]),
            &train_device,
        );
        let inputs = ids.clone().slice([0..args.batch, 0..args.seq]);
        let targets = ids.slice([0..args.batch, 1..args.seq + 1]);
        let logits = model.forward(inputs, 0, None);
        let loss = loss_fn.forward(
            logits.reshape([args.batch * args.seq, text.vocab()]),
            targets.reshape([args.batch * args.seq]),
        );
        if step == 1 || step % (args.steps / 5).max(1) == 0 {
            let value: f32 = loss.clone().into_scalar::<f32>();
            println!(
                "step {step:>4}/{}  loss {value:.3}  ({:.1?})",
                args.steps,
                start.elapsed()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-3, model, grads);
    }

    let model = model.valid();
    // A sample inside the trained length.
    let prompt = text.sample(&mut rng, args.seq / 2);
    let shown = text.decode(&prompt);
    let prompt = Tensor::<2, Int>::from_data(TensorData::new(prompt, [1, args.seq / 2]), &device);
    let (sample, _) = generate(&model, prompt, args.seq / 2, true);
    println!(
        "\nprompt:    {shown:?}\ngenerated: {:?}",
        text.decode(&sample)
    );

    // The timing at a long context (past the training length: the tokens are not meant to
    // read, only to agree between the two paths).
    let prompt = text.sample(&mut rng, args.context);
    let prompt = Tensor::<2, Int>::from_data(TensorData::new(prompt, [1, args.context]), &device);
    // A warm-up of each path (GPU backends compile and tune on first use).
    let _ = generate(&model, prompt.clone(), 2, true);
    let _ = generate(&model, prompt.clone(), 2, false);
    let (with_cache, cached_s) = generate(&model, prompt.clone(), args.new_tokens, true);
    let (without, full_s) = generate(&model, prompt, args.new_tokens, false);
    assert_eq!(with_cache, without, "the cache changed the greedy tokens");
    let rate = |s: f64| args.new_tokens as f64 / s;
    println!(
        "tokens per second at a {}-token context: with the cache {:.1}, without {:.1} ({:.1}x; \
         the same {} tokens)",
        args.context,
        rate(cached_s),
        rate(full_s),
        full_s / cached_s,
        args.new_tokens
    );

    // Prompts of different lengths, generated together through paged caches and one at a
    // time with a cache each.
    if args.sequences == 0 {
        return;
    }
    let lens: Vec<usize> = (1..=args.sequences)
        .map(|i| (args.context * i / args.sequences).max(1))
        .collect();
    let prompts: Vec<_> = lens
        .iter()
        .map(|&len| {
            let ids = text.sample(&mut rng, len);
            Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &device)
        })
        .collect();
    let _ = generate_paged(&model, &prompts, 2, args.page_size);
    let (together, paged_s) = generate_paged(&model, &prompts, args.new_tokens, args.page_size);
    let start = Instant::now();
    let alone: Vec<_> = prompts
        .iter()
        .map(|prompt| generate(&model, prompt.clone(), args.new_tokens, true).0)
        .collect();
    let alone_s = start.elapsed().as_secs_f64();
    assert_eq!(together, alone, "paged decoding changed the greedy tokens");
    let tokens = (args.sequences * args.new_tokens) as f64;
    println!(
        "{} prompts of {}-{} tokens: together through paged caches {:.1} tokens per second, \
         one at a time with a cache each {:.1} ({:.1}x; the same tokens)",
        args.sequences,
        lens[0],
        lens[lens.len() - 1],
        tokens / paged_s,
        tokens / alone_s,
        alone_s / paged_s
    );
}
