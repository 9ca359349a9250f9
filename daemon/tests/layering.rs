//! The layering picture in `src/lib.rs` is enforced, not just drawn: every module the source of
//! a module names (`crate::x::…` paths and grouped `use crate::{x, y::…}` alike; comments and
//! doc comments do not count) must be on a lower layer. The directory modules with a picture of
//! their own (`sync/`, `control/`: a tokio shell above sans-IO cores) are checked against it
//! too: a core never reaches up into its shell. A new module must be given a layer here (the
//! test fails until it is).

use std::collections::BTreeMap;
use std::path::Path;

/// Top-level modules by layer, highest first (as in `src/lib.rs`).
const LAYERS: &[&[&str]] = &[
    &["lifecycle"],
    &["ingress", "control", "sync", "housekeeping", "notify"],
    // The registry origin: control (deploy) and sync (last resort) both pull through it; the
    // pieces of a blob being fetched, which sync keeps and control serves to peers.
    // The node's side of the piece exchange (what it holds in part, what peers hold, upload
    // slots): sync feeds it, control serves from it.
    &["registry_origin", "pieces", "piece_exchange"],
    &["deployments"],
    &["serving"],
    // preflight (`edged check-config`) may use what functions and hosts use, nothing above.
    &["preflight"],
    &["functions"],
    &["runtime"],
    &["fault"],
    &["sandbox", "metrics", "events"],
    // Bodies, the epoch clock, locking, sizing the engine's pool and the log guests write to
    // use no module.
    // The piece exchange's decisions (sans IO) too.
    &[
        "body",
        "epoch",
        "lock",
        "guest_output",
        "pool_sizing",
        "swarm",
        "memory",
    ],
];

/// The pictures inside directory modules, highest first: `mod` is the directory's `mod.rs`
/// (and the items it defines). Shells on top, the sans-IO cores they feed below. Files on one
/// line import none of each other, except on `mod`'s line: a shell spread over several files.
const SUB_LAYERS: &[(&str, &[&[&str]])] = &[
    (
        "sync",
        &[
            // The tokio shell: `fetch.rs` is more of `Syncer`'s methods.
            &["mod", "fetch"],
            // Sans-IO cores: fed `now` and answers, touching no socket, clock or file.
            &["policy"],
        ],
    ),
    (
        "control",
        &[
            &["mod"],
            &["push", "peer_serving"],
            // The push sessions' sans-IO core.
            &["push_session"],
        ],
    ),
    (
        "runtime",
        &[
            // The dispatch: one `Runtime` a function.
            &["mod"],
            // One module a kind of runtime.
            &["command", "fresh", "reused"],
            // Who answers for a shared instance's fault (sans IO).
            &["lost"],
            // What every kind makes its instances with.
            &["setup"],
        ],
    ),
    (
        "deployments",
        &[
            &["mod"],
            // The admission and sequencing rules, fed plain data.
            &["rules"],
        ],
    ),
];

fn layer_in(layers: &[&[&str]], module: &str) -> Option<usize> {
    layers.iter().position(|layer| layer.contains(&module))
}

fn layer_of(module: &str) -> Option<usize> {
    layer_in(LAYERS, module)
}

