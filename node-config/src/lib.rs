//! # edged-node-config
//!
//! Owns a node's configuration: the TOML schema (every field documented in
//! `node-config/edged.example.toml`), its validation, and the embedded dev default that lets
//! `edged` start with no file at all. Unknown keys and bad values are refused with the file, line
//! and reason; every number has an explicit range, checked before it is scaled to bytes. Relative
//! paths are resolved against the config file's directory. The files a config names are checked
//! by `edged check-config` (the daemon's `preflight`), not here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The dev default: state in `./.edged-dev`, HTTP on 127.0.0.1:8080, no functions declared.
mod instances;
pub use instances::{
    InstancePolicy, InstanceSetting, MAX_CONCURRENT_PER_INSTANCE, MAX_IDLE_TIMEOUT_MS,
    MAX_REQUESTS_PER_INSTANCE,
};

pub const DEV_DEFAULT: &str = include_str!("../dev-default.toml");

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line, where the problem can be pinned to one.
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.reason),
            None => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}

/// The rules every route follows, a config function's or a pushed deployment's: it starts with
/// `/`, has no spaces, and is none of the node's own endpoints.
pub fn check_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') || route.contains(char::is_whitespace) {
        return Err(format!(
            "route `{route}` must start with `/` and contain no spaces"
        ));
    }
    if matches!(
        route.trim_end_matches('/'),
        "/metrics" | "/healthz" | "/readyz"
    ) {
        return Err(format!("route `{route}` is reserved by edged"));
    }
    Ok(())
}

