//! Sync policy, sans-IO: the peer table (holdings, backoff, penalties), what this node wants,
//! and which holder a blob is fetched from next. Every decision takes `now` as an argument and
//! touches no socket, clock or file, so it is unit-tested with a fake clock; `sync/mod.rs` is
//! the tokio shell that asks peers, streams blobs and feeds the answers back in.
//!
//! The rules, in one place (which piece from which holder is [`crate::swarm`]'s, which this
//! table feeds):
//! - a peer that does not answer is asked again only after a backoff (1 s doubling to 30 s), and
//!   at once when it connects to us (a healed partition, a restart);
//! - a peer that served data failing verification (or a tampered manifest) is not fetched from
//!   for [`PENALTY`]: it is no holder of anything, pieces or manifests;
//! - a blob's holders are the peers holding it whole (the node an operator pushed it to marked
//!   as the origin, which the swarm asks last) and the peers still fetching it, with the pieces
//!   they verified;
//! - the OCI registry a deployment is published in is the holder of last resort ([`when_idle`]):
//!   asked only when no piece is in flight, after [`REGISTRY_GRACE`] for peers' holdings to show
//!   up, and only while no peer has shown any piece or none has arrived for [`ORIGIN_PATIENCE`];
//!   at most once per fetch (its own retries back off inside the attempt), so a fleet pulls a
//!   blob from the registry about once and relays it;
//! - a fetch with nothing in flight that got no piece for [`BUSY_GIVE_UP`] gives up for the
//!   round (the next holdings news starts it again, resuming from the pieces on disk).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use edged_artifacts::BlobKind;
use edged_compiler::Target;
use edged_control::signing::{SignedActivation, SignedManifest};
use edged_control::verified::piece_count;
use edged_control::wire::{Holding, PartialBlob, PeerStatus};

use crate::swarm::PieceSet;

use crate::deployments::rules;

/// How long a peer that served bad data is not fetched from.
pub const PENALTY: Duration = Duration::from_secs(600);
/// How long a fetch whose holders stopped delivering waits before it turns to the registry.
pub const ORIGIN_PATIENCE: Duration = Duration::from_secs(10);
/// How long a fetch waits for peers' holdings (three refreshes) before it may turn to the
/// registry: a blob no peer showed yet may be one a relay is about to offer.
pub const REGISTRY_GRACE: Duration = Duration::from_secs(3);
/// Longest wait before asking an unreachable peer again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a fetch may go without a piece, nothing in flight, before it gives up the round.
pub const BUSY_GIVE_UP: Duration = Duration::from_secs(60);
/// How long a round waits for slower peers' holdings once one peer has answered.
pub const HOLDINGS_PATIENCE: Duration = Duration::from_secs(1);

/// How long to wait before asking a peer again after `failures` unanswered requests in a row.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.min(6))
        .min(MAX_BACKOFF)
}

#[derive(Debug, Clone, Default)]
struct PeerState {
    learned: bool,
    /// The name on its node certificate.
    node_name: Option<String>,
    last_seen: Option<Instant>,
    last_error: Option<String>,
    penalised_until: Option<Instant>,
    /// Its last holdings answer (empty while unreachable).
    holdings: Vec<Holding>,
    /// The blobs it holds in part, by hash: the size it named and the pieces it verified, from
    /// the same answer and the have messages since.
    partial: BTreeMap<String, (u64, PieceSet)>,
    /// The fleet activation records it applied, from the same answer.
    activations: Vec<SignedActivation>,
    /// Unanswered holdings requests in a row.
    failures: u32,
    retry_at: Option<Instant>,
}

impl PeerState {
    fn backing_off(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|at| now < at)
    }

    fn is_penalised(&self, now: Instant) -> bool {
        self.penalised_until.is_some_and(|until| now < until)
    }
}

/// What one holdings answer told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldingsOutcome {
    pub answered: bool,
    /// It holds whole a deployment newer than any this node has seen.
    pub news: bool,
}

/// Every peer this node syncs with, by control address.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: BTreeMap<String, PeerState>,
}

