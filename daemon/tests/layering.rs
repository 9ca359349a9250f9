//! The layering picture in `src/lib.rs` is enforced, not just drawn: every `crate::<module>`
//! path in a module's source must name a module on a lower layer. A new module must be given a
//! layer here (the test fails until it is).

use std::collections::BTreeMap;
use std::path::Path;

/// Top-level modules by layer, highest first (as in `src/lib.rs`).
const LAYERS: &[&[&str]] = &[
    &["lifecycle"],
    &[
        "ingress",
        "control",
        "sync",
        "housekeeping",
        "epoch",
        "notify",
    ],
    // The registry origin: control (deploy) and sync (last resort) both pull through it.
    &["origin"],
    &["deployments"],
    &["serving"],
    // preflight (`edged check-config`) may use what functions and hosts use, nothing above.
    &["invoke", "preflight"],
    &["functions"],
    &["instances"],
    &["fault"],
    &["host", "metrics", "events"],
    // Sizing the engine's pool (serving at start, preflight for check-config) and the log
    // guests write to (host hands it to their WASI contexts) use no module.
    &["guest_output", "pool"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Source text of each top-level module (a directory module's files together).
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut modules: BTreeMap<String, String> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let top = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            modules
                .entry(top)
                .or_default()
                .push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    modules
}

/// The modules `text` names as `crate::<name>`.
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(at, m)| {
            text[at + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(modules.len() > 10, "found only {modules:?}");
    let mut problems = Vec::new();
    for (module, text) in &modules {
        let Some(own) = layer_of(module) else {
            problems.push(format!("`{module}` has no layer in tests/layering.rs"));
            continue;
        };
        for used in crate_paths(text) {
            if used == *module {
                continue;
            }
            match layer_of(&used) {
                Some(layer) if layer > own => {}
                Some(_) => problems.push(format!(
                    "`{module}` uses `crate::{used}`, which is not below it"
                )),
                None => problems.push(format!("`{module}` uses unknown `crate::{used}`")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_a_violation() {
    assert_eq!(
        crate_paths("use crate::serving::Serving; crate::events::Origin"),
        ["serving", "events"]
    );
    assert!(layer_of("serving") > layer_of("deployments"));
}
