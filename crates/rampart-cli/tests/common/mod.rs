//! Helpers shared by the test binaries.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Copies `pipelines/NAME` (its pipeline.toml, detectors and tables; not its state or tests)
/// into `dir/NAME`, for tests that change it or run it with its own audit log.
pub fn pipeline_copy(name: &str, dir: &Path) -> PathBuf {
    let src = root().join("pipelines").join(name);
    let dst = dir.join(name);
    for sub in ["detectors", "tables"] {
        let Ok(entries) = std::fs::read_dir(src.join(sub)) else {
            continue;
        };
        std::fs::create_dir_all(dst.join(sub)).expect("mkdir");
        for entry in entries {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, dst.join(sub).join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::copy(src.join("pipeline.toml"), dst.join("pipeline.toml")).expect("copy");
    dst
}
