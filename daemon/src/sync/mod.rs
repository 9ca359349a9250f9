//! Peer sync: a node converges on the fleet's signed deployments by fetching what it lacks from
//! other nodes, so an operator pushes to one node and every node serves the new version.
//!
//! This file is the tokio shell: rounds, connections, requests. The decisions (backoff,
//! penalties, what is wanted, which holder next) are the sans-IO [`policy`] core's; fetching one
//! blob is [`fetch`]'s.
//!
//! Every `interval`, and at once when a peer announces something new, the syncer asks each peer
//! for its holdings. For each deployment newer than any this node has seen for its name, it
//! takes the signed manifest from a peer and admits it exactly as a push is admitted (trusted
//! signer, newer version) — a peer is never trusted for content. Then it fetches the blobs it
//! needs (the source, and the artifact for this node's target and engine fingerprint) as Bao
//! slices verified chunk by chunk. When no peer holds an artifact for this node's fingerprint,
//! the node compiles one from the verified source when it first serves the deployment.
//!
//! Peers are the configured addresses plus every node that connects to this one (the syncer
//! dials from the control endpoint, so an inbound node connection comes from its listen address).
//!
//! A deployment a peer says is published in an OCI registry (and this node has that registry
//! as its `[registry]`) has the registry as the holder of last resort for its blobs: when no
//! usable peer holds a blob or is getting it, [`RegistryOrigin`] pulls it, checked the same way.

mod fetch;
pub mod policy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use edged_artifacts::BlobKind;
use edged_control::identity::{NODE_SERVER_NAME, common_name, peer_certificates};
use edged_control::pacing::Pacer;
use edged_control::signing::SignedManifest;
use edged_control::transport::{read_frame, write_frame};
use edged_control::verified::piece_count;
use edged_control::wire::{
    DeploymentSpread, PartialBlob, PieceProgress, Request, Response, SyncStatus, TransferStatus,
};
use edged_node_config::SyncConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc};

use crate::deployments::Deployments;
use crate::events::{DeploymentEvent, DeploymentSource, PeerNews, SyncStatusSource};
use crate::lock::lock;
use crate::metrics::{OutcomeLabel, PeerLabel};
use crate::piece_exchange::PieceExchange;
use crate::registry_origin::RegistryOrigin;
use crate::swarm::PieceSet;
use policy::{AfterRefusal, BlobPlan, PeerTable};

/// Whole pieces in `have` verified bytes of a `size`-byte blob (only the last piece is short).
/// A peer that does not answer a request within this long is skipped for the round.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// While a blob is fetched piecewise, holdings (who has which pieces) are asked for at most
/// this often. New pieces are news at once through have messages; the refresh is how a node
/// learns of whole blobs, peers that joined, and peers that stopped answering. Each refresh of
/// an origin peered with N nodes costs it N holdings answers of upload, so not every second.
const SWARM_REFRESH: Duration = Duration::from_secs(3);

pub struct Syncer {
    deployments: Arc<Deployments>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    config: SyncConfig,
    table: Mutex<PeerTable>,
    /// Live connections by peer address.
    conns: Mutex<HashMap<String, quinn::Connection>>,
    wake: Notify,
    transfers: Semaphore,
    pacer: Pacer,
    /// One fetch per blob at a time (deployments may share blobs).
    blob_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Transfers in progress by blob hash, for status.
    in_progress: Mutex<BTreeMap<String, Transfer>>,
    /// Names whose deployments a task is syncing now.
    names_in_sync: Mutex<HashSet<String>>,
    fetched_bytes: AtomicU64,
    metrics: SyncMetrics,
    /// The `[registry]` this node pulls from, if any.
    origin: Option<Arc<RegistryOrigin>>,
    /// What this node holds in part and what its peers hold (shared with the control server).
    exchange: Arc<PieceExchange>,
    /// When holdings were last asked for by [`Syncer::refresh_holdings_soon`].
    holdings_refreshed: Mutex<Option<Instant>>,
    /// A peer's have message told of a piece it did not advertise before: piecewise fetches
    /// look at their holders again.
    pieces_heard: Notify,
}

