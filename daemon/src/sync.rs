//! Peer sync: a node converges on the fleet's signed deployments by fetching what it lacks from
//! other nodes, so an operator pushes to one node and every node serves the new version.
//!
//! Every `interval`, and at once when a push commits here or a peer announces something new,
//! the syncer asks each peer for its holdings. For each deployment newer than any this node has
//! seen for its name, it takes the signed manifest from a peer and checks it exactly as a push is
//! checked (trusted signer, newer version) — a peer is never trusted for content. Then it fetches
//! the blobs it needs (the source, and the artifact for this node's target and engine
//! fingerprint, never another target's) as Bao slices verified chunk by chunk into
//! `tmp/sync-<hash>`. A partial download only ever holds verified bytes: after a peer dies, or
//! this daemon restarts, it resumes from there with any peer. A peer whose data fails
//! verification is penalised (not fetched from for [`PENALTY`]). When no peer holds an artifact
//! for this node's fingerprint, the node compiles one from the verified source when it first
//! serves the deployment (the restore path's recompile).
//!
//! Load: fetches are bounded in total and per peer and share a bandwidth cap. A node serves each
//! blob to one fetcher at a time and says `Busy` to the rest; fetchers prefer holders that got
//! the deployment by sync (even ones still fetching its other blobs) over the node an operator
//! pushed to, so that node uploads each blob about once and the fleet spreads it from there.
//!
//! Peers are the configured addresses plus every node that connects to this one (the syncer
//! dials from the control endpoint, so an inbound node connection comes from its listen address).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use edged_control::identity::{NODE_SERVER_NAME, common_name, peer_certificates};
use edged_control::pacing::Pacer;
use edged_control::signing::{SignError, SignedManifest};
use edged_control::transport::{read_frame, write_frame};
use edged_control::verified::{VerifyError, open_partial, receive_slice};
use edged_control::wire::{
    DeploymentSpread, Holding, PeerStatus, Request, Response, SyncStatus, TransferStatus,
};
use edged_node_config::SyncConfig;
use edged_snapshots::manifest::BlobRef;
use edged_snapshots::{BlobKind, StoreError};
use tokio::sync::{Notify, Semaphore};

use crate::control::ControlPlane;
use crate::metrics::{OutcomeLabel, PeerLabel};
use crate::node::Node;

/// A peer that does not answer a request within this long is skipped for the round.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A transfer that makes no progress for this long is abandoned for another holder (a dead peer
/// would otherwise hold it until QUIC's 30 s idle timeout).
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer that served bad data is not fetched from.
const PENALTY: Duration = Duration::from_secs(600);
/// Pause before asking again when every holder of a blob is busy.
const BUSY_PAUSE: Duration = Duration::from_millis(200);
/// How long fetchers wait for other holders before pulling from the node that got the push.
const ORIGIN_PATIENCE: Duration = Duration::from_secs(10);
/// How long a round waits for slower peers' holdings once one peer has answered.
const HOLDINGS_PATIENCE: Duration = Duration::from_secs(1);
/// Longest wait before asking an unreachable peer again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one blob may wait for a free holder within one round.
const BUSY_GIVE_UP: Duration = Duration::from_secs(60);

pub struct Syncer {
    node: Arc<Node>,
    plane: Arc<ControlPlane>,
    endpoint: quinn::Endpoint,
    config: SyncConfig,
    peers: Mutex<BTreeMap<String, Peer>>,
    wake: Notify,
    transfers: Semaphore,
    pacer: Pacer,
    /// One fetch per blob at a time (deployments may share blobs).
    blob_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_progress: Mutex<BTreeMap<String, Transfer>>,
    /// Names whose deployments a task is syncing now.
    names_in_sync: Mutex<HashSet<String>>,
    fetched_bytes: AtomicU64,
}

struct Peer {
    learned: bool,
    conn: Option<quinn::Connection>,
    /// The name on its node certificate.
    node: Option<String>,
    /// Fetches from this peer at once.
    slots: Arc<Semaphore>,
    last_seen: Option<Instant>,
    last_error: Option<String>,
    penalised_until: Option<Instant>,
    /// Its last holdings answer (empty while unreachable).
    holdings: Vec<Holding>,
    /// Unanswered holdings requests in a row; an unreachable peer is asked again only after a
    /// backoff, so it does not slow every round (and every busy wait) by a timeout.
    failures: u32,
    retry_at: Option<Instant>,
}

