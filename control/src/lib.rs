//! # edged-control
//!
//! Owns everything `edgectl` and `edged` must agree on to talk to each other:
//!
//! - [`wire`]: the sans-IO protocol — message types, length-prefixed framing, size caps;
//! - [`identity`]: the fleet CA, operator and node certificates (with their role), and the
//!   mutual-TLS QUIC configurations built from them (ALPN `edge/1`, one crypto provider: ring);
//! - [`signing`]: ed25519-signed manifests and the trusted-key check;
//! - [`transport`]: reading and writing frames on QUIC streams;
//! - [`verified`]: BLAKE3-verified streaming of blobs between nodes (Bao slices, resumable);
//! - [`pacing`]: the bandwidth cap shared by concurrent transfers;
//! - [`registry`]: OCI registries as an origin of signed deployments (layout and client).

pub mod identity;
pub mod pacing;
pub mod registry;
pub mod signing;
pub mod transport;
pub mod verified;
pub mod wire;

pub use identity::{Congestion, FleetIdentity, Role};
pub use signing::{SignedManifest, TrustedKeys};
