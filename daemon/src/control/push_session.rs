//! Push sessions, sans-IO: accepted offers waiting for their blobs, the one writer each blob's
//! partial upload may have, resume offsets, and what a commit still lacks.
//!
//! The tokio shell (`push.rs`) feeds it `now`, the bytes on disk and what the store holds; it
//! answers with decisions. A retried upload of a blob *supersedes* the writer before it: after a
//! client dies its stream lingers until QUIC's idle timeout, and the operator's retry must not
//! wait for that, nor may two streams append to one file.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edged_artifacts::BlobKind;
use edged_artifacts::manifest::BlobRef;
use edged_control::signing::SignedManifest;

use crate::deployments::NeededBlobs;

/// Offers not committed for this long are forgotten (their partial uploads expire with the
/// store's `tmp/` files).
pub const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("no accepted offer for {0}; offer it first")]
    NoOffer(String),
    #[error("blob {hash} is not one {id} needs; refused")]
    NotNeeded { id: String, hash: String },
    #[error("resume offset {offset} for blob {hash} is past the {have} bytes this node has")]
    ResumePastEnd {
        hash: String,
        offset: u64,
        have: u64,
    },
    #[error("{id} is missing blobs: {}", missing.join(", "))]
    MissingBlobs { id: String, missing: Vec<String> },
}

struct Offer {
    signed: SignedManifest,
    offered_at: Instant,
    needed: NeededBlobs,
}

/// The right to write one blob's partial upload, until released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterClaim {
    pub generation: u64,
    /// The writer this one replaces: the shell cancels its stream.
    pub superseded: Option<u64>,
}

#[derive(Default)]
pub struct PushSessions {
    offers: HashMap<String, Offer>,
    /// Blob hash → generation of its current writer.
    writers: HashMap<String, u64>,
    next_generation: u64,
}

impl PushSessions {
    /// Records an admitted offer (replacing an earlier offer of the same deployment) and
    /// forgets abandoned ones. Returns how many were forgotten.
    pub fn offer(&mut self, signed: SignedManifest, needed: NeededBlobs, now: Instant) -> usize {
        let expired = self.expire(now);
        self.offers.insert(
            signed.payload.id(),
            Offer {
                signed,
                offered_at: now,
                needed,
            },
        );
        expired
    }