/// `text` without its comments (line, doc and block comments) and without the contents of its
/// string and character literals: a path written in a message is not a use, and a `"//"` inside
/// a string does not start a comment.
fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    if let Some(escaped) = chars.next() {
                        out.push(escaped);
                    }
                }
                '"' => {
                    in_string = false;
                    out.push(c);
                }
                _ => {}
            }
            continue;
        }
        if c == '\'' {
            // A character literal (`'"'`, `'\''`), not a lifetime: skip it whole.
            let mut ahead = chars.clone();
            let literal = match ahead.next() {
                Some('\\') => ahead.nth(1) == Some('\''),
                Some(_) => ahead.next() == Some('\''),
                None => false,
            };
            if literal {
                let skip = if chars.peek() == Some(&'\\') { 3 } else { 2 };
                for _ in 0..skip {
                    chars.next();
                }
                out.push_str("' '");
                continue;
            }
        }
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut depth = 1;
                while depth > 0 {
                    match chars.next() {
                        Some('*') if chars.peek() == Some(&'/') => {
                            chars.next();
                            depth -= 1;
                        }
                        Some('/') if chars.peek() == Some(&'*') => {
                            chars.next();
                            depth += 1;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            }
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The names a path prefix such as `crate::` is followed by in `text` (comments already gone):
/// `crate::a::X` gives `a`, a grouped `crate::{a::X, b, c::{D}}` gives `a`, `b` and `c`.
fn names_after(text: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, m) in text.match_indices(prefix) {
        // `a::crate::x` is not a path from the crate root (nor `foo_super::`).
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = text[at + m.len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start => {
                        start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() {
                            names.push(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// The modules `text` names as `crate::<name>`.
fn crate_paths(text: &str) -> Vec<String> {
    names_after(&without_comments(text), "crate::")
}

/// Source text of each top-level module (a directory module's files together), and of each
/// file of a directory module on its own (keyed `dir/file`).
fn modules(src: &Path) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut modules: BTreeMap<String, String> = BTreeMap::new();
    let mut files = BTreeMap::new();
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
            let parts: Vec<String> = relative
                .components()
                .map(|c| {
                    c.as_os_str()
                        .to_string_lossy()
                        .trim_end_matches(".rs")
                        .to_string()
                })
                .collect();
            let top = parts[0].clone();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            if parts.len() == 2 {
                files.insert(format!("{top}/{}", parts[1]), text.clone());
            }
            modules.entry(top).or_default().push_str(&text);
        }
    }
    (modules, files)
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (modules, _) = modules(&src);
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
fn inside_a_directory_module_cores_never_reach_up_into_their_shell() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (_, files) = modules(&src);
    let mut problems = Vec::new();
    for (path, text) in &files {
        let (dir, file) = path.split_once('/').unwrap();
        let Some((_, layers)) = SUB_LAYERS.iter().find(|(d, _)| *d == dir) else {
            problems.push(format!(
                "directory module `{dir}` has no picture in tests/layering.rs SUB_LAYERS"
            ));
            continue;
        };
        let Some(own) = layer_in(layers, file) else {
            problems.push(format!(
                "`{dir}/{file}.rs` has no layer in tests/layering.rs SUB_LAYERS"
            ));
            continue;
        };
        let text = without_comments(text);
        let siblings = names_after(&text, "super::")
            .into_iter()
            .chain(names_after(&text, &format!("crate::{dir}::")));
        for used in siblings {
            // `super::Item` names something `mod.rs` defines.
            let used = if layer_in(layers, &used).is_some() {
                used
            } else {
                "mod".to_string()
            };
            if used == file {
                continue;
            }
            let layer = layer_in(layers, &used).unwrap();
            // The shell's own line may be spread over files that share its items.
            let shell_line = layers[own].contains(&"mod");
            if layer < own || (layer == own && !shell_line) {
                problems.push(format!(
                    "`{dir}/{file}.rs` uses `{dir}::{used}`, which is not below it"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_a_violation() {
    assert_eq!(
        crate_paths("use crate::serving::Serving; crate::events::DeploymentSource"),
        ["serving", "events"]
    );
    assert!(layer_of("serving") > layer_of("deployments"));
}

#[test]
fn grouped_uses_count_and_comments_do_not() {
    let text = "use crate::{serving::Serving, events, metrics::{self, X}};\n\
                /// See [`crate::lifecycle::run`].\n\
                // crate::ingress is mentioned here only\n\
                /* crate::sync */ let s = \"crate::control // not a comment\";";
    assert_eq!(crate_paths(text), ["serving", "events", "metrics"]);
    assert_eq!(
        names_after("use super::{policy::A, Syncer};", "super::"),
        ["policy", "Syncer"]
    );
    assert_eq!(
        names_after("edged_x::crate::y", "crate::"),
        Vec::<String>::new()
    );
}
