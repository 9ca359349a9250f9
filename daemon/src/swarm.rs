//! Piece exchange (swarming), sans-IO: which pieces of a blob a node asks which peer for, and
//! which piece requests it answers, so a new deployment spreads through the fleet as verified
//! pieces with the origin uploading about one copy (BitTorrent's rules, as Uber's Kraken applies
//! them to blobs). Nothing here touches a socket, clock or file: every decision takes `now`, and
//! the shells (the syncer and the peer server, and the simulated swarm in the tests) move the
//! bytes and feed back what happened.
//!
//! A blob of `size` bytes is cut into [`PIECE`]-byte pieces (the last one shorter). A piece is
//! fetched as the Bao slice of its byte range ([`piece_range`]) and counts only once that slice
//! verified against the signed BLAKE3 hash; what a node holds of a blob is a [`PieceSet`].
//!
//! **Fetching** ([`BlobSwarm`], one per blob a node is getting). The shell feeds in:
//! - peers and what they hold: [`BlobSwarm::peer_holdings`] from each holdings answer (the whole
//!   set, and whether that peer is the blob's origin, the node an operator pushed to),
//!   [`BlobSwarm::peer_has`] from each "have" message (a peer verified one more piece), and
//!   [`BlobSwarm::peer_lost`] when its connection closed or its holdings went unanswered;
//! - how each request ended: [`BlobSwarm::piece_verified`] (the slice verified and is stored),
//!   [`BlobSwarm::piece_failed`] (it failed verification), [`BlobSwarm::refused`] (the peer
//!   answered busy / ask others / not held, or the stream failed);
//! - time: [`BlobSwarm::poll`] whenever something was fed in, and at the latest at
//!   [`BlobSwarm::next_wakeup`].
//!
//! [`BlobSwarm::poll`] returns the [`Action`]s to take: requests to open, requests to cancel
//! (stalled, or lost the endgame race), peers to penalise. After a piece verifies the shell tells
//! its peers (a have message) and may serve it at once.
//!
//! The fetching rules: rarest piece first (fewest peers advertise it), ties broken by a hash of
//! (node seed, piece) so fetchers spread over equal pieces and a test run is reproducible; at most
//! [`SwarmConfig::per_peer`] requests outstanding per peer and [`SwarmConfig::max_in_flight`] per
//! blob, so requests are paced by delivery (one completes only when its piece verified); one
//! request per piece, except in the endgame (every missing piece requested and at most
//! [`SwarmConfig::endgame_pieces`] missing), where a second peer is asked too and the loser is
//! cancelled; a request with no piece after [`BlobSwarm::stall_timeout`] (three times the
//! piece's time at the rate measured from that peer, at least five seconds) is cancelled and the
//! piece asked elsewhere; a peer whose piece failed verification is penalised and never asked
//! again for this blob; the origin is asked only for pieces no other usable peer advertises.
//!
//! **Uploading** ([`Uploads`], one per node). The peer server asks [`Uploads::request`] for every
//! piece request and gets a [`ServeDecision`]: a node serves any piece it holds verified (whole
//! blob or partial), never one it does not; at most `max_uploads` pieces at once, each slot held
//! until the shell reports [`Uploads::delivered`] (quinn acknowledged the whole stream, not when
//! the bytes were buffered) or [`Uploads::aborted`]; an upload the peer does not acknowledge in
//! time is given up ([`Uploads::expired`]). For the blobs this node is the origin of
//! ([`Uploads::seed`]) a [`SuperSeeder`] keeps its egress near one copy: each piece goes to its
//! first requester, and a piece already uploaded (or being uploaded) that another node holds is
//! refused with "ask others" for [`UploadConfig::spread_patience`] after its first delivery, so
//! a badly connected node still gets it. A peer a piece was delivered to counts as its holder
//! at once; the others' holdings and have messages tell the rest.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

pub use edged_control::verified::{PIECE, piece_count, piece_range};

fn piece_bytes(size: u64, piece: u32) -> u64 {
    piece_range(size, piece).1
}

/// Why a piece set from a peer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceSetError {
    #[error("a set of {pieces} pieces is {expected} bytes, not {got}")]
    Length {
        pieces: u32,
        expected: usize,
        got: usize,
    },
    #[error("bits are set beyond the last of {pieces} pieces")]
    BeyondEnd { pieces: u32 },
    #[error("not a hex string: {0:?}")]
    NotHex(String),
    #[error("a set of {got} pieces for a blob of {expected}")]
    WrongBlob { expected: u32, got: u32 },
}

/// Which pieces of one blob a node holds verified: a bitfield.
///
/// On the wire it is [`PieceSet::to_bytes`] (piece `i` is bit `i % 8` of byte `i / 8`, least
/// significant first; `ceil(pieces / 8)` bytes) or the same bytes as lowercase hex
/// ([`PieceSet::to_hex`]) in a JSON holdings message. The reader knows the piece count from the
/// signed size, and refuses a set of another length or with bits past the end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PieceSet {
    pieces: u32,
    words: Vec<u64>,
}

impl PieceSet {
    /// No piece of `pieces`.
    pub fn empty(pieces: u32) -> PieceSet {
        PieceSet {
            pieces,
            words: vec![0; pieces.div_ceil(64) as usize],
        }
    }

    /// Every piece of `pieces`: a whole blob.
    pub fn full(pieces: u32) -> PieceSet {
        let mut set = PieceSet::empty(pieces);
        for word in &mut set.words {
            *word = u64::MAX;
        }
        set.clear_tail();
        set
    }

    fn clear_tail(&mut self) {
        let tail = self.pieces % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// The blob's piece count (held or not).
    pub fn pieces(&self) -> u32 {
        self.pieces
    }

    /// Pieces held.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.count() == self.pieces
    }

    pub fn contains(&self, piece: u32) -> bool {
        piece < self.pieces && self.words[(piece / 64) as usize] & (1 << (piece % 64)) != 0
    }

    /// Adds `piece`; whether it was missing. A piece past the end is ignored.
    pub fn insert(&mut self, piece: u32) -> bool {
        if piece >= self.pieces || self.contains(piece) {
            return false;
        }
        self.words[(piece / 64) as usize] |= 1 << (piece % 64);
        true
    }

    /// Removes `piece`; whether it was held.
    pub fn remove(&mut self, piece: u32) -> bool {
        if !self.contains(piece) {
            return false;
        }
        self.words[(piece / 64) as usize] &= !(1 << (piece % 64));
        true
    }

    /// The pieces held, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.pieces).filter(|&p| self.contains(p))
    }

    /// The pieces not held, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.pieces).filter(|&p| !self.contains(p))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.pieces.div_ceil(8) as usize;
        self.words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(len)
            .collect()
    }

    /// The set of `pieces` that `bytes` ([`PieceSet::to_bytes`]) encode.
    pub fn from_bytes(pieces: u32, bytes: &[u8]) -> Result<PieceSet, PieceSetError> {
        let expected = pieces.div_ceil(8) as usize;
        if bytes.len() != expected {
            return Err(PieceSetError::Length {
                pieces,
                expected,
                got: bytes.len(),
            });
        }
        let mut set = PieceSet::empty(pieces);
        for (word, chunk) in set.words.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(le);
        }
        let whole = set.clone();
        set.clear_tail();
        if set != whole {
            return Err(PieceSetError::BeyondEnd { pieces });
        }
        Ok(set)
    }

    pub fn to_hex(&self) -> String {
        self.to_bytes().iter().fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
    }

    pub fn from_hex(pieces: u32, hex: &str) -> Result<PieceSet, PieceSetError> {
        let not_hex = || PieceSetError::NotHex(hex.chars().take(16).collect());
        if !hex.is_ascii() || !hex.len().is_multiple_of(2) {
            return Err(not_hex());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).map_err(|_| not_hex()))
            .collect::<Result<Vec<u8>, _>>()?;
        PieceSet::from_bytes(pieces, &bytes)
    }
}

/// A well-spread 64-bit mix (SplitMix64's finaliser): the cheap deterministic "random" that
/// breaks ties, so equal choices differ between nodes but not between runs.
fn mix(seed: u64, value: u64) -> u64 {
    let mut z = seed ^ value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The fetching side's knobs; [`SwarmConfig::default`] is what the simulated swarm measured.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Requests outstanding to one peer at once.
    pub per_peer: u32,
    /// Requests outstanding for the blob at once (across peers, endgame duplicates included).
    pub max_in_flight: u32,
    /// The endgame (duplicate requests) starts when every missing piece is requested and at
    /// most this many are missing.
    pub endgame_pieces: u32,
    /// A request is given up after `stall_factor` times the piece's expected time at the peer's
    /// measured rate...
    pub stall_factor: u32,
    /// ...but never sooner than this.
    pub stall_floor: Duration,
    /// The rate assumed for a peer nothing was fetched from yet (bytes/s): it sets the first
    /// request's timeout (3 × 256 KiB at 64 KiB/s = 12 s).
    pub assumed_rate: f64,
    /// A peer that answered busy is not asked again for this long, doubling with each busy
    /// answer in a row up to `busy_pause_max`.
    pub busy_pause: Duration,
    pub busy_pause_max: Duration,
    /// A peer that answered "ask others" for a piece is not asked for that piece for this long.
    pub ask_others_pause: Duration,
    /// A peer whose request stalled or failed is not asked again for this long.
    pub failure_pause: Duration,
}

