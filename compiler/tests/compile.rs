//! The compiler pipeline on real guests built from `guests/`.

use std::time::Duration;

use edged_compiler::{CompileError, CompileOptions, InitPolicy, Target, WasmKind, compile};
use edged_testkit::guest_bytes;

#[test]
fn init_heavy_p1_is_preinitialized_and_built_for_both_targets() {
    let source = guest_bytes("init-heavy-p1.wasm");
    let compiled = compile(&source, &CompileOptions::default()).unwrap();
    assert_eq!(compiled.kind, WasmKind::Module);
    assert_eq!(compiled.init_func.as_deref(), Some("wizer-initialize"));
    assert_ne!(compiled.preinitialized, compiled.source);
    // The snapshot carries the 4 MiB table as data, so it is much larger than the source.
    assert!(compiled.preinitialized.len() > source.len() + (4 << 20));
    let targets: Vec<Target> = compiled.artifacts.iter().map(|a| a.target).collect();
    assert_eq!(targets, Target::ALL.to_vec());
    let [x86, arm] = &compiled.artifacts[..] else {
        unreachable!()
    };
    assert_ne!(x86.fingerprint, arm.fingerprint);
    assert_ne!(x86.blake3, arm.blake3);
    assert_elf_machine(&x86.bytes, 62);
    assert_elf_machine(&arm.bytes, 183);
    assert_eq!(x86.blake3, edged_compiler::content_hash(&x86.bytes));
}

fn assert_elf_machine(bytes: &[u8], machine: u16) {
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), machine);
}

#[test]
fn output_is_byte_identical_across_builds() {
    let source = guest_bytes("init-heavy-p1.wasm");
    let first = compile(&source, &CompileOptions::default()).unwrap();
    let second = compile(&source, &CompileOptions::default()).unwrap();
    assert_eq!(first.preinitialized, second.preinitialized);
    for (a, b) in first.artifacts.iter().zip(&second.artifacts) {
        assert_eq!(a.target, b.target);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(
            a.blake3, b.blake3,
            "{} artifact differs between builds",
            a.target
        );
        assert!(a.bytes == b.bytes);
    }
}

#[test]
fn components_with_and_without_init_function() {
    let hello = compile(&guest_bytes("hello-http.wasm"), &CompileOptions::default()).unwrap();
    assert_eq!(hello.kind, WasmKind::Component);
    assert_eq!(hello.init_func, None);
    assert_eq!(hello.preinitialized, hello.source);
    assert_eq!(hello.artifacts.len(), 2);

    let heavy = compile(
        &guest_bytes("init-heavy-http.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    assert_eq!(heavy.kind, WasmKind::Component);
    assert_eq!(heavy.init_func.as_deref(), Some("wizer-initialize"));
    assert!(heavy.preinitialized.len() > heavy.source.len() + (4 << 20));
}

#[test]
fn no_wizer_skips_preinitialization() {
    let source = guest_bytes("init-heavy-p1.wasm");
    let options = CompileOptions {
        init: InitPolicy::Skip,
        targets: vec![Target::X86_64Linux],
        ..CompileOptions::default()
    };
    let compiled = compile(&source, &options).unwrap();
    assert_eq!(compiled.init_func, None);
    assert_eq!(compiled.preinitialized, source);
    assert_eq!(compiled.artifacts.len(), 1);
}

#[test]
fn random_bytes_are_not_wasm() {
    let err = compile(
        &[0x13, 0x37, 0xAB, 0xCD, 1, 2, 3],
        &CompileOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, CompileError::NotWasm(_)), "{err}");
    assert!(err.to_string().contains("\\0asm"), "{err}");
}

#[test]
fn invalid_module_names_reason_and_offset() {
    // Header, then a function section declaring a function whose type does not exist.
    let bytes = [0, b'a', b's', b'm', 1, 0, 0, 0, 3, 2, 1, 7];
    let err = compile(&bytes, &CompileOptions::default()).unwrap_err();
    let CompileError::Invalid { kind, reason } = &err else {
        panic!("expected Invalid, got {err}")
    };
    assert_eq!(*kind, WasmKind::Module);
    assert!(reason.contains("offset"), "{reason}");
    assert!(
        reason.contains("type index out of bounds") || reason.contains("type"),
        "{reason}"
    );
}

#[test]
fn init_that_calls_an_import_is_refused_naming_it() {
    let err = compile(
        &guest_bytes("init-calls-import.wat"),
        &CompileOptions::default(),
    )
    .unwrap_err();
    match &err {
        CompileError::InitCalledImport { init, import } => {
            assert_eq!(init, "wizer-initialize");
            assert_eq!(import, "wasi_snapshot_preview1::random_get");
        }
        other => panic!("expected InitCalledImport, got {other}"),
    }
    assert!(
        err.to_string()
            .contains("not available during pre-initialization")
    );
}

#[test]
fn explicit_init_function_must_exist() {
    let options = CompileOptions {
        init: InitPolicy::Required("setup".into()),
        ..CompileOptions::default()
    };
    let err = compile(&guest_bytes("init-heavy-p1.wasm"), &options).unwrap_err();
    assert!(
        matches!(&err, CompileError::MissingInitFunc(f) if f == "setup"),
        "{err}"
    );
}

#[test]
fn runaway_init_is_cut_off() {
    let wat = br#"(module
        (memory (export "memory") 1)
        (func (export "wizer-initialize") (loop $l (br $l)))
        (func (export "_start")))"#;
    let options = CompileOptions {
        init_timeout: Duration::from_millis(300),
        targets: vec![Target::X86_64Linux],
        ..CompileOptions::default()
    };
    let err = compile(wat, &options).unwrap_err();
    assert!(matches!(err, CompileError::InitTimeout { .. }), "{err}");
}

