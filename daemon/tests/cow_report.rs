//! The copy-on-write image report end to end: `edgectl build` prints it and records it in the
//! manifest, and `edgectl ls` shows it for each deployment a real node holds — for a guest whose
//! memory starts from an image and for guests whose data segments are copied per instance.

mod common;

use common::fleet::{control_section, edgectl, edgectl_command, new_fleet, ok, push_x86_64};
use common::{Edged, guest};

/// A data segment placed by an imported global (`__memory_base` in dynamically linked code):
/// wasmtime cannot lay it out at compile time, so it is copied into every instance.
const IMPORTED_BASE: &str = r#"(module
  (import "env" "memory_base" (global $base i32))
  (memory (export "memory") 1)
  (data (global.get $base) "placed at instantiation")
  (func (export "_start")))"#;

/// The same, placed by a constant expression instead (extended-const), so that a node can link
/// and serve it as a WASI p1 command: still no image, as wasmtime wants a plain constant.
const COMPUTED_OFFSET: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.add (i32.const 1024) (i32.const 16)) "placed by an expression")
  (func (export "_start")))"#;

/// `edgectl build INPUT` for x86_64: its stdout and the manifest it wrote.
fn build(input: &std::path::Path) -> (String, serde_json::Value) {
    let out = tempfile::tempdir().unwrap();
    let stdout = ok(edgectl_command()
        .args(["build", input.to_str().unwrap(), "--target", "x86_64", "-o"])
        .arg(out.path())
        .output()
        .unwrap());
    let manifest = std::fs::read(out.path().join("manifest.json")).unwrap();
    (stdout, serde_json::from_slice(&manifest).unwrap())
}

#[test]
fn build_reports_an_image_and_its_absence() {
    let (stdout, manifest) = build(&edged_testkit::guest("hello-http.wasm"));
    let image = &manifest["memory_image"];
    assert_eq!(image["copied_bytes"], 0, "{image}");
    assert_eq!(image["memories"], 1, "{image}");
    // A Rust guest's static data: some KiB, laid out in 4 KiB pages.
    let bytes = image["image_bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes % 4096 == 0, "{image}");
    assert!(stdout.contains("copy-on-write image: yes: "), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let wat = dir.path().join("imported-base.wat");
    std::fs::write(&wat, IMPORTED_BASE).unwrap();
    let (stdout, manifest) = build(&wat);
    let image = &manifest["memory_image"];
    assert_eq!(
        image["copied_bytes"],
        "placed at instantiation".len(),
        "{image}"
    );
    assert_eq!(image["image_bytes"], 0, "{image}");
    let why = image["copied_because"][0].as_str().unwrap();
    assert!(why.contains("segment 0 is placed by a global"), "{why}");
    assert!(
        stdout.contains("copy-on-write image: NO: 23 B of data copied into memory per instance"),
        "{stdout}"
    );
}

#[test]
fn ls_shows_each_deployments_image() {
    let fleet = new_fleet();
    let edged = Edged::start(&control_section(&fleet));
    let dir = tempfile::tempdir().unwrap();
    let wat = dir.path().join("computed-offset.wat");
    std::fs::write(&wat, COMPUTED_OFFSET).unwrap();
    let hello = guest("hello-http.wasm");
    push_x86_64(
        &fleet.operator,
        &edged,
        std::path::Path::new(hello.trim_matches('"')),
        "hello",
    );
    push_x86_64(&fleet.operator, &edged, &wat, "computed");

    let listing: serde_json::Value =
        serde_json::from_str(&ok(edgectl(&fleet.operator, &edged, &["--json", "ls"]))).unwrap();
    let image_of = |name: &str| {
        listing["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {listing}"))["memory_image"]
            .clone()
    };
    let hello_image = image_of("hello");
    assert_eq!(hello_image["copied_bytes"], 0, "{hello_image}");
    assert!(hello_image["image_bytes"].as_u64().unwrap() > 0);
    let computed = image_of("computed");
    assert_eq!(computed["copied_bytes"], "placed by an expression".len());
    assert_eq!(computed["image_bytes"], 0);

    let table = ok(edgectl(&fleet.operator, &edged, &["ls"]));
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_string()
    };
    assert!(
        table.lines().next().unwrap().contains("COW IMAGE"),
        "{table}"
    );
    assert!(row("hello").contains(" yes "), "{table}");
    assert!(row("computed").contains(" NO 23 B copied "), "{table}");
}
