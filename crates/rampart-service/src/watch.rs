//! Watching a pipeline directory for changes: `pipeline.toml`, `detectors/*.sql` and
//! `tables/*`, compared by size and modification time (polled; no platform file-event API).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The size and modification time of every file a pipeline is made of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(BTreeMap<PathBuf, (u64, Option<SystemTime>)>);

impl Fingerprint {
    /// The fingerprint of the pipeline directory `dir` now.
    pub fn of(dir: &Path) -> Self {
        let mut files = BTreeMap::new();
        let mut add = |p: PathBuf| {
            if let Ok(m) = std::fs::metadata(&p)
                && m.is_file()
            {
                files.insert(p, (m.len(), m.modified().ok()));
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
