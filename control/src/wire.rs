//! The control protocol, without I/O.
//!
//! Every request opens a bidirectional QUIC stream and carries one frame: a 4-byte big-endian
//! length, then that many bytes of JSON. The answer is one frame back. `PutBlob` is the only
//! request followed by raw bytes (the blob from `offset` on), and `BlobSlice` the only answer
//! followed by raw bytes (a Bao slice, see [`crate::verified`]), so large blobs are never framed
//! or buffered whole by the protocol layer. A frame longer than [`MAX_FRAME`], or one that does
//! not decode to a known message, is an error, and the connection is closed.

use edged_artifacts::manifest::BlobRef;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::identity::Role;
use crate::signing::{SignedActivation, SignedManifest};

/// The ALPN protocol id of this version of the protocol.
pub const ALPN: &[u8] = b"edge/1";
/// Largest frame either side accepts. Manifests and listings are far smaller.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    #[error("undecodable message: {0}")]
    Malformed(String),
    #[error("stream ended inside a frame")]
    Truncated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Step 1 of a push: the node checks the signed manifest (signature, trusted key, newer
    /// version, completeness) and answers which of its blobs it still needs.
    Offer {
        /// Boxed: a manifest is by far the largest request (and grows with a chain's parts).
        manifest: Box<SignedManifest>,
    },
    /// Step 2: one blob named by an accepted offer, sent from `offset` on (resume).
    PutBlob {
        manifest_id: String,
        hash: String,
        offset: u64,
    },
    /// Step 3: every blob is in; index the manifest and optionally activate it.
    Commit {
        manifest_id: String,
        activate: bool,
    },
    List {},
    Status {},
    Activate {
        name: String,
        version: u64,
    },
    Rollback {
        name: String,
    },
    /// A fleet-wide activation (operator only): the node applies the record if it is newer
    /// than the last it applied for the name, and spreads it to its peers by sync.
    ActivateFleet {
        record: SignedActivation,
    },
    Remove {
        name: String,
        version: u64,
    },
    Invoke {
        name: String,
        method: String,
        path: String,
        #[serde(default)]
        body: Vec<u8>,
    },
    /// A deployment published in an OCI registry (operator only): the node admits the signed
    /// manifest like an offer, pulls the blobs it needs from the registry itself (checked
    /// against the manifest's BLAKE3 names), then commits. `reference` is the deployment
    /// pinned by digest (`oci://REGISTRY/REPO@sha256:…`) on the registry in the node's
    /// `[registry]` table.
    Deploy {
        manifest: Box<SignedManifest>,
        reference: String,
        activate: bool,
    },
    /// Sync (node certificates may ask): the signed deployments this node holds.
    Holdings {},
    /// Sync: the signed manifest of one held deployment.
    GetManifest {
        name: String,
        version: u64,
    },
    /// Sync: a held blob as a Bao slice from byte `start` on (answered by `BlobSlice`, then
    /// the slice's bytes, or `Busy` when the node is already serving it or is at its upload cap).
    FetchBlob {
        hash: String,
        start: u64,
    },
    /// Sync: one verified piece of a blob the node holds whole or in part (see
    /// [`crate::verified::piece_range`]), as the Bao slice of its byte range: answered by
    /// `PieceSlice` then the slice's bytes, or `PieceRefused`.
    FetchPiece {
        hash: String,
        index: u32,
    },
    /// Sync: the sender holds something new (a push, or a finished sync); the receiver starts a
    /// sync round now instead of at its next interval.
    Announce {},
    /// Sync: the sender verified piece `index` of blob `hash` (`size` bytes) and serves it from
    /// now on (a have message). Peers fetching the blob may ask it for the piece at once rather
    /// than after their next holdings refresh, and the blob's origin sends the piece's next asker
    /// there instead of uploading another copy.
    Have {
        hash: String,
        size: u64,
        index: u32,
    },
}

