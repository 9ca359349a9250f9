//! Talking to a node over the QUIC control plane: push (offer → blobs → commit, resumable,
//! with a progress bar), list, status, activate, rollback, invoke, remove.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use edged_artifacts::{InstanceReuse, Manifest};
use edged_control::FleetIdentity;
use edged_control::identity::NODE_SERVER_NAME;
use edged_control::pacing::Pacer;
use edged_control::signing::{SignedManifest, sequence_label, signing_key_from_hex};
use edged_control::transport::{read_frame, write_frame};
use edged_control::wire::{Request, Response};
use indicatif::{ProgressBar, ProgressStyle};

use crate::build::{
    Built, BuiltChain, CacheArgs, CompileArgs, compile_input, deployment_name, now_secs,
    print_steps,
};

/// Where to reach a node and who we are.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Node control address (QUIC).
    #[arg(
        long,
        env = "EDGECTL_NODE",
        default_value = "127.0.0.1:7443",
        global = true
    )]
    pub node: String,
    /// Identity directory from `edgectl init` (ca.pem, operator.pem/.key, signing.key).
    #[arg(long, env = "EDGECTL_IDENTITY", global = true)]
    pub identity: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// QUIC congestion controller for the connection to the node: bbr (default: holds the
    /// link rate through random loss), cubic or newreno.
    #[arg(long, env = "EDGECTL_CONGESTION", default_value = "bbr", global = true)]
    pub congestion: edged_control::Congestion,
}

pub fn identity_dir(explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(dir) => dir.to_path_buf(),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".config/edgectl"),
    }
}

pub struct Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Client {
    pub async fn connect(target: &Target) -> Result<Client> {
        let dir = identity_dir(target.identity.as_deref());
        let fleet = FleetIdentity::load(&dir, "operator")
            .with_context(|| {
                format!(
                    "loading the operator identity from {} (edgectl init)",
                    dir.display()
                )
            })?
            .with_congestion(target.congestion);
        let addr: SocketAddr = tokio::net::lookup_host(&target.node)
            .await
            .with_context(|| format!("resolving {}", target.node))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", target.node))?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()?;
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(fleet.client_config()?);
        let conn = endpoint
            .connect(addr, NODE_SERVER_NAME)?
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(Client {
            _endpoint: endpoint,
            conn,
        })
    }

