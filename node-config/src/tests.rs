//! Loading and validating whole config files: each rule, the error and line it reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::*;

fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
    NodeConfig::parse(text, "edged.toml", Path::new(env!("CARGO_MANIFEST_DIR")))
}

#[test]
fn dev_default_parses() {
    let c = NodeConfig::dev_default(Path::new("/tmp/x"));
    assert_eq!(c.http_listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.state_dir, PathBuf::from("/tmp/x/.edged-dev"));
    assert!(c.functions.is_empty());
    let control = c.control.unwrap();
    assert!(control.dev_identity);
    assert_eq!(
        control.trusted_keys,
        vec![PathBuf::from("/tmp/x/.edged-dev/identity/signing.pub")]
    );
}

#[test]
fn example_config_parses() {
    // The example points at a sample guest; make sure it is built.
    edged_testkit::guest("hello-http.wasm");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(dir.join("edged.example.toml")).unwrap();
    let c = NodeConfig::parse(&text, "edged.example.toml", dir).unwrap();
    assert_eq!(c.functions.len(), 1);
    let f = &c.functions[0];
    assert_eq!(f.route, "/hello");
    assert_eq!(f.limits.timeout, Duration::from_millis(2000));
    assert_eq!(f.env.get("GREETING").map(String::as_str), Some("hi"));
}

#[test]
fn unknown_key_names_file_and_line() {
    let err = parse("[node]\nhttp_listen = \"127.0.0.1:1\"\nfrobnicate = 3\n").unwrap_err();
    assert_eq!(err.file, "edged.toml");
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.reason.contains("frobnicate"), "{err}");
}

#[test]
fn bad_values_name_the_line_and_reason() {
    let err = parse("[node]\n\nhttp_listen = \"localhost\"\n").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.reason.contains("http_listen"), "{err}");

    let text = "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
                [function.limits]\nmemory_mib = 999999\n";
    let err = parse(text).unwrap_err();
    assert_eq!(err.line, Some(6), "{err}");
    assert!(err.reason.contains("memory_mib"), "{err}");

    let text = "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
                [[function]]\nname = \"b\"\nwasm = \"Cargo.toml\"\nroute = \"/a/\"\n";
    let err = parse(text).unwrap_err();
    assert_eq!(err.line, Some(8), "{err}");
    assert!(
        err.reason.contains("already served by function `a`"),
        "{err}"
    );

    let err =
        parse("[[function]]\nname = \"a\"\nwasm = \"nope.wasm\"\nroute = \"/a\"\n").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.to_string().starts_with("edged.toml:3: wasm"), "{err}");
}

#[test]
fn the_congestion_controller_is_bbr_unless_named_and_a_bad_name_is_refused_at_its_line() {
    let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
    let c = parse(control).unwrap().control.unwrap();
    assert_eq!(c.congestion, edged_control::Congestion::Bbr);
    let c = parse(&format!("{control}congestion = \"cubic\"\n"))
        .unwrap()
        .control
        .unwrap();
    assert_eq!(c.congestion, edged_control::Congestion::Cubic);
    let err = parse(&format!("{control}congestion = \"reno\"\n")).unwrap_err();
    assert_eq!(err.line, Some(4), "{err}");
    assert!(err.reason.contains("bbr, cubic or newreno"), "{err}");
}

#[test]
fn registry_table_is_validated_with_lines() {
    let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
    let c = parse(&format!(
        "{control}[registry]\nurl = \"http://127.0.0.1:5000\"\ncredentials_file = \"creds\"\n"
    ))
    .unwrap();
    let r = c.registry.unwrap();
    assert_eq!((r.host.as_str(), r.plain_http), ("127.0.0.1:5000", true));
    assert!(r.credentials_file.unwrap().ends_with("creds"));
    assert_eq!((r.ca_file, r.max_rate_bytes), (None, None));
    let r = parse(&format!(
        "{control}[registry]\nurl = \"https://reg.example/\"\nmax_rate_mb = 2\n"
    ))
    .unwrap()
    .registry
    .unwrap();
    assert_eq!((r.host.as_str(), r.plain_http), ("reg.example", false));
    assert_eq!(r.max_rate_bytes, Some(2_000_000));

    for (url, why) in [
        ("ftp://reg", "https://"),
        ("https://reg/apps", "without a path"),
        ("https://reg:http", "port"),
    ] {
        let err = parse(&format!("{control}[registry]\n\nurl = \"{url}\"\n")).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.reason.contains(why), "{url}: {err}");
    }
    let err = parse(&format!(
        "{control}[registry]\nurl = \"http://r\"\nmax_rate_mb = -1\n"
    ))
    .unwrap_err();
    assert_eq!(err.line, Some(6), "{err}");
    let err = parse("[registry]\nurl = \"http://r\"\n").unwrap_err();
    assert_eq!(err.line, Some(1), "{err}");
    assert!(err.reason.contains("[control]"), "{err}");
    let err = parse(&format!(
        "{control}[registry]\nurl = \"http://r\"\npassword = \"x\"\n"
    ))
    .unwrap_err();
    assert!(err.reason.contains("password"), "{err}");
}

