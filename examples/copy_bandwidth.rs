//! Device-to-device copy bandwidth: the memory ceiling the kernels are measured against.
//!
//! Copies one large buffer into another on the GPU with cuMemcpyDtoD, timed with CUDA events, and
//! reports GB/s counting the bytes read plus the bytes written (2 x size per copy), best and median
//! of several copies after warm-up. The destination is checked against the source afterwards. The
//! measurement is [`vppo::cuda::copy_bandwidth`], which the benchmarks (benches/vppo.rs) also use.
//!
//! Usage: cargo run --release --example copy_bandwidth -- [--mib 1024] [--reps 20] [--ordinal 0]

use std::process::ExitCode;

use vppo::cuda::{copy_bandwidth, Gpu};
use vppo::error::CudaError;
use vppo::{Result, VppoError};

struct Args {
    mib: usize,
    reps: usize,
    ordinal: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        mib: 1024,
        reps: 20,
        ordinal: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> std::result::Result<usize, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse::<usize>()
                .map_err(|_| format!("{name}: {v:?} is not a whole number"))
        };
        match flag.as_str() {
            "--mib" => args.mib = value("--mib")?,
            "--reps" => args.reps = value("--reps")?,
            "--ordinal" => args.ordinal = value("--ordinal")?,
            "-h" | "--help" => {
                return Err("usage: copy_bandwidth [--mib 1024] [--reps 20] [--ordinal 0]".into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.mib == 0 || args.reps == 0 {
        return Err("--mib and --reps must be at least 1".into());
    }
    Ok(args)
}

fn run(args: &Args) -> Result<()> {
    let gpu = Gpu::new(args.ordinal)?;
    let bytes = args.mib.checked_mul(1 << 20).ok_or_else(|| {
        VppoError::Cuda(CudaError::new(format!("--mib {} is too large", args.mib)))
    })?;
    let bw = copy_bandwidth(&gpu, bytes, args.reps)?;
    let (cc_major, cc_minor) = gpu.compute_capability();
    println!(
        "copy_bandwidth: {} (sm_{cc_major}{cc_minor}, {} SMs), {} MiB buffer, {} timed copies after 3 warm-ups",
        gpu.name(),
        gpu.multiprocessor_count(),
        args.mib,
        args.reps
    );
    println!(
        "copy_bandwidth: best {:.1} GB/s ({:.3} ms), median {:.1} GB/s ({:.3} ms), worst {:.1} GB/s; bytes read + written",
        bw.best_gbs(),
        bw.best_ms(),
        bw.median_gbs(),
        bw.median_ms(),
        bw.worst_gbs()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("copy_bandwidth: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("copy_bandwidth: error: {e}");
            ExitCode::FAILURE
        }
    }
}
