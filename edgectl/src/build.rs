//! `edgectl build`: the compiler pipeline to files on disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use edged_compiler::{CompileOptions, Compiled, InitPolicy, Target};
use edged_snapshots::Manifest;

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The core module (WASI preview 1) or component (WASI 0.2) to build.
    pub input: PathBuf,
    /// Output directory (created if missing).
    #[arg(short, long, default_value = "out")]
    pub out: PathBuf,
    /// Deployment name; defaults to the input's file stem.
    #[arg(long)]
    pub name: Option<String>,
    /// Deployment version (monotonic per name).
    #[arg(long, default_value_t = 1)]
    pub version: u64,
    #[command(flatten)]
    pub compile: CompileArgs,
    /// Print the manifest as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How to compile; shared by `build` and `push`.
#[derive(clap::Args)]
pub struct CompileArgs {
    /// Init function to pre-initialize with (default: `wizer-initialize` when exported).
    #[arg(long, conflicts_with = "no_wizer")]
    pub init_func: Option<String>,
    /// Do not pre-initialize, even if the input exports an init function.
    #[arg(long)]
    pub no_wizer: bool,
    /// Targets to compile for (default: all).
    #[arg(long = "target", value_name = "TRIPLE")]
    pub targets: Vec<String>,
}

impl CompileArgs {
    pub fn options(&self) -> Result<CompileOptions> {
        let targets = if self.targets.is_empty() {
            Target::ALL.to_vec()
        } else {
            self.targets
                .iter()
                .map(|t| t.parse::<Target>())
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(CompileOptions {
            init: match (&self.init_func, self.no_wizer) {
                (_, true) => InitPolicy::Skip,
                (Some(init), false) => InitPolicy::Required(init.clone()),
                (None, false) => InitPolicy::IfExported,
            },
            targets,
            ..CompileOptions::default()
        })
    }
}

/// The deployment name: given, or the input's file stem.
pub fn deployment_name(input: &Path, name: Option<&str>) -> Result<String> {
    let name = match name {
        Some(name) => name.to_string(),
        None => input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("cannot derive a name from the input path; pass --name")?,
    };
    edged_snapshots::manifest::validate_name(&name).map_err(anyhow::Error::msg)?;
    Ok(name)
}

pub fn compile_file(input: &Path, args: &CompileArgs) -> Result<Compiled> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    edged_compiler::compile(&bytes, &args.options()?)
        .with_context(|| format!("building {}", input.display()))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

pub fn print_timings(compiled: &Compiled) {
    println!("  steps:");
    for (step, took) in &compiled.timings.0 {
        println!("    {step:<40} {:>9.1} ms", took.as_secs_f64() * 1e3);
    }
}

/// Writes `bytes` to `path` via a temp file, fsync and rename, so a crash never leaves half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
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

pub fn build(args: BuildArgs) -> Result<()> {
    let name = deployment_name(&args.input, args.name.as_deref())?;
    let compiled = compile_file(&args.input, &args.compile)?;
    let manifest = Manifest::from_compiled(&name, args.version, now_secs(), &compiled);

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
    print_timings(&compiled);
    println!("  wrote {}", args.out.display());
    Ok(())
}
