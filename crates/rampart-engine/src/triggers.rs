//! The events behind window rows that are not decided yet, shared by all windowed detectors:
//! a decision names its triggering event (time, actor, action, source position). Batches are
//! kept in a slim form (those four columns, no raw record) until the watermark passes their
//! newest event; what is still needed at a checkpoint is persisted with the window state.

use std::collections::VecDeque;

use datafusion::arrow::array::{Array, StringArray, TimestampMicrosecondArray};
use rampart_core::SourcePosition;
use rustc_hash::FxHashMap;

use crate::decide::Trigger;
use crate::decode::EventBatch;

/// A batch's trigger columns.
struct SlimBatch {
    first_row: u64,
    newest: i64,
    times: TimestampMicrosecondArray,
    actors: StringArray,
    actions: StringArray,
    positions: Vec<SourcePosition>,
}

impl SlimBatch {
    fn trigger(&self, i: usize) -> Trigger {
        Trigger {
            time: self.times.value(i),
            actor: self.actors.value(i).to_string(),
            action: self.actions.value(i).to_string(),
            position: self.positions[i].clone(),
        }
    }
}

/// Triggers of rows that may still be decided.
#[derive(Default)]
pub struct TriggerStore {
    batches: VecDeque<SlimBatch>,
    /// Restored from a checkpoint (their batches are gone).
    restored: FxHashMap<u64, Trigger>,
}

impl TriggerStore {
    /// Keeps `events`' trigger columns.
    pub fn push(&mut self, events: &EventBatch) {
        let n = events.batch.num_rows();
        if n == 0 {
            return;
        }
        let columns = events.batch.columns();
        let (Some(times), Some(actors), Some(actions)) = (
            columns[0].as_any().downcast_ref::<TimestampMicrosecondArray>(),
            columns[1].as_any().downcast_ref::<StringArray>(),
            columns[2].as_any().downcast_ref::<StringArray>(),
        ) else {
            return;
        };
        let newest = (0..n).map(|i| times.value(i)).max().unwrap_or(i64::MIN);
        self.batches.push_back(SlimBatch {
            first_row: events.first_row,
            newest,
            times: times.clone(),
            actors: actors.clone(),
            actions: actions.clone(),
            positions: events.positions.clone(),
        });
    }

    /// The trigger of row `row`, if it is kept.
    pub fn get(&self, row: u64) -> Option<Trigger> {
        let after = self.batches.partition_point(|b| b.first_row <= row);
        if after > 0 {
            let b = &self.batches[after - 1];
            let i = (row - b.first_row) as usize;
            if i < b.times.len() {
                return Some(b.trigger(i));
            }
        }
        self.restored.get(&row).cloned()
    }

    /// Forgets batches and triggers older than `watermark` (every such row is decided).
    pub fn prune(&mut self, watermark: i64) {
        while self.batches.front().is_some_and(|b| b.newest < watermark) {
            self.batches.pop_front();
        }
        if !self.restored.is_empty() {
            self.restored.retain(|_, t| t.time >= watermark);
        }
    }

    /// The triggers of every kept row at or after `watermark` (rows that may be waiting).
    pub fn waiting(&self, watermark: i64) -> Vec<(u64, Trigger)> {
        let mut out: Vec<(u64, Trigger)> = self
            .restored
            .iter()
            .filter(|(_, t)| t.time >= watermark)
            .map(|(r, t)| (*r, t.clone()))
            .collect();
        for b in &self.batches {
            for i in 0..b.times.len() {
                if b.times.value(i) >= watermark {
                    out.push((b.first_row + i as u64, b.trigger(i)));
                }
            }
        }
        out.sort_by_key(|(r, _)| *r);
        out
    }

    /// Adds triggers restored from a checkpoint.
    pub fn restore(&mut self, triggers: Vec<(u64, Trigger)>) {
        self.restored.extend(triggers);
    }
}
