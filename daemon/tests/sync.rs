//! Peer sync end to end: several real `edged` processes on loopback with their own fleet node
//! certificates, a push to one of them, and the others converging on it — through node deaths,
//! a daemon crash, a frozen node, a different engine fingerprint, and a peer that lies.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::{Fleet, edgectl, new_fleet, ok, push_x86_64, sync_node_config};
use common::{Edged, metric};
use edged_testkit::big_module;

fn edged() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edged"))
}

/// Starts node `name` syncing with `peers`.
fn node(fleet: &Fleet, name: &str, peers: &[&Edged], sync_options: &str, extra: &str) -> Edged {
    let peers: Vec<SocketAddr> = peers.iter().map(|p| p.control.unwrap()).collect();
    Edged::spawn(
        edged(),
        &sync_node_config(fleet, name, &peers, sync_options, extra),
    )
}

/// Polls `check` until it holds, failing with `what` and the nodes' logs after `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, nodes: &[&Edged], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > limit {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| format!("--- {}\n{}", n.state_dir().display(), tail(&n.log())))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The body of a 200 answer, or `None` (an error status, or no answer within 2 s).
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

fn push(fleet: &Fleet, node: &Edged, file: &Path, name: &str) {
    push_x86_64(&fleet.operator, node, file, name);
}

