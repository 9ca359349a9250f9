//! The large-guest phase: cold starts of interpreter guests (a componentize-py and a
//! componentize-js `wasi:http/proxy` hello, built by `scripts/build-large-guests.sh`), each on a
//! fresh instance, against raw wasmtime on the same input in the same run.
//!
//! Per guest:
//!
//! - **load**: ours (re-hash the stored `.cwasm`, `deserialize_file`, link) against raw wasmtime
//!   (`Component::deserialize_file` of its own precompiled file, link);
//! - **instantiate / first call / response / teardown**: one in-process request on a fresh
//!   store and instance, timed at four points — the instance exists, the guest's `handle`
//!   returned, the response body is complete, the store is dropped (the pool resets the slot
//!   here) — ours (edged's engine: pooling allocator, copy-on-write images) against raw wasmtime
//!   (a default `Config`: on-demand allocator);
//! - **http**: client-observed latency through a real `edged` on loopback, fresh instance per
//!   request, against the same guest served per request by raw wasmtime (default `Config`) in
//!   this process, the way `wasmtime serve` does it: on one connection (the latency of a request
//!   alone; the goals are held to this) and on `connections` (throughput; on a 2-core box its
//!   p50 is mostly queueing behind the other connections).
//!
//! With the guests not built, the phase says so and skips: building them needs Python, Node
//! and packages from PyPI and npm.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use edged_artifacts::{
    Linkers, Manifest, Prepared, Restorer, RuntimeSettings, Store, runtime_engine,
};
use edged_compiler::{CompileOptions, Target, WasmKind};
use http_body_util::{BodyExt, Empty};
use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::floors::{ServeState, component_linker, serve_per_request};
use crate::report::{Figure, Ratio};
use crate::stats::{Summary, summarize};

pub struct Params {
    pub edged: PathBuf,
    /// In-process fresh-instance requests per guest and engine.
    pub iterations: usize,
    /// Samples of the load phases (each maps and links a tens-of-MB artifact).
    pub load_iterations: usize,
    pub connections: usize,
    pub requests: usize,
    pub emulator: Vec<String>,
    pub pool_slots: Option<u32>,
}

/// A large guest: its short name, the route edged serves it on, and its file under
/// `guests/out/large/`.
struct Guest {
    name: &'static str,
    route: &'static str,
    file: &'static str,
}

const GUESTS: [Guest; 2] = [
    Guest {
        name: "python",
        route: "/python",
        file: "python-hello.wasm",
    },
    Guest {
        name: "js",
        route: "/js",
        file: "js-hello.wasm",
    },
];

/// Where `scripts/build-large-guests.sh` puts its output.
pub fn large_guest_dir() -> PathBuf {
    edged_testkit::workspace_root().join("guests/out/large")
}

/// Instants of one in-process request, from its start.
struct RequestTimes {
    instantiated: Duration,
    handled: Duration,
    responded: Duration,
    dropped: Duration,
}

/// One in-process request with the four instants of [`RequestTimes`]; checks the greeting.
async fn timed_request(pre: &ProxyPre<ServeState>) -> Result<RequestTimes> {
    let request = hyper::Request::get("http://localhost/large?from=bench").body(
        Empty::<Bytes>::new().map_err(|never| -> wasmtime_wasi_http::Error { match never {} }),
    )?;
    let start = Instant::now();
    let mut store = wasmtime::Store::new(pre.engine(), ServeState::new());
    store.set_epoch_deadline(u64::MAX / 2);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let incoming = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, request)?;
    let outparam = store.data_mut().http().new_response_outparam(sender)?;
    let pre = pre.clone();
    let guest = tokio::spawn(async move {
        let proxy = pre.instantiate_async(&mut store).await?;
        let instantiated = start.elapsed();
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, incoming, outparam)
            .await?;
        anyhow::Ok((instantiated, start.elapsed(), store))
    });
    let response = match receiver.await {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => bail!("guest answered with error {code:?}"),
        Err(_) => {
            guest.await??;
            bail!("guest returned without setting a response")
        }
    };
    let body = response.into_body().collect().await?.to_bytes();
    let body_done = start.elapsed();
    let (instantiated, handled, store) = guest.await??;
    let responded = body_done.max(handled);
    drop(store);
    let dropped = start.elapsed();
    if !body.starts_with(b"hello from edged: /large?from=bench") {
        bail!("unexpected answer: {:?}", String::from_utf8_lossy(&body));
    }
    Ok(RequestTimes {
        instantiated,
        handled,
        responded,
        dropped,
    })
}

