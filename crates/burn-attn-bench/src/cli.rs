//! Command-line options of `burn-attn-bench`.

use std::path::PathBuf;

use burn::config::Config;
use burn_attn::nn::complexity::{ComplexityModel, HybridThresholds, Method};
use burn_attn::nn::hybrid::HybridProfile;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Time, memory and error of every burn-attn attention variant side by side, with the
/// complexity model's prediction beside each measurement.
#[derive(Parser, Debug)]
#[command(name = "burn-attn-bench", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The tool's subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run every variant at several sequence lengths and print one table: median time,
    /// allocator peak memory, max error against exact attention with the same weights,
    /// and the complexity model's memory and compute.
    Compare(CompareArgs),
    /// Print the complexity model's predictions (and the seed's relative-memory table)
    /// without running anything.
    Model(ModelArgs),
    /// Measure, on this device, the lengths where the sparse pattern and the sliding
    /// window become faster than flash attention, and write a hybrid profile (JSON) that
    /// `HybridAttentionConfig::with_profile_file` loads.
    Calibrate(CalibrateArgs),
    /// Write bit-exact fingerprints of the attention op's forward and backward over a fixed
    /// grid of seeded cases, to check that a kernel change leaves every bit unchanged.
    Digest(DigestArgs),
    /// Time the attention op itself (forward, or training step with `--backward`) at the
    /// kernel benchmark's shapes, beside Burn's own attention on the same backend; with
    /// `--peers`, our time over PyTorch's kernels measured on the same shapes.
    Kernel(crate::kernel::KernelArgs),
    /// Time the attention op under block-sparse masks (windows, strided columns, random
    /// block layouts, key padding), forward and training step, against FlexAttention's
    /// records of the same masks.
    Masks(crate::masks::MasksArgs),
    /// Time one decoding step's attention (new queries against a key/value cache, grouped
    /// heads) against PyTorch's decode paths and the cache's read time at copy bandwidth.
    Decode(crate::decode::DecodeArgs),
    /// Time causal linear attention's core against our causal flash attention over lengths
    /// (forward and training step, crossover, growth, a streaming step) beside
    /// flash-linear-attention's and FlashAttention-2's records of the same shapes.
    Linear(crate::linear::LinearArgs),
}

/// Options of `digest`.
#[derive(Args, Debug, Clone)]
pub struct DigestArgs {
    /// Where the cases run.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Float type of the inputs.
    #[arg(long, value_enum, default_value_t = DType::F32)]
    pub dtype: DType,
    /// The file to write (one line per case).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

/// Where the variants run. Only backends compiled in (cargo features of this crate) work.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// The CPU backend (`Device::ndarray()`, f32); `ndarray` is accepted too.
    #[value(alias = "ndarray")]
    #[serde(alias = "ndarray")]
    Cpu,
    /// Burn's `Wgpu` backend (cargo feature `wgpu`).
    Wgpu,
    /// Burn's `Cuda` backend (cargo feature `cuda`).
    Cuda,
}

/// The float type of the weights and activations.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DType {
    /// 32-bit float (the only type on the CPU).
    F32,
    /// IEEE half precision (GPU backends).
    F16,
    /// bfloat16 (GPU backends).
    Bf16,
}