impl Request {
    /// The role a certificate must carry to make this request: [`Role::Node`] means any fleet
    /// certificate may (operators may do anything), [`Role::Operator`] that node certificates
    /// are refused. No wildcard arm on purpose: a new request kind does not compile until it
    /// says who may send it, so nothing is open to nodes by default.
    pub fn required_role(&self) -> Role {
        match self {
            // Writes a deployment into the store (push, or a pull from a registry).
            Request::Offer { .. }
            | Request::PutBlob { .. }
            | Request::Commit { .. }
            | Request::Deploy { .. } => Role::Operator,
            // Changes what the node serves, here or fleet-wide.
            Request::Activate { .. }
            | Request::Rollback { .. }
            | Request::ActivateFleet { .. }
            | Request::Remove { .. } => Role::Operator,
            // Runs guest code on demand.
            Request::Invoke { .. } => Role::Operator,
            // Read-only views, open to node certificates as they always were: a peer already
            // sees the deployments in `Holdings`.
            Request::List {} | Request::Status {} => Role::Node,
            // What sync asks of a peer: signed (or hash-checked) data, and a nudge.
            Request::Holdings {}
            | Request::GetManifest { .. }
            | Request::FetchBlob { .. }
            | Request::FetchPiece { .. }
            | Request::Announce {}
            | Request::Have { .. } => Role::Node,
        }
    }

    /// One request of every kind, for tests that must cover them all (checked against the
    /// kinds the wire knows in this module's tests).
    #[cfg(any(test, feature = "test-util"))]
    pub fn one_of_each() -> Vec<Request> {
        use crate::signing::{ActivationRecord, Signed};
        let manifest = || {
            Box::new(Signed {
                payload: edged_artifacts::Manifest::sample("app", 1),
                signer: String::new(),
                signature: String::new(),
            })
        };
        let (name, id, hash) = ("app".to_string(), "app@1".to_string(), "aa".repeat(32));
        vec![
            Request::Offer {
                manifest: manifest(),
            },
            Request::PutBlob {
                manifest_id: id.clone(),
                hash: hash.clone(),
                offset: 0,
            },
            Request::Commit {
                manifest_id: id,
                activate: true,
            },
            Request::List {},
            Request::Status {},
            Request::Activate {
                name: name.clone(),
                version: 1,
            },
            Request::Rollback { name: name.clone() },
            Request::ActivateFleet {
                record: Signed {
                    payload: ActivationRecord {
                        name: name.clone(),
                        version: 1,
                        sequence: 1,
                        created_at: 0,
                        epoch: 0,
                    },
                    signer: String::new(),
                    signature: String::new(),
                },
            },
            Request::Remove {
                name: name.clone(),
                version: 1,
            },
            Request::Invoke {
                name: name.clone(),
                method: "GET".into(),
                path: "/".into(),
                body: Vec::new(),
            },
            Request::Deploy {
                manifest: manifest(),
                reference: format!("oci://registry.test/app@sha256:{}", "cc".repeat(32)),
                activate: true,
            },
            Request::Holdings {},
            Request::GetManifest { name, version: 1 },
            Request::FetchBlob {
                hash: hash.clone(),
                start: 0,
            },
            Request::FetchPiece {
                hash: hash.clone(),
                index: 0,
            },
            Request::Announce {},
            Request::Have {
                hash,
                size: 1,
                index: 0,
            },
        ]
    }
}

/// A signed deployment a node holds (or is still fetching), and which of its blobs it can serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub name: String,
    pub version: u64,
    pub active: bool,
    /// The manifest is stored; `false` while the node is still fetching its blobs (the ones
    /// listed are whole and can be fetched already).
    pub complete: bool,
    /// An operator pushed it to this node. Fetchers prefer other holders, so the node that got
    /// the push uploads each blob about once and the fleet spreads it from there.
    pub pushed_here: bool,
    /// BLAKE3 hashes of the deployment's blobs stored on this node (its source, and the
    /// artifact for its own target).
    pub blobs: Vec<String>,
    /// Blobs of the deployment this node is downloading right now: other fetchers wait for it
    /// to finish rather than ask the node that got the push for another copy.
    #[serde(default)]
    pub fetching: Vec<String>,
    /// Where the deployment is published (`oci://REGISTRY/REPO@sha256:…`), if it came from a
    /// registry: a peer that finds no node holding a blob pulls it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
}

/// A blob a node holds some verified pieces of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialBlob {
    pub hash: String,
    pub size: u64,
    /// The pieces held, a bit per piece (piece 0 in the lowest bit of the first byte), in hex.
    pub pieces: String,
}

