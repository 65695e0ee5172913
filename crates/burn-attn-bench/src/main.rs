//! `burn-attn-bench`: run `burn-attn-bench compare --help` for the options.

use std::process::ExitCode;

use burn_attn_bench::alloc::CountingAllocator;
use burn_attn_bench::calibrate::{calibrate, format_profile, save_profile};
use burn_attn_bench::output::{build_report, format_report, write_outputs};
use burn_attn_bench::{
    format_model, progress_bar, run, BackendKind, CalibrateArgs, Cli, Command, CompareArgs, DType,
    MemoryMeter,
};
use clap::Parser;

// Counts host allocations so `compare` can report each forward's peak on the CPU.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Runs `compare` on backend `B`, prints the report and writes its files.
fn compare_on<B: burn_attn::AttentionBackend>(
    device: B::Device,
    meter: MemoryMeter,
    args: CompareArgs,
) -> Result<(), String> {
    let total = (args.lengths.len() * args.selected_methods().len()) as u64;
    let bar = progress_bar(total, args.no_progress);
    let rows = run::<B>(&device, &args, &meter, &bar);
    let backend = burn_attn_bench::run::backend_name::<B>(&device);
    // Rows missing without a time limit failed (each said why as it failed).
    let failed = match args.time_limit {
        None => burn_attn_bench::run::missing_rows(&args, &rows),
        Some(_) => Vec::new(),
    };
    let report = build_report(backend, meter.description.clone(), args, rows)?;
    print!("{}", format_report(&report));
    for path in write_outputs(&report)? {
        eprintln!("wrote {}", path.display());
    }
    if failed.is_empty() {
        Ok(())
    } else {
        let names: Vec<String> = failed.iter().map(|(m, n)| format!("{m} n={n}")).collect();
        Err(format!(
            "{} rows failed: {}",
            failed.len(),
            names.join(", ")
        ))
    }
}

/// Runs `calibrate` on backend `B` and writes the profile.
fn calibrate_on<B: burn_attn::AttentionBackend>(
    device: B::Device,
    meter: MemoryMeter,
    args: CalibrateArgs,
) -> Result<(), String> {
    let total = (args.compare.lengths.len() * 3) as u64;
    let bar = progress_bar(total, args.compare.no_progress);
    let profile = calibrate::<B>(&device, &args, &meter, &bar)?;
    print!("{}", format_profile(&profile));
    save_profile(&profile, &args.profile)?;
    eprintln!("wrote {}", args.profile.display());
    Ok(())
}

/// The device memory pool of a CubeCL runtime as a [`MemoryMeter`].
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn pool_meter<R: burn::cubecl::Runtime>(device: &R::Device) -> MemoryMeter {
    let client = R::client(device);
    let cleanup_client = client.clone();
    MemoryMeter {
        description: "device memory pool: growth of bytes reserved from the device during one \
            forward after a pool cleanup, or of bytes in use if larger (CubeCL keeps no peak \
            counter; sampled after the synced forward with its output alive)"
            .into(),
        sample: Some(Box::new(move || {
            let usage = client.memory_usage().ok();
            burn_attn_bench::run::DeviceMemory {
                in_use: usage.as_ref().map_or(0, |u| u.bytes_in_use),
                reserved: usage.as_ref().map_or(0, |u| u.bytes_reserved),
            }
        })),
        cleanup: Some(Box::new(move || cleanup_client.memory_cleanup())),
    }
}

/// Calls `$f::<Backend>(device, meter, args)` for the backend and dtype in `$c`.
macro_rules! dispatch {
    ($f:ident, $c:expr, $args:expr) => {{
        let c: &CompareArgs = $c;
        match (c.backend, c.dtype) {
            (BackendKind::Cpu, DType::F32) => $f::<burn::backend::NdArray<f32>>(
                Default::default(),
                MemoryMeter::allocator(),
                $args,
            ),
            (BackendKind::Cpu, d) => Err(format!("the CPU backend runs f32, not {}", d.name())),
            #[cfg(feature = "cuda")]
            (BackendKind::Cuda, dtype) => {
                use burn::backend::cuda::CudaDevice;
                let device = CudaDevice::default();
                let meter = pool_meter::<burn::cubecl::cuda::CudaRuntime>(&device);
                match dtype {
                    DType::F32 => $f::<burn::backend::Cuda<f32>>(device, meter, $args),
                    DType::F16 => {
                        $f::<burn::backend::Cuda<burn::tensor::f16>>(device, meter, $args)
                    }
                    DType::Bf16 => {
                        $f::<burn::backend::Cuda<burn::tensor::bf16>>(device, meter, $args)
                    }
                }
            }
            #[cfg(feature = "wgpu")]
            (BackendKind::Wgpu, dtype) => {
                use burn::backend::wgpu::WgpuDevice;
                let device = WgpuDevice::default();
                let meter = pool_meter::<burn::cubecl::wgpu::WgpuRuntime>(&device);
                match dtype {
                    DType::F32 => $f::<burn::backend::Wgpu<f32>>(device, meter, $args),
                    DType::F16 => {
                        $f::<burn::backend::Wgpu<burn::tensor::f16>>(device, meter, $args)
                    }
                    DType::Bf16 => Err("WGPU has no bf16; use f32 or f16".to_string()),
                }
            }
            #[allow(unreachable_patterns)]
            (other, _) => Err(format!(
                "backend {other:?} is not compiled in: build with `--features {}`",
                format!("{other:?}").to_lowercase()
            )),
        }
    }};
}

/// Writes `digest`'s file for the backend and dtype of `args`.
fn digest(args: &burn_attn_bench::DigestArgs) -> Result<(), String> {
    use burn::backend::Autodiff;
    use burn_attn_bench::digest::digest;
    let text = match (args.backend, args.dtype) {
        (BackendKind::Cpu, DType::F32) => {
            digest::<Autodiff<burn::backend::NdArray<f32>>>(&Default::default())
        }
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, dtype) => {
            use burn::backend::Cuda;
            let device = Default::default();
            match dtype {
                DType::F32 => digest::<Autodiff<Cuda<f32>>>(&device),
                DType::F16 => digest::<Autodiff<Cuda<burn::tensor::f16>>>(&device),
                DType::Bf16 => digest::<Autodiff<Cuda<burn::tensor::bf16>>>(&device),
            }
        }
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, DType::F32) => {
            digest::<Autodiff<burn::backend::Wgpu<f32>>>(&Default::default())
        }
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, DType::F16) => {
            digest::<Autodiff<burn::backend::Wgpu<burn::tensor::f16>>>(&Default::default())
        }
        (backend, dtype) => {
            return Err(format!(
                "digest on {backend:?} with {} is not available in this build",
                dtype.name()
            ))
        }
    };
    std::fs::write(&args.out, text).map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compare(mut args) => args
            .resolve()
            .and_then(|()| args.validate())
            .and_then(|()| dispatch!(compare_on, &args.clone(), args)),
        Command::Calibrate(mut args) => args
            .compare
            .resolve()
            .and_then(|()| args.compare.validate())
            .and_then(|()| dispatch!(calibrate_on, &args.compare.clone(), args)),
        Command::Digest(args) => digest(&args),
        Command::Kernel(args) => burn_attn_bench::kernel::kernel(args),
        Command::Model(args) => {
            let model =
                burn_attn::nn::complexity::ComplexityModel::new(args.d_model, args.heads.max(1));
            print!("{}", format_model(&model, &args.lengths));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
