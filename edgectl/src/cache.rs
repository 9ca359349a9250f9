//! The compile cache: `edgectl`'s compile outputs kept on the operator's disk, keyed by everything
//! that decides them, so a re-push, or a push of the same file to another node, skips Wizer and
//! Cranelift.
//!
//! This file owns the storage: where the cache lives, how a [`Key`] is derived from its parts,
//! the entry format, verification on read, atomic writes, and the size bound. What the key parts
//! are and which steps are cached is the pipeline's business (`build.rs`).
//!
//! Layout: `<root>/compile/<key>.json` is an entry's metadata (what produced it, its key parts,
//! typed facts about the output, and the BLAKE3 and size of its data file) and
//! `<root>/compile/<key>.<ext>` its bytes. The compiler is deterministic, so every writer of a key
//! writes the same bytes: a writer writes the data file, then the metadata, each to a temp file
//! renamed into place, and a reader that finds the metadata finds a whole data file, or a
//! damaged one that fails its hash and is rebuilt. Nothing is fsynced: a file torn by a crash is
//! caught by the same hash check.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bumped when the entry format changes; older entries then read as misses.
const FORMAT: u32 = 1;

/// The size the cache is pruned back to after a build that wrote to it (least recently used
/// entries go first). One 18 MB componentize-py component costs about 100 MB (its Wizer snapshot
/// and two artifacts), so this keeps the last twenty or so.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

/// Temp files being written carry this prefix; a reader never looks at them.
const TMP_PREFIX: &str = ".tmp-";

/// Where the cache lives: `EDGECTL_CACHE_DIR` / `--cache-dir` if given, else `edged` under the
/// user's cache directory (`$XDG_CACHE_HOME`, or `~/.cache`).
pub fn default_root() -> Option<PathBuf> {
    dirs::cache_dir().map(|dir| dir.join("edged"))
}

/// An entry's name: the BLAKE3 of its key parts, so any part that differs is another entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    hex: String,
    parts: BTreeMap<String, String>,
}

