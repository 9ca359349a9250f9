//! Damage on disk against a real `edged`: a damaged blob is repaired (from the config's `.wasm`,
//! by a re-push, by a recompile) instead of stopping the node; a missing or truncated index stops
//! the start with a message naming it, and no blob file is deleted; `edged verify` reports.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fleet::{control_section, new_fleet, push_x86_64};
use common::{Edged, get, guest};

const HELLO: &str = "[[function]]\nname = \"hello\"\nwasm = {wasm}\nroute = \"/hello\"\n";

fn hello_config() -> String {
    HELLO.replace("{wasm}", &guest("hello-http.wasm"))
}

/// Every blob file of the store, sorted.
fn blob_files(state: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for fanout in std::fs::read_dir(state.join("blobs")).unwrap() {
        for file in std::fs::read_dir(fanout.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files.sort();
    files
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, &bytes).unwrap();
}

fn stop(edged: &mut Edged) {
    let _ = edged.child.kill();
    let _ = edged.child.wait();
}

fn state(edged: &Edged) -> PathBuf {
    edged.state_dir().join("state")
}

/// `edged <args> --config <the test's config>`, run to its end.
fn run_edged(edged: &Edged, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edged"))
        .args(args)
        .arg("--config")
        .arg(&edged.config_path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_function_with_damaged_blobs_is_repaired_from_its_wasm_and_served() {
    let mut edged = Edged::start(&hello_config());
    assert_eq!(get(&edged.url("/hello")).await.0, 200);
    let blobs = blob_files(&state(&edged));
    assert_eq!(blobs.len(), 2, "source and artifact: {blobs:?}");

    // Source and artifact both damaged: the worst case for one function.
    for blob in &blobs {
        flip_byte(blob);
    }
    edged.crash_and_restart();
    let (status, body) = get(&edged.url("/hello")).await;
    assert_eq!(status, 200, "{body}\n{}", edged.log());
    let log = edged.log();
    let source = blobs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .find(|h| log.contains(&format!("stored source is damaged (blob {h}")))
        .unwrap_or_else(|| panic!("no repair of the source logged:\n{log}"));
    assert!(
        log.contains("source blob repaired from the config's .wasm"),
        "{log}"
    );
    assert!(log.contains("recompiling it from the source"), "{log}");
    assert!(state(&edged).join("damaged").join(&source).exists());

    stop(&mut edged);
    let verify = run_edged(&edged, &["verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_deployment_with_damaged_blobs_is_repaired_by_pushing_again() {
    let fleet = new_fleet();
    let mut edged = Edged::start(&control_section(&fleet));
    let wasm = PathBuf::from(guest("hello-http.wasm").trim_matches('"'));
    push_x86_64(&fleet.operator, &edged, &wasm, "app");
    assert_eq!(get(&edged.url("/app")).await.0, 200);
    let blobs = blob_files(&state(&edged));
    assert_eq!(blobs.len(), 2, "source and x86_64 artifact: {blobs:?}");

    for blob in &blobs {
        flip_byte(blob);
    }
    // The node starts (one bad deployment does not stop it) and says how to repair it.
    edged.crash_and_restart();
    assert_eq!(get(&edged.url("/app")).await.0, 404);
    let log = edged.log();
    assert!(
        log.contains("cannot serve pushed deployment: blob")
            && log.contains("pushing the same .wasm again (`edgectl push`) repairs it"),
        "{log}"
    );

    let report = push_x86_64(&fleet.operator, &edged, &wasm, "app");
    let sent = report["sent_bytes"].as_u64().unwrap();
    let sizes: u64 = blobs
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .sum();
    assert_eq!(sent, sizes, "both damaged blobs are sent again: {report}");
    let (status, body) = get(&edged.url("/app")).await;
    assert_eq!(status, 200, "{body}\n{}", edged.log());

    stop(&mut edged);
    let verify = run_edged(&edged, &["verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_or_truncated_index_stops_the_start_and_deletes_nothing() {
    let mut edged = Edged::start(&hello_config());
    stop(&mut edged);
    let state = state(&edged);
    let index = state.join("index");
    let backup = edged.state_dir().join("index.backup");
    copy_dir(&index, &backup);
    let blobs = blob_files(&state);

    // Deleted.
    std::fs::remove_dir_all(&index).unwrap();
    let start = run_edged(&edged, &[]);
    let message = text(&start);
    assert!(!start.status.success(), "{message}");
    assert!(
        message.contains(&format!("store index {} is missing", index.display())),
        "{message}"
    );
    assert!(message.contains("Restore"), "{message}");
    assert_eq!(blob_files(&state), blobs);
    let verify = run_edged(&edged, &["verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));

    // Truncated: sled would open it as an empty index.
    copy_dir(&backup, &index);
    std::fs::File::options()
        .write(true)
        .open(index.join("db"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let start = run_edged(&edged, &[]);
    let message = text(&start);
    assert!(!start.status.success(), "{message}");
    assert!(
        message.contains(&format!("store index {} is empty", index.display())),
        "{message}"
    );
    assert_eq!(blob_files(&state), blobs);

    // Restored from the backup: the node starts and serves again.
    std::fs::remove_dir_all(&index).unwrap();
    copy_dir(&backup, &index);
    edged.crash_and_restart();
    assert_eq!(get(&edged.url("/hello")).await.0, 200);
    assert_eq!(blob_files(&state), blobs);
}

#[tokio::test(flavor = "multi_thread")]
async fn edged_verify_reports_a_clean_and_a_damaged_store() {
    let mut edged = Edged::start(&hello_config());
    // The daemon holds the index: verify says so rather than failing obscurely.
    let busy = run_edged(&edged, &["verify"]);
    assert_eq!(busy.status.code(), Some(2), "{}", text(&busy));
    assert!(
        text(&busy).contains("in use by a running edged"),
        "{}",
        text(&busy)
    );
    stop(&mut edged);

    let clean = run_edged(&edged, &["verify"]);
    let out = text(&clean);
    assert_eq!(clean.status.code(), Some(0), "{out}");
    assert!(out.contains("2 blobs"), "{out}");
    assert!(out.contains("0 problems"), "{out}");

    let blobs = blob_files(&state(&edged));
    flip_byte(&blobs[0]);
    let damaged = run_edged(&edged, &["verify"]);
    let out = text(&damaged);
    assert_eq!(damaged.status.code(), Some(1), "{out}");
    let hash = blobs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        out.contains(&format!("damaged: blob {hash} is corrupt on disk")),
        "{out}"
    );
    assert!(out.contains("1 problem"), "{out}");
    assert!(out.contains("repair:"), "{out}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A tmpfs of `mib` MiB mounted at a fresh directory, unmounted on drop; `None` (the test says
/// it is skipped) when this process may not mount.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Partial uploads and fetches in the store's `tmp/`.
fn partials(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("tmp"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("put-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A push that fills the state disk fails with the reason and leaves no partial behind to block
/// the next; the node keeps serving what it had, a push that fits goes through, and `verify`
/// reports the store clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_that_fills_the_disk_fails_cleanly_and_the_next_one_fits() {
    let Some(disk) = SmallDisk::mount(24) else {
        println!("note: cannot mount a tmpfs here (not root?): the full-disk test is skipped");
        return;
    };
    let fleet = new_fleet();
    let config = format!(
        "[node]\nstate_dir = {:?}\nhttp_listen = \"127.0.0.1:0\"\n\n{}{}",
        disk.path().display().to_string(),
        control_section(&fleet),
        hello_config()
    );
    let mut edged = Edged::spawn(Command::new(env!("CARGO_BIN_EXE_edged")), &config);
    assert_eq!(get(&edged.url("/hello")).await.0, 200);

    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, edged_testkit::big_module(40 << 20, 7)).unwrap();
    let out = common::fleet::edgectl(
        &fleet.operator,
        &edged,
        &[
            "push",
            big.to_str().unwrap(),
            "--name",
            "big",
            "--target",
            "x86_64",
        ],
    );
    let err = common::fleet::refused(out);
    assert!(err.contains("disk is full"), "{err}\n{}", edged.log());
    // The sibling stream's task may still be ending when edgectl returns.
    for _ in 0..50 {
        if partials(disk.path()).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        partials(disk.path()).is_empty(),
        "{:?}",
        partials(disk.path())
    );
    assert_eq!(get(&edged.url("/hello")).await.0, 200);

    // Room for a small one: it goes through.
    let small = edged_testkit::guest("hello-http.wasm");
    push_x86_64(&fleet.operator, &edged, &small, "small");
    assert_eq!(get(&edged.url("/small")).await.0, 200, "{}", edged.log());

    stop(&mut edged);
    let verified = run_edged(&edged, &["verify"]);
    assert!(verified.status.success(), "{}", text(&verified));
}
