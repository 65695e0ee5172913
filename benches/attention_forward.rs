//! `cargo bench --bench attention_forward [--features cuda] -- [OPTIONS]` runs the
//! comparison tool's `kernel` subcommand (`burn-attn-bench kernel --help` lists the
//! options): the attention op against Burn's own attention, forward or training step.

use clap::Parser;

/// The `kernel` subcommand's options.
#[derive(Parser)]
struct Bench {
    #[command(flatten)]
    args: burn_attn_bench::kernel::KernelArgs,
}

fn main() -> std::process::ExitCode {
    match burn_attn_bench::kernel::kernel(Bench::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
