//! The running node, start to finish: wires the parts together, then accepts HTTP connections
//! until SIGTERM/SIGINT, re-reads the config on SIGHUP, and drains.
//!
//! This is the only module that knows every part; each part gets what it needs from here
//! (handles, channels, its metrics) and nothing reaches back up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use edged_node_config::{ControlConfig, NodeConfig, RegistryConfig, SyncConfig};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::control::{ControlIdentity, ControlServer, PeerLinks};
use crate::deployments::Deployments;
use crate::epoch::EpochTicker;
use crate::events::SyncStatusSource;
use crate::housekeeping;
use crate::ingress::{AcceptBackoff, Ingress};
use crate::metrics::{self, OutcomeLabel};
use crate::notify;
use crate::piece_exchange::PieceExchange;
use crate::registry_origin::RegistryOrigin;
use crate::serving::Serving;
use crate::swarm::UploadConfig;
use crate::sync::Syncer;

/// Blobs served to peers at once when the node has no `[sync]` table (it still serves peers
/// that list it).
const DEFAULT_MAX_SERVING: usize = 2;

/// Runs the node on `config` until it is told to stop. `on_listening` gets the bound HTTP
/// address and, when the control plane is on, its QUIC address.
pub async fn run(
    config: NodeConfig,
    config_path: Option<PathBuf>,
    on_listening: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<()> {
    let mut registry = metrics::new_registry();
    let serving = Serving::open(config.clone(), &mut registry)?;
    let reloads = ReloadMetrics::register(&mut registry);
    serving.rebuild().await?;
    let control = match &config.control {
        Some(control) => Some(start_control(
            &serving,
            control,
            config.sync.as_ref(),
            config.registry.as_ref(),
            &mut registry,
        )?),
        None => None,
    };
    let control_addr = control.as_ref().map(|e| e.local_addr()).transpose()?;
    tokio::spawn(housekeeping::maintain(serving.store().clone()));
    tokio::spawn(crate::memory::give_back_periodically());
    let ticker = EpochTicker::start(
        serving.engine().clone(),
        config.epoch_tick,
        serving.epoch_clock(),
    );
    let listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_listen))?;
    let addr = listener.local_addr()?;
    let ready = Arc::new(AtomicBool::new(true));
    let ingress = Ingress::new(serving.clone(), registry, ready.clone());
    tracing::info!(%addr, functions = serving.functions().len(), "edged serving");
    on_listening(addr, control_addr);
    notify::ready();
    let watchdog = notify::spawn_watchdog(ready.clone(), addr);

    let graceful = GracefulShutdown::new();
    let mut accept_backoff = AcceptBackoff::default();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if accept_backoff.succeeded() {
                        tracing::info!("accepting connections again");
                    }
                    ingress.serve_connection(stream, peer, &graceful);
                }
                Err(e) => {
                    let decision = accept_backoff.failed(Instant::now());
                    if let Some(failures) = decision.log {
                        tracing::warn!(error = %e, failures, pause = ?decision.pause, "accept failed; pausing the listener");
                    }
                    tokio::time::sleep(decision.pause).await;
                }
            },
            _ = sighup.recv() => {
                // Off the accept path: the old function set serves (and new connections are
                // accepted) while the new one compiles.
                let (serving, path, reloads) = (serving.clone(), config_path.clone(), reloads.clone());
                tokio::spawn(async move {
                    notify::reloading();
                    match reload(&serving, path.as_deref(), &reloads).await {
                        Ok(()) => tracing::info!(functions = serving.functions().len(), "config reloaded"),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the running config"),
                    }
                    notify::ready();
                });
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    notify::stopping();
    ready.store(false, Ordering::SeqCst);
    drop(listener);
    if let Some(endpoint) = &control {
        endpoint.close(0u32.into(), b"node stopping");
    }
    let drain = config.drain_timeout;
    tracing::info!(?drain, "draining in-flight requests");
    let started = Instant::now();
    let drained = tokio::time::timeout(drain, async {
        graceful.shutdown().await;
        serving.guest_tasks().close();
        serving.guest_tasks().wait().await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!(took = ?started.elapsed(), "drained; exiting"),
        Err(_) => tracing::warn!("drain timeout reached; exiting with requests in flight"),
    }
    watchdog.abort();
    ticker.stop();
    Ok(())
}

/// Binds the QUIC control endpoint and starts the control server and, with `[sync]`, the
/// syncer on it. Returns the endpoint.
fn start_control(
    serving: &Arc<Serving>,
    control: &ControlConfig,
    sync: Option<&SyncConfig>,
    oci: Option<&RegistryConfig>,
    registry: &mut Registry,
) -> Result<quinn::Endpoint> {
    let identity = ControlIdentity::load(control)?;
    let endpoint = identity.bind(control.listen)?;
    let deployments = Deployments::new(serving.clone(), identity.trusted.clone());
    let (news, news_rx) = mpsc::unbounded_channel();
    let origin = oci
        .map(|oci| RegistryOrigin::new(deployments.clone(), oci, registry))
        .transpose()?;
    // Pieces are 256 KiB where a whole-blob slot is a whole blob: three piece uploads per
    // `max_uploads` keep a node's links busy while bounding what it has in flight to peers.
    let max_serving = sync.map_or(DEFAULT_MAX_SERVING, |s| s.max_uploads);
    let exchange = PieceExchange::new(UploadConfig {
        max_uploads: 3 * max_serving,
        ..UploadConfig::default()
    });
    tokio::spawn(exchange.clone().run());
    let syncer = match sync {
        Some(sync) => Some(Syncer::new(
            deployments.clone(),
            endpoint.clone(),
            identity.client_config()?,
            sync.clone(),
            origin.clone(),
            exchange.clone(),
            registry,
        )),
        None => None,
    };
    let server = ControlServer::new(
        deployments,
        identity.node_name.clone(),
        max_serving,
        PeerLinks {
            news,
            sync_status: syncer.clone().map(|s| s as Arc<dyn SyncStatusSource>),
            exchange,
        },
        origin,
        registry,
    );
    if let Some(syncer) = syncer {
        tokio::spawn(syncer.run(news_rx));
    }
    tokio::spawn(server.serve(endpoint.clone()));
    Ok(endpoint)
}

/// Re-reads the config file and swaps in the new function set. A config that does not parse,
/// or a function that fails to deploy, leaves the running set untouched.
async fn reload(serving: &Serving, path: Option<&Path>, reloads: &ReloadMetrics) -> Result<()> {
    let Some(path) = path else {
        anyhow::bail!("running on the embedded default config; nothing to reload");
    };
    let result = async {
        let new = NodeConfig::load(path)?;
        let old = serving.config();
        if new.http_listen != old.http_listen
            || new.state_dir != old.state_dir
            || new.engine != old.engine
            || new.control != old.control
            || new.sync != old.sync
        {
            tracing::warn!(
                "http_listen, state_dir, [engine], [control] and [sync] changes take effect \
                 only after a restart"
            );
        }
        serving.apply_config(new).await
    }
    .await;
    reloads.count(if result.is_ok() { "ok" } else { "refused" });
    result
}

/// Configuration reloads by outcome.
#[derive(Clone)]
struct ReloadMetrics {
    reloads: Family<OutcomeLabel, Counter>,
}

impl ReloadMetrics {
    fn register(registry: &mut Registry) -> ReloadMetrics {
        let reloads = Family::default();
        registry.register(
            "reloads",
            "Configuration reloads, by outcome",
            Family::clone(&reloads),
        );
        ReloadMetrics { reloads }
    }

    fn count(&self, outcome: &str) {
        self.reloads
            .get_or_create(&OutcomeLabel::new(outcome))
            .inc();
    }
}
