//! `pipeline.toml` loading: any text. Never a panic; a refused file names its problems with a
//! line inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_engine::PipelineConfig;

fuzz_target!(|text: &str| {
    match PipelineConfig::parse(std::path::Path::new("p/pipeline.toml"), text) {
        Ok(config) => {
            assert!(config.input.batch_size >= 1);
            assert!(config.input.max_batch_bytes >= 1);
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "a refusal says why");
            let lines = text.lines().count().max(1);
            for p in &problems {
                if let Some(line) = p.line {
                    assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}: {p}");
                }
            }
        }
    }
});