impl Default for SwarmConfig {
    fn default() -> SwarmConfig {
        SwarmConfig {
            per_peer: 2,
            max_in_flight: 8,
            endgame_pieces: 4,
            stall_factor: 3,
            stall_floor: Duration::from_secs(5),
            assumed_rate: 64.0 * 1024.0,
            busy_pause: Duration::from_millis(250),
            busy_pause_max: Duration::from_secs(2),
            ask_others_pause: Duration::from_secs(1),
            failure_pause: Duration::from_secs(5),
        }
    }
}

/// What the fetching shell does next, from [`BlobSwarm::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `peer` for `piece`: the Bao slice of [`piece_range`]`(size, piece)`.
    Request { peer: P, piece: u32 },
    /// Stop the request for `piece` to `peer` (reset its stream); a piece that still arrives
    /// from it is taken all the same if it verifies.
    Cancel {
        peer: P,
        piece: u32,
        why: CancelReason,
    },
    /// `peer` served a piece that failed verification: penalise it in the peer table. It is
    /// not asked for anything of this blob again.
    Penalise { peer: P, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// No piece within [`BlobSwarm::stall_timeout`]: asked elsewhere.
    Stalled,
    /// Another peer delivered it first (endgame).
    Duplicate,
    /// The peer was penalised.
    Penalised,
}

/// How a peer turned a request down, for [`BlobSwarm::refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every upload slot of it is taken ([`ServeDecision::Busy`]).
    Busy,
    /// It is the origin and others hold that piece ([`ServeDecision::AskOthers`]).
    AskOthers,
    /// It does not hold the piece after all ([`ServeDecision::NotHeld`]).
    NotHeld,
    /// The stream or connection failed before the piece arrived.
    Failed,
}

#[derive(Debug, Clone)]
struct InFlight<P> {
    peer: P,
    since: Instant,
}

#[derive(Debug, Clone)]
struct PeerView {
    has: PieceSet,
    /// The node an operator pushed the blob to: asked only for pieces nobody else has.
    origin: bool,
    /// Served a piece that failed verification: never asked again for this blob.
    banned: bool,
    /// Bytes/s per request from it, an EWMA over verified pieces.
    rate: Option<f64>,
    outstanding: u32,
    paused_until: Option<Instant>,
    busy_streak: u32,
    /// Pieces it told us to fetch elsewhere, until when.
    refused: BTreeMap<u32, Instant>,
    /// Tie-break between equal peers.
    salt: u64,
}

impl PeerView {
    fn usable(&self, now: Instant) -> bool {
        !self.banned && self.paused_until.is_none_or(|until| now >= until)
    }

    fn counts(&self) -> bool {
        !self.banned && !self.origin
    }
}

/// One blob a node is fetching: what it holds, what is in flight from whom, what each peer
/// advertises. `P` is how the shell names a peer (its address; an index in the simulation).
#[derive(Debug)]
pub struct BlobSwarm<P> {
    size: u64,
    seed: u64,
    config: SwarmConfig,
    held: PieceSet,
    /// Per piece, how many usable peers other than the origin advertise it (its rarity).
    holders: Vec<u32>,
    in_flight: BTreeMap<u32, Vec<InFlight<P>>>,
    requests: u32,
    peers: BTreeMap<P, PeerView>,
    pending: Vec<Action<P>>,
}

/// Weight of the newest sample in a peer's rate estimate.
const RATE_WEIGHT: f64 = 0.3;

