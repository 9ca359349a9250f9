//! The deployments rules, fed plain data: whether a signed manifest is admitted, whether a fleet
//! activation record is applied, and what applying one (or a version arriving) does to the
//! name's active version.
//!
//! Nothing here reads the store or touches serving: the shell (`mod.rs`) gathers what a rule
//! needs (what the name holds and has seen, the routes other functions serve, the record the
//! name follows), calls the rule, and acts on the decision. So every rule is unit-tested with
//! made-up data.

use edged_artifacts::{Manifest, StoreError};
use edged_control::TrustedKeys;
use edged_control::signing::{
    ActivationRecord, SignError, SignedActivation, SignedManifest, sequence_label,
};

use crate::functions::pushed_route;

/// Why a signed manifest is not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Unsigned, signed by a key this node does not trust, or a signature that does not match.
    #[error(transparent)]
    Signature(#[from] SignError),
    #[error("{id}: {reason}")]
    BadName { id: String, reason: String },
    #[error("{id} is already stored with different content")]
    Conflict { id: String },
    #[error("{id}: {reason}")]
    BadRoute { id: String, reason: String },
    #[error("{id}: route `{route}` is already served by function `{by}`")]
    RouteTaken {
        id: String,
        route: String,
        by: String,
    },
    #[error(
        "{id} is not newer than version {newest} already seen for `{name}`: refused (an older \
         signed manifest replayed would roll the function back; use `edgectl activate` to go \
         back to a version the node holds)"
    )]
    NotNewer {
        id: String,
        name: String,
        newest: u64,
    },
    #[error("reading the store: {0}")]
    Store(#[from] StoreError),
}

impl Refusal {
    /// The manifest was altered after signing: whoever relayed it is lying. (An untrusted
    /// signer or an old version would get the same answer from every peer.)
    pub fn is_forgery(&self) -> bool {
        matches!(self, Refusal::Signature(SignError::BadSignature(_)))
    }
}

/// Why a fleet activation record is not applied.
#[derive(Debug, thiserror::Error)]
pub enum RecordRefusal {
    #[error(transparent)]
    Signature(#[from] SignError),
    #[error("fleet record {id}: {reason}")]
    BadName { id: String, reason: String },
    #[error(
        "fleet record {id} is not newer than record #{current} already applied for `{name}`: \
         refused (a replayed older record would roll the fleet back)"
    )]
    NotNewer {
        id: String,
        name: String,
        /// The current record's sequence (with its epoch after a reset: `5/1`).
        current: String,
    },
    #[error(
        "fleet record {id} jumps implausibly far past record #{current} of `{name}` (more than \
         2^32 ahead): refused, since a name whose sequence reaches the end of its range \
         could never be activated fleet-wide again; sign a record with the next sequence, or \
         `edgectl activate --fleet --reset` to start the name's sequence again"
    )]
    Implausible {
        id: String,
        name: String,
        current: String,
    },
    #[error("reading the store: {0}")]
    Store(#[from] StoreError),
}

impl RecordRefusal {
    /// Altered after signing: whoever relayed it is lying.
    pub fn is_forgery(&self) -> bool {
        matches!(self, RecordRefusal::Signature(SignError::BadSignature(_)))
    }
}

/// What applying a fleet activation record did here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The version it names is now active.
    Activated,
    /// This node does not hold the version yet: it is activated when it arrives by sync.
    Pending,
    /// The same record was applied before.
    AlreadyApplied,
    /// Recorded (and spread), but this node cannot serve the version; the one it served stays.
    NotServable(String),
}

/// What this node holds of the name a manifest deploys, as admission needs it.
#[derive(Debug, Clone, Copy)]
pub struct NameState<'a> {
    /// The newest version of the name this node has ever seen (0 for none): admission only
    /// goes forward, even past versions since removed. Only read when nothing is `stored`.
    pub newest_seen: u64,
    /// The manifest stored for exactly the version offered, if any.
    pub stored: Option<&'a Manifest>,
}