#[test]
fn middleware_files_are_resolved_in_order_and_each_must_exist() {
    let ok = parse(
        "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
         middleware = [\"src/lib.rs\", \"Cargo.toml\"]\n",
    )
    .unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        ok.functions[0].middleware,
        [dir.join("src/lib.rs"), dir.join("Cargo.toml")]
    );
    let none =
        parse("[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n").unwrap();
    assert!(none.functions[0].middleware.is_empty());

    let err = parse(
        "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n\
         middleware = [\n  \"Cargo.toml\",\n  \"auth.wasm\",\n]\n",
    )
    .unwrap_err();
    assert_eq!(err.line, Some(7), "{err}");
    assert!(
        err.to_string().starts_with("edged.toml:7: middleware `"),
        "{err}"
    );
    assert!(
        err.reason.ends_with("auth.wasm` is not a readable file"),
        "{err}"
    );
}

#[test]
fn sync_table_is_validated_with_lines() {
    let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
    let c = parse(&format!(
        "{control}[sync]\npeers = [\"10.0.0.2:7443\", \"box7.lan:7443\"]\nmax_rate_mb = 2.5\n"
    ))
    .unwrap();
    let sync = c.sync.unwrap();
    assert_eq!(sync.peers, ["10.0.0.2:7443", "box7.lan:7443"]);
    assert_eq!(sync.interval, Duration::from_secs(30));
    assert_eq!(sync.max_rate_bytes, Some(2_500_000));

    let err = parse(&format!("{control}[sync]\npeers = [\n  \"10.0.0.2\",\n]\n")).unwrap_err();
    assert_eq!(err.line, Some(6), "{err}");
    assert!(err.reason.contains("host:port"), "{err}");

    let err = parse(&format!("{control}[sync]\ninterval_ms = 5\n")).unwrap_err();
    assert_eq!(err.line, Some(5), "{err}");

    let err = parse("[sync]\npeers = []\n").unwrap_err();
    assert_eq!(err.line, Some(1), "{err}");
    assert!(err.reason.contains("[control]"), "{err}");
}

/// Values that wrapped when scaled to bytes before: 2^44 + 1 MiB is 1 MiB after `<< 20`,
/// and 2^54 KiB is 0 after `* 1024`.
const WRAP_44: u64 = (1 << 44) + 1;
const WRAP_54: u64 = 1 << 54;

/// A config whose table `[section]` sets `key = value`, after `context` lines in the same
/// table; the key's line is returned with it.
fn config_with(section: &str, context: &str, key: &str, value: &str) -> (String, usize) {
    let function = "[[function]]\nname = \"a\"\nwasm = \"Cargo.toml\"\nroute = \"/a\"\n";
    let control = "[control]\nlisten = \"127.0.0.1:0\"\nidentity_dir = \"id\"\n";
    let mut text = String::new();
    match section {
        "function.limits" | "function.instances" => text.push_str(function),
        "sync" => text.push_str(control),
        _ => {}
    }
    text.push_str(&format!("[{section}]\n{context}"));
    let line = text.matches('\n').count() + 1;
    text.push_str(&format!("{key} = {value}\n"));
    (text, line)
}

