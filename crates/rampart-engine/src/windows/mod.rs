//! Where a window keeps its rows: per key, in a bounded cache over the state store
//! (`rampart-state`), and how each windowed detector's rows are decided.
//!
//! - [`keyed`]: the state of one window (the detectors sharing it), with one file per
//!   strategy (incremental sliding windows, sliding windows re-run over their rows, grouped
//!   windows) and the cache of keys they share.
//! - [`frames`]: one key's frame rows and accumulators for incremental sliding windows, and how
//!   they are stored as chunks.
//! - [`naive`]: the baseline evaluator benchmarks compare with.

#[cfg(test)]
mod differential;
pub mod frames;
pub mod keyed;
pub mod naive;
