//! Middleware chains at the compiler level: [auth, header] in front of the p3 hello composes,
//! deterministically, into a component that wasmtime's own `wasi:http@0.3` host serves with
//! the chain's behaviour; every refusal names the part and the reason.

use edged_compiler::{
    CompileOptions, ComposeError, Composed, PartInput, PartRole, Refusal, Target, base_config,
    compile_chain, component_exports, component_imports, compose_chain, node_provides,
};
use edged_testkit::guest_bytes;
use http_body_util::{BodyExt, Empty};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p3::Request;
use wasmtime_wasi_http::p3::bindings::Service;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

fn part<'a>(name: &'a str, bytes: &'a [u8]) -> PartInput<'a> {
    PartInput { name, bytes }
}

fn host_only() -> CompileOptions {
    CompileOptions {
        targets: vec![Target::host().expect("a supported host")],
        ..CompileOptions::default()
    }
}

struct Guests {
    auth: Vec<u8>,
    header: Vec<u8>,
    hello: Vec<u8>,
}

impl Guests {
    /// [auth, header, hello] composed for this host.
    fn sample_chain(&self) -> Composed {
        compose_chain(
            &[
                part("auth.wasm", &self.auth),
                part("header.wasm", &self.header),
            ],
            part("hello.wasm", &self.hello),
            &host_only(),
        )
        .unwrap()
    }
}

fn guests() -> Guests {
    Guests {
        auth: guest_bytes("p3-auth.wasm"),
        header: guest_bytes("p3-header.wasm"),
        hello: guest_bytes("p3-hello.wasm"),
    }
}

#[test]
fn the_composite_exports_one_handler_and_imports_only_what_a_node_provides() {
    let g = guests();
    let composed = g.sample_chain();
    assert_eq!(
        component_exports(&composed.bytes),
        ["wasi:http/handler@0.3.0"]
    );
    let imports = component_imports(&composed.bytes);
    assert!(
        imports.iter().any(|i| i == "wasi:http/types@0.3.0"),
        "{imports:?}"
    );
    for import in &imports {
        assert!(node_provides(import), "composite imports {import}");
    }
    let roles: Vec<_> = composed
        .parts
        .iter()
        .map(|p| (p.name.as_str(), p.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("auth.wasm", PartRole::Middleware),
            ("header.wasm", PartRole::Middleware),
            ("hello.wasm", PartRole::App)
        ]
    );
    assert_eq!(
        composed.parts[0].blake3,
        edged_compiler::content_hash(&g.auth)
    );
}

#[test]
fn composing_and_compiling_are_deterministic() {
    let g = guests();
    let options = CompileOptions::default();
    let build = || {
        compile_chain(
            &[part("auth.wasm", &g.auth), part("header.wasm", &g.header)],
            part("hello.wasm", &g.hello),
            &options,
        )
        .unwrap()
    };
    let (a, ca) = build();
    let (b, cb) = build();
    assert!(ca.bytes == cb.bytes, "composite differs between two runs");
    assert!(a.source == ca.bytes);
    assert_eq!(a.artifacts.len(), 2);
    for (x, y) in a.artifacts.iter().zip(&b.artifacts) {
        assert_eq!((x.target, &x.blake3), (y.target, &y.blake3));
    }
    // The part names label nothing inside the composite: renaming a file changes nothing.
    let renamed = compose_chain(
        &[part("a.wasm", &g.auth), part("h.wasm", &g.header)],
        part("app.wasm", &g.hello),
        &options,
    )
    .unwrap();
    assert!(renamed.bytes == ca.bytes);
    // Another order is another program.
    let swapped = compose_chain(
        &[part("header.wasm", &g.header), part("auth.wasm", &g.auth)],
        part("hello.wasm", &g.hello),
        &options,
    )
    .unwrap();
    assert!(swapped.bytes != ca.bytes);
}