/// Verified bytes of blobs being fetched into `node`'s store (its `tmp/sync-*` files).
fn partial_sync_bytes(node: &Edged) -> u64 {
    node.partial_bytes("sync-")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_one_node_reaches_four_and_a_cut_off_node_catches_up() {
    let fleet = new_fleet();
    // Started in order, each knowing the earlier ones; the earlier ones learn of the later ones
    // when those connect.
    let a = node(&fleet, "node-a", &[], "", "");
    let b = node(&fleet, "node-b", &[&a], "", "");
    let c = node(&fleet, "node-c", &[&a, &b], "", "");
    // Another engine configuration, so another fingerprint: the shipped artifact does not fit.
    let d = node(
        &fleet,
        "node-d",
        &[&a, &b, &c],
        "",
        "[engine]\nmemory_reservation_mib = 2048\n",
    );
    let all = [&a, &b, &c, &d];

    push(&fleet, &a, &edged_testkit::guest("hello-http.wasm"), "app");
    for node in all {
        wait_for(
            "app@1 on every node",
            Duration::from_secs(90),
            &all,
            || async { body_of(node, "/app").await.as_deref() == Some("hello from edged: /app\n") },
        )
        .await;
    }
    // b and c fetched the shipped x86_64 artifact and mapped it; d fetched only the source and
    // compiled for its own fingerprint.
    for node in [&b, &c] {
        let loaded = metric(
            node,
            "edged_cold_loads_total{function=\"app\",path=\"loaded\"}",
        )
        .await;
        assert_eq!(loaded, Some(1.0), "{}", node.log());
    }
    let recompiled = metric(
        &d,
        "edged_cold_loads_total{function=\"app\",path=\"recompiled\"}",
    )
    .await;
    assert_eq!(recompiled, Some(1.0), "{}", d.log());
    assert!(d.log().contains("ships no artifact for this node's engine"));

    // `edgectl status` on d shows where app@1 is and who its peers are.
    wait_for(
        "d to see app@1 on three peers",
        Duration::from_secs(30),
        &all,
        || async {
            let status = ok(edgectl(&fleet.operator, &d, &["--json", "status"]));
            let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
            let sync = &status["status"]["sync"];
            sync["peers"].as_array().map(Vec::len) == Some(3)
                && sync["deployments"].as_array().is_some_and(|d| {
                    d.iter().any(|d| {
                        d["name"] == "app"
                            && d["here"] == true
                            && d["peers"].as_array().map(Vec::len) == Some(3)
                    })
                })
        },
    )
    .await;
    let human = ok(edgectl(&fleet.operator, &d, &["status"]));
    assert!(human.contains("app@1  here: yes"), "{human}");

    // d is cut off (frozen: its sockets stay open, nothing answers) while version 2 is pushed to
    // another node; the rest converge without it.
    d.signal(libc::SIGSTOP);
    push(
        &fleet,
        &b,
        &edged_testkit::guest("init-heavy-http.wasm"),
        "app",
    );
    for node in [&a, &b, &c] {
        wait_for(
            "app@2 on a, b, c",
            Duration::from_secs(90),
            &all,
            || async {
                body_of(node, "/app")
                    .await
                    .is_some_and(|body| body.starts_with("table[0] = "))
            },
        )
        .await;
    }
    assert_eq!(
        body_of(&d, "/app").await,
        None,
        "a frozen node answers nothing"
    );
    // Healed: d catches up by itself.
    d.signal(libc::SIGCONT);
    wait_for(
        "d to catch up on app@2",
        Duration::from_secs(90),
        &all,
        || async {
            body_of(&d, "/app")
                .await
                .is_some_and(|body| body.starts_with("table[0] = "))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_resumes_after_a_crash_and_finishes_from_another_peer_when_its_source_dies() {
    let fleet = new_fleet();
    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big.wasm");
    std::fs::write(&big, big_module(24 << 20, 7)).unwrap();

    let a = node(&fleet, "node-a", &[], "", "");
    push(&fleet, &a, &big, "big");
    let b = node(&fleet, "node-b", &[&a], "", "");
    wait_for(
        "b to sync big",
        Duration::from_secs(90),
        &[&a, &b],
        || async { body_of(&b, "/big").await.is_some() },
    )
    .await;
    let blob_bytes = metric(&b, "edged_sync_fetched_bytes_total").await.unwrap();

    // f fetches at 6 MB/s, from b (fetchers prefer holders other than the node pushed to).
    let mut f = node(&fleet, "node-f", &[&a, &b], "max_rate_mb = 6", "");
    wait_for(
        "f to start fetching",
        Duration::from_secs(60),
        &[&f],
        || async { partial_sync_bytes(&f) >= 8 << 20 },
    )
    .await;
    // The daemon crashes mid-transfer and comes back: it resumes from its verified prefix.
    let before_crash = partial_sync_bytes(&f);
    f.crash_and_restart();
    wait_for("f to resume", Duration::from_secs(60), &[&f], || async {
        f.log().contains("resuming a partial download")
    })
    .await;
    assert!(
        partial_sync_bytes(&f) >= before_crash - (64 << 10),
        "the verified prefix survived the crash"
    );
    wait_for(
        "f to fetch more",
        Duration::from_secs(60),
        &[&f],
        || async { partial_sync_bytes(&f) >= before_crash + (8 << 20) },
    )
    .await;
    // Now the peer it fetches from dies; f finishes from a.
    b.signal(libc::SIGKILL);
    wait_for(
        "f to finish from a",
        Duration::from_secs(120),
        &[&a, &f],
        || async { body_of(&f, "/big").await.is_some() },
    )
    .await;
    // Nothing was fetched twice: what came from a after b died is only the rest.
    let from_a_bytes = metric(
        &f,
        &format!(
            "edged_sync_fetched_bytes_total{{peer=\"{}\"}}",
            a.control.unwrap()
        ),
    )
    .await
    .unwrap();
    assert!(from_a_bytes > 0.0, "f finished from a after b died");
    assert!(
        from_a_bytes < blob_bytes - (12 << 20) as f64,
        "a served {from_a_bytes} of {blob_bytes} bytes"
    );
    assert_eq!(
        partial_sync_bytes(&f),
        0,
        "finished downloads leave no partials"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_serves_the_pieces_it_verified_while_it_still_fetches_the_rest() {
    let fleet = new_fleet();
    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big.wasm");
    std::fs::write(&big, big_module(24 << 20, 11)).unwrap();
    let a = node(&fleet, "node-a", &[], "", "");
    push(&fleet, &a, &big, "big");

    // f fetches at 2 MB/s: it holds part of the blob for about ten seconds.
    let f = node(&fleet, "node-f", &[&a], "max_rate_mb = 2", "");
    wait_for(
        "f to hold some pieces",
        Duration::from_secs(60),
        &[&a, &f],
        || async { partial_sync_bytes(&f) >= 4 << 20 },
    )
    .await;
    // g syncs from a (the origin) and f: the pieces f has verified it takes from f.
    let g = node(&fleet, "node-g", &[&a, &f], "", "");
    let served_to_g = "edged_sync_pieces_served_total{peer=\"node-g\"}";
    wait_for(
        "f to serve g pieces while f is still fetching",
        Duration::from_secs(60),
        &[&a, &f, &g],
        || async {
            // Read in this order: f still holds partials after it served, so it served them
            // before it had the whole blob.
            metric(&f, served_to_g).await.unwrap_or(0.0) > 0.0 && partial_sync_bytes(&f) > 0
        },
    )
    .await;
    assert!(body_of(&f, "/big").await.is_none(), "f was still fetching");
    // An operator sees the piecewise progress.
    let status = ok(edgectl(&fleet.operator, &f, &["status"]));
    assert!(
        status.contains("fetching big@1 blob") && status.contains("pieces"),
        "{status}"
    );
    wait_for(
        "f and g to serve big",
        Duration::from_secs(120),
        &[&a, &f, &g],
        || async { body_of(&f, "/big").await.is_some() && body_of(&g, "/big").await.is_some() },
    )
    .await;
    let from_f = metric(
        &g,
        &format!(
            "edged_sync_fetched_bytes_total{{peer=\"{}\"}}",
            f.control.unwrap()
        ),
    )
    .await
    .unwrap_or(0.0);
    assert!(from_f > 0.0, "g counted bytes from f: {from_f}");
    assert_eq!(partial_sync_bytes(&f), 0);
    assert_eq!(partial_sync_bytes(&g), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_flips_bytes_is_caught_at_the_bad_chunk_and_penalised() {
    let fleet = new_fleet();
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app.wasm");
    std::fs::write(&app, big_module(4 << 20, 3)).unwrap();
    let a = node(&fleet, "node-a", &[], "", "");
    push(&fleet, &a, &app, "app");

    let liar = liar::Liar::start(&fleet.issue_node("liar"), "liar", a.control.unwrap()).await;
    let peers = [liar.addr, a.control.unwrap()];
    let f = Edged::spawn(edged(), &sync_node_config(&fleet, "node-f", &peers, "", ""));
    wait_for(
        "f to sync app",
        Duration::from_secs(90),
        &[&a, &f],
        || async { body_of(&f, "/app").await.is_some() },
    )
    .await;

    let log = f.log();
    let penalties = metric(
        &f,
        &format!("edged_sync_penalties_total{{peer=\"{}\"}}", liar.addr),
    )
    .await;
    assert!(penalties >= Some(1.0), "{log}");
    // Caught at the chunk where the flipped byte arrived, not at the end of the blob.
    let at: u64 = log
        .lines()
        .find_map(|l| l.split("bad data at byte ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bad-data report in\n{log}"));
    // Pieces are fetched: the bad byte is in the piece the report names, caught at its chunk.
    let flips = liar.flips();
    assert!(
        flips
            .iter()
            .any(|&flipped| at <= flipped && flipped - at < 16 << 10),
        "flips at {flips:?}, reported at {at}"
    );
    // The honest peer supplied every piece.
    let from_a = metric(
        &f,
        &format!(
            "edged_sync_fetched_bytes_total{{peer=\"{}\"}}",
            a.control.unwrap()
        ),
    )
    .await;
    assert!(from_a > Some(0.0), "{log}");
    // Penalised: after its bad data, the liar is not asked for pieces again.
    let asked = liar.fetches();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(liar.fetches(), asked);
    // At most the requests in flight to it when its first bad piece arrived: two per blob.
    assert!(asked <= 6, "the liar was asked {asked} times");
}

mod liar {
    //! A fleet member gone bad: it holds a real node certificate and relays an honest node's
    //! holdings and manifests, but every blob slice it serves has one content byte flipped.

    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use edged_control::FleetIdentity;
    use edged_control::identity::NODE_SERVER_NAME;
    use edged_control::transport::{read_frame, write_frame};
    use edged_control::verified::{
        PIECE, PieceSource, SliceSource, open_partial, piece_range, receive_slice,
    };
    use edged_control::wire::{Request, Response};
    use std::io::Read;

    /// The content offset of the flipped byte.
    pub const FLIP_AT: u64 = 1_000_000;

    /// The byte flipped in a piece starting at `start` (`len` bytes): the same offset within
    /// every piece as [`FLIP_AT`] has within its own, or the piece's first byte if shorter.
    pub fn flip_in(start: u64, len: u64) -> u64 {
        let within = FLIP_AT % PIECE;
        if within + 64 <= len {
            start + within
        } else {
            start
        }
    }

    pub struct Liar {
        pub addr: SocketAddr,
        shared: Arc<Shared>,
        _endpoint: quinn::Endpoint,
    }

    /// What the liar's answers share: how many blob fetches it served, the honest blobs it
    /// fetched once (verified), and the content offsets of the bytes it flipped.
    #[derive(Default)]
    struct Shared {
        fetches: AtomicUsize,
        blobs: tokio::sync::Mutex<HashMap<String, Arc<Vec<u8>>>>,
        flips: Mutex<Vec<u64>>,
    }

    impl Liar {
        pub async fn start(identity: &Path, me: &str, honest: SocketAddr) -> Liar {
            let fleet = FleetIdentity::load(identity, me).unwrap();
            let mut endpoint = quinn::Endpoint::server(
                fleet.server_config().unwrap(),
                "127.0.0.1:0".parse().unwrap(),
            )
            .unwrap();
            endpoint.set_default_client_config(fleet.client_config().unwrap());
            let upstream = endpoint
                .connect(honest, NODE_SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            let shared = Arc::new(Shared::default());
            let (server, state) = (endpoint.clone(), shared.clone());
            tokio::spawn(async move {
                while let Some(incoming) = server.accept().await {
                    let (upstream, state) = (upstream.clone(), state.clone());
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        while let Ok((send, recv)) = conn.accept_bi().await {
                            let (upstream, state) = (upstream.clone(), state.clone());
                            tokio::spawn(answer(upstream, state, send, recv));
                        }
                    });
                }
            });
            Liar {
                addr: endpoint.local_addr().unwrap(),
                shared,
                _endpoint: endpoint,
            }
        }

        pub fn fetches(&self) -> usize {
            self.shared.fetches.load(Ordering::SeqCst)
        }

        /// The content offsets of every byte it flipped in a piece it served.
        pub fn flips(&self) -> Vec<u64> {
            self.shared.flips.lock().unwrap().clone()
        }
    }

    async fn call(upstream: &quinn::Connection, request: &Request) -> (Response, Vec<u8>) {
        let (mut send, mut recv) = upstream.open_bi().await.unwrap();
        write_frame(&mut send, request).await.unwrap();
        send.finish().unwrap();
        let response = read_frame(&mut recv).await.unwrap();
        let rest = recv.read_to_end(64 << 20).await.unwrap_or_default();
        (response, rest)
    }

    async fn answer(
        upstream: quinn::Connection,
        shared: Arc<Shared>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let Ok(request) = read_frame::<Request>(&mut recv).await else {
            return;
        };
        let response = match request {
            Request::Holdings {} => match call(&upstream, &request).await.0 {
                // Claims to have synced everything, so fetchers prefer it to the origin.
                Response::Holdings {
                    mut items,
                    activations,
                    partial,
                } => {
                    for item in &mut items {
                        item.pushed_here = false;
                    }
                    Response::Holdings {
                        items,
                        activations,
                        partial,
                    }
                }
                other => other,
            },
            Request::GetManifest { .. } => call(&upstream, &request).await.0,
            Request::FetchBlob { hash, start } => {
                shared.fetches.fetch_add(1, Ordering::SeqCst);
                let blob = whole_blob(&upstream, &shared, &hash).await;
                let mut slice = Vec::new();
                SliceSource::new(&blob[..], start)
                    .read_to_end(&mut slice)
                    .unwrap();
                if (start..blob.len() as u64).contains(&FLIP_AT) {
                    // The slice interleaves tree nodes with content: find the content byte.
                    let at = FLIP_AT as usize;
                    let window = &blob[at..at + 64];
                    let pos = slice.windows(64).position(|w| w == window).unwrap();
                    slice[pos] ^= 0x01;
                }
                let head = Response::BlobSlice {
                    size: blob.len() as u64,
                };
                let _ = write_frame(&mut send, &head).await;
                let _ = send.write_all(&slice).await;
                let _ = send.finish();
                return;
            }
            Request::FetchPiece { hash, index } => {
                shared.fetches.fetch_add(1, Ordering::SeqCst);
                let blob = whole_blob(&upstream, &shared, &hash).await;
                let mut slice = PieceSource::checked(&blob[..], &hash)
                    .unwrap()
                    .piece_slice(index)
                    .unwrap();
                let (start, len) = piece_range(blob.len() as u64, index);
                // The slice interleaves tree nodes with content: find a content byte whose
                // 64-byte window occurs once in the slice (an artifact has runs of padding
                // where a window would match elsewhere), from the piece's usual offset on.
                let from = flip_in(start, len);
                let end = (start + len).saturating_sub(64);
                let unique = (from..end).step_by(997).find_map(|at| {
                    let window = &blob[at as usize..at as usize + 64];
                    let mut hits = slice.windows(64).enumerate().filter(|(_, w)| *w == window);
                    match (hits.next(), hits.next()) {
                        (Some((pos, _)), None) => Some((at, pos)),
                        _ => None,
                    }
                });
                if let Some((at, pos)) = unique {
                    slice[pos] ^= 0x01;
                    shared.flips.lock().unwrap().push(at);
                }
                let head = Response::PieceSlice {
                    size: blob.len() as u64,
                    len: slice.len() as u64,
                };
                let _ = write_frame(&mut send, &head).await;
                let _ = send.write_all(&slice).await;
                let _ = send.finish();
                return;
            }
            _ => Response::Done {
                message: "ok".into(),
            },
        };
        let _ = write_frame(&mut send, &response).await;
        let _ = send.finish();
    }

    /// The honest node's copy of blob `hash`, verified: fetched once and kept (a stream the
    /// busy honest node cuts short is fetched again).
    async fn whole_blob(upstream: &quinn::Connection, shared: &Shared, hash: &str) -> Arc<Vec<u8>> {
        let mut blobs = shared.blobs.lock().await;
        if let Some(blob) = blobs.get(hash) {
            return blob.clone();
        }
        let request = Request::FetchBlob {
            hash: hash.into(),
            start: 0,
        };
        loop {
            let (size, slice) = match call(upstream, &request).await {
                (Response::BlobSlice { size }, slice) => (size, slice),
                // The honest node serves each blob to one fetcher at a time.
                (Response::Busy { .. }, _) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                (other, _) => panic!("honest node refused blob {hash}: {other:?}"),
            };
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("blob");
            let (mut file, _) = open_partial(&path).unwrap();
            if receive_slice(&slice[..], hash, size, 0, &mut file, |_| {}).is_ok() {
                let blob = Arc::new(std::fs::read(&path).unwrap());
                blobs.insert(hash.to_string(), blob.clone());
                return blob;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
