//! Middleware chains end to end: [auth, header] in front of the p3 hello, pushed with
//! `edgectl push --middleware` or declared with `middleware = [...]` in the node config, served
//! by a real `edged` as one composed component; through a node restart and peer sync like any
//! deployment; and each refusal with its message, nothing pushed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Edged;
use common::fleet::{Fleet, edgectl, new_fleet, ok, refused, sync_node_config};
use edged_testkit::guest;

const TOKEN: &str = "edged-sample-token";
const HELLO: &str = "hello from a wasi:http@0.3.0 component\n";

fn node(fleet: &Fleet, name: &str, peers: &[&Edged]) -> Edged {
    let peers: Vec<SocketAddr> = peers.iter().map(|p| p.control.unwrap()).collect();
    Edged::spawn(
        Command::new(env!("CARGO_BIN_EXE_edged")),
        &sync_node_config(fleet, name, &peers, "", ""),
    )
}

/// Status, the header middleware's header, body of one GET, with `Bearer token` if given.
async fn call(node: &Edged, path: &str, token: Option<&str>) -> (u16, Option<String>, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut request = client.get(node.url(path));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("x-edged-middleware")
        .map(|v| v.to_str().unwrap().to_string());
    (status, header, response.text().await.unwrap())
}

/// The chain's two behaviours: hello's body and the header with the token, auth's 401 (and
/// neither the header nor hello) without it.
async fn assert_chain_serves(node: &Edged, path: &str) {
    let (status, header, body) = call(node, path, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}\n{}", node.log());
    assert_eq!(body, HELLO);
    assert_eq!(header.as_deref(), Some("header"));
    for token in [None, Some("wrong")] {
        let (status, header, body) = call(node, path, token).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(
            header, None,
            "the header middleware ran behind a refusing auth"
        );
        assert!(body.starts_with("unauthorized"), "{body}");
    }
}