impl DType {
    /// The name as written on the command line (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Bytes of one element.
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// Options of `compare`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct CompareArgs {
    /// Sequence lengths to run, comma separated. The default takes about half a minute
    /// on two CPU cores in a release build.
    #[arg(long, value_delimiter = ',', default_value = "128,256,512,1024,2048")]
    pub lengths: Vec<usize>,
    /// Batch size of the random input.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per batch instead of a fixed batch: each length `n` runs with batch
    /// `max(1, tokens / n)`, as the peer script does (`--tokens 32768`).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Model width (`d_model`); must be a multiple of `--heads`.
    #[arg(long, default_value_t = 256)]
    pub d_model: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Head dimension; when given, `d_model` becomes `heads * head_dim`.
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Timed forward passes per row; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Untimed forward passes before timing (caches, thread pools, kernel compilation).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Sliding window size: keys within `window / 2` on each side.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Window of the local sparse pattern: keys within `sparse_window / 2` on each side.
    #[arg(long, default_value_t = 128)]
    pub sparse_window: usize,
    /// Distance between the global key columns of the strided sparse pattern.
    #[arg(long, default_value_t = 64)]
    pub stride: usize,
    /// Half-width of the strided sparse pattern's local band.
    #[arg(long, default_value_t = 32)]
    pub local: usize,
    /// Fraction of active blocks of the random sparse pattern, in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub density: f64,
    /// Block size of the random sparse pattern.
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Fraction of keys each query keeps in learned sparse attention (top-k ratio).
    #[arg(long, default_value_t = 0.1)]
    pub ratio: f64,
    /// Chunk size of causal linear attention (its memory/compute trade-off).
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Smallest window of the adaptive sliding window.
    #[arg(long, default_value_t = 64)]
    pub min_window: usize,
    /// Largest window of the adaptive sliding window.
    #[arg(long, default_value_t = 512)]
    pub max_window: usize,
    /// Lengths up to this run flash attention in the hybrid.
    #[arg(long, default_value_t = 2048)]
    pub hybrid_flash_max: usize,
    /// Lengths up to this (above --hybrid-flash-max) run the local sparse pattern
    /// (--sparse-window) in the hybrid; longer ones run the sliding window (--window).
    #[arg(long, default_value_t = 8192)]
    pub hybrid_sparse_max: usize,
    /// Build the hybrid from this calibrated profile (written by `calibrate`): its
    /// thresholds, sparse pattern and window replace the `--hybrid-*`, `--window` and
    /// sparse options for the hybrid row.
    #[arg(long, value_name = "PATH")]
    pub hybrid_profile: Option<PathBuf>,
    /// Seed of the weights, the inputs and the random sparse pattern.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only these methods, comma separated (exact, flash, sparse-local, sparse-strided,
    /// sparse-random, learned-sparse, linear, causal-linear, sliding-window,
    /// adaptive-window, hybrid). Default: all.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<Method>,
    /// Also write the results (options, rows, predictions) as JSON to this path (the
    /// output directory always gets `compare.json`).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Directory for `compare.json`, `compare.csv`, `compare.png` and `compare.svg`.
    #[arg(long, value_name = "DIR", default_value = "target/burn-attn-bench")]
    pub out_dir: PathBuf,
    /// Do not draw the plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Skip the structured-input error (local correlation plus planted long-range
    /// matches, with tied query/key projections).
    #[arg(long)]
    pub no_structured: bool,
    /// Time a training step of each module too (forward and backward of `sum(out * w)`
    /// to its parameters and input).
    #[arg(long)]
    pub train: bool,
    /// Peer timings: the JSON that `scripts/peers/torch_attention.py OUT.json`
    /// writes. Rows with the same batch, heads, length, head dim and dtype print our time
    /// over the peer's.
    #[arg(long, value_name = "PATH")]
    pub peers: Option<PathBuf>,
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Float type (f16 and bf16 on GPU backends only).
    #[arg(long, value_enum, default_value_t = DType::F32)]
    pub dtype: DType,
    /// Do not draw the progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Start no new row after this many seconds and report what was measured, listing the
    /// rows not run (bounded GPU runs: Burn compiles and tunes every new graph and shape
    /// on first use, a minute or more per method on an H200).
    #[arg(long, value_name = "SECONDS")]
    pub time_limit: Option<f64>,
}

impl CompareArgs {
    /// The methods to run, in table order.
    pub fn selected_methods(&self) -> Vec<Method> {
        Method::ALL
            .into_iter()
            .filter(|m| self.methods.is_empty() || self.methods.contains(m))
            .collect()
    }

