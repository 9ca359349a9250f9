//! The engine's pool for this box: from the config's `[engine]` table and what this process can
//! reserve to the pool start builds, or the refusal start and `edged check-config` report.
//!
//! Slot counts the config leaves unset are fitted to the address space (measured once at start
//! by `edged_artifacts::pool::probe_reservable`; the arithmetic is `plan_pool`'s). Counts it
//! sets are used as they are, without probing: under qemu-user every reserved page costs the
//! emulator bookkeeping, so start reserves nothing beyond the pool itself. Only when the engine
//! then fails does start probe, to tell a pool that cannot fit (and what would) from any other
//! failure.

use anyhow::Result;
use edged_artifacts::pool::page_size;
use edged_artifacts::{
    PoolPlan, PoolRequest, PoolSettings, PoolTooLarge, RuntimeSettings, Slots, plan_pool,
    probe_reservable, runtime_engine,
};
use edged_compiler::EngineSettings;
use edged_node_config::{DEFAULT_POOL_SLOTS, NodeConfig};
use wasmtime::Engine;

const GIB: u64 = 1 << 30;

/// What `config` asks of the pool.
pub fn request(config: &NodeConfig) -> PoolRequest {
    let slots = |set: Option<u32>| set.map_or(Slots::UpTo(DEFAULT_POOL_SLOTS), Slots::Exactly);
    PoolRequest {
        memory_reservation: config.engine.memory_reservation_bytes,
        memory_guard: config.engine.memory_guard_bytes,
        total_memories: slots(config.engine.total_memories),
        total_instances: slots(config.engine.total_instances),
        page_size: page_size(),
    }
}

fn fully_explicit(request: &PoolRequest) -> bool {
    matches!(
        (request.total_memories, request.total_instances),
        (Slots::Exactly(_), Slots::Exactly(_))
    )
}

/// Probes the address space and plans the pool `request` describes: what the probe found, and
/// the plan. Explicit counts are refused only when they cannot be reserved at all.
pub fn fit(request: &PoolRequest) -> (u64, Result<PoolPlan, PoolTooLarge>) {
    let asked = request.probe_size();
    let reservable = probe_reservable(asked);
    (reservable, plan_pool(request, reservable))
}

fn runtime_settings(config: &NodeConfig, memories: u32, instances: u32) -> RuntimeSettings {
    RuntimeSettings {
        engine: EngineSettings {
            memory_reservation: config.engine.memory_reservation_bytes,
            memory_guard_size: config.engine.memory_guard_bytes,
        },
        pool: PoolSettings {
            total_instances: instances,
            total_memories: memories,
            max_memory_bytes: config.engine.max_memory_bytes,
            ..PoolSettings::default()
        },
    }
}

/// The serving engine for `config`, with its pool fitted to this process's address space (or
/// as configured), and the settings it was built with. Logs the pool it chose.
pub fn engine(config: &NodeConfig) -> Result<(Engine, RuntimeSettings)> {
    let request = request(config);
    if fully_explicit(&request) {
        let memories = request.total_memories.count();
        let instances = request.total_instances.count();
        let settings = runtime_settings(config, memories, instances);
        return match runtime_engine(&settings) {
            Ok((engine, _)) => {
                tracing::info!(
                    total_memories = memories,
                    total_instances = instances,
                    reserved_gib = request.requested_bytes().div_ceil(GIB),
                    "engine pool as configured"
                );
                Ok((engine, settings))
            }
            // The pool's mapping is the usual reason; if it cannot fit, say which settings to
            // change and to what, instead of wasmtime's bare mmap error.
            Err(e) => match fit(&request) {
                (_, Err(too_large)) => Err(too_large.into()),
                (_, Ok(_)) => Err(e.into()),
            },
        };
    }
    let (reservable, plan) = fit(&request);
    let plan = plan?;
    tracing::info!(
        probe_gib = reservable / GIB,
        probe_asked_gib = request.probe_size() / GIB,
        total_memories = plan.total_memories,
        total_instances = plan.total_instances,
        reserved_gib = plan.reserved_bytes.div_ceil(GIB),
        lowered = plan.lowered,
        "engine pool sized to this process's address space (at most 1/{} of what it can reserve)",
        edged_artifacts::pool::HEADROOM_DIVISOR,
    );
    let settings = runtime_settings(config, plan.total_memories, plan.total_instances);
    let (engine, _) = runtime_engine(&settings)?;
    Ok((engine, settings))
}

/// `edged check-config`'s view of the pool: the plan start would make, or its refusal. With
/// explicit counts the probe's first try is one reservation of the pool's size.
pub fn check(config: &NodeConfig) -> Result<PoolPlan, PoolTooLarge> {
    fit(&request(config)).1
}