    /// One request, one response.
    pub async fn call(&self, request: &Request) -> Result<Response> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(&mut send, request).await?;
        send.finish()?;
        let response: Response = read_frame(&mut recv)
            .await
            .context("reading the node's answer")?;
        match response {
            Response::Error { message } => bail!("node refused: {message}"),
            other => Ok(other),
        }
    }

    /// Sends `bytes` as blob `hash` of `manifest_id`, starting at `offset`, paced by `pacer`.
    /// `progress` advances as bytes leave.
    async fn put_blob(
        &self,
        manifest_id: &str,
        hash: &str,
        bytes: &[u8],
        offset: u64,
        pacer: &Pacer,
        progress: &ProgressBar,
    ) -> Result<()> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &Request::PutBlob {
                manifest_id: manifest_id.into(),
                hash: hash.into(),
                offset,
            },
        )
        .await?;
        let sent: Result<()> = async {
            for chunk in bytes[offset as usize..].chunks(256 << 10) {
                send.write_all(chunk).await?;
                progress.inc(chunk.len() as u64);
                pacer.moved_async(chunk.len() as u64).await;
            }
            send.finish()?;
            Ok(())
        }
        .await;
        // A node that stops reading early (refusal, or the blob finished on another stream)
        // still answers: its answer says more than our "stopped by peer".
        match (read_frame::<Response>(&mut recv).await, sent) {
            (Ok(Response::Stored { .. }), _) => Ok(()),
            (Ok(Response::Error { message }), _) => bail!("node refused blob {hash}: {message}"),
            (Ok(other), _) => bail!("unexpected answer to a blob: {other:?}"),
            (Err(_), Err(send_error)) => Err(send_error.context(format!("sending blob {hash}"))),
            (Err(read_error), Ok(())) => Err(anyhow::Error::from(read_error)
                .context(format!("reading the node's answer to blob {hash}"))),
        }
    }
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// The .wasm (or .wat) to deploy, or a component in a registry: oci://REGISTRY/REPO:TAG
    /// (CNCF Wasm layout, e.g. pushed with `wkg oci push`).
    pub input: PathBuf,
    /// Deployment name (default: the input's file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Version (default: one more than the newest the node holds).
    #[arg(long)]
    pub version: Option<u64>,
    /// Route prefix (default: /<name>).
    #[arg(long)]
    pub route: Option<String>,
    /// Requests one instance may serve before it is dropped (1: a fresh instance per request).
    /// Default: the guest kind's (fresh for wasi:http 0.2, 128 for wasi:http 0.3).
    #[arg(long, value_name = "N")]
    pub reuse: Option<u64>,
    /// Requests one wasi:http 0.3 instance may serve at once (default 16).
    #[arg(long, value_name = "N")]
    pub reuse_concurrent: Option<u64>,
    /// A wasi:http 0.3 middleware to put in front of the input (repeat; outermost first): the
    /// parts are composed into one component, the input last, and pushed as one deployment.
    #[arg(long, value_name = "WASM")]
    pub middleware: Vec<PathBuf>,
    /// Milliseconds an idle reused instance is kept (default 1000).
    #[arg(long, value_name = "MS")]
    pub reuse_idle_ms: Option<u64>,
    /// Store without activating.
    #[arg(long)]
    pub no_activate: bool,
    /// Bandwidth cap for this push, in MB/s (flaky or metered links).
    #[arg(long, value_name = "MB_PER_S")]
    pub max_rate: Option<f64>,
    #[command(flatten)]
    pub compile: CompileArgs,
}

