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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use edged_snapshots::{RuntimeSettings, runtime_engine};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
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
    pub connections: usize,
    pub requests: usize,
    /// Command prefix that runs `edged` (an emulator), or empty.
    pub emulator: Vec<String>,
    /// Pooling-allocator slots for edged, when not its default.
    pub pool_slots: Option<u32>,
}

fn start_edged(
    params: &Params,
    work: &Path,
    guests: &[(&str, &str, PathBuf)],
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
    for (name, route, wasm) in guests {
        let _ = write!(
            config,
            "\n[[function]]\nname = \"{name}\"\nroute = \"{route}\"\nwasm = {:?}\n[function.limits]\nmax_concurrency = 256\n",
            wasm.display().to_string()
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

/// Store data of one floor-2 request: exactly what `wasi:http` needs, nothing granted.
struct ServeState {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
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

/// Floor 2: the equivalent of `wasmtime serve` for one component, on its own runtime and
/// threads (as if it were its own process). Stops, and waits for its threads, on drop.
struct WasmtimeServe {
    addr: SocketAddr,
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
    // The same imports edged links components against (all of WASI 0.2 plus `wasi:http`);
    // `ProxyPre` resolves them once, so their number costs nothing per request.
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    // Compiled here (not loaded from an edged artifact): `wasmtime serve` compiles its input.
    let component = Component::from_file(&engine, wasm)
        .map_err(|e| anyhow::Error::from(e).context(format!("compiling {}", wasm.display())))?;
    let pre = ProxyPre::new(linker.instantiate_pre(&component)?)?;

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("wasmtime-serve".into())
        .spawn(move || {
            // A dedicated OS thread advances the epoch, as in edged and `wasmtime serve`: a
            // tokio task could be starved by the guests it is meant to interrupt.
            let ticking = Arc::new(AtomicBool::new(true));
            let ticker = {
                let (ticking, engine) = (ticking.clone(), engine.clone());
                std::thread::spawn(move || {
                    while ticking.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("wasmtime-serve runtime");
            runtime.block_on(serve_components(listener, pre, stop_rx));
            // Connections the load generator left open and guests still running end here.
            runtime.shutdown_timeout(Duration::from_secs(5));
            ticking.store(false, Ordering::Relaxed);
            let _ = ticker.join();
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
    let mut store = Store::new(
        pre.engine(),
        ServeState {
            ctx: WasiCtx::builder().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        },
    );
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

/// Latencies of `requests` GETs of `path`, spread over `connections` keep-alive connections,
/// and the achieved requests per second.
async fn load(
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

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let guests = [
        ("hello", "/hello", edged_testkit::guest("hello-http.wasm")),
        (
            "heavy",
            "/heavy",
            edged_testkit::guest("init-heavy-http.wasm"),
        ),
        ("cgi", "/cgi", edged_testkit::guest("init-heavy-p1.wasm")),
    ];
    let edged = start_edged(params, work, &guests)?;
    let floor = start_floor_server()?;
    let serve = start_wasmtime_serve(&guests[0].2, params.pool_slots)?;
    // Let the node settle, then read its idle footprint with every sample function prepared.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kib(edged.pid());

    let targets = [
        ("http: bare hyper floor", floor, "/"),
        ("http: wasmtime-serve hello (floor 2)", serve.addr, "/"),
        ("http: hello component", edged.http, "/hello"),
        (
            "http: init-heavy component (Wizer)",
            edged.http,
            "/heavy?key=4242",
        ),
        (
            "http: init-heavy p1 CGI (Wizer)",
            edged.http,
            "/cgi?key=4242",
        ),
    ];
    let mut phases = Vec::new();
    let mut figures = Vec::new();
    for (name, addr, path) in targets {
        // Warm-up: connections, page cache, CPU frequency.
        load(addr, path, params.connections, params.connections * 20).await?;
        let (samples, rps) = load(addr, path, params.connections, params.requests).await?;
        phases.push(summarize(name, &samples));
        figures.push(Figure {
            name: format!("{name}: requests/s ({} connections)", params.connections),
            value: rps,
            unit: "req/s".into(),
        });
    }
    // Floor 2 has done its part: its threads and pool go before the numbers are reported.
    drop(serve);
    if let Some(kib) = idle_rss {
        figures.push(Figure {
            name: "edged idle RSS with the 3 sample functions prepared".into(),
            value: kib as f64 / 1024.0,
            unit: "MiB".into(),
        });
    }
    // Indices into `targets`.
    let (floor, serve, hello, heavy, cgi) = (0, 1, 2, 3, 4);
    let p50 = |i: usize| phases[i].p50_us;
    let ratios = vec![
        Ratio::new(
            "http p50: hello / bare-hyper floor",
            p50(hello) / p50(floor),
            "<= 1.5",
            |v| v <= 1.5,
        ),
        // The two halves of the ratio above: edged's own code, and wasmtime + `wasi:http`.
        Ratio::new(
            "http p50: edged hello / wasmtime-serve hello",
            p50(hello) / p50(serve),
            "<= 1.2",
            |v| v <= 1.2,
        ),
        Ratio::new(
            "http p50: wasmtime-serve hello / bare-hyper floor",
            p50(serve) / p50(floor),
            "info",
            |_| true,
        ),
        Ratio::new(
            "http p50: init-heavy component / hello",
            p50(heavy) / p50(hello),
            "<= 2.0",
            |v| v <= 2.0,
        ),
        Ratio::new(
            "http p50: init-heavy p1 CGI / hello",
            p50(cgi) / p50(hello),
            "info",
            |_| true,
        ),
    ];
    Ok((phases, ratios, figures))
}
