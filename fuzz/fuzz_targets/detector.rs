//! A detector file: its metadata header, the sandbox and planning, on any text (seeded with the
//! real detectors). Never a panic; a refusal has the file and a line; a detector that loads
//! runs on a batch without a panic.
#![no_main]

mod common;

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rampart_core::EventSchema;
use rampart_sql::DetectorEngine;

fn engine() -> &'static (DetectorEngine, EventSchema) {
    static ENGINE: OnceLock<(DetectorEngine, EventSchema)> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let schema = common::config().1.clone();
        let engine = DetectorEngine::new(&schema, 16 << 20).expect("engine");
        (engine, schema)
    })
}

fuzz_target!(|text: &str| {
    let (engine, _) = engine();
    match engine.compile(Path::new("d/detectors/fuzz.sql"), text) {
        Ok(detector) => {
            assert!(!detector.meta.id.is_empty());
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "a refusal says why");
            for p in &problems {
                assert!(p.file.ends_with("fuzz.sql"), "{p}");
            }
        }
    }
});
