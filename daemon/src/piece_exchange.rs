//! The node's side of the piece exchange, shared by the two shells that move pieces: sync
//! (fetching) records what this node holds of the blobs it is fetching and what its peers hold;
//! the control server (serving peers) asks it whether to send a piece now. The decisions are
//! [`crate::swarm`]'s; this module keeps their state behind one lock and turns the upload
//! queue's answers into wake-ups for the requests waiting on them.
//!
//! Peers are named here by the node name their certificate carries: the one name both shells
//! know a peer by (sync dials addresses, the server sees certificates).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use edged_control::wire::{PartialBlob, PieceRefusal};
use tokio::sync::{Notify, oneshot};

use crate::lock::lock;
use crate::swarm::{PieceSet, ServeDecision, UploadConfig, UploadEvent, UploadId, Uploads};

struct Inner {
    /// Blobs being fetched piecewise here: size and the pieces verified so far.
    partial: BTreeMap<String, (u64, PieceSet)>,
    uploads: Uploads<String, String>,
    /// Requests queued for an upload slot, by the id the queue gave them.
    waiting: HashMap<UploadId, oneshot::Sender<ServeDecision>>,
}

/// What this node holds in part and serves: see the module header.
pub struct PieceExchange {
    inner: Mutex<Inner>,
    /// Something changed the upload queue (a slot freed, a request queued).
    changed: Notify,
}

/// The slot of one piece upload; given back as delivered or not when it drops.
pub struct UploadSlot {
    exchange: Arc<PieceExchange>,
    id: UploadId,
    delivered: bool,
}

impl UploadSlot {
    /// The peer acknowledged every byte of the piece (quinn: the stream finished and was acked).
    pub fn delivered(mut self) {
        self.delivered = true;
        lock(&self.exchange.inner)
            .uploads
            .delivered(Instant::now(), self.id);
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        if !self.delivered {
            lock(&self.exchange.inner)
                .uploads
                .aborted(Instant::now(), self.id);
        }
        self.exchange.changed.notify_one();
    }
}

impl PieceExchange {
    pub fn new(config: UploadConfig) -> Arc<PieceExchange> {
        Arc::new(PieceExchange {
            inner: Mutex::new(Inner {
                partial: BTreeMap::new(),
                uploads: Uploads::new(config),
                waiting: HashMap::new(),
            }),
            changed: Notify::new(),
        })
    }

    // --- the fetching side (sync) ---

    /// This node starts (or resumes) fetching `hash` piecewise, holding `held` already.
    pub fn fetching(&self, hash: &str, size: u64, held: PieceSet) {
        lock(&self.inner)
            .partial
            .insert(hash.to_string(), (size, held));
    }

    /// Piece `index` of `hash` verified and is on disk: it may be served from now on.
    pub fn verified(&self, hash: &str, index: u32) {
        if let Some((_, held)) = lock(&self.inner).partial.get_mut(hash) {
            held.insert(index);
        }
    }

    /// The blob is whole in the store now (or its fetch ended): it is no longer partial here.
    pub fn finished(&self, hash: &str) {
        lock(&self.inner).partial.remove(hash);
    }

    /// What this node holds in part, for its holdings answer.
    pub fn partial_blobs(&self) -> Vec<PartialBlob> {
        lock(&self.inner)
            .partial
            .iter()
            .filter(|(_, (_, held))| held.count() > 0)
            .map(|(hash, (size, held))| PartialBlob {
                hash: hash.clone(),
                size: *size,
                pieces: held.to_hex(),
            })
            .collect()
    }

    /// The verified pieces of a blob being fetched here.
    pub fn held(&self, hash: &str) -> Option<(u64, PieceSet)> {
        lock(&self.inner).partial.get(hash).cloned()
    }

    /// What peer `node` holds of `hash` (a blob of `size` bytes), from its holdings answer: the
    /// origin's super-seeding sends a piece elsewhere only when another node has it.
    pub fn peer_holdings(&self, hash: &str, node: &str, has: &PieceSet) {
        lock(&self.inner)
            .uploads
            .peer_holdings(&hash.to_string(), &node.to_string(), has);
    }