struct Transfer {
    deployment: String,
    peer: String,
    have: Arc<AtomicU64>,
    size: u64,
}

/// Why one attempt to fetch a blob from one peer ended.
enum Attempt {
    /// It is serving that blob to someone else, or is at its upload cap.
    Busy,
    /// It sent data that fails verification (or a size the manifest contradicts).
    BadData(String),
    /// It could not be reached, died, stalled or refused.
    Failed(String),
}

impl Syncer {
    pub fn new(
        node: Arc<Node>,
        plane: Arc<ControlPlane>,
        endpoint: quinn::Endpoint,
        config: SyncConfig,
    ) -> Arc<Syncer> {
        let peers = config
            .peers
            .iter()
            .map(|addr| (addr.clone(), Peer::new(false, &config)))
            .collect();
        let syncer = Arc::new(Syncer {
            transfers: Semaphore::new(config.max_transfers),
            pacer: Pacer::new(config.max_rate_bytes),
            node,
            plane,
            endpoint,
            config,
            peers: Mutex::new(peers),
            wake: Notify::new(),
            blob_locks: Mutex::default(),
            in_progress: Mutex::default(),
            names_in_sync: Mutex::default(),
            fetched_bytes: AtomicU64::new(0),
        });
        syncer.plane.attach_syncer(&syncer);
        syncer
    }