pub async fn push(
    target: &Target,
    cache: &CacheArgs,
    registry: &crate::oci::RegistryArgs,
    args: PushArgs,
) -> Result<()> {
    if !args.middleware.is_empty()
        && let Some(reference) = std::iter::once(&args.input)
            .chain(&args.middleware)
            .find(|p| crate::oci::is_reference(p))
    {
        bail!(
            "{}: a chain is composed from local files; --middleware cannot take a part from a \
             registry yet (download it first)",
            reference.display()
        );
    }
    let name = if crate::oci::is_reference(&args.input) && args.name.is_none() {
        crate::oci::name_from_reference(&args.input.to_string_lossy())?
    } else {
        deployment_name(&args.input, args.name.as_deref())?
    };
    let dir = identity_dir(target.identity.as_deref());
    let key_path = dir.join("signing.key");
    let key = signing_key_from_hex(
        &std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?,
    )
    .map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
    let BuiltChain {
        built: Built { compiled, steps },
        parts,
    } = if args.middleware.is_empty() {
        BuiltChain {
            built: crate::oci::push_input(&args.input, &args.compile, cache, registry).await?,
            parts: Vec::new(),
        }
    } else {
        compile_input(
            &args.input,
            &args.middleware,
            &args.compile,
            cache.open().as_ref(),
        )?
    };
    if !target.json {
        println!(
            "built {name} ({}, {} targets)",
            compiled.guest,
            compiled.artifacts.len()
        );
        print_steps(&steps);
    }
    let client = Client::connect(target).await?;
    let version = match args.version {
        Some(v) => v,
        None => match client.call(&Request::List {}).await? {
            Response::Deployments { items } => {
                items
                    .iter()
                    .filter(|d| d.name == name)
                    .map(|d| d.version)
                    .max()
                    .unwrap_or(0)
                    + 1
            }
            other => bail!("unexpected answer to list: {other:?}"),
        },
    };
    let mut manifest = if parts.is_empty() {
        Manifest::from_compiled(&name, version, now_secs(), &compiled)
    } else {
        Manifest::from_chain(&name, version, now_secs(), &compiled, &parts)
    };
    manifest.route = args.route.clone();
    let reuse = InstanceReuse {
        requests: args.reuse,
        concurrent: args.reuse_concurrent,
        idle_timeout_ms: args.reuse_idle_ms,
    };
    manifest.instances = (reuse != InstanceReuse::default()).then_some(reuse);
    let id = manifest.id();
    let signed = SignedManifest::sign(manifest, &key);

    let needed = match client
        .call(&Request::Offer {
            manifest: Box::new(signed),
        })
        .await?
    {
        Response::Needed { blobs } => blobs,
        other => bail!("unexpected answer to an offer: {other:?}"),
    };
    let mut by_hash: HashMap<String, &[u8]> = HashMap::new();
    by_hash.insert(
        edged_compiler::content_hash(&compiled.source),
        &compiled.source,
    );
    for a in &compiled.artifacts {
        by_hash.insert(a.blake3.clone(), &a.bytes);
    }
    for p in &parts {
        by_hash.insert(p.blake3.clone(), &p.source);
    }
    let total: u64 = needed.iter().map(|n| n.blob.size - n.have).sum();
    let resumed: u64 = needed.iter().map(|n| n.have).sum();
    let progress = if target.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("pushing {id}"));
        bar
    };
    // All needed blobs at once, each on its own stream: the node fsyncs and checks one while
    // the next is still arriving, and a slow disk does not idle the link.
    let pacer = Pacer::new(args.max_rate.map(|mb| (mb * 1e6) as u64));
    let started = Instant::now();
    let uploads = needed.iter().map(|need| {
        let (client, id, progress, pacer) = (&client, &id, &progress, &pacer);
        let bytes = by_hash.get(&need.blob.blake3).copied();
        async move {
            let bytes = bytes.ok_or_else(|| {
                anyhow!(
                    "node asked for blob {} this push does not have",
                    need.blob.blake3
                )
            })?;
            client
                .put_blob(id, &need.blob.blake3, bytes, need.have, pacer, progress)
                .await
        }
    });
    futures_util::future::try_join_all(uploads).await?;
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let committed = client
        .call(&Request::Commit {
            manifest_id: id.clone(),
            activate: !args.no_activate,
        })
        .await?;
    let active = matches!(committed, Response::Committed { active: true, .. });
    let rate = total as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6;
    if target.json {
        println!(
            "{}",
            serde_json::json!({
                "deployment": id, "active": active, "sent_bytes": total, "resumed_bytes": resumed,
                "blobs_sent": needed.len(), "seconds": elapsed.as_secs_f64(), "mb_per_s": rate,
                "steps": steps,
            })
        );
    } else {
        println!(
            "pushed {id}{}: sent {total} bytes in {} blobs in {:.2} s ({rate:.1} MB/s); {resumed} bytes were already on the node",
            if active { " (active)" } else { "" },
            needed.len(),
            elapsed.as_secs_f64(),
        );
    }
    Ok(())
}