impl PeerTable {
    /// A table of the configured peer addresses.
    pub fn new<'a>(configured: impl IntoIterator<Item = &'a String>) -> PeerTable {
        PeerTable {
            peers: configured
                .into_iter()
                .map(|addr| (addr.clone(), PeerState::default()))
                .collect(),
        }
    }

    pub fn contains(&self, addr: &str) -> bool {
        self.peers.contains_key(addr)
    }

    /// A node connected to us from `addr`. `known_as` is the address under which the table
    /// already knows it, if the shell found one (a configured name that resolved to `addr`).
    /// A known peer is reachable again at once; an unknown one joins the table. Returns whether
    /// it was new.
    pub fn learn(&mut self, addr: &str, known_as: Option<&str>, node_name: &str) -> bool {
        let key = known_as.unwrap_or(addr);
        if let Some(peer) = self.peers.get_mut(key) {
            peer.retry_at = None;
            return false;
        }
        self.peers.insert(
            addr.to_string(),
            PeerState {
                learned: true,
                node_name: Some(node_name.to_string()),
                ..PeerState::default()
            },
        );
        true
    }

    /// Records the name a peer's certificate carries, once connected.
    pub fn set_node_name(&mut self, addr: &str, node_name: String) {
        if let Some(peer) = self.peers.get_mut(addr) {
            peer.node_name = Some(node_name);
        }
    }

    /// Peers to talk to now: those not backing off after failures.
    pub fn to_ask(&self, now: Instant) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.backing_off(now))
            .map(|(addr, _)| addr.clone())
            .collect()
    }

    /// Records one peer's holdings answer (or why there was none). `newest_seen` is the newest
    /// version of a name this node has seen.
    pub fn record_holdings(
        &mut self,
        addr: &str,
        answer: Result<Vec<Holding>, String>,
        now: Instant,
        newest_seen: impl Fn(&str) -> u64,
    ) -> HoldingsOutcome {
        let Some(peer) = self.peers.get_mut(addr) else {
            return HoldingsOutcome {
                answered: false,
                news: false,
            };
        };
        match answer {
            Ok(items) => {
                let news = items
                    .iter()
                    .any(|h| h.complete && h.version > newest_seen(&h.name));
                peer.holdings = items;
                peer.last_seen = Some(now);
                peer.last_error = None;
                peer.failures = 0;
                peer.retry_at = None;
                HoldingsOutcome {
                    answered: true,
                    news,
                }
            }
            Err(reason) => {
                peer.holdings.clear();
                peer.partial.clear();
                peer.activations.clear();
                peer.last_error = Some(reason);
                peer.failures += 1;
                peer.retry_at = Some(now + backoff(peer.failures));
                HoldingsOutcome {
                    answered: false,
                    news: false,
                }
            }
        }
    }

    /// Records the fleet activation records a peer's holdings answer carried.
    pub fn record_activations(&mut self, addr: &str, records: Vec<SignedActivation>) {
        if let Some(peer) = self.peers.get_mut(addr) {
            peer.activations = records;
        }
    }

    /// Per name, the newest fleet activation record a peer (not penalised) applied, where this
    /// node would apply it after the one it follows (`current`: its epoch and sequence, `(0, 0)`
    /// for none; [`rules::follows`]), with the peer it came from. Whether it is genuine is for
    /// the caller to check.
    pub fn newer_records(
        &self,
        current: impl Fn(&str) -> (u64, u64),
        now: Instant,
    ) -> Vec<(String, SignedActivation)> {
        let mut newest: BTreeMap<&str, (&String, &SignedActivation)> = BTreeMap::new();
        for (addr, peer) in self.peers.iter().filter(|(_, p)| !p.is_penalised(now)) {
            for signed in &peer.activations {
                let record = &signed.payload;
                let (epoch, sequence) = current(&record.name);
                if rules::follows(record, epoch, sequence) != rules::Follows::Newer {
                    continue;
                }
                let better = newest.get(record.name.as_str()).is_none_or(|(_, best)| {
                    (record.epoch, record.sequence) > (best.payload.epoch, best.payload.sequence)
                });
                if better {
                    newest.insert(&record.name, (addr, signed));
                }
            }
        }
        newest
            .into_values()
            .map(|(addr, signed)| (addr.clone(), signed.clone()))
            .collect()
    }

    /// Peers whose last holdings request was answered.
    pub fn reachable(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.failures == 0 && p.last_seen.is_some())
            .count()
    }

    /// Remembers why the last request to `addr` failed, for status.
    pub fn note_error(&mut self, addr: &str, reason: String) {
        if let Some(peer) = self.peers.get_mut(addr) {
            peer.last_error = Some(reason);
        }
    }

    /// `addr` served bad data: not fetched from until [`PENALTY`] has passed.
    pub fn penalise(&mut self, addr: &str, reason: &str, now: Instant) {
        if let Some(peer) = self.peers.get_mut(addr) {
            peer.penalised_until = Some(now + PENALTY);
            peer.last_error = Some(format!("penalised: {reason}"));
        }
    }

    pub fn is_penalised(&self, addr: &str, now: Instant) -> bool {
        self.peers.get(addr).is_some_and(|p| p.is_penalised(now))
    }

    /// Deployments some peer holds whole that are newer than any this node has seen, by name,
    /// versions in order. Names that are not valid deployment names are ignored.
    pub fn wanted(
        &self,
        newest_seen: impl Fn(&str) -> u64,
        valid_name: impl Fn(&str) -> bool,
    ) -> BTreeMap<String, BTreeSet<u64>> {
        let mut wanted: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        for holding in self.peers.values().flat_map(|p| &p.holdings) {
            if !holding.complete
                || holding.version <= newest_seen(&holding.name)
                || !valid_name(&holding.name)
            {
                continue;
            }
            wanted
                .entry(holding.name.clone())
                .or_default()
                .insert(holding.version);
        }
        wanted
    }

    /// Peers (not penalised) holding `name@version` whole: where its manifest may come from.
    pub fn manifest_holders(&self, name: &str, version: u64, now: Instant) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.is_penalised(now))
            .filter(|(_, p)| {
                p.holdings
                    .iter()
                    .any(|h| h.name == name && h.version == version && h.complete)
            })
            .map(|(addr, _)| addr.clone())
            .collect()
    }

    /// Some peer serves `name@version` as its active version.
    pub fn active_at_a_peer(&self, name: &str, version: u64) -> bool {
        self.peers.values().any(|p| {
            p.holdings
                .iter()
                .any(|h| h.name == name && h.version == version && h.active)
        })
    }

    /// Peers (not penalised) that can serve blob `hash`: `(address, is the origin)`, where the
    /// origin is a peer every listing holding of which was pushed there by an operator.
    pub fn holders_of(&self, hash: &str, now: Instant) -> Vec<(String, bool)> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.is_penalised(now))
            .filter_map(|(addr, p)| {
                let listing: Vec<&Holding> = p
                    .holdings
                    .iter()
                    .filter(|h| h.blobs.iter().any(|b| b == hash))
                    .collect();
                (!listing.is_empty()).then(|| (addr.clone(), listing.iter().all(|h| h.pushed_here)))
            })
            .collect()
    }

    /// Where a peer says `name@version` is published in an OCI registry (a pinned reference),
    /// if any. Untrusted like everything from peers: what is pulled from it is checked against
    /// the signed manifest.
    pub fn published_at(&self, name: &str, version: u64, now: Instant) -> Option<String> {
        self.peers
            .values()
            .filter(|p| !p.is_penalised(now))
            .flat_map(|p| &p.holdings)
            .find(|h| h.name == name && h.version == version && h.registry.is_some())
            .and_then(|h| h.registry.clone())
    }

    /// Each peer as `edgectl status` shows it.
    pub fn peer_status(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|(addr, p)| PeerStatus {
                addr: addr.clone(),
                node: p.node_name.clone(),
                learned: p.learned,
                last_seen_ms: p
                    .last_seen
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                last_error: p.last_error.clone(),
                penalised: p.is_penalised(now),
            })
            .collect()
    }

    /// Which peers reported each deployment whole in their last holdings.
    pub fn spread(&self) -> BTreeMap<(String, u64), Vec<String>> {
        let mut spread: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for (addr, peer) in &self.peers {
            for h in peer.holdings.iter().filter(|h| h.complete) {
                spread
                    .entry((h.name.clone(), h.version))
                    .or_default()
                    .push(addr.clone());
            }
        }
        spread
    }

    /// The blobs a peer holds in part, from its last holdings answer (none when it failed). It
    /// replaces what have messages added: a piece whose have raced this answer counts again
    /// from the next one. A set that is not hex or does not fit its size is not believed.
    pub fn record_partial(&mut self, addr: &str, partial: Vec<PartialBlob>) {
        if let Some(peer) = self.peers.get_mut(addr) {
            peer.partial = partial
                .into_iter()
                .filter_map(|blob| {
                    let set = PieceSet::from_hex(piece_count(blob.size), &blob.pieces).ok()?;
                    Some((blob.hash, (blob.size, set)))
                })
                .collect();
        }
    }

    /// Peer `node_name` verified piece `index` of blob `hash` (`size` bytes): its have message.
    /// Returns whether that told anything new (a fetch of the blob may ask it now).
    pub fn record_piece(&mut self, node_name: &str, hash: &str, size: u64, index: u32) -> bool {
        let mut news = false;
        for peer in self
            .peers
            .values_mut()
            .filter(|p| p.node_name.as_deref() == Some(node_name))
        {
            let (held_size, set) = peer
                .partial
                .entry(hash.to_string())
                .or_insert_with(|| (size, PieceSet::empty(piece_count(size))));
            // A have for another size than the peer said before is not believed.
            if *held_size == size {
                news |= set.insert(index);
            }
        }
        news
    }

    /// Every peer (not penalised) with pieces of blob `hash` (`size` bytes, as the signed
    /// manifest says), for the piece exchange: whole holders with every piece, those still
    /// fetching with the pieces they verified. A piece set of the wrong length (another size
    /// than the manifest's) is not believed.
    pub fn piece_holders(&self, hash: &str, size: u64, now: Instant) -> Vec<PieceHolder> {
        let pieces = piece_count(size);
        let mut holders: Vec<PieceHolder> = self
            .holders_of(hash, now)
            .into_iter()
            .map(|(addr, origin)| PieceHolder {
                node_name: self.peers.get(&addr).and_then(|p| p.node_name.clone()),
                addr,
                origin,
                pieces: PieceSet::full(pieces),
            })
            .collect();
        for (addr, peer) in self.peers.iter().filter(|(_, p)| !p.is_penalised(now)) {
            if holders.iter().any(|h| &h.addr == addr) {
                continue;
            }
            let Some((_, set)) = peer.partial.get(hash).filter(|(said, _)| *said == size) else {
                continue;
            };
            holders.push(PieceHolder {
                addr: addr.clone(),
                node_name: peer.node_name.clone(),
                origin: false,
                pieces: set.clone(),
            });
        }
        holders
    }

    /// The node name of the peer at `addr`, once it connected.
    pub fn node_name(&self, addr: &str) -> Option<&str> {
        self.peers.get(addr).and_then(|p| p.node_name.as_deref())
    }
}

