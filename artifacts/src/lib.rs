//! # edged-artifacts
//!
//! Owns a node's deployments at rest and their way back to life:
//!
//! - [`store`]: the content-addressed store — BLAKE3-named immutable blob files and a sled index
//!   of blob metadata, manifests by name and version, and the active version of each name —
//!   with atomic puts, `verify` and `gc`.
//! - [`restore`]: the serving engine (pooling allocator, copy-on-write memory images) and the
//!   path from a [`Manifest`] to a cached `InstancePre`, recompiling from source when no stored
//!   artifact fits this engine.
//! - [`pool`]: fitting the pooling allocator into the address space this process may reserve
//!   (the probe, and the sans-IO sizing of slot counts).
//! - [`manifest`]: the unit of deployment.

mod artifact_check;
pub mod manifest;
pub mod pool;
pub mod restore;
pub mod store;

pub use artifact_check::check_artifact;
pub use manifest::{ArtifactRef, BlobRef, DeploymentLimits, InstanceReuse, Manifest, PartRef};
pub use pool::{PoolPlan, PoolRequest, PoolTooLarge, Slots, plan_pool, probe_reservable};
pub use restore::{
    Linkers, LoadPath, PoolSettings, Prepared, RestoreError, Restorer, RuntimeSettings,
    runtime_engine,
};
pub use store::{BlobKind, BlobMeta, GcReport, Partial, Store, StoreError, VerifyReport};