fn push_chain(
    fleet: &Fleet,
    node: &Edged,
    name: &str,
    app: &str,
    middleware: &[&str],
) -> serde_json::Value {
    let app = guest(app);
    let mut args = vec![
        "--json".to_string(),
        "push".into(),
        app.display().to_string(),
        "--name".into(),
        name.into(),
        "--target".into(),
        "x86_64".into(),
    ];
    for m in middleware {
        args.push("--middleware".into());
        args.push(guest(m).display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(ok(edgectl(&fleet.operator, node, &args)).trim()).unwrap()
}

fn ls(fleet: &Fleet, node: &Edged) -> serde_json::Value {
    serde_json::from_str(ok(edgectl(&fleet.operator, node, &["--json", "ls"])).trim()).unwrap()
}

async fn wait_until_served(node: &Edged, path: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let client = reqwest::Client::new();
        let served = client
            .get(node.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if served {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{path} not served in {limit:?}:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_chain_serves_through_every_part_survives_a_restart_and_syncs_to_a_peer() {
    let fleet = new_fleet();
    let mut a = node(&fleet, "node-a", &[]);
    let b = node(&fleet, "node-b", &[&a]);

    let report = push_chain(
        &fleet,
        &a,
        "app",
        "p3-hello.wasm",
        &["p3-auth.wasm", "p3-header.wasm"],
    );
    // The composite, its x86_64 artifact and the three parts.
    assert_eq!(report["blobs_sent"], 5, "{report}");
    assert_chain_serves(&a, "/app").await;

    // `ls` names the parts, outermost first, with their content addresses.
    let listing = ls(&fleet, &a);
    let app = &listing["items"].as_array().unwrap()[0];
    let parts: Vec<(&str, &str)> = app["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        parts,
        [
            ("p3-auth.wasm", "middleware"),
            ("p3-header.wasm", "middleware"),
            ("p3-hello.wasm", "app")
        ]
    );
    assert_eq!(
        app["parts"][0]["blake3"],
        edged_compiler::content_hash(&std::fs::read(guest("p3-auth.wasm")).unwrap())
    );
    let table = ok(edgectl(&fleet.operator, &a, &["ls"]));
    assert!(
        table.contains("chain: p3-auth.wasm (middleware, ")
            && table.contains("-> p3-hello.wasm (app, "),
        "{table}"
    );

    // The same auth in front of another app is the blob already held: not sent again.
    let report = push_chain(&fleet, &a, "probe", "p3-probe.wasm", &["p3-auth.wasm"]);
    assert_eq!(report["blobs_sent"], 3, "{report}");
    let (status, _, body) = call(&a, "/probe", Some(TOKEN)).await;
    assert_eq!((status, body.as_str()), (200, "requests=1\n"));
    assert_eq!(call(&a, "/probe", None).await.0, 401);

    // A peer fetches the whole deployment (parts included) and serves the chain.
    wait_until_served(&b, "/app", Duration::from_secs(90)).await;
    assert_chain_serves(&b, "/app").await;
    let on_b = ls(&fleet, &b);
    let app_b = on_b["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "app")
        .unwrap();
    assert_eq!(app_b["parts"], app["parts"]);

    // A crash and a restart: the node serves the chain from its store.
    a.crash_and_restart();
    assert_chain_serves(&a, "/app").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_declared_chain_is_composed_by_the_node_with_the_functions_environment() {
    let edged = Edged::start(&format!(
        r#"
[[function]]
name = "app"
wasm = {hello}
route = "/app"
middleware = [{auth}, {header}]
env = {{ AUTH_TOKEN = "s3cret" }}
"#,
        hello = common::guest("p3-hello.wasm"),
        auth = common::guest("p3-auth.wasm"),
        header = common::guest("p3-header.wasm"),
    ));
    let (status, header, body) = call(&edged, "/app", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}\n{}", edged.log());
    assert_eq!((header.as_deref(), body.as_str()), (Some("header"), HELLO));
    // The environment's token replaces the baked-in one.
    assert_eq!(call(&edged, "/app", Some(TOKEN)).await.0, 401);

    // The header middleware's log line reaches the node's log, tagged with the function.
    assert_eq!(call(&edged, "/app/logged?n=1", Some("s3cret")).await.0, 200);
    let logged = |log: &str| {
        log.lines()
            .filter(|l| l.contains("header middleware: Method::Get /app/logged?n=1"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while logged(&edged.log()).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = logged(&edged.log());
    assert_eq!(lines.len(), 1, "{}", edged.log());
    assert!(
        lines[0].contains("edged::guest")
            && lines[0].contains("function=\"app\"")
            && lines[0].contains("stream=\"stderr\""),
        "{}",
        lines[0]
    );
}

/// A component that exports a handler but imports what no node links.
fn foreign_import_part(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kv.wasm");
    // WAT text: edgectl takes it as it takes a binary.
    let text = r#"(component
        (import "acme:kv/store@1.0.0" (instance))
        (instance $h)
        (export "wasi:http/handler@0.3.0" (instance $h)))"#;
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn each_refusal_names_the_part_and_the_reason_and_nothing_is_pushed() {
    let fleet = new_fleet();
    let a = node(&fleet, "node-a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let kv = foreign_import_part(dir.path());
    let path = |file: &str| guest(file).display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                path("p3-hello.wasm"),
                "--middleware".into(),
                path("init-heavy-p1.wasm"),
            ],
            "middleware `init-heavy-p1.wasm` (part 1 of 2): it is a core module (WASI preview 1), not a wasi:http 0.3 component",
        ),
        (
            vec![
                path("hello-http.wasm"),
                "--middleware".into(),
                path("p3-auth.wasm"),
            ],
            "app `hello-http.wasm` (part 2 of 2): it is a wasi:http 0.2 component",
        ),
        (
            vec![
                path("p3-hello.wasm"),
                "--middleware".into(),
                path("p3-auth.wasm"),
                "--middleware".into(),
                path("p3-echo.wasm"),
            ],
            "middleware `p3-echo.wasm` (part 2 of 3): it does not import `wasi:http/handler@0.3.x`",
        ),
        (
            vec![
                path("p3-header.wasm"),
                "--middleware".into(),
                path("p3-auth.wasm"),
            ],
            "app `p3-header.wasm` (part 2 of 2): it imports `wasi:http/handler@0.3.0`, which the chain cannot satisfy",
        ),
        (
            vec![
                kv.display().to_string(),
                "--middleware".into(),
                path("p3-auth.wasm"),
            ],
            "app `kv.wasm` (part 2 of 2): it imports `acme:kv/store@1.0.0`, which neither the chain nor a node provides",
        ),
        (
            vec![
                "oci://127.0.0.1:9/apps/hello:1".into(),
                "--middleware".into(),
                path("p3-auth.wasm"),
            ],
            "oci://127.0.0.1:9/apps/hello:1: a chain is composed from local files",
        ),
    ];
    for (inputs, message) in cases {
        let mut args = vec!["push", "--name", "app", "--target", "x86_64"];
        args.extend(inputs.iter().map(String::as_str));
        let stderr = refused(edgectl(&fleet.operator, &a, &args));
        assert!(stderr.contains(message), "{args:?}:\n{stderr}");
    }
    // `edgectl build` refuses the same way.
    let out = dir.path().join("out");
    let output = common::fleet::edgectl_command()
        .args([
            "build",
            &path("p3-hello.wasm"),
            "--middleware",
            &path("hello-http.wasm"),
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = refused(output);
    assert!(
        stderr.contains(
            "middleware `hello-http.wasm` (part 1 of 2): it is a wasi:http 0.2 component"
        ),
        "{stderr}"
    );
    assert!(!out.exists());
    assert_eq!(ls(&fleet, &a)["items"], serde_json::json!([]));
}
