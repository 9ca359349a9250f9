//! The Prometheus registry served at `/metrics`, and the label sets and histogram shape the
//! parts share.
//!
//! Each part owns its own metrics handle (`ServingMetrics`, `SyncMetrics`, …): it registers its
//! families here once at start-up and records through methods, so no part can touch another's
//! counters. After registration the registry is frozen and only encoded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A registry whose metric names all start with `edged_`.
pub fn new_registry() -> Registry {
    Registry::with_prefix("edged")
}

/// The registry in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// 10 µs .. ~42 s, ×2.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

impl FunctionLabel {
    pub fn new(name: &str) -> FunctionLabel {
        FunctionLabel {
            function: name.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

impl OutcomeLabel {
    pub fn new(outcome: &str) -> OutcomeLabel {
        OutcomeLabel {
            outcome: outcome.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer's control address.
    pub peer: String,
}