/// Whether two routes serve the same paths (a trailing `/` makes no difference).
pub fn same_route(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Longest head or body timeout a node accepts: a client that needs longer is stalled.
const MAX_CLIENT_TIMEOUT_MS: u64 = 3_600_000;

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

// ---- the file format ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default, rename = "function")]
    functions: Vec<RawFunction>,
    control: Option<RawControl>,
    sync: Option<Spanned<RawSync>>,
    registry: Option<Spanned<RawRegistry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    url: Spanned<String>,
    credentials_file: Option<String>,
    ca_file: Option<String>,
    #[serde(default)]
    max_rate_mb: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSync {
    peers: Vec<Spanned<String>>,
    interval_ms: Spanned<u64>,
    max_transfers: Spanned<usize>,
    max_transfers_per_peer: Spanned<usize>,
    max_uploads: Spanned<usize>,
    max_rate_mb: Spanned<f64>,
}

impl Default for RawSync {
    fn default() -> Self {
        RawSync {
            peers: Vec::new(),
            interval_ms: Spanned::new(0..0, 30_000),
            max_transfers: Spanned::new(0..0, 4),
            max_transfers_per_peer: Spanned::new(0..0, 2),
            max_uploads: Spanned::new(0..0, 2),
            max_rate_mb: Spanned::new(0..0, 0.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    listen: Spanned<String>,
    identity_dir: String,
    #[serde(default = "default_node_name")]
    node_name: String,
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    dev_identity: bool,
    #[serde(default)]
    congestion: Option<Spanned<String>>,
}

fn default_node_name() -> String {
    "node".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNode {
    state_dir: Spanned<String>,
    http_listen: Spanned<String>,
    drain_timeout_ms: Spanned<u64>,
    epoch_tick_ms: Spanned<u64>,
    head_timeout_ms: Spanned<u64>,
    body_timeout_ms: Spanned<u64>,
    cache_capacity: Spanned<usize>,
    keep_targets: Spanned<Vec<String>>,
}

impl Default for RawNode {
    fn default() -> Self {
        RawNode {
            state_dir: Spanned::new(0..0, ".edged-dev".into()),
            http_listen: Spanned::new(0..0, "127.0.0.1:8080".into()),
            drain_timeout_ms: Spanned::new(0..0, 10_000),
            epoch_tick_ms: Spanned::new(0..0, 10),
            head_timeout_ms: Spanned::new(0..0, 10_000),
            body_timeout_ms: Spanned::new(0..0, 30_000),
            keep_targets: Spanned::new(0..0, vec!["x86_64".into(), "aarch64".into()]),
            cache_capacity: Spanned::new(0..0, 64),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEngine {
    memory_reservation_mib: Spanned<u64>,
    memory_guard_mib: Spanned<u64>,
    // u64 in the file so that any number gets the range message, not a type error. Absent
    // means "as many as fit, up to DEFAULT_POOL_SLOTS".
    total_instances: Option<Spanned<u64>>,
    total_memories: Option<Spanned<u64>>,
    max_memory_mib: Spanned<u64>,
}

impl Default for RawEngine {
    fn default() -> Self {
        RawEngine {
            memory_reservation_mib: Spanned::new(0..0, 4096),
            memory_guard_mib: Spanned::new(0..0, 32),
            total_instances: None,
            total_memories: None,
            max_memory_mib: Spanned::new(0..0, 1024),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: Spanned<String>,
    wasm: Spanned<String>,
    route: Spanned<String>,
    host: Option<String>,
    /// `"auto"` (default), `"off"`, or the name of an init export.
    init: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    instances: RawInstances,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    dirs: Vec<RawDir>,
    #[serde(default)]
    outbound_hosts: Vec<String>,
    /// Middleware `.wasm` files in front of `wasm`, outermost first.
    #[serde(default)]
    middleware: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    memory_mib: Spanned<u64>,
    timeout_ms: Spanned<u64>,
    max_concurrency: Spanned<usize>,
    max_body_kib: Spanned<u64>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            memory_mib: Spanned::new(0..0, 128),
            timeout_ms: Spanned::new(0..0, 5_000),
            max_concurrency: Spanned::new(0..0, 32),
            max_body_kib: Spanned::new(0..0, 1024),
        }
    }
}

/// `[function.instances]`: absent values take the guest kind's default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInstances {
    requests: Option<Spanned<u64>>,
    concurrent: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDir {
    host: Spanned<String>,
    guest: Spanned<String>,
    #[serde(default)]
    writable: bool,
}

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// ---- bounds -------------------------------------------------------------------------------
//
// Every number in the file has an explicit range, checked before it is scaled to bytes, so no
// value can wrap into a small limit. The bounds are what an edge box can sensibly use; they are
// repeated in `edged.example.toml` and in each error message.

/// Address space reserved per linear memory. A 32-bit Wasm memory never exceeds 4096 MiB, so
/// the default already covers it; more only helps 64-bit memories.
pub const MAX_MEMORY_RESERVATION_MIB: u64 = 16 * 1024;
/// A guard region bigger than a whole 32-bit memory buys nothing.
pub const MAX_MEMORY_GUARD_MIB: u64 = 4096;
/// Pool slots, and one function's concurrent instances: far past what one box runs at once,
/// and below the sizes at which the pool's and semaphores' own arithmetic saturates.
pub const MAX_INSTANCES: u64 = 1_000_000;
pub const MAX_CONCURRENCY: usize = 1_000_000;
/// The pool maps `total_memories × (reservation + guard)` up front; a 64-bit Linux process has
/// 128 TiB of user address space (4-level page tables), so a pool past that can never start.
pub const MAX_POOL_ADDRESS_SPACE_MIB: u64 = 128 * 1024 * 1024;
/// Prepared deployments kept mapped; the cache allocates its table for this many up front.
pub const MAX_CACHE_CAPACITY: usize = 100_000;
/// Drain on SIGTERM and a request's deadline: one hour is already longer than any supervisor
/// or client waits.
pub const MAX_DRAIN_TIMEOUT_MS: u64 = 3_600_000;
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Largest request body a function may accept: 1 GiB (bodies are buffered in memory).
pub const MAX_BODY_KIB: u64 = 1024 * 1024;
/// Sync: at most one round a day between forced rounds, 1024 transfers at once, 100 GB/s.
pub const MAX_SYNC_INTERVAL_MS: u64 = 86_400_000;
pub const MAX_TRANSFERS: usize = 1024;
pub const MAX_RATE_MB: f64 = 100_000.0;

/// `value` if it lies in `min..=max`, else an error at its span naming `field`, the range and
/// why the range is what it is (`why` may be empty).
fn in_range<T>(
    value: &Spanned<T>,
    field: &str,
    min: T,
    max: T,
    why: &str,
    err_at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<T, ConfigError>
where
    T: PartialOrd + Copy + fmt::Display,
{
    let v = *value.get_ref();
    if v < min || v > max {
        return Err(err_at(
            value.span(),
            format!("{field} must be between {min} and {max}{why}, not {v}"),
        ));
    }
    Ok(v)
}

/// `count × unit` bytes as a `usize`, refusing rather than wrapping. Callers bound `count`
/// first, so this fails only where `usize` is narrower than the bounds (32-bit hosts).
fn to_bytes<T: Copy>(
    count: u64,
    unit: u64,
    value: &Spanned<T>,
    field: &str,
    err_at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<usize, ConfigError> {
    count
        .checked_mul(unit)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| {
            err_at(
                value.span(),
                format!("{field} ({count}) does not fit this host's address space"),
            )
        })
}

impl NodeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            reason: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        NodeConfig::parse(&text, &path.display().to_string(), base)
    }

    /// The embedded dev default, with paths relative to `cwd`.
    pub fn dev_default(cwd: &Path) -> NodeConfig {
        NodeConfig::parse(DEV_DEFAULT, "<embedded dev default>", cwd)
            .expect("the embedded default is valid")
    }

    /// Parses `text` (named `file` in errors); relative paths are taken from `base`.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<NodeConfig, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let err_at = |span: std::ops::Range<usize>, reason: String| ConfigError {
            file: file.to_string(),
            line: (span.end > 0).then(|| line_of(span.start)),
            reason,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            line: e.span().map(|s| line_of(s.start)),
            reason: e.message().trim().to_string(),
        })?;
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };

        let node = &raw.node;
        let http_listen = node
            .http_listen
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|e| {
                err_at(
                    node.http_listen.span(),
                    format!("http_listen `{}`: {e}", node.http_listen.get_ref()),
                )
            })?;
        let drain_timeout_ms = in_range(
            &node.drain_timeout_ms,
            "drain_timeout_ms",
            0,
            MAX_DRAIN_TIMEOUT_MS,
            " (one hour)",
            &err_at,
        )?;
        in_range(&node.epoch_tick_ms, "epoch_tick_ms", 1, 1000, "", &err_at)?;
        in_range(
            &node.cache_capacity,
            "cache_capacity",
            1,
            MAX_CACHE_CAPACITY,
            "",
            &err_at,
        )?;
        let mut keep_targets = Vec::new();
        for name in node.keep_targets.get_ref() {
            let target: edged_compiler::Target = name.parse().map_err(|_| {
                err_at(
                    node.keep_targets.span(),
                    format!(
                        "keep_targets: `{name}` is not a target edged builds for (x86_64, aarch64)"
                    ),
                )
            })?;
            if !keep_targets.contains(&target) {
                keep_targets.push(target);
            }
        }
        if let Some(host) = edged_compiler::Target::host()
            && !keep_targets.contains(&host)
        {
            keep_targets.push(host);
        }
        for (value, key) in [
            (&node.head_timeout_ms, "head_timeout_ms"),
            (&node.body_timeout_ms, "body_timeout_ms"),
        ] {
            in_range(value, key, 1, MAX_CLIENT_TIMEOUT_MS, " (one hour)", &err_at)?;
        }
        let e = &raw.engine;
        // Each bound is checked on the MiB value before it is scaled, so a huge value is
        // refused for what it is rather than wrapping into a small one.
        let reservation_mib = in_range(
            &e.memory_reservation_mib,
            "memory_reservation_mib",
            1,
            MAX_MEMORY_RESERVATION_MIB,
            " (4096 covers any 32-bit Wasm memory)",
            &err_at,
        )?;
        let guard_mib = in_range(
            &e.memory_guard_mib,
            "memory_guard_mib",
            0,
            MAX_MEMORY_GUARD_MIB,
            "",
            &err_at,
        )?;
        let max_memory_mib = *e.max_memory_mib.get_ref();
        if max_memory_mib == 0 || max_memory_mib > reservation_mib {
            return Err(err_at(
                e.max_memory_mib.span(),
                format!(
                    "max_memory_mib must be between 1 and memory_reservation_mib \
                     ({reservation_mib}; a memory cannot grow past its reservation), not \
                     {max_memory_mib}"
                ),
            ));
        }
        let slots = |value: &Option<Spanned<u64>>, field: &str| {
            value
                .as_ref()
                .map(|v| in_range(v, field, 1, MAX_INSTANCES, "", &err_at))
                .transpose()
        };
        let total_instances = slots(&e.total_instances, "total_instances")?;
        let total_memories = slots(&e.total_memories, "total_memories")?;
        // Bounded above: at most 10^6 × (16384 + 4096) MiB, far inside u64. A default count is
        // fitted to the box at start (and 1000 slots of the largest reservation fit anyway).
        let pool_mib =
            total_memories.unwrap_or(u64::from(DEFAULT_POOL_SLOTS)) * (reservation_mib + guard_mib);
        if let Some(total_memories) = &e.total_memories
            && pool_mib > MAX_POOL_ADDRESS_SPACE_MIB
        {
            return Err(err_at(
                total_memories.span(),
                format!(
                    "total_memories × (memory_reservation_mib + memory_guard_mib) is {} GiB of \
                     address space, more than the 131072 GiB (128 TiB) a 64-bit Linux process \
                     has; lower total_memories or memory_reservation_mib",
                    pool_mib / 1024
                ),
            ));
        }
        let reservation = reservation_mib * MIB;
        let max_memory = to_bytes(
            max_memory_mib,
            MIB,
            &e.max_memory_mib,
            "max_memory_mib",
            &err_at,
        )?;

        let mut functions: Vec<FunctionConfig> = Vec::new();
        for f in &raw.functions {
            functions.push(validate_function(
                f,
                &functions,
                max_memory_mib,
                &err_at,
                &resolve,
            )?);
        }
        let control = match &raw.control {
            None => None,
            Some(c) => {
                let listen = c.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
                    err_at(
                        c.listen.span(),
                        format!("control.listen `{}`: {e}", c.listen.get_ref()),
                    )
                })?;
                let identity_dir = resolve(&c.identity_dir);
                let mut trusted_keys: Vec<PathBuf> =
                    c.trusted_keys.iter().map(|k| resolve(k)).collect();
                if c.dev_identity && trusted_keys.is_empty() {
                    trusted_keys.push(identity_dir.join("signing.pub"));
                }
                let congestion = match &c.congestion {
                    None => edged_control::Congestion::default(),
                    Some(name) => name.get_ref().parse().map_err(|e: String| {
                        err_at(name.span(), format!("control.congestion: {e}"))
                    })?,
                };
                Some(ControlConfig {
                    listen,
                    identity_dir,
                    node_name: c.node_name.clone(),
                    trusted_keys,
                    dev_identity: c.dev_identity,
                    congestion,
                })
            }
        };
        let sync = match &raw.sync {
            None => None,
            Some(raw_sync) => {
                if control.is_none() {
                    return Err(err_at(
                        raw_sync.span(),
                        "[sync] needs a [control] table: peers talk over the control plane \
                         with this node's certificate"
                            .into(),
                    ));
                }
                Some(validate_sync(raw_sync.get_ref(), &err_at)?)
            }
        };
        let registry = match &raw.registry {
            None => None,
            Some(r) => {
                if control.is_none() {
                    return Err(err_at(
                        r.span(),
                        "[registry] needs a [control] table: deployments are announced to the \
                         node over the control plane"
                            .into(),
                    ));
                }
                Some(validate_registry(r.get_ref(), &err_at, &resolve)?)
            }
        };
        Ok(NodeConfig {
            state_dir: resolve(node.state_dir.get_ref()),
            http_listen,
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            epoch_tick: Duration::from_millis(*node.epoch_tick_ms.get_ref()),
            keep_targets,
            head_timeout: Duration::from_millis(*node.head_timeout_ms.get_ref()),
            body_timeout: Duration::from_millis(*node.body_timeout_ms.get_ref()),
            cache_capacity: *node.cache_capacity.get_ref(),
            engine: EngineConfig {
                memory_reservation_bytes: reservation,
                memory_guard_bytes: guard_mib * MIB,
                // Both bounded by MAX_INSTANCES, far below u32::MAX.
                total_instances: total_instances.map(|n| u32::try_from(n).expect("bounded above")),
                total_memories: total_memories.map(|n| u32::try_from(n).expect("bounded above")),
                max_memory_bytes: max_memory,
            },
            functions,
            control,
            sync,
            registry,
        })
    }
}