#[test]
fn target_names_parse() {
    assert_eq!("aarch64".parse::<Target>().unwrap(), Target::Aarch64Linux);
    assert_eq!(
        "x86_64-unknown-linux-gnu".parse::<Target>().unwrap(),
        Target::X86_64Linux
    );
    assert!("riscv64".parse::<Target>().is_err());
}

#[test]
fn init_exports_are_found_at_the_top_level_only() {
    use edged_compiler::exports_function;
    let component = guest_bytes("init-heavy-http.wasm");
    assert!(exports_function(&component, "wizer-initialize"));
    assert!(!exports_function(&component, "setup"));
    let module = guest_bytes("init-heavy-p1.wasm");
    assert!(exports_function(&module, "wizer-initialize"));
    // `_start` is a function export; `memory` is not a function.
    assert!(exports_function(&module, "_start"));
    assert!(!exports_function(&module, "memory"));
    assert!(!exports_function(b"not wasm", "wizer-initialize"));
}

#[test]
fn guest_kinds_are_read_from_exports() {
    use edged_compiler::GuestKind;
    let options = CompileOptions {
        targets: vec![Target::host().unwrap()],
        ..CompileOptions::default()
    };
    for (file, kind) in [
        ("probe-p1.wasm", GuestKind::P1Command),
        ("hello-http.wasm", GuestKind::HttpP2),
        ("p3-hello.wasm", GuestKind::HttpP3),
        ("p3-echo.wasm", GuestKind::HttpP3),
    ] {
        let prepared = edged_compiler::prepare(&guest_bytes(file), &options).unwrap();
        assert_eq!(prepared.guest, kind, "{file}");
    }
}

#[test]
fn a_component_serving_no_wasi_http_version_is_refused_by_name() {
    let err = compile(
        br#"(component (core module $m (func (export "f"))) (core instance (instantiate $m)))"#,
        &CompileOptions::default(),
    )
    .unwrap_err();
    let CompileError::Invalid { reason, .. } = &err else {
        panic!("expected Invalid, got {err:?}")
    };
    assert!(reason.contains("wasi:http/handler@0.3.x"), "{reason}");
    assert!(reason.contains("exports nothing"), "{reason}");
}

#[test]
fn a_p3_component_with_an_init_function_is_preinitialized() {
    let heavy = compile(
        &guest_bytes("p3-init-heavy.wasm"),
        &CompileOptions::default(),
    )
    .unwrap();
    assert_eq!(heavy.guest, edged_compiler::GuestKind::HttpP3);
    assert_eq!(heavy.init_func.as_deref(), Some("wizer-initialize"));
    assert!(heavy.warnings.is_empty(), "{:?}", heavy.warnings);
    // The snapshot carries the 4 MiB table as data.
    assert!(heavy.preinitialized.len() > heavy.source.len() + (4 << 20));
    assert_eq!(heavy.artifacts.len(), 2);
}
