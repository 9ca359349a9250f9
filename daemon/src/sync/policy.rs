//! Sync policy, sans-IO: the peer table (holdings, backoff, penalties), what this node wants,
//! and which holder a blob is fetched from next. Every decision takes `now` as an argument and
//! touches no socket, clock or file, so it is unit-tested with a fake clock; `sync/mod.rs` is
//! the tokio shell that asks peers, streams blobs and feeds the answers back in.
//!
//! The rules, in one place:
//! - a peer that does not answer is asked again only after a backoff (1 s doubling to 30 s), and
//!   at once when it connects to us (a healed partition, a restart);
//! - a peer that served data failing verification (or a tampered manifest) is not fetched from
//!   for [`PENALTY`];
//! - a blob is fetched from holders that got the deployment by sync before the node an operator
//!   pushed it to ("the origin"), so the origin uploads each blob about once; while some peer is
//!   fetching the blob (a relay is coming) the others wait for it, but for at most
//!   [`ORIGIN_PATIENCE`];
//! - a busy holder is asked again later; a holder that failed is not asked again in that fetch;
//! - the OCI registry a deployment is published in is the holder of last resort: it is asked
//!   only when no usable peer holds the blob and none is getting it (a relay is awaited first),
//!   at most once per fetch (its own retries back off inside the attempt), so a fleet pulls a
//!   blob from the registry about once and relays it.

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
/// How long fetchers wait for other holders before pulling from the node that got the push.
pub const ORIGIN_PATIENCE: Duration = Duration::from_secs(10);
/// Longest wait before asking an unreachable peer again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one blob may wait for a free holder within one round.
pub const BUSY_GIVE_UP: Duration = Duration::from_secs(60);
/// How long a round waits for slower peers' holdings once one peer has answered.
pub const HOLDINGS_PATIENCE: Duration = Duration::from_secs(1);

/// How long to wait before asking a peer again after `failures` unanswered requests in a row.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.min(6))
        .min(MAX_BACKOFF)
}

/// Why one attempt to fetch a blob from one peer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// It is serving that blob to someone else, or is at its serving cap.
    Busy,
    /// It sent data that fails verification (or a size the manifest contradicts).
    BadData(String),
    /// It could not be reached, died, stalled or refused.
    Failed(String),
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
    /// The blobs it holds in part, from the same answer.
    partial: Vec<PartialBlob>,
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
        self.listing(hash, now, |h| &h.blobs)
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

    /// Peers (not penalised) downloading `hash` right now.
    pub fn fetchers_of(&self, hash: &str, now: Instant) -> Vec<String> {
        let fetchers = self.listing(hash, now, |h| &h.fetching);
        fetchers.into_iter().map(|(addr, _)| addr).collect()
    }

    fn listing(
        &self,
        hash: &str,
        now: Instant,
        list: impl Fn(&Holding) -> &Vec<String>,
    ) -> Vec<(String, bool)> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.is_penalised(now))
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

    /// The blobs a peer holds in part, from its last holdings answer (none when it failed).
    pub fn record_partial(&mut self, addr: &str, partial: Vec<PartialBlob>) {
        if let Some(peer) = self.peers.get_mut(addr) {
            peer.partial = partial;
        }
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
            let Some(partial) = peer
                .partial
                .iter()
                .find(|b| b.hash == hash && b.size == size)
            else {
                continue;
            };
            if let Ok(set) = PieceSet::from_hex(pieces, &partial.pieces) {
                holders.push(PieceHolder {
                    addr: addr.clone(),
                    node_name: peer.node_name.clone(),
                    origin: false,
                    pieces: set,
                });
            }
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

/// The holder choice for fetching one blob, across attempts.
#[derive(Debug)]
pub struct BlobFetch {
    hash: String,
    started: Instant,
    /// Holders that failed this fetch (died, refused, lied): not asked again in it.
    failed: HashSet<String>,
    /// Spreads fetchers over equal holders.
    rotation: usize,
    /// The registry was tried in this fetch and failed.
    registry_failed: bool,
}

/// Whom to ask next for a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHolders {
    /// Ask these, in order (empty: wait a moment, a relay is coming).
    Ask(Vec<String>),
    /// No usable peer holds it or is getting it, but the deployment is published in a
    /// registry: pull it from there.
    Registry,
    /// Nobody usable holds it or is getting it.
    Nobody,
}

impl BlobFetch {
    pub fn new(hash: &str, now: Instant) -> BlobFetch {
        BlobFetch {
            hash: hash.to_string(),
            started: now,
            failed: HashSet::new(),
            rotation: 0,
            registry_failed: false,
        }
    }

    /// [`BlobFetch::next_holders`], with the registry (when the deployment is `published`) as
    /// the holder of last resort.
    pub fn next_source(&mut self, table: &PeerTable, published: bool, now: Instant) -> NextHolders {
        match self.next_holders(table, now) {
            NextHolders::Nobody if published && !self.registry_failed => NextHolders::Registry,
            other => other,
        }
    }

    /// The registry could not deliver the blob in this fetch.
    pub fn record_registry_failure(&mut self) {
        self.registry_failed = true;
    }

