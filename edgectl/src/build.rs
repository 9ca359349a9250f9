//! `edgectl build`: the compiler pipeline to files on disk; and the pipeline as `build` and
//! `push` both run it, step by step through the compile cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use edged_artifacts::Manifest;
use edged_compiler::{
    Artifact, CompileOptions, Compiled, GuestKind, InitPolicy, StepTimings, Target, WasmKind,
};
use serde::{Deserialize, Serialize};

use crate::cache::{self, CompileCache, Key, Lookup};

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The core module (WASI preview 1) or component (WASI 0.2) to build.
    pub input: PathBuf,
    /// Output directory (created if missing).
    #[arg(short, long, default_value = "out")]
    pub out: PathBuf,
    /// Deployment name; defaults to the input's file stem.
    #[arg(long)]
    pub name: Option<String>,
    /// Deployment version (monotonic per name).
    #[arg(long, default_value_t = 1)]
    pub version: u64,
    /// A wasi:http 0.3 middleware to put in front of the input (repeat; outermost first): the
    /// parts are composed into one component, the input last.
    #[arg(long, value_name = "WASM")]
    pub middleware: Vec<PathBuf>,
    #[command(flatten)]
    pub compile: CompileArgs,
    /// Print the manifest as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How to compile; shared by `build` and `push`.
#[derive(clap::Args)]
pub struct CompileArgs {
    /// Init function to pre-initialize with (default: `wizer-initialize` when exported).
    #[arg(long, conflicts_with = "no_wizer")]
    pub init_func: Option<String>,
    /// Do not pre-initialize, even if the input exports an init function.
    #[arg(long)]
    pub no_wizer: bool,
    /// Targets to compile for (default: all).
    #[arg(long = "target", value_name = "TRIPLE")]
    pub targets: Vec<String>,
}

/// Where the compile cache is; shared by `build`, `push` and `cache`.
#[derive(clap::Args, Clone)]
pub struct CacheArgs {
    /// Compile cache directory (default: `$XDG_CACHE_HOME/edged`, or `~/.cache/edged`).
    #[arg(long, env = "EDGECTL_CACHE_DIR", global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile everything, neither reading nor writing the compile cache.
    #[arg(long, global = true)]
    pub no_cache: bool,
}

impl CacheArgs {
    /// The cache to use, or `None` with `--no-cache` (or when there is no cache directory).
    pub fn open(&self) -> Option<CompileCache> {
        if self.no_cache {
            return None;
        }
        let root = self.cache_dir.clone().or_else(cache::default_root);
        if root.is_none() {
            eprintln!(
                "note: no user cache directory (HOME unset?); compiling without the cache (set EDGECTL_CACHE_DIR)"
            );
        }
        root.map(|root| CompileCache::new(&root))
    }
}

impl CompileArgs {
    pub fn options(&self) -> Result<CompileOptions> {
        let targets = if self.targets.is_empty() {
            Target::ALL.to_vec()
        } else {
            self.targets
                .iter()
                .map(|t| t.parse::<Target>())
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(CompileOptions {
            init: match (&self.init_func, self.no_wizer) {
                (_, true) => InitPolicy::Skip,
                (Some(init), false) => InitPolicy::Required(init.clone()),
                (None, false) => InitPolicy::IfExported,
            },
            targets,
            ..CompileOptions::default()
        })
    }
}

/// The deployment name: given, or the input's file stem.
pub fn deployment_name(input: &Path, name: Option<&str>) -> Result<String> {
    let name = match name {
        Some(name) => name.to_string(),
        None => input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("cannot derive a name from the input path; pass --name")?,
    };
    edged_artifacts::manifest::validate_name(&name).map_err(anyhow::Error::msg)?;
    Ok(name)
}

/// How a step's output was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheUse {
    /// `--no-cache`: compiled, not stored.
    Off,
    /// Not in the cache: compiled and stored.
    Compiled,
    /// Read from the cache; nothing was compiled.
    Cached,
    /// The cached entry was damaged: compiled again and the entry overwritten.
    Rebuilt,
}

/// One step of a build as `push` and `build` report it.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
    pub cache: CacheUse,
}

/// A build's output and how each step went.
pub struct Built {
    pub compiled: Compiled,
    pub steps: Vec<Step>,
}

