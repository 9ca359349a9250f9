//! The engine's pool fitted to the box: the real `edged` under `ulimit -v` (as on 64-bit ARM
//! kernels with 39-bit address spaces, 512 GiB) starts on the default `[engine]` with a pool
//! that fits, and refuses an explicit pool that cannot fit, naming the settings to change (at
//! start and in `edged check-config`). The limit applies to the child shell and `edged` only.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Edged, config_text, get, guest};

const GIB_IN_KIB: u64 = 1024 * 1024;

/// `bash -c 'ulimit -v <gib> GiB && exec edged ...'`.
fn under_ulimit(gib: u64) -> Command {
    let mut command = Command::new("bash");
    command.args([
        "-c",
        &format!("ulimit -v {} && exec \"$0\" \"$@\"", gib * GIB_IN_KIB),
        env!("CARGO_BIN_EXE_edged"),
    ]);
    command
}

fn hello() -> String {
    format!(
        "[[function]]\nname = \"hello\"\nwasm = {}\nroute = \"/hello\"\n",
        guest("hello-http.wasm")
    )
}

/// The `key=<number>` field of the log's pool line.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("{key}: {line}"));
    line[at + key.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_pool_fits_512_and_256_gib_address_spaces() {
    for (gib, most) in [(512, 63), (256, 31)] {
        let node = Edged::spawn(under_ulimit(gib), &config_text(&hello()));
        assert_eq!(
            get(&node.url("/hello/pi")).await,
            (200, "hello from edged: /hello/pi\n".into()),
            "{}",
            node.log()
        );
        let log = node.log();
        let line = log
            .lines()
            .find(|l| l.contains("engine pool sized to this process's address space"))
            .unwrap_or_else(|| panic!("no pool line under {gib} GiB:\n{log}"));
        let probe = field(line, "probe_gib");
        let memories = field(line, "total_memories");
        let reserved = field(line, "reserved_gib");
        assert!(probe <= gib && probe > gib - 16, "{line}");
        // Half of what the probe found, 4 GiB + 32 MiB per memory slot (and ~3 MiB per
        // instance slot): within a slot or two of the most that fit the whole limit.
        assert!(memories <= most && memories + 3 >= most, "{line}");
        assert_eq!(field(line, "total_instances"), memories, "{line}");
        assert!(reserved <= probe / 2, "{line}");
        assert!(line.contains("lowered=true"), "{line}");
    }
}

fn run(mut command: Command, args: &[&str], config: &Path) -> Output {
    command.args(args).arg(config).output().unwrap()
}

#[test]
fn an_explicit_pool_that_cannot_fit_is_refused_naming_what_would() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edged.toml");
    let text = config_text(&format!("[engine]\ntotal_memories = 1000\n\n{}", hello()));
    std::fs::write(&config, text).unwrap();

    let started = run(under_ulimit(256), &["--config"], &config);
    let checked = run(under_ulimit(256), &["check-config"], &config);
    for (what, out) in [("start", &started), ("check-config", &checked)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} accepted it:\n{stderr}");
        for expected in [
            "[engine] total_memories = 1000 × (memory_reservation_mib = 4096 + memory_guard_mib \
             = 32)",
            "needs 4035 GiB of address space, and this process can reserve 25",
            "the largest that fit are total_memories = 3",
            "or memory_reservation_mib = 9",
        ] {
            let expected = if what == "check-config" {
                expected.replace("[engine] ", "[engine]: ")
            } else {
                expected.to_string()
            };
            assert!(
                stderr.contains(&expected),
                "{what}: no `{expected}` in:\n{stderr}"
            );
        }
        assert!(!stderr.contains("mmap failed"), "{what}:\n{stderr}");
    }
    // The default config passes the same check under the same limit.
    let fits = dir.path().join("fits.toml");
    std::fs::write(&fits, config_text(&hello())).unwrap();
    let out = run(under_ulimit(256), &["check-config"], &fits);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
