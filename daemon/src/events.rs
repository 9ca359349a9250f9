//! What the node's parts tell each other without importing each other.
//!
//! Imports run downwards only, so news that must travel up or sideways goes through the types
//! here: the deployments core broadcasts [`DeploymentEvent`]s, the control server passes
//! [`PeerNews`] to sync over a channel, and the control server reads sync's status through the
//! [`SyncStatusSource`] trait that sync implements.

use std::net::SocketAddr;

use edged_control::wire::SyncStatus;

/// Something that changed in the deployments core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeploymentEvent {
    /// A signed deployment was stored (all its blobs held) and may be offered to peers.
    Committed {
        id: String,
        source: DeploymentSource,
    },
    /// A fleet activation record was applied here and is to be spread to peers.
    FleetRecordApplied { id: String },
}

/// Where a committed deployment came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeploymentSource {
    /// An operator pushed it to this node.
    Push,
    /// This node fetched it from peers.
    Sync,
    /// An operator deployed it from an OCI registry; this node pulled the blobs itself.
    Registry,
}

/// What the control server hears that sync must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerNews {
    /// A node certificate connected from `addr` (its control endpoint: peers sync from there).
    Connected { addr: SocketAddr, node_name: String },
    /// A peer says it holds something new.
    Announced,
    /// Peer `node_name` verified piece `index` of blob `hash` (`size` bytes): a have message.
    Has {
        node_name: String,
        hash: String,
        size: u64,
        index: u32,
    },
}

/// Sync's view of the fleet, for `edgectl status`.
pub trait SyncStatusSource: Send + Sync {
    fn sync_status(&self) -> SyncStatus;
}