    /// Forgets offers older than [`ABANDONED_AFTER`]. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.offers.len();
        self.offers
            .retain(|_, offer| now.saturating_duration_since(offer.offered_at) < ABANDONED_AFTER);
        before - self.offers.len()
    }

    /// The blob `hash` as the offer of `id` names it, if that offer needs it.
    pub fn blob(&self, id: &str, hash: &str) -> Result<(BlobRef, BlobKind), PushError> {
        let offer = self
            .offers
            .get(id)
            .ok_or_else(|| PushError::NoOffer(id.to_string()))?;
        offer
            .needed
            .get(hash)
            .cloned()
            .ok_or_else(|| PushError::NotNeeded {
                id: id.to_string(),
                hash: hash.to_string(),
            })
    }

    /// Makes a new writer the current one for `hash`, superseding any writer before it.
    pub fn claim_writer(&mut self, hash: &str) -> WriterClaim {
        self.next_generation += 1;
        let generation = self.next_generation;
        let superseded = self.writers.insert(hash.to_string(), generation);
        WriterClaim {
            generation,
            superseded,
        }
    }

    /// A writer is done. Returns whether it was still the current one (then nobody writes
    /// `hash` any more); a superseded writer's release changes nothing.
    pub fn release_writer(&mut self, hash: &str, generation: u64) -> bool {
        if self.writers.get(hash) == Some(&generation) {
            self.writers.remove(hash);
            true
        } else {
            false
        }
    }

    /// Where an upload may resume: at most the bytes already on disk (`have`), capped at the
    /// blob's size. Bytes past `offset` are dropped by the caller (a dying stream's tail).
    pub fn check_resume(hash: &str, offset: u64, have: u64, size: u64) -> Result<(), PushError> {
        if offset > have.min(size) {
            return Err(PushError::ResumePastEnd {
                hash: hash.to_string(),
                offset,
                have,
            });
        }
        Ok(())
    }

    /// The signed manifest of offer `id` if every blob it needed is held now.
    pub fn ready_to_commit(
        &self,
        id: &str,
        holds: impl Fn(&str) -> bool,
    ) -> Result<SignedManifest, PushError> {
        let offer = self
            .offers
            .get(id)
            .ok_or_else(|| PushError::NoOffer(id.to_string()))?;
        let missing: Vec<String> = offer
            .needed
            .keys()
            .filter(|hash| !holds(hash))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(PushError::MissingBlobs {
                id: id.to_string(),
                missing,
            });
        }
        Ok(offer.signed.clone())
    }

    /// The offer `id` was committed: forget it.
    pub fn committed(&mut self, id: &str) {
        self.offers.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use edged_artifacts::Manifest;

    use super::*;

    fn signed(name: &str, version: u64) -> SignedManifest {
        SignedManifest {
            payload: Manifest::sample(name, version),
            signer: "k".into(),
            signature: String::new(),
        }
    }

    fn needed(hashes: &[&str]) -> NeededBlobs {
        hashes
            .iter()
            .map(|h| {
                (
                    h.to_string(),
                    (
                        BlobRef {
                            blake3: h.to_string(),
                            size: 100,
                        },
                        BlobKind::Source,
                    ),
                )
            })
            .collect::<BTreeMap<_, _>>()
    }

    #[test]
    fn only_blobs_an_offer_needs_are_accepted() {
        let mut sessions = PushSessions::default();
        let now = Instant::now();
        assert_eq!(
            sessions.blob("app@1", "h1"),
            Err(PushError::NoOffer("app@1".into()))
        );
        sessions.offer(signed("app", 1), needed(&["h1"]), now);
        assert_eq!(sessions.blob("app@1", "h1").unwrap().0.size, 100);
        assert!(matches!(
            sessions.blob("app@1", "h2"),
            Err(PushError::NotNeeded { .. })
        ));
    }

    #[test]
    fn a_resume_may_not_start_past_the_bytes_held() {
        assert!(PushSessions::check_resume("h", 0, 0, 100).is_ok());
        assert!(PushSessions::check_resume("h", 40, 40, 100).is_ok());
        // A dying stream wrote past what the client knows: resuming earlier is fine.
        assert!(PushSessions::check_resume("h", 30, 40, 100).is_ok());
        assert!(matches!(
            PushSessions::check_resume("h", 41, 40, 100),
            Err(PushError::ResumePastEnd {
                offset: 41,
                have: 40,
                ..
            })
        ));
        // A partial file longer than the blob (garbage) caps at the blob's size.
        assert!(PushSessions::check_resume("h", 100, 500, 100).is_ok());
        assert!(PushSessions::check_resume("h", 101, 500, 100).is_err());
    }

    #[test]
    fn a_retry_supersedes_the_dead_writer_and_its_late_release_changes_nothing() {
        let mut sessions = PushSessions::default();
        let first = sessions.claim_writer("h");
        assert_eq!(first.superseded, None);
        let retry = sessions.claim_writer("h");
        assert_eq!(retry.superseded, Some(first.generation));
        assert!(retry.generation > first.generation);
        // The dead stream ends after the retry took over: the retry stays registered.
        assert!(!sessions.release_writer("h", first.generation));
        let third = sessions.claim_writer("h");
        assert_eq!(third.superseded, Some(retry.generation));
        assert!(!sessions.release_writer("h", retry.generation));
        assert!(sessions.release_writer("h", third.generation));
        // Nobody writes it now: the next writer supersedes no one.
        assert_eq!(sessions.claim_writer("h").superseded, None);
        // Writers of different blobs do not interfere.
        assert_eq!(sessions.claim_writer("other").superseded, None);
    }

    #[test]
    fn a_commit_names_every_blob_still_missing() {
        let mut sessions = PushSessions::default();
        sessions.offer(
            signed("app", 1),
            needed(&["h1", "h2", "h3"]),
            Instant::now(),
        );
        let err = sessions
            .ready_to_commit("app@1", |h| h == "h2")
            .unwrap_err();
        assert_eq!(
            err,
            PushError::MissingBlobs {
                id: "app@1".into(),
                missing: vec!["h1".into(), "h3".into()],
            }
        );
        let manifest = sessions.ready_to_commit("app@1", |_| true).unwrap();
        assert_eq!(manifest.payload.id(), "app@1");
        sessions.committed("app@1");
        assert!(matches!(
            sessions.ready_to_commit("app@1", |_| true),
            Err(PushError::NoOffer(_))
        ));
    }

    #[test]
    fn offers_abandoned_for_a_day_are_forgotten() {
        let mut sessions = PushSessions::default();
        let start = Instant::now();
        sessions.offer(signed("old", 1), needed(&["h1"]), start);
        let later = start + ABANDONED_AFTER - Duration::from_secs(1);
        assert_eq!(sessions.offer(signed("new", 1), needed(&["h2"]), later), 0);
        let much_later = start + ABANDONED_AFTER;
        assert_eq!(sessions.expire(much_later), 1);
        assert!(sessions.blob("old@1", "h1").is_err());
        assert!(sessions.blob("new@1", "h2").is_ok());
    }
}