impl Key {
    pub fn new<'a>(parts: impl IntoIterator<Item = (&'a str, String)>) -> Key {
        let parts: BTreeMap<String, String> =
            parts.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        // JSON of an ordered map: unambiguous (quoted, escaped) and independent of argument order.
        let canonical = serde_json::to_vec(&parts).expect("a map of strings serializes");
        Key {
            hex: blake3::hash(&canonical).to_hex().to_string(),
            parts,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta<F> {
    format: u32,
    /// The step that produced the entry, for people reading the directory.
    step: String,
    /// The key parts, for people reading the directory and to catch a (theoretical) collision.
    key: BTreeMap<String, String>,
    facts: F,
    file: Option<FileRef>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileRef {
    name: String,
    blake3: String,
    size: u64,
}

/// A cached output: facts about it, and its bytes when it has a file.
#[derive(Debug)]
pub struct Entry<F> {
    pub facts: F,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug)]
pub enum Lookup<F> {
    Hit(Entry<F>),
    Miss,
    /// The entry is there but does not check out (the reason says how); rebuild and overwrite.
    Damaged(String),
}

/// What the cache holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub entries: u64,
    pub bytes: u64,
}

/// One entry's files, for sizing and pruning.
struct OnDisk {
    meta: PathBuf,
    data: Option<PathBuf>,
    /// Both files' bytes.
    size: u64,
    /// Last use: the metadata's mtime.
    used: SystemTime,
}

pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    /// The compile cache under `root` (created on first write).
    pub fn new(root: &Path) -> CompileCache {
        CompileCache {
            dir: root.join("compile"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn meta_path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.json", key.hex))
    }

    /// The entry for `key`, its data file read and checked against the BLAKE3 in its metadata.
    pub fn get<F: DeserializeOwned>(&self, key: &Key) -> Lookup<F> {
        let meta_path = self.meta_path(key);
        let text = match std::fs::read(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Damaged(format!("reading {}: {e}", meta_path.display())),
        };
        let meta: Meta<F> = match serde_json::from_slice(&text) {
            Ok(meta) => meta,
            Err(e) => {
                return Lookup::Damaged(format!(
                    "metadata {} unreadable: {e}",
                    meta_path.display()
                ));
            }
        };
        if meta.format != FORMAT {
            return Lookup::Miss;
        }
        if meta.key != key.parts {
            return Lookup::Damaged(format!(
                "metadata {} is for another key",
                meta_path.display()
            ));
        }
        let bytes = match &meta.file {
            None => None,
            Some(file) => {
                let path = self.dir.join(&file.name);
                let bytes = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) => return Lookup::Damaged(format!("reading {}: {e}", path.display())),
                };
                let found = blake3::hash(&bytes).to_hex().to_string();
                if found != file.blake3 || bytes.len() as u64 != file.size {
                    return Lookup::Damaged(format!(
                        "{} has BLAKE3 {found} ({} bytes), its metadata says {} ({} bytes)",
                        path.display(),
                        bytes.len(),
                        file.blake3,
                        file.size
                    ));
                }
                Some(bytes)
            }
        };
        // The metadata's mtime is the entry's last use: pruning drops the least recently used.
        // Failing to touch it only makes the entry look older.
        if let Ok(file) = std::fs::File::options().append(true).open(&meta_path) {
            let _ = file.set_modified(SystemTime::now());
        }
        Lookup::Hit(Entry {
            facts: meta.facts,
            bytes,
        })
    }

    /// Stores an entry for `key`: `bytes` (if any) as `<key>.<ext>`, then the metadata, each
    /// atomically. Overwrites a damaged entry.
    pub fn put<F: Serialize>(
        &self,
        key: &Key,
        step: &str,
        facts: &F,
        file: Option<(&str, &[u8])>,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let file = match file {
            None => None,
            Some((ext, bytes)) => {
                let name = format!("{}.{ext}", key.hex);
                self.write_atomically(&name, bytes)?;
                Some(FileRef {
                    name,
                    blake3: blake3::hash(bytes).to_hex().to_string(),
                    size: bytes.len() as u64,
                })
            }
        };
        let meta = Meta {
            format: FORMAT,
            step: step.to_string(),
            key: key.parts.clone(),
            facts,
            file,
        };
        let text = serde_json::to_vec_pretty(&meta)?;
        self.write_atomically(&format!("{}.json", key.hex), &text)
    }

    /// Temp file in the cache directory, then rename: a concurrent reader or writer sees the old
    /// file or the new one, never half of one.
    fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let mut tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&self.dir)
            .with_context(|| format!("creating a temp file in {}", self.dir.display()))?;
        tmp.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        tmp.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Entries on disk, least recently used first.
    fn entries(&self) -> Result<Vec<OnDisk>> {
        let dir = match std::fs::read_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        let files: Vec<(String, PathBuf, std::fs::Metadata)> = dir
            .flatten()
            .filter_map(|e| {
                Some((
                    e.file_name().into_string().ok()?,
                    e.path(),
                    e.metadata().ok()?,
                ))
            })
            .filter(|(name, _, _)| !name.starts_with(TMP_PREFIX))
            .collect();
        let mut entries = Vec::new();
        for (name, path, meta) in &files {
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            // The data file is the other `<stem>.<ext>`, if the entry has one.
            let data = files.iter().find(|(other, _, _)| {
                other != name
                    && other
                        .split_once('.')
                        .is_some_and(|(other_stem, _)| other_stem == stem)
            });
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let size = meta.len() + data.map_or(0, |d| d.2.len());
            entries.push(OnDisk {
                meta: path.clone(),
                data: data.map(|d| d.1.clone()),
                size,
                used,
            });
        }
        entries.sort_by_key(|e| e.used);
        Ok(entries)
    }

    pub fn usage(&self) -> Result<Usage> {
        let entries = self.entries()?;
        Ok(Usage {
            entries: entries.len() as u64,
            bytes: entries.iter().map(|e| e.size).sum(),
        })
    }

    /// Drops least recently used entries until the cache holds at most `max_bytes`; also drops
    /// data files without metadata and temp files of writers that died. Returns what was dropped.
    pub fn prune(&self, max_bytes: u64) -> Result<Usage> {
        let mut dropped = Usage::default();
        let entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        for OnDisk {
            meta, data, size, ..
        } in entries
        {
            if total <= max_bytes {
                break;
            }
            // Metadata first: a concurrent reader then sees a miss, not a missing data file.
            remove(&meta)?;
            if let Some(data) = data {
                remove(&data)?;
            }
            total -= size;
            dropped.entries += 1;
            dropped.bytes += size;
        }
        self.drop_strays()?;
        Ok(dropped)
    }

    /// Data files whose metadata is gone (a writer died between the two renames, or a prune
    /// raced a writer) and temp files older than an hour (a live writer's are younger).
    fn drop_strays(&self) -> Result<()> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for item in dir.flatten() {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            let stray = if name.starts_with(TMP_PREFIX) {
                item.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600)
            } else {
                !name.ends_with(".json")
                    && path
                        .file_stem()
                        .is_some_and(|s| !self.dir.join(s).with_extension("json").exists())
            };
            if stray {
                remove(&path)?;
            }
        }
        Ok(())
    }

    /// Removes every entry.
    pub fn clear(&self) -> Result<Usage> {
        self.prune(0)
    }
}

