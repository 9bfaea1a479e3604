//! The naive window evaluator, kept as the baseline benchmarks compare with: it keeps every
//! row a sliding-window detector's filters pass (all keys together, in memory) and re-runs the
//! window part of the query over all of them on every batch that brings rows, deciding the rows
//! that became final. Same answers as [`crate::windows::keyed`] for input in event-time order; cost
//! grows with the rows kept. Grouped windows are not supported here.

use std::collections::{BTreeMap, VecDeque};

use datafusion::arrow::array::{TimestampMicrosecondArray, UInt64Array};
use datafusion::arrow::compute::max;
use datafusion::arrow::record_batch::RecordBatch;
use rampart_core::Decision;
use rampart_sql::{CompiledDetector, DetectorEngine, WindowSplit};

use crate::decide::{DecisionMaker, Trigger};
use crate::input::decode::EventBatch;
use crate::pipeline::DetectorFailure;

/// Rows kept per detector, the events behind them, and the newest time seen.
#[derive(Default)]
pub struct NaiveWindows {
    kept: Vec<VecDeque<RecordBatch>>,
    dirty: Vec<bool>,
    triggers: BTreeMap<u64, Trigger>,
    horizon: Option<i64>,
}

impl NaiveWindows {
    /// Evaluates `windows` on a batch (`None`: the end of the input). `reach` is how far back
    /// rows are kept, in µs.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &mut self,
        engine: &DetectorEngine,
        windows: &[CompiledDetector],
        decisions: &DecisionMaker,
        events: Option<&EventBatch>,
        reach: i64,
        processed_at: &str,
        decided: &mut Vec<(u64, Decision)>,
        failures: &mut Vec<DetectorFailure>,
    ) {
        self.kept.resize_with(windows.len(), VecDeque::new);
        self.dirty.resize(windows.len(), false);
        let previous = self.horizon;
        let first_new_row = events.map_or(u64::MAX, |e| e.first_row);
        let horizon = match events {
            Some(e) => {
                self.keep(engine, windows, e, failures);
                let newest = column::<TimestampMicrosecondArray>(&e.batch, 0).and_then(max);
                match (previous, newest) {
                    (Some(p), Some(n)) => p.max(n),
                    (Some(p), None) => p,
                    (None, Some(n)) => n,
                    (None, None) => return,
                }
            }
            None => i64::MAX,
        };
        for (k, detector) in windows.iter().enumerate() {
            let Some(split) = detector.split() else { continue };
            if !self.dirty[k] {
                continue;
            }
            // Rows at the horizon (less how far the frames look ahead) wait for later events;
            // until then this detector stays due.
            let following = rampart_core::time::micros(split.timing.following());
            let final_before = horizon.saturating_sub(following);
            self.dirty[k] = self.kept[k]
                .iter()
                .any(|b| newest_kept(b, split).is_some_and(|t| t >= final_before));
            let results = match engine.run_post(split, self.kept[k].make_contiguous()) {
                Ok(r) => r,
                Err(err) => {
                    failures.push(DetectorFailure {
                        detector: detector.meta.id.clone(),
                        error: err.into(),
                    });
                    continue;
                }
            };
            for result in &results {
                let Some(row_ids) = DecisionMaker::row_ids(detector, result) else {
                    continue;
                };
                for r in 0..result.num_rows() {
                    let row = row_ids.value(r);
                    let Some(trigger) = self.triggers.get(&row) else {
                        continue;
                    };
                    let newly_final = row >= first_new_row
                        || previous.is_none_or(|p| trigger.time >= p.saturating_sub(following));
                    if trigger.time < final_before && newly_final {
                        decided.push((
                            row,
                            decisions.decide_row(detector, result, r, trigger, processed_at),
                        ));
                    }
                }
            }
        }
        if events.is_some() {
            self.horizon = Some(horizon);
            self.forget_before(windows, horizon.saturating_sub(reach));
        }
    }

    /// Runs each window's part below the window on `e` and keeps its rows, with their
    /// triggering events.
    fn keep(
        &mut self,
        engine: &DetectorEngine,
        windows: &[CompiledDetector],
        e: &EventBatch,
        failures: &mut Vec<DetectorFailure>,
    ) {
        for (k, detector) in windows.iter().enumerate() {
            let Some(split) = detector.split() else { continue };
            match engine.run_pre(split, e.batch.clone()) {
                Ok(rows) => {
                    for batch in &rows {
                        let Some(ids) = column::<UInt64Array>(batch, split.row_index) else {
                            continue;
                        };
                        for row in ids.values().iter() {
                            if let Some(i) = e.index_of(*row) {
                                self.triggers.entry(*row).or_insert_with(|| Trigger::of(e, i));
                            }
                        }
                    }
                    self.dirty[k] |= rows.iter().any(|b| b.num_rows() > 0);
                    self.kept[k].extend(rows);
                }
                Err(err) => failures.push(DetectorFailure {
                    detector: detector.meta.id.clone(),
                    error: err.into(),
                }),
            }
        }
    }

    /// Drops the kept batches and triggers no frame reaches any more: all older than
    /// `oldest_needed`.
    fn forget_before(&mut self, windows: &[CompiledDetector], oldest_needed: i64) {
        for (k, detector) in windows.iter().enumerate() {
            let Some(split) = detector.split() else { continue };
            let kept = &mut self.kept[k];
            while kept
                .front()
                .is_some_and(|b| newest_kept(b, split).is_none_or(|t| t < oldest_needed))
            {
                kept.pop_front();
            }
        }
        self.triggers.retain(|_, t| t.time >= oldest_needed);
    }
}

/// The newest event time among rows kept for a window detector.
fn newest_kept(batch: &RecordBatch, split: &WindowSplit) -> Option<i64> {
    column::<TimestampMicrosecondArray>(batch, split.time_index).and_then(max)
}

fn column<T: 'static>(batch: &RecordBatch, index: usize) -> Option<&T> {
    crate::windows::keyed::column(batch, index).ok()
}