/// A peer with pieces of a blob, from [`PeerTable::piece_holders`].
#[derive(Debug, Clone, PartialEq)]
pub struct PieceHolder {
    pub addr: String,
    pub node_name: Option<String>,
    /// The node an operator pushed the blob to.
    pub origin: bool,
    pub pieces: PieceSet,
}

/// What a blob fetch with no piece request in flight does next ([`when_idle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Wait for holders (the next holdings refresh, a busy peer's free slot).
    Wait,
    /// Pull the blob whole from the registry the deployment is published in.
    Registry,
    /// Give up this round.
    GiveUp,
}

/// What an idle blob fetch knows: whether the registry may still be asked (the deployment is
/// published, this node has a registry, and it was not tried in this fetch), whether any peer
/// showed pieces of the blob in this fetch, and how long since it started and since its last
/// verified piece (its start, before the first).
#[derive(Debug, Clone, Copy)]
pub struct IdleFetch {
    pub registry_left: bool,
    pub holders_seen: bool,
    pub since_start: Duration,
    pub since_progress: Duration,
}

/// The registry when no peer has shown any piece, or the pieces stopped coming for
/// [`ORIGIN_PATIENCE`] — but never before [`REGISTRY_GRACE`]; giving up once no piece came
/// for [`BUSY_GIVE_UP`]; else waiting.
pub fn when_idle(fetch: IdleFetch) -> Idle {
    let peers_stalled = !fetch.holders_seen || fetch.since_progress >= ORIGIN_PATIENCE;
    if fetch.registry_left && fetch.since_start >= REGISTRY_GRACE && peers_stalled {
        Idle::Registry
    } else if fetch.since_progress >= BUSY_GIVE_UP {
        Idle::GiveUp
    } else {
        Idle::Wait
    }
}

