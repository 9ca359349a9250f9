//! Cold-start phases for a WASI preview 1 command guest, all measured in one run:
//!
//! - **load**: our path from store to `InstancePre` — re-hash the `.cwasm`, `deserialize_file`
//!   (mmap), `instantiate_pre`;
//! - **instantiate**: a fresh instance from the warm, cached `InstancePre` (pooling allocator +
//!   copy-on-write memory image), including our cache lookup and a fresh store;
//! - **first call**: instantiate plus running `_start` to completion;
//! - **floor**: the same instantiate / first-call loop written straight on the wasmtime API with
//!   nothing of ours, so our overhead shows;
//! - **baseline**: what a plain runtime does: JIT-compile the original `.wasm` and let the guest
//!   run its own initialization (no Wizer, no AOT).

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edged_artifacts::{
    Linkers, Manifest, Prepared, Restorer, RuntimeSettings, Store, runtime_engine,
};
use edged_compiler::{CompileOptions, Target, WasmKind};
use wasmtime::{Engine, InstancePre, Linker, Module};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::report::Ratio;
use crate::stats::{Summary, summarize, time_async};

pub struct Params {
    pub iterations: usize,
    pub load_iterations: usize,
    pub baseline_iterations: usize,
    /// Pooling-allocator slots, when not edged's default.
    pub pool_slots: Option<u32>,
}

struct P1Guest {
    wasi: WasiP1Ctx,
}

fn p1_linker(engine: &Engine) -> Result<Linker<P1Guest>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |g: &mut P1Guest| &mut g.wasi)?;
    Ok(linker)
}

fn new_store(engine: &Engine) -> (wasmtime::Store<P1Guest>, MemoryOutputPipe) {
    let stdout = MemoryOutputPipe::new(64 << 10);
    let wasi = WasiCtxBuilder::new()
        .env("QUERY_STRING", "key=12345")
        .stdout(stdout.clone())
        .build_p1();
    let mut store = wasmtime::Store::new(engine, P1Guest { wasi });
    store.set_epoch_deadline(1 << 40);
    (store, stdout)
}

async fn instantiate(engine: &Engine, pre: &InstancePre<P1Guest>) -> wasmtime::Store<P1Guest> {
    let (mut store, _) = new_store(engine);
    pre.instantiate_async(&mut store)
        .await
        .expect("instantiate");
    store
}

async fn first_call(engine: &Engine, pre: &InstancePre<P1Guest>) -> String {
    let (mut store, stdout) = new_store(engine);
    let instance = pre
        .instantiate_async(&mut store)
        .await
        .expect("instantiate");
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .expect("guest is a command");
    start.call_async(&mut store, ()).await.expect("guest runs");
    drop(store);
    String::from_utf8_lossy(&stdout.contents()).into_owned()
}

fn module_pre(prepared: &Prepared<P1Guest>) -> &InstancePre<P1Guest> {
    match prepared {
        Prepared::Module(pre) => pre,
        Prepared::Component(_) => panic!("the cold-start bench runs WASI p1 command modules"),
    }
}

