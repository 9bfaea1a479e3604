//! The pipeline: from raw records to decisions, in the order the data flows.
//!
//! - [`input`]: framing inputs into records, mapping records into canonical events, and
//!   building Arrow micro-batches ([`EventBatch`]) and dead letters.
//! - [`pipeline`]: `pipeline.toml` ([`PipelineConfig`]), reference tables, and the
//!   [`Pipeline`] that runs the detectors on each batch, keeps event time and checkpoints.
//! - [`windows`]: where a windowed detector keeps its rows, per key, and decides them.
//! - [`decide`]: result rows into [`rampart_core::Decision`]s (reason, evidence, expiry, id),
//!   and the events behind rows not yet decided.
//! - [`guardrails`]: what stands between decisions and enforcement: suppression, the
//!   blast-radius fail-safe, operator revocations, the audit log, shadow-against-enforce.
//! - [`drivers`]: replay of files and `rampart test` cases.
//! - [`error`]: what fails while events are evaluated, and whose it is to act on.

pub mod decide;
pub mod drivers;
pub mod error;
pub mod guardrails;
pub mod input;
pub mod pipeline;
pub mod windows;

pub use drivers::replay::{ReplaySink, Summary, replay};
pub use error::{Error, Fault};
pub use input::decode::{DeadLetter, DeadLetterKind, EventBatch};
pub use pipeline::config::PipelineConfig;
pub use pipeline::{Evaluator, LoadError, Pipeline, Progress, Route, SourceProgress, StateChoice};
pub use rampart_sql::{StateKind, Timing};
pub use rampart_state::{StateError, StateStore, changelog};
