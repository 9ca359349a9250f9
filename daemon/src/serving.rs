//! The serving core: the engine, the live function set, and running one request in a guest
//! with the function's admission rules (body cap, concurrency permits) and fault accounting.
//!
//! It knows nothing of sockets: the HTTP ingress hands it routed requests, the control server
//! hands it `edgectl invoke` calls, and the deployments core asks it to rebuild the set after an
//! activation. A set is immutable once built and swapped in atomically, so a request always sees
//! one consistent set; rebuilds run one at a time.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use bytes::Bytes;
use edged_artifacts::{LoadPath, Manifest, RestoreError, Restorer, Store};
use edged_compiler::{EngineSettings, Target};
use edged_node_config::NodeConfig;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::body::{
    BoxError, CutOnRefusal, RequestBodyError, ResponseBody, StreamedBody, text_response,
};
use crate::epoch::EpochClock;
use crate::fault::Fault;
use crate::functions::{
    Function, FunctionSet, prepare, prepare_declared, pushed_function_config, pushed_route,
};
use crate::lock::lock;
use crate::metrics::{FunctionLabel, latency_histogram};
use crate::runtime::{Failure, InstanceEnv, InstanceMetrics};
use crate::sandbox::{GuestState, linkers};

pub struct Serving {
    config: ArcSwap<NodeConfig>,
    restorer: Arc<Restorer<GuestState>>,
    engine_settings: EngineSettings,
    functions: ArcSwap<FunctionSet>,
    metrics: ServingMetrics,
    /// Guest tasks that may outlive their response head (streaming components).
    guest_tasks: TaskTracker,
    /// Function-set rebuilds (reload, activation) run one at a time.
    rebuild_lock: tokio::sync::Mutex<()>,
    /// Pushed deployments that could not be prepared, by id, with the reason: not retried on
    /// every rebuild (a deployment's content never changes under its id).
    unservable: Arc<Mutex<HashMap<String, String>>>,
    /// The engine's epoch, counted by whoever ticks it (see [`Serving::epoch_clock`]).
    epochs: EpochClock,
}

/// Why a deployment cannot be served on this node.
#[derive(Debug, thiserror::Error)]
#[error("{id} cannot be served on this node: {reason}")]
pub struct Unservable {
    pub id: String,
    pub reason: String,
}

impl Serving {
    /// Opens the store and builds the engine. Serves nothing until [`Serving::rebuild`].
    pub fn open(config: NodeConfig, registry: &mut Registry) -> Result<Arc<Serving>> {
        let store = Arc::new(
            Store::open(&config.state_dir)
                .with_context(|| format!("opening the store in {}", config.state_dir.display()))?,
        );
        // The pool fitted to this box's address space, or refused naming what would fit.
        let (engine, settings) = crate::pool_sizing::engine(&config)?;
        let linkers = linkers(&engine)?;
        let capacity = NonZeroUsize::new(config.cache_capacity).unwrap_or(NonZeroUsize::MIN);
        let engine_settings = settings.engine.clone();
        let restorer = Arc::new(Restorer::new(engine, settings, linkers, store, capacity)?);
        Ok(Arc::new(Serving {
            config: ArcSwap::from_pointee(config),
            restorer,
            engine_settings,
            functions: ArcSwap::from_pointee(FunctionSet::default()),
            metrics: ServingMetrics::register(registry),
            guest_tasks: TaskTracker::new(),
            rebuild_lock: tokio::sync::Mutex::new(()),
            unservable: Arc::default(),
            epochs: EpochClock::default(),
        }))
    }

    pub fn functions(&self) -> Arc<FunctionSet> {
        self.functions.load_full()
    }

    pub fn config(&self) -> Arc<NodeConfig> {
        self.config.load_full()
    }

    pub fn store(&self) -> &Arc<Store> {
        self.restorer.store()
    }

    pub fn engine(&self) -> &wasmtime::Engine {
        self.restorer.engine()
    }

    pub fn target(&self) -> Target {
        self.restorer.target()
    }

    pub fn fingerprint(&self) -> &str {
        self.restorer.fingerprint()
    }

    /// The count the epoch ticker must advance with each `increment_epoch`: reused instances
    /// read it to tell a guest holding the CPU from one that is not.
    pub fn epoch_clock(&self) -> EpochClock {
        self.epochs.clone()
    }

    /// Guests still running after their response head; a drain waits for them.
    pub fn guest_tasks(&self) -> &TaskTracker {
        &self.guest_tasks
    }

    /// Rebuilds the function set from the current config and store, and swaps it in.
    pub async fn rebuild(&self) -> Result<()> {
        let _serialized = self.rebuild_lock.lock().await;
        let config = self.config.load_full();
        let set = self.build_functions(&config).await?;
        self.functions.store(Arc::new(set));
        Ok(())
    }

