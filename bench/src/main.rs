//! # bench
//!
//! The performance harness. Measures DESIGN.md's cold-start phases and the HTTP path in one
//! run, each against a baseline measured in the same run (raw wasmtime, a JIT baseline, a bare
//! hyper server, a bare wasmtime `wasi:http` server), prints p50/p99/max and the ratios, and
//! writes `results.json` and `bench.svg`. Absolute times drift between machines; quote the
//! ratios.
//!
//! `cargo build --release -p edged -p bench && target/release/bench [--phases coldstart,http]`
//!
//! The soak phase (`--phases soak [--soak-secs 600 --soak-connections 32]`) holds a real edged
//! under load with hello beside the fault guests for minutes: zero hello errors, flat RSS.
//!
//! The large phase (`--phases large`, also a default) measures the interpreter guests that
//! `scripts/build-large-guests.sh` builds (componentize-py and componentize-js hellos) on a fresh
//! instance against raw wasmtime's defaults; it says so and skips when they are not built.
//!
//! The chain phase (`--phases chain`) measures a middleware chain against the app alone and
//! against the same parts as separate functions over loopback HTTP.
//!
//! The fleet phase (peer sync convergence against pushing to every node directly, and the
//! origin's egress) takes longer and runs only when asked: `cargo build --release -p edged -p edgectl -p bench && target/release/bench
//! --phases sync [--nodes 4 --artifact-mb 20 --sync-rounds 3]`
//!
//! The WAN fleet phase (`--phases fleet-wan [--wan-nodes 16 --wan-rate-mbit 10 --wan-delay-ms 50
//! --wan-loss 0.01]`, as root) runs the fleet in network namespaces on shaped, lossy links.