/// What a `prepare` entry knows besides its bytes (the Wizer snapshot, when Wizer ran).
#[derive(Serialize, Deserialize)]
struct PrepareFacts {
    kind: WasmKind,
    guest: GuestKind,
    init_func: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

/// An `aot` entry's bytes are the artifact; its BLAKE3 is checked on read and is the artifact's.
#[derive(Serialize, Deserialize)]
struct AotFacts {
    fingerprint: String,
}

fn init_part(init: &InitPolicy) -> String {
    match init {
        InitPolicy::IfExported => "if-exported".into(),
        InitPolicy::Required(name) => format!("required:{name}"),
        InitPolicy::Skip => "skip".into(),
    }
}

pub fn compile_file(
    input: &Path,
    args: &CompileArgs,
    cache: Option<&CompileCache>,
) -> Result<Built> {
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let built = compile_cached(&bytes, &args.options()?, cache)
        .with_context(|| format!("building {}", input.display()))?;
    // What the build chose not to do, on stderr so `--json` output stays parseable.
    for warning in &built.compiled.warnings {
        eprintln!("note: {}: {warning}", input.display());
    }
    Ok(built)
}

/// A middleware chain's build: the composite's, and the parts it was composed from.
pub struct BuiltChain {
    pub built: Built,
    pub parts: Vec<edged_compiler::ComposedPart>,
}

/// Builds `app` alone, or with `middleware` (outermost first) composed in front of it.
pub fn compile_input(
    app: &Path,
    middleware: &[PathBuf],
    args: &CompileArgs,
    cache: Option<&CompileCache>,
) -> Result<BuiltChain> {
    if middleware.is_empty() {
        return Ok(BuiltChain {
            built: compile_file(app, args, cache)?,
            parts: Vec::new(),
        });
    }
    compile_chain_files(app, middleware, args, cache)
}

/// The name a part goes by in refusals, the manifest and `ls`: its file name.
fn part_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// [`edged_compiler::compose_chain`], then the composite through [`compile_cached`] (validate
/// and AOT, cached like any input; the parts were pre-initialized one by one before composing,
/// so the composite itself is not).
fn compile_chain_files(
    app: &Path,
    middleware: &[PathBuf],
    args: &CompileArgs,
    cache: Option<&CompileCache>,
) -> Result<BuiltChain> {
    let read = |path: &Path| {
        std::fs::read(path)
            .with_context(|| format!("reading {}", path.display()))
            .map(|bytes| (part_name(path), bytes))
    };
    let mw = middleware
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>>>()?;
    let app_part = read(app)?;
    let inputs: Vec<_> = mw
        .iter()
        .map(|(name, bytes)| edged_compiler::PartInput { name, bytes })
        .collect();
    let options = args.options()?;
    let started = Instant::now();
    let composed = edged_compiler::compose_chain(
        &inputs,
        edged_compiler::PartInput {
            name: &app_part.0,
            bytes: &app_part.1,
        },
        &options,
    )?;
    let compose_step = Step {
        step: format!("compose ({} parts)", composed.parts.len()),
        ms: started.elapsed().as_secs_f64() * 1e3,
        cache: CacheUse::Off,
    };
    let whole = CompileOptions {
        init: InitPolicy::Skip,
        ..options
    };
    let mut built = compile_cached(&composed.bytes, &whole, cache)?;
    built.steps.insert(0, compose_step);
    built
        .compiled
        .warnings
        .splice(0..0, composed.warnings.iter().cloned());
    for warning in &built.compiled.warnings {
        eprintln!("note: {warning}");
    }
    Ok(BuiltChain {
        built,
        parts: composed.parts,
    })
}

/// [`edged_compiler::compile`] step by step, each step's output looked up in `cache` first and
/// stored there after. Two kinds of entry:
///
/// - `prepare` (validate + Wizer), keyed by the source's BLAKE3, the init setting and limits, and
///   the fingerprint of the engine that runs the init function;
/// - `aot`, keyed by the BLAKE3 of what is compiled (the Wizer snapshot, or the source), its kind,
///   the target and that target's engine fingerprint.
///
/// Both also carry [`edged_compiler::PIPELINE_VERSION`]; the fingerprints cover the wasmtime and
/// Wizer version and every code-affecting engine setting. The compiler is deterministic, so a key
/// that names every input names exactly one output.
pub fn compile_cached(
    input: &[u8],
    options: &CompileOptions,
    cache: Option<&CompileCache>,
) -> Result<Built> {
    let (_, source) = edged_compiler::to_binary(input)?;
    let source_hash = edged_compiler::content_hash(&source);
    let run_target = edged_compiler::run_target(options);
    let mut engines = HashMap::new();
    let run_engine = edged_compiler::engine_for(run_target, &options.engine)?;
    engines.insert(run_target, run_engine.clone());
    let mut steps = Vec::new();

    let prepare_key = Key::new([
        ("step", "prepare".to_string()),
        ("pipeline", edged_compiler::PIPELINE_VERSION.to_string()),
        ("source", source_hash),
        ("init", init_part(&options.init)),
        (
            "init_timeout_ms",
            options.init_timeout.as_millis().to_string(),
        ),
        ("init_memory_limit", options.init_memory_limit.to_string()),
        ("run_target", run_target.to_string()),
        ("engine", edged_compiler::engine_fingerprint(&run_engine)),
    ]);
    let started = Instant::now();
    let lookup = cache.map(|c| c.get::<PrepareFacts>(&prepare_key));
    let (kind, guest, init_func, preinitialized, warnings) = match lookup {
        Some(Lookup::Hit(entry)) => {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let facts = entry.facts;
            // Validation is part of the entry: its key names the exact source bytes.
            steps.push(Step {
                step: "validate".into(),
                ms: 0.0,
                cache: CacheUse::Cached,
            });
            if let Some(init) = &facts.init_func {
                steps.push(Step {
                    step: format!("wizer ({init})"),
                    ms,
                    cache: CacheUse::Cached,
                });
            }
            let preinitialized = match entry.bytes {
                Some(bytes) => bytes,
                None => source.to_vec(),
            };
            (
                facts.kind,
                facts.guest,
                facts.init_func,
                preinitialized,
                facts.warnings,
            )
        }
        lookup => {
            let outcome = outcome_of_miss(lookup.as_ref());
            let prepared = edged_compiler::prepare(&source, options)?;
            steps.extend(steps_from(&prepared.timings, outcome));
            if let Some(cache) = cache {
                let facts = PrepareFacts {
                    kind: prepared.kind,
                    guest: prepared.guest,
                    init_func: prepared.init_func.clone(),
                    warnings: prepared.warnings.clone(),
                };
                // Without Wizer the output is the source itself: store no second copy.
                let file = prepared
                    .init_func
                    .is_some()
                    .then_some(("wasm", &prepared.preinitialized[..]));
                store(cache, &prepare_key, "prepare", &facts, file);
            }
            (
                prepared.kind,
                prepared.guest,
                prepared.init_func,
                prepared.preinitialized,
                prepared.warnings,
            )
        }
    };

    let compiled_hash = edged_compiler::content_hash(&preinitialized);
    let mut artifacts = Vec::with_capacity(options.targets.len());
    for &target in &options.targets {
        let engine = match engines.get(&target) {
            Some(engine) => engine.clone(),
            None => edged_compiler::engine_for(target, &options.engine)?,
        };
        let fingerprint = edged_compiler::engine_fingerprint(&engine);
        let key = Key::new([
            ("step", "aot".to_string()),
            ("pipeline", edged_compiler::PIPELINE_VERSION.to_string()),
            ("input", compiled_hash.clone()),
            ("kind", format!("{kind:?}")),
            ("target", target.to_string()),
            ("engine", fingerprint.clone()),
        ]);
        let step = format!("aot {target}");
        let started = Instant::now();
        let lookup = cache.map(|c| c.get::<AotFacts>(&key));
        let (artifact, outcome) = match lookup {
            Some(Lookup::Hit(entry)) if entry.facts.fingerprint == fingerprint => {
                let bytes = entry.bytes.unwrap_or_default();
                let artifact = Artifact {
                    target,
                    fingerprint,
                    blake3: edged_compiler::content_hash(&bytes),
                    bytes,
                };
                (artifact, CacheUse::Cached)
            }
            lookup => {
                let outcome = outcome_of_miss(lookup.as_ref());
                let artifact =
                    edged_compiler::compile_target(&engine, target, kind, &preinitialized)?;
                if let Some(cache) = cache {
                    let facts = AotFacts {
                        fingerprint: artifact.fingerprint.clone(),
                    };
                    store(cache, &key, &step, &facts, Some(("cwasm", &artifact.bytes)));
                }
                (artifact, outcome)
            }
        };
        steps.push(Step {
            step,
            ms: started.elapsed().as_secs_f64() * 1e3,
            cache: outcome,
        });
        artifacts.push(artifact);
    }

    if let Some(cache) = cache
        && steps.iter().any(|s| s.cache != CacheUse::Cached)
        && let Err(e) = cache.prune(cache::DEFAULT_MAX_BYTES)
    {
        eprintln!("note: pruning the compile cache failed: {e:#}");
    }
    let timings = StepTimings(
        steps
            .iter()
            .map(|s| (s.step.clone(), Duration::from_secs_f64(s.ms / 1e3)))
            .collect(),
    );
    Ok(Built {
        compiled: Compiled {
            kind,
            guest,
            source: source.into_owned(),
            init_func,
            preinitialized,
            artifacts,
            timings,
            warnings,
        },
        steps,
    })
}

/// What a step that has to compile reports (`lookup` is `None` without a cache), with the
/// one-line note for a damaged entry.
fn outcome_of_miss<F>(lookup: Option<&Lookup<F>>) -> CacheUse {
    match lookup {
        None => CacheUse::Off,
        Some(Lookup::Damaged(reason)) => {
            eprintln!("note: compile cache entry damaged: {reason}; rebuilding it");
            CacheUse::Rebuilt
        }
        Some(_) => CacheUse::Compiled,
    }
}

fn steps_from(timings: &StepTimings, cache: CacheUse) -> Vec<Step> {
    timings
        .0
        .iter()
        .map(|(step, took)| Step {
            step: step.clone(),
            ms: took.as_secs_f64() * 1e3,
            cache,
        })
        .collect()
}

/// Stores an entry; a cache that cannot be written (full disk, read-only home) costs the next
/// build its time, not this one its result.
fn store<F: Serialize>(
    cache: &CompileCache,
    key: &Key,
    step: &str,
    facts: &F,
    file: Option<(&str, &[u8])>,
) {
    if let Err(e) = cache.put(key, step, facts, file) {
        eprintln!("note: could not write the compile cache: {e:#}");
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

pub fn print_steps(steps: &[Step]) {
    println!("  steps:");
    for step in steps {
        let how = match step.cache {
            CacheUse::Off => "",
            CacheUse::Compiled => "  compiled",
            CacheUse::Cached => "  cached",
            CacheUse::Rebuilt => "  rebuilt (damaged cache entry)",
        };
        println!("    {:<40} {:>9.1} ms{how}", step.step, step.ms);
    }
}

/// Writes `bytes` to `path` via a temp file, fsync and rename, so a crash never leaves half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn build(args: BuildArgs, cache: &CacheArgs) -> Result<()> {
    let name = deployment_name(&args.input, args.name.as_deref())?;
    let BuiltChain {
        built: Built { compiled, steps },
        parts,
    } = compile_input(
        &args.input,
        &args.middleware,
        &args.compile,
        cache.open().as_ref(),
    )?;
    let manifest = if parts.is_empty() {
        Manifest::from_compiled(&name, args.version, now_secs(), &compiled)
    } else {
        Manifest::from_chain(&name, args.version, now_secs(), &compiled, &parts)
    };

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_atomically(&args.out.join("source.wasm"), &compiled.source)?;
    for part in &parts {
        let file = args.out.join(format!("part-{}.wasm", part.blake3));
        write_atomically(&file, &part.source)?;
    }
    for artifact in &compiled.artifacts {
        let file = args.out.join(format!("{}.cwasm", artifact.target));
        write_atomically(&file, &artifact.bytes)?;
    }
    let manifest_json = serde_json::to_string_pretty(&manifest)?;
    write_atomically(&args.out.join("manifest.json"), manifest_json.as_bytes())?;

    if args.json {
        println!("{manifest_json}");
        return Ok(());
    }
    println!(
        "{} v{} ({}, {})",
        manifest.name,
        manifest.version,
        compiled.guest,
        match &compiled.init_func {
            Some(init) => format!("pre-initialized with `{init}`"),
            None => "not pre-initialized".to_string(),
        }
    );
    println!("  {:<27} {:<66} {:>10}", "target", "blake3", "bytes");
    println!(
        "  {:<27} {:<66} {:>10}",
        "source", manifest.source.blake3, manifest.source.size
    );
    for p in manifest.part_refs() {
        let label = format!("{} {}", p.role, p.name);
        println!("  {label:<27} {:<66} {:>10}", p.blake3, p.size);
    }
    for a in &manifest.artifacts {
        println!(
            "  {:<27} {:<66} {:>10}",
            a.target.triple(),
            a.blake3,
            a.size
        );
    }
    if let Some(image) = &manifest.memory_image {
        println!("  copy-on-write image: {image}");
    }
    print_steps(&steps);
    println!("  wrote {}", args.out.display());
    Ok(())
}

/// The `COW IMAGE` column of `edgectl ls`: `yes 12.3 MiB` when every memory starts from a
/// copy-on-write image of that size, `NO 4.1 MiB copied` when that much data is copied into
/// memory per instance, `-` for a manifest built before the report existed.
pub fn cow_column(image: Option<&edged_compiler::MemoryImageReport>) -> String {
    use edged_compiler::memory_image::human_bytes;
    match image {
        Some(r) if r.all_cow() => format!("yes {}", human_bytes(r.image_bytes)),
        Some(r) => format!("NO {} copied", human_bytes(r.copied_bytes)),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use edged_compiler::EngineSettings;

    use super::*;

    fn outcomes(built: &Built) -> Vec<(&str, CacheUse)> {
        built
            .steps
            .iter()
            .map(|s| (s.step.as_str(), s.cache))
            .collect()
    }

    fn all(built: &Built, expect: CacheUse) {
        assert!(
            built.steps.iter().all(|s| s.cache == expect),
            "{:?}",
            outcomes(built)
        );
    }

    /// The keys `compile_cached` derives: every option that changes the output is another entry,
    /// and a hit gives what a compile gives.
    #[test]
    fn pipeline_keys_follow_every_option_that_changes_the_output() {
        let source = std::fs::read(edged_testkit::guest("init-heavy-p1.wasm")).unwrap();
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path());
        let defaults = CompileOptions::default();

        let cold = compile_cached(&source, &defaults, Some(&cache)).unwrap();
        assert_eq!(cold.steps.len(), 4);
        all(&cold, CacheUse::Compiled);
        let warm = compile_cached(&source, &defaults, Some(&cache)).unwrap();
        assert_eq!(warm.steps.len(), 4, "{:?}", outcomes(&warm));
        all(&warm, CacheUse::Cached);
        let uncached = compile_cached(&source, &defaults, None).unwrap();
        all(&uncached, CacheUse::Off);
        for built in [&warm, &uncached] {
            assert_eq!(built.compiled.init_func, cold.compiled.init_func);
            assert_eq!(built.compiled.kind, cold.compiled.kind);
            assert!(built.compiled.preinitialized == cold.compiled.preinitialized);
            for (a, b) in built
                .compiled
                .artifacts
                .iter()
                .zip(&cold.compiled.artifacts)
            {
                assert_eq!(
                    (a.target, &a.fingerprint, &a.blake3),
                    (b.target, &b.fingerprint, &b.blake3)
                );
                assert!(a.bytes == b.bytes);
            }
        }

        // Another init setting: Wizer does not run, so the AOT input differs too.
        let no_wizer = CompileOptions {
            init: InitPolicy::Skip,
            ..CompileOptions::default()
        };
        let built = compile_cached(&source, &no_wizer, Some(&cache)).unwrap();
        assert_eq!(built.steps.len(), 3, "{:?}", outcomes(&built));
        all(&built, CacheUse::Compiled);
        all(
            &compile_cached(&source, &no_wizer, Some(&cache)).unwrap(),
            CacheUse::Cached,
        );

        // One target of those already built: nothing to compile.
        let arm_only = CompileOptions {
            targets: vec![Target::Aarch64Linux],
            ..CompileOptions::default()
        };
        let built = compile_cached(&source, &arm_only, Some(&cache)).unwrap();
        assert_eq!(built.steps.len(), 3, "{:?}", outcomes(&built));
        all(&built, CacheUse::Cached);

        // Another engine setting is another fingerprint: everything compiles again.
        let small = CompileOptions {
            engine: EngineSettings {
                memory_reservation: 1 << 30,
                ..EngineSettings::default()
            },
            ..CompileOptions::default()
        };
        all(
            &compile_cached(&source, &small, Some(&cache)).unwrap(),
            CacheUse::Compiled,
        );

        // Another source: everything compiles again.
        let other = std::fs::read(edged_testkit::guest("hello-http.wasm")).unwrap();
        all(
            &compile_cached(&other, &defaults, Some(&cache)).unwrap(),
            CacheUse::Compiled,
        );
    }
}