/// `iterations` timed in-process requests (after a few untimed ones), as four phases named
/// `{label}: instantiate|first call|response|teardown`.
async fn request_phases(
    label: &str,
    pre: &ProxyPre<ServeState>,
    iterations: usize,
) -> Result<Vec<Summary>> {
    for _ in 0..5 {
        timed_request(pre).await?;
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        times.push(timed_request(pre).await?);
    }
    let pick = |f: fn(&RequestTimes) -> Duration| times.iter().map(f).collect::<Vec<_>>();
    Ok(vec![
        summarize(&format!("{label}: instantiate"), &pick(|t| t.instantiated)),
        summarize(
            &format!("{label}: first call (inst+handle)"),
            &pick(|t| t.handled),
        ),
        summarize(
            &format!("{label}: response (inst+handle+body)"),
            &pick(|t| t.responded),
        ),
        summarize(
            &format!("{label}: teardown (drop store)"),
            &pick(|t| t.dropped - t.responded),
        ),
    ])
}

/// What one guest's in-process part produced: phases, and what the HTTP part needs.
struct Prepped {
    guest: &'static Guest,
    path: PathBuf,
    raw_pre: ProxyPre<ServeState>,
}

pub async fn run(params: &Params, work: &Path) -> Result<(Vec<Summary>, Vec<Ratio>, Vec<Figure>)> {
    let dir = large_guest_dir();
    let present: Vec<&Guest> = GUESTS
        .iter()
        .filter(|g| dir.join(g.file).is_file())
        .collect();
    if present.len() < GUESTS.len() {
        let missing: Vec<&str> = GUESTS
            .iter()
            .filter(|g| !dir.join(g.file).is_file())
            .map(|g| g.file)
            .collect();
        println!(
            "large phase: {} not built in {} (run scripts/build-large-guests.sh: needs python3, \
             npm and packages from PyPI and npm){}",
            missing.join(", "),
            dir.display(),
            if present.is_empty() {
                "; skipping the phase"
            } else {
                "; measuring the others"
            }
        );
    }
    let mut phases = Vec::new();
    let mut ratios = Vec::new();
    let mut figures = Vec::new();
    if present.is_empty() {
        return Ok((phases, ratios, figures));
    }

    // Ours: store + restorer on edged's engine, as a node holds a deployment.
    let store = Arc::new(Store::open(work.join("large-store"))?);
    let mut settings = RuntimeSettings::default();
    if let Some(slots) = params.pool_slots {
        settings.pool.total_instances = slots;
        settings.pool.total_memories = slots;
    }
    let (engine, _) = runtime_engine(&settings)?;
    let restorer = Restorer::new(
        engine.clone(),
        settings,
        Linkers {
            module: wasmtime::Linker::new(&engine),
            component: component_linker(&engine)?,
        },
        store.clone(),
        NonZeroUsize::new(4).expect("non-zero"),
    )?;
    // Raw: wasmtime's defaults (on-demand allocator, host CPU features), nothing of ours.
    let raw_engine = Engine::new(&wasmtime::Config::new())?;
    let raw_linker = component_linker(&raw_engine)?;

    let mut prepped = Vec::new();
    for guest in present {
        let path = dir.join(guest.file);
        let source = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let host = Target::host().context("unsupported host")?;
        let started = Instant::now();
        let compiled = edged_compiler::compile(
            &source,
            &CompileOptions {
                targets: vec![host],
                ..CompileOptions::default()
            },
        )
        .with_context(|| format!("compiling {}", path.display()))?;
        if compiled.kind != WasmKind::Component {
            bail!("{} is not a component", path.display());
        }
        let compile_time = started.elapsed();
        let artifact = &compiled.artifacts[0];
        eprintln!(
            "large {}: {} MB .wasm, {} MB artifact, compiled in {compile_time:.1?}",
            guest.name,
            source.len() / 1_000_000,
            artifact.bytes.len() / 1_000_000,
        );
        figures.push(Figure {
            name: format!("large {}: artifact size", guest.name),
            value: artifact.bytes.len() as f64 / 1e6,
            unit: "MB".into(),
        });
        let manifest = Manifest::from_compiled(guest.name, 1, 0, &compiled);
        store.put_compiled(&compiled, &manifest)?;

        let mut load = Vec::with_capacity(params.load_iterations);
        for _ in 0..params.load_iterations {
            let start = Instant::now();
            let prepared = restorer.load_artifact(&artifact.blake3, WasmKind::Component)?;
            load.push(start.elapsed());
            drop(prepared);
        }
        let (prepared, _) = restorer.prepare(&manifest)?;
        let Prepared::Component(pre) = &*prepared else {
            bail!("{} prepared as a core module", guest.name);
        };
        let ours = ProxyPre::new(pre.clone())?;

        let raw_cwasm = work.join(format!("raw-{}.cwasm", guest.name));
        std::fs::write(
            &raw_cwasm,
            raw_engine.precompile_component(&compiled.preinitialized)?,
        )?;
        let mut raw_load = Vec::with_capacity(params.load_iterations);
        let mut raw_pre = None;
        for _ in 0..params.load_iterations {
            let start = Instant::now();
            // SAFETY: written just above by this engine.
            let component = unsafe { Component::deserialize_file(&raw_engine, &raw_cwasm)? };
            let pre = raw_linker.instantiate_pre(&component)?;
            raw_load.push(start.elapsed());
            raw_pre = Some(pre);
        }
        let raw = ProxyPre::new(raw_pre.context("load_iterations is at least 1")?)?;

        phases.push(summarize(
            &format!("large {}: load (ours)", guest.name),
            &load,
        ));
        phases.push(summarize(
            &format!("large {}: load (raw wasmtime)", guest.name),
            &raw_load,
        ));
        let ours_phases = request_phases(
            &format!("large {} ours", guest.name),
            &ours,
            params.iterations,
        )
        .await?;
        let raw_phases = request_phases(
            &format!("large {} raw", guest.name),
            &raw,
            params.iterations,
        )
        .await?;
        for (what, i) in [("instantiate", 0), ("response", 2)] {
            ratios.push(Ratio::new(
                &format!("large {} {what} p50: raw wasmtime / ours", guest.name),
                raw_phases[i].p50_us / ours_phases[i].p50_us,
                ">= 3",
                |v| v >= 3.0,
            ));
        }
        if guest.name == "python" {
            ratios.push(Ratio::new(
                "large python instantiate p50 (ours), ms",
                ours_phases[0].p50_us / 1e3,
                "<= 0.3",
                |v| v <= 0.3,
            ));
        }
        phases.extend(ours_phases);
        phases.extend(raw_phases);
        prepped.push(Prepped {
            guest,
            path,
            raw_pre: raw,
        });
    }
    // The restorer's pool and mappings go before edged starts its own.
    drop(restorer);

    // HTTP: a real edged with the large guests, and raw wasmtime serving each.
    let functions: Vec<crate::http::BenchFunction> = prepped
        .iter()
        .map(|p| crate::http::BenchFunction {
            name: p.guest.name,
            route: p.guest.route,
            wasm: p.path.clone(),
            extra: "",
        })
        .collect();
    let http_params = crate::http::Params {
        edged: params.edged.clone(),
        wasmtime: None,
        connections: params.connections,
        requests: params.requests,
        emulator: params.emulator.clone(),
        pool_slots: params.pool_slots,
    };
    let edged_work = work.join("large-edged");
    std::fs::create_dir_all(&edged_work)?;
    let started = Instant::now();
    let edged = crate::http::start_edged(&http_params, &edged_work, &functions)?;
    eprintln!(
        "large: edged started (compiling {} guests) in {:.1?}",
        functions.len(),
        started.elapsed()
    );
    for p in &prepped {
        let raw = serve_per_request(p.raw_pre.clone(), None)?;
        let mut p50 = [0.0; 2];
        for (i, (label, addr, path)) in [
            ("ours (edged)", edged.http, p.guest.route.to_string()),
            ("raw wasmtime", raw.addr, "/".to_string()),
        ]
        .into_iter()
        .enumerate()
        {
            // Latency on one connection (the request's own cost, no queueing behind others on
            // two cores), then throughput with `connections` in parallel.
            let name = format!("large {} http: {label}, 1 connection", p.guest.name);
            crate::load::load(addr, &path, 1, 20).await?;
            let (samples, _) = crate::load::load(addr, &path, 1, params.requests / 2).await?;
            let summary = summarize(&name, &samples);
            p50[i] = summary.p50_us;
            phases.push(summary);
            let name = format!(
                "large {} http: {label}, {} connections",
                p.guest.name, params.connections
            );
            crate::load::load(addr, &path, params.connections, params.connections * 10).await?;
            let (samples, rps) =
                crate::load::load(addr, &path, params.connections, params.requests).await?;
            phases.push(summarize(&name, &samples));
            figures.push(Figure {
                name: format!("{name}: requests/s"),
                value: rps,
                unit: "req/s".into(),
            });
        }
        drop(raw);
        ratios.push(Ratio::new(
            &format!(
                "large {} http p50 (1 connection): raw wasmtime / ours",
                p.guest.name
            ),
            p50[1] / p50[0],
            ">= 3",
            |v| v >= 3.0,
        ));
        let goal = if p.guest.name == "python" { 1.0 } else { 0.3 };
        ratios.push(Ratio::new(
            &format!("large {} http p50 (ours, 1 connection), ms", p.guest.name),
            p50[0] / 1e3,
            &format!("<= {goal}"),
            |v| v <= goal,
        ));
    }
    Ok((phases, ratios, figures))
}