    /// Runs sync rounds forever: at start, every interval, and when woken.
    pub async fn run(self: Arc<Self>) {
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

    /// Starts a round as soon as the current one (if any) ends.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Adds a node that connected to this one as a peer (if it is not one already).
    pub fn learn_peer(&self, addr: SocketAddr, node_name: &str) {
        let key = addr.to_string();
        let mut peers = self.lock_peers();
        let known = peers.iter_mut().find(|(k, p)| {
            **k == key || p.conn.as_ref().is_some_and(|c| c.remote_address() == addr)
        });
        if let Some((_, peer)) = known {
            // It is talking to us, so it is reachable again (a healed partition, a restart).
            peer.retry_at = None;
        } else {
            tracing::info!(peer = %key, node = node_name, "learned a sync peer");
            let mut peer = Peer::new(true, &self.config);
            peer.node = Some(node_name.to_string());
            peers.insert(key, peer);
        }
    }

    /// Tells every peer this node holds something new, so they fetch it now rather than at
    /// their next interval.
    pub fn announce(self: &Arc<Self>) {
        for addr in self.peer_addrs() {
            let syncer = self.clone();
            tokio::spawn(async move {
                if let Err(e) = syncer.call(&addr, &Request::Announce {}).await {
                    tracing::debug!(peer = %addr, error = %format!("{e:#}"), "announce not delivered");
                }
            });
        }
    }

    fn lock_peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Peers to talk to now (those backing off after failures are left out).
    fn peer_addrs(&self) -> Vec<String> {
        self.lock_peers()
            .iter()
            .filter(|(_, p)| !p.backing_off())
            .map(|(addr, _)| addr.clone())
            .collect()
    }

    /// The peer's connection, reusing a live one.
    async fn connection(&self, addr: &str) -> Result<quinn::Connection> {
        if let Some(conn) = self.lock_peers().get(addr).and_then(|p| p.conn.clone())
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
                .connect_with(self.plane.client_config(), resolved, NODE_SERVER_NAME)?;
        let conn = tokio::time::timeout(REQUEST_TIMEOUT, connecting)
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        let node_name = peer_certificates(&conn).and_then(|certs| certs.first().map(common_name));
        if let Some(peer) = self.lock_peers().get_mut(addr) {
            peer.conn = Some(conn.clone());
            peer.node = node_name.or(peer.node.take());
        }
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

    /// Asks every peer for its holdings (concurrently) and records the answers. Waits for all of
    /// them, but once one has answered, for at most [`HOLDINGS_PATIENCE`] more: a peer that
    /// stopped answering must not hold every round up for the full request timeout. Its answer,
    /// if it still comes, is recorded, and starts a round if it holds something new.
    async fn refresh_holdings(self: &Arc<Self>) {
        use futures_util::StreamExt;
        let round_moved_on = Arc::new(AtomicBool::new(false));
        let mut answers: futures_util::stream::FuturesUnordered<_> = self
            .peer_addrs()
            .into_iter()
            .map(|addr| {
                let (syncer, round_moved_on) = (self.clone(), round_moved_on.clone());
                tokio::spawn(async move {
                    let answer = match syncer.call(&addr, &Request::Holdings {}).await {
                        Ok(Response::Holdings { items }) => Ok(items),
                        Ok(other) => Err(anyhow!("unexpected answer to holdings: {other:?}")),
                        Err(e) => Err(e),
                    };
                    let (answered, news) = syncer.record_holdings(&addr, answer);
                    if news && round_moved_on.load(Ordering::SeqCst) {
                        syncer.wake();
                    }
                    answered
                })
            })
            .collect();
        let started = Instant::now();
        let mut any_answered = false;
        loop {
            let patience = if any_answered {
                HOLDINGS_PATIENCE.saturating_sub(started.elapsed())
            } else {
                REQUEST_TIMEOUT * 2
            };
            match tokio::time::timeout(patience, answers.next()).await {
                Ok(Some(answered)) => any_answered |= answered.unwrap_or(false),
                Ok(None) | Err(_) => break,
            }
        }
        round_moved_on.store(true, Ordering::SeqCst);
    }

    /// Records one peer's holdings answer. Returns whether it answered, and whether it holds a
    /// deployment newer than any this node has seen.
    fn record_holdings(&self, addr: &str, answer: Result<Vec<Holding>>) -> (bool, bool) {
        let store = self.node.store();
        let mut peers = self.lock_peers();
        let Some(peer) = peers.get_mut(addr) else {
            return (false, false);
        };
        let outcome = match answer {
            Ok(items) => {
                let news = items.iter().any(|h| {
                    h.complete
                        && store
                            .newest_version_seen(&h.name)
                            .is_ok_and(|seen| h.version > seen)
                });
                peer.holdings = items;
                peer.last_seen = Some(Instant::now());
                peer.last_error = None;
                peer.failures = 0;
                peer.retry_at = None;
                (true, news)
            }
            Err(e) => {
                peer.holdings.clear();
                peer.last_error = Some(format!("{e:#}"));
                peer.failures += 1;
                let backoff = Duration::from_millis(500)
                    .saturating_mul(1 << peer.failures.min(6))
                    .min(MAX_BACKOFF);
                peer.retry_at = Some(Instant::now() + backoff);
                (false, false)
            }
        };
        let reachable = peers
            .values()
            .filter(|p| p.failures == 0 && p.last_seen.is_some())
            .count();
        self.node.metrics.sync_peers_reachable.set(reachable as i64);
        outcome
    }

    /// One anti-entropy round: learn what every peer holds, fetch what this node lacks.
    async fn round(self: &Arc<Self>) {
        self.node.metrics.sync_rounds.inc();
        self.refresh_holdings().await;
        let wanted = match self.wanted() {
            Ok(wanted) => wanted,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "sync: cannot read the store");
                return;
            }
        };
        // Each name syncs in its own task, so a long transfer does not hold up the next round
        // (a newly pushed deployment of another name, a penalty, a new peer). The versions of
        // one name go in order, oldest first, so each passes the "newer than seen" check.
        for (name, versions) in wanted {
            if !self
                .names_in_sync
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
            {
                continue; // already being synced
            }
            let syncer = self.clone();
            tokio::spawn(async move {
                let mut progressed = false;
                for version in versions {
                    let id = format!("{name}@{version}");
                    match syncer.sync_deployment(&name, version).await {
                        Ok(()) => {
                            syncer.count_deployment("stored");
                            progressed = true;
                        }
                        Err(e) => {
                            tracing::warn!(deployment = %id, error = %format!("{e:#}"), "sync of deployment failed; retrying next round");
                            syncer.count_deployment("failed");
                            break;
                        }
                    }
                }
                syncer
                    .names_in_sync
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                if progressed {
                    // A newer version may have been announced meanwhile.
                    syncer.wake();
                }
            });
        }
    }

