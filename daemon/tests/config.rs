//! End-to-end: the real `edged check-config` on configs written to a temp dir, one case per
//! finding of issue #18 class 8 (numbers that wrapped, a zero body limit, files start could not
//! use), and the real daemon refusing to start on a value that used to wrap.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::guest;

/// 2^44 + 1 MiB was a 1 MiB limit after `<< 20`; 2^54 KiB was a 0-byte body limit after `* 1024`.
const WRAP_44: u64 = (1 << 44) + 1;
const WRAP_54: u64 = 1 << 54;

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Writes `config` to `<tmp>/edged.toml` (after `setup` prepared the dir) and runs
/// `edged check-config` on it.
fn check_config(config: &str, setup: impl FnOnce(&Path)) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let path = dir.path().join("edged.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edged"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr)
            .replace(&*dir.path().to_string_lossy(), "<tmp>"),
    }
}

/// Asserts exit code 1 and that some line of stderr contains every one of `wanted`.
fn assert_refused(checked: &Checked, wanted: &[&str]) {
    assert_eq!(
        checked.code,
        Some(1),
        "expected a refusal, got stdout {:?} stderr {:?}",
        checked.stdout,
        checked.stderr
    );
    assert!(
        checked
            .stderr
            .lines()
            .any(|line| wanted.iter().all(|w| line.contains(w))),
        "no stderr line has all of {wanted:?}:\n{}",
        checked.stderr
    );
}

fn node() -> &'static str {
    "[node]\nstate_dir = \"state\"\nhttp_listen = \"127.0.0.1:0\"\n\n"
}

fn hello_with(extra: &str) -> String {
    format!(
        "{}[[function]]\nname = \"hello\"\nwasm = {}\nroute = \"/hello\"\n{extra}",
        node(),
        guest("hello-http.wasm")
    )
}

/// A real fleet identity in `<dir>/id`: CA, operator signing key, node certificate and key.
fn write_identity(dir: &Path) {
    let id = dir.join("id");
    edged_control::identity::init_operator_dir(&id, "op").unwrap();
    edged_control::identity::issue_node_files(&id, "node", &id).unwrap();
}

