//! OCI registries end to end: a real CNCF distribution registry (Debian's `docker-registry`) on
//! loopback, `edgectl publish` / `deploy` / `push oci://…`, and real `edged` nodes pulling from
//! it — over plain HTTP and TLS with the test's own CA; a layer tampered with in the registry's
//! storage; the registry killed mid-download and restarted; a component in the layout
//! `wkg oci push` writes; and sync falling back to the registry when no peer holds a blob.

mod common;

use std::future::Future;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::fleet::{Fleet, control_section, edgectl_command, new_fleet, ok, refused};
use common::registry::{Registry, TestCa};
use common::{Edged, metric};

fn edged() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edged"))
}

/// A node with no peers that pulls from `registry` (`extra` lines in its `[registry]` table).
fn node(fleet: &Fleet, registry: &Registry, extra: &str) -> Edged {
    Edged::spawn(
        edged(),
        &common::config_text(&format!(
            "{}{}",
            control_section(fleet),
            registry.node_table(extra)
        )),
    )
}

/// `edgectl` as the fleet's operator, talking to `registry` (plain HTTP, or TLS trusting `ca`)
/// and, with `node`, to that node.
fn edgectl(
    fleet: &Fleet,
    registry: &Registry,
    ca: Option<&Path>,
    node: Option<&Edged>,
    args: &[&str],
) -> Output {
    let mut command = edgectl_command();
    command.args(["--identity", fleet.operator.to_str().unwrap()]);
    if let Some(node) = node {
        command.args(["--node", &node.control.unwrap().to_string()]);
    }
    match ca {
        Some(ca) => command.args(["--registry-ca", ca.to_str().unwrap()]),
        None if !registry.tls => command.arg("--plain-http"),
        None => &mut command,
    };
    command.args(args).output().unwrap()
}

/// Publishes `file` as `name@version` under `tag` (x86_64 only, to keep tests quick).
fn publish(
    fleet: &Fleet,
    registry: &Registry,
    file: &Path,
    name: &str,
    version: u64,
    tag: &str,
) -> String {
    ok(edgectl(
        fleet,
        registry,
        None,
        None,
        &[
            "publish",
            file.to_str().unwrap(),
            &registry.reference(tag),
            "--name",
            name,
            "--version",
            &version.to_string(),
            "--target",
            "x86_64",
        ],
    ))
}

fn deploy(fleet: &Fleet, registry: &Registry, node: &Edged, tag: &str) -> Output {
    edgectl(
        fleet,
        registry,
        None,
        Some(node),
        &["deploy", &registry.reference(tag)],
    )
}

