//! aarch64 end to end: the cross-built `edged` (`scripts/build-aarch64.sh --profile qemu-test`)
//! runs under qemu-user and serves guests whose aarch64 artifacts `edgectl` AOT-compiled here on
//! x86_64 and pushed over QUIC. The node must map those artifacts as shipped (`loaded`), not fall
//! back to compiling from source, or the fleet's cross-compilation is not doing its job.

mod common;

use std::path::PathBuf;
use std::process::Command;

use std::time::{Duration, Instant};

use common::fleet::{control_section, edgectl, new_fleet, ok, sync_node_config};
use common::{Edged, config_text, get, guest};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const PROFILE: &str = "qemu-test";

/// The cross-built daemon, built on demand if `scripts/test.sh` has not built it already.
fn aarch64_edged() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/
    let target_dir = exe
        .ancestors()
        .nth(3)
        .expect("tests run from target/<profile>/deps");
    let path = target_dir.join(TRIPLE).join(PROFILE).join("edged");
    if !path.exists() {
        let script = edged_testkit::workspace_root().join("scripts/build-aarch64.sh");
        let status = Command::new("bash")
            .arg(&script)
            .args(["--profile", PROFILE])
            .status()
            .unwrap();
        assert!(status.success(), "{} failed", script.display());
    }
    assert!(path.exists(), "no aarch64 edged at {}", path.display());
    path
}

/// qemu-user for aarch64, from Debian's qemu-user-static (`scripts/install-test-deps.sh`).
fn qemu() -> Command {
    let qemu = ["qemu-aarch64-static", "qemu-aarch64"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("qemu-aarch64 not found: run scripts/install-test-deps.sh");
    let mut command = Command::new(qemu);
    // The cross toolchain's arm64 glibc, for the dynamically linked daemon.
    command.args(["-L", "/usr/aarch64-linux-gnu"]);
    command.arg(aarch64_edged());
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn aarch64_edged_under_qemu_serves_artifacts_compiled_on_x86_64() {
    let fleet = new_fleet();
    // qemu-user keeps bookkeeping for every reserved guest page: the default 1000 pool slots
    // (4 TiB of address space) cost it ~24 GiB of RAM and an OOM kill. A small pool keeps the
    // default 4 GiB reservation per memory, so artifacts compiled elsewhere still match.
    let engine = "[engine]\ntotal_instances = 8\ntotal_memories = 8\n\n";
    let config = config_text(&format!("{engine}{}", control_section(&fleet)));
    let edged = Edged::spawn(qemu(), &config);
    let op = fleet.operator.clone();

    let status = ok(edgectl(&op, &edged, &["--json", "status"]));
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["status"]["target"], TRIPLE, "{status}");

    for (file, name) in [
        ("hello-http.wasm", "hello"),
        ("init-heavy-p1.wasm", "heavy"),
        ("infinite-loop.wat", "loop"),
        ("p3-probe.wasm", "p3probe"),
    ] {
        let out = ok(edgectl(
            &op,
            &edged,
            &["push", guest(file).trim_matches('"'), "--name", name],
        ));
        assert!(out.contains(&format!("pushed {name}@1 (active)")), "{out}");
    }

    // A wasi:http component and a pre-initialized p1 CGI module, both from x86_64-built code.
    assert_eq!(
        get(&edged.url("/hello/arm")).await,
        (200, "hello from edged: /hello/arm\n".into())
    );
    let (code, body) = get(&edged.url("/heavy?key=31337")).await;
    assert_eq!(code, 200, "{body}\n{}", edged.log());
    assert!(body.starts_with("table[31337] = "), "{body}");

    // A wasi:http 0.3 component, on reused instances (its default policy), until it traps; the
    // next request sees a fresh one. (Under emulation a request can outlast two epoch ticks,
    // and an instance that busy takes no second request, so the counts before the trap vary.)
    for _ in 0..3 {
        let (code, body) = get(&edged.url("/p3probe")).await;
        assert_eq!(code, 200, "{body}\n{}", edged.log());
        assert!(body.starts_with("requests="), "{body}");
    }
    assert_eq!(get(&edged.url("/p3probe?trap")).await.0, 500);
    assert_eq!(
        get(&edged.url("/p3probe")).await,
        (200, "requests=1\n".into())
    );

    // Epoch interruption works in aarch64 code: the loop is cut off, the node keeps serving.
    assert_eq!(
        get(&edged.url("/loop")).await,
        (504, "guest fault: deadline\n".into())
    );
    assert_eq!(get(&edged.url("/hello")).await.0, 200);

    let (_, metrics) = get(&edged.url("/metrics")).await;
    for name in ["hello", "heavy", "loop", "p3probe"] {
        assert!(
            metrics.contains(&format!(
                r#"edged_cold_loads_total{{function="{name}",path="loaded"}} 1"#
            )),
            "{name} should run the shipped aarch64 artifact:\n{metrics}"
        );
    }
    assert!(!metrics.contains(r#"path="recompiled""#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_fleet_relays_the_aarch64_artifact_through_an_x86_64_node() {
    let fleet = new_fleet();
    // The push goes to an x86_64 node; it keeps the aarch64 artifact too (keep_targets default).
    let x86 = Edged::spawn(
        Command::new(env!("CARGO_BIN_EXE_edged")),
        &sync_node_config(&fleet, "x86", &[], "", ""),
    );
    let engine = "[engine]\ntotal_instances = 8\ntotal_memories = 8\n";
    let arm = Edged::spawn(
        qemu(),
        &sync_node_config(&fleet, "arm", &[x86.control.unwrap()], "", engine),
    );
    let out = ok(edgectl(
        &fleet.operator,
        &x86,
        &[
            "push",
            guest("hello-http.wasm").trim_matches('"'),
            "--name",
            "hello",
        ],
    ));
    assert!(out.contains("pushed hello@1 (active)"), "{out}");

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, body) = get(&arm.url("/hello/relayed")).await;
        if code == 200 {
            assert_eq!(body, "hello from edged: /hello/relayed\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the aarch64 node never served the push:\n{}",
            arm.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, metrics) = get(&arm.url("/metrics")).await;
    assert!(
        metrics.contains(r#"edged_cold_loads_total{function="hello",path="loaded"} 1"#),
        "the aarch64 node should run the artifact relayed by the x86_64 node:\n{metrics}"
    );
    assert!(!metrics.contains(r#"path="recompiled""#), "{metrics}");
}