    /// Builds the set `config` declares and swaps both in, or leaves the running set and
    /// config untouched if any declared function fails to deploy.
    pub async fn apply_config(&self, config: NodeConfig) -> Result<()> {
        let _serialized = self.rebuild_lock.lock().await;
        let set = self.build_functions(&config).await?;
        self.functions.store(Arc::new(set));
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// Deploys and prepares every function `config` declares, plus the active version of every
    /// pushed deployment (a name declared in the config wins). Declared functions are all or
    /// nothing; a pushed deployment that cannot be prepared is logged and left out.
    async fn build_functions(&self, config: &NodeConfig) -> Result<FunctionSet> {
        let restorer = self.restorer.clone();
        let engine_settings = self.engine_settings.clone();
        let config = config.clone();
        let unservable = self.unservable.clone();
        let metrics = self.metrics.clone();
        let epochs = self.epochs.clone();
        let prepared = tokio::task::spawn_blocking(move || -> Result<Vec<(Function, LoadPath)>> {
            let mut functions = Vec::new();
            for declared in &config.functions {
                let env = metrics.instance_env(&declared.name, &epochs);
                functions.push(prepare_declared(&restorer, &engine_settings, declared, env)?);
            }
            let store = restorer.store();
            let mut names: Vec<String> = store.manifests()?.into_iter().map(|m| m.name).collect();
            names.dedup();
            for name in names {
                if config.functions.iter().any(|f| f.name == name) {
                    continue;
                }
                let Some(manifest) = store.active_manifest(&name)? else { continue };
                // Only signed (pushed or synced) deployments: a function removed from the config
                // leaves its unsigned deployments in the store, and they stop being served.
                if store.signature(&name, manifest.version)?.is_none() {
                    continue;
                }
                let id = manifest.id();
                if let Some(reason) = lock(&unservable).get(&id) {
                    tracing::debug!(deployment = %id, %reason, "not serving a deployment that failed to prepare");
                    continue;
                }
                let function_config = pushed_function_config(&manifest);
                let env = metrics.instance_env(&function_config.name, &epochs);
                match prepare(&restorer, &function_config, manifest, env) {
                    Ok(function) => functions.push(function),
                    // One bad pushed deployment must not take the others (or the node) down.
                    Err(e) => {
                        let reason = format!("{e:#}");
                        match e.chain().find_map(|c| c.downcast_ref::<RestoreError>()).and_then(RestoreError::damaged_blob) {
                            // Repairable (a re-push or a sync brings a fresh copy): tried again.
                            Some(blob) => tracing::error!(
                                deployment = %id,
                                blob = %blob,
                                error = %reason,
                                "cannot serve pushed deployment: blob {blob} is damaged on disk; \
                                 pushing the same .wasm again (`edgectl push`) repairs it"
                            ),
                            None => {
                                tracing::error!(deployment = %id, error = %reason, "cannot serve pushed deployment; not retrying it");
                                lock(&unservable).insert(id, reason);
                            }
                        }
                    }
                }
            }
            // Compiles free hundreds of MiB at once: give it back now, not at the next tick.
            crate::memory::give_back();
            Ok(functions)
        })
        .await
        .context("deploy task panicked")??;
        let functions = prepared
            .into_iter()
            .map(|(function, how)| {
                self.metrics.cold_load(&function.config.name, how);
                Arc::new(function)
            })
            .collect();
        Ok(FunctionSet::new(functions))
    }

    /// Proves that the pushed deployment `manifest` can be served here before it is activated:
    /// it is prepared (artifact mapped or compiled, linked against the host) and one instance is
    /// created in the pool under its memory cap. A version that fails never replaces one that
    /// serves; the failure is remembered.
    pub async fn prove(&self, manifest: &Manifest) -> Result<(), Unservable> {
        let id = manifest.id();
        let unservable = |reason: String| {
            lock(&self.unservable).insert(id.clone(), reason.clone());
            Unservable {
                id: id.clone(),
                reason,
            }
        };
        let restorer = self.restorer.clone();
        let function_config = pushed_function_config(manifest);
        let candidate = manifest.clone();
        let env = self
            .metrics
            .instance_env(&function_config.name, &self.epochs);
        let prepared = tokio::task::spawn_blocking(move || {
            let prepared = prepare(&restorer, &function_config, candidate, env);
            crate::memory::give_back();
            prepared
        })
        .await;
        let function = match prepared {
            Ok(Ok((function, how))) => {
                self.metrics.cold_load(&function.config.name, how);
                function
            }
            Ok(Err(e)) => return Err(unservable(format!("{e:#}"))),
            Err(e) => return Err(unservable(format!("preparing it panicked: {e}"))),
        };
        function
            .runtime
            .instantiate_once()
            .await
            .map_err(|fault| unservable(format!("instantiating it failed: {fault}")))?;
        lock(&self.unservable).remove(&id);
        Ok(())
    }

    /// The route `manifest` is (or would be) served on: a config declaration of its name wins.
    pub fn route_of(&self, manifest: &Manifest) -> String {
        let config = self.config.load();
        match config.functions.iter().find(|f| f.name == manifest.name) {
            Some(declared) => declared.route.clone(),
            None => pushed_route(manifest),
        }
    }

    /// Serves one routed HTTP request: body cap, concurrency permit, the guest, metrics.
    /// Never fails: every problem is a status code.
    pub async fn serve<B>(
        &self,
        function: &Arc<Function>,
        request: Request<B>,
    ) -> Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let response = self.admit_and_run(function, request).await;
        self.metrics
            .request_served(&function.config.name, response.status(), started.elapsed());
        response
    }

