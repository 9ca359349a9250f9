//! `edged`: the edge node daemon.
//!
//! `edged [--config FILE]` serves the functions the config declares (the embedded dev default
//! when no file is given); `edged check-config FILE` validates a config, and the files it names
//! (see `edged::preflight`), and exits; `edged verify` re-hashes the config's store and reports
//! damage (exit 0 clean, 1 damage, 2 not checked).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use edged_artifacts::{Store, StoreError};
use edged_node_config::NodeConfig;

#[derive(Parser)]
#[command(
    name = "edged",
    version,
    about = "Serve pre-initialized WebAssembly at the edge"
)]
struct Cli {
    /// Node configuration (TOML). Without it edged runs on the embedded dev default.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit: syntax and values, then everything start checks that
    /// needs no network (wasm files and init exports, identity and trusted keys, state_dir).
    /// Prints one line per problem and exits 1, or prints `ok`.
    CheckConfig {
        file: PathBuf,
        /// Check syntax and values only, not the files and directories the config names: for a
        /// config staged under another root (`DESTDIR`), whose paths are the target's.
        #[arg(long)]
        no_files: bool,
    },
    /// Re-hash every blob of the store in the config's state_dir and cross-check its index.
    /// Exit code 0: clean; 1: damage found; 2: could not check (no store, or edged is running).
    Verify,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("EDGED_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // journald adds its own timestamps and cannot render colours.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file, no_files }) = &cli.command {
        // Parse errors carry their own `file:line:`; preflight problems get the file's name.
        let config = match NodeConfig::load(file) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let problems = if *no_files {
            Vec::new()
        } else {
            edged::preflight::check(&config)
        };
        if !problems.is_empty() {
            for problem in &problems {
                eprintln!("{}: {problem}", file.display());
            }
            std::process::exit(1);
        }
        println!(
            "{}: ok ({} function{})",
            file.display(),
            config.functions.len(),
            if config.functions.len() == 1 { "" } else { "s" }
        );
        return Ok(());
    }
    init_logging();
    let config = match &cli.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::dev_default(&std::env::current_dir()?),
    };
    if let Some(Command::Verify) = &cli.command {
        std::process::exit(verify(&config.state_dir));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        edged::lifecycle::run(config, cli.config.clone(), |http, control| {
            // Stable lines on stdout for scripts and tests to find the bound ports.
            if let Some(control) = control {
                println!("edged control on quic://{control}");
            }
            println!("edged listening on http://{http}");
            let _ = std::io::stdout().flush();
        })
        .await
    })
}

/// `edged verify`: prints every problem and a summary; returns the exit code.
fn verify(state_dir: &Path) -> i32 {
    // Opening would start an empty store; verifying is not the moment to create one.
    if !state_dir.join("index").exists() && !state_dir.join("blobs").exists() {
        eprintln!(
            "edged verify: no store in {} (nothing to verify)",
            state_dir.display()
        );
        return 2;
    }
    let store = match Store::open(state_dir) {
        Ok(store) => store,
        Err(StoreError::Locked { index }) => {
            eprintln!(
                "edged verify: the store in {} is in use by a running edged (its index {} is \
                 locked); stop edged (e.g. `systemctl stop edged`), verify, then start it again",
                state_dir.display(),
                index.display()
            );
            return 2;
        }
        Err(
            e @ (StoreError::IndexMissing { .. }
            | StoreError::IndexLost { .. }
            | StoreError::IndexUnreadable { .. }),
        ) => {
            println!("damaged: {e}");
            println!("store {}: the index is damaged", state_dir.display());
            return 1;
        }
        Err(e @ StoreError::DiskFull { .. }) => {
            println!("disk full: {e}");
            return 2;
        }
        Err(e) => {
            eprintln!("edged verify: {e}");
            return 2;
        }
    };
    let report = match store.verify() {
        Ok(report) => report,
        Err(e) => {
            eprintln!("edged verify: {e}");
            return 2;
        }
    };
    for problem in &report.problems {
        println!("damaged: {problem}");
    }
    for stray in &report.stray_files {
        println!(
            "stray: {} (not indexed; housekeeping removes it)",
            stray.display()
        );
    }
    let (partial_files, partial_bytes) = store.partials_usage();
    if partial_files > 0 {
        println!(
            "partial: {partial_files} files ({partial_bytes} bytes) of uploads and fetches that \
             did not finish, in {}/tmp (a retry resumes them; housekeeping drops them after a \
             day idle, and edged drops them at start when the disk is too full to open the index)",
            state_dir.display()
        );
    }
    println!(
        "store {}: {} blobs ({} bytes) re-hashed, {} manifests checked, {} problem{}",
        state_dir.display(),
        report.blobs_checked,
        report.bytes_hashed,
        report.manifests_checked,
        report.problems.len(),
        if report.problems.len() == 1 { "" } else { "s" }
    );
    if report.is_ok() {
        return 0;
    }
    println!(
        "repair: a config function's damaged blob is restored from its .wasm when edged starts; \
         a pushed deployment's by pushing the same .wasm again (`edgectl push`)"
    );
    1
}
