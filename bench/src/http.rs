//! The HTTP phase: a load generator (several keep-alive connections, one request in flight per
//! connection) against a real `edged` process on loopback, and, in the same run, against two
//! floors in this process:
//!
//! 1. a bare hyper hello server: what any Rust HTTP service costs on this machine;
//! 2. a bare wasmtime `wasi:http` server serving the same hello component, built the way
//!    `wasmtime serve` is (fresh store and instance per request from a `ProxyPre`) on edged's
//!    engine configuration: what instantiating and running a component per request costs at
//!    all, with none of edged's code in the way.
//!
//! Between them the two floors split the gap of `edged hello` to bare hyper: floor 2 / floor 1
//! is the price of wasmtime + `wasi:http`, edged / floor 2 is edged's own.
//!
//! And against the real `wasmtime serve` 48.0.8 (a separate process, installed by
//! `scripts/install-wasmtime-cli.sh`; skipped, saying so, when absent) on the same components,
//! both on their defaults and both with instance reuse: the p2 hello (`wasi:http@0.2`), the p3
//! hello (`wasi:http@0.3.0`), and a componentize-py hello (`scripts/build-large-guests.sh`).
//! Every target is loaded at 1 connection and at `connections`, each row's requests in
//! [`ROUNDS`] slices with the rows taking turns, so that load from elsewhere on a shared machine
//! falls on edged's rows and wasmtime serve's alike (two runs ten minutes apart, measured one
//! row after another, put edged's p3 hello at 0.68× and at 1.31× wasmtime serve's).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use edged_artifacts::{RuntimeSettings, runtime_engine};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::process::EdgedProcess;
use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: PathBuf,
    /// The real `wasmtime` CLI for the `wasmtime serve` rows, if installed.
    pub wasmtime: Option<PathBuf>,
    pub connections: usize,
    pub requests: usize,
    /// Command prefix that runs `edged` (an emulator), or empty.
    pub emulator: Vec<String>,
    /// Pooling-allocator slots for edged, when not its default.
    pub pool_slots: Option<u32>,
}

/// A function of the edged under test: name, route, `.wasm`, and extra TOML for its table.
pub(crate) struct BenchFunction {
    pub name: &'static str,
    pub route: &'static str,
    pub wasm: PathBuf,
    pub extra: &'static str,
}

/// Requests per instance when reuse is on, for edged and `wasmtime serve` alike.
const REUSE: u32 = 1000;

/// Slices each row's requests are measured in, the rows taking turns.
pub(crate) const ROUNDS: usize = 4;

pub(crate) fn start_edged(
    params: &Params,
    work: &Path,
    guests: &[BenchFunction],
) -> Result<EdgedProcess> {
    use std::fmt::Write as _;
    let binary = &params.edged;
    let mut config = format!(
        "[node]\nstate_dir = {:?}\nhttp_listen = \"127.0.0.1:0\"\n",
        work.join("edged-state").display().to_string()
    );
    if let Some(slots) = params.pool_slots {
        let _ = write!(
            config,
            "\n[engine]\ntotal_instances = {slots}\ntotal_memories = {slots}\n"
        );
    }
    for f in guests {
        let _ = write!(
            config,
            "\n[[function]]\nname = \"{}\"\nroute = \"{}\"\nwasm = {:?}\n{}[function.limits]\nmax_concurrency = 256\n",
            f.name,
            f.route,
            f.wasm.display().to_string(),
            f.extra,
        );
    }
    let config_path = work.join("edged.toml");
    std::fs::write(&config_path, config)?;
    EdgedProcess::start(&params.emulator, binary, &config_path, Stdio::inherit())
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()
}

/// The floor: hyper answering "hello" with nothing else in the way, on its own runtime.
fn start_floor_server() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("floor runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"hello from the floor\n"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    Ok(addr)
}

