//! The QUIC control plane end to end: real `edged` and real `edgectl` processes, real
//! certificates from `edgectl init`, real guests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::fleet::{
    control_section, edgectl, edgectl_command, new_fleet, ok, push_x86_64, refused,
};
use common::{Edged, get, guest};
use edged_testkit::big_module;

#[tokio::test(flavor = "multi_thread")]
async fn push_serve_upgrade_and_roll_back_without_dropped_requests() {
    let fleet = new_fleet();
    let edged = Edged::start(&control_section(&fleet));
    let op = fleet.operator.clone();

    let out = ok(edgectl(
        &op,
        &edged,
        &[
            "push",
            guest("hello-http.wasm").trim_matches('"'),
            "--name",
            "app",
        ],
    ));
    assert!(out.contains("pushed app@1 (active)"), "{out}");
    assert_eq!(
        get(&edged.url("/app/x")).await,
        (200, "hello from edged: /app/x\n".into())
    );

    // Keep requests flowing through the upgrade and the rollback.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, served, failed, url) = (
            stop.clone(),
            served.clone(),
            failed.clone(),
            edged.url("/app?key=7"),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => served.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let out = ok(edgectl(
        &op,
        &edged,
        &[
            "push",
            guest("init-heavy-http.wasm").trim_matches('"'),
            "--name",
            "app",
        ],
    ));
    assert!(out.contains("pushed app@2 (active)"), "{out}");
    let (status, body) = get(&edged.url("/app?key=7")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("table[7] = "), "{body}");

    let out = ok(edgectl(&op, &edged, &["rollback", "app"]));
    assert!(out.contains("rolled back from 2 to 1"), "{out}");
    assert_eq!(
        get(&edged.url("/app/y")).await,
        (200, "hello from edged: /app/y\n".into())
    );

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 10, "the load never ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests were dropped during the switch"
    );

    let listing: serde_json::Value =
        serde_json::from_str(&ok(edgectl(&op, &edged, &["--json", "ls"]))).unwrap();
    let items = listing["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(
        items
            .iter()
            .any(|d| d["version"] == 1 && d["active"] == true)
    );
    assert!(items.iter().all(|d| d["signer"].is_string()));

    let out = ok(edgectl(
        &op,
        &edged,
        &["invoke", "app", "--path", "/app/cli"],
    ));
    assert_eq!(out, "hello from edged: /app/cli\n");
    assert!(ok(edgectl(&op, &edged, &["status"])).contains("x86_64-unknown-linux-gnu"));
    assert!(refused(edgectl(&op, &edged, &["rm", "app@1"])).contains("is active"));
    ok(edgectl(&op, &edged, &["activate", "app@2"]));
    ok(edgectl(&op, &edged, &["rm", "app@1"]));
    let (_, body) = get(&edged.url("/app?key=7")).await;
    assert!(body.starts_with("table[7] = "), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_identities_and_bad_manifests_are_refused_and_store_nothing() {
    let fleet = new_fleet();
    let stranger = new_fleet();
    let edged = Edged::start(&control_section(&fleet));
    let hello = guest("hello-http.wasm");
    let hello = hello.trim_matches('"');

    // A client certificate from another fleet's CA: the handshake fails.
    let err = refused(edgectl(&stranger.operator, &edged, &["ls"]));
    assert!(err.contains("connecting to"), "{err}");

    // A node certificate may not push.
    let as_node = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("node.pem", "operator.pem"),
        ("node.key", "operator.key"),
    ] {
        std::fs::copy(fleet.node.join(from), as_node.path().join(to)).unwrap();
    }
    std::fs::copy(
        fleet.operator.join("signing.key"),
        as_node.path().join("signing.key"),
    )
    .unwrap();
    let err = refused(edgectl(
        as_node.path(),
        &edged,
        &["push", hello, "--name", "app"],
    ));
    assert!(err.contains("node certificates may only sync"), "{err}");

    // A manifest signed by a key the node does not trust.
    let wrong_key = tempfile::tempdir().unwrap();
    for file in ["ca.pem", "operator.pem", "operator.key"] {
        std::fs::copy(fleet.operator.join(file), wrong_key.path().join(file)).unwrap();
    }
    std::fs::copy(
        stranger.operator.join("signing.key"),
        wrong_key.path().join("signing.key"),
    )
    .unwrap();
    let err = refused(edgectl(
        wrong_key.path(),
        &edged,
        &["push", hello, "--name", "app"],
    ));
    assert!(err.contains("does not trust"), "{err}");

    // Rollback attack: an older version than the newest seen.
    ok(edgectl(
        &fleet.operator,
        &edged,
        &["push", hello, "--name", "app", "--version", "5"],
    ));
    let err = refused(edgectl(
        &fleet.operator,
        &edged,
        &["push", hello, "--name", "app", "--version", "3"],
    ));
    assert!(err.contains("not newer than version 5"), "{err}");

    // Raw protocol abuse from a legitimate operator connection.
    let raw = raw::RawClient::connect(&fleet.operator, edged.control.unwrap()).await;
    let key = edged_control::signing::signing_key_from_hex(
        &std::fs::read_to_string(fleet.operator.join("signing.key")).unwrap(),
    )
    .unwrap();
    let compiled = edged_compiler::compile(
        &std::fs::read(guest("trap.wat").trim_matches('"')).unwrap(),
        &edged_compiler::CompileOptions::default(),
    )
    .unwrap();
    let manifest = edged_artifacts::Manifest::from_compiled("raw", 1, 0, &compiled);
    let unsigned = edged_control::SignedManifest {
        payload: manifest.clone(),
        signer: String::new(),
        signature: String::new(),
    };
    let answer = raw
        .call(&edged_control::wire::Request::Offer {
            manifest: Box::new(unsigned),
        })
        .await;
    assert!(
        format!("{answer:?}").contains("is not signed"),
        "{answer:?}"
    );
    let mut tampered = edged_control::SignedManifest::sign(manifest.clone(), &key);
    tampered.payload.version = 2;
    let answer = raw
        .call(&edged_control::wire::Request::Offer {
            manifest: Box::new(tampered),
        })
        .await;
    assert!(
        format!("{answer:?}").contains("bad signature"),
        "{answer:?}"
    );

    // A blob whose bytes do not match its hash.
    let signed = edged_control::SignedManifest::sign(manifest.clone(), &key);
    let answer = raw
        .call(&edged_control::wire::Request::Offer {
            manifest: Box::new(signed),
        })
        .await;
    assert!(
        matches!(answer, edged_control::wire::Response::Needed { .. }),
        "{answer:?}"
    );
    let mut forged = compiled.source.clone();
    forged.push(0);
    forged.truncate(compiled.source.len());
    forged[10] ^= 0xFF;
    let answer = raw
        .put_blob("raw@1", &manifest.source.blake3, &forged)
        .await;
    assert!(format!("{answer:?}").contains("not to"), "{answer:?}");
    let answer = raw
        .call(&edged_control::wire::Request::Commit {
            manifest_id: "raw@1".into(),
            activate: true,
        })
        .await;
    assert!(
        format!("{answer:?}").contains("missing blobs"),
        "{answer:?}"
    );

    // An oversized frame closes that connection; the node keeps serving.
    let reason = raw.send_oversized_frame().await;
    assert!(reason.contains("exceeds"), "{reason}");

    let listing: serde_json::Value =
        serde_json::from_str(&ok(edgectl(&fleet.operator, &edged, &["--json", "ls"]))).unwrap();
    let names: Vec<String> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("{}@{}", d["name"].as_str().unwrap(), d["version"]))
        .collect();
    assert_eq!(names, vec!["app@5"], "only the legitimate push is stored");
    assert_eq!(get(&edged.url("/app")).await.0, 200);
    let status: serde_json::Value =
        serde_json::from_str(&ok(edgectl(&fleet.operator, &edged, &["--json", "status"]))).unwrap();
    assert_eq!(
        status["status"]["blobs"], 3,
        "source + both targets' artifacts of app@5 (keep_targets), nothing of the refused pushes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_push_reports_throughput_and_resumes_after_a_kill() {
    let fleet = new_fleet();
    let edged = Edged::start(&control_section(&fleet));
    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big.wasm");
    std::fs::write(&big, big_module(50 << 20, 1)).unwrap();

    // The JSON report of an uncapped x86_64-only push of `file` as `name`.
    let push =
        |file: &std::path::Path, name: &str| push_x86_64(&fleet.operator, &edged, file, name);

    // Uncapped, for the throughput figure.
    let report = push(&big, "big");
    eprintln!("50 MB push: {report}");
    assert!(report["sent_bytes"].as_u64().unwrap() > 100 << 20);

    // Capped at 20 MB/s and killed part-way; the second push sends only the rest.
    let other = work.path().join("other.wasm");
    std::fs::write(&other, big_module(50 << 20, 2)).unwrap();
    let mut child = edgectl_command()
        .args(["--identity", fleet.operator.to_str().unwrap()])
        .args(["--node", &edged.control.unwrap().to_string()])
        .args([
            "--json",
            "push",
            other.to_str().unwrap(),
            "--name",
            "other",
            "--target",
            "x86_64",
            "--max-rate",
            "20",
        ])
        .spawn()
        .unwrap();
    let partial_bytes = || edged.partial_bytes("upload-");
    let mut waited = Duration::ZERO;
    while partial_bytes() < 10 << 20 {
        assert!(waited < Duration::from_secs(60), "upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = partial_bytes();
    assert!(
        kept >= 10 << 20,
        "the partial upload must survive the client's death"
    );

    let report = push(&other, "other");
    eprintln!("resumed push: {report}");
    let resumed = report["resumed_bytes"].as_u64().unwrap();
    assert!(
        resumed >= kept - (1 << 20),
        "resumed {resumed} of {kept} partial bytes"
    );
    let total = report["sent_bytes"].as_u64().unwrap() + resumed;
    assert!(total > 100 << 20);
    assert_eq!(
        partial_bytes(),
        0,
        "completed uploads leave no partial files"
    );
    // The resumed deployment is whole: it serves (an empty CGI response) from its 50 MB image.
    assert_eq!(get(&edged.url("/other")).await, (200, String::new()));
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_serve_peers_signed_holdings_and_verified_blob_slices() {
    use edged_control::verified::{open_partial, receive_slice};
    use edged_control::wire::{Request, Response};

    let fleet = new_fleet();
    let edged = Edged::start(&control_section(&fleet));
    ok(edgectl(
        &fleet.operator,
        &edged,
        &[
            "push",
            guest("hello-http.wasm").trim_matches('"'),
            "--name",
            "app",
        ],
    ));
    // A peer: the fleet's node certificate, which may sync but not push.
    let peer = raw::RawClient::connect_as(&fleet.node, "node", edged.control.unwrap()).await;

    let Response::Holdings { items, .. } = peer.call(&Request::Holdings {}).await else {
        panic!("holdings expected");
    };
    assert_eq!(items.len(), 1);
    let held = &items[0];
    assert_eq!(
        (held.name.as_str(), held.version, held.active),
        ("app", 1, true)
    );
    // The source, this node's own artifact and the aarch64 one it keeps to relay.
    assert_eq!(held.blobs.len(), 3, "{held:?}");

    let request = Request::GetManifest {
        name: "app".into(),
        version: 1,
    };
    let Response::Manifest { signed } = peer.call(&request).await else {
        panic!("manifest expected");
    };
    let trusted =
        edged_control::identity::trusted_keys(&[fleet.operator.join("signing.pub")]).unwrap();
    signed.verify(&trusted).unwrap();
    let source = signed.payload.source.clone();
    assert!(held.blobs.contains(&source.blake3));

    // The source as a verified slice, in two legs: a first peer "dies" half-way, the rest
    // resumes from a chunk boundary.
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("partial");
    let (mut partial, _) = open_partial(&path).unwrap();
    let (response, slice) = peer.fetch_blob(&source.blake3, 0).await;
    assert_eq!(response, Response::BlobSlice { size: source.size });
    let cut = &slice[..slice.len() / 2];
    assert!(receive_slice(cut, &source.blake3, source.size, 0, &mut partial, |_| {}).is_err());
    let (mut partial, start) = open_partial(&path).unwrap();
    assert!(start > 0);
    let (_, rest) = peer.fetch_blob(&source.blake3, start).await;
    receive_slice(
        &rest[..],
        &source.blake3,
        source.size,
        start,
        &mut partial,
        |_| {},
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(guest("hello-http.wasm").trim_matches('"')).unwrap()
    );

    // Nothing is served that the node does not hold, and a copy damaged on its disk is refused.
    let (response, _) = peer.fetch_blob(&"0".repeat(64), 0).await;
    assert!(matches!(response, Response::Error { message } if message.contains("not held")));
    let stored = edged
        .state_dir()
        .join("state/blobs")
        .join(&source.blake3[..2])
        .join(&source.blake3);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    let (response, _) = peer.fetch_blob(&source.blake3, 0).await;
    assert!(
        matches!(&response, Response::Error { message } if message.contains("damaged")),
        "{response:?}"
    );
    // Still a node: it answers everything else.
    assert!(matches!(
        peer.call(&Request::Status {}).await,
        Response::Status { .. }
    ));
}

mod raw {
    //! A hand-driven operator connection, for requests `edgectl` would never send.
    use std::net::SocketAddr;
    use std::path::Path;

    use edged_control::FleetIdentity;
    use edged_control::identity::NODE_SERVER_NAME;
    use edged_control::transport::{read_frame, write_frame};
    use edged_control::wire::{Request, Response};

    pub struct RawClient {
        _endpoint: quinn::Endpoint,
        conn: quinn::Connection,
    }

    impl RawClient {
        pub async fn connect(identity: &Path, addr: SocketAddr) -> RawClient {
            RawClient::connect_as(identity, "operator", addr).await
        }

        /// Connects with the certificate `<me>.pem` of `identity` (e.g. a node's).
        pub async fn connect_as(identity: &Path, me: &str, addr: SocketAddr) -> RawClient {
            let fleet = FleetIdentity::load(identity, me).unwrap();
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(fleet.client_config().unwrap());
            let conn = endpoint
                .connect(addr, NODE_SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            RawClient {
                _endpoint: endpoint,
                conn,
            }
        }

        pub async fn call(&self, request: &Request) -> Response {
            let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
            write_frame(&mut send, request).await.unwrap();
            send.finish().unwrap();
            read_frame(&mut recv).await.unwrap()
        }

        pub async fn put_blob(&self, manifest_id: &str, hash: &str, bytes: &[u8]) -> Response {
            let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
            write_frame(
                &mut send,
                &Request::PutBlob {
                    manifest_id: manifest_id.into(),
                    hash: hash.into(),
                    offset: 0,
                },
            )
            .await
            .unwrap();
            send.write_all(bytes).await.unwrap();
            send.finish().unwrap();
            read_frame(&mut recv).await.unwrap()
        }

        /// A sync fetch: the answer, and the raw bytes that follow it.
        pub async fn fetch_blob(&self, hash: &str, start: u64) -> (Response, Vec<u8>) {
            let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
            let request = Request::FetchBlob {
                hash: hash.into(),
                start,
            };
            write_frame(&mut send, &request).await.unwrap();
            send.finish().unwrap();
            let response = read_frame(&mut recv).await.unwrap();
            let rest = recv.read_to_end(256 << 20).await.unwrap();
            (response, rest)
        }

        /// Sends a frame header announcing more than the cap; returns the close reason.
        pub async fn send_oversized_frame(&self) -> String {
            let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
            let len = (edged_control::wire::MAX_FRAME as u32 + 1).to_be_bytes();
            send.write_all(&len).await.unwrap();
            let _ = send.finish();
            let _ = recv.read_to_end(1024).await;
            match self.conn.closed().await {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    String::from_utf8_lossy(&close.reason).into_owned()
                }
                other => other.to_string(),
            }
        }
    }
}
