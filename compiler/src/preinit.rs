//! Pre-initialization with Wizer.
//!
//! Wizer instruments the input, we instantiate it with every import defined as a trap (an init
//! function that touches the outside world would bake one machine's clock or randomness into
//! every deployment), run the init function under a deadline and memory cap, and let Wizer
//! snapshot the resulting state into a new binary.

use std::sync::mpsc;
use std::time::Duration;

use wasmtime::{Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wizer::Wizer;

use crate::{CompileError, CompileOptions, WasmKind};

/// Does the Wasm binary `wasm` (a core module or a component, not WAT) export a function named
/// `name` at its top level? An unparsable binary exports nothing. What `edged check-config` asks
/// of a config's `init = "<name>"`, with the same walk the compiler uses.
pub fn exports_function(wasm: &[u8], name: &str) -> bool {
    let kind = if wasmparser::Parser::is_component(wasm) {
        WasmKind::Component
    } else {
        WasmKind::Module
    };
    exports_func(kind, wasm, name)
}

/// Does `wasm` export a function named `name` (at the top level, for components)?
pub(crate) fn exports_func(kind: WasmKind, wasm: &[u8], name: &str) -> bool {
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let Ok(payload) = payload else { return false };
        let found = match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => {
                depth += 1;
                false
            }
            wasmparser::Payload::End(_) => {
                depth = depth.saturating_sub(1);
                false
            }
            wasmparser::Payload::ExportSection(exports)
                if kind == WasmKind::Module && depth == 0 =>
            {
                exports
                    .into_iter()
                    .flatten()
                    .any(|e| e.name == name && e.kind == wasmparser::ExternalKind::Func)
            }
            wasmparser::Payload::ComponentExportSection(exports)
                if kind == WasmKind::Component && depth == 0 =>
            {
                exports.into_iter().flatten().any(|e| {
                    e.name.name == name && e.kind == wasmparser::ComponentExternalKind::Func
                })
            }
            _ => false,
        };
        if found {
            return true;
        }
    }
    false
}

struct InitState {
    limits: StoreLimits,
}

