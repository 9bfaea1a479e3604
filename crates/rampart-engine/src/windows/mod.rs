//! Where a window keeps its rows: per key, in a bounded cache over the state store
//! (`rampart-state`), and how each windowed detector's rows are decided.
//!
//! - [`keyed`]: the keyed state of one window state (the detectors sharing it), its cache,
//!   and the three strategies: incremental sliding windows, sliding windows re-run over their
//!   rows, grouped windows.
//! - [`incremental`]: a key's frame rows and accumulators for incremental sliding windows.
//! - [`naive`]: the baseline evaluator benchmarks compare with.

#[cfg(test)]
mod differential;
pub mod incremental;
pub mod keyed;
pub mod naive;
