//! The validated node configuration: what `NodeConfig::load`/`parse` hand to the daemon. Every
//! value here has passed its range and cross-field checks (`validate.rs`) and every path is
//! absolute; nothing in this file parses or refuses anything.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::raw::RawLimits;
use crate::*;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const KIB: u64 = 1 << 10;

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Where the store lives (`index/`, `blobs/`, `tmp/`).
    pub state_dir: PathBuf,
    pub http_listen: SocketAddr,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Epoch tick: the resolution of guest deadlines.
    pub epoch_tick: Duration,
    /// Targets whose artifacts this node keeps and serves to peers (its own target always
    /// included): a mixed fleet relays every architecture's artifact, so no box compiles what a
    /// push already built.
    pub keep_targets: Vec<edged_compiler::Target>,
    /// How long a client may take to send a request head; the connection is closed after.
    pub head_timeout: Duration,
    /// How long a client may take to send a request body; the request gets a 408 and frees the
    /// function's concurrency slot after.
    pub body_timeout: Duration,
    /// Prepared deployments kept mapped.
    pub cache_capacity: usize,
    pub engine: EngineConfig,
    pub functions: Vec<FunctionConfig>,
    /// The QUIC control plane; off when the file has no `[control]` table.
    pub control: Option<ControlConfig>,
    /// Peer sync; off when the file has no `[sync]` table. Needs `[control]` (the node's
    /// certificate and QUIC endpoint).
    pub sync: Option<SyncConfig>,
    /// An OCI registry this node pulls published deployments from; off when the file has no
    /// `[registry]` table.
    pub registry: Option<RegistryConfig>,
}

/// `[registry]`: where published deployments are pulled from, and how to log in. The registry
/// is untrusted storage: every blob is checked against a signed manifest before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    /// `host[:port]`: deployments named `oci://` on this registry are pulled from it.
    pub host: String,
    /// `http://` in the url: no TLS (a registry on loopback or a trusted LAN).
    pub plain_http: bool,
    /// One line `USERNAME:PASSWORD`; never logged.
    pub credentials_file: Option<PathBuf>,
    /// PEM CA certificates trusted for the registry's TLS besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Download bandwidth cap from the registry in bytes per second; `None` is uncapped.
    pub max_rate_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// Peer nodes' control addresses, `host:port`. Nodes that contact this one are added while
    /// it runs, so a new box only needs to know one seed.
    pub peers: Vec<String>,
    /// How often every peer is asked what it holds (anti-entropy). A push or a peer's
    /// announcement starts a round at once.
    pub interval: Duration,
    /// Blob fetches running at once, in total and from any one peer.
    pub max_transfers: usize,
    pub max_transfers_per_peer: usize,
    /// Blob uploads this node serves to peers at once; further fetchers are told to try another
    /// holder, which spreads the fleet's load away from the node that got the push.
    pub max_uploads: usize,
    /// Fetch bandwidth cap in bytes per second, across all transfers; `None` is uncapped.
    pub max_rate_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// Holds `ca.pem` and `<node_name>.pem` / `<node_name>.key`.
    pub identity_dir: PathBuf,
    pub node_name: String,
    /// Operator public keys (`signing.pub` files) whose signatures this node accepts.
    pub trusted_keys: Vec<PathBuf>,
    /// Generate a throwaway fleet (CA, node and operator certificates, signing key) in
    /// `identity_dir` if it is empty. For local development only.
    pub dev_identity: bool,
    /// The congestion controller of the control endpoint's connections (pushes in, sync in
    /// and out): BBR unless set (edge links lose packets without being congested).
    pub congestion: edged_control::Congestion,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub memory_reservation_bytes: u64,
    pub memory_guard_bytes: u64,
    /// Pool slots the file sets; `None` when it does not, and the node sizes the pool to fit
    /// its address space, up to [`DEFAULT_POOL_SLOTS`].
    pub total_instances: Option<u32>,
    pub total_memories: Option<u32>,
    pub max_memory_bytes: usize,
}