/// The route a function serves, by name: config-declared and pushed functions alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRoute {
    pub name: String,
    pub route: String,
}

/// An admitted manifest: what the shell does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A version newer than any seen for the name: store what it names.
    New,
    /// Exactly the manifest stored for this version (a re-push or a peer's relay): nothing new
    /// to store, but its blobs may still be missing or damaged, so the push goes on.
    AlreadyStored,
}

/// The checks every manifest passes before anything it names is stored, whether it comes from
/// an operator's push or from a peer: trusted signature, valid name, a route no other function
/// serves, and a version newer than any seen for the name (or exactly the one stored).
pub fn admit(
    signed: &SignedManifest,
    trusted: &TrustedKeys,
    routes: &[HeldRoute],
    state: NameState<'_>,
) -> Result<Admit, Refusal> {
    signed.verify(trusted)?;
    let manifest = &signed.payload;
    let id = manifest.id();
    edged_artifacts::manifest::validate_name(&manifest.name).map_err(|reason| {
        Refusal::BadName {
            id: id.clone(),
            reason,
        }
    })?;
    check_route(manifest, routes)?;
    match state.stored {
        Some(stored) if stored == manifest => Ok(Admit::AlreadyStored),
        Some(_) => Err(Refusal::Conflict { id }),
        None if manifest.version <= state.newest_seen => Err(Refusal::NotNewer {
            id,
            name: manifest.name.clone(),
            newest: state.newest_seen,
        }),
        None => Ok(Admit::New),
    }
}

/// A pushed deployment's route follows the rules of a config route, and no function of another
/// name serves it already (the name's own versions may: a new version takes over its route).
fn check_route(manifest: &Manifest, routes: &[HeldRoute]) -> Result<(), Refusal> {
    let id = manifest.id();
    let route = pushed_route(manifest);
    edged_node_config::check_route(&route).map_err(|reason| Refusal::BadRoute {
        id: id.clone(),
        reason,
    })?;
    match routes.iter().find(|held| {
        held.name != manifest.name && edged_node_config::same_route(&held.route, &route)
    }) {
        Some(held) => Err(Refusal::RouteTaken {
            id,
            route,
            by: held.name.clone(),
        }),
        None => Ok(()),
    }
}

/// A fleet record that passed its checks: what the shell does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordDecision {
    /// Exactly the record the name follows: nothing to do.
    AlreadyApplied,
    /// Store it (so it spreads), then act on [`record_effect`].
    Apply,
}

/// Whether a fleet activation record is applied, given the record the name follows here
/// (`current`): checked like a manifest (trusted signer, valid name) and applied only if newer
/// than the current one, so a replayed older record cannot roll the fleet back.
pub fn check_record(
    signed: &SignedActivation,
    trusted: &TrustedKeys,
    current: Option<&SignedActivation>,
) -> Result<RecordDecision, RecordRefusal> {
    signed.verify(trusted)?;
    let record = &signed.payload;
    let id = record.id();
    edged_artifacts::manifest::validate_name(&record.name).map_err(|reason| {
        RecordRefusal::BadName {
            id: id.clone(),
            reason,
        }
    })?;
    if current == Some(signed) {
        return Ok(RecordDecision::AlreadyApplied);
    }
    let (epoch, sequence) = current.map_or((0, 0), |c| (c.payload.epoch, c.payload.sequence));
    let current = sequence_label(epoch, sequence);
    let name = record.name.clone();
    match follows(record, epoch, sequence) {
        Follows::Newer => Ok(RecordDecision::Apply),
        Follows::NotNewer => Err(RecordRefusal::NotNewer { id, name, current }),
        Follows::Implausible => Err(RecordRefusal::Implausible { id, name, current }),
    }
}

/// How far past the current record a record may jump, in sequence (within an epoch) or in
/// epoch: 2^32. Far beyond any count of real activations (one a second for 136 years), yet a
/// name can never be walked to the end of the `u64` range by accident: a record near
/// `u64::MAX` would leave no next sequence, and end fleet activation of the name for good.
pub const MAX_STEP: u64 = 1 << 32;