/// The body of a 200 answer, or `None`.
async fn body_of(node: &Edged, path: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let response = client.get(node.url(path)).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.text().await.ok()
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, nodes: &[&Edged], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > limit {
            let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// BLAKE3 names of the blobs in `node`'s store.
fn stored_blobs(node: &Edged) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(fanouts) = std::fs::read_dir(node.state_dir().join("state/blobs")) {
        for fanout in fanouts.flatten() {
            for blob in std::fs::read_dir(fanout.path()).unwrap().flatten() {
                names.push(blob.file_name().to_string_lossy().into_owned());
            }
        }
    }
    names
}

/// The registry's manifest at `reference_path` (`REPO/manifests/TAG-or-digest`), as JSON.
async fn registry_json(registry: &Registry, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://{}/v2/{path}", registry.host()))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_deployment_is_pulled_and_served_by_two_nodes_without_peers() {
    let fleet = new_fleet();
    let registry = Registry::start();
    let hello = edged_testkit::guest("hello-http.wasm");
    let out = publish(&fleet, &registry, &hello, "hello", 1, "apps/hello:v1");
    assert!(out.contains("published hello@1"), "{out}");

    // The tag is a CNCF Wasm artifact (what `wkg oci pull` reads): one application/wasm layer,
    // the Wasm config; edged's deployment is a referrer of it, found through the tag schema.
    let wasm = registry_json(&registry, "apps/hello/manifests/v1").await;
    assert_eq!(
        wasm["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    let layers = wasm["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{wasm}");
    assert_eq!(layers[0]["mediaType"], "application/wasm");
    let hello_bytes = std::fs::read(&hello).unwrap();
    assert_eq!(layers[0]["size"], hello_bytes.len());

    let a = node(&fleet, &registry, "");
    let b = node(&fleet, &registry, "");
    for n in [&a, &b] {
        let out = ok(deploy(&fleet, &registry, n, "apps/hello:v1"));
        assert!(out.contains("deployed hello@1 (active)"), "{out}");
        assert!(
            body_of(n, "/hello")
                .await
                .is_some_and(|b| b.contains("hello")),
            "{}",
            n.log()
        );
        assert!(
            n.log()
                .contains("blob pulled from the registry and verified")
        );
        // The source and this node's artifact came from the registry.
        assert_eq!(
            metric(n, "edged_registry_fetches_total{outcome=\"ok\"}").await,
            Some(2.0)
        );
    }
    // `ls` shows it like any deployment; deploying it again pulls nothing.
    let out = ok(deploy(&fleet, &registry, &a, "apps/hello:v1"));
    assert!(out.contains("deployed hello@1"), "{out}");
    assert_eq!(
        metric(&a, "edged_registry_fetches_total{outcome=\"ok\"}").await,
        Some(2.0)
    );

    // A tag that is not there: the operator is told which.
    let err = refused(deploy(&fleet, &registry, &a, "apps/nothing:v1"));
    assert!(err.contains("apps/nothing"), "{err}");
}

/// An older registry tag deployed after a newer one: refused with the way back named, the newer
/// version keeps serving; stored without activation it is taken, and `activate` goes back.
#[tokio::test(flavor = "multi_thread")]
async fn deploying_an_older_tag_never_rolls_the_function_back_by_itself() {
    let fleet = new_fleet();
    let registry = Registry::start();
    // Different content per version: a tag's deployment is found as a referrer of its Wasm, so
    // two tags of the same bytes would resolve to the same (newest) deployment.
    let v1 = edged_testkit::guest("hello-http.wasm");
    let v2 = edged_testkit::guest("p3-hello.wasm");
    publish(&fleet, &registry, &v1, "r0", 1, "apps/r0:v1");
    publish(&fleet, &registry, &v2, "r0", 2, "apps/r0:v2");
    let a = node(&fleet, &registry, "");
    ok(deploy(&fleet, &registry, &a, "apps/r0:v1"));
    ok(deploy(&fleet, &registry, &a, "apps/r0:v2"));
    let err = refused(deploy(&fleet, &registry, &a, "apps/r0:v1"));
    assert!(
        err.contains("r0@1 is older than version 2, which is active")
            && err.contains("edgectl activate r0@1"),
        "{err}"
    );
    // `ls`: NAME VERSION ACTIVE ...; version 2 still carries the star.
    let ls = ok(edgectl(&fleet, &registry, None, Some(&a), &["ls"]));
    let active: Vec<Vec<&str>> = ls
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.first() == Some(&"r0") && cols.get(2) == Some(&"*"))
        .collect();
    assert_eq!(active.len(), 1, "{ls}");
    assert_eq!(active[0][1], "2", "{ls}");
    assert!(body_of(&a, "/r0").await.is_some(), "{}", a.log());
    // On purpose: activate names the version.
    ok(edgectl(
        &fleet,
        &registry,
        None,
        Some(&a),
        &["activate", "r0@1"],
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_tampered_with_in_the_registry_is_refused_and_the_node_keeps_serving() {
    let fleet = new_fleet();
    let registry = Registry::start();
    let node = node(&fleet, &registry, "");
    publish(
        &fleet,
        &registry,
        &edged_testkit::guest("hello-http.wasm"),
        "app",
        1,
        "apps/app:v1",
    );
    ok(deploy(&fleet, &registry, &node, "apps/app:v1"));
    assert!(body_of(&node, "/app").await.is_some());

    // Version 2 (another guest); its x86_64 artifact is altered in the registry's storage.
    let probe = edged_testkit::guest("probe-p1.wasm");
    let out = publish(&fleet, &registry, &probe, "app", 2, "apps/app:v2");
    assert!(out.contains("published app@2"), "{out}");
    let wasm = registry_json(&registry, "apps/app/manifests/v2").await;
    let subject = wasm_digest(&registry, "apps/app", "v2").await;
    let index = registry_json(
        &registry,
        &format!("apps/app/manifests/{}", subject.replacen(':', "-", 1)),
    )
    .await;
    let referrer_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let referrer = registry_json(&registry, &format!("apps/app/manifests/{referrer_digest}")).await;
    assert_eq!(referrer["subject"]["digest"], subject, "{wasm}");
    let cwasm = referrer["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.edged.cwasm.v1")
        .unwrap();
    let blake3 = cwasm["annotations"]["dev.edged.blake3"]
        .as_str()
        .unwrap()
        .to_string();
    let file = registry.blob_file(cwasm["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let err = refused(deploy(&fleet, &registry, &node, "apps/app:v2"));
    assert!(err.contains(&blake3) && err.contains("refused"), "{err}");
    assert!(err.contains("nothing was stored"), "{err}");
    assert!(
        !stored_blobs(&node).contains(&blake3),
        "the tampered blob was stored"
    );
    assert_eq!(
        node.partial_bytes("registry-"),
        0,
        "the tampered download was kept"
    );
    assert_eq!(
        metric(&node, "edged_registry_fetches_total{outcome=\"bad_data\"}").await,
        Some(1.0)
    );
    // Version 1 still serves.
    assert!(
        body_of(&node, "/app")
            .await
            .is_some_and(|b| b.contains("hello"))
    );
}

/// The digest of the manifest at `repo:tag`.
async fn wasm_digest(registry: &Registry, repo: &str, tag: &str) -> String {
    let response = reqwest::Client::new()
        .head(format!(
            "http://{}/v2/{repo}/manifests/{tag}",
            registry.host()
        ))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_resumes_after_the_registry_is_killed_and_restarted() {
    let fleet = new_fleet();
    let mut registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, edged_testkit::big_module(12 << 20, 7)).unwrap();
    publish(&fleet, &registry, &big, "big", 1, "apps/big:v1");
    // The node's own download cap (6 MB/s for ~24 MB) leaves seconds to interrupt it in.
    let node = node(&fleet, &registry, "max_rate_mb = 6");

    let deploying = {
        let (fleet_op, reference, control) = (
            fleet.operator.clone(),
            registry.reference("apps/big:v1"),
            node.control.unwrap().to_string(),
        );
        std::thread::spawn(move || {
            edgectl_command()
                .args(["--identity", fleet_op.to_str().unwrap()])
                .args(["--node", &control, "--plain-http", "deploy", &reference])
                .output()
                .unwrap()
        })
    };
    wait_for(
        "part of the download",
        Duration::from_secs(60),
        &[&node],
        || async { node.partial_bytes("registry-") > 2 << 20 },
    )
    .await;
    registry.kill();
    let kept = node.partial_bytes("registry-");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Serving goes on while the registry is away.
    let (status, _) = common::get(&node.url("/healthz")).await;
    assert_eq!(status, 200);
    registry.restart();
    let out = ok(deploying.join().unwrap());
    assert!(out.contains("deployed big@1"), "{out}");
    let log = node.log();
    assert!(log.contains("registry download interrupted"), "{log}");
    assert!(log.contains("resuming a registry download"), "{log}");
    assert!(kept > 2 << 20);
    assert!(body_of(&node, "/big").await.is_some(), "{log}");
    // What was kept was not fetched again: about one copy of each blob crossed.
    let fetched = metric(&node, "edged_registry_fetched_bytes_total")
        .await
        .unwrap();
    let sizes: f64 = stored_blobs(&node)
        .iter()
        .map(|h| {
            std::fs::metadata(node.state_dir().join("state/blobs").join(&h[..2]).join(h))
                .unwrap()
                .len() as f64
        })
        .sum();
    assert!(
        fetched <= sizes * 1.05,
        "fetched {fetched} bytes for {sizes} bytes of blobs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_another_tool_pushed_is_compiled_signed_and_pushed() {
    let fleet = new_fleet();
    let registry = Registry::start();
    // Lay it out the way `wkg oci push` does (CNCF Wasm OCI artifact), with the same crate.
    let hello = std::fs::read(edged_testkit::guest("hello-http.wasm")).unwrap();
    let reference =
        edged_control::registry::parse_reference(&registry.reference("wkg/hello:1.0.0")).unwrap();
    let client = edged_control::registry::RegistryClient::new(&edged_control::registry::Access {
        plain_http: true,
        ..Default::default()
    })
    .unwrap();
    client
        .push_wasm(&reference, &hello, Some("wkg".into()))
        .await
        .unwrap();
    let config_digest =
        registry_json(&registry, "wkg/hello/manifests/1.0.0").await["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string();
    let config: serde_json::Value = reqwest::get(format!(
        "http://{}/v2/wkg/hello/blobs/{config_digest}",
        registry.host()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (config["architecture"].as_str(), config["os"].as_str()),
        (Some("wasm"), Some("wasip2"))
    );
    assert!(
        config["component"]["exports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e
                .as_str()
                .unwrap()
                .starts_with("wasi:http/incoming-handler")),
        "{config}"
    );

    let node = node(&fleet, &registry, "");
    let out = ok(edgectl(
        &fleet,
        &registry,
        None,
        Some(&node),
        &[
            "push",
            &registry.reference("wkg/hello:1.0.0"),
            "--target",
            "x86_64",
        ],
    ));
    assert!(out.contains("pushed hello@1"), "{out}");
    assert!(
        body_of(&node, "/hello")
            .await
            .is_some_and(|b| b.contains("hello"))
    );

    // Not a Wasm artifact (an edged referrer index is not one either): refused, named.
    let err = refused(edgectl(
        &fleet,
        &registry,
        None,
        Some(&node),
        &["push", &registry.reference("wkg/absent:1"), "--name", "x"],
    ));
    assert!(err.contains("wkg/absent"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_the_tests_own_ca_and_credentials_that_never_show() {
    let fleet = new_fleet();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let registry = Registry::start_with(Some(&ca));
    let secret = "hunter2-correct-horse";
    let credentials = dir.path().join("registry-credentials");
    std::fs::write(&credentials, format!("ci-bot:{secret}\n")).unwrap();

    // Without the CA, the registry's certificate is not trusted.
    let err = refused(edgectl(
        &fleet,
        &registry,
        None,
        None,
        &[
            "publish",
            edged_testkit::guest("hello-http.wasm").to_str().unwrap(),
            &registry.reference("apps/hello:v1"),
            "--name",
            "hello",
            "--target",
            "x86_64",
        ],
    ));
    assert!(
        err.to_lowercase().contains("cert") || err.contains("error sending request"),
        "{err}"
    );
    ok(edgectl(
        &fleet,
        &registry,
        Some(&ca.ca_pem),
        None,
        &[
            "publish",
            edged_testkit::guest("hello-http.wasm").to_str().unwrap(),
            &registry.reference("apps/hello:v1"),
            "--name",
            "hello",
            "--target",
            "x86_64",
        ],
    ));
    let node = Edged::spawn(
        {
            let mut c = edged();
            c.env("EDGED_LOG", "debug");
            c
        },
        &common::config_text(&format!(
            "{}{}",
            control_section(&fleet),
            registry.node_table(&format!(
                "ca_file = {:?}\ncredentials_file = {:?}",
                ca.ca_pem.display().to_string(),
                credentials.display().to_string()
            ))
        )),
    );
    let out = ok(edgectl(
        &fleet,
        &registry,
        Some(&ca.ca_pem),
        Some(&node),
        &["deploy", &registry.reference("apps/hello:v1")],
    ));
    assert!(out.contains("deployed hello@1"), "{out}");
    assert!(body_of(&node, "/hello").await.is_some());
    let status = ok(edgectl(&fleet, &registry, None, Some(&node), &["status"]));
    assert!(
        status.contains(&format!(
            "registry    https://{} (with credentials)",
            registry.host()
        )),
        "{status}"
    );
    let json = ok(edgectl(
        &fleet,
        &registry,
        None,
        Some(&node),
        &["--json", "status"],
    ));
    for text in [node.log(), status, json] {
        assert!(
            !text.contains(secret),
            "the registry password leaked:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_synced_deployment_takes_what_no_peer_holds_from_the_registry() {
    let fleet = new_fleet();
    let registry = Registry::start();
    // Published for both targets. The first node keeps only its own target's artifact, so no
    // peer holds the aarch64 one the second node keeps to relay: it comes from the registry.
    ok(edgectl(
        &fleet,
        &registry,
        None,
        None,
        &[
            "publish",
            edged_testkit::guest("hello-http.wasm").to_str().unwrap(),
            &registry.reference("apps/hello:v1"),
            "--name",
            "hello",
        ],
    ));
    let table = registry.node_table("");
    let a = Edged::spawn(
        edged(),
        &common::fleet::sync_node_config(&fleet, "a", &[], "", &table)
            .replace("[node]\n", "[node]\nkeep_targets = [\"x86_64\"]\n"),
    );
    let b = Edged::spawn(
        edged(),
        &common::fleet::sync_node_config(&fleet, "b", &[a.control.unwrap()], "", &table),
    );
    ok(deploy(&fleet, &registry, &a, "apps/hello:v1"));
    wait_for(
        "b to serve hello",
        Duration::from_secs(60),
        &[&a, &b],
        || async { body_of(&b, "/hello").await.is_some() },
    )
    .await;
    // b took the source and its artifact from a (a peer), and only the aarch64 artifact from
    // the registry.
    wait_for(
        "b to pull the aarch64 artifact",
        Duration::from_secs(30),
        &[&b],
        || async { metric(&b, "edged_registry_fetches_total{outcome=\"ok\"}").await == Some(1.0) },
    )
    .await;
    assert!(metric(&b, "edged_sync_fetches_total{outcome=\"ok\"}").await >= Some(2.0));
}

#[test]
fn check_config_names_registry_files_it_cannot_use() {
    let fleet = new_fleet();
    let dir = tempfile::tempdir().unwrap();
    let (credentials, ca) = (dir.path().join("creds"), dir.path().join("ca.pem"));
    std::fs::write(&credentials, "no colon\n").unwrap();
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let config = dir.path().join("edged.toml");
    std::fs::write(
        &config,
        common::config_text(&format!(
            "{}[registry]\nurl = \"https://127.0.0.1:5000\"\ncredentials_file = {:?}\nca_file = {:?}\n",
            control_section(&fleet),
            credentials.display().to_string(),
            ca.display().to_string()
        )),
    )
    .unwrap();
    let out = edged().arg("check-config").arg(&config).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("[registry] credentials_file") && text.contains("USERNAME:PASSWORD"),
        "{text}"
    );
    assert!(
        text.contains("[registry] ca_file") && text.contains("no PEM certificate"),
        "{text}"
    );
}
