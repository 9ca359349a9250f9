//! Restore: manifest → cached InstancePre → fresh instance per call, with the recompile path
//! for artifacts that do not fit this engine.

use std::num::NonZeroUsize;
use std::sync::Arc;

use edged_artifacts::{
    Linkers, LoadPath, Manifest, Prepared, RestoreError, Restorer, RuntimeSettings, Store,
    runtime_engine,
};
use edged_compiler::{CompileOptions, EngineSettings, InitPolicy, Target, compile};
use edged_testkit::guest_bytes;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

struct Guest {
    wasi: WasiP1Ctx,
}

fn restorer(store: Arc<Store>, settings: RuntimeSettings) -> Restorer<Guest> {
    let (engine, _) = runtime_engine(&settings).unwrap();
    let mut module = wasmtime::Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut module, |g: &mut Guest| &mut g.wasi).unwrap();
    let linkers = Linkers {
        module,
        component: wasmtime::component::Linker::new(&engine),
    };
    Restorer::new(
        engine,
        settings,
        linkers,
        store,
        NonZeroUsize::new(8).unwrap(),
    )
    .unwrap()
}

/// Runs a p1 command from `prepared` in a fresh store, returning its stdout.
async fn run(restorer: &Restorer<Guest>, prepared: &Prepared<Guest>, query: &str) -> String {
    let Prepared::Module(pre) = prepared else {
        panic!("expected a module")
    };
    let stdout = MemoryOutputPipe::new(1 << 20);
    let wasi = WasiCtxBuilder::new()
        .env("QUERY_STRING", query)
        .stdout(stdout.clone())
        .build_p1();
    let mut store = wasmtime::Store::new(restorer.engine(), Guest { wasi });
    store.set_epoch_deadline(1 << 40);
    let instance = pre.instantiate_async(&mut store).await.unwrap();
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .unwrap();
    start.call_async(&mut store, ()).await.unwrap();
    drop(store);
    String::from_utf8(stdout.contents().to_vec()).unwrap()
}

fn put_all(store: &Store, manifest: &Manifest, compiled: &edged_compiler::Compiled) {
    store.put_compiled(compiled, manifest).unwrap();
}

/// What the guest prints when it initializes itself (no Wizer, JIT): the reference output.
async fn reference_output(query: &str) -> String {
    let settings = RuntimeSettings::default();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let options = CompileOptions {
        init: InitPolicy::Skip,
        targets: vec![Target::host().unwrap()],
        ..CompileOptions::default()
    };
    let compiled = compile(&guest_bytes("init-heavy-p1.wasm"), &options).unwrap();
    let manifest = Manifest::from_compiled("plain", 1, 0, &compiled);
    put_all(&store, &manifest, &compiled);
    let restorer = restorer(store, settings);
    let (prepared, _) = restorer.prepare(&manifest).unwrap();
    run(&restorer, &prepared, query).await
}

#[tokio::test(flavor = "multi_thread")]
async fn preinitialized_guest_restores_and_answers_like_a_cold_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let compiled = compile(
        &guest_bytes("init-heavy-p1.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    let manifest = Manifest::from_compiled("heavy", 1, 0, &compiled);
    put_all(&store, &manifest, &compiled);

    let restorer = restorer(store.clone(), RuntimeSettings::default());
    let (prepared, how) = restorer.prepare(&manifest).unwrap();
    assert_eq!(how, LoadPath::Loaded);
    let (again, how) = restorer.prepare(&manifest).unwrap();
    assert_eq!(how, LoadPath::Cached);
    assert!(Arc::ptr_eq(&prepared, &again));

    let expected = reference_output("key=4242").await;
    assert!(expected.contains("table[4242] = "), "{expected}");
    // Several fresh instances from one InstancePre: each starts from the snapshot.
    for _ in 0..3 {
        assert_eq!(run(&restorer, &prepared, "key=4242").await, expected);
    }
    assert!(
        store
            .compiled(
                &manifest.source.blake3,
                Some("wizer-initialize"),
                restorer.fingerprint()
            )
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_arch_artifact_is_refused_by_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let compiled = compile(
        &guest_bytes("init-heavy-p1.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    let manifest = Manifest::from_compiled("heavy", 1, 0, &compiled);
    put_all(&store, &manifest, &compiled);
    let restorer = restorer(store.clone(), RuntimeSettings::default());
    let foreign = manifest
        .artifacts
        .iter()
        .find(|a| Some(a.target) != Target::host())
        .unwrap();
    let err = match restorer.load_artifact(&foreign.blake3, manifest.kind) {
        Ok(_) => panic!("a foreign-arch artifact loaded"),
        Err(e) => e,
    };
    assert!(matches!(err, RestoreError::Refused { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&foreign.blake3), "{message}");
    assert!(
        message.contains(&format!("compiled for {}", foreign.target)),
        "{message}"
    );
    assert!(store.verify().unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn fingerprint_mismatch_recompiles_from_source_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    // Built by a fleet whose engines use another memory layout than this node.
    let fleet = CompileOptions {
        engine: EngineSettings {
            memory_guard_size: 64 << 20,
            ..EngineSettings::default()
        },
        ..CompileOptions::default()
    };
    let compiled = compile(&guest_bytes("init-heavy-p1.wasm"), &fleet).unwrap();
    let manifest = Manifest::from_compiled("heavy", 1, 0, &compiled);
    put_all(&store, &manifest, &compiled);

    let restorer_a = restorer(store.clone(), RuntimeSettings::default());
    assert!(
        manifest
            .artifact_for(restorer_a.target(), restorer_a.fingerprint())
            .is_none()
    );
    let (prepared, how) = restorer_a.prepare(&manifest).unwrap();
    assert_eq!(how, LoadPath::Recompiled);
    let expected = reference_output("key=7").await;
    assert_eq!(run(&restorer_a, &prepared, "key=7").await, expected);
    let recorded = store
        .compiled(
            &manifest.source.blake3,
            Some("wizer-initialize"),
            restorer_a.fingerprint(),
        )
        .unwrap()
        .expect("the local compile is recorded");

    // A restarted node finds its own compile instead of compiling again.
    let restorer_b = restorer(store.clone(), RuntimeSettings::default());
    let (_, how) = restorer_b.prepare(&manifest).unwrap();
    assert_eq!(how, LoadPath::Loaded);
    // The local artifact counts as referenced by the manifest: gc keeps it.
    store.gc(std::time::Duration::ZERO).unwrap();
    store.read_blob(&recorded).unwrap();
    assert!(store.verify().unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_artifact_falls_back_to_source() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let compiled = compile(
        &guest_bytes("init-heavy-p1.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    let manifest = Manifest::from_compiled("heavy", 1, 0, &compiled);
    put_all(&store, &manifest, &compiled);
    let restorer = restorer(store.clone(), RuntimeSettings::default());
    let own = manifest
        .artifact_for(restorer.target(), restorer.fingerprint())
        .expect("edgectl's artifact fits a default node")
        .clone();
    let path = store.blob_path(&own.blake3);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();

    let err = match restorer.load_artifact(&own.blake3, manifest.kind) {
        Ok(_) => panic!("a corrupt artifact loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("corrupt on disk"), "{err}");
    let (prepared, how) = restorer.prepare(&manifest).unwrap();
    assert_eq!(how, LoadPath::Recompiled);
    assert_eq!(
        run(&restorer, &prepared, "key=1").await,
        reference_output("key=1").await
    );
}