impl<P: Clone + Ord + Hash> BlobSwarm<P> {
    /// A fetch of a `size`-byte blob starting from the pieces already verified on disk (`held`,
    /// from the resumable partial; [`PieceSet::empty`] for a new fetch). `seed` makes this
    /// node's tie-breaks its own (a hash of its node name); the same seed gives the same choices.
    pub fn new(size: u64, held: PieceSet, seed: u64, config: SwarmConfig) -> BlobSwarm<P> {
        let pieces = piece_count(size);
        assert_eq!(held.pieces(), pieces, "held pieces of another blob");
        BlobSwarm {
            size,
            seed,
            config,
            held,
            holders: vec![0; pieces as usize],
            in_flight: BTreeMap::new(),
            requests: 0,
            peers: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The pieces verified so far: what this node may serve and what resume state records.
    pub fn held(&self) -> &PieceSet {
        &self.held
    }

    pub fn is_complete(&self) -> bool {
        self.held.is_complete()
    }

    /// Requests outstanding (for status).
    pub fn in_flight(&self) -> impl Iterator<Item = (u32, &P)> + '_ {
        self.in_flight
            .iter()
            .flat_map(|(&piece, reqs)| reqs.iter().map(move |r| (piece, &r.peer)))
    }

    /// The measured rate from `peer` in bytes/s, once a piece came from it.
    pub fn rate(&self, peer: &P) -> Option<f64> {
        self.peers.get(peer).and_then(|p| p.rate)
    }

    fn count_holdings(&mut self, peer: &P, add: bool) {
        let Some(view) = self.peers.get(peer) else {
            return;
        };
        if !view.counts() {
            return;
        }
        for piece in view.has.iter() {
            let n = &mut self.holders[piece as usize];
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
        }
    }

    /// A peer's whole holdings of this blob (from a holdings answer), replacing what it said
    /// before; `origin` is whether the blob was pushed to it. A set of another length is
    /// refused (the peer is confused or lying about the blob).
    pub fn peer_holdings(
        &mut self,
        peer: P,
        has: PieceSet,
        origin: bool,
    ) -> Result<(), PieceSetError> {
        if has.pieces() != self.held.pieces() {
            return Err(PieceSetError::WrongBlob {
                expected: self.held.pieces(),
                got: has.pieces(),
            });
        }
        self.count_holdings(&peer, false);
        let salt = mix(self.seed, hash_of(&peer));
        let view = self.peers.entry(peer.clone()).or_insert_with(|| PeerView {
            has: PieceSet::empty(has.pieces()),
            origin,
            banned: false,
            rate: None,
            outstanding: 0,
            paused_until: None,
            busy_streak: 0,
            refused: BTreeMap::new(),
            salt,
        });
        view.has = has;
        view.origin = origin;
        self.count_holdings(&peer, true);
        Ok(())
    }

    /// `peer` verified `piece` (a have message). Unknown peers are ignored until their
    /// holdings arrive.
    pub fn peer_has(&mut self, peer: &P, piece: u32) {
        let Some(view) = self.peers.get_mut(peer) else {
            return;
        };
        if view.has.insert(piece) && view.counts() {
            self.holders[piece as usize] += 1;
        }
    }

    /// `peer`'s connection is gone (closed, or its holdings went unanswered): what it had in
    /// flight is asked elsewhere (no cancel needed, its streams are dead) and what it
    /// advertised no longer counts until its next holdings. A penalty stays.
    pub fn peer_lost(&mut self, peer: &P) {
        self.count_holdings(peer, false);
        if let Some(view) = self.peers.get_mut(peer) {
            view.has = PieceSet::empty(view.has.pieces());
        }
        self.drop_requests_of(peer, None);
    }

    /// Removes `peer`'s requests (all, or for one piece); emits a cancel for each with `why`.
    fn drop_requests_of(&mut self, peer: &P, why: Option<CancelReason>) {
        let mut dropped = 0;
        self.in_flight.retain(|&piece, reqs| {
            let before = reqs.len();
            reqs.retain(|r| &r.peer != peer);
            if reqs.len() < before {
                dropped += 1;
                if let Some(why) = why {
                    self.pending.push(Action::Cancel {
                        peer: peer.clone(),
                        piece,
                        why,
                    });
                }
            }
            !reqs.is_empty()
        });
        self.requests -= dropped;
        if let Some(view) = self.peers.get_mut(peer) {
            view.outstanding = 0;
        }
    }

    /// Removes the request for `piece` to `peer`, if there is one; when it was sent.
    fn take_request(&mut self, peer: &P, piece: u32) -> Option<Instant> {
        let reqs = self.in_flight.get_mut(&piece)?;
        let at = reqs.iter().position(|r| &r.peer == peer)?;
        let since = reqs.swap_remove(at).since;
        if reqs.is_empty() {
            self.in_flight.remove(&piece);
        }
        self.requests -= 1;
        if let Some(view) = self.peers.get_mut(peer) {
            view.outstanding -= 1;
        }
        Some(since)
    }

    /// `piece` from `peer` verified against the signed hash and is stored. Returns whether it
    /// is new (then tell the peers, and it may be served). In the endgame the other requests
    /// for it are cancelled (see [`BlobSwarm::poll`]).
    pub fn piece_verified(&mut self, now: Instant, peer: &P, piece: u32) -> bool {
        if let Some(since) = self.take_request(peer, piece)
            && let Some(view) = self.peers.get_mut(peer)
        {
            let secs = now.saturating_duration_since(since).as_secs_f64().max(1e-3);
            let sample = piece_bytes(self.size, piece) as f64 / secs;
            view.rate = Some(match view.rate {
                Some(rate) => rate * (1.0 - RATE_WEIGHT) + sample * RATE_WEIGHT,
                None => sample,
            });
            view.busy_streak = 0;
        }
        if !self.held.insert(piece) {
            return false;
        }
        for other in self.in_flight.remove(&piece).unwrap_or_default() {
            self.requests -= 1;
            if let Some(view) = self.peers.get_mut(&other.peer) {
                view.outstanding -= 1;
            }
            self.pending.push(Action::Cancel {
                peer: other.peer,
                piece,
                why: CancelReason::Duplicate,
            });
        }
        true
    }

    /// `piece` from `peer` failed verification (nothing of it was kept): `peer` is penalised
    /// ([`Action::Penalise`]), its other requests are cancelled, and it is not asked for this
    /// blob again; the piece is asked elsewhere.
    pub fn piece_failed(&mut self, peer: &P, piece: u32, reason: impl Into<String>) {
        self.take_request(peer, piece);
        if self.peers.get(peer).is_some_and(|v| v.banned) {
            return;
        }
        self.count_holdings(peer, false);
        if let Some(view) = self.peers.get_mut(peer) {
            view.banned = true;
        }
        self.drop_requests_of(peer, Some(CancelReason::Penalised));
        self.pending.push(Action::Penalise {
            peer: peer.clone(),
            reason: reason.into(),
        });
    }

    /// `peer` turned the request for `piece` down, or its stream failed.
    pub fn refused(&mut self, now: Instant, peer: &P, piece: u32, why: Refusal) {
        self.take_request(peer, piece);
        let (busy, ask_others, failure) = (
            self.config.busy_pause,
            self.config.ask_others_pause,
            self.config.failure_pause,
        );
        let max_busy = self.config.busy_pause_max;
        let Some(view) = self.peers.get_mut(peer) else {
            return;
        };
        match why {
            Refusal::Busy => {
                let pause = busy
                    .saturating_mul(1 << view.busy_streak.min(8))
                    .min(max_busy);
                // Spread the retries of fetchers turned away at once: 75–100% of the pause.
                let spread = (mix(
                    view.salt,
                    u64::from(view.busy_streak) << 32 | u64::from(piece),
                ) % 1024) as f64
                    / 4096.0;
                view.paused_until = Some(now + pause.mul_f64(0.75 + spread));
                view.busy_streak += 1;
            }
            Refusal::AskOthers => {
                view.refused.insert(piece, now + ask_others);
            }
            Refusal::NotHeld => {
                if view.has.remove(piece) && view.counts() {
                    self.holders[piece as usize] -= 1;
                }
            }
            Refusal::Failed => view.paused_until = Some(now + failure),
        }
    }

    /// How long a request of `bytes` to `peer` may go without its piece.
    pub fn stall_timeout(&self, peer: &P, bytes: u64) -> Duration {
        let rate = self
            .peers
            .get(peer)
            .and_then(|v| v.rate)
            .unwrap_or(self.config.assumed_rate);
        let expected = Duration::from_secs_f64(bytes as f64 / rate.max(1.0));
        expected
            .saturating_mul(self.config.stall_factor)
            .max(self.config.stall_floor)
    }

    /// When [`BlobSwarm::poll`] should run again if nothing is fed in before: the first stall
    /// deadline or end of a pause. `None` when nothing is waiting.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let stalls = self.in_flight.iter().flat_map(|(&piece, reqs)| {
            reqs.iter()
                .map(move |r| r.since + self.stall_timeout(&r.peer, piece_bytes(self.size, piece)))
        });
        let pauses = self.peers.values().flat_map(|v| {
            v.paused_until
                .into_iter()
                .chain(v.refused.values().copied())
        });
        stalls.chain(pauses).min()
    }

    /// What to do now: cancels and penalties from the inputs since the last poll, requests
    /// that stalled, and new requests (rarest first) for the room the limits leave.
    pub fn poll(&mut self, now: Instant) -> Vec<Action<P>> {
        self.expire_stalled(now);
        if !self.held.is_complete() {
            self.request_more(now);
        }
        std::mem::take(&mut self.pending)
    }

    fn expire_stalled(&mut self, now: Instant) {
        let mut stalled = Vec::new();
        for (&piece, reqs) in &self.in_flight {
            for r in reqs {
                if now >= r.since + self.stall_timeout(&r.peer, piece_bytes(self.size, piece)) {
                    stalled.push((r.peer.clone(), piece, r.since));
                }
            }
        }
        for (peer, piece, since) in stalled {
            self.take_request(&peer, piece);
            let bytes = piece_bytes(self.size, piece) as f64;
            let pause = self.config.failure_pause;
            if let Some(view) = self.peers.get_mut(&peer) {
                // It delivered nothing in this time: at best this slow, for the next timeout.
                let observed = bytes / now.saturating_duration_since(since).as_secs_f64();
                view.rate = Some(view.rate.map_or(observed, |r| r.min(observed)));
                view.paused_until = Some(now + pause);
            }
            self.pending.push(Action::Cancel {
                peer,
                piece,
                why: CancelReason::Stalled,
            });
        }
    }

    /// The best peer to ask for `piece` now, if one has room: among usable peers that
    /// advertise it, the one with fewest requests outstanding, then the fastest. The origin
    /// only when no other usable peer advertises it.
    fn pick_peer(&self, now: Instant, piece: u32, exclude: Option<&P>) -> Option<P> {
        let candidates = |origin: bool| {
            self.peers
                .iter()
                .filter(move |(peer, v)| {
                    v.origin == origin
                        && Some(*peer) != exclude
                        && v.usable(now)
                        && v.outstanding < self.config.per_peer
                        && v.has.contains(piece)
                        && v.refused.get(&piece).is_none_or(|until| now >= *until)
                })
                .min_by(|(_, a), (_, b)| {
                    let rate = |v: &PeerView| v.rate.unwrap_or(self.config.assumed_rate);
                    a.outstanding
                        .cmp(&b.outstanding)
                        .then(rate(b).total_cmp(&rate(a)))
                        .then(mix(a.salt, piece.into()).cmp(&mix(b.salt, piece.into())))
                })
                .map(|(peer, _)| peer.clone())
        };
        // The origin only for pieces no other usable peer advertises: its upload is the one
        // every node would otherwise wait on.
        if self.holders[piece as usize] == 0 {
            candidates(true)
        } else {
            candidates(false)
        }
    }

    fn send(&mut self, now: Instant, peer: P, piece: u32) {
        self.in_flight.entry(piece).or_default().push(InFlight {
            peer: peer.clone(),
            since: now,
        });
        self.requests += 1;
        if let Some(view) = self.peers.get_mut(&peer) {
            view.outstanding += 1;
        }
        self.pending.push(Action::Request { peer, piece });
    }

    fn request_more(&mut self, now: Instant) {
        for view in self.peers.values_mut() {
            view.refused.retain(|_, until| now < *until);
            if view.paused_until.is_some_and(|until| now >= until) {
                view.paused_until = None;
            }
        }
        if self.requests >= self.config.max_in_flight {
            return;
        }
        let mut candidates: Vec<(u32, u64, u32)> = self
            .held
            .missing()
            .filter(|p| !self.in_flight.contains_key(p))
            .map(|p| (self.holders[p as usize], mix(self.seed, p.into()), p))
            .collect();
        candidates.sort_unstable();
        let unrequested = candidates.len();
        for (_, _, piece) in candidates {
            if self.requests >= self.config.max_in_flight {
                return;
            }
            if let Some(peer) = self.pick_peer(now, piece, None) {
                self.send(now, peer, piece);
            }
        }
        let missing = self.held.pieces() - self.held.count();
        if unrequested > 0 || missing > self.config.endgame_pieces {
            return;
        }
        // Endgame: every missing piece is requested; ask a second peer (never the origin) for
        // each piece still waiting on one, the first to deliver wins.
        let waiting: Vec<(u32, P)> = self
            .in_flight
            .iter()
            .filter(|(_, reqs)| reqs.len() == 1)
            .map(|(&piece, reqs)| (piece, reqs[0].peer.clone()))
            .collect();
        for (piece, first) in waiting {
            if self.requests >= self.config.max_in_flight {
                return;
            }
            if self.holders[piece as usize] == 0 {
                continue;
            }
            if let Some(peer) = self.pick_peer(now, piece, Some(&first)) {
                self.send(now, peer, piece);
            }
        }
    }
}

/// The uploading side's knobs.
#[derive(Debug, Clone)]
pub struct UploadConfig {
    /// Pieces uploaded at once, across blobs and peers (`[sync] max_uploads`).
    pub max_uploads: usize,
    /// Requests waiting for a slot; more are answered busy.
    pub max_queued: usize,
    /// A request waits this long for a slot at most, then is answered busy.
    pub queue_patience: Duration,
    /// An upload not acknowledged within `stall_factor` × its expected time at the peer's
    /// measured delivery rate (at least `stall_floor`) is given up.
    pub stall_factor: u32,
    pub stall_floor: Duration,
    /// The delivery rate assumed for a peer nothing was delivered to yet (bytes/s).
    pub assumed_rate: f64,
    /// How long after the origin first delivered a piece it keeps telling peers to fetch it
    /// elsewhere; after that a peer still asking has no other holder of it and is served.
    pub spread_patience: Duration,
}

impl Default for UploadConfig {
    fn default() -> UploadConfig {
        UploadConfig {
            max_uploads: 6,
            max_queued: 8,
            queue_patience: Duration::from_secs(2),
            stall_factor: 3,
            stall_floor: Duration::from_secs(5),
            assumed_rate: 64.0 * 1024.0,
            spread_patience: Duration::from_secs(15),
        }
    }
}

/// The answer to a peer's piece request, from [`Uploads::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeDecision {
    /// Stream the piece's Bao slice, then report [`Uploads::delivered`] once quinn says the
    /// peer acknowledged the whole stream ([`Uploads::aborted`] if it failed).
    Serve(UploadId),
    /// Keep the stream open: [`Uploads::poll`] says later whether it is served
    /// ([`UploadEvent::Start`]) or answered ([`UploadEvent::Answer`]).
    Queued(UploadId),
    /// Every upload slot is taken and enough requests wait: the peer asks again shortly or
    /// elsewhere.
    Busy,
    /// This node is the origin, already uploaded that piece (or is uploading it) and another
    /// node holds it: fetch it there.
    AskOthers,
    /// This node does not hold that piece verified (it never serves what it has not verified).
    NotHeld,
}

