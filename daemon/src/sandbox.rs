//! What a guest instance sees of the host: its store state, the WASI and `wasi:http` imports it
//! is linked against, and the capabilities granted to it (denied by default).

use std::sync::Arc;

use edged_artifacts::Linkers;
use edged_node_config::FunctionConfig;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::guest_output::GuestOutput;

/// Per-instance store data. Modules get a WASI p1 context, components one WASI context and one
/// `wasi:http` context that serve both their 0.2 and their 0.3 imports (guests built for
/// `wasm32-wasip2` import both); each kind is linked only against its own imports.
pub struct GuestState {
    wasi: GuestWasi,
    pub limits: MemoryCap,
    /// Calls from the guest into the host so far (imports and wasmtime's libcalls, the epoch
    /// check included), counted by a call hook on the stores of reused instances: a guest that
    /// made none but its epoch check between two interrupts spent that tick computing, not
    /// serving (see `runtime::reused::BusyMark`).
    pub host_calls: u64,
}

enum GuestWasi {
    P1(WasiP1Ctx),
    P2 {
        ctx: WasiCtx,
        table: ResourceTable,
        http: WasiHttpCtx,
        outbound: OutboundPolicy,
    },
}

impl GuestState {
    pub fn p1(ctx: WasiP1Ctx, memory_bytes: usize) -> GuestState {
        GuestState {
            wasi: GuestWasi::P1(ctx),
            limits: MemoryCap::new(memory_bytes),
            host_calls: 0,
        }
    }

    pub fn component(ctx: WasiCtx, outbound: OutboundPolicy, memory_bytes: usize) -> GuestState {
        GuestState {
            wasi: GuestWasi::P2 {
                ctx,
                table: ResourceTable::new(),
                http: WasiHttpCtx::new(),
                outbound,
            },
            limits: MemoryCap::new(memory_bytes),
            host_calls: 0,
        }
    }

    fn p1_ctx(&mut self) -> &mut WasiP1Ctx {
        match &mut self.wasi {
            GuestWasi::P1(ctx) => ctx,
            GuestWasi::P2 { .. } => unreachable!("WASI p1 imports are linked only into modules"),
        }
    }
}

/// The error the node's resource limiter raises when a guest asks for more memory (or table
/// elements) than its function may have: a typed marker, so the fault is told apart from other
/// traps without reading the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what} growth to {desired} refused: the limit is {limit}")]
pub struct GrowthRefused {
    pub what: Growth,
    pub desired: usize,
    pub limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Linear memory, in bytes.
    Memory,
    /// Table elements.
    Table,
}

impl std::fmt::Display for Growth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Growth::Memory => "memory",
            Growth::Table => "table",
        })
    }
}

/// The per-instance resource limiter: a guest that grows its memory past its function's cap (or
/// any memory or table past its declared maximum) is faulted with [`GrowthRefused`], rather than
/// handed -1 to ignore.
pub struct MemoryCap {
    memory_bytes: usize,
}

impl MemoryCap {
    pub fn new(memory_bytes: usize) -> MemoryCap {
        MemoryCap { memory_bytes }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = maximum.map_or(self.memory_bytes, |max| max.min(self.memory_bytes));
        if desired > limit {
            return Err(GrowthRefused {
                what: Growth::Memory,
                desired,
                limit,
            }
            .into());
        }
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("memory growth failed"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match maximum {
            Some(limit) if desired > limit => Err(GrowthRefused {
                what: Growth::Table,
                desired,
                limit,
            }
            .into()),
            _ => Ok(true),
        }
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("table growth failed"))
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        match &mut self.wasi {
            GuestWasi::P2 { ctx, table, .. } => WasiCtxView { ctx, table },
            GuestWasi::P1(_) => unreachable!("WASI 0.2 imports are linked only into components"),
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        match &mut self.wasi {
            GuestWasi::P2 {
                table,
                http,
                outbound,
                ..
            } => WasiHttpCtxView {
                ctx: http,
                table,
                hooks: outbound,
            },
            GuestWasi::P1(_) => unreachable!("wasi:http imports are linked only into components"),
        }
    }
}

/// Which hosts a `wasi:http` guest may send requests to. Anything else fails inside the guest
/// with `HTTP-request-denied`.
#[derive(Clone, Default)]
pub struct OutboundPolicy {
    allowed_hosts: Arc<Vec<String>>,
}

impl OutboundPolicy {
    pub fn new(allowed_hosts: Vec<String>) -> OutboundPolicy {
        OutboundPolicy {
            allowed_hosts: Arc::new(allowed_hosts),
        }
    }

    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed_hosts.contains(&host)
    }
}

type SendRequestFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendRequestFuture {
        let host = request.uri().host().unwrap_or_default().to_string();
        if !self.allows(&host) {
            tracing::info!(%host, "outbound request denied: host not in outbound_hosts");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// A WASI context builder with the function's granted environment and directories, nothing
/// inherited from the daemon.
pub fn wasi_builder(function: &FunctionConfig) -> anyhow::Result<WasiCtxBuilder> {
    let mut builder = WasiCtxBuilder::new();
    for (key, value) in &function.env {
        builder.env(key, value);
    }
    for dir in &function.dirs {
        let perms = if dir.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        builder.preopened_dir(&dir.host, &dir.guest, perms)?;
    }
    Ok(builder)
}

/// A component's WASI context: [`wasi_builder`]'s grants, with stdout and stderr going to the
/// node's log as the function's lines.
pub fn component_wasi(function: &FunctionConfig, output: &GuestOutput) -> anyhow::Result<WasiCtx> {
    let mut builder = wasi_builder(function)?;
    builder.stdout(output.stdout()).stderr(output.stderr());
    Ok(builder.build())
}

/// Linkers for modules (WASI p1) and components (WASI 0.2 and 0.3, `wasi:http` 0.2 and 0.3)
/// on `engine`.
pub fn linkers(engine: &Engine) -> anyhow::Result<Linkers<GuestState>> {
    let mut module = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut module, GuestState::p1_ctx)?;
    let mut component = wasmtime::component::Linker::new(engine);
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component)?;
    wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
    wasmtime_wasi::p3::add_to_linker(&mut component)?;
    wasmtime_wasi_http::p3::add_to_linker(&mut component)?;
    Ok(Linkers { module, component })
}
