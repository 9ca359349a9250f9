//! What every kind of runtime makes its instances with: the function's [`GuestSetup`] (engine,
//! configuration, capabilities, output, metrics) and the store of a fresh instance.

use std::time::{Duration, Instant};

use edged_node_config::FunctionConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use wasmtime::{Engine, Store, UpdateDeadline};

use crate::epoch::EpochClock;
use crate::guest_output::GuestOutput;
use crate::sandbox::{GuestState, OutboundPolicy};

/// What a function's instances report: how many were created, and how long each took.
#[derive(Clone)]
pub struct InstanceMetrics {
    pub created: Counter,
    /// Instances dropped because a guest faulted in them or overran a deadline.
    pub discarded: Counter,
    pub instantiate_seconds: Histogram,
}

/// What a function's instances need from the node besides the function itself.
#[derive(Clone)]
pub struct InstanceEnv {
    pub metrics: InstanceMetrics,
    /// The engine's epoch, counted: a guest interrupted at two ticks in a row held the CPU
    /// between them.
    pub epochs: EpochClock,
}

/// What every instance of one function is made with: the engine, the function's configuration
/// (limits and the capabilities it grants), where its outbound requests may go, where its
/// output goes, and what its instances report to.
#[derive(Clone)]
pub struct GuestSetup {
    pub engine: Engine,
    pub config: FunctionConfig,
    pub outbound: OutboundPolicy,
    pub output: GuestOutput,
    pub env: InstanceEnv,
}

impl GuestSetup {
    /// Counts a fresh instance and how long it took to create.
    pub(super) fn instance_created(&self, took: Duration) {
        self.env.metrics.created.inc();
        self.env
            .metrics
            .instantiate_seconds
            .observe(took.as_secs_f64());
    }
}

/// A store for a fresh instance, with the function's memory cap and deadline. Every epoch tick
/// the guest yields to the executor (so a busy guest cannot starve other requests on its
/// worker thread), and once `timeout` has passed the next tick interrupts it.
pub(super) fn fresh_store(
    engine: &Engine,
    state: GuestState,
    timeout: Duration,
) -> Store<GuestState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    let started = Instant::now();
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if started.elapsed() >= timeout {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        }
    });
    store
}