/// Where a record stands against the one a name follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follows {
    Newer,
    /// Older or the same place: a replay.
    NotNewer,
    /// Newer, but further ahead than [`MAX_STEP`].
    Implausible,
}

/// Whether `record` comes after the record at `(epoch, sequence)` (`(0, 0)` for none): a
/// later epoch (at most [`MAX_STEP`] epochs on, its sequence starting again, at most
/// [`MAX_STEP`]), or the same epoch and a later sequence at most [`MAX_STEP`] ahead. Sync
/// asks it too, so a node only fetches records it would apply.
pub fn follows(record: &ActivationRecord, epoch: u64, sequence: u64) -> Follows {
    let within = |step: u64| {
        if step <= MAX_STEP {
            Follows::Newer
        } else {
            Follows::Implausible
        }
    };
    match record.epoch.checked_sub(epoch) {
        None => Follows::NotNewer,
        Some(0) => match record.sequence.checked_sub(sequence) {
            None | Some(0) => Follows::NotNewer,
            Some(step) => within(step),
        },
        Some(epochs) => match (within(epochs), within(record.sequence)) {
            (Follows::Newer, Follows::Newer) => Follows::Newer,
            _ => Follows::Implausible,
        },
    }
}

/// What an applied record does to the name here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEffect {
    /// The version is not here yet: it is activated when it arrives ([`activate_on_arrival`]).
    Pending,
    /// The version is already the active one.
    AlreadyActive,
    /// Activate the version (if the node can serve it).
    Activate,
}

/// What applying a record for `version` does, given whether this node holds that version and
/// which version of the name is active.
pub fn record_effect(version: u64, held: bool, active: Option<u64>) -> RecordEffect {
    if !held {
        RecordEffect::Pending
    } else if active == Some(version) {
        RecordEffect::AlreadyActive
    } else {
        RecordEffect::Activate
    }
}

/// Why an operator's push or deploy may not activate the version it brings.
#[derive(Debug, thiserror::Error)]
#[error(
    "{id} is older than version {active}, which is active: a push or deploy never rolls a \
     function back (use `edgectl activate {id}` or `edgectl rollback {name}` to go back on \
     purpose, or pass --no-activate to only store it)"
)]
pub struct WouldRollBack {
    pub id: String,
    pub name: String,
    pub version: u64,
    pub active: u64,
}

/// An operator's push or deploy that asks to activate `name@version` may, unless another version
/// newer than it is active: going back is `activate`'s or `rollback`'s, asked for by name. (An
/// older version re-pushed or deployed from an older registry tag is admitted — it is the one
/// stored — and activating it would roll the function back without a word.)
pub fn check_arrival_activation(
    name: &str,
    version: u64,
    activate: bool,
    active: Option<u64>,
) -> Result<(), WouldRollBack> {
    match active {
        Some(active) if activate && active > version => Err(WouldRollBack {
            id: format!("{name}@{version}"),
            name: name.to_string(),
            version,
            active,
        }),
        _ => Ok(()),
    }
}

/// Whether a version just committed is activated: when asked to, or when it came by sync and
/// the name's fleet record (`record_version`: the version it names) names it — the record was
/// applied before the version got here.
pub fn activate_on_arrival(
    asked: bool,
    synced: bool,
    version: u64,
    record_version: Option<u64>,
) -> bool {
    asked || (synced && record_version == Some(version))
}

#[cfg(test)]
mod tests {
    use edged_control::signing::{ActivationRecord, Signed, signing_key_from_hex};

    use super::*;