/// Every bounded number: (table, other lines the case needs, key, lowest, highest).
const BOUNDS: &[(&str, &str, &str, u64, u64)] = &[
    ("node", "", "drain_timeout_ms", 0, MAX_DRAIN_TIMEOUT_MS),
    ("node", "", "epoch_tick_ms", 1, 1000),
    ("node", "", "cache_capacity", 1, MAX_CACHE_CAPACITY as u64),
    (
        "engine",
        "max_memory_mib = 1\n",
        "memory_reservation_mib",
        1,
        MAX_MEMORY_RESERVATION_MIB,
    ),
    ("engine", "", "memory_guard_mib", 0, MAX_MEMORY_GUARD_MIB),
    // Up to the reservation (default 4096).
    ("engine", "", "max_memory_mib", 1, 4096),
    ("engine", "", "total_instances", 1, MAX_INSTANCES),
    // Small slots, so a million of them fit the address space.
    (
        "engine",
        "memory_reservation_mib = 64\nmemory_guard_mib = 0\nmax_memory_mib = 64\n",
        "total_memories",
        1,
        MAX_INSTANCES,
    ),
    // Up to the engine's max_memory_mib (default 1024).
    ("function.limits", "", "memory_mib", 1, 1024),
    ("function.limits", "", "timeout_ms", 1, MAX_TIMEOUT_MS),
    (
        "function.limits",
        "",
        "max_concurrency",
        1,
        MAX_CONCURRENCY as u64,
    ),
    ("function.limits", "", "max_body_kib", 1, MAX_BODY_KIB),
    (
        "function.instances",
        "",
        "requests",
        1,
        MAX_REQUESTS_PER_INSTANCE,
    ),
    (
        "function.instances",
        "",
        "concurrent",
        1,
        MAX_CONCURRENT_PER_INSTANCE,
    ),
    (
        "function.instances",
        "",
        "idle_timeout_ms",
        1,
        MAX_IDLE_TIMEOUT_MS,
    ),
    ("sync", "", "interval_ms", 100, MAX_SYNC_INTERVAL_MS),
    ("sync", "", "max_transfers", 1, MAX_TRANSFERS as u64),
    (
        "sync",
        "",
        "max_transfers_per_peer",
        1,
        MAX_TRANSFERS as u64,
    ),
    ("sync", "", "max_uploads", 1, MAX_TRANSFERS as u64),
];

#[test]
fn every_number_is_range_checked_with_its_line() {
    for &(section, context, key, low, high) in BOUNDS {
        let mut accepted = vec![low, high];
        if high - low > 1 {
            accepted.push(low + 1);
            accepted.push(high - 1);
        }
        for value in accepted {
            let (text, _) = config_with(section, context, key, &value.to_string());
            if let Err(e) = parse(&text) {
                panic!("{section}.{key} = {value} refused: {e}\n{text}");
            }
        }
        let mut refused = vec![high + 1, WRAP_44, WRAP_54];
        if low > 0 {
            refused.push(low - 1);
        }
        for value in refused {
            let (text, line) = config_with(section, context, key, &value.to_string());
            let err = match parse(&text) {
                Ok(_) => panic!("{section}.{key} = {value} accepted\n{text}"),
                Err(e) => e,
            };
            assert_eq!(err.line, Some(line), "{section}.{key} = {value}: {err}");
            assert!(
                err.reason.contains(key) && err.reason.contains("between"),
                "{section}.{key} = {value}: {err}"
            );
            assert!(
                err.reason.ends_with(&format!("not {value}")),
                "{section}.{key} = {value}: the reason shows the value: {err}"
            );
        }
    }
}

#[test]
fn limits_scale_exactly_at_their_bounds() {
    let (text, _) = config_with(
        "function.limits",
        "",
        "max_body_kib",
        &MAX_BODY_KIB.to_string(),
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.functions[0].limits.max_body_bytes, 1 << 30);
    let (text, _) = config_with("function.limits", "", "memory_mib", "1024");
    let c = parse(&text).unwrap();
    assert_eq!(c.functions[0].limits.memory_bytes, 1 << 30);
    let (text, _) = config_with(
        "engine",
        "memory_guard_mib = 0\ntotal_memories = 1\n",
        "memory_reservation_mib",
        &MAX_MEMORY_RESERVATION_MIB.to_string(),
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.engine.memory_reservation_bytes, 16 << 30);
    assert_eq!(c.engine.memory_guard_bytes, 0);
}

#[test]
fn wrapping_memory_and_body_are_refused_not_shrunk() {
    // Before, 2^44 + 1 MiB became a 1 MiB cap and 2^54 KiB a 0-byte body limit.
    let (text, _) = config_with("function.limits", "", "memory_mib", &WRAP_44.to_string());
    let err = parse(&text).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "edged.toml:6: limits.memory_mib must be between 1 and 1024 (the engine's \
             max_memory_mib), not {WRAP_44}"
        )
    );
    let (text, _) = config_with("function.limits", "", "max_body_kib", &WRAP_54.to_string());
    let err = parse(&text).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "edged.toml:6: limits.max_body_kib must be between 1 and 1048576 (1 GiB), \
             not {WRAP_54}"
        )
    );
    let (text, _) = config_with("function.limits", "", "max_body_kib", "0");
    assert!(parse(&text).unwrap_err().reason.contains("max_body_kib"));
}

