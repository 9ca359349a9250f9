//! Serving peers that sync from this node: what it holds, signed manifests, blobs as Bao
//! slices, and pieces of blobs (held whole or still being fetched) for the piece exchange. The
//! [`ServeSlots`] core decides who gets a whole blob (each blob to one peer at a time, within a
//! cap on blobs served at once); [`crate::piece_exchange`] who gets a piece; the rest is the
//! tokio shell that streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use edged_control::transport::write_frame;
use edged_control::verified::{PieceSource, SliceSource, piece_count};
use edged_control::wire::{PieceRefusal, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::deployments::Deployments;
use crate::lock::lock;
use crate::metrics::PeerLabel;
use crate::piece_exchange::PieceExchange;
use crate::pieces::PieceFiles;
use crate::swarm::PieceSet;

/// A peer that stops reading for this long loses its slot.
const SERVE_STALL: Duration = Duration::from_secs(15);
/// How long the last bytes of a blob (at most one send window) may take to be acknowledged:
/// 8 MiB at 1 Mbit/s is ~67 s, so a slow but live peer keeps its slot.
const DELIVERY_WAIT: Duration = Duration::from_secs(120);
/// How long one piece (256 KiB and its tree nodes) may take to be acknowledged: 30 s is
/// 70 kbit/s, so only a dead or hopeless peer loses the slot to it.
const PIECE_DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// Whole blobs whose Bao tree is kept for serving pieces: building a tree reads the blob once,
/// and a swarm asks for every piece of the few blobs of a new deployment. Each tree is 1/16 of
/// its blob; the blob itself is a mapping of the stored file, not heap.
const PIECE_SOURCES: usize = 4;

/// Which peer each blob is being served to, sans-IO.
pub struct ServeSlots {
    max: usize,
    /// By blob hash: the peer being served and the generation of that serving.
    active: HashMap<String, (String, u64)>,
    next_generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotDecision {
    /// Serve it. `superseded` is the same peer's earlier serving of this blob, to cancel.
    Granted {
        generation: u64,
        superseded: Option<u64>,
    },
    /// Another peer is being served this blob, or the cap is reached: try another holder.
    Busy,
}

impl ServeSlots {
    pub fn new(max: usize) -> ServeSlots {
        ServeSlots {
            max,
            active: HashMap::new(),
            next_generation: 0,
        }
    }

    /// A node fetches each blob once at a time, so a second request from the same peer means
    /// its first stream is dead (a crashed daemon's streams linger until the idle timeout): the
    /// new request takes over the slot.
    pub fn try_take(&mut self, hash: &str, peer: &str) -> SlotDecision {
        let superseded = match self.active.get(hash) {
            Some((current, generation)) if current == peer => Some(*generation),
            Some(_) => return SlotDecision::Busy,
            None if self.active.len() >= self.max => return SlotDecision::Busy,
            None => None,
        };
        self.next_generation += 1;
        let generation = self.next_generation;
        self.active
            .insert(hash.to_string(), (peer.to_string(), generation));
        SlotDecision::Granted {
            generation,
            superseded,
        }
    }

    /// The serving `generation` of `hash` ended; a superseded one's end changes nothing.
    pub fn release(&mut self, hash: &str, generation: u64) {
        if self.active.get(hash).is_some_and(|(_, g)| *g == generation) {
            self.active.remove(hash);
        }
    }
}

pub struct PeerServing {
    deployments: Arc<Deployments>,
    slots: Arc<Mutex<SlotState>>,
    exchange: Arc<PieceExchange>,
    /// Most recently used first.
    piece_sources: Mutex<Vec<(String, Arc<PieceSource<memmap2::Mmap>>)>>,
    metrics: PeerServingMetrics,
}

/// Where a piece's slice comes from.
enum PieceOrigin {
    Whole(Arc<PieceSource<memmap2::Mmap>>),
    Partial(PieceFiles),
}

struct SlotState {
    slots: ServeSlots,
    cancels: HashMap<u64, CancellationToken>,
}

/// One blob being served; frees its slot on drop.
struct Slot {
    state: Arc<Mutex<SlotState>>,
    hash: String,
    generation: u64,
    cancel: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.cancels.remove(&self.generation);
        state.slots.release(&self.hash, self.generation);
    }
}

impl PeerServing {
    pub fn new(
        deployments: Arc<Deployments>,
        exchange: Arc<PieceExchange>,
        max_serving: usize,
        registry: &mut Registry,
    ) -> PeerServing {
        PeerServing {
            deployments,
            exchange,
            piece_sources: Mutex::new(Vec::new()),
            slots: Arc::new(Mutex::new(SlotState {
                slots: ServeSlots::new(max_serving),
                cancels: HashMap::new(),
            })),
            metrics: PeerServingMetrics::register(registry),
        }
    }

    /// Blob bytes served to peers since start.
    pub fn served_bytes(&self) -> u64 {
        self.metrics.served_bytes.get()
    }

    fn take_slot(&self, hash: &str, peer: &str) -> Option<Slot> {
        let mut state = lock(&self.slots);
        match state.slots.try_take(hash, peer) {
            SlotDecision::Busy => None,
            SlotDecision::Granted {
                generation,
                superseded,
            } => {
                if let Some(old) = superseded.and_then(|g| state.cancels.remove(&g)) {
                    old.cancel();
                }
                let cancel = CancellationToken::new();
                state.cancels.insert(generation, cancel.clone());
                Some(Slot {
                    state: self.slots.clone(),
                    hash: hash.to_string(),
                    generation,
                    cancel,
                })
            }
        }
    }

    /// Answers a `FetchPiece`: sends the piece's slice and returns `None`, or returns the
    /// answer to send instead (refused: busy, ask others, not held; or an error).
    pub async fn serve_piece(
        &self,
        hash: &str,
        index: u32,
        peer: &str,
        send: &mut quinn::SendStream,
    ) -> Option<Response> {
        match self.send_piece(hash, index, peer, send).await {
            Ok(None) => None,
            Ok(Some(why)) => Some(Response::PieceRefused { why }),
            Err(e) => Some(Response::Error {
                message: format!("{e:#}"),
            }),
        }
    }

    async fn send_piece(
        &self,
        hash: &str,
        index: u32,
        peer: &str,
        send: &mut quinn::SendStream,
    ) -> Result<Option<PieceRefusal>> {
        let store = self.deployments.store();
        let (size, held, origin) = match store.blob_meta(hash)? {
            Some(meta) => {
                if self.deployments.pushed_here_holds(hash) {
                    self.exchange.seed(hash, meta.size);
                }
                let source = self.piece_source(hash).await?;
                (
                    meta.size,
                    PieceSet::full(piece_count(meta.size)),
                    PieceOrigin::Whole(source),
                )
            }
            None => match self.exchange.held(hash) {
                Some((size, held)) => match PieceFiles::existing(store, hash, size) {
                    Some(files) => (size, held, PieceOrigin::Partial(files)),
                    None => return Ok(Some(PieceRefusal::NotHeld)),
                },
                None => return Ok(Some(PieceRefusal::NotHeld)),
            },
        };
        let slot = match self.exchange.admit(peer, hash, size, index, &held).await {
            Ok(slot) => slot,
            Err(why) => return Ok(Some(why)),
        };
        let slice = match origin {
            PieceOrigin::Whole(source) => {
                tokio::task::spawn_blocking(move || source.piece_slice(index)).await??
            }
            PieceOrigin::Partial(files) => {
                tokio::task::spawn_blocking(move || files.slice(index)).await??
            }
        };
        write_frame(
            send,
            &Response::PieceSlice {
                size,
                len: slice.len() as u64,
            },
        )
        .await?;
        tokio::time::timeout(SERVE_STALL, send.write_all(&slice))
            .await
            .map_err(|_| anyhow!("peer stopped reading piece {index} of blob {hash}"))??;
        send.finish()?;
        // The slot is held until the peer has the piece (see `stream_slice`).
        match tokio::time::timeout(PIECE_DELIVERY_WAIT, send.stopped()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("delivering piece {index} of blob {hash}: {e}"),
            Err(_) => bail!(
                "peer acknowledged nothing of piece {index} of blob {hash} for \
                 {PIECE_DELIVERY_WAIT:?}"
            ),
        }
        self.metrics.served_bytes.inc_by(slice.len() as u64);
        self.metrics.pieces_served(peer).inc();
        slot.delivered();
        Ok(None)
    }

    /// The Bao tree of a whole stored blob for serving its pieces, built once (the blob is
    /// hashed while it is built, so a copy damaged on this disk is refused, not served).
    async fn piece_source(&self, hash: &str) -> Result<Arc<PieceSource<memmap2::Mmap>>> {
        {
            let mut sources = lock(&self.piece_sources);
            if let Some(at) = sources.iter().position(|(h, _)| h == hash) {
                let entry = sources.remove(at);
                let source = entry.1.clone();
                sources.insert(0, entry);
                return Ok(source);
            }
        }
        let store = self.deployments.store().clone();
        let expected = hash.to_string();
        let source = tokio::task::spawn_blocking(move || {
            let (map, _) = store.map_blob(&expected)?;
            anyhow::Ok(PieceSource::checked(map, &expected)?)
        })
        .await?
        .map_err(|e| {
            tracing::error!(blob = %hash, error = %format!("{e:#}"), "stored blob is damaged; not serving it");
            anyhow!("this node's copy of blob {hash} is damaged; fetch it elsewhere")
        })?;
        let source = Arc::new(source);
        let mut sources = lock(&self.piece_sources);
        sources.retain(|(h, _)| h != hash);
        sources.insert(0, (hash.to_string(), source.clone()));
        sources.truncate(PIECE_SOURCES);
        Ok(source)
    }

    /// Answers a `FetchBlob`: streams the slice and returns `None`, or returns the answer to
    /// send instead (busy, or why not).
    pub async fn serve_blob(
        &self,
        hash: &str,
        start: u64,
        peer: &str,
        send: &mut quinn::SendStream,
    ) -> Option<Response> {
        let Some(slot) = self.take_slot(hash, peer) else {
            return Some(Response::Busy {
                message: format!(
                    "already serving blob {hash} or at the upload cap; try another holder"
                ),
            });
        };
        match self.stream_slice(hash, start, send, slot).await {
            Ok(()) => None,
            Err(e) => Some(Response::Error {
                message: format!("{e:#}"),
            }),
        }
    }

    /// Streams a held blob from `start` as a Bao slice. The blob is hashed while its tree is
    /// built, so a copy damaged on this node's disk is refused rather than served.
    async fn stream_slice(
        &self,
        hash: &str,
        start: u64,
        send: &mut quinn::SendStream,
        slot: Slot,
    ) -> Result<()> {
        let store = self.deployments.store().clone();
        let (map, meta) = store
            .map_blob(hash)
            .map_err(|e| anyhow!("blob {hash} is not held here: {e}"))?;
        if start > meta.size {
            bail!(
                "start {start} is past the {} bytes of blob {hash}",
                meta.size
            );
        }
        let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let expected = hash.to_string();
        // Building the tree reads the whole blob: off the async threads, streamed in pieces.
        tokio::task::spawn_blocking(move || {
            let mut source = match SliceSource::checked(map, &expected, start) {
                Ok(source) => {
                    let _ = ready_tx.send(Ok(()));
                    source
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // The extractor hands out about one 1 KiB chunk per read: gather 256 KiB pieces so
            // the stream is written in large writes, not one per chunk.
            loop {
                let mut buf = vec![0u8; 256 << 10];
                let mut filled = 0;
                while filled < buf.len() {
                    match std::io::Read::read(&mut source, &mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = chunks_tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
                if filled == 0 {
                    return;
                }
                buf.truncate(filled);
                if chunks_tx.blocking_send(Ok(buf)).is_err() {
                    return; // the fetcher went away
                }
            }
        });
        if let Err(e) = ready.await? {
            tracing::error!(blob = %hash, error = %e, "stored blob is damaged; not serving it");
            bail!("this node's copy of blob {hash} is damaged; fetch it elsewhere");
        }
        write_frame(send, &Response::BlobSlice { size: meta.size }).await?;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk?;
            tokio::select! {
                written = tokio::time::timeout(SERVE_STALL, send.write_all(&chunk)) => {
                    written.map_err(|_| {
                        anyhow!("peer stopped reading blob {hash}; serving it abandoned")
                    })??
                }
                () = slot.cancel.cancelled() => {
                    bail!("serving blob {hash} superseded by a newer request from the same peer")
                }
            }
            self.metrics.served_bytes.inc_by(chunk.len() as u64);
        }
        send.finish()?;
        // The slot is held until the peer has the bytes, not until quinn has buffered them: on
        // a slow link, freeing it at the buffer would grant every fetcher at once (and hold
        // every one's buffered copy in this node's memory). The send window bounds what is
        // buffered unacknowledged, so this waits at most for one window to drain.
        tokio::select! {
            stopped = tokio::time::timeout(DELIVERY_WAIT, send.stopped()) => match stopped {
                Ok(Ok(None)) => {}
                // A fetcher that has read its slice may drop its end before it sees the end of
                // the stream: it stopped reading, so the slot is free either way.
                Ok(Ok(Some(code))) => {
                    tracing::debug!(blob = %hash, %code, "peer stopped the stream after the slice")
                }
                Ok(Err(e)) => bail!("delivering blob {hash}: {e}"),
                Err(_) => bail!(
                    "peer acknowledged nothing of blob {hash}'s last bytes for {DELIVERY_WAIT:?}; \
                     serving it abandoned"
                ),
            },
            () = slot.cancel.cancelled() => {
                bail!("serving blob {hash} superseded by a newer request from the same peer")
            }
        }
        self.metrics.blobs_served.inc();
        Ok(())
    }
}

/// What this node served to peers.
struct PeerServingMetrics {
    blobs_served: Counter,
    served_bytes: Counter,
    pieces_served: Family<PeerLabel, Counter>,
}

impl PeerServingMetrics {
    fn register(registry: &mut Registry) -> PeerServingMetrics {
        let metrics = PeerServingMetrics {
            blobs_served: Counter::default(),
            served_bytes: Counter::default(),
            pieces_served: Family::default(),
        };
        registry.register(
            "sync_pieces_served",
            "Pieces served to peers (verified, acknowledged), by the peer's node name",
            metrics.pieces_served.clone(),
        );
        registry.register(
            "sync_uploads",
            "Blobs served to peers in full",
            metrics.blobs_served.clone(),
        );
        registry.register(
            "sync_served_bytes",
            "Blob bytes served to peers (Bao slices, content and tree)",
            metrics.served_bytes.clone(),
        );
        metrics
    }

    fn pieces_served(&self, peer: &str) -> Counter {
        self.pieces_served
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_goes_to_one_peer_at_a_time() {
        let mut slots = ServeSlots::new(4);
        let SlotDecision::Granted { generation, .. } = slots.try_take("h", "b") else {
            panic!("the first fetcher gets the blob");
        };
        assert_eq!(slots.try_take("h", "c"), SlotDecision::Busy);
        // Another blob is served to c meanwhile.
        assert!(matches!(
            slots.try_take("other", "c"),
            SlotDecision::Granted { .. }
        ));
        slots.release("h", generation);
        assert!(matches!(
            slots.try_take("h", "c"),
            SlotDecision::Granted {
                superseded: None,
                ..
            }
        ));
    }

    #[test]
    fn the_same_peer_asking_again_supersedes_its_dead_stream() {
        let mut slots = ServeSlots::new(1);
        let SlotDecision::Granted {
            generation: first, ..
        } = slots.try_take("h", "b")
        else {
            panic!("granted");
        };
        let SlotDecision::Granted {
            generation: second,
            superseded,
        } = slots.try_take("h", "b")
        else {
            panic!("the same peer takes over its slot, even at the cap");
        };
        assert_eq!(superseded, Some(first));
        // The dead stream's late end does not free the new one's slot.
        slots.release("h", first);
        assert_eq!(slots.try_take("h", "c"), SlotDecision::Busy);
        slots.release("h", second);
        assert!(matches!(
            slots.try_take("h", "c"),
            SlotDecision::Granted { .. }
        ));
    }

    #[test]
    fn the_cap_counts_blobs_served_at_once() {
        let mut slots = ServeSlots::new(2);
        assert!(matches!(
            slots.try_take("h1", "b"),
            SlotDecision::Granted { .. }
        ));
        assert!(matches!(
            slots.try_take("h2", "c"),
            SlotDecision::Granted { .. }
        ));
        assert_eq!(slots.try_take("h3", "d"), SlotDecision::Busy);
    }
}
