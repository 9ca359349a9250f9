//! Fetching one blob from peers as verified pieces: the piece exchange's fetching shell. The
//! decisions — which piece from which peer, when a request stalled, whom to penalise — are
//! [`BlobSwarm`]'s; this loop feeds it who holds which pieces (holdings answers, refreshed every
//! few seconds while pieces move, and the peers' have messages between) and how each request
//! ended, and does what it says; each piece it verifies it tells its peers of (a have). Pieces come
//! from different holders at once, rarest first, and a peer still fetching the blob serves the
//! pieces it verified, so the origin uploads each piece about once.
//!
//! A piece counts only after its Bao slice verified against the signed BLAKE3 hash; it is kept
//! as its own file ([`PieceFiles`]) and served to peers from then on. A restart finds the pieces
//! again (each verified once more) and fetches only the rest. The blob is assembled — and
//! hashed whole once more — when every piece is in. When no peer has any piece and the
//! deployment is published, the registry is the holder of last resort.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use edged_artifacts::BlobKind;
use edged_artifacts::manifest::BlobRef;
use edged_control::transport::{read_frame, write_frame};
use edged_control::verified::{PIECE, piece_count, piece_range};
use edged_control::wire::{PieceRefusal, Request, Response};
use tokio::task::{AbortHandle, JoinSet};

use super::policy::{BUSY_GIVE_UP, Idle, IdleFetch, when_idle};
use super::{REQUEST_TIMEOUT, SWARM_REFRESH, Syncer, Transfer};
use crate::deployments::FetchMark;
use crate::lock::lock;
use crate::pieces::{PieceError, PieceFiles};
use crate::swarm::{Action, BlobSwarm, PieceSet, Refusal, SwarmConfig};

/// The most a piece's slice may take on the wire: its content and the tree nodes that verify
/// it (64 bytes of parents per 1 KiB chunk, and the path to the root). A peer announcing more
/// is not read.
const MAX_SLICE: u64 = PIECE + PIECE / 8 + 8192;

/// How one piece request ended.
enum PieceOutcome {
    /// Verified and on disk: its content bytes.
    Verified(u64),
    /// Failed verification, or a size the manifest contradicts.
    BadData(String),
    /// Turned down, or the stream failed.
    Refused(Refusal, String),
}

