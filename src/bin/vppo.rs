//! The `vppo` command line (SPEC section 9). Each subcommand is one variant of [`Command`] and one
//! function; the logic lives in the library (`vppo::cli`) so that it can be tested.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vppo::bench::{format_text, run_bench, BenchArgs};
use vppo::cli::{run_loss, LossArgs};

/// VPPO (Visually-Perceptive Policy Optimization) loss: fused CUDA kernels with a CPU reference.
#[derive(Debug, Parser)]
#[command(name = "vppo", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compute the VPPO loss, every per-token and per-response output and dloss/dlogits for a packed
    /// batch in a safetensors file; print a one-line JSON summary. Defaults are the official VPPO setting.
    Loss(LossArgs),
    /// Time the loss (forward, and forward + backward) on a batch read once from a safetensors file or
    /// made in-process with --synthetic; file I/O is outside the timings. Prints median/min times and
    /// peak extra memory (one JSON line with --json).
    Bench(BenchArgs),
    /// Train a small vision-language policy with VPPO (or DAPO, GRPO) on a synthetic grid task, on the
    /// CPU by default; writes metrics.jsonl, checkpoint.json, reward.svg and scores.svg and prints a
    /// one-line JSON summary. `--compare` runs vppo and dapo on the same seeds.
    Train(vppo::train::TrainArgs),
}

fn loss(args: LossArgs) -> ExitCode {
    match run_loss(&args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vppo loss: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    match run_bench(&args) {
        Ok(report) if args.json => match serde_json::to_string(&report) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vppo bench: error: cannot serialize the report: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            println!("{}", format_text(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vppo bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn train(args: vppo::train::TrainArgs) -> ExitCode {
    match vppo::train::run_cli(&args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vppo train: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Loss(args) => loss(args),
        Command::Bench(args) => bench(args),
        Command::Train(args) => train(args),
    }
}
