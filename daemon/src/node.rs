//! The running node: store, engine, function set, HTTP ingress, and its lifecycle (start,
//! SIGHUP reload, SIGTERM drain).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use bytes::Bytes;
use edged_compiler::EngineSettings;
use edged_node_config::NodeConfig;
use edged_snapshots::{PoolSettings, Prepared, Restorer, RuntimeSettings, Store, runtime_engine};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::functions::{Function, FunctionSet, prepare, prepare_declared, pushed_function_config};
use crate::host::{GuestState, linkers};
use crate::invoke::{Fault, ResponseBody, Timing, full_body, run_cgi, run_proxy};
use crate::metrics::{FaultLabels, Metrics, ReloadLabels, RequestLabels};
use crate::notify;

pub struct Node {
    config: ArcSwap<NodeConfig>,
    config_path: Option<PathBuf>,
    restorer: Arc<Restorer<GuestState>>,
    engine_settings: EngineSettings,
    pub metrics: Arc<Metrics>,
    functions: ArcSwap<FunctionSet>,
    ready: AtomicBool,
    request_seq: AtomicU64,
    /// Guest tasks that may outlive their response head (streaming components).
    guest_tasks: TaskTracker,
    /// Function-set rebuilds (reload, activation) run one at a time.
    refresh_lock: tokio::sync::Mutex<()>,
}

fn runtime_settings(config: &NodeConfig) -> RuntimeSettings {
    RuntimeSettings {
        engine: EngineSettings {
            memory_reservation: config.engine.memory_reservation_bytes,
            memory_guard_size: config.engine.memory_guard_bytes,
        },
        pool: PoolSettings {
            total_instances: config.engine.total_instances,
            total_memories: config.engine.total_memories,
            max_memory_bytes: config.engine.max_memory_bytes,
            ..PoolSettings::default()
        },
    }
}