    fn count_deployment(&self, outcome: &str) {
        self.node
            .metrics
            .sync_deployments
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    fn count_fetch(&self, outcome: &str) {
        self.node
            .metrics
            .sync_fetches
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Deployments some peer holds whole that are newer than any this node has seen, by name.
    fn wanted(&self) -> Result<BTreeMap<String, BTreeSet<u64>>> {
        let store = self.node.store();
        let mut wanted: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        let peers = self.lock_peers();
        for holding in peers.values().flat_map(|p| &p.holdings) {
            if !holding.complete
                || holding.version <= store.newest_version_seen(&holding.name)?
                || edged_snapshots::manifest::validate_name(&holding.name).is_err()
            {
                continue;
            }
            wanted
                .entry(holding.name.clone())
                .or_default()
                .insert(holding.version);
        }
        Ok(wanted)
    }

    /// Fetches, checks and stores one deployment; activates it if a peer serves it as active
    /// and it is newer than the version active here.
    async fn sync_deployment(self: &Arc<Self>, name: &str, version: u64) -> Result<()> {
        let id = format!("{name}@{version}");
        let (signed, from) = self.manifest_from_peers(name, version).await?;
        tracing::info!(deployment = %id, peer = %from, "syncing deployment from peers");
        self.plane.set_syncing(&signed, true);
        let fetched = self.fetch_blobs(&signed).await;
        self.plane.set_syncing(&signed, false);
        fetched?;
        self.plane.store_deployment(&signed)?;
        let active_at_peer = self.lock_peers().values().any(|p| {
            p.holdings
                .iter()
                .any(|h| h.name == name && h.version == version && h.active)
        });
        let active_here = self.node.store().active_version(name)?;
        tracing::info!(deployment = %id, "deployment synced and stored");
        if active_at_peer && active_here.is_none_or(|v| v < version) {
            self.node.activate(name, version).await?;
        }
        self.announce();
        Ok(())
    }

    /// The signed manifest of `name@version` from a peer holding it whole, checked like a push:
    /// trusted signer, the name and version asked for, newer than any seen here. A peer whose
    /// manifest was tampered with is penalised.
    async fn manifest_from_peers(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(SignedManifest, String)> {
        let holders: Vec<String> = {
            let peers = self.lock_peers();
            peers
                .iter()
                .filter(|(_, p)| !p.is_penalised())
                .filter(|(_, p)| {
                    p.holdings
                        .iter()
                        .any(|h| h.name == name && h.version == version && h.complete)
                })
                .map(|(addr, _)| addr.clone())
                .collect()
        };
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
            if signed.manifest.name != name || signed.manifest.version != version {
                self.penalise(
                    &addr,
                    &format!(
                        "sent {} when asked for {name}@{version}",
                        signed.manifest.id()
                    ),
                );
                continue;
            }
            if let Err(e) = self.plane.check_manifest(&signed) {
                if matches!(
                    e.downcast_ref::<SignError>(),
                    Some(SignError::BadSignature(_))
                ) {
                    self.penalise(&addr, &format!("{e:#}"));
                    last_error = e;
                    continue;
                }
                // Untrusted signer or an old version: the same answer from every peer.
                self.count_deployment("refused");
                return Err(e.context(format!("manifest of {name}@{version} from {addr} refused")));
            }
            return Ok((signed, addr));
        }
        Err(last_error)
    }

    /// Fetches the blobs of `signed` this node lacks, concurrently. An artifact for this node's
    /// target and fingerprint that no peer holds is left out: the node compiles it from the
    /// source instead.
    async fn fetch_blobs(self: &Arc<Self>, signed: &SignedManifest) -> Result<()> {
        let id = signed.manifest.id();
        let needed = self.plane.needed_blobs(&signed.manifest);
        let node = &self.node;
        if signed
            .manifest
            .artifact_for(node.target(), node.fingerprint())
            .is_none()
        {
            tracing::info!(
                deployment = %id,
                fingerprint = node.fingerprint(),
                "the deployment ships no artifact for this node's engine; it will be compiled \
                 from the verified source"
            );
        }
        let results = futures_util::future::join_all(needed.into_values().map(|(blob, kind)| {
            let id = id.clone();
            async move {
                if matches!(kind, BlobKind::Artifact { .. })
                    && self.holders_of(&blob.blake3).is_empty()
                {
                    tracing::info!(
                        deployment = %id,
                        artifact = %blob.blake3,
                        "no peer holds this node's artifact; it will be compiled from the verified \
                         source"
                    );
                    return Ok(());
                }
                self.fetch_blob(&id, &blob, kind).await
            }
        }))
        .await;
        results.into_iter().collect()
    }

    /// Peers (not penalised) whose holdings list `hash` as stored: `(address, pushed there)`.
    fn holders_of(&self, hash: &str) -> Vec<(String, bool)> {
        self.peers_listing(hash, |h| &h.blobs)
    }

    /// Peers (not penalised) downloading `hash` right now.
    fn fetchers_of(&self, hash: &str) -> Vec<String> {
        let fetchers = self.peers_listing(hash, |h| &h.fetching);
        fetchers.into_iter().map(|(addr, _)| addr).collect()
    }

    /// Peers (not penalised) with a holding whose `list` names `hash`, and whether every such
    /// holding was pushed to that peer by an operator.
    fn peers_listing(
        &self,
        hash: &str,
        list: impl Fn(&Holding) -> &Vec<String>,
    ) -> Vec<(String, bool)> {
        self.lock_peers()
            .iter()
            .filter(|(_, p)| !p.is_penalised())
            .filter_map(|(addr, p)| {
                let listing: Vec<&Holding> = p
                    .holdings
                    .iter()
                    .filter(|h| list(h).iter().any(|b| b == hash))
                    .collect();
                (!listing.is_empty()).then(|| (addr.clone(), listing.iter().all(|h| h.pushed_here)))
            })
            .collect()
    }

    /// Blobs this node is downloading now.
    pub fn fetching(&self) -> HashSet<String> {
        self.in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn blob_lock(&self, hash: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.blob_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(hash.to_string()).or_default().clone()
    }

    /// Fetches one blob into the store from whichever holder can serve it, resuming the verified
    /// partial download across holders.
    async fn fetch_blob(self: &Arc<Self>, id: &str, blob: &BlobRef, kind: BlobKind) -> Result<()> {
        let hash = &blob.blake3;
        let lock = self.blob_lock(hash);
        let _one_fetch_per_blob = lock.lock().await;
        if self.node.store().blob_meta(hash)?.is_some() {
            return Ok(());
        }
        let _transfer = self.transfers.acquire().await?;
        let partial = self
            .node
            .store()
            .root()
            .join("tmp")
            .join(format!("sync-{hash}"));
        let started = Instant::now();
        // Holders that failed this fetch (died, refused) are not asked again in it.
        let mut failed: HashSet<String> = HashSet::new();
        let mut rotation = 0usize;
        loop {
            let holders = self.holders_of(hash);
            let (mut preferred, origins): (Vec<_>, Vec<_>) = holders
                .into_iter()
                .filter(|(addr, _)| !failed.contains(addr))
                .partition(|(_, pushed)| !pushed);
            // Spread fetchers over equal holders.
            if !preferred.is_empty() {
                let by = rotation % preferred.len();
                preferred.rotate_left(by);
            }
            rotation += 1;
            // The node that got the push serves a blob only when nobody else has it or is
            // getting it (or after a while: a slow relay must not hold everyone up).
            let relay_coming = self
                .fetchers_of(hash)
                .iter()
                .any(|addr| !failed.contains(addr));
            let use_origins =
                (preferred.is_empty() && !relay_coming) || started.elapsed() >= ORIGIN_PATIENCE;
            if preferred.is_empty() && origins.is_empty() && !relay_coming {
                bail!("no reachable peer holds blob {hash} of {id} (failed: {failed:?})");
            }
            let candidates: Vec<String> = preferred
                .into_iter()
                .chain(origins.into_iter().filter(|_| use_origins))
                .map(|(addr, _)| addr)
                .collect();
            for addr in &candidates {
                let Some(slots) = self.lock_peers().get(addr).map(|p| p.slots.clone()) else {
                    continue;
                };
                let Ok(_peer_slot) = slots.try_acquire_owned() else {
                    continue;
                };
                match self.fetch_from(addr, id, blob, &kind, &partial).await {
                    Ok(()) => {
                        self.count_fetch("ok");
                        return Ok(());
                    }
                    Err(Attempt::Busy) => self.count_fetch("busy"),
                    Err(Attempt::BadData(reason)) => {
                        self.count_fetch("bad_data");
                        self.penalise(addr, &reason);
                        failed.insert(addr.clone());
                    }
                    Err(Attempt::Failed(reason)) => {
                        self.count_fetch("failed");
                        tracing::info!(peer = %addr, blob = %hash, "fetch failed: {reason}; trying another holder");
                        if let Some(peer) = self.lock_peers().get_mut(addr) {
                            peer.last_error = Some(reason);
                        }
                        failed.insert(addr.clone());
                    }
                }
            }
            if started.elapsed() >= BUSY_GIVE_UP {
                bail!("every holder of blob {hash} stayed busy for {BUSY_GIVE_UP:?}");
            }
            tokio::time::sleep(BUSY_PAUSE).await;
            // Holders change as other nodes finish: ask again.
            self.refresh_holdings().await;
        }
    }

    /// One attempt to fetch `blob` from `addr`, from the end of the verified partial download.
    async fn fetch_from(
        &self,
        addr: &str,
        id: &str,
        blob: &BlobRef,
        kind: &BlobKind,
        partial: &Path,
    ) -> std::result::Result<(), Attempt> {
        let failed = |e: anyhow::Error| Attempt::Failed(format!("{e:#}"));
        let hash = blob.blake3.clone();
        let conn = self.connection(addr).await.map_err(failed)?;
        let (file, start) = open_partial(partial)
            .map_err(|e| Attempt::Failed(format!("partial download {}: {e}", partial.display())))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.into()))?;
        let request = Request::FetchBlob {
            hash: hash.clone(),
            start,
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            write_frame(&mut send, &request).await?;
            send.finish()?;
            anyhow::Ok(read_frame::<Response>(&mut recv).await?)
        })
        .await
        .map_err(|_| Attempt::Failed(format!("{addr} did not answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(failed)?;
        match answer {
            Response::BlobSlice { size } if size == blob.size => {}
            Response::BlobSlice { size } => {
                return Err(Attempt::BadData(format!(
                    "says blob {hash} has {size} bytes; the signed manifest says {}",
                    blob.size
                )));
            }
            Response::Busy { .. } => return Err(Attempt::Busy),
            Response::Error { message } => return Err(Attempt::Failed(message)),
            other => return Err(Attempt::Failed(format!("unexpected answer {other:?}"))),
        }
        if start > 0 {
            tracing::info!(peer = %addr, blob = %hash, start, "resuming a partial download");
        }
        let have = Arc::new(AtomicU64::new(start));
        let _progress = self.track(&hash, id, addr, blob.size, have.clone());

        // The network side stays async (stall detection, pacing); verification and disk writes
        // run on a blocking thread fed through a channel.
        let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(16);
        let verifier = {
            let (hash, size, kind) = (hash.clone(), blob.size, kind.clone());
            let (store, partial) = (self.node.store().clone(), partial.to_path_buf());
            let have = have.clone();
            tokio::task::spawn_blocking(move || -> std::result::Result<(), FetchError> {
                let mut file = file;
                let reader = ChannelReader {
                    chunks: chunks_rx,
                    current: Bytes::new(),
                };
                receive_slice(reader, &hash, size, start, &mut file, |n| {
                    have.fetch_add(n, Ordering::Relaxed);
                })?;
                file.sync_all()?;
                drop(file);
                // Hash and kind are checked once more as the file is renamed into the store.
                store.adopt_blob_file(&partial, kind, &hash)?;
                Ok(())
            })
        };
        let fetched_bytes = self
            .node
            .metrics
            .sync_fetched_bytes
            .get_or_create(&PeerLabel {
                peer: addr.to_string(),
            })
            .clone();
        loop {
            let chunk =
                match tokio::time::timeout(STALL_TIMEOUT, recv.read_chunk(256 << 10, true)).await {
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{addr} sent nothing for {STALL_TIMEOUT:?}"),
                    )),
                    Ok(Ok(Some(chunk))) => Ok(chunk.bytes),
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => Err(io::Error::other(e)),
                };
            let ended = chunk.is_err();
            if let Ok(bytes) = &chunk {
                fetched_bytes.inc_by(bytes.len() as u64);
                self.fetched_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.pacer.moved_async(bytes.len() as u64).await;
            }
            if chunks_tx.send(chunk).await.is_err() || ended {
                break; // the verifier stopped (bad data), or the stream failed
            }
        }
        drop(chunks_tx);
        let verified = verifier
            .await
            .map_err(|e| Attempt::Failed(format!("verifier task: {e}")))?;
        match verified {
            Ok(()) => {
                tracing::info!(peer = %addr, blob = %hash, bytes = blob.size - start, "blob fetched and verified");
                Ok(())
            }
            Err(e @ FetchError::Verify(VerifyError::BadChunk { .. })) => {
                Err(Attempt::BadData(e.to_string()))
            }
            Err(e) => Err(Attempt::Failed(e.to_string())),
        }
    }

    /// Registers a transfer for status; unregistered when the guard drops.
    fn track(
        &self,
        hash: &str,
        id: &str,
        addr: &str,
        size: u64,
        have: Arc<AtomicU64>,
    ) -> TransferGuard<'_> {
        self.in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                hash.to_string(),
                Transfer {
                    deployment: id.to_string(),
                    peer: addr.to_string(),
                    have,
                    size,
                },
            );
        self.node.metrics.sync_transfers.inc();
        TransferGuard {
            syncer: self,
            hash: hash.to_string(),
        }
    }

    fn penalise(&self, addr: &str, reason: &str) {
        tracing::warn!(peer = %addr, "peer served bad data, not fetching from it for {PENALTY:?}: {reason}");
        self.node
            .metrics
            .sync_penalties
            .get_or_create(&PeerLabel {
                peer: addr.to_string(),
            })
            .inc();
        if let Some(peer) = self.lock_peers().get_mut(addr) {
            peer.penalised_until = Some(Instant::now() + PENALTY);
            peer.last_error = Some(format!("penalised: {reason}"));
        }
    }

    /// Peers, where each deployment is, transfers in progress: for `edgectl status`.
    pub fn status(&self) -> SyncStatus {
        let store = self.node.store();
        let peers = self.lock_peers();
        let mut spread: BTreeMap<(String, u64), (bool, Vec<String>)> = BTreeMap::new();
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
        for (addr, peer) in peers.iter() {
            for h in peer.holdings.iter().filter(|h| h.complete) {
                spread
                    .entry((h.name.clone(), h.version))
                    .or_default()
                    .1
                    .push(addr.clone());
            }
        }
        SyncStatus {
            peers: peers
                .iter()
                .map(|(addr, p)| PeerStatus {
                    addr: addr.clone(),
                    node: p.node.clone(),
                    learned: p.learned,
                    last_seen_ms: p.last_seen.map(|t| t.elapsed().as_millis() as u64),
                    last_error: p.last_error.clone(),
                    penalised: p.is_penalised(),
                })
                .collect(),
            deployments: spread
                .into_iter()
                .map(|((name, version), (here, peers))| DeploymentSpread {
                    name,
                    version,
                    here,
                    peers,
                })
                .collect(),
            transfers: self
                .in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(hash, t)| TransferStatus {
                    deployment: t.deployment.clone(),
                    blob: hash.clone(),
                    peer: t.peer.clone(),
                    have: t.have.load(Ordering::Relaxed),
                    size: t.size,
                })
                .collect(),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            served_bytes: self.node.metrics.sync_served_bytes.get(),
        }
    }
}

impl Peer {
    fn new(learned: bool, config: &SyncConfig) -> Peer {
        Peer {
            learned,
            conn: None,
            node: None,
            slots: Arc::new(Semaphore::new(config.max_transfers_per_peer)),
            last_seen: None,
            last_error: None,
            penalised_until: None,
            holdings: Vec::new(),
            failures: 0,
            retry_at: None,
        }
    }

    fn backing_off(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn is_penalised(&self) -> bool {
        self.penalised_until
            .is_some_and(|until| Instant::now() < until)
    }
}

struct TransferGuard<'a> {
    syncer: &'a Syncer,
    hash: String,
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.syncer
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.hash);
        self.syncer.node.metrics.sync_transfers.dec();
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("partial download: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The fetched stream as a blocking reader for the Bao decoder.
struct ChannelReader {
    chunks: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