/// How long a holdings round waits for its next answer: `request_timeout * 2` until some peer
/// has answered, then only what is left of [`HOLDINGS_PATIENCE`] since the round `started`, so a
/// peer that stopped answering does not hold every round up for the full request timeout.
pub fn holdings_wait(
    any_answered: bool,
    started: Instant,
    now: Instant,
    request_timeout: Duration,
) -> Duration {
    if any_answered {
        HOLDINGS_PATIENCE.saturating_sub(now.saturating_duration_since(started))
    } else {
        request_timeout * 2
    }
}

/// Names of `wanted` that no task is syncing yet, marked in `in_sync` as being synced now (one
/// task per name, so the versions of a name go in order, oldest first).
pub fn names_to_sync(
    wanted: BTreeMap<String, BTreeSet<u64>>,
    in_sync: &mut HashSet<String>,
) -> Vec<(String, BTreeSet<u64>)> {
    wanted
        .into_iter()
        .filter(|(name, _)| in_sync.insert(name.clone()))
        .collect()
}

/// Why a manifest a peer sent for `name@version` is not the one asked for, if it is not: the
/// peer is penalised for it.
pub fn wrong_manifest(name: &str, version: u64, sent: &SignedManifest) -> Option<String> {
    (sent.payload.name != name || sent.payload.version != version)
        .then(|| format!("sent {} when asked for {name}@{version}", sent.payload.id()))
}

/// What to do when admitting something a peer sent was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRefusal {
    /// Forged or tampered: the peer lied. Penalise it and try another peer.
    PenaliseAndTryNext,
    /// An untrusted signer or an old version: every peer would send the same, so stop asking.
    GiveUp,
}

/// The action on a refusal, by whether it proves a forgery.
pub fn after_refusal(is_forgery: bool) -> AfterRefusal {
    if is_forgery {
        AfterRefusal::PenaliseAndTryNext
    } else {
        AfterRefusal::GiveUp
    }
}

/// A synced `version` is activated when some peer serves it as active and it is newer than the
/// version active here (a push that spreads).
pub fn activate_synced(active_at_a_peer: bool, active_here: Option<u64>, version: u64) -> bool {
    active_at_a_peer && active_here.is_none_or(|v| v < version)
}