impl Node {
    /// Opens the store and builds the engine. Does not deploy functions yet.
    pub fn open(config: NodeConfig, config_path: Option<PathBuf>) -> Result<Arc<Node>> {
        let store = Arc::new(
            Store::open(&config.state_dir)
                .with_context(|| format!("opening the store in {}", config.state_dir.display()))?,
        );
        let settings = runtime_settings(&config);
        let (engine, _) = runtime_engine(&settings)?;
        let linkers = linkers(&engine)?;
        let capacity = NonZeroUsize::new(config.cache_capacity).unwrap_or(NonZeroUsize::MIN);
        let engine_settings = settings.engine.clone();
        let restorer = Arc::new(Restorer::new(engine, settings, linkers, store, capacity)?);
        Ok(Arc::new(Node {
            config: ArcSwap::from_pointee(config),
            config_path,
            restorer,
            engine_settings,
            metrics: Arc::new(Metrics::default()),
            functions: ArcSwap::from_pointee(FunctionSet::default()),
            ready: AtomicBool::new(false),
            request_seq: AtomicU64::new(0),
            guest_tasks: TaskTracker::new(),
            refresh_lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn functions(&self) -> Arc<FunctionSet> {
        self.functions.load_full()
    }

    /// Deploys and prepares every function `config` declares, plus the active version of every
    /// pushed deployment (a name declared in the config wins); all or nothing.
    async fn build_functions(self: &Arc<Self>, config: &NodeConfig) -> Result<FunctionSet> {
        let node = self.clone();
        let config = config.clone();
        let functions = tokio::task::spawn_blocking(move || -> Result<Vec<Arc<Function>>> {
            let mut functions = Vec::new();
            for declared in &config.functions {
                functions.push(Arc::new(prepare_declared(
                    &node.restorer,
                    &node.engine_settings,
                    &node.metrics,
                    declared,
                )?));
            }
            let store = node.restorer.store();
            let mut names: Vec<String> = store.manifests()?.into_iter().map(|m| m.name).collect();
            names.dedup();
            for name in names {
                if config.functions.iter().any(|f| f.name == name) {
                    continue;
                }
                let Some(manifest) = store.active_manifest(&name)? else { continue };
                let function_config = pushed_function_config(&manifest);
                match prepare(&node.restorer, &node.metrics, &function_config, manifest) {
                    Ok(function) => functions.push(Arc::new(function)),
                    // One bad pushed deployment must not take the others (or the node) down.
                    Err(e) => tracing::error!(function = %name, error = %format!("{e:#}"), "cannot serve pushed deployment"),
                }
            }
            Ok(functions)
        })
        .await
        .context("deploy task panicked")??;
        Ok(FunctionSet::new(functions))
    }

    /// Rebuilds the function set from the current config and store, and swaps it in.
    pub async fn refresh_functions(self: &Arc<Self>) -> Result<()> {
        let _serialized = self.refresh_lock.lock().await;
        let config = self.config.load_full();
        let set = self.build_functions(&config).await?;
        self.functions.store(Arc::new(set));
        Ok(())
    }

    /// Activates `name@version` in the store and starts serving it.
    pub async fn activate(self: &Arc<Self>, name: &str, version: u64) -> Result<()> {
        self.restorer.store().activate(name, version)?;
        self.refresh_functions().await?;
        tracing::info!(deployment = %format!("{name}@{version}"), "activated");
        Ok(())
    }

    pub fn store(&self) -> &Arc<edged_snapshots::Store> {
        self.restorer.store()
    }

    pub fn target(&self) -> edged_compiler::Target {
        self.restorer.target()
    }

    pub fn fingerprint(&self) -> &str {
        self.restorer.fingerprint()
    }

    /// The route `manifest` is (or would be) served on.
    pub fn route_of(&self, manifest: &edged_snapshots::Manifest) -> String {
        let config = self.config.load();
        match config.functions.iter().find(|f| f.name == manifest.name) {
            Some(declared) => declared.route.clone(),
            None => crate::functions::route_of(manifest),
        }
    }

    /// Runs one request against the function `name`, as `edgectl invoke` does.
    pub async fn invoke_by_name(
        self: &Arc<Self>,
        name: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<edged_control::wire::Response> {
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
            .body(Bytes::from(body))
            .context("building the request")?;
        let response = self.invoke_collected(&function, request).await;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(edged_control::wire::Response::Invoked { status, body })
    }

    /// Re-reads the config file and swaps in the new function set. A config that does not
    /// parse, or a function that fails to deploy, leaves the running set untouched.
    pub async fn reload(self: &Arc<Self>) -> Result<()> {
        let Some(path) = &self.config_path else {
            anyhow::bail!("running on the embedded default config; nothing to reload");
        };
        let result = async {
            let new = NodeConfig::load(path)?;
            let old = self.config.load();
            if new.http_listen != old.http_listen
                || new.state_dir != old.state_dir
                || new.engine != old.engine
                || new.control != old.control
                || new.sync != old.sync
            {
                tracing::warn!(
                    "http_listen, state_dir, [engine], [control] and [sync] changes take effect \
                     only after a restart"
                );
            }
            let _serialized = self.refresh_lock.lock().await;
            let set = self.build_functions(&new).await?;
            self.functions.store(Arc::new(set));
            self.config.store(Arc::new(new));
            anyhow::Ok(())
        }
        .await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels {
                outcome: outcome.into(),
            })
            .inc();
        result
    }

    /// Store housekeeping, at start and then hourly: blobs no deployment references any more
    /// (after `edgectl rm`) are collected once older than an hour (younger ones may belong to a
    /// push that has not committed yet), and uploads and offers abandoned for a day are dropped.
    async fn maintain_store(self: Arc<Self>, plane: Option<Arc<crate::control::ControlPlane>>) {
        const EVERY: Duration = Duration::from_secs(3600);
        const UNREFERENCED_GRACE: Duration = Duration::from_secs(3600);
        const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);
        let mut interval = tokio::time::interval(EVERY);
        loop {
            interval.tick().await;
            if let Some(plane) = &plane {
                let offers = plane.expire_offers(ABANDONED_AFTER);
                if offers > 0 {
                    tracing::info!(offers, "dropped abandoned push offers");
                }
            }
            let store = self.store().clone();
            let result = tokio::task::spawn_blocking(move || {
                let gc = store.gc(UNREFERENCED_GRACE)?;
                let partials = store.expire_partials(ABANDONED_AFTER)?;
                Ok::<_, edged_snapshots::StoreError>((gc, partials))
            })
            .await;
            match result {
                Ok(Ok((gc, (partial_files, partial_bytes)))) => {
                    if !gc.blobs_removed.is_empty() || partial_files > 0 {
                        tracing::info!(
                            blobs = gc.blobs_removed.len(),
                            bytes = gc.bytes_freed,
                            partial_files,
                            partial_bytes,
                            "store housekeeping freed space"
                        );
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "store housekeeping failed"),
                Err(e) => tracing::warn!(error = %e, "store housekeeping panicked"),
            }
        }
    }

    fn epoch_ticker(&self) -> EpochTicker {
        EpochTicker::start(
            self.restorer.engine().clone(),
            self.config.load().epoch_tick,
        )
    }

    /// Serves until SIGTERM/SIGINT, then drains. `on_listening` gets the bound HTTP address
    /// and, when the control plane is on, its QUIC address.
    pub async fn serve(
        self: Arc<Self>,
        on_listening: impl FnOnce(SocketAddr, Option<SocketAddr>),
    ) -> Result<()> {
        let config = self.config.load_full();
        self.refresh_functions().await?;
        let control = match &config.control {
            Some(control_config) => {
                let (endpoint, plane) =
                    crate::control::bind(self.clone(), control_config, config.sync.as_ref())?;
                let addr = endpoint.local_addr()?;
                if let Some(sync_config) = &config.sync {
                    let syncer = crate::sync::Syncer::new(
                        self.clone(),
                        plane.clone(),
                        endpoint.clone(),
                        sync_config.clone(),
                    );
                    tokio::spawn(syncer.run());
                }
                tokio::spawn(plane.clone().serve(endpoint.clone()));
                Some((endpoint, addr, plane))
            }
            None => None,
        };
        tokio::spawn(
            self.clone()
                .maintain_store(control.as_ref().map(|(_, _, plane)| plane.clone())),
        );
        let ticker = self.epoch_ticker();
        let listener = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("binding HTTP on {}", config.http_listen))?;
        let addr = listener.local_addr()?;
        self.ready.store(true, Ordering::SeqCst);
        tracing::info!(%addr, functions = self.functions().len(), "edged serving");
        on_listening(addr, control.as_ref().map(|(_, a, _)| *a));
        notify::ready();
        let watchdog = notify::spawn_watchdog(self.clone(), addr);

        let graceful = GracefulShutdown::new();
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            continue;
                        }
                    };
                    // Responses are often several small writes (head, chunks, trailer);
                    // Nagle plus delayed ACKs would add ~40 ms to each.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "set_nodelay failed");
                    }
                    let node = self.clone();
                    let service = hyper::service::service_fn(move |req| {
                        let node = node.clone();
                        async move { Ok::<_, Infallible>(node.handle(req, peer).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, error = %e, "connection ended with error");
                        }
                    });
                }
                _ = sighup.recv() => {
                    notify::reloading();
                    match self.reload().await {
                        Ok(()) => tracing::info!(functions = self.functions().len(), "config reloaded"),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the running config"),
                    }
                    notify::ready();
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }

