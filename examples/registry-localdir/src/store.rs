//! The directory layout and every blocking file-system operation. Nothing here runs on the
//! async runtime's threads: the registry calls it through `spawn_blocking`.
//!
//! ```text
//! <dir>/<group>/<encode(interface)>/<category>/<encode(url.to_full_string())>
//! ```
//!
//! A name longer than [`MAX_NAME`] bytes cannot be a file name on common file systems (255
//! bytes), so such an entry is named `~<hash>~<start of the encoded name>` and its file holds
//! the full URL. `encode` never produces `~`, so the two forms cannot collide.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use registry_core::{Url, decode, encode};

use crate::owner::{self, EntryFile, ME};

/// The longest entry file name written as `encode(url)`; longer ones are hashed.
pub(crate) const MAX_NAME: usize = 240;
/// How much of the encoded name a hashed name keeps, for people reading the directory.
const HASHED_PREFIX: usize = 160;
/// Prefix of the temporary files of atomic writes.
const TMP_PREFIX: &str = ".localdir-tmp-";
/// A temporary file older than this was left by a crash and is removed.
const TMP_MAX_AGE: Duration = Duration::from_secs(60);
/// A directory modified less than this before a read began may have changed during the read.
/// Must exceed the file system's timestamp granularity (a kernel tick: at most 10 ms).
pub(crate) const SETTLE: Duration = Duration::from_millis(25);

/// One read of a category directory.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// Live entries: file name -> URL.
    pub entries: BTreeMap<String, Url>,
    /// The directory did not change during the read, so this is a state that existed.
    pub stable: bool,
}

/// The registry's root (`<dir>/<group>`) and what it needs to read and write entries.
pub(crate) struct Store {
    pub root: PathBuf,
    /// Names already warned about, so a bad file is logged once, not on every poll.
    warned: Mutex<HashSet<PathBuf>>,
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> registry_core::Error {
    move |source| registry_core::Error::Io { context, source }
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike `DefaultHasher`.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The file name of the entry for `full` (`url.to_full_string()`).
pub(crate) fn entry_name(full: &str) -> String {
    let encoded = encode(full);
    if encoded.len() <= MAX_NAME {
        return encoded;
    }
    // The encoded form is ASCII, so any byte index is a char boundary.
    format!(
        "~{:016x}{:016x}~{}",
        fnv1a(full),
        fnv1a(&encoded),
        &encoded[..HASHED_PREFIX]
    )
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store {
            root,
            warned: Mutex::new(HashSet::new()),
        }
    }

    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.root.join(encode(service))
    }

    pub fn category_dir(&self, service: &str, category: &str) -> PathBuf {
        self.service_dir(service).join(category)
    }

    pub fn entry_path(&self, url: &Url) -> PathBuf {
        self.category_dir(url.service_interface(), url.category())
            .join(entry_name(&url.to_full_string()))
    }

