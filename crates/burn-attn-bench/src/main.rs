//! `burn-attn-bench`: run `burn-attn-bench compare --help` for the options.

use std::process::ExitCode;

use burn_attn_bench::alloc::CountingAllocator;
use burn_attn_bench::{
    format_model, format_table, progress_bar, run, BackendKind, Cli, Command, CompareArgs, Report,
};
use clap::Parser;

// Counts host allocations so `compare` can report each forward's peak.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Runs `compare` on backend `B` and prints (and optionally saves) the report.
fn compare_on<B: burn_attn::AttentionBackend>(
    device: B::Device,
    args: CompareArgs,
) -> Result<(), String> {
    let total = (args.lengths.len() * args.selected_methods().len()) as u64;
    let bar = progress_bar(total, args.no_progress);
    let rows = run::<B>(&device, &args, &bar);
    let report = Report {
        backend: burn_attn_bench::run::backend_name::<B>(&device),
        args,
        rows,
    };
    println!(
        "burn-attn compare on {} (batch {}, d_model {}, heads {}; median of {} after {} warm-up; \
         allocator peak = host bytes allocated above the baseline during one forward; \
         model = complexity model, f32)",
        report.backend,
        report.args.batch,
        report.args.d_model,
        report.args.heads,
        report.args.repeats,
        report.args.warmup
    );
    print!("{}", format_table(&report.rows));
    println!("\n{}", burn_attn_bench::table::LEGEND);
    if let Some(path) = &report.args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compare(args) => args.validate().and_then(|()| match args.backend {
            // Adding a backend: a cargo feature, a `BackendKind` value and an arm here.
            BackendKind::Ndarray => {
                compare_on::<burn::backend::NdArray<f32>>(Default::default(), args)
            }
        }),
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