    /// Peer `node` verified piece `index` of `hash` (its have message).
    pub fn peer_has(&self, hash: &str, node: &str, index: u32) {
        lock(&self.inner)
            .uploads
            .peer_has(&hash.to_string(), &node.to_string(), index);
    }

    /// Peer `node` is unreachable: what it said it holds no longer counts.
    pub fn peer_lost(&self, node: &str) {
        lock(&self.inner).uploads.peer_lost(&node.to_string());
    }

    // --- the serving side (the control server) ---

    /// This node is the origin of `hash` (an operator pushed it here): super-seed it.
    pub fn seed(&self, hash: &str, size: u64) {
        let mut inner = lock(&self.inner);
        if inner.uploads.seeder(&hash.to_string()).is_none() {
            inner.uploads.seed(hash.to_string(), size);
        }
    }

    /// Peer `node` asks for piece `index` of `hash` (`size` bytes, of which this node holds
    /// `held`): a slot once one is free and the piece is this node's to send, or why not.
    pub async fn admit(
        self: &Arc<Self>,
        node: &str,
        hash: &str,
        size: u64,
        index: u32,
        held: &PieceSet,
    ) -> Result<UploadSlot, PieceRefusal> {
        let decision = lock(&self.inner).uploads.request(
            Instant::now(),
            &node.to_string(),
            &hash.to_string(),
            size,
            index,
            held,
        );
        let slot = |id| UploadSlot {
            exchange: self.clone(),
            id,
            delivered: false,
        };
        match decision {
            ServeDecision::Serve(id) => Ok(slot(id)),
            ServeDecision::Queued(id) => {
                let (tx, rx) = oneshot::channel();
                lock(&self.inner).waiting.insert(id, tx);
                self.changed.notify_one();
                // If this request goes away while queued, its place is given up.
                let mut place = QueuePlace {
                    exchange: self,
                    id,
                    armed: true,
                };
                let answer = rx.await.unwrap_or(ServeDecision::Busy);
                place.armed = false;
                match answer {
                    ServeDecision::Serve(id) | ServeDecision::Queued(id) => Ok(slot(id)),
                    other => Err(refusal(other)),
                }
            }
            other => Err(refusal(other)),
        }
    }

    /// Whether any piece upload is in progress.
    pub fn uploading(&self) -> bool {
        lock(&self.inner).uploads.active() > 0
    }

    /// Drives the upload queue: hands freed slots to waiting requests, turns away those that
    /// waited too long, and gives up uploads the peer never acknowledged. Runs for the node's
    /// life.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = {
                let mut inner = lock(&self.inner);
                let events = inner.uploads.poll(Instant::now());
                for event in events {
                    match event {
                        UploadEvent::Start(id) => {
                            if let Some(tx) = inner.waiting.remove(&id)
                                && tx.send(ServeDecision::Serve(id)).is_err()
                            {
                                // The asker went away while its slot came free.
                                inner.uploads.aborted(Instant::now(), id);
                            }
                        }
                        UploadEvent::Answer(id, decision) => {
                            if let Some(tx) = inner.waiting.remove(&id) {
                                let _ = tx.send(decision);
                            }
                        }
                        // The serving task notices through its own delivery deadline; the slot
                        // is free already.
                        UploadEvent::Expired(_) => {}
                    }
                }
                inner.uploads.next_deadline()
            };
            match next {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), self.changed.notified()).await;
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// A queued request's place, given up if the request is dropped before it got an answer.
struct QueuePlace<'a> {
    exchange: &'a Arc<PieceExchange>,
    id: UploadId,
    armed: bool,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = lock(&self.exchange.inner);
            inner.waiting.remove(&self.id);
            inner.uploads.aborted(Instant::now(), self.id);
        }
    }
}

fn refusal(decision: ServeDecision) -> PieceRefusal {
    match decision {
        ServeDecision::AskOthers => PieceRefusal::AskOthers,
        ServeDecision::NotHeld => PieceRefusal::NotHeld,
        _ => PieceRefusal::Busy,
    }
}