    #[test]
    fn a_push_or_deploy_never_activates_a_version_older_than_the_active_one() {
        let refused = check_arrival_activation("r0", 1, true, Some(2)).unwrap_err();
        assert_eq!((refused.active, refused.version), (2, 1));
        let message = refused.to_string();
        assert!(
            message.contains("r0@1") && message.contains("edgectl activate r0@1"),
            "{message}"
        );
        // Newer, the same, nothing active, or only stored: fine.
        assert!(check_arrival_activation("r0", 3, true, Some(2)).is_ok());
        assert!(check_arrival_activation("r0", 2, true, Some(2)).is_ok());
        assert!(check_arrival_activation("r0", 1, true, None).is_ok());
        assert!(check_arrival_activation("r0", 1, false, Some(2)).is_ok());
    }

    const OPERATOR: u8 = 7;
    const STRANGER: u8 = 9;

    fn trusted() -> TrustedKeys {
        let mut keys = TrustedKeys::default();
        keys.add(
            signing_key_from_hex(&hex(OPERATOR))
                .unwrap()
                .verifying_key(),
        );
        keys
    }

    fn hex(byte: u8) -> String {
        format!("{byte:02x}").repeat(32)
    }

    fn signed(name: &str, version: u64, by: u8) -> SignedManifest {
        let key = signing_key_from_hex(&hex(by)).unwrap();
        Signed::sign(Manifest::sample(name, version), &key)
    }

    fn record(name: &str, version: u64, sequence: u64, by: u8) -> SignedActivation {
        let key = signing_key_from_hex(&hex(by)).unwrap();
        let record = ActivationRecord {
            name: name.into(),
            version,
            sequence,
            created_at: 0,
            epoch: 0,
        };
        Signed::sign(record, &key)
    }