/// Removes `path`; one already gone (another prune got there first) is fine.
fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Facts {
        fingerprint: String,
    }

    fn facts() -> Facts {
        Facts {
            fingerprint: "f00d".into(),
        }
    }

    fn key(source: &str, init: &str, target: &str, fingerprint: &str) -> Key {
        Key::new([
            ("source", source.to_string()),
            ("init", init.to_string()),
            ("target", target.to_string()),
            ("engine", fingerprint.to_string()),
        ])
    }

    fn hit(lookup: Lookup<Facts>) -> Entry<Facts> {
        match lookup {
            Lookup::Hit(entry) => entry,
            other => panic!("expected a hit, got {other:?}"),
        }
    }

    #[test]
    fn a_stored_entry_is_a_hit_with_its_bytes_and_facts() {
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path());
        let k = key("s", "if-exported", "x86_64", "fp");
        assert!(matches!(cache.get::<Facts>(&k), Lookup::Miss));
        cache
            .put(&k, "aot", &facts(), Some(("cwasm", b"native code")))
            .unwrap();
        let entry = hit(cache.get(&k));
        assert_eq!(entry.facts, facts());
        assert_eq!(entry.bytes.as_deref(), Some(&b"native code"[..]));

        // An entry without a file (nothing to store beyond its facts).
        let bare = key("s", "skip", "x86_64", "fp");
        cache.put(&bare, "prepare", &facts(), None).unwrap();
        assert_eq!(hit(cache.get(&bare)).bytes, None);
    }

    #[test]
    fn any_key_part_that_differs_is_a_miss() {
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path());
        cache
            .put(
                &key("s", "if-exported", "x86_64", "fp"),
                "aot",
                &facts(),
                Some(("cwasm", b"x")),
            )
            .unwrap();
        for other in [
            key("s2", "if-exported", "x86_64", "fp"),
            key("s", "skip", "x86_64", "fp"),
            key("s", "if-exported", "aarch64", "fp"),
            key("s", "if-exported", "x86_64", "fp2"),
        ] {
            assert!(
                matches!(cache.get::<Facts>(&other), Lookup::Miss),
                "{other:?}"
            );
        }
        // Parts are named: moving a value to another part is another key.
        assert_ne!(
            Key::new([("a", "x".into()), ("b", "".into())]),
            Key::new([("a", "".into()), ("b", "x".into())])
        );
        // …and their order does not matter.
        assert_eq!(
            Key::new([("a", "1".into()), ("b", "2".into())]),
            Key::new([("b", "2".into()), ("a", "1".into())])
        );
    }

    #[test]
    fn a_damaged_entry_is_detected_and_rebuilt() {
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path());
        let k = key("s", "if-exported", "x86_64", "fp");
        cache
            .put(&k, "aot", &facts(), Some(("cwasm", b"native code")))
            .unwrap();
        let data = cache.dir().join(format!("{}.cwasm", k.hex));

        // One flipped byte, same length.
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[3] ^= 0x01;
        std::fs::write(&data, &bytes).unwrap();
        let Lookup::Damaged(reason) = cache.get::<Facts>(&k) else {
            panic!("a flipped byte went unnoticed")
        };
        assert!(reason.contains("BLAKE3"), "{reason}");

        // Rebuilding overwrites it.
        cache
            .put(&k, "aot", &facts(), Some(("cwasm", b"native code")))
            .unwrap();
        assert_eq!(
            hit(cache.get(&k)).bytes.as_deref(),
            Some(&b"native code"[..])
        );

        // A truncated file, a missing file and garbled metadata are damage too.
        std::fs::write(&data, b"native").unwrap();
        assert!(matches!(cache.get::<Facts>(&k), Lookup::Damaged(_)));
        std::fs::remove_file(&data).unwrap();
        assert!(matches!(cache.get::<Facts>(&k), Lookup::Damaged(_)));
        std::fs::write(cache.meta_path(&k), b"{\"format\": 1, \"st").unwrap();
        assert!(matches!(cache.get::<Facts>(&k), Lookup::Damaged(_)));
        cache
            .put(&k, "aot", &facts(), Some(("cwasm", b"native code")))
            .unwrap();
        hit(cache.get(&k));
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_half_an_entry() {
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path());
        let k = key("s", "if-exported", "x86_64", "fp");
        let big: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        cache
                            .put(&k, "aot", &facts(), Some(("cwasm", &big)))
                            .unwrap();
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..50 {
                    match cache.get::<Facts>(&k) {
                        Lookup::Miss => {}
                        Lookup::Hit(entry) => assert!(entry.bytes.unwrap() == big),
                        Lookup::Damaged(reason) => panic!("a reader saw a partial entry: {reason}"),
                    }
                }
            });
        });
        assert!(hit(cache.get(&k)).bytes.unwrap() == big);
        // No temp file is left behind, only the entry's two files.
        let names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn prune_drops_least_recently_used_entries_first() {
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path());
        let keys: Vec<Key> = (0..3)
            .map(|i| key(&i.to_string(), "if-exported", "x86_64", "fp"))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            cache
                .put(k, "aot", &facts(), Some(("cwasm", &vec![i as u8; 1000])))
                .unwrap();
            // Distinct, increasing last-use times without sleeping.
            let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            std::fs::File::options()
                .append(true)
                .open(cache.meta_path(k))
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        // Using the oldest makes it the newest.
        hit(cache.get(&keys[0]));
        let usage = cache.usage().unwrap();
        assert_eq!(usage.entries, 3);
        let per_entry = usage.bytes / 3;

        let dropped = cache.prune(usage.bytes - 1).unwrap();
        assert_eq!(dropped.entries, 1);
        assert!(matches!(cache.get::<Facts>(&keys[1]), Lookup::Miss));
        hit(cache.get(&keys[0]));
        hit(cache.get(&keys[2]));
        assert!(cache.usage().unwrap().bytes <= usage.bytes - per_entry + 100);

        cache.clear().unwrap();
        assert_eq!(cache.usage().unwrap(), Usage::default());
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 0);
    }
}
