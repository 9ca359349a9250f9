//! `edged`: the edge node daemon.
//!
//! `edged [--config FILE]` serves the functions the config declares (the embedded dev default
//! when no file is given); `edged check-config FILE` validates a config, and the files it names
//! (see `edged::preflight`), and exits.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
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