fn validate_registry(
    r: &RawRegistry,
    err_at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<RegistryConfig, ConfigError> {
    let url = r.url.get_ref();
    let bad = |why: &str| {
        err_at(
            r.url.span(),
            format!("registry.url `{url}` {why} (e.g. https://registry.example:5000)"),
        )
    };
    let (plain_http, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (true, rest)
    } else {
        return Err(bad("must start with https:// or http://"));
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad(
            "must be a scheme and host[:port] only, without a path or a login",
        ));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(bad("has a port that is not a number from 1 to 65535"));
    }
    let rate = r.max_rate_mb.as_ref().map_or(0.0, |v| *v.get_ref());
    if !(0.0..=MAX_RATE_MB).contains(&rate) {
        return Err(err_at(
            r.max_rate_mb.as_ref().map_or(0..0, |v| v.span()),
            format!(
                "registry.max_rate_mb must be 0 (no cap) or a number of MB/s up to \
                 {MAX_RATE_MB}, not {rate}"
            ),
        ));
    }
    Ok(RegistryConfig {
        host: host.to_string(),
        plain_http,
        credentials_file: r.credentials_file.as_deref().map(resolve),
        ca_file: r.ca_file.as_deref().map(resolve),
        max_rate_bytes: (rate > 0.0).then_some((rate * 1e6) as u64),
    })
}

