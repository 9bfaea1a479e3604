//! Watching files for changes, compared by size and modification time (polled; no platform
//! file-event API): a pipeline directory (`pipeline.toml`, `detectors/*.sql`, `tables/*`), and
//! the files a value is read from that is read again when they change ([`Reread`]: the admin
//! tokens, the TLS certificate).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// A file's size and modification time: a change to either is a change to the file.
pub type Stamp = (u64, Option<SystemTime>);

/// The stamp of the file at `path`, if there is one.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok().filter(std::fs::Metadata::is_file)?;
    Some((meta.len(), meta.modified().ok()))
}

/// The size and modification time of every file a pipeline is made of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(BTreeMap<PathBuf, Stamp>);

impl Fingerprint {
    /// The fingerprint of the pipeline directory `dir` now.
    pub fn of(dir: &Path) -> Self {
        let mut files = BTreeMap::new();
        let mut add = |p: PathBuf| {
            if let Some(stamp) = stamp(&p) {
                files.insert(p, stamp);
            }
        };
        add(dir.join("pipeline.toml"));
        for sub in ["detectors", "tables"] {
            if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
                for e in entries.flatten() {
                    add(e.path());
                }
            }
        }
        Self(files)
    }
}

/// A value read from files and read again, when asked for, after one of them changed. A read
/// that fails keeps the value before it (and logs why): a rotation half written does not take
/// away what worked.
pub struct Reread<T> {
    /// What the value is, for the logs.
    what: &'static str,
    paths: Vec<PathBuf>,
    read: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    /// The files' stamps when last read (good or bad), and the value read last that was good.
    current: Mutex<(Vec<Option<Stamp>>, Arc<T>)>,
}

impl<T> std::fmt::Debug for Reread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reread")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Reread<T> {
    /// Reads the value from `paths` with `read` now: its error stops the start.
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        read: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = Arc::new(read()?);
        Ok(Self {
            what,
            paths,
            read: Box::new(read),
            current: Mutex::new((stamps, value)),
        })
    }

    /// The value, read again first if one of its files changed since the last look.
    pub fn get(&self) -> Arc<T> {
        let stamps: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if stamps != current.0 {
            // Looked at once per change, good or bad, not at every call.
            current.0 = stamps;
            match (self.read)() {
                Ok(value) => {
                    current.1 = Arc::new(value);
                    tracing::info!(files = ?self.paths, "{} re-read", self.what);
                }
                Err(why) => tracing::error!(
                    reason = %why,
                    "{} changed and cannot be used: the previous one is still served",
                    self.what
                ),
            }
        }
        Arc::clone(&current.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_added_or_removed_detector_changes_the_fingerprint() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("detectors")).expect("mkdir");
        std::fs::write(tmp.path().join("pipeline.toml"), "name = 'x'").expect("write");
        std::fs::write(tmp.path().join("detectors/a.sql"), "SELECT 1").expect("write");
        let before = Fingerprint::of(tmp.path());
        assert_eq!(before, Fingerprint::of(tmp.path()));
        std::fs::write(tmp.path().join("detectors/a.sql"), "SELECT 12").expect("write");
        let changed = Fingerprint::of(tmp.path());
        assert_ne!(before, changed);
        std::fs::write(tmp.path().join("detectors/b.sql"), "SELECT 1").expect("write");
        assert_ne!(changed, Fingerprint::of(tmp.path()));
    }
}
