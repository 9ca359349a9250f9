//! `edgectl`: the operator's command line for edged.
//!
//! - `build` runs the compiler pipeline locally and writes artifacts and a manifest;
//! - `init` / `issue-node` create the fleet identity (CA, certificates, signing key);
//! - `push`, `ls`, `status`, `activate`, `rollback`, `invoke`, `rm` talk to a node over QUIC;
//! - `publish` stores a signed deployment in an OCI registry, `deploy` tells a node to pull one
//!   (and `push oci://…` deploys a component someone else published);
//! - `cache` shows, prunes or clears the compile cache `build` and `push` share.

mod build;
mod cache;
mod fleet;
mod oci;
mod remote;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use edged_control::wire::Request;

#[derive(Parser)]
#[command(
    name = "edgectl",
    version,
    about = "Build, push and manage edged deployments"
)]
struct Cli {
    #[command(flatten)]
    target: remote::Target,
    #[command(flatten)]
    cache: build::CacheArgs,
    #[command(flatten)]
    registry: oci::RegistryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pre-initialize and AOT-compile a .wasm (or .wat) for every target; write artifacts and a
    /// manifest to the output directory.
    Build(build::BuildArgs),
    /// Create a fleet: CA, operator certificate and signing key (refuses to overwrite).
    Init {
        /// Operator name in the certificate.
        #[arg(long, default_value = "operator")]
        operator: String,
    },
    /// Issue a node certificate from the fleet CA (for a node's identity_dir).
    IssueNode {
        name: String,
        /// Where to write `<name>.pem`, `<name>.key`, `ca.pem` and `signing.pub`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Compile for every target, sign, upload what the node lacks, and activate.
    Push(remote::PushArgs),
    /// Compile for every target, sign, and store the deployment in an OCI registry under one
    /// tag (the Wasm artifact `wkg oci pull` reads, with edged's signed manifest and artifacts
    /// as a referrer).
    Publish(oci::PublishArgs),
    /// Tell a node to pull a published deployment from its registry: only the signed manifest
    /// goes over this link; the node downloads and verifies the blobs itself.
    Deploy(oci::DeployArgs),
    /// Deployments the node holds.
    Ls,
    /// The node's identity, target, engine fingerprint and store.
    Status,
    /// Serve NAME@VERSION (one the node already holds); with --fleet, on every node.
    Activate {
        id: String,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Serve the version before the active one (instant; no upload); with --fleet, on every node.
    Rollback {
        name: String,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Run one request through a function on the node.
    Invoke {
        name: String,
        /// Path (with query) the function sees.
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request body.
        #[arg(long)]
        data: Option<String>,
    },
    /// Remove NAME@VERSION from the node (not the active one).
    Rm { id: String },
    /// The compile cache: where it is and what it holds; prune or clear it.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Where the cache is, how many entries and bytes it holds.
    Info,
    /// Drop least recently used entries until the cache holds at most --max-mb.
    Prune {
        #[arg(long, default_value_t = cache::DEFAULT_MAX_BYTES >> 20)]
        max_mb: u64,
    },
    /// Drop every entry.
    Clear,
}

/// Fleet-wide activation (see `fleet.rs`).
#[derive(clap::Args)]
struct FleetArgs {
    /// Sign an activation record that every node applies (spread by sync, applied by nodes that
    /// were offline when they return), instead of switching this node only.
    #[arg(long)]
    fleet: bool,
    /// With --fleet: the record's sequence number (default: one past the node's last record).
    #[arg(long, requires = "fleet")]
    sequence: Option<u64>,
    /// With --fleet: start the name's record sequence again (the next epoch, sequence 1 or
    /// --sequence), for a name whose last record went wrong (e.g. a sequence at the end of the
    /// range). Signed like any record; nodes apply it after every record of the old epoch.
    #[arg(long, requires = "fleet")]
    reset: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let target = cli.target;
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match cli.command {
        Command::Build(args) => build::build(args, &cli.cache),
        Command::Init { operator } => {
            let dir = remote::identity_dir(target.identity.as_deref());
            edged_control::identity::init_operator_dir(&dir, &operator)?;
            println!(
                "created fleet identity in {} (keys are 0600; keep ca.key offline)",
                dir.display()
            );
            Ok(())
        }
        Command::IssueNode { name, out } => {
            let dir = remote::identity_dir(target.identity.as_deref());
            edged_control::identity::issue_node_files(&dir, &name, &out)?;
            println!("issued node certificate {name} into {}", out.display());
            Ok(())
        }
        Command::Push(args) => {
            runtime()?.block_on(remote::push(&target, &cli.cache, &cli.registry, args))
        }
        Command::Publish(args) => {
            runtime()?.block_on(oci::publish(&target, &cli.cache, &cli.registry, args))
        }
        Command::Deploy(args) => runtime()?.block_on(oci::deploy(&target, &cli.registry, args)),
        Command::Ls => runtime()?.block_on(remote::simple(&target, Request::List {})),
        Command::Status => runtime()?.block_on(remote::simple(&target, Request::Status {})),
        Command::Activate { id, fleet } => {
            let (name, version) = remote::parse_id(&id)?;
            if fleet.fleet {
                return runtime()?.block_on(fleet::activate(
                    &target,
                    &name,
                    Some(version),
                    fleet.sequence,
                    fleet.reset,
                ));
            }
            runtime()?.block_on(remote::simple(&target, Request::Activate { name, version }))
        }
        Command::Rollback { name, fleet } => {
            if fleet.fleet {
                return runtime()?.block_on(fleet::activate(
                    &target,
                    &name,
                    None,
                    fleet.sequence,
                    fleet.reset,
                ));
            }
            runtime()?.block_on(remote::simple(&target, Request::Rollback { name }))
        }
        Command::Invoke {
            name,
            path,
            method,
            data,
        } => runtime()?.block_on(remote::simple(
            &target,
            Request::Invoke {
                name,
                method,
                path,
                body: data.unwrap_or_default().into_bytes(),
            },
        )),
        Command::Rm { id } => {
            let (name, version) = remote::parse_id(&id)?;
            runtime()?.block_on(remote::simple(&target, Request::Remove { name, version }))
        }
        Command::Cache(command) => cache_command(&cli.cache, command),
    }
}

fn cache_command(args: &build::CacheArgs, command: CacheCommand) -> Result<()> {
    let cache = build::CacheArgs {
        no_cache: false,
        ..args.clone()
    }
    .open()
    .ok_or_else(|| anyhow::anyhow!("no cache directory; set EDGECTL_CACHE_DIR"))?;
    let (verb, dropped) = match command {
        CacheCommand::Info => {
            let usage = cache.usage()?;
            println!("compile cache {}", cache.dir().display());
            println!(
                "  {} entries, {:.1} MB (pruned to {} MB after a build that adds to it)",
                usage.entries,
                usage.bytes as f64 / 1e6,
                cache::DEFAULT_MAX_BYTES >> 20
            );
            return Ok(());
        }
        CacheCommand::Prune { max_mb } => ("pruned", cache.prune(max_mb << 20)?),
        CacheCommand::Clear => ("cleared", cache.clear()?),
    };
    println!(
        "{verb} {}: dropped {} entries, {:.1} MB",
        cache.dir().display(),
        dropped.entries,
        dropped.bytes as f64 / 1e6
    );
    Ok(())
}