#[test]
fn instance_reuse_is_read_and_range_checked() {
    let (text, _) = config_with("function.instances", "", "requests", "1000");
    let c = parse(&format!("{text}concurrent = 8\nidle_timeout_ms = 250\n")).unwrap();
    assert_eq!(
        c.functions[0].instances,
        InstanceSetting {
            requests: Some(1000),
            concurrent: Some(8),
            idle_timeout: Some(Duration::from_millis(250)),
        }
    );
    let (text, _) = config_with("function.instances", "", "requests", "0");
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        "edged.toml:6: instances.requests must be between 1 and 1000000 (1 = a fresh \
         instance per request), not 0"
    );
    let (text, _) = config_with("function.instances", "", "concurrency", "2");
    assert!(
        parse(&text)
            .unwrap_err()
            .reason
            .contains("unknown field `concurrency`")
    );
    let (text, _) = config_with("function.limits", "", "timeout_ms", "100");
    assert_eq!(
        parse(&text).unwrap().functions[0].instances,
        InstanceSetting::default()
    );
}

#[test]
fn a_huge_reservation_is_refused_for_itself() {
    // 2^44 MiB wrapped to 0 bytes, and the error blamed max_memory_mib.
    let err = parse(&format!(
        "[engine]\nmemory_reservation_mib = {}\n",
        1u64 << 44
    ))
    .unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
    assert!(
        err.reason
            .starts_with("memory_reservation_mib must be between 1 and 16384"),
        "{err}"
    );
    let err = parse("[engine]\nmemory_reservation_mib = 512\n").unwrap_err();
    assert!(
        err.reason
            .starts_with("max_memory_mib must be between 1 and memory_reservation_mib (512;"),
        "{err}"
    );
}

#[test]
fn pool_slots_are_default_unless_set() {
    let c = parse("[engine]\nmemory_reservation_mib = 4096\n").unwrap();
    assert_eq!(c.engine.total_memories, None);
    assert_eq!(c.engine.total_instances, None);
    let c = parse("[engine]\ntotal_memories = 1000\n").unwrap();
    assert_eq!(c.engine.total_memories, Some(1000));
    assert_eq!(c.engine.total_instances, None);
    assert_eq!(
        NodeConfig::dev_default(Path::new("/"))
            .engine
            .total_memories,
        None
    );
}

#[test]
fn a_pool_larger_than_the_address_space_is_refused() {
    // 40000 × (4096 + 32) MiB ≈ 157 TiB.
    let err = parse("[engine]\ntotal_memories = 40000\n").unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
    assert!(err.reason.contains("128 TiB"), "{err}");
    parse("[engine]\ntotal_memories = 30000\n").unwrap();
}

#[test]
fn sync_rate_is_bounded_and_nan_refused() {
    for (value, ok) in [
        ("0", true),
        ("100000", true),
        ("100000.5", false),
        ("-1", false),
        ("nan", false),
        ("inf", false),
    ] {
        let (text, line) = config_with("sync", "", "max_rate_mb", value);
        match parse(&text) {
            Ok(_) => assert!(ok, "max_rate_mb = {value} accepted"),
            Err(e) => {
                assert!(!ok, "max_rate_mb = {value} refused: {e}");
                assert_eq!(e.line, Some(line), "{e}");
                assert!(e.reason.contains("max_rate_mb"), "{e}");
            }
        }
    }
}

#[test]
fn pushed_limits_are_clamped_not_wrapped() {
    let ok = LimitUnits {
        memory_mib: 128,
        timeout_ms: 5000,
        max_concurrency: 32,
        max_body_kib: 1024,
    };
    let (limits, notes) = Limits::clamped(ok);
    assert_eq!(limits, Limits::default());
    assert!(notes.is_empty(), "{notes:?}");

    let (limits, notes) = Limits::clamped(LimitUnits {
        memory_mib: WRAP_44,
        timeout_ms: u64::MAX,
        max_concurrency: usize::MAX,
        max_body_kib: WRAP_54,
    });
    assert_eq!(limits.memory_bytes, 16 << 30);
    assert_eq!(limits.timeout, Duration::from_millis(MAX_TIMEOUT_MS));
    assert_eq!(limits.max_concurrency, MAX_CONCURRENCY);
    assert_eq!(limits.max_body_bytes, 1 << 30);
    assert_eq!(notes.len(), 4, "{notes:?}");
    assert_eq!(
        notes[0],
        format!("limits.memory_mib {WRAP_44} is outside 1..=16384; using 16384")
    );

    let (limits, notes) = Limits::clamped(LimitUnits {
        memory_mib: 0,
        timeout_ms: 0,
        max_concurrency: 0,
        max_body_kib: 0,
    });
    assert_eq!(limits.memory_bytes, 1 << 20);
    assert_eq!(limits.timeout, Duration::from_millis(1));
    assert_eq!(limits.max_concurrency, 1);
    assert_eq!(limits.max_body_bytes, 1024);
    assert_eq!(notes.len(), 4, "{notes:?}");
}

#[test]
fn wrong_type_is_refused() {
    let err = parse("[node]\ndrain_timeout_ms = \"soon\"\n").unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
}
