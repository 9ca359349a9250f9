//! Fleet-wide activation end to end: real nodes syncing over QUIC, `edgectl rollback --fleet`
//! on one of them, a node that was down during the rollback, and a replayed older record.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::{Fleet, edgectl, new_fleet, ok, push_x86_64, refused, sync_node_config};
use common::{Edged, get};

fn node(fleet: &Fleet, name: &str, peers: &[SocketAddr]) -> Edged {
    Edged::spawn(
        Command::new(env!("CARGO_BIN_EXE_edged")),
        &sync_node_config(fleet, name, peers, "", ""),
    )
}

/// Which version `/app` serves: 1 is the hello guest, 2 the init-heavy one.
async fn serving(node: &Edged) -> Option<u64> {
    let (code, body) = get(&node.url("/app?key=3")).await;
    match (code, body) {
        (200, body) if body.starts_with("hello from edged") => Some(1),
        (200, body) if body.starts_with("table[3] = ") => Some(2),
        _ => None,
    }
}

async fn wait_until_serving(nodes: &[&Edged], version: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for node in nodes {
            all &= serving(node).await == Some(version);
        }
        if all {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
            panic!(
                "{what}: not every node serves v{version}:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_rollback_reaches_every_node_including_one_that_was_down() {
    let fleet = new_fleet();
    let a = node(&fleet, "a", &[]);
    let b = node(&fleet, "b", &[a.control.unwrap()]);
    let mut c = node(&fleet, "c", &[a.control.unwrap()]);
    let op = fleet.operator.clone();

    push_x86_64(&op, &a, &edged_testkit::guest("hello-http.wasm"), "app");
    push_x86_64(
        &op,
        &a,
        &edged_testkit::guest("init-heavy-http.wasm"),
        "app",
    );
    wait_until_serving(&[&a, &b, &c], 2, "after two pushes").await;

    // C goes down; the operator rolls the fleet back through A.
    let _ = c.child.kill();
    let _ = c.child.wait();
    let out = ok(edgectl(&op, &a, &["rollback", "app", "--fleet"]));
    assert!(out.contains("fleet record app@1 #1 applied"), "{out}");
    wait_until_serving(&[&a, &b], 1, "after the fleet rollback").await;

    // C comes back with v2 active and catches up on the record from its peers.
    c.crash_and_restart();
    wait_until_serving(&[&a, &b, &c], 1, "after C returned").await;
    let listing: serde_json::Value =
        serde_json::from_str(&ok(edgectl(&op, &c, &["--json", "ls"]))).unwrap();
    assert!(
        listing["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["fleet_record"]["sequence"] == 1),
        "{listing}"
    );

    // Forward again, fleet-wide; then a replay of the older record is refused everywhere.
    let out = ok(edgectl(&op, &b, &["activate", "app@2", "--fleet"]));
    assert!(out.contains("#2"), "{out}");
    wait_until_serving(&[&a, &b, &c], 2, "after the fleet activation").await;
    for node in [&a, &b, &c] {
        let err = refused(edgectl(
            &op,
            node,
            &["activate", "app@1", "--fleet", "--sequence", "1"],
        ));
        assert!(err.contains("is not newer than record #2"), "{err}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_until_serving(&[&a, &b, &c], 2, "after the replay").await;
    // A local rollback stays local.
    ok(edgectl(&op, &c, &["rollback", "app"]));
    assert_eq!(serving(&c).await, Some(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(serving(&a).await, Some(2));
    assert_eq!(serving(&b).await, Some(2));
}

/// Issue 27 item 5: a record at the end of the sequence range is refused (it would leave no
/// record to follow it), edgectl never wraps a sequence, and `--fleet --reset` starts a name's
/// sequence again, after which records go on in the new epoch.
#[tokio::test(flavor = "multi_thread")]
async fn a_sequence_cannot_lock_a_name_and_a_reset_starts_it_again() {
    let fleet = new_fleet();
    let a = node(&fleet, "a", &[]);
    let op = fleet.operator.clone();
    push_x86_64(&op, &a, &edged_testkit::guest("hello-http.wasm"), "app");
    push_x86_64(
        &op,
        &a,
        &edged_testkit::guest("init-heavy-http.wasm"),
        "app",
    );
    ok(edgectl(
        &op,
        &a,
        &["activate", "app@2", "--fleet", "--sequence", "5"],
    ));
    let max = u64::MAX.to_string();
    let err = refused(edgectl(
        &op,
        &a,
        &["activate", "app@1", "--fleet", "--sequence", &max],
    ));
    assert!(
        err.contains("jumps implausibly far past record #5"),
        "{err}"
    );
    assert_eq!(serving(&a).await, Some(2));

    // The operator resets the name's sequence: epoch 1, sequence 1, applied after #5.
    let out = ok(edgectl(
        &op,
        &a,
        &["activate", "app@1", "--fleet", "--reset"],
    ));
    assert!(out.contains("fleet record app@1 #1/1 applied"), "{out}");
    assert_eq!(serving(&a).await, Some(1));
    let out = ok(edgectl(&op, &a, &["activate", "app@2", "--fleet"]));
    assert!(out.contains("#2/1 applied"), "{out}");
    assert_eq!(serving(&a).await, Some(2));
    let listing: serde_json::Value =
        serde_json::from_str(&ok(edgectl(&op, &a, &["--json", "ls"]))).unwrap();
    let record = &listing["items"][0]["fleet_record"];
    assert_eq!(
        (record["epoch"].as_u64(), record["sequence"].as_u64()),
        (Some(1), Some(2))
    );
    // Within the new epoch, replays are refused as before.
    let err = refused(edgectl(
        &op,
        &a,
        &["activate", "app@1", "--fleet", "--sequence", "1"],
    ));
    assert!(err.contains("is not newer than record #2/1"), "{err}");
    assert_eq!(serving(&a).await, Some(2));
}