fn validate_sync(
    s: &RawSync,
    err_at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<SyncConfig, ConfigError> {
    let mut peers = Vec::new();
    for peer in &s.peers {
        let text = peer.get_ref();
        let port_ok = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(err_at(
                peer.span(),
                format!("sync peer `{text}` must be host:port (e.g. 10.0.0.7:7443)"),
            ));
        }
        if peers.contains(text) {
            return Err(err_at(
                peer.span(),
                format!("sync peer `{text}` is listed twice"),
            ));
        }
        peers.push(text.clone());
    }
    let interval = in_range(
        &s.interval_ms,
        "sync.interval_ms",
        100,
        MAX_SYNC_INTERVAL_MS,
        " (one day)",
        err_at,
    )?;
    for (field, value) in [
        ("sync.max_transfers", &s.max_transfers),
        ("sync.max_transfers_per_peer", &s.max_transfers_per_peer),
        ("sync.max_uploads", &s.max_uploads),
    ] {
        in_range(value, field, 1, MAX_TRANSFERS, "", err_at)?;
    }
    let rate = *s.max_rate_mb.get_ref();
    // `!(..)` rather than `<`/`>` so NaN is refused too.
    if !(0.0..=MAX_RATE_MB).contains(&rate) {
        return Err(err_at(
            s.max_rate_mb.span(),
            format!(
                "sync.max_rate_mb must be 0 (no cap) or a number of MB/s up to {MAX_RATE_MB}, \
                 not {rate}"
            ),
        ));
    }
    Ok(SyncConfig {
        peers,
        interval: Duration::from_millis(interval),
        max_transfers: *s.max_transfers.get_ref(),
        max_transfers_per_peer: *s.max_transfers_per_peer.get_ref(),
        max_uploads: *s.max_uploads.get_ref(),
        max_rate_bytes: (rate > 0.0).then_some((rate * 1e6) as u64),
    })
}

