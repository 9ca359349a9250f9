//! Prometheus metrics, served at `/metrics` in the text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub function: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub function: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub function: String,
    /// `loaded` (mapped a stored artifact) or `recompiled` (compiled from source).
    pub path: String,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~42 s, ×2.
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    pub instantiate_seconds: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    pub cold_loads: Family<LoadLabels, Counter>,
    pub faults: Family<FaultLabels, Counter>,
    pub in_flight: Family<FunctionLabel, Gauge>,
    pub rejected: Family<FaultLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub sync_rounds: Counter,
    pub sync_deployments: Family<OutcomeLabel, Counter>,
    pub sync_fetches: Family<OutcomeLabel, Counter>,
    pub sync_fetched_bytes: Family<PeerLabel, Counter>,
    pub sync_penalties: Family<PeerLabel, Counter>,
    pub sync_transfers: Gauge,
    pub sync_peers_reachable: Gauge,
    pub sync_uploads: Counter,
    pub sync_served_bytes: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer's control address.
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `refused`.
    pub outcome: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edged");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let instantiate_seconds =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let cold_loads = Family::<LoadLabels, Counter>::default();
        let faults = Family::<FaultLabels, Counter>::default();
        let in_flight = Family::<FunctionLabel, Gauge>::default();
        let rejected = Family::<FaultLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests served, by function and status",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Request latency inside edged, from routing to response head",
            request_seconds.clone(),
        );
        registry.register(
            "instantiate_seconds",
            "Time to create a fresh instance from the cached InstancePre",
            instantiate_seconds.clone(),
        );
        registry.register(
            "cold_loads",
            "Deployments prepared (artifact mapped and linked, or recompiled)",
            cold_loads.clone(),
        );
        registry.register("faults", "Guest faults, by kind", faults.clone());
        registry.register(
            "in_flight",
            "Requests currently running in a guest",
            in_flight.clone(),
        );
        registry.register(
            "rejected",
            "Requests refused before reaching a guest (overload, body too large)",
            rejected.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads, by outcome",
            reloads.clone(),
        );
        let sync_rounds = Counter::default();
        let sync_deployments = Family::<OutcomeLabel, Counter>::default();
        let sync_fetches = Family::<OutcomeLabel, Counter>::default();
        let sync_fetched_bytes = Family::<PeerLabel, Counter>::default();
        let sync_penalties = Family::<PeerLabel, Counter>::default();
        let sync_transfers = Gauge::default();
        let sync_peers_reachable = Gauge::default();
        let sync_uploads = Counter::default();
        let sync_served_bytes = Counter::default();
        registry.register(
            "sync_rounds",
            "Sync rounds (every peer asked for its holdings)",
            sync_rounds.clone(),
        );
        registry.register(
            "sync_deployments",
            "Deployments fetched from peers, by outcome (stored, refused, failed)",
            sync_deployments.clone(),
        );
        registry.register(
            "sync_fetches",
            "Blob fetch attempts from peers, by outcome (ok, busy, bad_data, failed)",
            sync_fetches.clone(),
        );
        registry.register(
            "sync_fetched_bytes",
            "Verified blob bytes fetched, by peer",
            sync_fetched_bytes.clone(),
        );
        registry.register(
            "sync_penalties",
            "Times a peer served data that failed verification",
            sync_penalties.clone(),
        );
        registry.register(
            "sync_transfers",
            "Blob fetches in progress",
            sync_transfers.clone(),
        );
        registry.register(
            "sync_peers_reachable",
            "Peers that answered the last holdings request",
            sync_peers_reachable.clone(),
        );
        registry.register(
            "sync_uploads",
            "Blobs served to peers in full",
            sync_uploads.clone(),
        );
        registry.register(
            "sync_served_bytes",
            "Blob bytes served to peers (Bao slices, content and tree)",
            sync_served_bytes.clone(),
        );
        Metrics {
            registry,
            sync_rounds,
            sync_deployments,
            sync_fetches,
            sync_fetched_bytes,
            sync_penalties,
            sync_transfers,
            sync_peers_reachable,
            sync_uploads,
            sync_served_bytes,
            requests,
            request_seconds,
            instantiate_seconds,
            cold_loads,
            faults,
            in_flight,
            rejected,
            reloads,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn function(name: &str) -> FunctionLabel {
        FunctionLabel {
            function: name.to_string(),
        }
    }
}