        notify::stopping();
        self.ready.store(false, Ordering::SeqCst);
        drop(listener);
        if let Some((endpoint, _, _)) = &control {
            endpoint.close(0u32.into(), b"node stopping");
        }
        let drain = config.drain_timeout;
        tracing::info!(?drain, "draining in-flight requests");
        let started = Instant::now();
        let drained = tokio::time::timeout(drain, async {
            graceful.shutdown().await;
            self.guest_tasks.close();
            self.guest_tasks.wait().await;
        })
        .await;
        match drained {
            Ok(()) => tracing::info!(took = ?started.elapsed(), "drained; exiting"),
            Err(_) => tracing::warn!("drain timeout reached; exiting with requests in flight"),
        }
        watchdog.abort();
        ticker.stop();
        Ok(())
    }

    /// One HTTP request, start to finish. Never fails: every problem is a status code.
    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ResponseBody> {
        let id = self.request_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!(
            "request",
            id,
            %peer,
            method = %request.method(),
            path = %request.uri().path(),
            function = tracing::field::Empty,
        );
        let mut response = self.dispatch(request).instrument(span).await;
        if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
            response.headers_mut().insert("x-request-id", value);
        }
        response
    }

    async fn dispatch(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        match request.uri().path() {
            "/metrics" => {
                let mut response = Response::new(full_body(self.metrics.encode()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                return response;
            }
            "/healthz" => return text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                return if self.ready.load(Ordering::SeqCst) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                };
            }
            _ => {}
        }
        let host = request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_string());
        let Some(function) = self
            .functions()
            .route(host.as_deref(), request.uri().path())
        else {
            return text(StatusCode::NOT_FOUND, "no function serves this path\n");
        };
        tracing::Span::current().record("function", function.config.name.as_str());
        let started = Instant::now();
        let response = self.invoke(&function, request).await;
        let name = &function.config.name;
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                function: name.clone(),
                status: response.status().as_u16(),
            })
            .inc();
        self.metrics
            .request_seconds
            .get_or_create(&Metrics::function(name))
            .observe(started.elapsed().as_secs_f64());
        response
    }

    fn reject(
        &self,
        function: &Function,
        kind: &str,
        status: StatusCode,
        message: &str,
    ) -> Response<ResponseBody> {
        self.metrics
            .rejected
            .get_or_create(&FaultLabels {
                function: function.config.name.clone(),
                kind: kind.into(),
            })
            .inc();
        tracing::info!(function = %function.config.name, %status, "{message}");
        text(status, &format!("{message}\n"))
    }

    async fn invoke(
        self: &Arc<Self>,
        function: &Arc<Function>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let limits = function.config.limits;
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limits.max_body_bytes as u64) {
            return self.body_too_large(function);
        }
        let permit = match self.admit(function) {
            Ok(permit) => permit,
            Err(refusal) => return refusal,
        };
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, limits.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return self.body_too_large(function);
            }
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("reading request body: {e}\n"),
                );
            }
        };
        self.run_guest(function, Request::from_parts(parts, body), permit)
            .await
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

    /// Like the HTTP path, for a request whose body is already in memory.
    async fn invoke_collected(
        self: &Arc<Self>,
        function: &Arc<Function>,
        request: Request<Bytes>,
    ) -> Response<ResponseBody> {
        if request.body().len() > function.config.limits.max_body_bytes {
            return self.body_too_large(function);
        }
        let permit = match self.admit(function) {
            Ok(permit) => permit,
            Err(refusal) => return refusal,
        };
        self.run_guest(function, request, permit).await
    }

    async fn run_guest(
        self: &Arc<Self>,
        function: &Arc<Function>,
        request: Request<Bytes>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Response<ResponseBody> {
        let label = Metrics::function(&function.config.name);
        let in_flight = self.metrics.in_flight.get_or_create(&label).clone();
        in_flight.inc();
        let engine = self.restorer.engine().clone();
        let mut timing = Timing {
            instantiate: Duration::ZERO,
        };
        let result = match function.prepared.as_ref() {
            Prepared::Module(pre) => {
                let result = run_cgi(&engine, function, pre, request, &mut timing).await;
                if let Err(fault) = &result {
                    self.record_fault(function, fault);
                }
                in_flight.dec();
                drop(permit);
                result
            }
            Prepared::Component(_) => {
                let node = self.clone();
                let function_for_done = function.clone();
                // The permit and in-flight count are held until the guest ends, which may be
                // after the response head (streaming bodies).
                let on_done = move |fault: Option<Fault>| {
                    if let Some(fault) = &fault {
                        node.record_fault(&function_for_done, fault);
                    }
                    in_flight.dec();
                    drop(permit);
                };
                run_proxy(
                    &engine,
                    function,
                    request,
                    &mut timing,
                    on_done,
                    &self.guest_tasks,
                )
                .await
            }
        };
        if timing.instantiate > Duration::ZERO {
            self.metrics
                .instantiate_seconds
                .get_or_create(&label)
                .observe(timing.instantiate.as_secs_f64());
        }
        match result {
            Ok(response) => response,
            // Details stay in the log line; the client learns the kind only.
            Err(fault) => text(fault.status(), &format!("guest fault: {}\n", fault.kind())),
        }
    }

    fn record_fault(&self, function: &Function, fault: &Fault) {
        self.metrics
            .faults
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

    /// The serving path is alive: a function set is loaded and the engine's epoch ticks.
    pub fn is_healthy(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Advances the engine's epoch from a dedicated OS thread. A tokio task could be starved by
/// the very guest whose deadline it is supposed to enforce.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine, tick: Duration) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