struct Transfer {
    deployment: String,
    peer: String,
    have: Arc<AtomicU64>,
    size: u64,
    /// Pieces received so far by peer, and when the fetch started (the piece exchange).
    sources: Arc<Mutex<BTreeMap<String, u32>>>,
    started: Instant,
    held_at_start: u64,
}

impl Syncer {
    pub fn new(
        deployments: Arc<Deployments>,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        config: SyncConfig,
        origin: Option<Arc<RegistryOrigin>>,
        exchange: Arc<PieceExchange>,
        registry: &mut Registry,
    ) -> Arc<Syncer> {
        Arc::new(Syncer {
            table: Mutex::new(PeerTable::new(&config.peers)),
            transfers: Semaphore::new(config.max_transfers),
            pacer: Pacer::new(config.max_rate_bytes),
            deployments,
            endpoint,
            client_config,
            config,
            conns: Mutex::default(),
            wake: Notify::new(),
            blob_locks: Mutex::default(),
            in_progress: Mutex::default(),
            names_in_sync: Mutex::default(),
            fetched_bytes: AtomicU64::new(0),
            metrics: SyncMetrics::register(registry),
            origin,
            exchange,
            holdings_refreshed: Mutex::new(None),
            pieces_heard: Notify::new(),
        })
    }