/// Whether one blob of a deployment being synced is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPlan {
    /// Fetched from peers (and the registry, for a published deployment).
    Fetch,
    /// This node's own artifact, held by no peer: compiled here from the verified source.
    CompileHere,
    /// Another target's artifact, held by no peer: there is nothing to relay.
    SkipRelay,
}

impl PeerTable {
    /// Whether blob `hash` of `kind` is fetched. A source always is; an artifact only when some
    /// usable peer holds it or the deployment is `published` in this node's registry.
    pub fn plan_blob(
        &self,
        hash: &str,
        kind: &BlobKind,
        own_target: Target,
        published: bool,
        now: Instant,
    ) -> BlobPlan {
        match kind {
            BlobKind::Artifact { target, .. }
                if !published && self.holders_of(hash, now).is_empty() =>
            {
                if *target == own_target {
                    BlobPlan::CompileHere
                } else {
                    BlobPlan::SkipRelay
                }
            }
            _ => BlobPlan::Fetch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &str = "b10b";

    fn holding(name: &str, version: u64) -> Holding {
        Holding {
            name: name.into(),
            version,
            active: true,
            complete: true,
            pushed_here: false,
            blobs: vec![BLOB.into()],
            fetching: Vec::new(),
            registry: None,
        }
    }

    fn origin_holding() -> Holding {
        Holding {
            pushed_here: true,
            ..holding("app", 1)
        }
    }

    fn table(peers: &[(&str, Vec<Holding>)], now: Instant) -> PeerTable {
        let addrs: Vec<String> = peers.iter().map(|(a, _)| a.to_string()).collect();
        let mut table = PeerTable::new(&addrs);
        for (addr, holdings) in peers {
            table.record_holdings(addr, Ok(holdings.clone()), now, |_| 0);
        }
        table
    }

    fn fail(table: &mut PeerTable, addr: &str, now: Instant) {
        table.record_holdings(addr, Err("no answer".into()), now, |_| 0);
    }

    fn record(name: &str, version: u64, sequence: u64) -> SignedActivation {
        SignedActivation {
            payload: edged_control::signing::ActivationRecord {
                name: name.into(),
                version,
                sequence,
                created_at: 0,
                epoch: 0,
            },
            signer: "k".into(),
            signature: "s".into(),
        }
    }

    #[test]
    fn the_newest_fleet_record_newer_than_ours_is_taken_from_any_honest_peer() {
        let t0 = Instant::now();
        let mut table = table(&[("b", vec![]), ("c", vec![]), ("liar", vec![])], t0);
        table.record_activations("b", vec![record("app", 1, 2), record("web", 3, 1)]);
        table.record_activations("c", vec![record("app", 2, 3)]);
        table.record_activations("liar", vec![record("app", 9, 99)]);
        table.penalise("liar", "forged record", t0);
        let current = |name: &str| if name == "web" { (0, 1) } else { (0, 0) };
        let newer = table.newer_records(current, t0);
        assert_eq!(
            newer.len(),
            1,
            "web's record is not newer than ours: {newer:?}"
        );
        assert_eq!(newer[0].0, "c");
        assert_eq!(newer[0].1.payload.sequence, 3);
        // A peer that stops answering no longer vouches for its records.
        fail(&mut table, "c", t0);
        let newer = table.newer_records(current, t0);
        assert_eq!((newer[0].0.as_str(), newer[0].1.payload.sequence), ("b", 2));
        assert!(table.newer_records(|_| (0, 5), t0).is_empty());
    }

    #[test]
    fn a_fleet_record_is_taken_only_where_this_node_would_apply_it() {
        let t0 = Instant::now();
        let mut table = table(&[("old", vec![]), ("reset", vec![])], t0);
        // A peer from before the bound spreads a record at the end of the range; another
        // follows the operator's reset (epoch 1).
        let mut reset = record("app", 1, 1);
        reset.payload.epoch = 1;
        table.record_activations("old", vec![record("app", 2, u64::MAX)]);
        table.record_activations("reset", vec![reset]);
        // Following #17 of epoch 0: the implausible one is passed over, the reset taken.
        let newer = table.newer_records(|_| (0, 17), t0);
        assert_eq!(newer.len(), 1, "{newer:?}");
        assert_eq!(newer[0].0, "reset");
        // Stuck at u64::MAX: only the reset comes after it.
        let newer = table.newer_records(|_| (0, u64::MAX), t0);
        assert_eq!(newer[0].0, "reset");
        // Once following the reset, neither is newer.
        assert!(table.newer_records(|_| (1, 1), t0).is_empty());
    }

    fn partial(hash: &str, size: u64, pieces: &str) -> PartialBlob {
        PartialBlob {
            hash: hash.into(),
            size,
            pieces: pieces.into(),
        }
    }

    #[test]
    fn whole_holders_have_every_piece_and_the_origin_is_marked() {
        let t0 = Instant::now();
        let table = table(
            &[
                ("origin", vec![origin_holding()]),
                ("relay", vec![holding("app", 1)]),
                ("idle", vec![]),
            ],
            t0,
        );
        let size = 3 * edged_control::verified::PIECE;
        let holders = table.piece_holders(BLOB, size, t0);
        let seen: Vec<(&str, bool, u32)> = holders
            .iter()
            .map(|h| (h.addr.as_str(), h.origin, h.pieces.count()))
            .collect();
        assert_eq!(seen, [("origin", true, 3), ("relay", false, 3)]);
    }

    #[test]
    fn a_fetching_peer_holds_the_pieces_it_says_if_its_set_fits_the_manifest() {
        let t0 = Instant::now();
        let mut table = table(&[("b", vec![]), ("c", vec![]), ("d", vec![])], t0);
        let size = 10 * edged_control::verified::PIECE;
        let mut two = PieceSet::empty(10);
        two.insert(0);
        two.insert(7);
        table.record_partial("b", vec![partial(BLOB, size, &two.to_hex())]);
        // Another size than the manifest's, and a set that is not hex: neither believed.
        table.record_partial("c", vec![partial(BLOB, size + 1, &two.to_hex())]);
        table.record_partial("d", vec![partial(BLOB, size, "zz")]);
        let holders = table.piece_holders(BLOB, size, t0);
        assert_eq!(holders.len(), 1, "{holders:?}");
        assert_eq!(holders[0].addr, "b");
        assert!(!holders[0].origin);
        assert_eq!(holders[0].pieces.iter().collect::<Vec<_>>(), [0, 7]);
        // A failed holdings answer clears what it said.
        fail(&mut table, "b", t0);
        assert!(table.piece_holders(BLOB, size, t0).is_empty());
    }

    #[test]
    fn a_have_message_adds_a_piece_until_the_next_holdings_answer_says_otherwise() {
        let t0 = Instant::now();
        let mut table = table(&[("b", vec![]), ("c", vec![])], t0);
        table.set_node_name("b", "node-b".into());
        let size = 10 * edged_control::verified::PIECE;
        let pieces = |table: &PeerTable| -> Vec<(String, Vec<u32>)> {
            table
                .piece_holders(BLOB, size, t0)
                .into_iter()
                .map(|h| (h.addr, h.pieces.iter().collect()))
                .collect()
        };
        // Unknown node names and pieces past the end tell nothing.
        assert!(!table.record_piece("node-x", BLOB, size, 3));
        assert!(!table.record_piece("node-b", BLOB, size, 10));
        assert!(table.record_piece("node-b", BLOB, size, 3));
        assert!(!table.record_piece("node-b", BLOB, size, 3), "nothing new");
        // A have for another size than the one it named first is not believed.
        assert!(!table.record_piece("node-b", BLOB, size + 1, 4));
        assert_eq!(pieces(&table), [("b".to_string(), vec![3])]);
        let mut two = PieceSet::empty(10);
        two.insert(0);
        two.insert(7);
        table.record_partial("b", vec![partial(BLOB, size, &two.to_hex())]);
        assert_eq!(pieces(&table), [("b".to_string(), vec![0, 7])]);
        assert!(table.record_piece("node-b", BLOB, size, 8));
        assert_eq!(pieces(&table), [("b".to_string(), vec![0, 7, 8])]);
    }

    #[test]
    fn a_lying_peer_holds_nothing_while_penalised() {
        let t0 = Instant::now();
        let mut table = table(
            &[
                ("liar", vec![holding("app", 1)]),
                ("honest", vec![holding("app", 1)]),
                ("fetcher", vec![]),
            ],
            t0,
        );
        let size = 2 * edged_control::verified::PIECE;
        table.record_partial(
            "fetcher",
            vec![partial(BLOB, size, &PieceSet::full(2).to_hex())],
        );
        table.penalise("liar", "piece 3 failed verification", t0);
        table.penalise("fetcher", "piece 1 failed verification", t0);
        let later = t0 + Duration::from_secs(60);
        let holders: Vec<String> = table
            .piece_holders(BLOB, size, later)
            .into_iter()
            .map(|h| h.addr)
            .collect();
        assert_eq!(holders, ["honest"]);
        assert_eq!(table.manifest_holders("app", 1, later), ["honest"]);
        let status = table.peer_status(later);
        let liar = status.iter().find(|p| p.addr == "liar").unwrap();
        assert!(liar.penalised);
        assert!(liar.last_error.as_deref().unwrap().contains("piece 3"));
    }

    fn idle(registry_left: bool, holders_seen: bool, start_s: u64, progress_s: u64) -> Idle {
        when_idle(IdleFetch {
            registry_left,
            holders_seen,
            since_start: Duration::from_secs(start_s),
            since_progress: Duration::from_secs(progress_s),
        })
    }

    #[test]
    fn an_idle_fetch_turns_to_the_registry_only_after_the_grace_and_when_peers_have_nothing() {
        let grace = REGISTRY_GRACE.as_secs();
        // No peer showed any piece: the registry, once the grace is over.
        assert_eq!(idle(true, false, grace - 1, grace - 1), Idle::Wait);
        assert_eq!(idle(true, false, grace, grace), Idle::Registry);
        // Peers have pieces and delivered lately: wait for them.
        assert_eq!(idle(true, true, 30, 1), Idle::Wait);
        // They stopped delivering for the patience: the registry.
        let patience = ORIGIN_PATIENCE.as_secs();
        assert_eq!(idle(true, true, 30, patience - 1), Idle::Wait);
        assert_eq!(idle(true, true, 30, patience), Idle::Registry);
        // Not published, or tried already: the registry is never asked.
        assert_eq!(idle(false, false, 30, 5), Idle::Wait);
    }

    #[test]
    fn an_idle_fetch_gives_up_after_a_minute_without_a_piece() {
        let give_up = BUSY_GIVE_UP.as_secs();
        assert_eq!(idle(false, true, 600, give_up - 1), Idle::Wait);
        assert_eq!(idle(false, true, 600, give_up), Idle::GiveUp);
        assert_eq!(idle(false, false, give_up, give_up), Idle::GiveUp);
        // With the registry left to ask, it is asked first.
        assert_eq!(idle(true, false, give_up, give_up), Idle::Registry);
    }

    #[test]
    fn where_a_deployment_is_published_is_learned_from_peers() {
        let t0 = Instant::now();
        let published = Holding {
            registry: Some("oci://reg:5000/apps/app@sha256:ab".into()),
            ..holding("app", 1)
        };
        let table = table(
            &[("a", vec![holding("app", 1)]), ("b", vec![published])],
            t0,
        );
        assert_eq!(
            table.published_at("app", 1, t0).as_deref(),
            Some("oci://reg:5000/apps/app@sha256:ab")
        );
        assert_eq!(table.published_at("app", 2, t0), None);
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let waits: Vec<u64> = (1..=8).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn an_unreachable_peer_backs_off_and_is_asked_again_at_once_when_it_connects() {
        let t0 = Instant::now();
        let mut table = table(&[("a", vec![]), ("b", vec![])], t0);
        fail(&mut table, "a", t0);
        assert_eq!(table.to_ask(t0), ["b"]);
        assert_eq!(table.to_ask(t0 + Duration::from_secs(1)), ["a", "b"]);
        // A second failure in a row doubles the wait.
        let t1 = t0 + Duration::from_secs(1);
        fail(&mut table, "a", t1);
        assert_eq!(table.to_ask(t1 + Duration::from_millis(1999)), ["b"]);
        assert_eq!(table.to_ask(t1 + Duration::from_secs(2)), ["a", "b"]);
        assert_eq!(table.reachable(), 1);
        // It connects to us (healed partition): no waiting out the backoff.
        fail(&mut table, "a", t1);
        assert!(!table.learn("a", None, "node-a"));
        assert_eq!(table.to_ask(t1), ["a", "b"]);
        // An answer clears the failure count: the next failure waits 1 s again.
        table.record_holdings("a", Ok(vec![]), t1, |_| 0);
        assert_eq!(table.reachable(), 2);
        fail(&mut table, "a", t1);
        assert_eq!(table.to_ask(t1 + Duration::from_secs(1)), ["a", "b"]);
    }

    #[test]
    fn a_connecting_node_joins_once_under_the_name_it_is_known_by() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(&["seed.example:7000".to_string()]);
        assert!(table.learn("10.0.0.9:7000", None, "node-x"));
        assert!(!table.learn("10.0.0.9:7000", None, "node-x"));
        // The configured seed, once connected, is recognised by its resolved address.
        assert!(!table.learn("10.0.0.1:7000", Some("seed.example:7000"), "node-seed"));
        assert_eq!(table.to_ask(t0).len(), 2);
        let status = table.peer_status(t0);
        assert!(status.iter().any(|p| p.addr == "10.0.0.9:7000"
            && p.learned
            && p.node.as_deref() == Some("node-x")));
    }

    #[test]
    fn a_penalty_expires() {
        let t0 = Instant::now();
        let mut table = table(&[("liar", vec![holding("app", 1)])], t0);
        table.penalise("liar", "bad chunk", t0);
        let just_before = t0 + PENALTY - Duration::from_millis(1);
        assert!(table.is_penalised("liar", just_before));
        assert!(table.holders_of(BLOB, just_before).is_empty());
        assert!(table.manifest_holders("app", 1, just_before).is_empty());
        assert!(table.peer_status(just_before)[0].penalised);
        let after = t0 + PENALTY;
        assert!(!table.is_penalised("liar", after));
        assert_eq!(table.holders_of(BLOB, after), [("liar".to_string(), false)]);
    }

    #[test]
    fn only_whole_newer_deployments_with_valid_names_are_wanted_and_news() {
        let t0 = Instant::now();
        let addrs = vec!["b".to_string()];
        let mut table = PeerTable::new(&addrs);
        let seen = |name: &str| if name == "app" { 2 } else { 0 };
        let holdings = vec![
            holding("app", 2),
            holding("app", 3),
            holding("app", 4),
            Holding {
                complete: false,
                ..holding("other", 1)
            },
            holding("../bad", 1),
        ];
        let outcome = table.record_holdings("b", Ok(holdings), t0, seen);
        assert_eq!(
            outcome,
            HoldingsOutcome {
                answered: true,
                news: true
            }
        );
        let wanted = table.wanted(seen, |name| !name.contains('/'));
        assert_eq!(wanted.len(), 1);
        assert_eq!(wanted["app"].iter().copied().collect::<Vec<_>>(), [3, 4]);
        // Nothing newer than seen: no news.
        let outcome = table.record_holdings("b", Ok(vec![holding("app", 2)]), t0, seen);
        assert!(outcome.answered && !outcome.news);
        assert!(table.active_at_a_peer("app", 2));
        assert!(!table.active_at_a_peer("app", 3));
    }

    #[test]
    fn holdings_wait_long_until_one_answers_then_only_the_patience_left() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        assert_eq!(
            holdings_wait(false, t0, t0 + Duration::from_secs(3), timeout),
            timeout * 2
        );
        let later = t0 + Duration::from_millis(400);
        assert_eq!(
            holdings_wait(true, t0, later, timeout),
            Duration::from_millis(600)
        );
        let past = t0 + HOLDINGS_PATIENCE * 3;
        assert_eq!(holdings_wait(true, t0, past, timeout), Duration::ZERO);
    }

    #[test]
    fn a_name_already_syncing_is_not_started_again_and_new_ones_are_marked() {
        let wanted: BTreeMap<String, BTreeSet<u64>> = [
            ("app".to_string(), BTreeSet::from([2, 3])),
            ("web".to_string(), BTreeSet::from([1])),
        ]
        .into();
        let mut in_sync = HashSet::from(["app".to_string()]);
        let started = names_to_sync(wanted, &mut in_sync);
        assert_eq!(started, vec![("web".to_string(), BTreeSet::from([1]))]);
        assert!(in_sync.contains("web") && in_sync.contains("app"));
    }

    #[test]
    fn a_forgery_tries_the_next_peer_any_other_refusal_stops_asking() {
        assert_eq!(after_refusal(true), AfterRefusal::PenaliseAndTryNext);
        assert_eq!(after_refusal(false), AfterRefusal::GiveUp);
    }

    #[test]
    fn a_synced_version_is_activated_only_if_active_at_a_peer_and_newer_than_here() {
        assert!(activate_synced(true, None, 3));
        assert!(activate_synced(true, Some(2), 3));
        assert!(!activate_synced(true, Some(3), 3));
        assert!(!activate_synced(true, Some(4), 3));
        assert!(!activate_synced(false, None, 3));
    }

    fn artifact(target: Target) -> BlobKind {
        BlobKind::Artifact {
            target,
            fingerprint: "f".into(),
        }
    }

    #[test]
    fn an_artifact_no_peer_holds_is_compiled_here_or_skipped_unless_published() {
        let t0 = Instant::now();
        let table = table(&[("b", vec![])], t0);
        let own = Target::X86_64Linux;
        let plan = |kind: &BlobKind, published| table.plan_blob(BLOB, kind, own, published, t0);
        assert_eq!(plan(&artifact(own), false), BlobPlan::CompileHere);
        assert_eq!(
            plan(&artifact(Target::Aarch64Linux), false),
            BlobPlan::SkipRelay
        );
        assert_eq!(plan(&artifact(own), true), BlobPlan::Fetch);
        assert_eq!(plan(&BlobKind::Source, false), BlobPlan::Fetch);
    }

    #[test]
    fn an_artifact_held_only_by_a_penalised_peer_is_not_fetched() {
        let t0 = Instant::now();
        let mut table = table(&[("b", vec![holding("app", 1)])], t0);
        let own = Target::X86_64Linux;
        assert_eq!(
            table.plan_blob(BLOB, &artifact(own), own, false, t0),
            BlobPlan::Fetch
        );
        table.penalise("b", "bad data", t0);
        assert_eq!(
            table.plan_blob(BLOB, &artifact(own), own, false, t0),
            BlobPlan::CompileHere
        );
        let later = t0 + PENALTY + Duration::from_secs(1);
        assert_eq!(
            table.plan_blob(BLOB, &artifact(own), own, false, later),
            BlobPlan::Fetch
        );
    }
}