/// What a node's syncer knows: its peers, where each deployment is, transfers in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub peers: Vec<PeerStatus>,
    pub deployments: Vec<DeploymentSpread>,
    pub transfers: Vec<TransferStatus>,
    /// Blob bytes this node fetched from peers / served to peers since it started.
    pub fetched_bytes: u64,
    pub served_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Control address, `host:port`.
    pub addr: String,
    /// The name on its node certificate, once connected.
    pub node: Option<String>,
    /// Learned from an inbound connection rather than configured.
    pub learned: bool,
    /// Milliseconds since its holdings last arrived.
    pub last_seen_ms: Option<u64>,
    pub last_error: Option<String>,
    /// It served data that failed verification; not fetched from for a while.
    pub penalised: bool,
}

/// One signed deployment and the nodes known to hold it whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpread {
    pub name: String,
    pub version: u64,
    /// The fleet activation record its name follows here, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_record: Option<FleetRecordInfo>,
    pub here: bool,
    /// Peer addresses that reported it complete in their last holdings.
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    pub deployment: String,
    pub blob: String,
    pub peer: String,
    /// Verified bytes on disk so far, of `size`.
    pub have: u64,
    pub size: u64,
    /// For a blob fetched as pieces: how many are held, and from whom they came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pieces: Option<PieceProgress>,
}

/// A piecewise fetch's progress, for `edgectl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceProgress {
    pub held: u32,
    pub total: u32,
    /// Pieces received in this fetch, by peer address.
    pub from: Vec<(String, u32)>,
    /// Verified bytes per second since the fetch started.
    pub rate: u64,
}

/// A blob the node still needs, and how many bytes of it already arrived earlier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeededBlob {
    pub blob: BlobRef,
    pub have: u64,
}

/// The fleet activation record a name follows, as `ls` and `status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRecordInfo {
    pub sequence: u64,
    pub version: u64,
    /// The record's epoch (0 until the name's sequence was reset); absent from older nodes.
    #[serde(default)]
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub name: String,
    pub version: u64,
    /// The fleet activation record this name follows (its sequence and version), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_record: Option<FleetRecordInfo>,
    pub active: bool,
    pub kind: String,
    pub route: String,
    pub init_func: Option<String>,
    pub signer: Option<String>,
    pub created_at: u64,
    /// The manifest's copy-on-write image report, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_image: Option<edged_compiler::MemoryImageReport>,
    /// A middleware chain's parts, outermost first and the app last (empty for one component).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<ChainPartInfo>,
}

/// One part of a middleware chain, as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPartInfo {
    pub name: String,
    /// `middleware` or `app`.
    pub role: String,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub target: String,
    pub fingerprint: String,
    pub functions_serving: usize,
    pub blobs: usize,
    pub store_bytes: u64,
    /// Present when the node has `[sync]` configured.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// The registry the node pulls from (`[registry]`): scheme and host only, never a login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Needed {
        blobs: Vec<NeededBlob>,
    },
    Stored {
        hash: String,
    },
    Committed {
        id: String,
        active: bool,
    },
    Deployments {
        items: Vec<DeploymentInfo>,
    },
    Status {
        status: NodeStatus,
    },
    Done {
        message: String,
    },
    Invoked {
        status: u16,
        body: Vec<u8>,
    },
    Holdings {
        items: Vec<Holding>,
        /// The newest fleet activation record this node applied, per name. Left out when
        /// empty, so nodes from before fleet records still read the answer.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        activations: Vec<SignedActivation>,
        /// Blobs this node holds in part: the pieces it verified so far, which it serves to
        /// peers while it fetches the rest (the fleet swarms). Left out when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        partial: Vec<PartialBlob>,
    },
    Manifest {
        signed: SignedManifest,
    },
    /// The blob's full size; the Bao slice from the requested start follows on the stream.
    BlobSlice {
        size: u64,
    },
    /// One piece: the blob's full size and the length of the Bao slice that follows.
    PieceSlice {
        size: u64,
        len: u64,
    },
    /// A piece request turned down, and why (the fetcher asks elsewhere or later).
    PieceRefused {
        why: PieceRefusal,
    },
    /// Not refused, just not now: fetch from another holder or try again shortly.
    Busy {
        message: String,
    },
    Error {
        message: String,
    },
}

/// Why a node did not send a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PieceRefusal {
    /// Every upload slot is taken: ask again shortly, or another holder.
    Busy,
    /// This node is the blob's origin and other nodes hold the piece: fetch it from them.
    AskOthers,
    /// It does not hold that piece (any more).
    NotHeld,
}