    /// The function's admission rules, then its runtime: a body declared over the cap is
    /// refused before anything else, then a concurrency permit is taken, and the body streams
    /// to the runtime under the cap and the node's body timeout (a client that trickles, or
    /// stops sending, its body must not keep the permit).
    async fn admit_and_run<B>(
        &self,
        function: &Arc<Function>,
        request: Request<B>,
    ) -> Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let limits = function.config.limits;
        if request.body().size_hint().lower() > limits.max_body_bytes as u64 {
            return self.body_too_large(function);
        }
        let permit = match self.admit(function) {
            Ok(permit) => permit,
            Err(refusal) => return refusal,
        };
        let body_timeout = self.config.load().body_timeout;
        let (parts, body) = request.into_parts();
        let body = StreamedBody::new(body, limits.max_body_bytes, body_timeout);
        let refusal = body.refusal();
        let request = Request::from_parts(parts, body.boxed_unsync());
        let in_flight = InFlight::enter(self.metrics.in_flight(&function.config.name));
        let metrics = self.metrics.clone();
        let for_done = function.clone();
        // The permit and in-flight count are held until the guest is done with the request,
        // which may be after the response head (streaming bodies).
        let done = move |fault: Option<&Fault>| {
            if let Some(fault) = fault {
                metrics.fault(&for_done, fault);
            }
            drop((in_flight, permit));
        };
        let handled = function
            .runtime
            .handle(request, done, &self.guest_tasks)
            .await;
        let failure = match handled {
            // A guest that answered a body it could not read whole is a refusal: at once when
            // it is known before the head goes out, else the answer is cut (never a 200 that
            // ends like a complete response).
            Ok(response) => match refusal.get() {
                Some(refused) => Failure::Body(refused.clone()),
                None => {
                    return response.map(|body| CutOnRefusal::new(body, refusal).boxed_unsync());
                }
            },
            Err(failure) => failure,
        };
        match failure {
            Failure::Body(RequestBodyError::Timeout) => self.reject(
                function,
                "body_timeout",
                StatusCode::REQUEST_TIMEOUT,
                &format!("request body not received within {body_timeout:?}"),
            ),
            Failure::Body(RequestBodyError::TooLarge) => self.body_too_large(function),
            Failure::Body(RequestBodyError::Failed(e)) => text_response(
                StatusCode::BAD_REQUEST,
                &format!("reading request body: {e}\n"),
            ),
            // Details stay in the log line; the client learns the kind only.
            Failure::Fault(fault) => text_response(fault.status(), &fault.answer()),
        }
    }

    /// Runs one request against the function `name`, as `edgectl invoke` does: the status and
    /// the whole body.
    pub async fn invoke_by_name(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>)> {
        let function = self
            .functions()
            .iter()
            .find(|f| f.config.name == name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no function `{name}` is being served"))?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .context("building the request")?;
        let response = self.admit_and_run(&function, request).await;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes()
            .to_vec();
        Ok((status, body))
    }

    fn reject(
        &self,
        function: &Function,
        kind: &str,
        status: StatusCode,
        message: &str,
    ) -> Response<ResponseBody> {
        self.metrics.rejected(&function.config.name, kind);
        tracing::info!(function = %function.config.name, %status, "{message}");
        text_response(status, &format!("{message}\n"))
    }

    fn body_too_large(&self, function: &Function) -> Response<ResponseBody> {
        self.reject(
            function,
            "body_too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body exceeds the function's limit",
        )
    }

    /// A concurrency permit, or the 503 that answers overload at once (no unbounded queue in
    /// front of the guests).
    #[allow(clippy::result_large_err)]
    fn admit(
        &self,
        function: &Function,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Response<ResponseBody>> {
        function.permits.clone().try_acquire_owned().map_err(|_| {
            self.reject(
                function,
                "overloaded",
                StatusCode::SERVICE_UNAVAILABLE,
                "function is at its concurrency limit",
            )
        })
    }
}

/// One request counted in `edged_in_flight` until dropped: the gauge comes back down on every
/// path, including a guest abandoned before it ran.
struct InFlight(Gauge);

impl InFlight {
    fn enter(gauge: Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    function: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    function: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    function: String,
    /// `loaded` (mapped a stored artifact) or `recompiled` (compiled from source).
    path: String,
}

/// The serving core's metrics: requests, latency, instantiation, cold loads, faults, refusals.
#[derive(Clone)]
struct ServingMetrics {
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    instantiate_seconds: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    instances_created: Family<FunctionLabel, Counter>,
    instances_discarded: Family<FunctionLabel, Counter>,
    cold_loads: Family<LoadLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    in_flight: Family<FunctionLabel, Gauge>,
    rejected: Family<FaultLabels, Counter>,
}

impl ServingMetrics {
    fn register(registry: &mut Registry) -> ServingMetrics {
        let metrics = ServingMetrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            instantiate_seconds: Family::new_with_constructor(latency_histogram),
            instances_created: Family::default(),
            instances_discarded: Family::default(),
            cold_loads: Family::default(),
            faults: Family::default(),
            in_flight: Family::default(),
            rejected: Family::default(),
        };
        registry.register(
            "requests",
            "HTTP requests served, by function and status",
            metrics.requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Request latency inside edged, from routing to response head",
            metrics.request_seconds.clone(),
        );
        registry.register(
            "instantiate_seconds",
            "Time to create a fresh instance from the cached InstancePre",
            metrics.instantiate_seconds.clone(),
        );
        registry.register(
            "instances_created",
            "Guest instances created, by function: with `requests`, how often instances are reused",
            metrics.instances_created.clone(),
        );
        registry.register(
            "instances_discarded",
            "Reused instances dropped because a guest faulted in them or overran its deadline",
            metrics.instances_discarded.clone(),
        );
        registry.register(
            "cold_loads",
            "Deployments prepared (artifact mapped and linked, or recompiled)",
            metrics.cold_loads.clone(),
        );
        registry.register("faults", "Guest faults, by kind", metrics.faults.clone());
        registry.register(
            "in_flight",
            "Requests currently running in a guest",
            metrics.in_flight.clone(),
        );
        registry.register(
            "rejected",
            "Requests refused before reaching a guest (overload, body too large)",
            metrics.rejected.clone(),
        );
        metrics
    }

    fn request_served(&self, function: &str, status: StatusCode, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                function: function.to_string(),
                status: status.as_u16(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&FunctionLabel::new(function))
            .observe(took.as_secs_f64());
    }

    /// What a function's reused instances need: their metrics and the epoch count.
    fn instance_env(&self, function: &str, epochs: &EpochClock) -> InstanceEnv {
        InstanceEnv {
            metrics: self.instances(function),
            epochs: epochs.clone(),
        }
    }

    /// The handles a function's instances report through.
    fn instances(&self, function: &str) -> InstanceMetrics {
        let label = FunctionLabel::new(function);
        InstanceMetrics {
            created: self.instances_created.get_or_create(&label).clone(),
            discarded: self.instances_discarded.get_or_create(&label).clone(),
            instantiate_seconds: self.instantiate_seconds.get_or_create(&label).clone(),
        }
    }

    fn in_flight(&self, function: &str) -> Gauge {
        self.in_flight
            .get_or_create(&FunctionLabel::new(function))
            .clone()
    }

    fn cold_load(&self, function: &str, how: LoadPath) {
        let path = match how {
            LoadPath::Cached => return,
            LoadPath::Recompiled => "recompiled",
            _ => "loaded",
        };
        self.cold_loads
            .get_or_create(&LoadLabels {
                function: function.to_string(),
                path: path.into(),
            })
            .inc();
    }

    fn rejected(&self, function: &str, kind: &str) {
        self.rejected
            .get_or_create(&FaultLabels {
                function: function.to_string(),
                kind: kind.into(),
            })
            .inc();
    }

    fn fault(&self, function: &Function, fault: &Fault) {
        self.faults
            .get_or_create(&FaultLabels {
                function: function.config.name.clone(),
                kind: fault.kind().into(),
            })
            .inc();
        tracing::warn!(
            function = %function.config.name,
            deployment = %function.manifest.id(),
            fault = fault.kind(),
            status = fault.status().as_u16(),
            "guest fault: {fault}"
        );
    }
}