fn validate_function(
    f: &RawFunction,
    earlier: &[FunctionConfig],
    max_memory_mib: u64,
    err_at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
    resolve: &impl Fn(&str) -> PathBuf,
) -> Result<FunctionConfig, ConfigError> {
    let name = f.name.get_ref();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(err_at(
            f.name.span(),
            format!("function name `{name}` must be 1-64 of A-Z a-z 0-9 - _ ."),
        ));
    }
    if earlier.iter().any(|g| &g.name == name) {
        return Err(err_at(
            f.name.span(),
            format!("function `{name}` is declared twice"),
        ));
    }
    let route = f.route.get_ref();
    check_route(route).map_err(|reason| err_at(f.route.span(), reason))?;
    let host = f.host.as_ref().map(|h| h.to_ascii_lowercase());
    if let Some(other) = earlier
        .iter()
        .find(|g| same_route(&g.route, route) && g.host == host)
    {
        return Err(err_at(
            f.route.span(),
            format!(
                "route `{route}` is already served by function `{}`",
                other.name
            ),
        ));
    }
    let wasm = resolve(f.wasm.get_ref());
    if !wasm.is_file() {
        return Err(err_at(
            f.wasm.span(),
            format!("wasm `{}` is not a readable file", wasm.display()),
        ));
    }
    let mut middleware = Vec::with_capacity(f.middleware.len());
    for m in &f.middleware {
        let path = resolve(m.get_ref());
        if !path.is_file() {
            return Err(err_at(
                m.span(),
                format!("middleware `{}` is not a readable file", path.display()),
            ));
        }
        middleware.push(path);
    }
    let l = &f.limits;
    let memory_mib = in_range(
        &l.memory_mib,
        "limits.memory_mib",
        1,
        max_memory_mib,
        " (the engine's max_memory_mib)",
        err_at,
    )?;
    let memory = to_bytes(memory_mib, MIB, &l.memory_mib, "limits.memory_mib", err_at)?;
    let timeout_ms = in_range(
        &l.timeout_ms,
        "limits.timeout_ms",
        1,
        MAX_TIMEOUT_MS,
        " (one hour)",
        err_at,
    )?;
    let max_concurrency = in_range(
        &l.max_concurrency,
        "limits.max_concurrency",
        1,
        MAX_CONCURRENCY,
        "",
        err_at,
    )?;
    let body_kib = in_range(
        &l.max_body_kib,
        "limits.max_body_kib",
        1,
        MAX_BODY_KIB,
        " (1 GiB)",
        err_at,
    )?;
    let max_body_bytes = to_bytes(
        body_kib,
        KIB,
        &l.max_body_kib,
        "limits.max_body_kib",
        err_at,
    )?;
    let instances = validate_instances(&f.instances, err_at)?;
    let mut dirs = Vec::new();
    for d in &f.dirs {
        let host_dir = resolve(d.host.get_ref());
        if !host_dir.is_dir() {
            return Err(err_at(
                d.host.span(),
                format!("dir `{}` does not exist", host_dir.display()),
            ));
        }
        if !d.guest.get_ref().starts_with('/') {
            return Err(err_at(
                d.guest.span(),
                format!("guest path `{}` must be absolute", d.guest.get_ref()),
            ));
        }
        dirs.push(DirGrant {
            host: host_dir,
            guest: d.guest.get_ref().clone(),
            writable: d.writable,
        });
    }
    let init = match f.init.as_deref() {
        None | Some("auto") => InitSetting::Auto,
        Some("off") => InitSetting::Off,
        Some(func) => InitSetting::Func(func.to_string()),
    };
    Ok(FunctionConfig {
        name: name.clone(),
        wasm,
        route: route.clone(),
        host,
        init,
        limits: Limits {
            memory_bytes: memory,
            timeout: Duration::from_millis(timeout_ms),
            max_concurrency,
            max_body_bytes,
        },
        instances,
        env: f.env.clone(),
        dirs,
        outbound_hosts: f
            .outbound_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        middleware,
    })
}