const CONTROL: &str = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n\
                       trusted_keys = [\"id/signing.pub\"]\n";

#[test]
fn a_good_config_is_ok() {
    let config = format!("{}\n{CONTROL}", hello_with("init = \"auto\"\n"));
    let checked = check_config(&config, write_identity);
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    assert!(
        checked
            .stdout
            .trim_end()
            .ends_with("edged.toml: ok (1 function)"),
        "{}",
        checked.stdout
    );

    // dev_identity creates the fleet on start, so an empty identity dir is fine then.
    let config = format!(
        "{}[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\ndev_identity = true\n",
        node()
    );
    let checked = check_config(&config, |_| {});
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    assert!(
        checked.stdout.contains("ok (0 functions)"),
        "{}",
        checked.stdout
    );
}

#[test]
fn wrapping_memory_is_refused_with_its_line() {
    let checked = check_config(
        &hello_with(&format!("[function.limits]\nmemory_mib = {WRAP_44}\n")),
        |_| {},
    );
    assert_refused(
        &checked,
        &[&format!(
            "edged.toml:10: limits.memory_mib must be between 1 and 1024 (the engine's \
             max_memory_mib), not {WRAP_44}"
        )],
    );
}

#[test]
fn wrapping_and_zero_body_limits_are_refused() {
    for value in [WRAP_54, 0] {
        let checked = check_config(
            &hello_with(&format!("[function.limits]\nmax_body_kib = {value}\n")),
            |_| {},
        );
        assert_refused(
            &checked,
            &[&format!(
                "edged.toml:10: limits.max_body_kib must be between 1 and 1048576 (1 GiB), \
                 not {value}"
            )],
        );
    }
}

#[test]
fn a_huge_reservation_is_refused_for_itself() {
    let config = format!(
        "{}[engine]\nmemory_reservation_mib = {}\n",
        node(),
        1u64 << 44
    );
    let checked = check_config(&config, |_| {});
    assert_refused(
        &checked,
        &["edged.toml:6: memory_reservation_mib must be between 1 and 16384"],
    );
}

#[test]
fn a_non_wasm_file_is_refused() {
    let config = format!(
        "{}[[function]]\nname = \"text\"\nwasm = \"notes.txt\"\nroute = \"/t\"\n\n\
         [[function]]\nname = \"junk\"\nwasm = \"junk.wasm\"\nroute = \"/j\"\n\n\
         [[function]]\nname = \"broken\"\nwasm = \"broken.wasm\"\nroute = \"/b\"\n",
        node()
    );
    let checked = check_config(&config, |dir| {
        std::fs::write(dir.join("notes.txt"), "hello, not WAT\n").unwrap();
        std::fs::write(dir.join("junk.wasm"), [0xff, 0xfe, 0x00, 0x01, 0x02]).unwrap();
        // The magic and version of a core module, then a section that is not one.
        std::fs::write(
            dir.join("broken.wasm"),
            [
                0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x05, 0xff,
            ],
        )
        .unwrap();
    });
    assert_refused(
        &checked,
        &["function `text`", "notes.txt", "WAT text does not parse"],
    );
    assert_refused(
        &checked,
        &[
            "function `junk`",
            "junk.wasm",
            "expected the `\\0asm` magic",
        ],
    );
    assert_refused(
        &checked,
        &["function `broken`", "broken.wasm", "invalid core module"],
    );
    // One line per problem.
    assert_eq!(checked.stderr.lines().count(), 3, "{}", checked.stderr);
}

#[test]
fn a_missing_init_export_is_refused() {
    let checked = check_config(&hello_with("init = \"setup\"\n"), |_| {});
    assert_refused(
        &checked,
        &[
            "function `hello`",
            "init = \"setup\"",
            "hello-http.wasm does not export a function `setup`",
        ],
    );
    // The export a guest does have passes.
    let config = format!(
        "{}[[function]]\nname = \"heavy\"\nwasm = {}\nroute = \"/h\"\ninit = \"wizer-initialize\"\n",
        node(),
        guest("init-heavy-http.wasm")
    );
    let checked = check_config(&config, |_| {});
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
}

#[test]
fn a_state_dir_that_is_a_file_is_refused() {
    let checked = check_config(&hello_with(""), |dir| {
        std::fs::write(dir.join("state"), "not a directory").unwrap();
    });
    assert_refused(
        &checked,
        &["state_dir <tmp>/state", "exists and is not a directory"],
    );

    let config = hello_with("").replace("state_dir = \"state\"", "state_dir = \"file/state\"");
    let checked = check_config(&config, |dir| {
        std::fs::write(dir.join("file"), "not a directory").unwrap();
    });
    assert_refused(
        &checked,
        &[
            "state_dir <tmp>/file/state",
            "cannot be created: <tmp>/file is not a directory",
        ],
    );
}

#[test]
fn missing_identity_files_are_refused() {
    let config = format!("{}{CONTROL}", node());
    let checked = check_config(&config, |dir| std::fs::create_dir(dir.join("id")).unwrap());
    assert_refused(
        &checked,
        &[
            "[control] identity_dir <tmp>/id",
            "<tmp>/id/ca.pem: No such file",
        ],
    );
    assert_refused(
        &checked,
        &[
            "[control] trusted_keys <tmp>/id/signing.pub",
            "No such file",
        ],
    );

    // A CA but no certificate for this node_name.
    let config = config.replace(
        "identity_dir = \"id\"",
        "identity_dir = \"id\"\nnode_name = \"box7\"",
    );
    let checked = check_config(&config, write_identity);
    assert_refused(
        &checked,
        &["(node_name `box7`)", "<tmp>/id/box7.pem: No such file"],
    );

    // A trusted key file that is not a key.
    let checked = check_config(&format!("{}{CONTROL}", node()), |dir| {
        write_identity(dir);
        std::fs::write(dir.join("id/signing.pub"), "not hex").unwrap();
    });
    assert_refused(&checked, &["[control] trusted_keys <tmp>/id/signing.pub"]);
}

/// `--no-files` (install.sh under DESTDIR, where paths are the target's) checks values only.
#[test]
fn no_files_checks_values_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state"), "a file").unwrap();
    let path = dir.path().join("edged.toml");
    let run = |config: &str| {
        std::fs::write(&path, config).unwrap();
        Command::new(env!("CARGO_BIN_EXE_edged"))
            .args(["check-config", "--no-files"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = run(&hello_with(""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&hello_with("[function.limits]\nmax_body_kib = 0\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_body_kib"));
}

/// Start parses the same way: the daemon exits at once with the message check-config prints.
#[test]
fn the_daemon_refuses_to_start_on_a_wrapping_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edged.toml");
    std::fs::write(
        &path,
        hello_with(&format!("[function.limits]\nmemory_mib = {WRAP_44}\n")),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edged"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("edged started on a config with memory_mib = {WRAP_44}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("edged listening"),
        "it served"
    );
    assert!(
        stderr.contains(&format!(
            "edged.toml:10: limits.memory_mib must be between 1 and 1024 (the engine's \
             max_memory_mib), not {WRAP_44}"
        )),
        "{stderr}"
    );
}

/// What start refuses when it composes or links is refused by check-config too, naming the
/// function and the part: a chain with a wasi:http 0.2 app, a component importing what no node
/// links (alone or in a chain), a component that is no guest kind the node runs.
#[test]
fn chains_and_imports_start_would_refuse_are_refused() {
    let foreign = r#"(component
        (import "acme:kv/store@1.0.0" (instance))
        (instance $h)
        (export "wasi:http/handler@0.3.0" (instance $h)))"#;
    let no_handler = "(component)";
    let config = format!(
        "{}[[function]]\nname = \"p2chain\"\nwasm = {}\nroute = \"/a\"\nmiddleware = [{}]\n\n\
         [[function]]\nname = \"kv\"\nwasm = \"kv.wat\"\nroute = \"/kv\"\n\n\
         [[function]]\nname = \"kvchain\"\nwasm = \"kv.wat\"\nroute = \"/kvc\"\nmiddleware = [{}]\n\n\
         [[function]]\nname = \"empty\"\nwasm = \"empty.wat\"\nroute = \"/e\"\n\n\
         [[function]]\nname = \"fine\"\nwasm = {}\nroute = \"/f\"\nmiddleware = [{}]\n",
        node(),
        guest("hello-http.wasm"),
        guest("p3-auth.wasm"),
        guest("p3-auth.wasm"),
        guest("p3-hello.wasm"),
        guest("p3-auth.wasm"),
    );
    let checked = check_config(&config, |dir| {
        std::fs::write(dir.join("kv.wat"), foreign).unwrap();
        std::fs::write(dir.join("empty.wat"), no_handler).unwrap();
    });
    assert_refused(
        &checked,
        &[
            "function `p2chain`",
            "app `hello-http.wasm` (part 2 of 2): it is a wasi:http 0.2 component",
        ],
    );
    assert_refused(
        &checked,
        &[
            "function `kv`",
            "imports `acme:kv/store@1.0.0`, which no edged node links",
        ],
    );
    assert_refused(
        &checked,
        &[
            "function `kvchain`",
            "app `kv.wat` (part 2 of 2): it imports `acme:kv/store@1.0.0`",
        ],
    );
    assert_refused(
        &checked,
        &[
            "function `empty`",
            "a component must export `wasi:http/handler@0.3.x`",
        ],
    );
    assert!(
        !checked.stderr.contains("function `fine`"),
        "{}",
        checked.stderr
    );
}