mod chain;
mod coldstart;
mod fleet;
mod fleet_wan;
mod floors;
mod http;
mod large;
mod load;
mod netlab;
mod process;
mod registry_fleet;
mod report;
mod soak;
mod stats;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "edged benchmark: cold start, HTTP and fleet sync")]
struct Args {
    /// Which phases to run: coldstart, http, large, chain, sync, fleet-wan, soak (chain, sync,
    /// fleet-wan and soak are not defaults).
    #[arg(long, value_delimiter = ',', default_values_t = ["coldstart".to_string(), "http".to_string(), "large".to_string()])]
    phases: Vec<String>,
    /// WASI p1 command guest for the cold-start phases (default: the init-heavy sample).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Samples per fast cold-start phase.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Samples of the load phase.
    #[arg(long, default_value_t = 50)]
    load_iterations: usize,
    /// Samples of the JIT baseline (each takes a while).
    #[arg(long, default_value_t = 10)]
    baseline_iterations: usize,
    /// The edged binary for the HTTP phase (default: next to this binary).
    #[arg(long)]
    edged: Option<PathBuf>,
    /// The real `wasmtime` 48.0.8 CLI for the HTTP phase's `wasmtime serve` rows (default: where
    /// scripts/install-wasmtime-cli.sh puts it; the rows are skipped when it is absent).
    #[arg(long)]
    wasmtime: Option<PathBuf>,
    /// Concurrent keep-alive connections of the HTTP load generator (each target is also
    /// measured at 1).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests per HTTP target.
    #[arg(long, default_value_t = 4000)]
    requests: usize,
    /// Command prefix that runs the edged binary, e.g. "qemu-aarch64-static -L /usr/aarch64-linux-gnu"
    /// when this bench itself runs under qemu-user (scripts/bench-aarch64.sh). Marks every figure
    /// as informative only: emulation says nothing about real aarch64 hardware.
    #[arg(long, value_name = "CMD")]
    emulator: Option<String>,
    /// Pooling-allocator slots (instances and memories) for the bench's engine and the edged it
    /// starts (default: edged's default). qemu-user needs a small pool: see README, aarch64.
    #[arg(long)]
    pool_slots: Option<u32>,
    /// In-process fresh-instance requests per large guest and engine (large phase).
    #[arg(long, default_value_t = 300)]
    large_iterations: usize,
    /// The edgectl binary for the sync phase (default: next to this binary).
    #[arg(long)]
    edgectl: Option<PathBuf>,
    /// Nodes in the sync phase's fleet (the first gets the push).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Size of the sync phase's module (one data segment; its artifact is about as large).
    #[arg(long, default_value_t = 20)]
    artifact_mb: usize,
    /// Pushes in the sync phase, each to a fresh fleet.
    #[arg(long, default_value_t = 3)]
    sync_rounds: usize,
    /// Nodes of the WAN fleet phase (the first gets the push from an operator host of its own).
    #[arg(long, default_value_t = 16)]
    wan_nodes: usize,
    /// Size of the WAN phase's module: an 8 MiB data segment makes a 25.5 MB set with both
    /// targets' artifacts.
    #[arg(long, default_value_t = 8)]
    wan_artifact_mb: usize,
    /// Every WAN host's link rate each way, in Mbit/s.
    #[arg(long, default_value_t = 10)]
    wan_rate_mbit: u32,
    /// One-way delay on what every WAN host receives, in ms.
    #[arg(long, default_value_t = 50)]
    wan_delay_ms: u64,
    /// Loss probability on what every WAN host receives.
    #[arg(long, default_value_t = 0.01)]
    wan_loss: f64,
    /// Fraction of the WAN fleet killed mid-sync (and restarted) in its second round.
    #[arg(long, default_value_t = 0.1)]
    wan_kill_fraction: f64,
    /// How long a WAN round may take until every node serves, in seconds.
    #[arg(long, default_value_t = 300)]
    wan_timeout_secs: u64,
    /// Length of the soak phase, in seconds.
    #[arg(long, default_value_t = 600)]
    soak_secs: u64,
    /// Seconds of the soak phase before its RSS must stay flat.
    #[arg(long, default_value_t = 60)]
    soak_warmup_secs: u64,
    /// Keep-alive connections of the soak phase (one in eight asks the fault guests).
    #[arg(long, default_value_t = 32)]
    soak_connections: usize,
    /// Only load this URL (`http://HOST:PORT/PATH`) with `--connections` and `--requests` and
    /// print p50/p99 and requests/s, e.g. to profile a server started by hand.
    #[arg(long, value_name = "URL")]
    load: Option<String>,
    /// Where to write results.json and bench.svg.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

/// `--load URL`: one load run against a server the bench did not start.
async fn load_only(url: &str, connections: usize, requests: usize) -> Result<()> {
    let uri: ::http::Uri = url.parse().with_context(|| format!("--load {url}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("--load {url}: no host:port"))?;
    let addr = tokio::net::lookup_host(authority.as_str())
        .await?
        .next()
        .with_context(|| format!("--load {url}: {authority} does not resolve"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let (samples, rps) = load::load(addr, path, connections, requests).await?;
    let summary = stats::summarize(url, &samples);
    println!(
        "{url} ×{connections}: p50 {} p99 {} {rps:.0} req/s",
        stats::format_us(summary.p50_us),
        stats::format_us(summary.p99_us)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.load {
        return load_only(url, args.connections, args.requests).await;
    }
    let known = [
        "coldstart",
        "http",
        "large",
        "chain",
        "sync",
        "fleet-wan",
        "soak",
    ];
    if let Some(unknown) = args.phases.iter().find(|p| !known.contains(&p.as_str())) {
        bail!("unknown phase {unknown:?} (known: {})", known.join(", "));
    }
    std::fs::create_dir_all(&args.out)?;
    let work = tempfile::tempdir()?;
    let mut phases = Vec::new();
    let mut ratios = Vec::new();
    let mut figures = Vec::new();
    let guest = match &args.guest {
        Some(path) => path.clone(),
        None => edged_testkit::guest("init-heavy-p1.wasm"),
    };
    if args.phases.iter().any(|p| p == "coldstart") {
        let params = coldstart::Params {
            iterations: args.iterations,
            load_iterations: args.load_iterations,
            baseline_iterations: args.baseline_iterations,
            pool_slots: args.pool_slots,
        };
        let (p, r) = coldstart::run(&guest, &params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
    }
    let emulator: Vec<String> = args
        .emulator
        .as_deref()
        .map(|cmd| cmd.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    if args.phases.iter().any(|p| p == "http") {
        let params = http::Params {
            edged: sibling_binary(args.edged.as_ref(), "edged")?,
            wasmtime: args.wasmtime.clone().or_else(installed_wasmtime),
            connections: args.connections,
            requests: args.requests,
            emulator: emulator.clone(),
            pool_slots: args.pool_slots,
        };
        let (p, r, f) = http::run(&params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
        figures.extend(f);
    }
    if args.phases.iter().any(|p| p == "large") {
        let params = large::Params {
            edged: sibling_binary(args.edged.as_ref(), "edged")?,
            iterations: args.large_iterations,
            load_iterations: args.load_iterations.clamp(1, 10),
            connections: args.connections,
            requests: args.requests,
            emulator: emulator.clone(),
            pool_slots: args.pool_slots,
        };
        let (p, r, f) = large::run(&params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
        figures.extend(f);
    }
    if args.phases.iter().any(|p| p == "chain") {
        let params = chain::Params {
            edged: sibling_binary(args.edged.as_ref(), "edged")?,
            connections: args.connections,
            requests: args.requests,
            emulator: emulator.clone(),
            pool_slots: args.pool_slots,
        };
        let (p, r, f) = chain::run(&params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
        figures.extend(f);
    }
    if args.phases.iter().any(|p| p == "sync") {
        let params = fleet::Params {
            edged: sibling_binary(args.edged.as_ref(), "edged")?,
            edgectl: sibling_binary(args.edgectl.as_ref(), "edgectl")?,
            nodes: args.nodes,
            artifact_mb: args.artifact_mb,
            rounds: args.sync_rounds,
            emulator: emulator.clone(),
            pool_slots: args.pool_slots,
        };
        let (p, r, f) = fleet::run(&params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
        figures.extend(f);
    }
    if args.phases.iter().any(|p| p == "fleet-wan") {
        let params = fleet_wan::Params {
            fleet: fleet::Params {
                edged: sibling_binary(args.edged.as_ref(), "edged")?,
                edgectl: sibling_binary(args.edgectl.as_ref(), "edgectl")?,
                nodes: args.wan_nodes,
                artifact_mb: args.wan_artifact_mb,
                rounds: 2,
                emulator: emulator.clone(),
                pool_slots: args.pool_slots,
            },
            rate_mbit: args.wan_rate_mbit,
            delay: std::time::Duration::from_millis(args.wan_delay_ms),
            loss: args.wan_loss,
            kill_fraction: args.wan_kill_fraction,
            timeout: std::time::Duration::from_secs(args.wan_timeout_secs),
        };
        let (p, r, f) = fleet_wan::run(&params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
        figures.extend(f);
    }
    if args.phases.iter().any(|p| p == "soak") {
        let params = soak::Params {
            edged: sibling_binary(args.edged.as_ref(), "edged")?,
            connections: args.soak_connections,
            duration: std::time::Duration::from_secs(args.soak_secs),
            warm_up: std::time::Duration::from_secs(args.soak_warmup_secs),
            emulator: emulator.clone(),
        };
        let (p, r, f) = soak::run(&params, work.path()).await?;
        phases.extend(p);
        ratios.extend(r);
        figures.extend(f);
    }
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
        note: if let Some(emulator) = &args.emulator {
            format!(
                "UNDER EMULATION ({emulator}): figures are informative only and say nothing \
                 about real {} hardware",
                std::env::consts::ARCH
            )
        } else if cfg!(debug_assertions) {
            "debug build: figures are not representative; use --release".into()
        } else {
            String::new()
        },
        phases,
        ratios,
        figures,
    };
    report::print(&report);
    let json = args.out.join("results.json");
    let svg = args.out.join("bench.svg");
    report::write_json(&report, &json)?;
    report::write_svg(&report, &svg)?;
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// The `wasmtime` CLI scripts/install-wasmtime-cli.sh installs, if it has.
fn installed_wasmtime() -> Option<PathBuf> {
    let tools = std::env::var_os("EDGED_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|home| home.join(".cache/edged/tools")))?;
    let path = tools.join("wasmtime-48.0.8/bin/wasmtime");
    path.exists().then_some(path)
}

/// `explicit`, or the binary `name` next to this one (where cargo builds the workspace's
/// binaries).
fn sibling_binary(explicit: Option<&PathBuf>, name: &str) -> Result<PathBuf> {
    match explicit {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("bench binary has no directory")?
            .join(name)),
    }
}