fn validate_instances(
    raw: &RawInstances,
    err_at: &impl Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<InstanceSetting, ConfigError> {
    let check = |value: &Option<Spanned<u64>>, field: &str, max: u64, why: &str| {
        value
            .as_ref()
            .map(|v| in_range(v, field, 1, max, why, err_at))
            .transpose()
    };
    let requests = check(
        &raw.requests,
        "instances.requests",
        MAX_REQUESTS_PER_INSTANCE,
        " (1 = a fresh instance per request)",
    )?;
    let concurrent = check(
        &raw.concurrent,
        "instances.concurrent",
        MAX_CONCURRENT_PER_INSTANCE,
        "",
    )?;
    let idle = check(
        &raw.idle_timeout_ms,
        "instances.idle_timeout_ms",
        MAX_IDLE_TIMEOUT_MS,
        " (one hour)",
    )?;
    // The maxima fit in u32.
    Ok(InstanceSetting {
        requests: requests.map(|v| v as u32),
        concurrent: concurrent.map(|v| v as u32),
        idle_timeout: idle.map(Duration::from_millis),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, "edged.toml", Path::new(env!("CARGO_MANIFEST_DIR")))
    }

    #[test]
    fn dev_default_parses() {
        let c = NodeConfig::dev_default(Path::new("/tmp/x"));
        assert_eq!(c.http_listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x/.edged-dev"));
        assert!(c.functions.is_empty());
        let control = c.control.unwrap();
        assert!(control.dev_identity);
        assert_eq!(
            control.trusted_keys,
            vec![PathBuf::from("/tmp/x/.edged-dev/identity/signing.pub")]
        );
    }

    #[test]
    fn example_config_parses() {
        // The example points at a sample guest; make sure it is built.
        edged_testkit::guest("hello-http.wasm");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(dir.join("edged.example.toml")).unwrap();
        let c = NodeConfig::parse(&text, "edged.example.toml", dir).unwrap();
        assert_eq!(c.functions.len(), 1);
        let f = &c.functions[0];
        assert_eq!(f.route, "/hello");
        assert_eq!(f.limits.timeout, Duration::from_millis(2000));
        assert_eq!(f.env.get("GREETING").map(String::as_str), Some("hi"));
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let err = parse("[node]\nhttp_listen = \"127.0.0.1:1\"\nfrobnicate = 3\n").unwrap_err();
        assert_eq!(err.file, "edged.toml");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.reason.contains("frobnicate"), "{err}");
    }

    #[test]
    fn bad_values_name_the_line_and_reason() {
        let err = parse("[node]\n\nhttp_listen = \"localhost\"\n").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.reason.contains("http_listen"), "{err}");

        let text = "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
                    [function.limits]\nmemory_mib = 999999\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.reason.contains("memory_mib"), "{err}");

        let text = "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
                    [[function]]\nname = \"b\"\nwasm = \"Cargo.toml\"\nroute = \"/a/\"\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert!(
            err.reason.contains("already served by function `a`"),
            "{err}"
        );

        let err = parse("[[function]]\nname = \"a\"\nwasm = \"nope.wasm\"\nroute = \"/a\"\n")
            .unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.to_string().starts_with("edged.toml:3: wasm"), "{err}");
    }

    #[test]
    fn the_congestion_controller_is_bbr_unless_named_and_a_bad_name_is_refused_at_its_line() {
        let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
        let c = parse(control).unwrap().control.unwrap();
        assert_eq!(c.congestion, edged_control::Congestion::Bbr);
        let c = parse(&format!("{control}congestion = \"cubic\"\n"))
            .unwrap()
            .control
            .unwrap();
        assert_eq!(c.congestion, edged_control::Congestion::Cubic);
        let err = parse(&format!("{control}congestion = \"reno\"\n")).unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.reason.contains("bbr, cubic or newreno"), "{err}");
    }

    #[test]
    fn registry_table_is_validated_with_lines() {
        let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
        let c = parse(&format!(
            "{control}[registry]\nurl = \"http://127.0.0.1:5000\"\ncredentials_file = \"creds\"\n"
        ))
        .unwrap();
        let r = c.registry.unwrap();
        assert_eq!((r.host.as_str(), r.plain_http), ("127.0.0.1:5000", true));
        assert!(r.credentials_file.unwrap().ends_with("creds"));
        assert_eq!((r.ca_file, r.max_rate_bytes), (None, None));
        let r = parse(&format!(
            "{control}[registry]\nurl = \"https://reg.example/\"\nmax_rate_mb = 2\n"
        ))
        .unwrap()
        .registry
        .unwrap();
        assert_eq!((r.host.as_str(), r.plain_http), ("reg.example", false));
        assert_eq!(r.max_rate_bytes, Some(2_000_000));

        for (url, why) in [
            ("ftp://reg", "https://"),
            ("https://reg/apps", "without a path"),
            ("https://reg:http", "port"),
        ] {
            let err = parse(&format!("{control}[registry]\n\nurl = \"{url}\"\n")).unwrap_err();
            assert_eq!(err.line, Some(6), "{err}");
            assert!(err.reason.contains(why), "{url}: {err}");
        }
        let err = parse(&format!(
            "{control}[registry]\nurl = \"http://r\"\nmax_rate_mb = -1\n"
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        let err = parse("[registry]\nurl = \"http://r\"\n").unwrap_err();
        assert_eq!(err.line, Some(1), "{err}");
        assert!(err.reason.contains("[control]"), "{err}");
        let err = parse(&format!(
            "{control}[registry]\nurl = \"http://r\"\npassword = \"x\"\n"
        ))
        .unwrap_err();
        assert!(err.reason.contains("password"), "{err}");
    }

    #[test]
    fn middleware_files_are_resolved_in_order_and_each_must_exist() {
        let ok = parse(
            "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
             middleware = [\"src/lib.rs\", \"Cargo.toml\"]\n",
        )
        .unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(
            ok.functions[0].middleware,
            [dir.join("src/lib.rs"), dir.join("Cargo.toml")]
        );
        let none =
            parse("[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n").unwrap();
        assert!(none.functions[0].middleware.is_empty());

        let err = parse(
            "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
             middleware = [\n  \"Cargo.toml\",\n  \"auth.wasm\",\n]\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(7), "{err}");
        assert!(
            err.to_string().starts_with("edged.toml:7: middleware `"),
            "{err}"
        );
        assert!(
            err.reason.ends_with("auth.wasm` is not a readable file"),
            "{err}"
        );
    }

    #[test]
    fn sync_table_is_validated_with_lines() {
        let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
        let c = parse(&format!(
            "{control}[sync]\npeers = [\"10.0.0.2:7443\", \"box7.lan:7443\"]\nmax_rate_mb = 2.5\n"
        ))
        .unwrap();
        let sync = c.sync.unwrap();
        assert_eq!(sync.peers, ["10.0.0.2:7443", "box7.lan:7443"]);
        assert_eq!(sync.interval, Duration::from_secs(30));
        assert_eq!(sync.max_rate_bytes, Some(2_500_000));

        let err = parse(&format!("{control}[sync]\npeers = [\n  \"10.0.0.2\",\n]\n")).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.reason.contains("host:port"), "{err}");

        let err = parse(&format!("{control}[sync]\ninterval_ms = 5\n")).unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");

        let err = parse("[sync]\npeers = []\n").unwrap_err();
        assert_eq!(err.line, Some(1), "{err}");
        assert!(err.reason.contains("[control]"), "{err}");
    }

    /// Values that wrapped when scaled to bytes before: 2^44 + 1 MiB is 1 MiB after `<< 20`,
    /// and 2^54 KiB is 0 after `* 1024`.
    const WRAP_44: u64 = (1 << 44) + 1;
    const WRAP_54: u64 = 1 << 54;

    /// A config whose table `[section]` sets `key = value`, after `context` lines in the same
    /// table; the key's line is returned with it.
    fn config_with(section: &str, context: &str, key: &str, value: &str) -> (String, usize) {
        let function = "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n";
        let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
        let mut text = String::new();
        match section {
            "function.limits" | "function.instances" => text.push_str(function),
            "sync" => text.push_str(control),
            _ => {}
        }
        text.push_str(&format!("[{section}]\n{context}"));
        let line = text.matches('\n').count() + 1;
        text.push_str(&format!("{key} = {value}\n"));
        (text, line)
    }

    /// Every bounded number: (table, other lines the case needs, key, lowest, highest).
    const BOUNDS: &[(&str, &str, &str, u64, u64)] = &[
        ("node", "", "drain_timeout_ms", 0, MAX_DRAIN_TIMEOUT_MS),
        ("node", "", "epoch_tick_ms", 1, 1000),
        ("node", "", "cache_capacity", 1, MAX_CACHE_CAPACITY as u64),
        (
            "engine",
            "max_memory_mib = 1\n",
            "memory_reservation_mib",
            1,
            MAX_MEMORY_RESERVATION_MIB,
        ),
        ("engine", "", "memory_guard_mib", 0, MAX_MEMORY_GUARD_MIB),
        // Up to the reservation (default 4096).
        ("engine", "", "max_memory_mib", 1, 4096),
        ("engine", "", "total_instances", 1, MAX_INSTANCES),
        // Small slots, so a million of them fit the address space.
        (
            "engine",
            "memory_reservation_mib = 64\nmemory_guard_mib = 0\nmax_memory_mib = 64\n",
            "total_memories",
            1,
            MAX_INSTANCES,
        ),
        // Up to the engine's max_memory_mib (default 1024).
        ("function.limits", "", "memory_mib", 1, 1024),
        ("function.limits", "", "timeout_ms", 1, MAX_TIMEOUT_MS),
        (
            "function.limits",
            "",
            "max_concurrency",
            1,
            MAX_CONCURRENCY as u64,
        ),
        ("function.limits", "", "max_body_kib", 1, MAX_BODY_KIB),
        (
            "function.instances",
            "",
            "requests",
            1,
            MAX_REQUESTS_PER_INSTANCE,
        ),
        (
            "function.instances",
            "",
            "concurrent",
            1,
            MAX_CONCURRENT_PER_INSTANCE,
        ),
        (
            "function.instances",
            "",
            "idle_timeout_ms",
            1,
            MAX_IDLE_TIMEOUT_MS,
        ),
        ("sync", "", "interval_ms", 100, MAX_SYNC_INTERVAL_MS),
        ("sync", "", "max_transfers", 1, MAX_TRANSFERS as u64),
        (
            "sync",
            "",
            "max_transfers_per_peer",
            1,
            MAX_TRANSFERS as u64,
        ),
        ("sync", "", "max_uploads", 1, MAX_TRANSFERS as u64),
    ];

    #[test]
    fn every_number_is_range_checked_with_its_line() {
        for &(section, context, key, low, high) in BOUNDS {
            let mut accepted = vec![low, high];
            if high - low > 1 {
                accepted.push(low + 1);
                accepted.push(high - 1);
            }
            for value in accepted {
                let (text, _) = config_with(section, context, key, &value.to_string());
                if let Err(e) = parse(&text) {
                    panic!("{section}.{key} = {value} refused: {e}\n{text}");
                }
            }
            let mut refused = vec![high + 1, WRAP_44, WRAP_54];
            if low > 0 {
                refused.push(low - 1);
            }
            for value in refused {
                let (text, line) = config_with(section, context, key, &value.to_string());
                let err = match parse(&text) {
                    Ok(_) => panic!("{section}.{key} = {value} accepted\n{text}"),
                    Err(e) => e,
                };
                assert_eq!(err.line, Some(line), "{section}.{key} = {value}: {err}");
                assert!(
                    err.reason.contains(key) && err.reason.contains("between"),
                    "{section}.{key} = {value}: {err}"
                );
                assert!(
                    err.reason.ends_with(&format!("not {value}")),
                    "{section}.{key} = {value}: the reason shows the value: {err}"
                );
            }
        }
    }

    #[test]
    fn limits_scale_exactly_at_their_bounds() {
        let (text, _) = config_with(
            "function.limits",
            "",
            "max_body_kib",
            &MAX_BODY_KIB.to_string(),
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.functions[0].limits.max_body_bytes, 1 << 30);
        let (text, _) = config_with("function.limits", "", "memory_mib", "1024");
        let c = parse(&text).unwrap();
        assert_eq!(c.functions[0].limits.memory_bytes, 1 << 30);
        let (text, _) = config_with(
            "engine",
            "memory_guard_mib = 0\ntotal_memories = 1\n",
            "memory_reservation_mib",
            &MAX_MEMORY_RESERVATION_MIB.to_string(),
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.engine.memory_reservation_bytes, 16 << 30);
        assert_eq!(c.engine.memory_guard_bytes, 0);
    }

    #[test]
    fn wrapping_memory_and_body_are_refused_not_shrunk() {
        // Before, 2^44 + 1 MiB became a 1 MiB cap and 2^54 KiB a 0-byte body limit.
        let (text, _) = config_with("function.limits", "", "memory_mib", &WRAP_44.to_string());
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "edged.toml:6: limits.memory_mib must be between 1 and 1024 (the engine's \
                 max_memory_mib), not {WRAP_44}"
            )
        );
        let (text, _) = config_with("function.limits", "", "max_body_kib", &WRAP_54.to_string());
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "edged.toml:6: limits.max_body_kib must be between 1 and 1048576 (1 GiB), \
                 not {WRAP_54}"
            )
        );
        let (text, _) = config_with("function.limits", "", "max_body_kib", "0");
        assert!(parse(&text).unwrap_err().reason.contains("max_body_kib"));
    }

    #[test]
    fn instance_reuse_is_read_and_range_checked() {
        let (text, _) = config_with("function.instances", "", "requests", "1000");
        let c = parse(&format!("{text}concurrent = 8\nidle_timeout_ms = 250\n")).unwrap();
        assert_eq!(
            c.functions[0].instances,
            InstanceSetting {
                requests: Some(1000),
                concurrent: Some(8),
                idle_timeout: Some(Duration::from_millis(250)),
            }
        );
        let (text, _) = config_with("function.instances", "", "requests", "0");
        assert_eq!(
            parse(&text).unwrap_err().to_string(),
            "edged.toml:6: instances.requests must be between 1 and 1000000 (1 = a fresh \
             instance per request), not 0"
        );
        let (text, _) = config_with("function.instances", "", "concurrency", "2");
        assert!(
            parse(&text)
                .unwrap_err()
                .reason
                .contains("unknown field `concurrency`")
        );
        let (text, _) = config_with("function.limits", "", "timeout_ms", "100");
        assert_eq!(
            parse(&text).unwrap().functions[0].instances,
            InstanceSetting::default()
        );
    }

    #[test]
    fn a_huge_reservation_is_refused_for_itself() {
        // 2^44 MiB wrapped to 0 bytes, and the error blamed max_memory_mib.
        let err = parse(&format!(
            "[engine]\nmemory_reservation_mib = {}\n",
            1u64 << 44
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(
            err.reason
                .starts_with("memory_reservation_mib must be between 1 and 16384"),
            "{err}"
        );
        let err = parse("[engine]\nmemory_reservation_mib = 512\n").unwrap_err();
        assert!(
            err.reason
                .starts_with("max_memory_mib must be between 1 and memory_reservation_mib (512;"),
            "{err}"
        );
    }

    #[test]
    fn pool_slots_are_default_unless_set() {
        let c = parse("[engine]\nmemory_reservation_mib = 4096\n").unwrap();
        assert_eq!(c.engine.total_memories, None);
        assert_eq!(c.engine.total_instances, None);
        let c = parse("[engine]\ntotal_memories = 1000\n").unwrap();
        assert_eq!(c.engine.total_memories, Some(1000));
        assert_eq!(c.engine.total_instances, None);
        assert_eq!(
            NodeConfig::dev_default(Path::new("/"))
                .engine
                .total_memories,
            None
        );
    }

    #[test]
    fn a_pool_larger_than_the_address_space_is_refused() {
        // 40000 × (4096 + 32) MiB ≈ 157 TiB.
        let err = parse("[engine]\ntotal_memories = 40000\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.reason.contains("128 TiB"), "{err}");
        parse("[engine]\ntotal_memories = 30000\n").unwrap();
    }

    #[test]
    fn sync_rate_is_bounded_and_nan_refused() {
        for (value, ok) in [
            ("0", true),
            ("100000", true),
            ("100000.5", false),
            ("-1", false),
            ("nan", false),
            ("inf", false),
        ] {
            let (text, line) = config_with("sync", "", "max_rate_mb", value);
            match parse(&text) {
                Ok(_) => assert!(ok, "max_rate_mb = {value} accepted"),
                Err(e) => {
                    assert!(!ok, "max_rate_mb = {value} refused: {e}");
                    assert_eq!(e.line, Some(line), "{e}");
                    assert!(e.reason.contains("max_rate_mb"), "{e}");
                }
            }
        }
    }

    #[test]
    fn pushed_limits_are_clamped_not_wrapped() {
        let ok = LimitUnits {
            memory_mib: 128,
            timeout_ms: 5000,
            max_concurrency: 32,
            max_body_kib: 1024,
        };
        let (limits, notes) = Limits::clamped(ok);
        assert_eq!(limits, Limits::default());
        assert!(notes.is_empty(), "{notes:?}");

        let (limits, notes) = Limits::clamped(LimitUnits {
            memory_mib: WRAP_44,
            timeout_ms: u64::MAX,
            max_concurrency: usize::MAX,
            max_body_kib: WRAP_54,
        });
        assert_eq!(limits.memory_bytes, 16 << 30);
        assert_eq!(limits.timeout, Duration::from_millis(MAX_TIMEOUT_MS));
        assert_eq!(limits.max_concurrency, MAX_CONCURRENCY);
        assert_eq!(limits.max_body_bytes, 1 << 30);
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert_eq!(
            notes[0],
            format!("limits.memory_mib {WRAP_44} is outside 1..=16384; using 16384")
        );

        let (limits, notes) = Limits::clamped(LimitUnits {
            memory_mib: 0,
            timeout_ms: 0,
            max_concurrency: 0,
            max_body_kib: 0,
        });
        assert_eq!(limits.memory_bytes, 1 << 20);
        assert_eq!(limits.timeout, Duration::from_millis(1));
        assert_eq!(limits.max_concurrency, 1);
        assert_eq!(limits.max_body_bytes, 1024);
        assert_eq!(notes.len(), 4, "{notes:?}");
    }

    #[test]
    fn wrong_type_is_refused() {
        let err = parse("[node]\ndrain_timeout_ms = \"soon\"\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }
}