struct Host {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

/// One request through `component` on wasmtime's own `wasi:http@0.3` host: status, the
/// middleware's header, body.
async fn serve_one(
    engine: &Engine,
    component: &Component,
    authorization: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    wasmtime_wasi::p3::add_to_linker(&mut linker).unwrap();
    wasmtime_wasi_http::p3::add_to_linker(&mut linker).unwrap();
    let mut store = Store::new(
        engine,
        Host {
            wasi: WasiCtx::builder().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        },
    );
    store.set_epoch_deadline(u64::MAX / 2);
    let service = Service::instantiate_async(&mut store, component, &linker)
        .await
        .unwrap();
    let mut request = http::Request::get("http://localhost/hello");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let request = request.body(Empty::<bytes::Bytes>::new()).unwrap();
    let (request, io) = Request::from_http(wasmtime_wasi_http::default_hooks(), request);
    let (response, ()) = store
        .run_concurrent(async |store| {
            let response = async {
                let response = service.handle(store, request).await.unwrap().unwrap();
                let response = store
                    .with(|store| response.into_http(store, async { Ok(()) }))
                    .unwrap();
                let (parts, body) = response.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                (parts, body)
            };
            tokio::join!(response, async { io.await.unwrap() })
        })
        .await
        .unwrap();
    let header = response
        .0
        .headers
        .get("x-edged-middleware")
        .map(|v| v.to_str().unwrap().to_string());
    (
        response.0.status.as_u16(),
        header,
        String::from_utf8_lossy(&response.1).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn wasmtime_serves_the_composite_as_the_chain() {
    let g = guests();
    let composed = g.sample_chain();
    let target = Target::host().unwrap();
    let engine = Engine::new(&base_config(target, &Default::default()).unwrap()).unwrap();
    let component = Component::new(&engine, &composed.bytes).unwrap();

    let (status, header, body) =
        serve_one(&engine, &component, Some("Bearer edged-sample-token")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header.as_deref(), Some("header"));
    assert_eq!(body, "hello from a wasi:http@0.3.0 component\n");

    // Auth answers: the header middleware and hello never run (no header on the way back).
    for wrong in [None, Some("Bearer nope"), Some("edged-sample-token")] {
        let (status, header, body) = serve_one(&engine, &component, wrong).await;
        assert_eq!(status, 401, "{wrong:?}: {body}");
        assert_eq!(header, None);
        assert!(body.starts_with("unauthorized"), "{body}");
    }
}

fn refusal(middleware: &[(&str, &[u8])], app: (&str, &[u8])) -> (String, PartRole, Refusal) {
    let middleware: Vec<_> = middleware.iter().map(|(n, b)| part(n, b)).collect();
    match compose_chain(&middleware, part(app.0, app.1), &host_only()) {
        Err(ComposeError::Refused {
            name, role, reason, ..
        }) => (name, role, reason),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a composite"),
    }
}

#[test]
fn every_refusal_names_the_part_and_the_reason() {
    let g = guests();
    let p1 = guest_bytes("init-heavy-p1.wasm");
    let p2 = guest_bytes("hello-http.wasm");

    let (name, role, reason) = refusal(&[("old.wasm", &p1)], ("hello.wasm", &g.hello));
    assert_eq!(
        (name.as_str(), role, reason),
        ("old.wasm", PartRole::Middleware, Refusal::CoreModule)
    );

    let (name, role, reason) = refusal(&[("auth.wasm", &g.auth)], ("p2.wasm", &p2));
    assert_eq!(
        (name.as_str(), role, reason),
        ("p2.wasm", PartRole::App, Refusal::HttpP2)
    );

    // A service in a middleware's place: nothing can be plugged behind it.
    let (name, role, reason) = refusal(
        &[("auth.wasm", &g.auth), ("svc.wasm", &g.hello)],
        ("hello.wasm", &g.hello),
    );
    assert_eq!(
        (name.as_str(), role, reason),
        ("svc.wasm", PartRole::Middleware, Refusal::NoHandlerImport)
    );

    // A middleware in the app's place: its handler import would be left to the node.
    let (name, role, reason) = refusal(&[], ("auth.wasm", &g.auth));
    assert_eq!(name, "auth.wasm");
    assert_eq!(role, PartRole::App);
    assert!(
        matches!(reason, Refusal::AppImportsHandler { import } if import == "wasi:http/handler@0.3.0")
    );

    // An app that exports no handler.
    let nothing = wat::parse_str("(component)").unwrap();
    let (_, role, reason) = refusal(&[], ("empty.wasm", &nothing));
    assert_eq!(role, PartRole::App);
    assert_eq!(
        reason,
        Refusal::NoHandlerExport {
            exports: "nothing".into()
        }
    );

    // A part importing something no node links.
    let kv = wat::parse_str(
        r#"(component
            (import "acme:kv/store@1.0.0" (instance))
            (instance $h)
            (export "wasi:http/handler@0.3.0" (instance $h)))"#,
    )
    .unwrap();
    let (name, _, reason) = refusal(&[], ("kv.wasm", &kv));
    assert_eq!(name, "kv.wasm");
    assert!(
        matches!(&reason, Refusal::UnsatisfiedImport { import } if import == "acme:kv/store@1.0.0")
    );

    // The messages say all of it.
    let err = compose_chain(
        &[part("auth.wasm", &g.auth), part("old.wasm", &p1)],
        part("hello.wasm", &g.hello),
        &host_only(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("middleware `old.wasm` (part 2 of 3): it is a core module"),
        "{err}"
    );
    let err = compose_chain(&[], part("kv.wasm", &kv), &host_only())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`acme:kv/store@1.0.0`, which neither the chain nor a node provides"),
        "{err}"
    );
}