pub async fn run(
    guest: &Path,
    params: &Params,
    work_dir: &Path,
) -> Result<(Vec<Summary>, Vec<Ratio>)> {
    let source = std::fs::read(guest).with_context(|| format!("reading {}", guest.display()))?;
    let host = Target::host().context("unsupported host")?;
    let compile_start = Instant::now();
    let compiled = edged_compiler::compile(
        &source,
        &CompileOptions {
            targets: vec![host],
            ..CompileOptions::default()
        },
    )?;
    eprintln!(
        "compiled {} ({}) in {:?}",
        guest.display(),
        compiled
            .init_func
            .as_deref()
            .map(|f| format!("pre-initialized with {f}"))
            .unwrap_or_else(|| "no init function".into()),
        compile_start.elapsed()
    );
    if compiled.kind != WasmKind::Module {
        bail!("the cold-start bench takes a WASI p1 command module");
    }

    // Ours: store + restorer, exactly as a node holds a deployment.
    let store = Arc::new(Store::open(work_dir.join("store"))?);
    let manifest = Manifest::from_compiled("bench", 1, 0, &compiled);
    store.put_compiled(&compiled, &manifest)?;
    let artifact = &compiled.artifacts[0];
    let mut settings = RuntimeSettings::default();
    if let Some(slots) = params.pool_slots {
        settings.pool.total_instances = slots;
        settings.pool.total_memories = slots;
    }
    let (engine, _) = runtime_engine(&settings)?;
    let linkers = Linkers {
        module: p1_linker(&engine)?,
        component: wasmtime::component::Linker::new(&engine),
    };
    let restorer = Restorer::new(
        engine.clone(),
        settings,
        linkers,
        store.clone(),
        NonZeroUsize::new(16).expect("non-zero"),
    )?;

    let mut load = Vec::with_capacity(params.load_iterations);
    for _ in 0..params.load_iterations {
        let start = Instant::now();
        let prepared = restorer.load_artifact(&artifact.blake3, compiled.kind)?;
        load.push(start.elapsed());
        drop(prepared);
    }
    let (prepared, _) = restorer.prepare(&manifest)?;
    let expected = first_call(&engine, module_pre(&prepared)).await;
    let instantiate_ours = time_async(20, params.iterations, || async {
        let (prepared, _) = restorer.prepare(&manifest).expect("cached");
        drop(instantiate(&engine, module_pre(&prepared)).await);
    })
    .await;
    let first_call_ours = time_async(5, params.iterations, || async {
        let (prepared, _) = restorer.prepare(&manifest).expect("cached");
        let out = first_call(&engine, module_pre(&prepared)).await;
        assert_eq!(out, expected);
    })
    .await;

    // Floor: raw wasmtime, same pooling + CoW engine shape, nothing of ours in the loop.
    // Same slot counts as ours, so a small pool (qemu-user) applies to both.
    let mut raw_pool = wasmtime::PoolingAllocationConfig::default();
    if let Some(slots) = params.pool_slots {
        raw_pool
            .total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .total_stacks(slots);
    }
    let mut raw_config = wasmtime::Config::new();
    raw_config
        .epoch_interruption(true)
        .memory_init_cow(true)
        .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(raw_pool));
    let raw_engine = Engine::new(&raw_config)?;
    let raw_cwasm = work_dir.join("raw.cwasm");
    std::fs::write(
        &raw_cwasm,
        raw_engine.precompile_module(&compiled.preinitialized)?,
    )?;
    // SAFETY: written just above by this engine.
    let raw_module = unsafe { Module::deserialize_file(&raw_engine, &raw_cwasm)? };
    let raw_pre = p1_linker(&raw_engine)?.instantiate_pre(&raw_module)?;
    let instantiate_floor = time_async(20, params.iterations, || async {
        drop(instantiate(&raw_engine, &raw_pre).await);
    })
    .await;
    let first_call_floor = time_async(5, params.iterations, || async {
        let out = first_call(&raw_engine, &raw_pre).await;
        assert_eq!(out, expected);
    })
    .await;

    // Baseline: JIT from the original .wasm, guest initializes itself in main.
    let jit_engine = Engine::new(wasmtime::Config::new().epoch_interruption(true))?;
    let ticker = spawn_epoch_ticker(vec![engine.clone(), raw_engine.clone(), jit_engine.clone()]);
    let jit_linker = p1_linker(&jit_engine)?;
    let baseline = time_async(1, params.baseline_iterations, || async {
        let module = Module::new(&jit_engine, &compiled.source).expect("JIT compile");
        let pre = jit_linker.instantiate_pre(&module).expect("link");
        let out = first_call(&jit_engine, &pre).await;
        assert_eq!(
            out, expected,
            "the JIT baseline must compute the same answer"
        );
    })
    .await;

    ticker.abort();
    let phases = vec![
        summarize("load (verify+deserialize_file+pre)", &load),
        summarize("instantiate (ours, warm pre)", &instantiate_ours),
        summarize("instantiate (raw wasmtime floor)", &instantiate_floor),
        summarize("first call (ours: Wizer+AOT)", &first_call_ours),
        summarize("first call (raw wasmtime floor)", &first_call_floor),
        summarize("baseline (JIT + own init + run)", &baseline),
    ];
    let p50 = |i: usize| phases[i].p50_us;
    let ratios = vec![
        Ratio::new(
            "instantiate p50: ours / raw-wasmtime floor",
            p50(1) / p50(2),
            "<= 2.0",
            |v| v <= 2.0,
        ),
        Ratio::new(
            "first call p50: ours / raw-wasmtime floor",
            p50(3) / p50(4),
            "<= 2.0",
            |v| v <= 2.0,
        ),
        Ratio::new(
            "speed-up of first call: baseline p50 / ours p50",
            p50(5) / p50(3),
            ">= 100",
            |v| v >= 100.0,
        ),
        Ratio::context(
            "load after push/restart p50 / first call p50",
            p50(0) / p50(3),
            "what a node's first request after a restart pays",
        ),
    ];
    Ok((phases, ratios))
}

/// Keeps the epoch moving like a serving node does, so deadline checks are live in every loop.
fn spawn_epoch_ticker(engines: Vec<Engine>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            for engine in &engines {
                engine.increment_epoch();
            }
        }
    })
}
