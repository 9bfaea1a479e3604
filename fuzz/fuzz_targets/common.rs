//! What the targets share: a small pipeline over a simple event shape.

use std::sync::OnceLock;

use rampart_core::EventSchema;
use rampart_engine::PipelineConfig;

/// A pipeline.toml exercising fallbacks, defaults and typed columns.
pub const PIPELINE_TOML: &str = r#"
name = "fuzz"
[source]
max_record_bytes = 4096
batch_size = 3
max_batch_bytes = 2048
max_document_bytes = 65536
[mapping]
event_time = ["t", "time.iso", "ts"]
actor = ["user.arn", "user.name", "a"]
action = "x"
tenant = { path = "org", default = "none" }
origin = "ip"
outcome = { path = ["result", "error.code"], default = "ok" }
[columns]
n = { path = "n", type = "int" }
score = { path = "s", type = "float" }
admin = { path = "user.admin", type = "bool" }
seen = { path = "seen", type = "timestamp" }
tag = "tags.0"
"#;

/// [`PIPELINE_TOML`], parsed once, and its event schema.
#[allow(dead_code)]
pub fn config() -> &'static (PipelineConfig, EventSchema) {
    static CONFIG: OnceLock<(PipelineConfig, EventSchema)> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let config = PipelineConfig::parse(std::path::Path::new("fuzz/pipeline.toml"), PIPELINE_TOML)
            .expect("the fuzz pipeline is valid");
        let schema = config.event_schema();
        (config, schema)
    })
}