    fn seen(newest_seen: u64) -> NameState<'static> {
        NameState {
            newest_seen,
            stored: None,
        }
    }

    fn route(name: &str, route: &str) -> HeldRoute {
        HeldRoute {
            name: name.into(),
            route: route.into(),
        }
    }

    #[test]
    fn a_version_newer_than_any_seen_is_admitted() {
        let offer = signed("app", 3, OPERATOR);
        assert_eq!(admit(&offer, &trusted(), &[], seen(2)).unwrap(), Admit::New);
        assert_eq!(admit(&offer, &trusted(), &[], seen(0)).unwrap(), Admit::New);
    }

    #[test]
    fn the_stored_manifest_offered_again_is_admitted_as_stored() {
        let offer = signed("app", 3, OPERATOR);
        let state = NameState {
            newest_seen: 3,
            stored: Some(&offer.payload),
        };
        assert_eq!(
            admit(&offer, &trusted(), &[], state).unwrap(),
            Admit::AlreadyStored
        );
    }

    #[test]
    fn other_content_under_a_stored_version_is_a_conflict() {
        let offer = signed("app", 3, OPERATOR);
        let mut other = offer.payload.clone();
        other.created_at = 99;
        let state = NameState {
            newest_seen: 3,
            stored: Some(&other),
        };
        let refusal = admit(&offer, &trusted(), &[], state).unwrap_err();
        assert!(matches!(refusal, Refusal::Conflict { .. }), "{refusal}");
    }

    #[test]
    fn a_version_not_newer_than_the_newest_seen_is_refused() {
        for version in [2, 3] {
            let offer = signed("app", version, OPERATOR);
            match admit(&offer, &trusted(), &[], seen(3)) {
                Err(Refusal::NotNewer { newest, name, .. }) => {
                    assert_eq!((newest, name.as_str()), (3, "app"))
                }
                other => panic!("{version}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_untrusted_signer_is_refused_but_is_no_forgery() {
        let offer = signed("app", 1, STRANGER);
        let refusal = admit(&offer, &trusted(), &[], seen(0)).unwrap_err();
        assert!(matches!(
            refusal,
            Refusal::Signature(SignError::UnknownKey { .. })
        ));
        assert!(!refusal.is_forgery());
    }

    #[test]
    fn a_manifest_altered_after_signing_is_a_forgery() {
        let mut offer = signed("app", 1, OPERATOR);
        offer.payload.version = 2;
        let refusal = admit(&offer, &trusted(), &[], seen(0)).unwrap_err();
        assert!(refusal.is_forgery(), "{refusal}");
    }

    #[test]
    fn a_bad_name_is_refused() {
        let offer = signed("no/slashes", 1, OPERATOR);
        let refusal = admit(&offer, &trusted(), &[], seen(0)).unwrap_err();
        assert!(matches!(refusal, Refusal::BadName { .. }), "{refusal}");
    }

    #[test]
    fn a_route_another_name_serves_is_refused() {
        let offer = signed("app", 1, OPERATOR);
        // `/app/` and `/app` are one route.
        let routes = [route("api", "/api"), route("other", "/app/")];
        match admit(&offer, &trusted(), &routes, seen(0)) {
            Err(Refusal::RouteTaken { route, by, .. }) => {
                assert_eq!((route.as_str(), by.as_str()), ("/app", "other"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_route_the_same_name_serves_is_taken_over() {
        let offer = signed("app", 2, OPERATOR);
        let routes = [route("app", "/app"), route("api", "/api")];
        assert_eq!(
            admit(&offer, &trusted(), &routes, seen(1)).unwrap(),
            Admit::New
        );
    }

    #[test]
    fn a_route_that_is_no_route_is_refused() {
        let mut manifest = Manifest::sample("app", 1);
        manifest.route = Some("no-slash".into());
        let key = signing_key_from_hex(&hex(OPERATOR)).unwrap();
        let offer = Signed::sign(manifest, &key);
        let refusal = admit(&offer, &trusted(), &[], seen(0)).unwrap_err();
        assert!(matches!(refusal, Refusal::BadRoute { .. }), "{refusal}");
    }

    #[test]
    fn a_first_record_and_a_newer_sequence_are_applied() {
        let first = record("app", 1, 1, OPERATOR);
        assert_eq!(
            check_record(&first, &trusted(), None).unwrap(),
            RecordDecision::Apply
        );
        let next = record("app", 2, 2, OPERATOR);
        assert_eq!(
            check_record(&next, &trusted(), Some(&first)).unwrap(),
            RecordDecision::Apply
        );
    }

    #[test]
    fn the_record_followed_is_already_applied() {
        let current = record("app", 1, 4, OPERATOR);
        assert_eq!(
            check_record(&current.clone(), &trusted(), Some(&current)).unwrap(),
            RecordDecision::AlreadyApplied
        );
    }

    #[test]
    fn an_older_or_equal_sequence_is_refused() {
        let current = record("app", 2, 4, OPERATOR);
        for (version, sequence) in [(1, 3), (1, 4)] {
            let replay = record("app", version, sequence, OPERATOR);
            match check_record(&replay, &trusted(), Some(&current)) {
                Err(RecordRefusal::NotNewer { current, .. }) => assert_eq!(current, "4"),
                other => panic!("#{sequence}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_forged_record_is_a_forgery_and_an_untrusted_one_is_not() {
        let mut forged = record("app", 1, 2, OPERATOR);
        forged.payload.version = 9;
        let refusal = check_record(&forged, &trusted(), None).unwrap_err();
        assert!(refusal.is_forgery(), "{refusal}");
        let stranger = record("app", 1, 2, STRANGER);
        let refusal = check_record(&stranger, &trusted(), None).unwrap_err();
        assert!(matches!(refusal, RecordRefusal::Signature(_)) && !refusal.is_forgery());
    }

    #[test]
    fn a_record_for_a_version_not_held_is_pending_until_it_arrives() {
        // Applied before version 3 got here: pending, nothing activated.
        assert_eq!(record_effect(3, false, Some(2)), RecordEffect::Pending);
        // Version 3 arrives by sync: activated on arrival; another version is not.
        assert!(activate_on_arrival(false, true, 3, Some(3)));
        assert!(!activate_on_arrival(false, true, 4, Some(3)));
        // A push of the version the record names is activated only if asked.
        assert!(!activate_on_arrival(false, false, 3, Some(3)));
        assert!(activate_on_arrival(true, false, 3, None));
    }

    #[test]
    fn a_record_for_a_held_version_activates_it_unless_active() {
        assert_eq!(record_effect(3, true, Some(2)), RecordEffect::Activate);
        assert_eq!(record_effect(3, true, None), RecordEffect::Activate);
        assert_eq!(record_effect(3, true, Some(3)), RecordEffect::AlreadyActive);
    }

    fn in_epoch(name: &str, version: u64, sequence: u64, epoch: u64) -> SignedActivation {
        let key = signing_key_from_hex(&hex(OPERATOR)).unwrap();
        let mut signed = record(name, version, sequence, OPERATOR);
        signed.payload.epoch = epoch;
        Signed::sign(signed.payload, &key)
    }

    #[test]
    fn a_sequence_implausibly_far_ahead_is_refused() {
        // The end of the range, first record or not: it would leave no next sequence.
        let end = record("app", 1, u64::MAX, OPERATOR);
        let refusal = check_record(&end, &trusted(), None).unwrap_err();
        assert!(
            matches!(refusal, RecordRefusal::Implausible { .. }),
            "{refusal}"
        );
        let current = record("app", 1, 17, OPERATOR);
        let refusal = check_record(&end, &trusted(), Some(&current)).unwrap_err();
        assert!(
            matches!(refusal, RecordRefusal::Implausible { .. }),
            "{refusal}"
        );
        // Exactly MAX_STEP ahead is still a plausible jump; one more is not.
        let far = record("app", 1, 17 + MAX_STEP, OPERATOR);
        assert_eq!(
            check_record(&far, &trusted(), Some(&current)).unwrap(),
            RecordDecision::Apply
        );
        let too_far = record("app", 1, 18 + MAX_STEP, OPERATOR);
        assert!(check_record(&too_far, &trusted(), Some(&current)).is_err());
    }

    #[test]
    fn a_name_stuck_at_the_end_of_the_range_is_recovered_by_a_reset() {
        // A record at u64::MAX applied (by a node from before the bound): no sequence follows.
        let stuck = record("app", 2, u64::MAX, OPERATOR);
        let next = record("app", 1, 1, OPERATOR);
        assert!(check_record(&next, &trusted(), Some(&stuck)).is_err());
        assert_eq!(follows(&next.payload, 0, u64::MAX), Follows::NotNewer);
        // A reset: the next epoch, its sequence from scratch.
        let reset = in_epoch("app", 1, 1, 1);
        assert_eq!(
            check_record(&reset, &trusted(), Some(&stuck)).unwrap(),
            RecordDecision::Apply
        );
        // After it, records of epoch 1 go on; the old epoch's records are replays.
        let after = in_epoch("app", 2, 2, 1);
        assert_eq!(
            check_record(&after, &trusted(), Some(&reset)).unwrap(),
            RecordDecision::Apply
        );
        match check_record(&stuck, &trusted(), Some(&after)) {
            Err(RecordRefusal::NotNewer { current, .. }) => assert_eq!(current, "2/1"),
            other => panic!("{other:?}"),
        }
        assert!(check_record(&reset, &trusted(), Some(&after)).is_err());
    }

    #[test]
    fn a_reset_is_bounded_like_a_sequence() {
        let current = record("app", 1, 5, OPERATOR);
        for (epoch, sequence) in [(u64::MAX, 1), (1, u64::MAX), (MAX_STEP + 1, 1)] {
            let reset = in_epoch("app", 1, sequence, epoch);
            let refusal = check_record(&reset, &trusted(), Some(&current)).unwrap_err();
            assert!(
                matches!(refusal, RecordRefusal::Implausible { .. }),
                "{epoch}/{sequence}: {refusal}"
            );
        }
        // A reset whose signature does not hold is a forgery like any record.
        let mut forged = in_epoch("app", 1, 1, 1);
        forged.payload.epoch = 2;
        assert!(
            check_record(&forged, &trusted(), Some(&current))
                .unwrap_err()
                .is_forgery()
        );
    }
}
