//! The pipeline: `pipeline.toml`, mapping and decoding inputs into micro-batches, evaluating
//! detectors, turning matches into decisions, replay and detector tests.

pub mod audit;
pub mod compare;
pub mod config;
pub mod decide;
pub mod decode;
#[cfg(test)]
mod differential;
pub mod guard;
pub mod incremental;
pub mod keyed;
pub mod mapping;
pub mod naive;
pub mod pipeline;
pub mod replay;
pub mod tables;
pub mod testing;
pub mod triggers;

pub use config::PipelineConfig;
pub use decode::{DeadLetter, DeadLetterKind, EventBatch};
pub use pipeline::{Evaluator, LoadError, Pipeline, Progress, SourceProgress, StateChoice};
pub use rampart_sql::{StateKind, Timing};
pub use rampart_state::{StateError, StateStore};
pub use replay::{ReplaySink, Summary, replay};