/// Cuts the init function off after `timeout` by bumping the engine's epoch, unless dropped
/// first. Bumping the epoch is harmless to anything else using the engine: compilation ignores
/// it, and the node never runs Wizer on its serving engine.
struct Deadline {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Deadline {
    fn start(engine: &Engine, timeout: Duration) -> Deadline {
        let (cancel, cancelled) = mpsc::channel::<()>();
        let engine = engine.clone();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(timeout) {
                engine.increment_epoch();
            }
        });
        Deadline {
            cancel: Some(cancel),
            thread: Some(thread),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        drop(self.cancel.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(crate) fn preinitialize(
    engine: &Engine,
    kind: WasmKind,
    wasm: &[u8],
    init: &str,
    options: &CompileOptions,
) -> Result<Vec<u8>, CompileError> {
    let mut wizer = Wizer::new();
    wizer.init_func(init);
    // Wizer strips the init export from core modules, but a component still lifts it from its
    // inner module, so removing it there would leave the component invalid.
    wizer.keep_init_func(kind == WasmKind::Component);
    let mut store = Store::new(
        engine,
        InitState {
            limits: StoreLimitsBuilder::new()
                .memory_size(options.init_memory_limit)
                .trap_on_grow_failure(true)
                .build(),
        },
    );
    store.limiter(|state| &mut state.limits as &mut dyn ResourceLimiter);
    store.set_epoch_deadline(1);
    let _deadline = Deadline::start(engine, options.init_timeout);

    let result = pollster::block_on(async {
        match kind {
            WasmKind::Module => run_module(&wizer, engine, &mut store, wasm).await,
            WasmKind::Component => run_component(&wizer, engine, &mut store, wasm).await,
        }
    });
    result.map_err(|e| classify_init_error(init, options.init_timeout, e))
}

async fn run_module(
    wizer: &Wizer,
    engine: &Engine,
    store: &mut Store<InitState>,
    wasm: &[u8],
) -> wasmtime::Result<Vec<u8>> {
    let (cx, instrumented) = wizer.instrument(wasm)?;
    let module = wasmtime::Module::new(engine, &instrumented)?;
    let mut linker = wasmtime::Linker::new(engine);
    linker.define_unknown_imports_as_traps(&module)?;
    let instance = linker.instantiate_async(&mut *store, &module).await?;
    // Reactors initialize their runtime in `_initialize`; that must run before the init func.
    if let Some(start) = instance.get_func(&mut *store, "_initialize") {
        start
            .typed::<(), ()>(&*store)?
            .call_async(&mut *store, ())
            .await?;
    }
    let init = instance.get_typed_func::<(), ()>(&mut *store, wizer.get_init_func())?;
    init.call_async(&mut *store, ()).await?;
    wizer
        .snapshot(&cx, &mut CoreInstance { store, instance })
        .await
}

async fn run_component(
    wizer: &Wizer,
    engine: &Engine,
    store: &mut Store<InitState>,
    wasm: &[u8],
) -> wasmtime::Result<Vec<u8>> {
    use wasmtime::component::{Component, Linker};
    let (cx, instrumented) = wizer.instrument_component(wasm)?;
    let component = Component::new(engine, &instrumented)?;
    let mut linker = Linker::new(engine);
    linker.define_unknown_imports_as_traps(&component)?;
    let instance = linker.instantiate_async(&mut *store, &component).await?;
    let init = instance.get_typed_func::<(), ()>(&mut *store, wizer.get_init_func())?;
    init.call_async(&mut *store, ()).await?;
    wizer
        .snapshot_component(&cx, &mut ComponentInstance { store, instance })
        .await
}

fn classify_init_error(init: &str, timeout: Duration, error: wasmtime::Error) -> CompileError {
    let message = format!("{error:#}");
    if let Some(rest) = message.split("unknown import: `").nth(1) {
        let import = rest.split('`').next().unwrap_or(rest).to_string();
        return CompileError::InitCalledImport {
            init: init.to_string(),
            import,
        };
    }
    if error
        .downcast_ref::<wasmtime::Trap>()
        .is_some_and(|t| *t == wasmtime::Trap::Interrupt)
    {
        return CompileError::InitTimeout {
            init: init.to_string(),
            timeout,
        };
    }
    CompileError::Preinit {
        init: init.to_string(),
        reason: message,
    }
}

/// Wizer's view of an instantiated core module: exported globals and memories.
struct CoreInstance<'a> {
    store: &'a mut Store<InitState>,
    instance: wasmtime::Instance,
}

impl wasmtime_wizer::InstanceState for CoreInstance<'_> {
    async fn global_get(
        &mut self,
        name: &str,
        _type_hint: wasmtime_wizer::ValType,
    ) -> wasmtime_wizer::SnapshotVal {
        use wasmtime::Val;
        use wasmtime_wizer::SnapshotVal;
        let global = self
            .instance
            .get_global(&mut *self.store, name)
            .expect("wizer only asks for globals its instrumentation exported");
        match global.get(&mut *self.store) {
            Val::I32(x) => SnapshotVal::I32(x),
            Val::I64(x) => SnapshotVal::I64(x),
            Val::F32(x) => SnapshotVal::F32(x),
            Val::F64(x) => SnapshotVal::F64(x),
            Val::V128(x) => SnapshotVal::V128(x.as_u128()),
            other => panic!("wizer rejects reference-typed globals before this point: {other:?}"),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        let memory = self
            .instance
            .get_memory(&mut *self.store, name)
            .expect("wizer only asks for memories its instrumentation exported");
        contents(memory.data(&*self.store))
    }
}

/// Wizer's view of an instantiated component: the accessor functions its instrumentation added.
struct ComponentInstance<'a> {
    store: &'a mut Store<InitState>,
    instance: wasmtime::component::Instance,
}

impl ComponentInstance<'_> {
    async fn call<R: wasmtime::component::Lift + Send + Sync + 'static>(
        &mut self,
        instance: &str,
        func: &str,
    ) -> R {
        let (_, exported_instance) = self
            .instance
            .get_export(&mut *self.store, None, instance)
            .expect("wizer's accessor instance is exported");
        let (_, func_index) = self
            .instance
            .get_export(&mut *self.store, Some(&exported_instance), func)
            .expect("wizer's accessor function is exported");
        let func = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, func_index)
            .expect("wizer's accessor has the type it declares");
        func.call_async(&mut *self.store, ())
            .await
            .expect("wizer's accessors do not trap")
            .0
    }
}

impl wasmtime_wizer::ComponentInstanceState for ComponentInstance<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        let list: wasmtime::component::WasmList<u8> = self.call(instance, func).await;
        contents(list.as_le_slice(&*self.store));
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call::<f32>(instance, func).await.to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call::<f64>(instance, func).await.to_bits()
    }
}