/// What the serving shell does next, from [`Uploads::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadEvent {
    /// The queued request `id` has a slot now: stream it (as for [`ServeDecision::Serve`]).
    Start(UploadId),
    /// Answer the queued request `id` with this (busy or ask others) and close its stream.
    Answer(UploadId, ServeDecision),
    /// The upload `id` was not acknowledged in time (the peer died or cannot take it): reset
    /// its stream. Its slot is free already.
    Expired(UploadId),
}

/// One piece request granted or waiting, named in [`ServeDecision`] and [`UploadEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(u64);

#[derive(Debug, Clone)]
struct Upload<P, B> {
    peer: P,
    blob: B,
    piece: u32,
    bytes: u64,
    /// Queued since, then started at.
    since: Instant,
}

/// What a node's peers hold of one blob, as they told it: who else can serve each piece.
#[derive(Debug, Clone)]
struct Advertised<P> {
    sets: BTreeMap<P, PieceSet>,
    /// Per piece, how many peers advertise it.
    counts: Vec<u32>,
}

impl<P: Clone + Ord> Advertised<P> {
    fn new(pieces: u32) -> Advertised<P> {
        Advertised {
            sets: BTreeMap::new(),
            counts: vec![0; pieces as usize],
        }
    }

    fn count(&mut self, peer: &P, add: bool) {
        if let Some(set) = self.sets.get(peer) {
            for piece in set.iter() {
                let n = &mut self.counts[piece as usize];
                *n = if add { *n + 1 } else { n.saturating_sub(1) };
            }
        }
    }

    fn holdings(&mut self, peer: &P, has: &PieceSet) {
        if has.pieces() as usize != self.counts.len() {
            return;
        }
        self.count(peer, false);
        self.sets.insert(peer.clone(), has.clone());
        self.count(peer, true);
    }

    fn has(&mut self, peer: &P, piece: u32) {
        let pieces = self.counts.len() as u32;
        let set = self
            .sets
            .entry(peer.clone())
            .or_insert_with(|| PieceSet::empty(pieces));
        if set.insert(piece) {
            self.counts[piece as usize] += 1;
        }
    }

    fn lost(&mut self, peer: &P) {
        self.count(peer, false);
        self.sets.remove(peer);
    }

    /// Peers other than `peer` that advertise `piece`.
    fn others(&self, peer: &P, piece: u32) -> u32 {
        let own = self.sets.get(peer).is_some_and(|s| s.contains(piece));
        self.counts
            .get(piece as usize)
            .map_or(0, |n| n.saturating_sub(u32::from(own)))
    }
}

/// The origin's bookkeeping for one blob it seeds: how often each piece went out, so each
/// piece leaves the origin about once.
#[derive(Debug, Clone)]
pub struct SuperSeeder {
    /// Uploads of each piece in progress.
    serving: Vec<u32>,
    /// Uploads of each piece delivered.
    served: Vec<u32>,
    /// When each piece was first delivered.
    first_served: Vec<Option<Instant>>,
}

impl SuperSeeder {
    fn new(pieces: u32) -> SuperSeeder {
        SuperSeeder {
            serving: vec![0; pieces as usize],
            served: vec![0; pieces as usize],
            first_served: vec![None; pieces as usize],
        }
    }

    /// Times `piece` was delivered from here.
    pub fn served(&self, piece: u32) -> u32 {
        self.served.get(piece as usize).copied().unwrap_or(0)
    }

    /// Whether to tell `peer` to fetch `piece` elsewhere: it is on its way to another node,
    /// or was delivered less than `patience` ago and another node advertises it. A peer still
    /// asking after that has no other holder of it: it is served (nothing starves).
    fn refuse<P: Clone + Ord>(
        &self,
        now: Instant,
        peer: &P,
        piece: u32,
        seen: &Advertised<P>,
        patience: Duration,
    ) -> bool {
        let p = piece as usize;
        match self.first_served[p] {
            None => self.serving[p] > 0,
            Some(first) => now < first + patience && seen.others(peer, piece) > 0,
        }
    }

    fn ended(&mut self, now: Instant, piece: u32, delivered: bool) {
        let p = piece as usize;
        self.serving[p] -= 1;
        if delivered {
            self.served[p] += 1;
            self.first_served[p].get_or_insert(now);
        }
    }
}

/// One blob as the uploading side sees it.
#[derive(Debug, Clone)]
struct Served<P> {
    seen: Advertised<P>,
    seeder: Option<SuperSeeder>,
}

/// Waiting requests for a piece that at most this many of this node's other peers advertise
/// rank by that count; beyond it, all are equally common.
const RARE_AROUND: u32 = 3;

/// A node's uploads to peers, across blobs: the slots, the requests waiting for one, each
/// peer's delivery rate, what its peers hold of each blob, and a [`SuperSeeder`] per blob this
/// node is the origin of. `B` names a blob (its hash).
///
/// The shell feeds it every peer's holdings ([`Uploads::peer_holdings`],
/// [`Uploads::peer_has`], [`Uploads::peer_lost`], the same inputs as each [`BlobSwarm`]'s),
/// calls [`Uploads::request`] for each piece request, [`Uploads::delivered`] /
/// [`Uploads::aborted`] as streams end, and [`Uploads::poll`] after each of those and at
/// [`Uploads::next_deadline`].
///
/// A request waiting for a slot is served in order of: how many pieces of seeded blobs its
/// peer got from here (fewest first: the origin hands its pieces round the fleet rather than
/// to whichever fetcher asks again fastest), then how few of this node's peers advertise the
/// piece (a piece that just arrived here and nobody around has yet goes out first, so new
/// pieces spread in a few quick hops), then arrival.
#[derive(Debug)]
pub struct Uploads<P, B> {
    config: UploadConfig,
    active: BTreeMap<UploadId, Upload<P, B>>,
    queued: BTreeMap<UploadId, Upload<P, B>>,
    next_id: u64,
    /// Bytes/s delivered per upload to each peer, an EWMA.
    rates: BTreeMap<P, f64>,
    blobs: BTreeMap<B, Served<P>>,
    /// Pieces of seeded blobs started to each peer.
    seeded_to: BTreeMap<P, u32>,
    events: Vec<UploadEvent>,
}