/// Pool slots (instances, memories) a node uses when the file sets none and the box's address
/// space has room for them; fewer are used where it has not (39-bit aarch64 kernels,
/// `ulimit -v`).
pub const DEFAULT_POOL_SLOTS: u32 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub name: String,
    pub wasm: PathBuf,
    /// Path prefix this function serves, starting with `/`.
    pub route: String,
    /// If set, only requests for this `Host` match.
    pub host: Option<String>,
    pub init: InitSetting,
    pub limits: Limits,
    /// Instance reuse asked for; resolved against the guest's kind when it is prepared.
    pub instances: InstanceSetting,
    /// The only environment variables the guest sees (CGI variables aside).
    pub env: BTreeMap<String, String>,
    pub dirs: Vec<DirGrant>,
    /// Hosts a `wasi:http` guest may send requests to; everything else is denied.
    pub outbound_hosts: Vec<String>,
    /// `wasi:http` 0.3 middlewares composed in front of `wasm`, outermost first (a middleware
    /// chain; empty for a single component).
    pub middleware: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitSetting {
    /// Pre-initialize if `wizer-initialize` is exported.
    Auto,
    /// Pre-initialize with this export.
    Func(String),
    /// Never pre-initialize.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: usize,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub max_body_bytes: usize,
}

impl Default for Limits {
    /// The limits a function gets when it does not set its own.
    fn default() -> Self {
        let raw = RawLimits::default();
        Limits {
            // Small constants: none of these can overflow.
            memory_bytes: (*raw.memory_mib.get_ref() * MIB) as usize,
            timeout: Duration::from_millis(*raw.timeout_ms.get_ref()),
            max_concurrency: *raw.max_concurrency.get_ref(),
            max_body_bytes: (*raw.max_body_kib.get_ref() * KIB) as usize,
        }
    }
}

/// Limits in the config file's units, from a source nobody validated (a pushed manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitUnits {
    pub memory_mib: u64,
    pub timeout_ms: u64,
    pub max_concurrency: usize,
    pub max_body_kib: u64,
}

impl Limits {
    /// Converts `units` without wrapping: each value outside the range a config file allows is
    /// clamped into it (memory up to [`MAX_MEMORY_RESERVATION_MIB`]; the engine's pool still
    /// caps it at `max_memory_mib`). Returns one note per clamped value, for the caller to log.
    pub fn clamped(units: LimitUnits) -> (Limits, Vec<String>) {
        fn clamp<T: Ord + Copy + fmt::Display>(
            notes: &mut Vec<String>,
            field: &str,
            value: T,
            min: T,
            max: T,
        ) -> T {
            let used = value.clamp(min, max);
            if used != value {
                notes.push(format!(
                    "limits.{field} {value} is outside {min}..={max}; using {used}"
                ));
            }
            used
        }
        let mut notes = Vec::new();
        let memory_mib = clamp(
            &mut notes,
            "memory_mib",
            units.memory_mib,
            1,
            MAX_MEMORY_RESERVATION_MIB,
        );
        let timeout_ms = clamp(
            &mut notes,
            "timeout_ms",
            units.timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        );
        let max_concurrency = clamp(
            &mut notes,
            "max_concurrency",
            units.max_concurrency,
            1,
            MAX_CONCURRENCY,
        );
        let body_kib = clamp(
            &mut notes,
            "max_body_kib",
            units.max_body_kib,
            1,
            MAX_BODY_KIB,
        );
        // Clamped above, so the products stay far below u64::MAX; `usize` is 64-bit on every
        // target edged builds for (x86_64, aarch64), and saturates rather than wraps otherwise.
        let bytes = |count: u64, unit: u64| usize::try_from(count * unit).unwrap_or(usize::MAX);
        let limits = Limits {
            memory_bytes: bytes(memory_mib, MIB),
            timeout: Duration::from_millis(timeout_ms),
            max_concurrency,
            max_body_bytes: bytes(body_kib, KIB),
        };
        (limits, notes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}