impl Syncer {
    fn blob_lock(&self, hash: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.blob_locks);
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(hash.to_string()).or_default().clone()
    }

    /// This node's own tie-breaks between equal pieces and peers (fetchers spread out).
    fn swarm_seed(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.endpoint.local_addr().ok().hash(&mut hasher);
        hasher.finish()
    }

    /// Fetches one blob into the store, as pieces from whichever peers hold them, resuming from
    /// the pieces already on disk.
    pub(super) async fn fetch_blob(
        self: &Arc<Self>,
        id: &str,
        blob: &BlobRef,
        kind: BlobKind,
        published: Option<&oci_client::Reference>,
    ) -> Result<()> {
        let hash = &blob.blake3;
        let blob_lock = self.blob_lock(hash);
        let _one_fetch_per_blob = blob_lock.lock().await;
        let store = self.deployments.store().clone();
        if store.blob_meta(hash)?.is_some() {
            return Ok(());
        }
        let _transfer = self.transfers.acquire().await?;
        let files = Arc::new(PieceFiles::open(&store, hash, blob.size)?);
        let pieces = piece_count(blob.size);
        let mut held = PieceSet::empty(pieces);
        let on_disk = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || files.verified_on_disk()).await?
        };
        for &index in &on_disk {
            held.insert(index);
        }
        let held_bytes: u64 = held.iter().map(|i| piece_range(blob.size, i).1).sum();
        if !on_disk.is_empty() {
            tracing::info!(blob = %hash, deployment = %id, pieces = on_disk.len(), of = pieces, bytes = held_bytes, "resuming a partial download");
        }
        self.exchange.fetching(hash, blob.size, held.clone());
        let _partial = PartialHere {
            syncer: self,
            hash: hash.clone(),
        };
        let have = Arc::new(AtomicU64::new(held_bytes));
        let sources: Arc<std::sync::Mutex<BTreeMap<String, u32>>> = Arc::default();
        let _progress = self.track(hash, id, blob.size, have.clone(), sources.clone());

        // `max_transfers_per_peer` caps the pieces asked of one peer at once.
        let config = SwarmConfig {
            per_peer: self.config.max_transfers_per_peer.max(1) as u32,
            ..SwarmConfig::default()
        };
        let mut swarm = BlobSwarm::new(blob.size, held, self.swarm_seed(), config);
        let mut requests: JoinSet<(String, u32, PieceOutcome)> = JoinSet::new();
        let mut running: HashMap<(String, u32), AbortHandle> = HashMap::new();
        let mut known: HashSet<String> = HashSet::new();
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut holders_seen = false;
        let mut registry_tried = false;
        while !swarm.is_complete() {
            let now = Instant::now();
            let holders = self.table().piece_holders(hash, blob.size, now);
            holders_seen |= !holders.is_empty();
            let current: HashSet<String> = holders.iter().map(|h| h.addr.clone()).collect();
            for gone in known.difference(&current) {
                swarm.peer_lost(gone);
            }
            for holder in holders {
                if let Err(e) =
                    swarm.peer_holdings(holder.addr.clone(), holder.pieces, holder.origin)
                {
                    tracing::debug!(peer = %holder.addr, blob = %hash, "holdings not taken: {e}");
                }
            }
            known = current;
            for action in swarm.poll(now) {
                match action {
                    Action::Request { peer, piece } => {
                        let (syncer, hash, files) = (self.clone(), hash.clone(), files.clone());
                        let size = blob.size;
                        let key = (peer.clone(), piece);
                        let handle = requests.spawn(async move {
                            let outcome =
                                syncer.fetch_piece(&peer, &hash, size, piece, files).await;
                            (peer, piece, outcome)
                        });
                        running.insert(key, handle);
                    }
                    Action::Cancel { peer, piece, why } => {
                        if let Some(handle) = running.remove(&(peer.clone(), piece)) {
                            tracing::debug!(%peer, blob = %hash, piece, ?why, "piece request cancelled");
                            handle.abort();
                        }
                    }
                    Action::Penalise { peer, reason } => {
                        self.metrics.fetch("bad_data");
                        self.penalise(&peer, &reason);
                    }
                }
            }
            if requests.is_empty() {
                // Nobody to ask right now: the registry, wait, or give up (policy's call).
                let idle = |registry_tried: bool| {
                    when_idle(IdleFetch {
                        registry_left: self.origin.is_some()
                            && published.is_some()
                            && !registry_tried,
                        holders_seen,
                        since_start: started.elapsed(),
                        since_progress: last_progress.elapsed(),
                    })
                };
                let mut next = idle(registry_tried);
                if next == Idle::Registry
                    && let (Some(origin), Some(pinned)) = (&self.origin, published)
                {
                    match origin.fetch_blob(pinned, id, blob, kind.clone()).await {
                        Ok(()) => {
                            self.metrics.fetch("ok");
                            return Ok(());
                        }
                        Err(e) => {
                            registry_tried = true;
                            tracing::warn!(blob = %hash, deployment = %id, "no peer could serve this blob and the registry could not deliver it: {e}");
                            next = idle(registry_tried);
                        }
                    }
                }
                if next == Idle::GiveUp {
                    bail!(
                        "no peer served any piece of blob {hash} of {id} for {BUSY_GIVE_UP:?} \
                         ({} of {pieces} pieces held; holders known: {})",
                        swarm.held().count(),
                        known.len()
                    );
                }
            }
            let wake = swarm
                .next_wakeup()
                .map_or(now + SWARM_REFRESH, |at| at.min(now + SWARM_REFRESH));
            tokio::select! {
                Some(joined) = requests.join_next() => {
                    let Ok((peer, piece, outcome)) = joined else {
                        continue; // cancelled
                    };
                    running.remove(&(peer.clone(), piece));
                    let now = Instant::now();
                    match outcome {
                        PieceOutcome::Verified(bytes) => {
                            if swarm.piece_verified(now, &peer, piece) {
                                self.exchange.verified(hash, piece);
                                self.tell_have(hash, blob.size, piece);
                                have.fetch_add(bytes, Ordering::Relaxed);
                                self.metrics.piece_fetched(&peer);
                                *lock(&sources).entry(peer).or_default() += 1;
                                self.metrics.fetch("ok_piece");
                            }
                            last_progress = now;
                        }
                        PieceOutcome::BadData(reason) => swarm.piece_failed(&peer, piece, reason),
                        PieceOutcome::Refused(why, reason) => {
                            if why == Refusal::Failed {
                                self.metrics.fetch("failed");
                                tracing::info!(%peer, blob = %hash, piece, "piece fetch failed: {reason}; asking elsewhere");
                            } else {
                                self.metrics.fetch("busy");
                            }
                            swarm.refused(now, &peer, piece, why);
                        }
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {}
                () = self.pieces_heard.notified() => {}
            }
            let syncer = self.clone();
            tokio::spawn(async move { syncer.refresh_holdings_soon().await });
        }
        requests.shutdown().await;
        drop(running);
        // A cancelled request's verifier may still hold its handle on the piece directory (a
        // blocking task cannot be aborted): assemble through a handle of our own.
        drop(files);
        let files = PieceFiles::open(&store, hash, blob.size)?;
        let assembled = {
            let (store, kind) = (store.clone(), kind.clone());
            tokio::task::spawn_blocking(move || files.assemble(&store, kind)).await?
        };
        if let Err(e) = assembled {
            bail!("assembling blob {hash} from its verified pieces: {e}");
        }
        let from: Vec<String> = lock(&sources)
            .iter()
            .map(|(p, n)| format!("{p}:{n}"))
            .collect();
        tracing::info!(blob = %hash, deployment = %id, bytes = blob.size - held_bytes, pieces, from = %from.join(","), "blob fetched and verified");
        self.metrics.fetch("ok");
        Ok(())
    }

    /// One piece from `addr`: asked, read (at most [`MAX_SLICE`]), verified and kept on disk.
    async fn fetch_piece(
        &self,
        addr: &str,
        hash: &str,
        size: u64,
        index: u32,
        files: Arc<PieceFiles>,
    ) -> PieceOutcome {
        let failed = |reason: String| PieceOutcome::Refused(Refusal::Failed, reason);
        let conn = match self.connection(addr).await {
            Ok(conn) => conn,
            Err(e) => return failed(format!("{e:#}")),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return failed(e.to_string()),
        };
        let request = Request::FetchPiece {
            hash: hash.to_string(),
            index,
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            write_frame(&mut send, &request).await?;
            send.finish()?;
            anyhow::Ok(read_frame::<Response>(&mut recv).await?)
        })
        .await;
        // A queued request may wait for a slot a little longer than a plain answer takes.
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return failed(format!("{e:#}")),
            Err(_) => {
                return PieceOutcome::Refused(
                    Refusal::Busy,
                    format!("{addr} did not answer within {REQUEST_TIMEOUT:?}"),
                );
            }
        };
        let len = match answer {
            Response::PieceSlice { size: said, len } if said == size && len <= MAX_SLICE => len,
            Response::PieceSlice { size: said, .. } if said != size => {
                return PieceOutcome::BadData(format!(
                    "says blob {hash} has {said} bytes; the signed manifest says {size}"
                ));
            }
            Response::PieceSlice { len, .. } => {
                return PieceOutcome::BadData(format!(
                    "announces a {len}-byte slice for piece {index} of blob {hash}; a piece's \
                     slice is at most {MAX_SLICE}"
                ));
            }
            Response::PieceRefused { why } => {
                let why = match why {
                    PieceRefusal::Busy => Refusal::Busy,
                    PieceRefusal::AskOthers => Refusal::AskOthers,
                    PieceRefusal::NotHeld => Refusal::NotHeld,
                };
                return PieceOutcome::Refused(why, format!("{why:?}"));
            }
            Response::Busy { message } => return PieceOutcome::Refused(Refusal::Busy, message),
            Response::Error { message } => return failed(message),
            other => return failed(format!("unexpected answer {other:?}")),
        };
        // The swarm cancels a request that stalls (this task is aborted): no timeout here.
        let slice = match recv.read_to_end(len as usize).await {
            Ok(slice) => slice,
            Err(e) => return failed(format!("reading piece {index} of blob {hash}: {e}")),
        };
        let got = slice.len() as u64;
        self.metrics.fetched_from(addr).inc_by(got);
        self.fetched_bytes.fetch_add(got, Ordering::Relaxed);
        self.pacer.moved_async(got).await;
        if got != len {
            return failed(format!(
                "piece {index} of blob {hash} ended after {got} of {len} bytes"
            ));
        }
        match tokio::task::spawn_blocking(move || files.put(index, &slice)).await {
            Ok(Ok(bytes)) => PieceOutcome::Verified(bytes),
            Ok(Err(PieceError::Verify(e))) => PieceOutcome::BadData(e.to_string()),
            Ok(Err(e)) => failed(format!("keeping piece {index} of blob {hash}: {e}")),
            Err(e) => failed(format!("verifier task: {e}")),
        }
    }

    /// Registers a transfer for status and holdings; unregistered when the guard drops.
    fn track(
        &self,
        hash: &str,
        id: &str,
        size: u64,
        have: Arc<AtomicU64>,
        sources: Arc<std::sync::Mutex<BTreeMap<String, u32>>>,
    ) -> TransferGuard<'_> {
        let held_at_start = have.load(Ordering::Relaxed);
        lock(&self.in_progress).insert(
            hash.to_string(),
            Transfer {
                deployment: id.to_string(),
                peer: "peers (pieces)".to_string(),
                have,
                size,
                sources,
                started: Instant::now(),
                held_at_start,
            },
        );
        self.metrics.transfers.inc();
        TransferGuard {
            syncer: self,
            hash: hash.to_string(),
            _fetching: self.deployments.begin_fetch(hash),
        }
    }
}

/// This node holds pieces of the blob while the guard lives: the exchange offers them to peers.
struct PartialHere<'a> {
    syncer: &'a Syncer,
    hash: String,
}

impl Drop for PartialHere<'_> {
    fn drop(&mut self) {
        self.syncer.exchange.finished(&self.hash);
    }
}

struct TransferGuard<'a> {
    syncer: &'a Syncer,
    hash: String,
    _fetching: FetchMark,
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        lock(&self.syncer.in_progress).remove(&self.hash);
        self.syncer.metrics.transfers.dec();
    }
}
