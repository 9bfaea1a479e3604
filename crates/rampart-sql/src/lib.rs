//! Detectors: loading `.sql` files with their metadata, the sandbox, planning on DataFusion once
//! per detector version, recognising the query shape, and running plans on micro-batches.
//! This crate does no Kafka or file IO beyond what it is handed.

pub mod engine;
pub mod events_table;
pub mod metadata;
pub mod predicate_order;
pub mod sandbox;
pub mod shape;

pub use engine::{
    AggregateKind, CompiledDetector, DetectorEngine, IncrementalPlan, StateKind, Strategy, WindowAggregate,
    WindowCondition, WindowSplit, WindowedDetector,
};
pub use metadata::{BlastRadius, DetectorMeta, ReasonTemplate};
pub use shape::{Shape, Timing};

/// Errors of this crate that are not about a user's detector (those are [`rampart_core::Problem`]s).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// DataFusion failed while setting up or executing a plan.
    #[error(transparent)]
    DataFusion(#[from] datafusion::common::DataFusionError),
    /// The async runtime that drives plan execution could not start.
    #[error("could not start the query runtime: {0}")]
    Runtime(std::io::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
