//! `edgectl`: the operator's command line for edged.
//!
//! `edgectl build` runs the compiler pipeline locally (validate → Wizer → AOT for every target)
//! and writes the artifacts and their manifest to a directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edged_compiler::{CompileOptions, InitPolicy, Target};
use edged_snapshots::Manifest;

#[derive(Parser)]
#[command(
    name = "edgectl",
    version,
    about = "Build and manage edged deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pre-initialize and AOT-compile a .wasm (or .wat) for every target; write artifacts and a
    /// manifest to the output directory.
    Build(BuildArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The core module (WASI preview 1) or component (WASI 0.2) to build.
    input: PathBuf,
    /// Output directory (created if missing).
    #[arg(short, long, default_value = "out")]
    out: PathBuf,
    /// Deployment name; defaults to the input's file stem.
    #[arg(long)]
    name: Option<String>,
    /// Deployment version (monotonic per name).
    #[arg(long, default_value_t = 1)]
    version: u64,
    /// Init function to pre-initialize with (default: `wizer-initialize` when exported).
    #[arg(long, conflicts_with = "no_wizer")]
    init_func: Option<String>,
    /// Do not pre-initialize, even if the input exports an init function.
    #[arg(long)]
    no_wizer: bool,
    /// Targets to compile for (default: all).
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
    /// Print the manifest as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Build(args) => build(args),
    }
}

/// Writes `bytes` to `path` via a temp file, fsync and rename, so a crash never leaves half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn build(args: BuildArgs) -> Result<()> {
    let input =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("cannot derive a name from the input path; pass --name")?,
    };
    edged_snapshots::manifest::validate_name(&name).map_err(anyhow::Error::msg)?;
    let targets = if args.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        args.targets
            .iter()
            .map(|t| t.parse::<Target>())
            .collect::<Result<Vec<_>, _>>()?
    };
    let options = CompileOptions {
        init: match (&args.init_func, args.no_wizer) {
            (_, true) => InitPolicy::Skip,
            (Some(init), false) => InitPolicy::Required(init.clone()),
            (None, false) => InitPolicy::IfExported,
        },
        targets,
        ..CompileOptions::default()
    };
    let compiled = edged_compiler::compile(&input, &options)
        .with_context(|| format!("building {}", args.input.display()))?;
    let created_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let manifest = Manifest::from_compiled(&name, args.version, created_at, &compiled);

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_atomically(&args.out.join("source.wasm"), &compiled.source)?;
    for artifact in &compiled.artifacts {
        let file = args.out.join(format!("{}.cwasm", artifact.target));
        write_atomically(&file, &artifact.bytes)?;
    }
    let manifest_json = serde_json::to_string_pretty(&manifest)?;
    write_atomically(&args.out.join("manifest.json"), manifest_json.as_bytes())?;

    if args.json {
        println!("{manifest_json}");
        return Ok(());
    }
    println!(
        "{} v{} ({}, {})",
        manifest.name,
        manifest.version,
        compiled.kind,
        match &compiled.init_func {
            Some(init) => format!("pre-initialized with `{init}`"),
            None => "not pre-initialized".to_string(),
        }
    );
    println!("  {:<27} {:<66} {:>10}", "target", "blake3", "bytes");
    println!(
        "  {:<27} {:<66} {:>10}",
        "source", manifest.source.blake3, manifest.source.size
    );
    for a in &manifest.artifacts {
        println!(
            "  {:<27} {:<66} {:>10}",
            a.target.triple(),
            a.blake3,
            a.size
        );
    }
    println!("  steps:");
    for (step, took) in &compiled.timings.0 {
        println!("    {step:<40} {:>9.1} ms", took.as_secs_f64() * 1e3);
    }
    println!("  wrote {}", args.out.display());
    Ok(())
}