impl<P: Clone + Ord, B: Clone + Ord> Uploads<P, B> {
    pub fn new(config: UploadConfig) -> Uploads<P, B> {
        Uploads {
            config,
            active: BTreeMap::new(),
            queued: BTreeMap::new(),
            next_id: 0,
            rates: BTreeMap::new(),
            blobs: BTreeMap::new(),
            seeded_to: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn blob(&mut self, blob: &B, pieces: u32) -> &mut Served<P> {
        self.blobs.entry(blob.clone()).or_insert_with(|| Served {
            seen: Advertised::new(pieces),
            seeder: None,
        })
    }

    /// This node is `blob`'s origin (it was pushed here): super-seed it.
    pub fn seed(&mut self, blob: B, size: u64) {
        let pieces = piece_count(size);
        let served = self.blob(&blob, pieces);
        served
            .seeder
            .get_or_insert_with(|| SuperSeeder::new(pieces));
    }

    /// Forget `blob` (removed from this node).
    pub fn forget(&mut self, blob: &B) {
        self.blobs.remove(blob);
    }

    pub fn seeder(&self, blob: &B) -> Option<&SuperSeeder> {
        self.blobs.get(blob).and_then(|b| b.seeder.as_ref())
    }

    /// A peer's holdings of `blob`, replacing what it said before.
    pub fn peer_holdings(&mut self, blob: &B, peer: &P, has: &PieceSet) {
        self.blob(blob, has.pieces()).seen.holdings(peer, has);
    }

    /// A peer's have message for `blob` (ignored for a blob no holdings were heard of).
    pub fn peer_has(&mut self, blob: &B, peer: &P, piece: u32) {
        if let Some(served) = self.blobs.get_mut(blob) {
            served.seen.has(peer, piece);
        }
    }

    /// A peer's connection is gone: its holdings no longer count (its uploads end through
    /// [`Uploads::aborted`] as their streams fail, or expire).
    pub fn peer_lost(&mut self, peer: &P) {
        for served in self.blobs.values_mut() {
            served.seen.lost(peer);
        }
    }

    /// Uploads in progress.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Whether the origin turns this request away (and counts the refusal).
    fn refuse(&self, now: Instant, peer: &P, blob: &B, piece: u32) -> bool {
        let patience = self.config.spread_patience;
        match self.blobs.get(blob) {
            Some(Served {
                seen,
                seeder: Some(seeder),
            }) => seeder.refuse(now, peer, piece, seen, patience),
            _ => false,
        }
    }

    /// `peer` asks for `piece` of `blob`, a blob of `size` bytes of which this node holds
    /// `held` verified (a whole blob: [`PieceSet::full`]; a partial one: its
    /// [`BlobSwarm::held`]).
    pub fn request(
        &mut self,
        now: Instant,
        peer: &P,
        blob: &B,
        size: u64,
        piece: u32,
        held: &PieceSet,
    ) -> ServeDecision {
        if !held.contains(piece) {
            return ServeDecision::NotHeld;
        }
        if self.refuse(now, peer, blob, piece) {
            return ServeDecision::AskOthers;
        }
        let upload = Upload {
            peer: peer.clone(),
            blob: blob.clone(),
            piece,
            bytes: piece_bytes(size, piece),
            since: now,
        };
        let id = UploadId(self.next_id);
        self.next_id += 1;
        if self.active.len() < self.config.max_uploads
            && self.queued.is_empty()
            && self.may_start(&upload)
        {
            self.start(id, upload);
            return ServeDecision::Serve(id);
        }
        if self.queued.len() < self.config.max_queued {
            self.queued.insert(id, upload);
            return ServeDecision::Queued(id);
        }
        // Full: a newcomer that ranks before the last in line takes its place.
        let rank = self.rank(id, &upload);
        let last = self.queued.iter().map(|(&q, u)| (self.rank(q, u), q)).max();
        match last {
            Some((last_rank, last)) if rank < last_rank => {
                self.queued.remove(&last);
                self.events
                    .push(UploadEvent::Answer(last, ServeDecision::Busy));
                self.queued.insert(id, upload);
                ServeDecision::Queued(id)
            }
            _ => ServeDecision::Busy,
        }
    }

    /// The origin uploads one piece of the blobs it seeds to each peer at a time, so its
    /// first pieces go to as many nodes as it has slots, not all to the fastest asker.
    fn may_start(&self, upload: &Upload<P, B>) -> bool {
        !self.is_seeded(&upload.blob)
            || !self
                .active
                .values()
                .any(|u| u.peer == upload.peer && self.is_seeded(&u.blob))
    }

    fn is_seeded(&self, blob: &B) -> bool {
        self.blobs.get(blob).is_some_and(|b| b.seeder.is_some())
    }

    /// Order of service among waiting requests (smallest first), see [`Uploads`].
    fn rank(&self, id: UploadId, upload: &Upload<P, B>) -> (u32, u32, u32, UploadId) {
        let served = self.blobs.get(&upload.blob);
        let given = match served {
            Some(Served {
                seeder: Some(_), ..
            }) => self.seeded_to.get(&upload.peer).copied().unwrap_or(0),
            _ => 0,
        };
        let around = served.map_or(0, |s| s.seen.others(&upload.peer, upload.piece));
        let held = served
            .and_then(|s| s.seen.sets.get(&upload.peer))
            .map_or(0, PieceSet::count);
        (given, around.min(RARE_AROUND), held, id)
    }

    fn start(&mut self, id: UploadId, upload: Upload<P, B>) {
        if let Some(seeder) = self
            .blobs
            .get_mut(&upload.blob)
            .and_then(|b| b.seeder.as_mut())
        {
            seeder.serving[upload.piece as usize] += 1;
            *self.seeded_to.entry(upload.peer.clone()).or_default() += 1;
        }
        self.active.insert(id, upload);
    }

    fn end(&mut self, now: Instant, id: UploadId, delivered: bool) -> Option<Upload<P, B>> {
        let upload = self.active.remove(&id)?;
        if let Some(seeder) = self
            .blobs
            .get_mut(&upload.blob)
            .and_then(|b| b.seeder.as_mut())
        {
            seeder.ended(now, upload.piece, delivered);
        }
        Some(upload)
    }

    /// The peer acknowledged the whole of upload `id` (quinn: the stream's data was acked):
    /// its slot is free. Returns the peer, blob and piece it was.
    pub fn delivered(&mut self, now: Instant, id: UploadId) -> Option<(P, B, u32)> {
        let upload = self.end(now, id, true)?;
        // The peer has the piece now (it verifies it in milliseconds): count it a holder at
        // once, so the next asker is sent there rather than given a second copy in the second
        // or so before the peer's own have message or holdings answer arrives.
        if let Some(served) = self.blobs.get_mut(&upload.blob) {
            served.seen.has(&upload.peer, upload.piece);
        }
        let secs = now
            .saturating_duration_since(upload.since)
            .as_secs_f64()
            .max(1e-3);
        let sample = upload.bytes as f64 / secs;
        let rate = self.rates.entry(upload.peer.clone()).or_insert(sample);
        *rate = *rate * (1.0 - RATE_WEIGHT) + sample * RATE_WEIGHT;
        Some((upload.peer, upload.blob, upload.piece))
    }

    /// Upload or queued request `id` failed or the peer cancelled it: its slot or place is
    /// free.
    pub fn aborted(&mut self, now: Instant, id: UploadId) {
        if self.queued.remove(&id).is_none() {
            self.end(now, id, false);
        }
        // An answer not yet polled for it is moot now.
        self.events
            .retain(|e| !matches!(e, UploadEvent::Answer(answered, _) if *answered == id));
    }

    fn deadline(&self, upload: &Upload<P, B>) -> Instant {
        let rate = self
            .rates
            .get(&upload.peer)
            .copied()
            .unwrap_or(self.config.assumed_rate);
        let expected = Duration::from_secs_f64(upload.bytes as f64 / rate.max(1.0));
        upload.since
            + expected
                .saturating_mul(self.config.stall_factor)
                .max(self.config.stall_floor)
    }

    /// What to do now: uploads that expired, queued requests that got a slot or waited too
    /// long, and queued requests evicted by better-ranked ones since the last poll.
    pub fn poll(&mut self, now: Instant) -> Vec<UploadEvent> {
        let late: Vec<UploadId> = self
            .active
            .iter()
            .filter(|(_, u)| now >= self.deadline(u))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            if let Some(upload) = self.end(now, id, false) {
                // Slower than we thought: give it longer next time, not the same too-short wait.
                if let Some(rate) = self.rates.get_mut(&upload.peer) {
                    *rate /= 2.0;
                }
                self.events.push(UploadEvent::Expired(id));
            }
        }
        let patience = self.config.queue_patience;
        let tired: Vec<UploadId> = self
            .queued
            .iter()
            .filter(|(_, u)| now >= u.since + patience)
            .map(|(&id, _)| id)
            .collect();
        for id in tired {
            self.queued.remove(&id);
            self.events
                .push(UploadEvent::Answer(id, ServeDecision::Busy));
        }
        while self.active.len() < self.config.max_uploads {
            let next = self
                .queued
                .iter()
                .filter(|(_, u)| self.may_start(u))
                .map(|(&id, u)| (self.rank(id, u), id))
                .min();
            let Some((_, id)) = next else {
                break;
            };
            let mut upload = self.queued.remove(&id).expect("queued");
            // Another waiting request may have taken this piece out since it was queued.
            if self.refuse(now, &upload.peer, &upload.blob, upload.piece) {
                self.events
                    .push(UploadEvent::Answer(id, ServeDecision::AskOthers));
                continue;
            }
            upload.since = now;
            self.start(id, upload);
            self.events.push(UploadEvent::Start(id));
        }
        std::mem::take(&mut self.events)
    }

    /// When [`Uploads::poll`] has something to say next without other input.
    pub fn next_deadline(&self) -> Option<Instant> {
        let expiries = self.active.values().map(|u| self.deadline(u));
        let patience = self
            .queued
            .values()
            .map(|u| u.since + self.config.queue_patience);
        expiries.chain(patience).min()
    }

    /// Peers with uploads in progress (for status).
    pub fn peers_served(&self) -> BTreeSet<P> {
        self.active.values().map(|u| u.peer.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 4 * PIECE;

    fn requests(actions: &[Action<&'static str>]) -> Vec<(&'static str, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { peer, piece } => Some((*peer, *piece)),
                _ => None,
            })
            .collect()
    }

    fn set(pieces: &[u32]) -> PieceSet {
        let mut s = PieceSet::empty(piece_count(SIZE));
        for &p in pieces {
            s.insert(p);
        }
        s
    }

    #[test]
    fn a_piece_set_round_trips_and_refuses_another_blobs_length() {
        let s = set(&[0, 3]);
        assert_eq!(PieceSet::from_hex(4, &s.to_hex()).unwrap(), s);
        assert_eq!(PieceSet::from_bytes(4, &s.to_bytes()).unwrap(), s);
        assert!(PieceSet::from_hex(40, &s.to_hex()).is_err());
        assert_eq!(s.missing().collect::<Vec<_>>(), vec![1, 2]);
        assert!(PieceSet::full(4).is_complete());
    }

    #[test]
    fn the_rarest_piece_is_asked_for_first() {
        let config = SwarmConfig {
            max_in_flight: 1,
            ..SwarmConfig::default()
        };
        let mut swarm = BlobSwarm::new(SIZE, PieceSet::empty(4), 1, config);
        let now = Instant::now();
        swarm.peer_holdings("a", set(&[0, 1, 2]), false).unwrap();
        swarm.peer_holdings("b", set(&[0, 1, 3]), false).unwrap();
        swarm.peer_holdings("c", set(&[0, 1, 3]), false).unwrap();
        // Piece 2 is held by one peer, 3 by two, 0 and 1 by three.
        assert_eq!(requests(&swarm.poll(now)), vec![("a", 2)]);
    }

    #[test]
    fn the_origin_is_asked_only_for_pieces_nobody_else_advertises() {
        let mut swarm = BlobSwarm::new(SIZE, PieceSet::empty(4), 1, SwarmConfig::default());
        let now = Instant::now();
        swarm
            .peer_holdings("origin", PieceSet::full(4), true)
            .unwrap();
        swarm.peer_holdings("peer", set(&[0, 1]), false).unwrap();
        let asked = requests(&swarm.poll(now));
        for (peer, piece) in &asked {
            if *peer == "origin" {
                assert!(
                    *piece >= 2,
                    "origin asked for piece {piece} that a peer has: {asked:?}"
                );
            }
        }
        assert!(
            asked.contains(&("origin", 2)) || asked.contains(&("origin", 3)),
            "{asked:?}"
        );
    }

    #[test]
    fn a_peer_that_served_a_bad_piece_is_penalised_and_never_asked_again() {
        let mut swarm = BlobSwarm::new(SIZE, PieceSet::empty(4), 1, SwarmConfig::default());
        let now = Instant::now();
        swarm
            .peer_holdings("liar", PieceSet::full(4), false)
            .unwrap();
        let asked = requests(&swarm.poll(now));
        assert!(!asked.is_empty());
        let (_, piece) = asked[0];
        swarm.piece_failed(&"liar", piece, "chunk 3 does not match");
        let actions = swarm.poll(now);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Penalise { peer: "liar", .. })),
            "{actions:?}"
        );
        assert!(requests(&actions).is_empty(), "{actions:?}");
        swarm
            .peer_holdings("honest", PieceSet::full(4), false)
            .unwrap();
        let asked = requests(&swarm.poll(now));
        assert!(asked.contains(&("honest", piece)), "{asked:?}");
        assert!(asked.iter().all(|(p, _)| *p == "honest"));
    }

    #[test]
    fn a_stalled_request_is_cancelled_and_the_piece_asked_elsewhere() {
        let config = SwarmConfig {
            max_in_flight: 1,
            ..SwarmConfig::default()
        };
        let mut swarm = BlobSwarm::new(SIZE, set(&[0, 1, 3]), 1, config);
        let now = Instant::now();
        swarm
            .peer_holdings("slow", PieceSet::full(4), false)
            .unwrap();
        assert_eq!(requests(&swarm.poll(now)), vec![("slow", 2)]);
        swarm
            .peer_holdings("fast", PieceSet::full(4), false)
            .unwrap();
        let later = now + swarm.stall_timeout(&"slow", PIECE) + Duration::from_millis(1);
        assert!(swarm.next_wakeup().is_some_and(|w| w <= later));
        let actions = swarm.poll(later);
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::Cancel {
                    peer: "slow",
                    piece: 2,
                    why: CancelReason::Stalled
                }
            )),
            "{actions:?}"
        );
        assert_eq!(requests(&actions), vec![("fast", 2)]);
        assert!(swarm.piece_verified(later, &"fast", 2));
        assert!(swarm.is_complete());
    }

    #[test]
    fn a_busy_peer_is_paused_not_dropped() {
        let mut swarm = BlobSwarm::new(SIZE, set(&[0, 1, 2]), 1, SwarmConfig::default());
        let now = Instant::now();
        swarm.peer_holdings("a", PieceSet::full(4), false).unwrap();
        assert_eq!(requests(&swarm.poll(now)), vec![("a", 3)]);
        swarm.refused(now, &"a", 3, Refusal::Busy);
        assert!(requests(&swarm.poll(now)).is_empty());
        let wake = swarm
            .next_wakeup()
            .expect("a wake-up for when the pause ends");
        assert!(wake > now && wake <= now + SwarmConfig::default().busy_pause);
        assert_eq!(requests(&swarm.poll(wake)), vec![("a", 3)]);
    }

    #[test]
    fn uploads_serve_only_held_pieces_and_free_a_slot_on_delivery() {
        let config = UploadConfig {
            max_uploads: 1,
            max_queued: 0,
            ..UploadConfig::default()
        };
        let mut uploads: Uploads<&str, &str> = Uploads::new(config);
        let now = Instant::now();
        let held = set(&[0, 1]);
        assert_eq!(
            uploads.request(now, &"p", &"blob", SIZE, 2, &held),
            ServeDecision::NotHeld
        );
        let ServeDecision::Serve(first) = uploads.request(now, &"p", &"blob", SIZE, 0, &held)
        else {
            panic!("a free slot serves");
        };
        assert_eq!(
            uploads.request(now, &"q", &"blob", SIZE, 1, &held),
            ServeDecision::Busy
        );
        assert_eq!(uploads.delivered(now, first), Some(("p", "blob", 0)));
        assert!(matches!(
            uploads.request(now, &"q", &"blob", SIZE, 1, &held),
            ServeDecision::Serve(_)
        ));
    }

    /// An origin seeding a 4-piece blob that has started uploading piece 0 to peer p.
    fn origin_serving_piece_0_to_p() -> (
        Uploads<&'static str, &'static str>,
        Instant,
        PieceSet,
        UploadId,
    ) {
        let mut uploads = Uploads::new(UploadConfig::default());
        let now = Instant::now();
        uploads.seed("blob", SIZE);
        let full = PieceSet::full(4);
        let ServeDecision::Serve(id) = uploads.request(now, &"p", &"blob", SIZE, 0, &full) else {
            panic!("the first asker of a piece is served");
        };
        (uploads, now, full, id)
    }

    #[test]
    fn the_origin_sends_a_piece_it_is_already_uploading_to_nobody_else() {
        let (mut uploads, now, full, id) = origin_serving_piece_0_to_p();
        assert_eq!(
            uploads.request(now, &"q", &"blob", SIZE, 0, &full),
            ServeDecision::AskOthers
        );
        uploads.delivered(now, id);
        // p now holds piece 0 and says so: q is sent to it.
        uploads.peer_holdings(&"blob", &"p", &set(&[0]));
        assert_eq!(
            uploads.request(now, &"q", &"blob", SIZE, 0, &full),
            ServeDecision::AskOthers
        );
        assert_eq!(uploads.seeder(&"blob").unwrap().served(0), 1);
    }

    #[test]
    fn the_origin_counts_a_peer_it_delivered_a_piece_to_as_a_holder_before_it_says_so() {
        let (mut uploads, now, full, id) = origin_serving_piece_0_to_p();
        uploads.delivered(now, id);
        // No holdings or have message from p yet: q is still sent there, not given a copy.
        let soon = now + Duration::from_millis(300);
        assert_eq!(
            uploads.request(soon, &"q", &"blob", SIZE, 0, &full),
            ServeDecision::AskOthers
        );
        // Once p is gone, nobody else holds it: q is served.
        uploads.peer_lost(&"p");
        assert!(matches!(
            uploads.request(soon, &"q", &"blob", SIZE, 0, &full),
            ServeDecision::Serve(_)
        ));
        assert_eq!(uploads.seeder(&"blob").unwrap().served(0), 1);
    }
}