/// Store data of one request the bench runs on wasmtime itself (floor 2 here; the large phase's
/// in-process requests and its raw wasmtime server): exactly what `wasi:http` needs, nothing
/// granted.
pub(crate) struct ServeState {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl ServeState {
    pub(crate) fn new() -> ServeState {
        ServeState {
            ctx: WasiCtx::builder().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for ServeState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ServeState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

/// edged's default `epoch_tick_ms`: the engine compiles epoch checks into every guest, so both
/// servers should pay for the same ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The imports edged links components against (all of WASI 0.2 plus `wasi:http`); `ProxyPre`
/// resolves them once, so their number costs nothing per request.
pub(crate) fn component_linker(engine: &Engine) -> Result<Linker<ServeState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    Ok(linker)
}

/// The equivalent of `wasmtime serve` for one component (floor 2 here, raw wasmtime in the large
/// phase), on its own runtime and threads (as if it were its own process). Stops, and waits for
/// its threads, on drop.
pub(crate) struct WasmtimeServe {
    pub(crate) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WasmtimeServe {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Compiles `wasm` and serves it per request from a fresh store and instance. The engine is
/// edged's own (`runtime_engine`: pooling allocator with copy-on-write images and
/// PAGEMAP_SCAN resets, epoch interruption, the same pool sizes), so the gap between this
/// floor and edged is edged's code, not engine configuration.
fn start_wasmtime_serve(wasm: &Path, pool_slots: Option<u32>) -> Result<WasmtimeServe> {
    let mut settings = RuntimeSettings::default();
    if let Some(slots) = pool_slots {
        settings.pool.total_instances = slots;
        settings.pool.total_memories = slots;
    }
    let (engine, _) = runtime_engine(&settings)?;
    let linker = component_linker(&engine)?;
    // Compiled here (not loaded from an edged artifact): `wasmtime serve` compiles its input.
    let component = Component::from_file(&engine, wasm)
        .map_err(|e| anyhow::Error::from(e).context(format!("compiling {}", wasm.display())))?;
    let pre = ProxyPre::new(linker.instantiate_pre(&component)?)?;
    serve_per_request(pre, Some(engine))
}

/// Serves `pre` per request from a fresh store and instance on a thread and runtime of its
/// own. With `ticked`, a dedicated OS thread advances that engine's epoch, as in edged and
/// `wasmtime serve` (a tokio task could be starved by the guests it is meant to interrupt).
pub(crate) fn serve_per_request(
    pre: ProxyPre<ServeState>,
    ticked: Option<Engine>,
) -> Result<WasmtimeServe> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("wasmtime-serve".into())
        .spawn(move || {
            let ticking = Arc::new(AtomicBool::new(true));
            let ticker = ticked.map(|engine| {
                let ticking = ticking.clone();
                std::thread::spawn(move || {
                    while ticking.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
            });
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("wasmtime-serve runtime");
            runtime.block_on(serve_components(listener, pre, stop_rx));
            // Connections the load generator left open and guests still running end here.
            runtime.shutdown_timeout(Duration::from_secs(5));
            ticking.store(false, Ordering::Relaxed);
            if let Some(ticker) = ticker {
                let _ = ticker.join();
            }
        })?;
    Ok(WasmtimeServe {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The accept loop of `wasmtime serve`: one task per connection, keep-alive, no Nagle, until
/// `stop` fires (or its sender is dropped).
async fn serve_components(
    listener: std::net::TcpListener,
    pre: ProxyPre<ServeState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let pre = pre.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let pre = pre.clone();
                async move {
                    let response = match handle_component_request(pre, request).await {
                        Ok(response) => response,
                        // A 500 with the reason: the load generator fails the phase with it.
                        Err(e) => {
                            let mut response = hyper::Response::new(
                                Full::new(Bytes::from(format!("{e:?}\n")))
                                    .map_err(|never| match never {})
                                    .boxed_unsync(),
                            );
                            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                            response
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request, as `wasmtime serve` (and `wasmtime_wasi_http`'s own example) runs it: a fresh
/// store and instance, the guest in a task of its own so it can keep writing the body after it
/// has set the response, and the response taken from the outparam's channel.
async fn handle_component_request(
    pre: ProxyPre<ServeState>,
    request: hyper::Request<hyper::body::Incoming>,
) -> wasmtime::Result<hyper::Response<HyperOutgoingBody>> {
    let mut store = Store::new(pre.engine(), ServeState::new());
    // The engine checks epochs (edged's configuration); like `wasmtime serve --wasm timeout`,
    // a guest still running at a tick yields to the executor rather than trapping.
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let incoming = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, request)?;
    let outparam = store.data_mut().http().new_response_outparam(sender)?;
    let guest = tokio::spawn(async move {
        let proxy = pre.instantiate_async(&mut store).await?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, incoming, outparam)
            .await
    });
    match receiver.await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(code)) => Err(wasmtime::Error::msg(format!(
            "guest answered with error {code:?}"
        ))),
        // The store (and with it the sender) is gone without a response: the task says why.
        Err(_) => match guest.await {
            Ok(Ok(())) => Err(wasmtime::Error::msg(
                "guest returned without setting a response",
            )),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(wasmtime::Error::msg(format!("guest task failed: {e}"))),
        },
    }
}

/// The real `wasmtime serve` as its own process on a loopback port, killed on drop.
struct RealWasmtimeServe {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for RealWasmtimeServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `wasmtime serve [flags] wasm` and waits until it accepts connections (it compiles the
/// component first, which takes a while for a large one).
async fn start_real_wasmtime_serve(
    wasmtime: &Path,
    wasm: &Path,
    flags: &[&str],
) -> Result<RealWasmtimeServe> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = std::process::Command::new(wasmtime)
        .arg("serve")
        .arg("--addr")
        .arg(addr.to_string())
        // What edged grants a component too: WASI's cli interfaces (environment, stdio).
        .arg("-Scli")
        .args(flags)
        .arg(wasm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut serve = RealWasmtimeServe { child, addr };
    let deadline = Instant::now() + Duration::from_secs(300);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = serve.child.try_wait()? {
            bail!("wasmtime serve {} exited with {status}", wasm.display());
        }
        if Instant::now() > deadline {
            bail!("wasmtime serve {} did not start listening", wasm.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(serve)
}

/// Latencies of `requests` GETs of `path`, spread over `connections` keep-alive connections,
/// and the achieved requests per second.
pub(crate) async fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    requests: usize,
) -> Result<(Vec<Duration>, f64)> {
    load_with(addr, path, &[], connections, requests).await
}

/// [`load`] with extra request headers (the chain phase's bearer token).
pub(crate) async fn load_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    connections: usize,
    requests: usize,
) -> Result<(Vec<Duration>, f64)> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let per_connection = requests.div_ceil(connections);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let path = path.to_string();
        let headers = headers.clone();
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut samples = Vec::with_capacity(per_connection);
            for _ in 0..per_connection {
                let mut request =
                    http::Request::get(path.as_str()).header(http::header::HOST, "localhost");
                for (name, value) in &headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Empty::<Bytes>::new())?;
                let start = Instant::now();
                let response = sender.send_request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                samples.push(start.elapsed());
                if !status.is_success() {
                    bail!(
                        "{path}: status {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::with_capacity(requests);
    for worker in workers {
        samples.extend(worker.await??);
    }
    let rps = samples.len() as f64 / started.elapsed().as_secs_f64();
    Ok((samples, rps))
}

/// One load target: a row of the report at each connection count.
struct Target {
    name: String,
    addr: SocketAddr,
    path: &'static str,
    /// Requests per measurement, scaled down for slow guests.
    requests: usize,
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let p2_hello = edged_testkit::guest("hello-http.wasm");
    let p3_hello = edged_testkit::guest("p3-hello.wasm");
    let python = edged_testkit::workspace_root().join("guests/out/large/python-hello.wasm");
    let python = python.exists().then_some(python);
    if python.is_none() {
        println!(
            "note: no componentize-py hello (run scripts/build-large-guests.sh): its rows are skipped"
        );
    }
    let reuse_toml: &'static str = "instances = { requests = 1000 }\n";
    let mut guests = vec![
        BenchFunction {
            name: "hello",
            route: "/hello",
            wasm: p2_hello.clone(),
            extra: "",
        },
        BenchFunction {
            name: "hello-reuse",
            route: "/hello-reuse",
            wasm: p2_hello.clone(),
            extra: reuse_toml,
        },
        BenchFunction {
            name: "p3",
            route: "/p3",
            wasm: p3_hello.clone(),
            extra: "",
        },
        BenchFunction {
            name: "heavy",
            route: "/heavy",
            wasm: edged_testkit::guest("init-heavy-http.wasm"),
            extra: "",
        },
        BenchFunction {
            name: "cgi",
            route: "/cgi",
            wasm: edged_testkit::guest("init-heavy-p1.wasm"),
            extra: "",
        },
    ];
    if let Some(python) = &python {
        guests.push(BenchFunction {
            name: "py",
            route: "/py",
            wasm: python.clone(),
            extra: "",
        });
        guests.push(BenchFunction {
            name: "py-reuse",
            route: "/py-reuse",
            wasm: python.clone(),
            extra: reuse_toml,
        });
    }
    let edged = start_edged(params, work, &guests)?;
    let floor = start_floor_server()?;
    let serve = start_wasmtime_serve(&p2_hello, params.pool_slots)?;
    // Let the node settle, then read its idle footprint with every sample function prepared.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(edged.pid());

    let n = params.requests;
    let target = |name: &str, addr: SocketAddr, path: &'static str, requests: usize| Target {
        name: name.to_string(),
        addr,
        path,
        requests,
    };
    let mut targets = vec![
        target("http: bare hyper floor", floor, "/", n),
        target(
            "http: in-process wasmtime p2 hello (floor 2)",
            serve.addr,
            "/",
            n,
        ),
        target("http: edged p2 hello (fresh)", edged.http, "/hello", n),
        target(
            "http: edged p2 hello (reuse)",
            edged.http,
            "/hello-reuse",
            n,
        ),
        target("http: edged p3 hello (defaults)", edged.http, "/p3", n),
        target(
            "http: edged init-heavy p2 (Wizer)",
            edged.http,
            "/heavy?key=4242",
            n,
        ),
        target(
            "http: edged init-heavy p1 CGI (Wizer)",
            edged.http,
            "/cgi?key=4242",
            n,
        ),
    ];
    if python.is_some() {
        targets.push(target(
            "http: edged python hello (fresh)",
            edged.http,
            "/py",
            n / 8,
        ));
        targets.push(target(
            "http: edged python hello (reuse)",
            edged.http,
            "/py-reuse",
            n,
        ));
    }
    // The real `wasmtime serve`, one process per configuration, all started before measuring so
    // that their rows interleave with edged's (below).
    let reuse_flag = format!("--max-instance-reuse-count={REUSE}");
    let mut real: Vec<(&str, PathBuf, Vec<String>, usize)> = Vec::new();
    match &params.wasmtime {
        Some(_) => {
            real.push((
                "http: wasmtime serve p2 hello (defaults)",
                p2_hello.clone(),
                vec![],
                n,
            ));
            real.push((
                "http: wasmtime serve p2 hello (reuse)",
                p2_hello.clone(),
                vec![reuse_flag.clone()],
                n,
            ));
            real.push((
                "http: wasmtime serve p3 hello (defaults)",
                p3_hello.clone(),
                vec![],
                n,
            ));
            if let Some(python) = &python {
                real.push((
                    "http: wasmtime serve python hello (defaults)",
                    python.clone(),
                    vec![],
                    n / 8,
                ));
                real.push((
                    "http: wasmtime serve python hello (reuse)",
                    python.clone(),
                    vec![reuse_flag.clone()],
                    n,
                ));
            }
        }
        None => println!(
            "note: the real wasmtime serve 48.0.8 is not installed (scripts/install-wasmtime-cli.sh): its rows are skipped"
        ),
    }
    let mut real_servers = Vec::new();
    if let Some(wasmtime) = &params.wasmtime {
        for (name, wasm, flags, requests) in &real {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let server = start_real_wasmtime_serve(wasmtime, wasm, &flags).await?;
            targets.push(target(name, server.addr, "/", *requests));
            real_servers.push(server);
        }
    }

    let mut phases = Vec::new();
    let mut figures = Vec::new();
    // Requests/s by (row name, connections).
    let mut rps_of = std::collections::HashMap::new();
    let mut p50_of = std::collections::HashMap::new();
    let connection_counts = if params.connections > 1 {
        vec![1, params.connections]
    } else {
        vec![1]
    };
    // Warm-up: connections, page cache, CPU frequency, instances.
    for &connections in &connection_counts {
        for t in &targets {
            load(t.addr, t.path, connections, (connections * 20).max(40)).await?;
        }
    }
    // Every row's requests in ROUNDS slices, the rows taking turns: on a shared machine the
    // load from elsewhere drifts over minutes, and rows measured one after another would each
    // get a different share of it. A row's figures pool its slices.
    let mut pooled: Vec<Vec<(Vec<Duration>, Duration)>> =
        vec![vec![Default::default(); targets.len()]; connection_counts.len()];
    for _ in 0..ROUNDS {
        for (c, &connections) in connection_counts.iter().enumerate() {
            for (i, t) in targets.iter().enumerate() {
                let requests = (t.requests / ROUNDS).max(connections * 20);
                let (samples, rps) = load(t.addr, t.path, connections, requests).await?;
                let (all, busy) = &mut pooled[c][i];
                *busy += Duration::from_secs_f64(samples.len() as f64 / rps);
                all.extend(samples);
            }
        }
    }
    drop(real_servers);
    drop(serve);
    for (t_index, t) in targets.iter().enumerate() {
        for (c, &connections) in connection_counts.iter().enumerate() {
            let (samples, busy) = &pooled[c][t_index];
            let rps = samples.len() as f64 / busy.as_secs_f64();
            let row = format!("{} ×{connections}", t.name);
            let summary = summarize(&row, samples);
            p50_of.insert(row.clone(), summary.p50_us);
            phases.push(summary);
            rps_of.insert(row.clone(), rps);
            figures.push(Figure {
                name: format!("{row}: requests/s"),
                value: rps,
                unit: "req/s".into(),
            });
        }
    }
    if let Some(kib) = idle_rss {
        figures.push(Figure {
            name: format!(
                "edged idle RSS with the {} bench functions prepared",
                guests.len()
            ),
            value: kib as f64 / 1024.0,
            unit: "MiB".into(),
        });
    }

    let wide = params.connections;
    let p50 = |row: &str| p50_of.get(&format!("{row} ×1")).copied();
    let rps = |row: &str, c: usize| rps_of.get(&format!("{row} ×{c}")).copied();
    let mut ratios = Vec::new();
    // A ratio both of whose rows were measured (the wasmtime serve rows may be skipped).
    fn goal(name: String, value: Option<f64>, goal: &str, met: fn(f64) -> bool) -> Option<Ratio> {
        value
            .filter(|v| v.is_finite())
            .map(|value| Ratio::new(&name, value, goal, met))
    }
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let floor = "http: bare hyper floor";
    ratios.extend(goal(
        "http p50 ×1: edged p3 hello / bare-hyper floor".into(),
        div(p50("http: edged p3 hello (defaults)"), p50(floor)),
        "<= 1.5",
        |v| v <= 1.5,
    ));
    ratios.extend(
        div(p50("http: wasmtime serve p3 hello (defaults)"), p50(floor))
            .filter(|v| v.is_finite())
            .map(|v| {
                Ratio::context(
                    "http p50 ×1: wasmtime serve p3 hello / bare-hyper floor",
                    v,
                    "the same component on wasmtime's own server: the p3 floor",
                )
            }),
    );
    ratios.extend(goal(
        "http p50 ×1: edged p2 hello / bare-hyper floor".into(),
        div(p50("http: edged p2 hello (fresh)"), p50(floor)),
        "<= 1.5",
        |v| v <= 1.5,
    ));
    ratios.extend(goal(
        "http p50 ×1: edged p2 hello / in-process wasmtime (floor 2)".into(),
        div(
            p50("http: edged p2 hello (fresh)"),
            p50("http: in-process wasmtime p2 hello (floor 2)"),
        ),
        "<= 1.2",
        |v| v <= 1.2,
    ));
    ratios.extend(goal(
        "http p50 ×1: init-heavy p2 / p2 hello".into(),
        div(
            p50("http: edged init-heavy p2 (Wizer)"),
            p50("http: edged p2 hello (fresh)"),
        ),
        "<= 2.0",
        |v| v <= 2.0,
    ));
    for c in [1, wide] {
        let vs = |edged_row: &str, serve_row: &str| div(rps(edged_row, c), rps(serve_row, c));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, p2 hello, both defaults"),
            vs(
                "http: edged p2 hello (fresh)",
                "http: wasmtime serve p2 hello (defaults)",
            ),
            ">= 3",
            |v| v >= 3.0,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, p2 hello, both reuse"),
            vs(
                "http: edged p2 hello (reuse)",
                "http: wasmtime serve p2 hello (reuse)",
            ),
            ">= 1.5",
            |v| v >= 1.5,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, p3 hello, both defaults"),
            vs(
                "http: edged p3 hello (defaults)",
                "http: wasmtime serve p3 hello (defaults)",
            ),
            ">= 1.5",
            |v| v >= 1.5,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged python hello, reuse / fresh"),
            vs(
                "http: edged python hello (reuse)",
                "http: edged python hello (fresh)",
            ),
            ">= 10",
            |v| v >= 10.0,
        ));
        ratios.extend(goal(
            format!("req/s ×{c}: edged / wasmtime serve, python hello, both reuse"),
            vs(
                "http: edged python hello (reuse)",
                "http: wasmtime serve python hello (reuse)",
            ),
            ">= 1.2",
            |v| v >= 1.2,
        ));
        let name = format!("req/s ×{c}: edged / wasmtime serve, python hello, both fresh");
        ratios.extend(
            vs(
                "http: edged python hello (fresh)",
                "http: wasmtime serve python hello (defaults)",
            )
            .filter(|v| v.is_finite())
            .map(|v| {
                Ratio::context(
                    &name,
                    v,
                    "what a fresh interpreter instance costs either host",
                )
            }),
        );
    }
    Ok((phases, ratios, figures))
}
