//! The floors and baselines the HTTP phase (and the large phase) measures edged against, all
//! serving the same components edged serves:
//!
//! 1. a bare hyper hello server: what any Rust HTTP service costs on this machine;
//! 2. a bare wasmtime `wasi:http` server built the way `wasmtime serve` is (fresh store and
//!    instance per request from a `ProxyPre`) on edged's engine configuration, in this process;
//! 3. the real `wasmtime serve` CLI as a separate process.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use edged_artifacts::{RuntimeSettings, runtime_engine};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// The floor: hyper answering "hello" with nothing else in the way, on its own runtime.
pub(crate) fn start_floor_server() -> Result<SocketAddr> {
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
pub(crate) fn start_wasmtime_serve(wasm: &Path, pool_slots: Option<u32>) -> Result<WasmtimeServe> {
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
pub(crate) struct RealWasmtimeServe {
    child: std::process::Child,
    pub(crate) addr: SocketAddr,
}

impl Drop for RealWasmtimeServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `wasmtime serve [flags] wasm` and waits until it accepts connections (it compiles the
/// component first, which takes a while for a large one).
pub(crate) async fn start_real_wasmtime_serve(
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
