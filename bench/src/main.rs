//! # bench
//!
//! The cold-start harness. Measures every phase of DESIGN.md's cold-start table in one run,
//! against a raw-wasmtime floor and a JIT baseline measured in the same run, prints p50/p99/max
//! and the ratios, and writes `results.json` and `coldstart.svg`.
//!
//! `cargo run -p bench --release -- [--guest FILE] [--iterations N] [--out DIR]`

mod coldstart;
mod report;
mod stats;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(about = "edged cold-start benchmark")]
struct Args {
    /// WASI p1 command guest to measure (default: the init-heavy sample, built from source).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Samples per fast phase.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Samples of the load phase.
    #[arg(long, default_value_t = 50)]
    load_iterations: usize,
    /// Samples of the JIT baseline (each takes a while).
    #[arg(long, default_value_t = 10)]
    baseline_iterations: usize,
    /// Where to write results.json and coldstart.svg.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let guest = match &args.guest {
        Some(path) => path.clone(),
        None => edged_testkit::guest("init-heavy-p1.wasm"),
    };
    std::fs::create_dir_all(&args.out)?;
    let work = tempfile::tempdir()?;
    let params = coldstart::Params {
        iterations: args.iterations,
        load_iterations: args.load_iterations,
        baseline_iterations: args.baseline_iterations,
    };
    let (phases, ratios) = coldstart::run(&guest, &params, work.path()).await?;
    let report = report::Report {
        guest: guest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        host: format!(
            "{} ({} cores)",
            std::env::consts::ARCH,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        ),
        note: if cfg!(debug_assertions) {
            "debug build: figures are not representative; use --release".into()
        } else {
            String::new()
        },
        phases,
        ratios,
    };
    report::print(&report);
    let json = args.out.join("results.json");
    let svg = args.out.join("coldstart.svg");
    report::write_json(&report, &json)?;
    report::write_svg(&report, &svg)?;
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}
