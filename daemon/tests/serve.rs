//! End-to-end: a real `edged` on loopback, real HTTP, real guests built from `guests/`.

mod common;

use std::time::Duration;

use common::{Edged, get, get_with_host, guest, post};

#[tokio::test(flavor = "multi_thread")]
async fn serves_both_guest_kinds_with_routing() {
    let edged = Edged::start(&format!(
        r#"
[[function]]
name = "hello"
wasm = {hello}
route = "/hello"

[[function]]
name = "heavy-http"
wasm = {heavy_http}
route = "/heavy"

[[function]]
name = "heavy-cgi"
wasm = {heavy_p1}
route = "/heavy/cgi"

[[function]]
name = "probe"
wasm = {probe}
route = "/probe"

[[function]]
name = "alt"
wasm = {hello}
route = "/"
host = "alt.example"
"#,
        hello = guest("hello-http.wasm"),
        heavy_http = guest("init-heavy-http.wasm"),
        heavy_p1 = guest("init-heavy-p1.wasm"),
        probe = guest("probe-p1.wasm"),
    ));

    let (status, body) = get(&edged.url("/hello/world?x=1")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from edged: /hello/world?x=1\n")
    );

    // A small body goes out whole with a Content-Length; one past the coalescing limit streams.
    let response = reqwest::get(edged.url("/hello/small")).await.unwrap();
    assert_eq!(response.headers()["content-length"], "31");
    assert_eq!(
        response.text().await.unwrap(),
        "hello from edged: /hello/small\n"
    );
    let path = "/hello/big?repeat=20000";
    let response = reqwest::get(edged.url(path)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-length").is_none());
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let body = response.text().await.unwrap();
    let line = format!("hello from edged: {path}\n");
    assert_eq!(body.len(), 20000 * line.len());
    assert!(body.lines().all(|l| l == line.trim_end()));

    // The component and the CGI module build the same table: same answer, both pre-initialized.
    let (status, component) = get(&edged.url("/heavy?key=31337")).await;
    assert_eq!(status, 200, "{component}");
    let (status, cgi) = get(&edged.url("/heavy/cgi?key=31337")).await;
    assert_eq!(status, 200, "{cgi}");
    assert!(component.starts_with("table[31337] = "), "{component}");
    assert_eq!(cgi.lines().next(), component.lines().next());

    // CGI: body on stdin, headers from the guest.
    let response = reqwest::Client::new()
        .post(edged.url("/probe?echo"))
        .body("ping")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-probe"], "1");
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(response.text().await.unwrap(), "echo ping\n");

    assert_eq!(get(&edged.url("/hellox")).await.0, 404);
    assert_eq!(get(&edged.url("/")).await.0, 404);
    let (status, body) = get_with_host(&edged.url("/anything"), "alt.example:8080").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from edged: /anything\n")
    );

    let (_, metrics) = get(&edged.url("/metrics")).await;
    assert!(
        metrics.contains(r#"edged_requests_total{function="hello",status="200"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"edged_cold_loads_total{function="heavy-http",path="loaded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("edged_instantiate_seconds_count{function=\"heavy-cgi\"} 1"),
        "{metrics}"
    );
    assert_eq!(get(&edged.url("/healthz")).await.0, 200);
    assert_eq!(get(&edged.url("/readyz")).await.0, 200);
}

/// A loopback upstream for the outbound-HTTP tests.
async fn upstream() -> std::net::SocketAddr {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"upstream says hi")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_are_denied_unless_granted() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("a.txt"), "granted data").unwrap();
    let upstream = upstream().await;
    let edged = Edged::start_with_env(
        &format!(
            r#"
[[function]]
name = "granted"
wasm = {probe}
route = "/granted"
env = {{ GREETING = "hi" }}
[[function.dirs]]
host = {data:?}
guest = "/data"

[[function]]
name = "bare"
wasm = {probe}
route = "/bare"

[[function]]
name = "out-allowed"
wasm = {outbound}
route = "/out-allowed"
outbound_hosts = ["127.0.0.1"]

[[function]]
name = "out-denied"
wasm = {outbound}
route = "/out-denied"
"#,
            probe = guest("probe-p1.wasm"),
            outbound = guest("outbound-http.wasm"),
            data = data.path().display().to_string(),
        ),
        &[("EDGED_TEST_SECRET", "must-not-leak")],
    );

    let (_, body) = get(&edged.url(
        "/granted?read=/data/a.txt&write=/data/b.txt&env=GREETING&env=EDGED_TEST_SECRET&env_count",
    ))
    .await;
    assert!(body.contains("read ok: granted data"), "{body}");
    assert!(
        body.contains("write error:"),
        "read-only grant must refuse writes: {body}"
    );
    assert!(body.contains("env GREETING=hi"), "{body}");
    assert!(body.contains("env EDGED_TEST_SECRET unset"), "{body}");
    assert!(body.contains("env_count 1"), "{body}");
    assert!(!data.path().join("b.txt").exists());

    let (status, body) = get(&edged.url("/bare?read=/data/a.txt&env=GREETING&env_count")).await;
    assert_eq!(
        status, 200,
        "a denied capability fails inside the guest, not the request"
    );
    assert!(body.contains("read error:"), "{body}");
    assert!(body.contains("env GREETING unset"), "{body}");
    assert!(body.contains("env_count 0"), "{body}");

    let target = format!("http://{upstream}/");
    let (status, body) = get(&edged.url(&format!("/out-allowed?url={target}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "upstream 200: upstream says hi")
    );
    let (status, body) = get(&edged.url(&format!("/out-denied?url={target}"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "denied: ErrorCode::HttpRequestDenied");
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_end_one_request_and_nothing_else() {
    let edged = Edged::start(&format!(
        r#"
[[function]]
name = "hello"
wasm = {hello}
route = "/hello"

[[function]]
name = "loop"
wasm = {looping}
route = "/loop"
[function.limits]
timeout_ms = 1500

[[function]]
name = "bomb"
wasm = {bomb}
route = "/bomb"
[function.limits]
memory_mib = 32

[[function]]
name = "trap"
wasm = {trap}
route = "/trap"

[[function]]
name = "recursion"
wasm = {recursion}
route = "/recursion"

[[function]]
name = "single"
wasm = {looping}
route = "/single"
[function.limits]
timeout_ms = 1500
max_concurrency = 1

[[function]]
name = "small-body"
wasm = {probe}
route = "/small"
[function.limits]
max_body_kib = 1
"#,
        hello = guest("hello-http.wasm"),
        looping = guest("infinite-loop.wat"),
        bomb = guest("memory-bomb.wat"),
        trap = guest("trap.wat"),
        recursion = guest("deep-recursion.wat"),
        probe = guest("probe-p1.wasm"),
    ));

    // The infinite loop runs while hello keeps answering.
    let looping = tokio::spawn(get(edged.url("/loop").leak()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..10 {
        assert_eq!(get(&edged.url("/hello")).await.0, 200);
    }
    assert!(!looping.is_finished(), "the loop should still be running");
    let (status, body) = looping.await.unwrap();
    assert_eq!((status, body.as_str()), (504, "guest fault: deadline\n"));

    assert_eq!(
        get(&edged.url("/bomb")).await,
        (500, "guest fault: oom\n".into())
    );
    assert_eq!(
        get(&edged.url("/trap")).await,
        (500, "guest fault: trap\n".into())
    );
    assert_eq!(
        get(&edged.url("/recursion")).await,
        (500, "guest fault: stack_overflow\n".into())
    );

    // Concurrency cap: the second request is refused at once, not queued.
    let first = tokio::spawn(get(edged.url("/single").leak()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&edged.url("/single")).await.0, 503);
    assert_eq!(first.await.unwrap().0, 504);

    // Body cap, by declared length and by actual bytes.
    assert_eq!(
        post(&edged.url("/small?echo"), vec![b'x'; 2048]).await.0,
        413
    );
    let (status, body) = post(&edged.url("/small?echo"), vec![b'y'; 512]).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), "echo \n".len() + 512);

    assert_eq!(get(&edged.url("/hello")).await.0, 200);
    let (_, metrics) = get(&edged.url("/metrics")).await;
    for kind in ["deadline", "oom", "trap", "stack_overflow"] {
        assert!(
            metrics.contains(&format!("kind=\"{kind}\"")),
            "no {kind} fault in metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"edged_rejected_total{function="single",kind="overloaded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"edged_rejected_total{function="small-body",kind="body_too_large"} 1"#),
        "{metrics}"
    );
    let log = edged.log();
    assert_eq!(
        log.matches("guest fault:").count(),
        5,
        "one log line per fault:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_good_config_and_refuses_bad_one() {
    let hello = format!(
        "[[function]]\nname = \"hello\"\nwasm = {}\nroute = \"/hello\"\n",
        guest("hello-http.wasm")
    );
    let edged = Edged::start(&hello);
    assert_eq!(get(&edged.url("/probe?env=X")).await.0, 404);

    let with_probe = format!(
        "{hello}\n[[function]]\nname = \"probe\"\nwasm = {}\nroute = \"/probe\"\nenv = {{ X = \"1\" }}\n",
        guest("probe-p1.wasm")
    );
    edged.rewrite_config(&with_probe);
    edged.signal(libc::SIGHUP);
    let mut body = String::new();
    for _ in 0..100 {
        let (status, text) = get(&edged.url("/probe?env=X")).await;
        if status == 200 {
            body = text;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(body, "env X=1\n");

    // A config that does not parse is refused; the running set keeps serving.
    edged.write_raw_config("[node]\nhttp_listen = \"127.0.0.1:0\"\nbogus_key = 1\n");
    edged.signal(libc::SIGHUP);
    // One that parses but names a broken .wasm is refused too.
    let broken = edged.state_dir().join("broken.wasm");
    std::fs::write(&broken, b"\0asm\x01\0\0\0\x03\x02\x01\x07").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    edged.rewrite_config(&format!(
        "{hello}\n[[function]]\nname = \"broken\"\nwasm = {:?}\nroute = \"/broken\"\n",
        broken.display().to_string()
    ));
    edged.signal(libc::SIGHUP);
    let mut refused = 0;
    for _ in 0..100 {
        let (_, metrics) = get(&edged.url("/metrics")).await;
        refused = metrics
            .lines()
            .find(|l| l.starts_with("edged_reloads_total{outcome=\"refused\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0);
        if refused == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused, 2, "{}", edged.log());
    assert_eq!(
        get(&edged.url("/probe?env=X")).await,
        (200, "env X=1\n".into())
    );
    assert_eq!(get(&edged.url("/hello")).await.0, 200);
    assert_eq!(get(&edged.url("/broken")).await.0, 404);
    let log = edged.log();
    assert!(log.contains("bogus_key"), "{log}");
    assert!(log.contains("invalid core module"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests() {
    let mut edged = Edged::start(&format!(
        "[[function]]\nname = \"probe\"\nwasm = {}\nroute = \"/probe\"\n",
        guest("probe-p1.wasm")
    ));
    let slow = tokio::spawn(get(edged.url("/probe?sleep_ms=1000").leak()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    edged.signal(libc::SIGTERM);
    let (status, body) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slept 1000 ms\n"));
    let exit = tokio::task::spawn_blocking(move || {
        let status = edged.child.wait().unwrap();
        (status, edged)
    })
    .await
    .unwrap();
    assert!(exit.0.success(), "edged exited with {:?}", exit.0);
    let log = exit.1.log();
    assert!(log.contains("draining in-flight requests"), "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
    assert!(
        reqwest::get(exit.1.url("/probe")).await.is_err(),
        "listener must be closed"
    );
}

#[test]
fn check_config_reports_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[[function]]\nname = \"a\"\nwasm = {}\nroute = \"/a\"\n",
            guest("trap.wat")
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edged"))
        .args(["check-config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (1 function)"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[node]\nhttp_listen = \"nowhere\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edged"))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("{}:2: http_listen", bad.display())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_instance_pool_is_a_503_not_a_guest_fault() {
    // One instance slot for the whole node: while the loop holds it, hello cannot instantiate.
    let edged = Edged::start(&format!(
        r#"
[engine]
total_instances = 1
total_memories = 1

[[function]]
name = "loop"
wasm = {looping}
route = "/loop"
[function.limits]
timeout_ms = 1000

[[function]]
name = "hello"
wasm = {hello}
route = "/hello"
"#,
        looping = guest("infinite-loop.wat"),
        hello = guest("hello-http.wasm"),
    ));
    let looping = tokio::spawn(get(edged.url("/loop").leak()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&edged.url("/hello")).await,
        (503, "guest fault: capacity\n".into())
    );
    assert_eq!(looping.await.unwrap().0, 504);
    // The slot is free again.
    assert_eq!(get(&edged.url("/hello")).await.0, 200);
}