    /// The complexity model with these options' shapes and settings.
    pub fn model(&self) -> ComplexityModel {
        ComplexityModel::new(self.d_model, self.heads)
            .with_batch(self.batch)
            .with_window(self.window)
            .with_sparse_window(self.sparse_window)
            .with_stride(self.stride)
            .with_local(self.local)
            .with_density(self.density)
            .with_block(self.block)
            .with_ratio(self.ratio)
            .with_chunk(self.chunk)
            .with_adaptive_window(self.min_window, self.max_window)
            .with_hybrid(HybridThresholds {
                flash_max: self.hybrid_flash_max,
                sparse_max: self.hybrid_sparse_max,
                sparse: Method::SparseLocal,
            })
    }

    /// Applies `--head-dim` (sets `d_model = heads * head_dim`) and reads
    /// `--hybrid-profile` (sets the hybrid thresholds from it).
    pub fn resolve(&mut self) -> Result<(), String> {
        if let Some(d) = self.head_dim {
            self.d_model = self.heads * d;
        }
        if let Some(path) = &self.hybrid_profile {
            let profile = HybridProfile::load(path)
                .map_err(|e| format!("reading the hybrid profile {}: {e}", path.display()))?;
            self.hybrid_flash_max = profile.flash_max_len;
            self.hybrid_sparse_max = profile.sparse_max_len;
        }
        Ok(())
    }

    /// The batch at length `n`: `--batch`, or `max(1, tokens / n)` with `--tokens`.
    pub fn batch_for(&self, n: usize) -> usize {
        self.tokens.map_or(self.batch, |t| (t / n.max(1)).max(1))
    }

    /// The head dimension `d_model / heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads.max(1)
    }

    /// Checks the options that would otherwise panic deep inside a module.
    pub fn validate(&self) -> Result<(), String> {
        if self.backend == BackendKind::Cpu && self.dtype != DType::F32 {
            return Err(format!(
                "--dtype {} needs a GPU backend; the CPU backend runs f32",
                self.dtype.name()
            ));
        }
        if self.lengths.is_empty() || self.lengths.contains(&0) {
            return Err("--lengths needs at least one length, none of them 0".into());
        }
        if self.heads == 0 || self.d_model == 0 || !self.d_model.is_multiple_of(self.heads) {
            return Err(format!(
                "--d-model ({}) must be a positive multiple of --heads ({})",
                self.d_model, self.heads
            ));
        }
        if let Some(limit) = self.time_limit.filter(|l| l.is_nan() || *l <= 0.0) {
            return Err(format!(
                "--time-limit ({limit}) must be a positive number of seconds"
            ));
        }
        // Read the peers now, not after minutes of measuring: a missing or malformed file
        // would otherwise cost the whole table.
        if let Some(path) = &self.peers {
            crate::peers::load_peers(path)?;
        }
        if self.batch == 0 || self.repeats == 0 {
            return Err("--batch and --repeats must be at least 1".into());
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(format!("--density ({}) must be in (0, 1]", self.density));
        }
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(format!("--ratio ({}) must be in (0, 1]", self.ratio));
        }
        if self.min_window > self.max_window {
            return Err(format!(
                "--min-window ({}) must not exceed --max-window ({})",
                self.min_window, self.max_window
            ));
        }
        for (name, v) in [
            ("--window", self.window),
            ("--sparse-window", self.sparse_window),
            ("--stride", self.stride),
            ("--block", self.block),
            ("--chunk", self.chunk),
            ("--max-window", self.max_window),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Options of `model`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Sequence lengths, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096,8192")]
    pub lengths: Vec<usize>,
    /// Model width.
    #[arg(long, default_value_t = 768)]
    pub d_model: usize,
    /// Attention heads (for the per-method table; the seed table uses one head).
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
}

/// Options of `calibrate`.
#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// The comparison options: shapes, backend, dtype, repeats, the sparse pattern's and
    /// the window's settings. `--methods` and `--lengths` pick what is measured: the
    /// default measures flash, sparse-local and sliding-window.
    #[command(flatten)]
    pub compare: CompareArgs,
    /// Which sparse pattern the hybrid's middle regime uses (sparse-local,
    /// sparse-strided or sparse-random).
    #[arg(long, default_value = "sparse-local")]
    pub sparse: Method,
    /// Where to write the profile.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "target/burn-attn-bench/hybrid-profile.json"
    )]
    pub profile: PathBuf,
}
