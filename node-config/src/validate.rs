//! Raw file → validated config: every range (the bounds below), every cross-field rule, path
//! resolution against the config's directory, and each error pinned to its line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::raw::*;
use crate::types::{KIB, MIB};
use crate::*;

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
