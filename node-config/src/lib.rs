//! # edged-node-config
//!
//! Owns a node's configuration: the TOML schema (every field documented in
//! `node-config/edged.example.toml`), its validation, and the embedded dev default that lets
//! `edged` start with no file at all. Unknown keys and bad values are refused with the file, line
//! and reason. Relative paths are resolved against the config file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The dev default: state in `./.edged-dev`, HTTP on 127.0.0.1:8080, no functions declared.
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub memory_reservation_bytes: u64,
    pub memory_guard_bytes: u64,
    pub total_instances: u32,
    pub total_memories: u32,
    pub max_memory_bytes: usize,
}

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
    /// The only environment variables the guest sees (CGI variables aside).
    pub env: BTreeMap<String, String>,
    pub dirs: Vec<DirGrant>,
    /// Hosts a `wasi:http` guest may send requests to; everything else is denied.
    pub outbound_hosts: Vec<String>,
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
            memory_bytes: (*raw.memory_mib.get_ref() * MIB) as usize,
            timeout: Duration::from_millis(*raw.timeout_ms.get_ref()),
            max_concurrency: *raw.max_concurrency.get_ref(),
            max_body_bytes: (raw.max_body_kib * 1024) as usize,
        }
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
}

fn default_node_name() -> String {
    "node".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNode {
    state_dir: Spanned<String>,
    http_listen: Spanned<String>,
    drain_timeout_ms: u64,
    epoch_tick_ms: Spanned<u64>,
    head_timeout_ms: Spanned<u64>,
    body_timeout_ms: Spanned<u64>,
    cache_capacity: Spanned<usize>,
}

impl Default for RawNode {
    fn default() -> Self {
        RawNode {
            state_dir: Spanned::new(0..0, ".edged-dev".into()),
            http_listen: Spanned::new(0..0, "127.0.0.1:8080".into()),
            drain_timeout_ms: 10_000,
            epoch_tick_ms: Spanned::new(0..0, 10),
            head_timeout_ms: Spanned::new(0..0, 10_000),
            body_timeout_ms: Spanned::new(0..0, 30_000),
            cache_capacity: Spanned::new(0..0, 64),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEngine {
    memory_reservation_mib: Spanned<u64>,
    memory_guard_mib: u64,
    total_instances: Spanned<u32>,
    total_memories: Spanned<u32>,
    max_memory_mib: Spanned<u64>,
}

impl Default for RawEngine {
    fn default() -> Self {
        RawEngine {
            memory_reservation_mib: Spanned::new(0..0, 4096),
            memory_guard_mib: 32,
            total_instances: Spanned::new(0..0, 1000),
            total_memories: Spanned::new(0..0, 1000),
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
    env: BTreeMap<String, String>,
    #[serde(default)]
    dirs: Vec<RawDir>,
    #[serde(default)]
    outbound_hosts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    memory_mib: Spanned<u64>,
    timeout_ms: Spanned<u64>,
    max_concurrency: Spanned<usize>,
    max_body_kib: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            memory_mib: Spanned::new(0..0, 128),
            timeout_ms: Spanned::new(0..0, 5_000),
            max_concurrency: Spanned::new(0..0, 32),
            max_body_kib: 1024,
        }
    }
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
        for (value, key) in [
            (&node.head_timeout_ms, "head_timeout_ms"),
            (&node.body_timeout_ms, "body_timeout_ms"),
        ] {
            if !(1..=MAX_CLIENT_TIMEOUT_MS).contains(value.get_ref()) {
                return Err(err_at(
                    value.span(),
                    format!("{key} must be between 1 and {MAX_CLIENT_TIMEOUT_MS} (one hour)"),
                ));
            }
        }
        if *node.epoch_tick_ms.get_ref() == 0 || *node.epoch_tick_ms.get_ref() > 1000 {
            return Err(err_at(
                node.epoch_tick_ms.span(),
                "epoch_tick_ms must be between 1 and 1000".into(),
            ));
        }
        if *node.cache_capacity.get_ref() == 0 {
            return Err(err_at(
                node.cache_capacity.span(),
                "cache_capacity must be at least 1".into(),
            ));
        }
        let e = &raw.engine;
        let reservation = *e.memory_reservation_mib.get_ref() * MIB;
        let max_memory = *e.max_memory_mib.get_ref() * MIB;
        if max_memory > reservation {
            return Err(err_at(
                e.max_memory_mib.span(),
                format!(
                    "max_memory_mib ({}) cannot exceed memory_reservation_mib ({})",
                    e.max_memory_mib.get_ref(),
                    e.memory_reservation_mib.get_ref()
                ),
            ));
        }
        for (field, value) in [
            ("total_instances", &e.total_instances),
            ("total_memories", &e.total_memories),
        ] {
            if *value.get_ref() == 0 {
                return Err(err_at(value.span(), format!("{field} must be at least 1")));
            }
        }

        let mut functions: Vec<FunctionConfig> = Vec::new();
        for f in &raw.functions {
            functions.push(validate_function(
                f, &functions, max_memory, &err_at, &resolve,
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
                Some(ControlConfig {
                    listen,
                    identity_dir,
                    node_name: c.node_name.clone(),
                    trusted_keys,
                    dev_identity: c.dev_identity,
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
        Ok(NodeConfig {
            state_dir: resolve(node.state_dir.get_ref()),
            http_listen,
            drain_timeout: Duration::from_millis(node.drain_timeout_ms),
            epoch_tick: Duration::from_millis(*node.epoch_tick_ms.get_ref()),
            head_timeout: Duration::from_millis(*node.head_timeout_ms.get_ref()),
            body_timeout: Duration::from_millis(*node.body_timeout_ms.get_ref()),
            cache_capacity: *node.cache_capacity.get_ref(),
            engine: EngineConfig {
                memory_reservation_bytes: reservation,
                memory_guard_bytes: e.memory_guard_mib * MIB,
                total_instances: *e.total_instances.get_ref(),
                total_memories: *e.total_memories.get_ref(),
                max_memory_bytes: max_memory as usize,
            },
            functions,
            control,
            sync,
        })
    }
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
    let interval = *s.interval_ms.get_ref();
    if interval < 100 {
        return Err(err_at(
            s.interval_ms.span(),
            "sync.interval_ms must be at least 100".into(),
        ));
    }
    for (field, value) in [
        ("max_transfers", &s.max_transfers),
        ("max_transfers_per_peer", &s.max_transfers_per_peer),
        ("max_uploads", &s.max_uploads),
    ] {
        if *value.get_ref() == 0 {
            return Err(err_at(
                value.span(),
                format!("sync.{field} must be at least 1"),
            ));
        }
    }
    let rate = *s.max_rate_mb.get_ref();
    if !rate.is_finite() || rate < 0.0 {
        return Err(err_at(
            s.max_rate_mb.span(),
            "sync.max_rate_mb must be 0 (no cap) or a positive number of MB/s".into(),
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
    max_memory: u64,
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
    let l = &f.limits;
    let memory = *l.memory_mib.get_ref() * MIB;
    if memory == 0 || memory > max_memory {
        return Err(err_at(
            l.memory_mib.span(),
            format!(
                "limits.memory_mib must be between 1 and the engine's max_memory_mib ({})",
                max_memory / MIB
            ),
        ));
    }
    if *l.timeout_ms.get_ref() == 0 {
        return Err(err_at(
            l.timeout_ms.span(),
            "limits.timeout_ms must be at least 1".into(),
        ));
    }
    if *l.max_concurrency.get_ref() == 0 {
        return Err(err_at(
            l.max_concurrency.span(),
            "limits.max_concurrency must be at least 1".into(),
        ));
    }
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
            memory_bytes: memory as usize,
            timeout: Duration::from_millis(*l.timeout_ms.get_ref()),
            max_concurrency: *l.max_concurrency.get_ref(),
            max_body_bytes: (l.max_body_kib * 1024) as usize,
        },
        env: f.env.clone(),
        dirs,
        outbound_hosts: f
            .outbound_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
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

    #[test]
    fn wrong_type_is_refused() {
        let err = parse("[node]\ndrain_timeout_ms = \"soon\"\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }
}