pub async fn simple(target: &Target, request: Request) -> Result<()> {
    let client = Client::connect(target).await?;
    let response = client.call(&request).await?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(());
    }
    match response {
        Response::Deployments { items } => {
            println!(
                "{:<24} {:>8} {:<7} {:<15} {:<24} {:<18} {:<22} SIGNER",
                "NAME", "VERSION", "ACTIVE", "KIND", "ROUTE", "FLEET RECORD", "COW IMAGE"
            );
            for d in items {
                // The fleet activation record the name follows: `#sequence -> version`.
                let fleet = d
                    .fleet_record
                    .map(|r| format!("#{} -> v{}", sequence_label(r.epoch, r.sequence), r.version))
                    .unwrap_or_default();
                println!(
                    "{:<24} {:>8} {:<7} {:<15} {:<24} {:<18} {:<22} {}",
                    d.name,
                    d.version,
                    if d.active { "*" } else { "" },
                    d.kind,
                    d.route,
                    fleet,
                    crate::build::cow_column(d.memory_image.as_ref()),
                    d.signer.unwrap_or_else(|| "(local config)".into())
                );
                if !d.parts.is_empty() {
                    let chain: Vec<String> = d
                        .parts
                        .iter()
                        .map(|p| {
                            format!(
                                "{} ({}, {})",
                                p.name,
                                p.role,
                                &p.blake3[..12.min(p.blake3.len())]
                            )
                        })
                        .collect();
                    println!("  chain: {}", chain.join(" -> "));
                }
            }
        }
        Response::Status { status } => {
            println!("node        {}", status.node);
            println!("version     {}", status.version);
            println!("target      {}", status.target);
            println!("fingerprint {}", status.fingerprint);
            println!("serving     {} functions", status.functions_serving);
            println!(
                "store       {} blobs, {} bytes",
                status.blobs, status.store_bytes
            );
            if let Some(registry) = &status.registry {
                println!("registry    {registry}");
            }
            if let Some(sync) = &status.sync {
                print_sync(sync);
            }
        }
        Response::Done { message } => println!("{message}"),
        Response::Invoked { status, body } => {
            use std::io::Write;
            eprintln!("HTTP {status}");
            std::io::stdout().write_all(&body)?;
            if !(200..300).contains(&status) {
                std::process::exit(1);
            }
        }
        other => println!("{other:?}"),
    }
    Ok(())
}

fn print_sync(sync: &edged_control::wire::SyncStatus) {
    println!(
        "sync        fetched {} bytes, served {} bytes",
        sync.fetched_bytes, sync.served_bytes
    );
    for peer in &sync.peers {
        let seen = peer
            .last_seen_ms
            .map_or("never answered".to_string(), |ms| {
                format!("seen {ms} ms ago")
            });
        println!(
            "  peer {:<22} {:<12} {}{}{}",
            peer.addr,
            peer.node.as_deref().unwrap_or("?"),
            seen,
            if peer.learned { ", learned" } else { "" },
            if peer.penalised { ", PENALISED" } else { "" },
        );
        if let Some(error) = &peer.last_error {
            println!("       last error: {error}");
        }
    }
    for d in &sync.deployments {
        println!(
            "  {}@{}  here: {}  peers: {}{}",
            d.name,
            d.version,
            if d.here { "yes" } else { "no" },
            if d.peers.is_empty() {
                "-".to_string()
            } else {
                d.peers.join(", ")
            },
            d.fleet_record
                .map(|r| format!(
                    "  follows fleet record #{} (v{})",
                    sequence_label(r.epoch, r.sequence),
                    r.version
                ))
                .unwrap_or_default()
        );
    }
    for t in &sync.transfers {
        let blob = &t.blob[..12.min(t.blob.len())];
        let percent = 100.0 * t.have as f64 / t.size.max(1) as f64;
        match &t.pieces {
            Some(p) => {
                let from: Vec<String> = p
                    .from
                    .iter()
                    .map(|(peer, n)| format!("{peer} {n}"))
                    .collect();
                println!(
                    "  fetching {} blob {blob}…: {} of {} pieces, {} of {} bytes ({percent:.0}%) at {:.2} MB/s; from {}",
                    t.deployment,
                    p.held,
                    p.total,
                    t.have,
                    t.size,
                    p.rate as f64 / 1e6,
                    if from.is_empty() {
                        "nobody yet".to_string()
                    } else {
                        from.join(", ")
                    }
                );
            }
            None => println!(
                "  fetching {} blob {blob}… from {}: {} of {} bytes ({percent:.0}%)",
                t.deployment, t.peer, t.have, t.size
            ),
        }
    }
}

/// `name@version`.
pub fn parse_id(id: &str) -> Result<(String, u64)> {
    let (name, version) = id
        .split_once('@')
        .ok_or_else(|| anyhow!("expected NAME@VERSION, got `{id}`"))?;
    Ok((
        name.to_string(),
        version
            .parse()
            .with_context(|| format!("version in `{id}`"))?,
    ))
}
