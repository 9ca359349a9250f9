//! `edgectl`'s compile cache end to end: real `edgectl` pushes of a Wizer-initialized component
//! to two real nodes, sharing one cache directory (its own, never the user's).

mod common;

use std::path::Path;
use std::process::Output;

use common::fleet::{control_section, edgectl_env, new_fleet, ok};
use common::{Edged, get, guest};

/// The step lines of a push's text output (`    <step>   <time> ms  <how>`).
fn steps(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip_while(|l| !l.contains("steps:"))
        .skip(1)
        .take_while(|l| l.contains(" ms"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Both nodes serve the pre-initialized guest.
async fn serves(node: &Edged) {
    let (status, body) = get(&node.url("/heavy?key=7")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("table[7] = "), "{body}");
}

/// The cached x86_64 artifact's data file, found through the entries' metadata.
fn cached_x86_64_artifact(cache: &Path) -> std::path::PathBuf {
    let dir = cache.join("compile");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if meta["step"] == "aot x86_64-unknown-linux-gnu" {
                return dir.join(meta["file"]["name"].as_str().unwrap());
            }
        }
    }
    panic!("no cached x86_64 artifact in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn repush_and_push_to_another_node_skip_compiles_and_a_damaged_entry_is_rebuilt() {
    let fleet = new_fleet();
    let op = fleet.operator.clone();
    let a = Edged::start(&control_section(&fleet));
    let b = Edged::start(&control_section(&fleet));
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let file = guest("init-heavy-http.wasm");
    let file = file.trim_matches('"');
    let push = |node: &Edged, extra: &[&str]| -> Output {
        let mut args = vec!["push", file, "--name", "heavy"];
        args.extend_from_slice(extra);
        edgectl_env(&op, node, &[("EDGECTL_CACHE_DIR", cache_dir)], &args)
    };

    // Cold cache: validate, Wizer and both AOT compiles run, and are stored.
    let out = ok(push(&a, &[]));
    assert!(out.contains("pushed heavy@1 (active)"), "{out}");
    let cold = steps(&out);
    assert_eq!(cold.len(), 4, "{out}");
    assert!(cold[1].starts_with("wizer (wizer-initialize)"), "{out}");
    assert!(cold.iter().all(|s| s.ends_with("compiled")), "{out}");
    serves(&a).await;

    // The same file to another node: every step from the cache, nothing compiled.
    let out = ok(push(&b, &[]));
    assert!(out.contains("pushed heavy@1 (active)"), "{out}");
    let warm = steps(&out);
    assert_eq!(warm.len(), 4, "{out}");
    assert!(warm.iter().all(|s| s.ends_with("cached")), "{out}");
    assert!(
        !out.contains("compiled") && !out.contains("rebuilt"),
        "{out}"
    );
    serves(&b).await;

    // Again to the first node, as a new version; the JSON report says the same.
    let report: serde_json::Value = serde_json::from_str(ok(push(&a, &["--json"])).trim()).unwrap();
    assert_eq!(report["deployment"], "heavy@2", "{report}");
    assert_eq!(report["active"], true, "{report}");
    let json_steps = report["steps"].as_array().unwrap();
    assert_eq!(json_steps.len(), 4, "{report}");
    assert!(
        json_steps.iter().all(|s| s["cache"] == "cached"),
        "{report}"
    );
    serves(&a).await;

    // One flipped byte in a cached artifact: caught by its hash, rebuilt, said so.
    let artifact = cached_x86_64_artifact(cache.path());
    let mut bytes = std::fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&artifact, &bytes).unwrap();
    let output = push(&b, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let out = ok(output);
    assert!(out.contains("pushed heavy@2 (active)"), "{out}");
    let after = steps(&out);
    assert_eq!(after.len(), 4, "{out}");
    for step in &after {
        if step.starts_with("aot x86_64") {
            assert!(step.ends_with("rebuilt (damaged cache entry)"), "{out}");
        } else {
            assert!(step.ends_with("cached"), "{out}");
        }
    }
    let notes: Vec<&str> = stderr.lines().filter(|l| l.contains("damaged")).collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    assert!(notes[0].contains("BLAKE3"), "{stderr}");
    serves(&b).await;
    // The entry is whole again.
    let rebuilt = std::fs::read(&artifact).unwrap();
    assert!(rebuilt != bytes, "the damaged artifact was not rewritten");
    let out = ok(push(&b, &[]));
    assert!(steps(&out).iter().all(|s| s.ends_with("cached")), "{out}");
}
