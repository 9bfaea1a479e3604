//! `rampart test` case files: any text, run against a small pipeline. Never a panic; a file
//! that does not parse is one problem with its line.
#![no_main]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rampart_engine::Pipeline;
use rampart_engine::drivers::testing::run_test_file;

fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<(tempfile::TempDir, Pipeline)> = OnceLock::new();
    &PIPELINE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tmp");
            std::fs::create_dir_all(dir.path().join("detectors")).expect("mkdir");
            std::fs::write(dir.path().join("pipeline.toml"), common::PIPELINE_TOML).expect("write");
            std::fs::write(
                dir.path().join("detectors/deletes.sql"),
                "-- id: deletes\n-- verdict: block\n-- severity: high\n-- reason: {{actor}} deleted\n\
                 SELECT actor FROM events WHERE action LIKE 'Delete%'\n",
            )
            .expect("write");
            std::fs::write(
                dir.path().join("detectors/burst.sql"),
                "-- id: burst\n-- verdict: alert\n-- severity: low\n-- reason: {{actor}} x{{n}}\n\
                 SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time \
                 RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND CURRENT ROW) AS n FROM events) WHERE n >= 3\n",
            )
            .expect("write");
            let pipeline = Pipeline::load(dir.path()).expect("loads");
            assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
            (dir, pipeline)
        })
        .1
}

fuzz_target!(|text: &str| {
    let pipeline = pipeline();
    // (Input paths resolve in a directory without files: a case naming one fails, it does
    // not read the machine's files.)
    let file: PathBuf = Path::new("/nonexistent-rampart-fuzz/tests/cases.toml").into();
    match run_test_file(pipeline, &file, text) {
        Ok(results) => {
            for r in results {
                assert_eq!(r.passed, r.details.is_empty());
            }
        }
        Err(problem) => assert!(problem.line.is_some() || text.is_empty(), "{problem}"),
    }
});