    /// Holders to try now. The node that got the push serves a blob only when nobody else has
    /// it or is getting it, or once [`ORIGIN_PATIENCE`] has passed (a slow relay must not hold
    /// everyone up).
    pub fn next_holders(&mut self, table: &PeerTable, now: Instant) -> NextHolders {
        let (mut preferred, origins): (Vec<_>, Vec<_>) = table
            .holders_of(&self.hash, now)
            .into_iter()
            .filter(|(addr, _)| !self.failed.contains(addr))
            .partition(|(_, origin)| !origin);
        if !preferred.is_empty() {
            let by = self.rotation % preferred.len();
            preferred.rotate_left(by);
        }
        self.rotation += 1;
        let relay_coming = table
            .fetchers_of(&self.hash, now)
            .iter()
            .any(|addr| !self.failed.contains(addr));
        if preferred.is_empty() && origins.is_empty() && !relay_coming {
            return NextHolders::Nobody;
        }
        let patience_over = now.saturating_duration_since(self.started) >= ORIGIN_PATIENCE;
        let use_origins = (preferred.is_empty() && !relay_coming) || patience_over;
        NextHolders::Ask(
            preferred
                .into_iter()
                .chain(origins.into_iter().filter(|_| use_origins))
                .map(|(addr, _)| addr)
                .collect(),
        )
    }

    /// Feeds back how an attempt with `addr` ended.
    pub fn record(&mut self, table: &mut PeerTable, addr: &str, attempt: &Attempt, now: Instant) {
        match attempt {
            Attempt::Busy => {}
            Attempt::BadData(reason) => {
                table.penalise(addr, reason, now);
                self.failed.insert(addr.to_string());
            }
            Attempt::Failed(reason) => {
                table.note_error(addr, reason.clone());
                self.failed.insert(addr.to_string());
            }
        }
    }