    fn warn_once(&self, path: &Path, what: &str, error: &dyn std::fmt::Display) {
        let first = self
            .warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned());
        if first {
            tracing::warn!(path = %path.display(), error = %error, "localdir: skipped {what}");
        }
    }

    /// Creates the root and proves it writable (the factory's `check`).
    pub fn probe(&self) -> registry_core::Result<()> {
        let context = || {
            format!(
                "localdir registry: cannot use the directory {} (it must be creatable and writable; \
                 check=false starts anyway and retries)",
                self.root.display()
            )
        };
        fs::create_dir_all(&self.root).map_err(io_err(context()))?;
        let probe = self.root.join(format!("{TMP_PREFIX}probe-{}", ME.pid));
        fs::write(&probe, b"").map_err(io_err(context()))?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }

    /// Writes `content` at `path` atomically (temporary file + rename), creating the
    /// directories; does nothing when the file already holds exactly `content`.
    pub fn write(&self, path: &Path, content: &[u8]) -> registry_core::Result<()> {
        if fs::read(path).is_ok_and(|c| c == content) {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(&self.root);
        let context = || format!("localdir registry: cannot write {}", path.display());
        fs::create_dir_all(dir).map_err(io_err(context()))?;
        static N: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}-{}",
            ME.pid,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(content)?;
            f.sync_data()?;
            fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io_err(context()))
    }

    /// Removes `path`; a missing file is not an error.
    pub fn remove(&self, path: &Path) -> registry_core::Result<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!(
                "localdir registry: cannot remove {}",
                path.display()
            ))(e)),
        }
    }

    /// Removes `path` only while its content satisfies `doomed`. The file is first renamed
    /// aside, so a writer that replaces it at the same moment is not lost: if what was taken
    /// aside no longer qualifies, it is put back.
    pub fn remove_if(&self, path: &Path, doomed: impl Fn(&EntryFile) -> bool) {
        let Ok(content) = fs::read(path) else { return };
        if !doomed(&EntryFile::parse(&content)) {
            return;
        }
        let Some(dir) = path.parent() else { return };
        static N: AtomicU64 = AtomicU64::new(0);
        let aside = dir.join(format!(
            "{TMP_PREFIX}gone-{}-{}",
            ME.pid,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if fs::rename(path, &aside).is_err() {
            return;
        }
        match fs::read(&aside) {
            Ok(c) if !doomed(&EntryFile::parse(&c)) => {
                tracing::debug!(path = %path.display(), "localdir: an entry was rewritten while being removed; kept");
                let _ = fs::rename(&aside, path);
            }
            _ => {
                let _ = fs::remove_file(&aside);
            }
        }
    }

    /// The services (decoded directory names) under the root.
    pub fn services(&self) -> registry_core::Result<Vec<String>> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io_err(format!(
                    "localdir registry: cannot list {}",
                    self.root.display()
                ))(e));
            }
        };
        let mut out = Vec::new();
        for item in rd.flatten() {
            let path = item.path();
            let Ok(name) = item.file_name().into_string() else {
                self.warn_once(&path, "a service directory whose name is not UTF-8", &"");
                continue;
            };
            if name.starts_with('.') || !item.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match decode(&name) {
                Ok(service) => out.push(service),
                Err(e) => self.warn_once(&path, "a service directory that does not decode", &e),
            }
        }
        out.sort();
        Ok(out)
    }

    /// The categories (directory names) of one service.
    pub fn categories(&self, service: &str) -> registry_core::Result<Vec<String>> {
        let dir = self.service_dir(service);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io_err(format!(
                    "localdir registry: cannot list {}",
                    dir.display()
                ))(e));
            }
        };
        let mut out: Vec<String> = rd
            .flatten()
            .filter(|i| i.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|i| i.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Reads one category directory: every live entry, after removing the entries of dead
    /// owners (and temporary files left by crashes).
    pub fn read_category(&self, dir: &Path) -> registry_core::Result<Snapshot> {
        let started = SystemTime::now();
        let context = || format!("localdir registry: cannot read {}", dir.display());
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Snapshot {
                    entries: BTreeMap::new(),
                    stable: true,
                });
            }
            Err(e) => return Err(io_err(context())(e)),
        };
        let mut entries = BTreeMap::new();
        let mut removed = false;
        for item in rd {
            let item = item.map_err(io_err(context()))?;
            let path = item.path();
            let Ok(name) = item.file_name().into_string() else {
                self.warn_once(&path, "an entry whose name is not UTF-8", &"");
                continue;
            };
            if name.starts_with('.') {
                if name.starts_with(TMP_PREFIX) && is_old(&path) {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let content = match fs::read(&path) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.warn_once(&path, "an entry that cannot be read", &e);
                    continue;
                }
            };
            let file = EntryFile::parse(&content);
            if !owner::is_alive(&file, &ME) {
                tracing::info!(
                    path = %path.display(),
                    pid = file.pid,
                    "localdir: removing an entry whose owner process is gone"
                );
                self.remove_if(&path, |f| !owner::is_alive(f, &ME));
                removed = true;
                continue;
            }
            let url = if name.starts_with('~') {
                match &file.url {
                    Some(u) => Url::parse(u),
                    None => {
                        self.warn_once(&path, "a hashed entry without a `url`", &"");
                        continue;
                    }
                }
            } else {
                Url::from_encoded(&name)
            };
            match url {
                Ok(url) => {
                    entries.insert(name, url);
                }
                Err(e) => self.warn_once(&path, "an entry whose name does not decode to a URL", &e),
            }
        }
        let stable = !removed
            && fs::metadata(dir)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m + SETTLE <= started);
        Ok(Snapshot { entries, stable })
    }
}

fn is_old(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age > TMP_MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_urls_get_hashed_names_that_fit() {
        let short = "dubbo://10.0.0.1:20880/a.B?x=1";
        assert_eq!(entry_name(short), encode(short));
        let long = format!("dubbo://10.0.0.1:20880/a.B?methods={}", "m,".repeat(200));
        let name = entry_name(&long);
        assert!(name.starts_with('~') && name.len() < 255, "{name}");
        assert_eq!(name, entry_name(&long), "stable");
        let other = format!("{long}&x=1");
        assert_ne!(entry_name(&other), name);
    }

    #[test]
    fn a_read_of_a_directory_that_just_changed_is_not_stable() {
        let dir = std::env::temp_dir().join(format!("localdir-settle-{}", std::process::id()));
        let store = Store::new(dir.clone());
        let url: Url = "tri://10.0.0.1:1/a.B?side=provider".parse().expect("url");
        let path = store.entry_path(&url);
        store.write(&path, b"{}").expect("write");
        let cat = path.parent().expect("category dir").to_owned();
        let first = store.read_category(&cat).expect("read");
        assert!(
            !first.stable,
            "changed a moment ago: may have changed during the read"
        );
        std::thread::sleep(SETTLE * 2);
        let later = store.read_category(&cat).expect("read");
        assert!(later.stable);
        assert_eq!(later.entries.values().collect::<Vec<_>>(), vec![&url]);
        let _ = fs::remove_dir_all(dir);
    }
}