/// The simulated swarm: a second shell over exactly the API the syncer and the peer server use.
/// Discrete ticks of [`TICK`](simulation::TICK); every node's link carries the same rate each
/// way, shared max-min fairly between the transfers on it (what competing congestion-controlled
/// flows approach); every message (request, answer, have, acknowledgement, cancel) takes one
/// tick, and a piece arrives one tick after its last byte left. Pieces are numbers: no bytes are
/// moved or hashed.
#[cfg(test)]
mod simulation {
    use super::*;

    /// 50 ms: the one-way delay of a 100 ms RTT path.
    const TICK: Duration = Duration::from_millis(50);
    /// 10 Mbit/s, each way.
    const LINK: u64 = 1_250_000;
    const PER_TICK: u64 = LINK * TICK.as_millis() as u64 / 1000;
    /// How long a holdings request goes unanswered before the peer counts as lost.
    const HOLDINGS_TIMEOUT: Duration = Duration::from_secs(5);
    const ORIGIN: usize = 0;

    /// A deterministic stream of numbers for the peering graph and who dies.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(1);
            (mix(0x5eed, self.0) % n as u64) as usize
        }
    }

    #[derive(Debug, Clone)]
    struct Scenario {
        nodes: usize,
        /// Blob sizes, all pushed to node 0 (the origin).
        blobs: Vec<u64>,
        /// Peers each node dials besides the origin (it is also peered with whoever dials it).
        dials: usize,
        /// How many nodes die, when, and for how long (they come back with their pieces).
        kill: Option<(usize, Duration, Duration)>,
        seed: u64,
        swarm: SwarmConfig,
        upload: UploadConfig,
        holdings_every: Duration,
        give_up: Duration,
    }

    impl Scenario {
        /// The fleet: 25.5 MB (a source and two artifacts of 8.5 MB) pushed to one of
        /// `nodes`, each dialling the origin and 4 others, holdings every 3 s (the syncer's
        /// refresh), a have message for every verified piece.
        fn fleet(nodes: usize) -> Scenario {
            Scenario {
                nodes,
                blobs: vec![8_500_000; 3],
                dials: 4,
                kill: None,
                seed: 7,
                swarm: SwarmConfig::default(),
                upload: UploadConfig::default(),
                holdings_every: Duration::from_secs(3),
                give_up: Duration::from_secs(120),
            }
        }

        fn total(&self) -> u64 {
            self.blobs.iter().sum()
        }

        /// One transfer of the whole set at line rate.
        fn line_time(&self) -> Duration {
            Duration::from_secs_f64(self.total() as f64 / LINK as f64)
        }
    }

    #[derive(Debug, Default)]
    struct Outcome {
        /// When the last node held everything (`None`: some node never did).
        last_done: Option<Duration>,
        median_done: Duration,
        /// The last of the nodes that never died.
        survivors_done: Duration,
        /// For each node that died and came back: when it was done, and the soonest it could
        /// have been (back, plus what it still lacked at line rate).
        revived: Vec<(Duration, Duration)>,
        /// Bytes the origin sent, in copies of the set.
        origin_copies: f64,
        penalties: usize,
        busy: u64,
        ask_others: u64,
        stalled: u64,
        /// Pieces a node received that it had already (endgame losers, late arrivals).
        duplicates: u64,
    }

    impl Outcome {
        fn report(&self, name: &str, s: &Scenario) {
            let secs = |d: Duration| d.as_secs_f64();
            let line = secs(s.line_time());
            let last = self.last_done.map_or("never".into(), |d| {
                format!("{:.1} s ({:.2}x line rate)", secs(d), secs(d) / line)
            });
            eprintln!(
                "{name}: {} nodes, {:.1} MB at {} Mbit/s (line-rate time {line:.1} s): last node \
                 done at {last}, median {:.1} s, nodes that stayed up {:.1} s; origin egress {:.2} \
                 copies; busy answers {}, ask-others {}, stalled requests {}, duplicate pieces {}",
                s.nodes,
                s.total() as f64 / 1e6,
                LINK * 8 / 1_000_000,
                secs(self.median_done),
                secs(self.survivors_done),
                self.origin_copies,
                self.busy,
                self.ask_others,
                self.stalled,
                self.duplicates,
            );
            for (done, soonest) in &self.revived {
                eprintln!(
                    "  {name}: a node back at {:.0} s done at {:.1} s, {:.1} s after the soonest \
                     it could",
                    secs(s.kill.map_or(Duration::ZERO, |(_, at, down)| at + down)),
                    secs(*done),
                    secs(*done) - secs(*soonest),
                );
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Msg {
        Request {
            from: usize,
            to: usize,
            blob: usize,
            piece: u32,
        },
        Refused {
            from: usize,
            to: usize,
            blob: usize,
            piece: u32,
            why: Refusal,
        },
        Arrived {
            from: usize,
            to: usize,
            blob: usize,
            piece: u32,
            id: UploadId,
        },
        Delivered {
            to: usize,
            id: UploadId,
        },
        Have {
            from: usize,
            to: usize,
            blob: usize,
            piece: u32,
        },
        Cancel {
            from: usize,
            to: usize,
            blob: usize,
            piece: u32,
        },
    }

    impl Msg {
        fn to(&self) -> usize {
            match *self {
                Msg::Request { to, .. }
                | Msg::Refused { to, .. }
                | Msg::Arrived { to, .. }
                | Msg::Delivered { to, .. }
                | Msg::Have { to, .. }
                | Msg::Cancel { to, .. } => to,
            }
        }
    }

    /// A piece on its way.
    struct Flow {
        up: usize,
        down: usize,
        blob: usize,
        piece: u32,
        left: u64,
        id: UploadId,
    }

    struct Node {
        alive: bool,
        died_at: Option<Duration>,
        /// When it came back, and the bytes it lacked then.
        revived: Option<(Duration, u64)>,
        /// What it holds verified: survives its death.
        held: Vec<PieceSet>,
        swarms: Vec<Option<BlobSwarm<usize>>>,
        uploads: Uploads<usize, usize>,
        /// Requests waiting in its upload queue: fetcher, blob, piece.
        waiting: BTreeMap<UploadId, (usize, usize, u32)>,
        peers: Vec<usize>,
        /// Peers it stopped hearing from.
        lost: Vec<bool>,
        done_at: Option<Duration>,
    }

    struct Sim<'a> {
        s: &'a Scenario,
        nodes: Vec<Node>,
        flows: Vec<Flow>,
        /// Messages arriving next tick.
        inbox: Vec<Msg>,
        origin_bytes: u64,
        out: Outcome,
    }

    fn simulate(s: &Scenario) -> Outcome {
        let mut rng = Rng(s.seed);
        let mut peers = vec![BTreeSet::new(); s.nodes];
        for n in 1..s.nodes {
            peers[n].insert(ORIGIN);
            peers[ORIGIN].insert(n);
            while peers[n].len() < (s.dials + 1).min(s.nodes - 1) {
                let q = 1 + rng.below(s.nodes - 1);
                if q != n {
                    peers[n].insert(q);
                    peers[q].insert(n);
                }
            }
        }
        let mut doomed = BTreeSet::new();
        if let Some((count, _, _)) = s.kill {
            while doomed.len() < count {
                doomed.insert(1 + rng.below(s.nodes - 1));
            }
        }
        let mut sim = Sim {
            s,
            nodes: peers
                .into_iter()
                .enumerate()
                .map(|(n, peers)| {
                    let held: Vec<PieceSet> = s
                        .blobs
                        .iter()
                        .map(|&size| match n {
                            ORIGIN => PieceSet::full(piece_count(size)),
                            _ => PieceSet::empty(piece_count(size)),
                        })
                        .collect();
                    Node {
                        alive: true,
                        died_at: None,
                        revived: None,
                        swarms: swarms(s, n, &held),
                        held,
                        uploads: Uploads::new(s.upload.clone()),
                        waiting: BTreeMap::new(),
                        peers: peers.into_iter().collect(),
                        lost: vec![false; s.nodes],
                        done_at: (n == ORIGIN).then_some(Duration::ZERO),
                    }
                })
                .collect(),
            flows: Vec::new(),
            inbox: Vec::new(),
            origin_bytes: 0,
            out: Outcome::default(),
        };
        for (blob, &size) in s.blobs.iter().enumerate() {
            sim.nodes[ORIGIN].uploads.seed(blob, size);
        }
        let base = Instant::now();
        let holdings_every = (s.holdings_every.as_millis() / TICK.as_millis()) as u32;
        let mut tick = 0u32;
        while sim.nodes.iter().any(|n| n.done_at.is_none()) && TICK * tick <= s.give_up {
            let t = TICK * tick;
            let now = base + t;
            if let Some((_, at, down)) = s.kill {
                if t == at {
                    doomed.iter().for_each(|&n| sim.kill(n, t));
                }
                if t == at + down {
                    doomed.iter().for_each(|&n| sim.revive(n, t));
                }
            }
            for msg in std::mem::take(&mut sim.inbox) {
                if sim.nodes[msg.to()].alive {
                    sim.handle(msg, now);
                }
            }
            if tick.is_multiple_of(holdings_every) {
                sim.holdings_round(t);
            }
            sim.poll_uploads(now);
            sim.poll_fetches(now);
            sim.move_bytes();
            for node in &mut sim.nodes {
                if node.done_at.is_none() && node.held.iter().all(PieceSet::is_complete) {
                    node.done_at = Some(t);
                }
            }
            tick += 1;
        }
        sim.finish(&doomed)
    }

    /// A node's fetches, one per blob it lacks pieces of.
    fn swarms(s: &Scenario, n: usize, held: &[PieceSet]) -> Vec<Option<BlobSwarm<usize>>> {
        let seed = mix(s.seed, n as u64);
        s.blobs
            .iter()
            .zip(held)
            .map(|(&size, held)| {
                (!held.is_complete())
                    .then(|| BlobSwarm::new(size, held.clone(), seed, s.swarm.clone()))
            })
            .collect()
    }

    impl Sim<'_> {
        /// `n` takes in `q`'s holdings answer.
        fn holdings(&mut self, n: usize, q: usize) {
            for b in 0..self.s.blobs.len() {
                let set = self.nodes[q].held[b].clone();
                let node = &mut self.nodes[n];
                node.uploads.peer_holdings(&b, &q, &set);
                if let Some(swarm) = &mut node.swarms[b] {
                    swarm.peer_holdings(q, set, q == ORIGIN).expect("same blob");
                }
            }
            self.nodes[n].lost[q] = false;
        }

        fn holdings_round(&mut self, t: Duration) {
            for n in 0..self.nodes.len() {
                if !self.nodes[n].alive {
                    continue;
                }
                for q in self.nodes[n].peers.clone() {
                    let peer = &self.nodes[q];
                    if peer.alive {
                        self.holdings(n, q);
                    } else if !self.nodes[n].lost[q]
                        && peer.died_at.is_some_and(|d| t >= d + HOLDINGS_TIMEOUT)
                    {
                        let node = &mut self.nodes[n];
                        node.lost[q] = true;
                        node.uploads.peer_lost(&q);
                        for swarm in node.swarms.iter_mut().flatten() {
                            swarm.peer_lost(&q);
                        }
                    }
                }
            }
        }

        fn kill(&mut self, n: usize, t: Duration) {
            let node = &mut self.nodes[n];
            node.alive = false;
            node.died_at = Some(t);
            node.swarms.iter_mut().for_each(|s| *s = None);
            node.uploads = Uploads::new(self.s.upload.clone());
            node.waiting.clear();
            // Its uploads die with it; what others send it goes nowhere until they give up.
            self.flows.retain(|f| f.up != n);
        }

        fn revive(&mut self, n: usize, t: Duration) {
            let node = &mut self.nodes[n];
            node.swarms = swarms(self.s, n, &node.held);
            node.alive = true;
            node.died_at = None;
            node.lost.iter_mut().for_each(|l| *l = false);
            let lacking = self
                .s
                .blobs
                .iter()
                .zip(&node.held)
                .map(|(&size, held)| held.missing().map(|p| piece_bytes(size, p)).sum::<u64>());
            node.revived = Some((t, lacking.sum()));
            // It dials its peers at once, and each asks it for holdings when it connects.
            for q in self.nodes[n].peers.clone() {
                if self.nodes[q].alive {
                    self.holdings(n, q);
                    self.holdings(q, n);
                }
            }
        }

        fn refusal(&mut self, decision: ServeDecision) -> Refusal {
            match decision {
                ServeDecision::AskOthers => {
                    self.out.ask_others += 1;
                    Refusal::AskOthers
                }
                ServeDecision::NotHeld => Refusal::NotHeld,
                ServeDecision::Busy | ServeDecision::Serve(_) | ServeDecision::Queued(_) => {
                    self.out.busy += 1;
                    Refusal::Busy
                }
            }
        }

        fn handle(&mut self, msg: Msg, now: Instant) {
            match msg {
                Msg::Request {
                    from,
                    to,
                    blob,
                    piece,
                } => {
                    let size = self.s.blobs[blob];
                    let node = &mut self.nodes[to];
                    let held = &node.held[blob];
                    match node.uploads.request(now, &from, &blob, size, piece, held) {
                        ServeDecision::Serve(id) => {
                            let left = piece_bytes(size, piece);
                            let (up, down) = (to, from);
                            self.flows.push(Flow {
                                up,
                                down,
                                blob,
                                piece,
                                left,
                                id,
                            });
                        }
                        ServeDecision::Queued(id) => {
                            node.waiting.insert(id, (from, blob, piece));
                        }
                        refused => {
                            let why = self.refusal(refused);
                            let (from, to) = (to, from);
                            self.inbox.push(Msg::Refused {
                                from,
                                to,
                                blob,
                                piece,
                                why,
                            });
                        }
                    }
                }
                Msg::Refused {
                    from,
                    to,
                    blob,
                    piece,
                    why,
                } => {
                    if let Some(swarm) = &mut self.nodes[to].swarms[blob] {
                        swarm.refused(now, &from, piece, why);
                    }
                }
                Msg::Arrived {
                    from,
                    to,
                    blob,
                    piece,
                    id,
                } => {
                    // The transport acknowledges the stream whatever the fetcher makes of it.
                    self.inbox.push(Msg::Delivered { to: from, id });
                    let node = &mut self.nodes[to];
                    let fresh = node.swarms[blob]
                        .as_mut()
                        .is_some_and(|swarm| swarm.piece_verified(now, &from, piece));
                    if !fresh {
                        self.out.duplicates += 1;
                        return;
                    }
                    node.held[blob].insert(piece);
                    for &q in &node.peers {
                        self.inbox.push(Msg::Have {
                            from: to,
                            to: q,
                            blob,
                            piece,
                        });
                    }
                }
                Msg::Delivered { to, id } => {
                    self.nodes[to].uploads.delivered(now, id);
                }
                Msg::Have {
                    from,
                    to,
                    blob,
                    piece,
                } => {
                    let node = &mut self.nodes[to];
                    node.uploads.peer_has(&blob, &from, piece);
                    if let Some(swarm) = &mut node.swarms[blob] {
                        swarm.peer_has(&from, piece);
                    }
                }
                Msg::Cancel {
                    from,
                    to,
                    blob,
                    piece,
                } => {
                    let at = self.flows.iter().position(|f| {
                        f.up == to && f.down == from && f.blob == blob && f.piece == piece
                    });
                    let node = &mut self.nodes[to];
                    if let Some(at) = at {
                        node.uploads.aborted(now, self.flows.swap_remove(at).id);
                    }
                    let queued = node
                        .waiting
                        .iter()
                        .find(|(_, w)| **w == (from, blob, piece));
                    if let Some((&id, _)) = queued {
                        node.waiting.remove(&id);
                        node.uploads.aborted(now, id);
                    }
                }
            }
        }

        fn poll_uploads(&mut self, now: Instant) {
            for up in 0..self.nodes.len() {
                if !self.nodes[up].alive {
                    continue;
                }
                for event in self.nodes[up].uploads.poll(now) {
                    match event {
                        UploadEvent::Start(id) => {
                            let waiting = self.nodes[up].waiting.remove(&id);
                            let (down, blob, piece) = waiting.expect("a queued request");
                            let left = piece_bytes(self.s.blobs[blob], piece);
                            self.flows.push(Flow {
                                up,
                                down,
                                blob,
                                piece,
                                left,
                                id,
                            });
                        }
                        UploadEvent::Answer(id, decision) => {
                            let waiting = self.nodes[up].waiting.remove(&id);
                            let (to, blob, piece) = waiting.expect("a queued request");
                            let why = self.refusal(decision);
                            self.inbox.push(Msg::Refused {
                                from: up,
                                to,
                                blob,
                                piece,
                                why,
                            });
                        }
                        UploadEvent::Expired(id) => {
                            let at = self.flows.iter().position(|f| f.up == up && f.id == id);
                            if let Some(at) = at {
                                let f = self.flows.swap_remove(at);
                                self.inbox.push(Msg::Refused {
                                    from: up,
                                    to: f.down,
                                    blob: f.blob,
                                    piece: f.piece,
                                    why: Refusal::Failed,
                                });
                            }
                        }
                    }
                }
            }
        }

        fn poll_fetches(&mut self, now: Instant) {
            for n in 0..self.nodes.len() {
                if !self.nodes[n].alive {
                    continue;
                }
                for blob in 0..self.s.blobs.len() {
                    let Some(swarm) = &mut self.nodes[n].swarms[blob] else {
                        continue;
                    };
                    for action in swarm.poll(now) {
                        match action {
                            Action::Request { peer, piece } => self.inbox.push(Msg::Request {
                                from: n,
                                to: peer,
                                blob,
                                piece,
                            }),
                            Action::Cancel { peer, piece, why } => {
                                if why == CancelReason::Stalled {
                                    self.out.stalled += 1;
                                }
                                self.inbox.push(Msg::Cancel {
                                    from: n,
                                    to: peer,
                                    blob,
                                    piece,
                                })
                            }
                            Action::Penalise { .. } => self.out.penalties += 1,
                        }
                    }
                }
            }
        }

        /// One tick of every link, shared max-min fairly by progressive filling: every
        /// unfrozen flow rises by the same amount until a link is full or a piece is done,
        /// those flows freeze, repeat. A flow into a dead node moves nothing.
        fn move_bytes(&mut self) {
            let n = self.nodes.len();
            let mut up_left = vec![PER_TICK; n];
            let mut down_left = vec![PER_TICK; n];
            let mut open: Vec<usize> = (0..self.flows.len())
                .filter(|&f| self.nodes[self.flows[f].down].alive)
                .collect();
            let (mut ups, mut downs) = (vec![0u64; n], vec![0u64; n]);
            while !open.is_empty() {
                ups.iter_mut().for_each(|c| *c = 0);
                downs.iter_mut().for_each(|c| *c = 0);
                for &f in &open {
                    ups[self.flows[f].up] += 1;
                    downs[self.flows[f].down] += 1;
                }
                let step = open
                    .iter()
                    .map(|&f| {
                        let flow = &self.flows[f];
                        (up_left[flow.up] / ups[flow.up])
                            .min(down_left[flow.down] / downs[flow.down])
                            .min(flow.left)
                    })
                    .min()
                    .unwrap_or(0);
                if step == 0 {
                    break;
                }
                for &f in &open {
                    let flow = &mut self.flows[f];
                    flow.left -= step;
                    up_left[flow.up] -= step;
                    down_left[flow.down] -= step;
                    if flow.up == ORIGIN {
                        self.origin_bytes += step;
                    }
                }
                let flows = &self.flows;
                open.retain(|&f| {
                    let flow = &flows[f];
                    flow.left > 0
                        && up_left[flow.up] >= ups[flow.up]
                        && down_left[flow.down] >= downs[flow.down]
                });
            }
            let mut at = 0;
            while at < self.flows.len() {
                if self.flows[at].left > 0 {
                    at += 1;
                    continue;
                }
                let f = self.flows.swap_remove(at);
                self.inbox.push(Msg::Arrived {
                    from: f.up,
                    to: f.down,
                    blob: f.blob,
                    piece: f.piece,
                    id: f.id,
                });
            }
        }

        fn finish(self, doomed: &BTreeSet<usize>) -> Outcome {
            let mut out = self.out;
            let mut done: Vec<Duration> = self.nodes.iter().filter_map(|n| n.done_at).collect();
            done.sort();
            out.last_done = (done.len() == self.nodes.len()).then(|| done[done.len() - 1]);
            out.median_done = done.get(done.len() / 2).copied().unwrap_or(Duration::MAX);
            let never = Duration::MAX;
            out.survivors_done = (0..self.nodes.len())
                .filter(|n| !doomed.contains(n))
                .map(|n| self.nodes[n].done_at.unwrap_or(never))
                .max()
                .unwrap_or(never);
            out.revived = self
                .nodes
                .iter()
                .filter_map(|n| {
                    let (back, lacking) = n.revived?;
                    let soonest = back + Duration::from_secs_f64(lacking as f64 / LINK as f64);
                    Some((n.done_at.unwrap_or(never), soonest))
                })
                .collect();
            out.origin_copies = self.origin_bytes as f64 / self.s.total() as f64;
            out
        }
    }

    #[test]
    fn sixty_four_nodes_on_10_mbit_links_converge_within_1_5x_line_rate_with_the_origin_sending_one_copy()
     {
        let s = Scenario::fleet(64);
        let out = simulate(&s);
        out.report("64 nodes", &s);
        let last = out.last_done.expect("every node completes");
        assert!(last <= s.line_time().mul_f64(1.5), "{out:?}");
        assert!(out.origin_copies <= 1.2, "{out:?}");
        assert_eq!(out.penalties, 0);
    }

    #[test]
    fn ten_percent_of_nodes_dying_mid_transfer_and_back_20s_later_finish_near_the_soonest_they_could()
     {
        let mut s = Scenario::fleet(64);
        s.kill = Some((6, Duration::from_secs(10), Duration::from_secs(20)));
        let out = simulate(&s);
        out.report("64 nodes, 6 die at 10 s for 20 s", &s);
        out.last_done.expect("every node completes");
        // Those that stayed up lose 6 relays and the requests that were in flight to them.
        assert!(out.survivors_done <= s.line_time().mul_f64(1.6), "{out:?}");
        // Those that died fetch the rest at close to line rate from the fleet once back.
        for &(done, soonest) in &out.revived {
            assert!(done <= soonest + Duration::from_secs(4), "{out:?}");
        }
        assert!(out.origin_copies <= 1.2, "{out:?}");
    }
}