/// `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let json = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if json.len() > MAX_FRAME {
        return Err(WireError::Oversized(json.len()));
    }
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// The payload length announced by a frame header, checked against the cap before anything
/// is allocated for it.
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::Oversized(len));
    }
    Ok(len)
}

pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Incremental decoder for callers that receive bytes in arbitrary pieces.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = frame_len(self.buf[..4].try_into().expect("4 bytes"))?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Call at end of input: leftover bytes mean a frame was cut short.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn round_trip_in_pieces() {
        let messages = vec![
            Request::List {},
            Request::Activate {
                name: "a".into(),
                version: 3,
            },
            Request::Invoke {
                name: "a".into(),
                method: "GET".into(),
                path: "/x".into(),
                body: vec![1, 2],
            },
            Request::Holdings {},
            Request::FetchBlob {
                hash: "ab".repeat(32),
                start: 4096,
            },
        ];
        let bytes: Vec<u8> = messages.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut decoder = FrameDecoder::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(3) {
            decoder.push(chunk);
            while let Some(m) = decoder.next_message::<Request>().unwrap() {
                out.push(m);
            }
        }
        decoder.finish().unwrap();
        assert_eq!(out, messages);
    }

    /// The `request` tag of every kind the wire decodes: serde lists them all when it refuses
    /// one it does not know.
    fn kinds_the_wire_knows() -> BTreeSet<String> {
        let err = decode::<Request>(br#"{"request":"?"}"#)
            .unwrap_err()
            .to_string();
        let (_, expected) = err.split_once("expected one of ").expect(&err);
        // "`offer`, `put_blob`, …, `announce` at line 1 column 15"
        expected
            .split(", ")
            .map(|kind| kind.split('`').nth(1).expect(&err).to_string())
            .collect()
    }

    #[test]
    fn every_request_kind_needs_the_role_written_here() {
        let all = Request::one_of_each();
        let listed: BTreeSet<String> = all
            .iter()
            .map(|request| {
                let json: serde_json::Value = serde_json::to_value(request).unwrap();
                json["request"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            listed.len(),
            all.len(),
            "one value of each kind, no repeats"
        );
        assert_eq!(listed, kinds_the_wire_knows());
        for request in &all {
            // The policy stated a second time, kind by kind and with no wildcard, so a new kind
            // fails to compile here too, and a role flipped in `required_role` fails this test.
            let expected = match request {
                Request::Offer { .. } => Role::Operator,
                Request::PutBlob { .. } => Role::Operator,
                Request::Commit { .. } => Role::Operator,
                Request::List {} => Role::Node,
                Request::Status {} => Role::Node,
                Request::Activate { .. } => Role::Operator,
                Request::Rollback { .. } => Role::Operator,
                Request::ActivateFleet { .. } => Role::Operator,
                Request::Remove { .. } => Role::Operator,
                Request::Invoke { .. } => Role::Operator,
                Request::Deploy { .. } => Role::Operator,
                Request::Holdings {} => Role::Node,
                Request::GetManifest { .. } => Role::Node,
                Request::FetchBlob { .. } => Role::Node,
                Request::FetchPiece { .. } => Role::Node,
                Request::Announce {} => Role::Node,
                Request::Have { .. } => Role::Node,
            };
            assert_eq!(request.required_role(), expected, "{request:?}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut decoder = FrameDecoder::default();
        decoder.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(
            decoder.next_message::<Request>(),
            Err(WireError::Oversized(MAX_FRAME + 1))
        );
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes()),
            Err(WireError::Oversized(u32::MAX as usize))
        );
    }

    #[test]
    fn unknown_and_malformed_messages_are_refused() {
        let unknown = br#"{"request":"format_disk"}"#;
        let mut frame = (unknown.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(unknown);
        let mut decoder = FrameDecoder::default();
        decoder.push(&frame);
        assert!(matches!(
            decoder.next_message::<Request>(),
            Err(WireError::Malformed(_))
        ));
        let extra = br#"{"request":"list","sneaky":1}"#;
        assert!(matches!(
            decode::<Request>(extra),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(b"\xff\xfe"),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_input_is_reported() {
        let frame = encode(&Request::Status {}).unwrap();
        let mut decoder = FrameDecoder::default();
        decoder.push(&frame[..frame.len() - 1]);
        assert_eq!(decoder.next_message::<Request>(), Ok(None));
        assert_eq!(decoder.finish(), Err(WireError::Truncated));
    }
}