    /// Every holder stayed busy for too long: give up for this round.
    pub fn gave_up(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started) >= BUSY_GIVE_UP
    }

    /// Holders that failed this fetch, for the error message.
    pub fn failed(&self) -> Vec<String> {
        let mut failed: Vec<String> = self.failed.iter().cloned().collect();
        failed.sort();
        failed
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

    fn fetching_holding() -> Holding {
        Holding {
            complete: false,
            active: false,
            blobs: Vec::new(),
            fetching: vec![BLOB.into()],
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

    #[test]
    fn the_registry_is_the_holder_of_last_resort() {
        let t0 = Instant::now();
        let mut table = table(&[("a", vec![holding("app", 1)]), ("b", vec![])], t0);
        let mut fetch = BlobFetch::new(BLOB, t0);
        // A peer holds it: the peer, never the registry.
        assert_eq!(
            fetch.next_source(&table, true, t0),
            NextHolders::Ask(vec!["a".into()])
        );
        // It failed: now the registry.
        fetch.record(&mut table, "a", &Attempt::Failed("reset".into()), t0);
        assert_eq!(fetch.next_source(&table, true, t0), NextHolders::Registry);
        // Not published anywhere: nobody.
        assert_eq!(fetch.next_source(&table, false, t0), NextHolders::Nobody);
        // The registry failed too: nobody in this fetch. The next round's fetch starts with
        // the peer again.
        fetch.record_registry_failure();
        assert_eq!(fetch.next_source(&table, true, t0), NextHolders::Nobody);
        assert_eq!(
            BlobFetch::new(BLOB, t0).next_source(&table, true, t0),
            NextHolders::Ask(vec!["a".into()])
        );
    }

    #[test]
    fn a_relay_coming_is_awaited_before_the_registry() {
        let t0 = Instant::now();
        // b is downloading the blob (from the registry or a peer): wait for it.
        let table = table(&[("b", vec![fetching_holding()])], t0);
        let mut fetch = BlobFetch::new(BLOB, t0);
        assert_eq!(
            fetch.next_source(&table, true, t0),
            NextHolders::Ask(vec![])
        );
        let later = t0 + ORIGIN_PATIENCE + Duration::from_secs(1);
        assert_eq!(
            fetch.next_source(&table, true, later),
            NextHolders::Ask(vec![])
        );
        // b stops answering: its download no longer counts, so the registry.
        let mut table = table;
        fail(&mut table, "b", later);
        assert_eq!(
            fetch.next_source(&table, true, later),
            NextHolders::Registry
        );
        // Once b holds it whole, b.
        table.record_holdings("b", Ok(vec![holding("app", 1)]), later, |_| 0);
        assert_eq!(
            fetch.next_source(&table, true, later),
            NextHolders::Ask(vec!["b".into()])
        );
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
    fn holders_that_synced_come_before_the_origin() {
        let t0 = Instant::now();
        let table = table(
            &[
                ("origin", vec![origin_holding()]),
                ("relay", vec![holding("app", 1)]),
            ],
            t0,
        );
        let mut fetch = BlobFetch::new(BLOB, t0);
        assert_eq!(
            fetch.next_holders(&table, t0),
            NextHolders::Ask(vec!["relay".into()])
        );
        // After the patience runs out the origin is a fallback behind the relay.
        let later = t0 + ORIGIN_PATIENCE;
        assert_eq!(
            fetch.next_holders(&table, later),
            NextHolders::Ask(vec!["relay".into(), "origin".into()])
        );
    }

    #[test]
    fn fetchers_wait_for_a_relay_then_fall_back_to_the_origin() {
        let t0 = Instant::now();
        let table = table(
            &[
                ("origin", vec![origin_holding()]),
                ("relay", vec![fetching_holding()]),
            ],
            t0,
        );
        let mut fetch = BlobFetch::new(BLOB, t0);
        // Someone is getting it: wait rather than take a second copy from the origin.
        assert_eq!(fetch.next_holders(&table, t0), NextHolders::Ask(vec![]));
        let almost = t0 + ORIGIN_PATIENCE - Duration::from_millis(1);
        assert_eq!(fetch.next_holders(&table, almost), NextHolders::Ask(vec![]));
        assert_eq!(
            fetch.next_holders(&table, t0 + ORIGIN_PATIENCE),
            NextHolders::Ask(vec!["origin".into()])
        );
    }

    #[test]
    fn the_origin_serves_at_once_when_nobody_else_has_it_or_is_getting_it() {
        let t0 = Instant::now();
        let table = table(&[("origin", vec![origin_holding()]), ("idle", vec![])], t0);
        let mut fetch = BlobFetch::new(BLOB, t0);
        assert_eq!(
            fetch.next_holders(&table, t0),
            NextHolders::Ask(vec!["origin".into()])
        );
        let empty = PeerTable::new(&["idle".to_string()]);
        assert_eq!(
            BlobFetch::new(BLOB, t0).next_holders(&empty, t0),
            NextHolders::Nobody
        );
    }

    #[test]
    fn a_busy_holder_is_asked_again_until_the_fetch_gives_up() {
        let t0 = Instant::now();
        let mut table = table(&[("b", vec![holding("app", 1)])], t0);
        let mut fetch = BlobFetch::new(BLOB, t0);
        fetch.record(&mut table, "b", &Attempt::Busy, t0);
        let later = t0 + Duration::from_secs(30);
        assert_eq!(
            fetch.next_holders(&table, later),
            NextHolders::Ask(vec!["b".into()])
        );
        assert!(!fetch.gave_up(later));
        assert!(fetch.gave_up(t0 + BUSY_GIVE_UP));
        assert!(!table.is_penalised("b", later));
    }

    #[test]
    fn a_lying_peer_is_never_asked_again_while_penalised() {
        let t0 = Instant::now();
        let mut table = table(
            &[
                ("liar", vec![holding("app", 1)]),
                ("honest", vec![holding("app", 1)]),
            ],
            t0,
        );
        let mut fetch = BlobFetch::new(BLOB, t0);
        let NextHolders::Ask(first) = fetch.next_holders(&table, t0) else {
            panic!("two holders");
        };
        assert_eq!(first, ["honest", "liar"]);
        fetch.record(&mut table, "liar", &Attempt::BadData("chunk 3".into()), t0);
        for step in 1..5 {
            let now = t0 + Duration::from_secs(step);
            assert_eq!(
                fetch.next_holders(&table, now),
                NextHolders::Ask(vec!["honest".into()])
            );
        }
        // Nor in the next fetch, nor for its manifests.
        let mut next = BlobFetch::new(BLOB, t0 + Duration::from_secs(60));
        assert_eq!(
            next.next_holders(&table, t0 + Duration::from_secs(60)),
            NextHolders::Ask(vec!["honest".into()])
        );
        assert_eq!(table.manifest_holders("app", 1, t0), ["honest"]);
        assert!(
            table.peer_status(t0)[1]
                .last_error
                .as_deref()
                .unwrap()
                .contains("chunk 3")
        );
    }

    #[test]
    fn a_failed_holder_is_skipped_for_that_fetch_only() {
        let t0 = Instant::now();
        let mut table = table(&[("b", vec![holding("app", 1)])], t0);
        let mut fetch = BlobFetch::new(BLOB, t0);
        fetch.record(&mut table, "b", &Attempt::Failed("reset".into()), t0);
        assert_eq!(fetch.next_holders(&table, t0), NextHolders::Nobody);
        assert_eq!(fetch.failed(), ["b"]);
        assert!(!table.is_penalised("b", t0));
        assert_eq!(
            BlobFetch::new(BLOB, t0).next_holders(&table, t0),
            NextHolders::Ask(vec!["b".into()])
        );
    }

    #[test]
    fn equal_holders_take_turns() {
        let t0 = Instant::now();
        let table = table(
            &[
                ("b", vec![holding("app", 1)]),
                ("c", vec![holding("app", 1)]),
            ],
            t0,
        );
        let mut fetch = BlobFetch::new(BLOB, t0);
        let firsts: Vec<String> = (0..4)
            .map(|_| match fetch.next_holders(&table, t0) {
                NextHolders::Ask(holders) => holders[0].clone(),
                NextHolders::Nobody | NextHolders::Registry => panic!("two holders"),
            })
            .collect();
        assert_eq!(firsts, ["b", "c", "b", "c"]);
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
