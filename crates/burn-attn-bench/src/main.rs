//! `burn-attn-bench`: run `burn-attn-bench compare --help` for the options.

use std::process::ExitCode;

use burn::tensor::Device;
use burn_attn_bench::alloc::CountingAllocator;
use burn_attn_bench::calibrate::{calibrate, format_profile, save_profile};
use burn_attn_bench::output::{build_report, format_report, write_outputs};
use burn_attn_bench::{
    device_for, format_model, memory_meter, progress_bar, run, CalibrateArgs, Cli, Command,
    CompareArgs, MemoryMeter,
};
use clap::Parser;

// Counts host allocations so `compare` can report each forward's peak on the CPU.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Runs `compare` on `device`, prints the report and writes its files.
fn compare_on(device: Device, meter: MemoryMeter, args: CompareArgs) -> Result<(), String> {
    let total = (args.lengths.len() * args.selected_methods().len()) as u64;
    let bar = progress_bar(total, args.no_progress);
    let rows = run(&device, &args, &meter, &bar);
    let backend = burn_attn_bench::run::backend_name(&device);
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

/// Runs `calibrate` on `device` and writes the profile.
fn calibrate_on(device: Device, meter: MemoryMeter, args: CalibrateArgs) -> Result<(), String> {
    let total = (args.compare.lengths.len() * 3) as u64;
    let bar = progress_bar(total, args.compare.no_progress);
    let profile = calibrate(&device, &args, &meter, &bar)?;
    print!("{}", format_profile(&profile));
    save_profile(&profile, &args.profile)?;
    eprintln!("wrote {}", args.profile.display());
    Ok(())
}

/// The device of a `compare` run and its memory meter.
fn device_and_meter(args: &CompareArgs) -> Result<(Device, MemoryMeter), String> {
    let device = device_for(args.backend, args.dtype)?;
    let meter = memory_meter(&device);
    Ok((device, meter))
}

/// Writes `digest`'s file for the backend and dtype of `args`.
fn digest(args: &burn_attn_bench::DigestArgs) -> Result<(), String> {
    let device = device_for(args.backend, args.dtype)?;
    let text = burn_attn_bench::digest::digest(&device.autodiff());
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
            .and_then(|()| device_and_meter(&args))
            .and_then(|(device, meter)| compare_on(device, meter, args)),
        Command::Calibrate(mut args) => args
            .compare
            .resolve()
            .and_then(|()| args.compare.validate())
            .and_then(|()| device_and_meter(&args.compare))
            .and_then(|(device, meter)| calibrate_on(device, meter, args)),
        Command::Digest(args) => digest(&args),
        Command::Kernel(args) => burn_attn_bench::kernel::kernel(args),
        Command::Masks(args) => burn_attn_bench::masks::masks(args),
        Command::Decode(args) => burn_attn_bench::decode::decode(args),
        Command::Linear(args) => burn_attn_bench::linear::linear(args),
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
