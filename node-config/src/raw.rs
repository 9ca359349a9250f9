//! The file format: the serde structs the TOML deserialises into, as written, with the spans
//! that let `validate.rs` point an error at its line. Defaults for absent keys live here; no
//! range or cross-field rule does.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) node: RawNode,
    #[serde(default)]
    pub(crate) engine: RawEngine,
    #[serde(default, rename = "function")]
    pub(crate) functions: Vec<RawFunction>,
    pub(crate) control: Option<RawControl>,
    pub(crate) sync: Option<Spanned<RawSync>>,
    pub(crate) registry: Option<Spanned<RawRegistry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRegistry {
    pub(crate) url: Spanned<String>,
    pub(crate) credentials_file: Option<String>,
    pub(crate) ca_file: Option<String>,
    #[serde(default)]
    pub(crate) max_rate_mb: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawSync {
    pub(crate) peers: Vec<Spanned<String>>,
    pub(crate) interval_ms: Spanned<u64>,
    pub(crate) max_transfers: Spanned<usize>,
    pub(crate) max_transfers_per_peer: Spanned<usize>,
    pub(crate) max_uploads: Spanned<usize>,
    pub(crate) max_rate_mb: Spanned<f64>,
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
pub(crate) struct RawControl {
    pub(crate) listen: Spanned<String>,
    pub(crate) identity_dir: String,
    #[serde(default = "default_node_name")]
    pub(crate) node_name: String,
    #[serde(default)]
    pub(crate) trusted_keys: Vec<String>,
    #[serde(default)]
    pub(crate) dev_identity: bool,
    #[serde(default)]
    pub(crate) congestion: Option<Spanned<String>>,
}

pub(crate) fn default_node_name() -> String {
    "node".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawNode {
    pub(crate) state_dir: Spanned<String>,
    pub(crate) http_listen: Spanned<String>,
    pub(crate) drain_timeout_ms: Spanned<u64>,
    pub(crate) epoch_tick_ms: Spanned<u64>,
    pub(crate) head_timeout_ms: Spanned<u64>,
    pub(crate) body_timeout_ms: Spanned<u64>,
    pub(crate) cache_capacity: Spanned<usize>,
    pub(crate) keep_targets: Spanned<Vec<String>>,
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
pub(crate) struct RawEngine {
    pub(crate) memory_reservation_mib: Spanned<u64>,
    pub(crate) memory_guard_mib: Spanned<u64>,
    // u64 in the file so that any number gets the range message, not a type error. Absent
    // means "as many as fit, up to DEFAULT_POOL_SLOTS".
    pub(crate) total_instances: Option<Spanned<u64>>,
    pub(crate) total_memories: Option<Spanned<u64>>,
    pub(crate) max_memory_mib: Spanned<u64>,
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
pub(crate) struct RawFunction {
    pub(crate) name: Spanned<String>,
    pub(crate) wasm: Spanned<String>,
    pub(crate) route: Spanned<String>,
    pub(crate) host: Option<String>,
    /// `"auto"` (default), `"off"`, or the name of an init export.
    pub(crate) init: Option<String>,
    #[serde(default)]
    pub(crate) limits: RawLimits,
    #[serde(default)]
    pub(crate) instances: RawInstances,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) dirs: Vec<RawDir>,
    #[serde(default)]
    pub(crate) outbound_hosts: Vec<String>,
    /// Middleware `.wasm` files in front of `wasm`, outermost first.
    #[serde(default)]
    pub(crate) middleware: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawLimits {
    pub(crate) memory_mib: Spanned<u64>,
    pub(crate) timeout_ms: Spanned<u64>,
    pub(crate) max_concurrency: Spanned<usize>,
    pub(crate) max_body_kib: Spanned<u64>,
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
pub(crate) struct RawInstances {
    pub(crate) requests: Option<Spanned<u64>>,
    pub(crate) concurrent: Option<Spanned<u64>>,
    pub(crate) idle_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDir {
    pub(crate) host: Spanned<String>,
    pub(crate) guest: Spanned<String>,
    #[serde(default)]
    pub(crate) writable: bool,
}
