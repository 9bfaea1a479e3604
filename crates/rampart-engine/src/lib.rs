//! The pipeline: `pipeline.toml`, mapping and decoding inputs into micro-batches, evaluating
//! detectors, turning matches into decisions, replay and detector tests.

pub mod config;
pub mod decide;
pub mod decode;
pub mod mapping;
pub mod pipeline;
pub mod replay;
pub mod testing;

pub use config::PipelineConfig;
pub use decode::{DeadLetter, DeadLetterKind, EventBatch};
pub use pipeline::{LoadError, Pipeline};
pub use replay::{ReplaySink, Summary, replay};