    /// Runs sync rounds forever: at start, every interval, and when woken by news from the
    /// control server or a push committed here.
    pub async fn run(self: Arc<Self>, mut news: mpsc::UnboundedReceiver<PeerNews>) {
        let mut events = self.deployments.subscribe();
        let listener = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    heard = news.recv() => match heard {
                        Some(PeerNews::Connected { addr, node_name }) => listener.learn_peer(addr, &node_name),
                        Some(PeerNews::Announced) => listener.wake.notify_one(),
                        Some(PeerNews::Has { node_name, hash, size, index }) => {
                            if listener.table().record_piece(&node_name, &hash, size, index) {
                                listener.pieces_heard.notify_waiters();
                            }
                        }
                        None => return,
                    },
                    event = events.recv() => match event {
                        Ok(DeploymentEvent::Committed { source: DeploymentSource::Push | DeploymentSource::Registry, .. })
                        | Ok(DeploymentEvent::FleetRecordApplied { .. }) => listener.announce(),
                        // Sync announces what it stored itself, once it is activated.
                        Ok(DeploymentEvent::Committed { source: DeploymentSource::Sync, .. }) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => listener.announce(),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        // While pieces move (this node fetching, or serving peers), holdings are refreshed
        // every `SWARM_REFRESH`, so fetchers see each other's new pieces and an origin sees
        // who holds what it seeds.
        let swarm = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWARM_REFRESH).await;
                let busy = !lock(&swarm.in_progress).is_empty() || swarm.exchange.uploading();
                if busy {
                    swarm.refresh_holdings_soon().await;
                }
            }
        });
        let mut interval = tokio::time::interval(self.config.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = self.wake.notified() => {}
            }
            self.round().await;
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, PeerTable> {
        lock(&self.table)
    }

    /// Adds a node that connected to this one as a peer (if it is not one already).
    fn learn_peer(&self, addr: SocketAddr, node_name: &str) {
        let key = addr.to_string();
        let known_as = lock(&self.conns)
            .iter()
            .find(|(_, conn)| conn.remote_address() == addr)
            .map(|(k, _)| k.clone());
        if self.table().learn(&key, known_as.as_deref(), node_name) {
            tracing::info!(peer = %key, node = node_name, "learned a sync peer");
        }
    }

    /// Tells every peer this node holds something new, so they fetch it now rather than at
    /// their next interval.
    fn announce(self: &Arc<Self>) {
        self.tell_peers(Request::Announce {});
    }

    /// Tells every peer this node verified piece `index` of blob `hash` (a have message):
    /// fetchers of the blob may ask for it now, and its origin sends the piece's next asker
    /// here.
    fn tell_have(self: &Arc<Self>, hash: &str, size: u64, index: u32) {
        self.tell_peers(Request::Have {
            hash: hash.to_string(),
            size,
            index,
        });
    }

    /// Sends `request` to every peer not backing off, each on its own task; an answer is only
    /// logged.
    fn tell_peers(self: &Arc<Self>, request: Request) {
        for addr in self.table().to_ask(Instant::now()) {
            let (syncer, request) = (self.clone(), request.clone());
            tokio::spawn(async move {
                if let Err(e) = syncer.call(&addr, &request).await {
                    tracing::debug!(peer = %addr, error = %format!("{e:#}"), ?request, "not delivered");
                }
            });
        }
    }

    /// The peer's connection, reusing a live one.
    async fn connection(&self, addr: &str) -> Result<quinn::Connection> {
        if let Some(conn) = lock(&self.conns).get(addr).cloned()
            && conn.close_reason().is_none()
        {
            return Ok(conn);
        }
        let resolved = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving {addr}"))?
            .next()
            .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
        if Some(resolved) == self.endpoint.local_addr().ok() {
            bail!("{addr} is this node");
        }
        let connecting =
            self.endpoint
                .connect_with(self.client_config.clone(), resolved, NODE_SERVER_NAME)?;
        let conn = tokio::time::timeout(REQUEST_TIMEOUT, connecting)
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        if let Some(name) =
            peer_certificates(&conn).and_then(|certs| certs.first().map(common_name))
        {
            self.table().set_node_name(addr, name);
        }
        lock(&self.conns).insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    /// One request, one answer, within [`REQUEST_TIMEOUT`].
    async fn call(&self, addr: &str, request: &Request) -> Result<Response> {
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let conn = self.connection(addr).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, request).await?;
            send.finish()?;
            let response: Response = read_frame(&mut recv).await?;
            match response {
                Response::Error { message } => bail!("{addr} refused: {message}"),
                other => Ok(other),
            }
        })
        .await
        .map_err(|_| anyhow!("{addr} did not answer within {REQUEST_TIMEOUT:?}"))?
    }

    fn newest_seen(&self) -> impl Fn(&str) -> u64 + '_ {
        let store = self.deployments.store();
        move |name| store.newest_version_seen(name).unwrap_or(0)
    }

    /// Asks every peer for its holdings (concurrently) and records the answers. Waits for all of
    /// them, but once one has answered, for at most [`policy::HOLDINGS_PATIENCE`] more: a peer that
    /// stopped answering must not hold every round up for the full request timeout. Its answer,
    /// if it still comes, is recorded, and starts a round if it holds something new.
    async fn refresh_holdings(self: &Arc<Self>) {
        use futures_util::StreamExt;
        let round_moved_on = Arc::new(AtomicBool::new(false));
        let mut answers: futures_util::stream::FuturesUnordered<_> = self
            .table()
            .to_ask(Instant::now())
            .into_iter()
            .map(|addr| {
                let (syncer, round_moved_on) = (self.clone(), round_moved_on.clone());
                tokio::spawn(async move {
                    let answer = match syncer.call(&addr, &Request::Holdings {}).await {
                        Ok(Response::Holdings {
                            items,
                            activations,
                            partial,
                        }) => {
                            syncer.learn_pieces(&addr, &items, &partial);
                            let mut table = syncer.table();
                            table.record_activations(&addr, activations);
                            table.record_partial(&addr, partial);
                            Ok(items)
                        }
                        Ok(other) => Err(format!("unexpected answer to holdings: {other:?}")),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    if answer.is_err() {
                        let table = syncer.table();
                        if let Some(node) = table.node_name(&addr) {
                            syncer.exchange.peer_lost(node);
                        }
                    }
                    let outcome = {
                        let mut table = syncer.table();
                        let outcome = table.record_holdings(
                            &addr,
                            answer,
                            Instant::now(),
                            syncer.newest_seen(),
                        );
                        syncer.metrics.peers_reachable.set(table.reachable() as i64);
                        outcome
                    };
                    if outcome.news && round_moved_on.load(Ordering::SeqCst) {
                        syncer.wake.notify_one();
                    }
                    outcome.answered
                })
            })
            .collect();
        let started = Instant::now();
        let mut any_answered = false;
        loop {
            let patience =
                policy::holdings_wait(any_answered, started, Instant::now(), REQUEST_TIMEOUT);
            match tokio::time::timeout(patience, answers.next()).await {
                Ok(Some(answered)) => any_answered |= answered.unwrap_or(false),
                Ok(None) | Err(_) => break,
            }
        }
        round_moved_on.store(true, Ordering::SeqCst);
    }

    /// Tells the piece exchange what a peer holds of the blobs this node serves (whole or in
    /// part): the origin's super-seeding sends a piece elsewhere when another node has it.
    fn learn_pieces(
        &self,
        addr: &str,
        items: &[edged_control::wire::Holding],
        partial: &[PartialBlob],
    ) {
        let Some(node) = self.table().node_name(addr).map(str::to_string) else {
            return;
        };
        let store = self.deployments.store();
        for blob in partial {
            if let Ok(set) = PieceSet::from_hex(piece_count(blob.size), &blob.pieces) {
                self.exchange.peer_holdings(&blob.hash, &node, &set);
            }
        }
        let whole: HashSet<&String> = items.iter().flat_map(|h| &h.blobs).collect();
        for hash in whole {
            if let Ok(Some(meta)) = store.blob_meta(hash) {
                let full = PieceSet::full(piece_count(meta.size));
                self.exchange.peer_holdings(hash, &node, &full);
            }
        }
    }

    /// Refreshes holdings unless that happened within `SWARM_REFRESH`: while pieces move,
    /// fetchers learn each other's new pieces this often.
    async fn refresh_holdings_soon(self: &Arc<Self>) {
        {
            let mut at = lock(&self.holdings_refreshed);
            if at.is_some_and(|at| at.elapsed() < SWARM_REFRESH) {
                return;
            }
            *at = Some(Instant::now());
        }
        self.refresh_holdings().await;
    }

    /// One anti-entropy round: learn what every peer holds, apply newer fleet activation
    /// records, fetch what this node lacks.
    async fn round(self: &Arc<Self>) {
        self.metrics.rounds.inc();
        self.refresh_holdings().await;
        self.apply_fleet_records().await;
        let wanted = self.table().wanted(self.newest_seen(), |name| {
            edged_artifacts::manifest::validate_name(name).is_ok()
        });
        // Each name syncs in its own task, so a long transfer does not hold up the next round
        // (a newly pushed deployment of another name, a penalty, a new peer). The versions of
        // one name go in order, oldest first, so each passes the "newer than seen" check.
        let to_start = policy::names_to_sync(wanted, &mut lock(&self.names_in_sync));
        for (name, versions) in to_start {
            let syncer = self.clone();
            tokio::spawn(async move {
                let mut progressed = false;
                for version in versions {
                    let id = format!("{name}@{version}");
                    match syncer.sync_deployment(&name, version).await {
                        Ok(()) => {
                            syncer.metrics.deployment("stored");
                            progressed = true;
                        }
                        Err(e) => {
                            tracing::warn!(deployment = %id, error = %format!("{e:#}"), "sync of deployment failed; retrying next round");
                            syncer.metrics.deployment("failed");
                            break;
                        }
                    }
                }
                lock(&syncer.names_in_sync).remove(&name);
                if progressed {
                    // A newer version may have been announced meanwhile.
                    syncer.wake.notify_one();
                }
            });
        }
    }

    /// Applies the newest fleet activation record peers hold for each name, where it is newer
    /// than the one this node follows. A forged record penalises the peer that sent it.
    async fn apply_fleet_records(&self) {
        let current = |name: &str| {
            self.deployments
                .fleet_record(name)
                .ok()
                .flatten()
                .map_or((0, 0), |r| (r.payload.epoch, r.payload.sequence))
        };
        let newer = self.table().newer_records(current, Instant::now());
        for (addr, signed) in newer {
            let id = signed.payload.id();
            match self.deployments.apply_activation(&signed).await {
                Ok(applied) => {
                    tracing::info!(record = %id, peer = %addr, ?applied, "fleet record from a peer applied")
                }
                Err(refusal) if refusal.is_forgery() => self.penalise(&addr, &refusal.to_string()),
                Err(refusal) => {
                    tracing::warn!(record = %id, peer = %addr, "fleet record from a peer refused: {refusal}")
                }
            }
        }
    }

    /// Fetches, admits and stores one deployment; activates it if a peer serves it as active
    /// and it is newer than the version active here.
    async fn sync_deployment(self: &Arc<Self>, name: &str, version: u64) -> Result<()> {
        let id = format!("{name}@{version}");
        let (signed, from) = self.manifest_from_peers(name, version).await?;
        tracing::info!(deployment = %id, peer = %from, "syncing deployment from peers");
        // Peers see it as incomplete (and may take the blobs already here) until it is stored.
        let _syncing = self.deployments.begin_sync(&signed);
        let published = self.published(name, version);
        self.fetch_blobs(&signed, published.as_ref()).await?;
        // A synced version is activated when a peer serves it and it is newer than the one
        // active here (a push that spreads), or when the name's fleet record names it (`commit`).
        let active_at_peer = self.table().active_at_a_peer(name, version);
        let active_here = self.deployments.store().active_version(name)?;
        let activate = policy::activate_synced(active_at_peer, active_here, version);
        if let Some((_, text)) = &published {
            // Passed on: this node's peers may need the registry too.
            self.deployments
                .store()
                .put_published(name, version, text)?;
        }
        self.deployments
            .commit(&signed, DeploymentSource::Sync, activate)
            .await?;
        tracing::info!(deployment = %id, "deployment synced and stored");
        self.announce();
        Ok(())
    }

    /// The signed manifest of `name@version` from a peer holding it whole, admitted like a push:
    /// trusted signer, the name and version asked for, newer than any seen here. A peer whose
    /// manifest was tampered with is penalised.
    async fn manifest_from_peers(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(SignedManifest, String)> {
        let holders = self.table().manifest_holders(name, version, Instant::now());
        let mut last_error = anyhow!("no reachable peer holds {name}@{version}");
        for addr in holders {
            let request = Request::GetManifest {
                name: name.into(),
                version,
            };
            let signed = match self.call(&addr, &request).await {
                Ok(Response::Manifest { signed }) => signed,
                Ok(other) => {
                    last_error = anyhow!("{addr}: unexpected answer {other:?}");
                    continue;
                }
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            if let Some(reason) = policy::wrong_manifest(name, version, &signed) {
                self.penalise(&addr, &reason);
                continue;
            }
            let refusal = match self.deployments.admit(&signed) {
                Ok(()) => return Ok((signed, addr)),
                Err(refusal) => refusal,
            };
            match policy::after_refusal(refusal.is_forgery()) {
                AfterRefusal::PenaliseAndTryNext => {
                    self.penalise(&addr, &refusal.to_string());
                    last_error = refusal.into();
                }
                AfterRefusal::GiveUp => {
                    self.metrics.deployment("refused");
                    return Err(anyhow::Error::from(refusal)
                        .context(format!("manifest of {name}@{version} from {addr} refused")));
                }
            }
        }
        Err(last_error)
    }

    /// Where peers say `name@version` is published, if it is on this node's registry.
    fn published(&self, name: &str, version: u64) -> Option<(oci_client::Reference, String)> {
        let origin = self.origin.as_ref()?;
        let text = self.table().published_at(name, version, Instant::now())?;
        match origin.pinned(&text) {
            Ok(pinned) => Some((pinned, text)),
            Err(e) => {
                tracing::info!(deployment = %format!("{name}@{version}"), "not pulling from the registry peers name: {e:#}");
                None
            }
        }
    }

    /// Fetches the blobs of `signed` this node lacks, concurrently. An artifact for this node's
    /// target and fingerprint that no peer holds (and no registry, for a `published`
    /// deployment) is left out: the node compiles it from the source instead.
    async fn fetch_blobs(
        self: &Arc<Self>,
        signed: &SignedManifest,
        published: Option<&(oci_client::Reference, String)>,
    ) -> Result<()> {
        let id = signed.payload.id();
        let needed = self.deployments.needed_blobs(&signed.payload);
        let serving = self.deployments.serving();
        if signed
            .payload
            .artifact_for(serving.target(), serving.fingerprint())
            .is_none()
        {
            tracing::info!(
                deployment = %id,
                fingerprint = serving.fingerprint(),
                "the deployment ships no artifact for this node's engine; it will be compiled \
                 from the verified source"
            );
        }
        let results = futures_util::future::join_all(needed.into_values().map(|(blob, kind)| {
            let id = id.clone();
            async move {
                let plan = self.table().plan_blob(
                    &blob.blake3,
                    &kind,
                    serving.target(),
                    published.is_some(),
                    Instant::now(),
                );
                match plan {
                    BlobPlan::Fetch => {}
                    BlobPlan::CompileHere => {
                        tracing::info!(
                            deployment = %id,
                            artifact = %blob.blake3,
                            "no peer holds this node's artifact; it will be compiled from the \
                             verified source"
                        );
                        return Ok(());
                    }
                    BlobPlan::SkipRelay => {
                        if let BlobKind::Artifact { target, .. } = &kind {
                            tracing::info!(
                                deployment = %id,
                                artifact = %blob.blake3,
                                %target,
                                "no peer holds this artifact to relay; skipped"
                            );
                        }
                        return Ok(());
                    }
                }
                self.fetch_blob(&id, &blob, kind, published.map(|(pinned, _)| pinned))
                    .await
            }
        }))
        .await;
        results.into_iter().collect()
    }

    /// `addr` lied (bad data, a forged or wrong manifest): not fetched from for a while.
    fn penalise(&self, addr: &str, reason: &str) {
        self.report_penalty(addr, reason);
        self.table().penalise(addr, reason, Instant::now());
    }

    /// The log line and metric of a penalty (the peer table records it separately).
    fn report_penalty(&self, addr: &str, reason: &str) {
        tracing::warn!(peer = %addr, "peer served bad data, not fetching from it for {:?}: {reason}", policy::PENALTY);
        self.metrics.penalised(addr);
    }
}

impl SyncStatusSource for Syncer {
    /// Peers, where each deployment is, transfers in progress. `served_bytes` is the control
    /// server's to fill in.
    fn sync_status(&self) -> SyncStatus {
        let store = self.deployments.store();
        let now = Instant::now();
        let table = self.table();
        let mut spread: BTreeMap<(String, u64), (bool, Vec<String>)> = table
            .spread()
            .into_iter()
            .map(|(key, peers)| (key, (false, peers)))
            .collect();
        for manifest in store.manifests().unwrap_or_default() {
            if matches!(
                store.signature(&manifest.name, manifest.version),
                Ok(Some(_))
            ) {
                spread
                    .entry((manifest.name, manifest.version))
                    .or_default()
                    .0 = true;
            }
        }
        SyncStatus {
            peers: table.peer_status(now),
            deployments: spread
                .into_iter()
                .map(|((name, version), (here, peers))| DeploymentSpread {
                    fleet_record: self.deployments.fleet_record_info(&name).ok().flatten(),
                    name,
                    version,
                    here,
                    peers,
                })
                .collect(),
            transfers: lock(&self.in_progress)
                .iter()
                .map(|(hash, t)| {
                    let have = t.have.load(Ordering::Relaxed);
                    let from: Vec<(String, u32)> = lock(&t.sources)
                        .iter()
                        .map(|(peer, n)| (peer.clone(), *n))
                        .collect();
                    let secs = t.started.elapsed().as_secs_f64().max(0.001);
                    TransferStatus {
                        deployment: t.deployment.clone(),
                        blob: hash.clone(),
                        peer: t.peer.clone(),
                        have,
                        size: t.size,
                        pieces: Some(PieceProgress {
                            held: self
                                .exchange
                                .held(hash)
                                .map_or(0, |(_, pieces)| pieces.count()),
                            total: piece_count(t.size),
                            from,
                            rate: ((have - t.held_at_start.min(have)) as f64 / secs) as u64,
                        }),
                    }
                })
                .collect(),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            served_bytes: 0,
        }
    }
}

/// Sync's metrics: rounds, deployments and fetches by outcome, bytes by peer, penalties.
struct SyncMetrics {
    rounds: Counter,
    deployments: Family<OutcomeLabel, Counter>,
    fetches: Family<OutcomeLabel, Counter>,
    fetched_bytes: Family<PeerLabel, Counter>,
    penalties: Family<PeerLabel, Counter>,
    pieces_fetched: Family<PeerLabel, Counter>,
    transfers: Gauge,
    peers_reachable: Gauge,
}

impl SyncMetrics {
    fn register(registry: &mut Registry) -> SyncMetrics {
        let metrics = SyncMetrics {
            rounds: Counter::default(),
            deployments: Family::default(),
            fetches: Family::default(),
            fetched_bytes: Family::default(),
            penalties: Family::default(),
            pieces_fetched: Family::default(),
            transfers: Gauge::default(),
            peers_reachable: Gauge::default(),
        };
        registry.register(
            "sync_rounds",
            "Sync rounds (every peer asked for its holdings)",
            metrics.rounds.clone(),
        );
        registry.register(
            "sync_deployments",
            "Deployments fetched from peers, by outcome (stored, refused, failed)",
            metrics.deployments.clone(),
        );
        registry.register(
            "sync_fetches",
            "Blob fetch attempts from peers, by outcome (ok, busy, bad_data, failed)",
            metrics.fetches.clone(),
        );
        registry.register(
            "sync_fetched_bytes",
            "Verified blob bytes fetched, by peer",
            metrics.fetched_bytes.clone(),
        );
        registry.register(
            "sync_pieces_fetched",
            "Pieces fetched from peers and verified, by peer address",
            metrics.pieces_fetched.clone(),
        );
        registry.register(
            "sync_penalties",
            "Times a peer served data that failed verification",
            metrics.penalties.clone(),
        );
        registry.register(
            "sync_transfers",
            "Blob fetches in progress",
            metrics.transfers.clone(),
        );
        registry.register(
            "sync_peers_reachable",
            "Peers that answered the last holdings request",
            metrics.peers_reachable.clone(),
        );
        metrics
    }

    fn deployment(&self, outcome: &str) {
        self.deployments
            .get_or_create(&OutcomeLabel::new(outcome))
            .inc();
    }

    fn fetch(&self, outcome: &str) {
        self.fetches
            .get_or_create(&OutcomeLabel::new(outcome))
            .inc();
    }

    fn fetched_from(&self, peer: &str) -> Counter {
        self.fetched_bytes
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .clone()
    }

    fn piece_fetched(&self, peer: &str) {
        self.pieces_fetched
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .inc();
    }

    fn penalised(&self, peer: &str) {
        self.penalties
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .inc();
    }
}
