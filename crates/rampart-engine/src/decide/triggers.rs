//! The events behind window rows that are not decided yet, shared by all windowed detectors:
//! a decision names its triggering event (time, actor, action, source position). Batches are
//! kept in a slim form (those four columns, no raw record) until the watermark passes their
//! newest event. Each batch is written to the state once, at the first checkpoint after it
//! came (one metadata entry per batch, `triggers/<first row>`), and deleted once the watermark
//! has passed it.

use std::collections::VecDeque;

use datafusion::arrow::array::{Array, StringArray, TimestampMicrosecondArray};
use rampart_core::SourcePosition;
use rustc_hash::FxHashMap;

use crate::decide::Trigger;
use crate::input::decode::EventBatch;
use rampart_state::{Commit, StateError, StateStore};

/// Metadata key prefix of persisted batches.
const PREFIX: &str = "triggers/";

/// A batch's trigger columns.
struct SlimBatch {
    first_row: u64,
    newest: i64,
    /// Written to the state already.
    saved: bool,
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

/// A persisted batch.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredBatch {
    first_row: u64,
    newest: i64,
    triggers: Vec<Trigger>,
}

/// Triggers of rows that may still be decided.
#[derive(Default)]
pub struct TriggerStore {
    batches: VecDeque<SlimBatch>,
    /// Restored from a checkpoint (their batches are gone).
    restored: FxHashMap<u64, Trigger>,
    /// Persisted batches that are not in `batches`: (first row, newest time).
    restored_batches: Vec<(u64, i64)>,
    /// Persisted batches forgotten since the last save (their first rows).
    forgotten: Vec<u64>,
}

fn meta_key(first_row: u64) -> String {
    format!("{PREFIX}{first_row:020}")
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
            saved: false,
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
        while let Some(b) = self.batches.front().filter(|b| b.newest < watermark) {
            if b.saved {
                self.forgotten.push(b.first_row);
            }
            self.batches.pop_front();
        }
        if !self.restored.is_empty() {
            self.restored.retain(|_, t| t.time >= watermark);
        }
        let forgotten = &mut self.forgotten;
        self.restored_batches.retain(|(first_row, newest)| {
            let keep = *newest >= watermark;
            if !keep {
                forgotten.push(*first_row);
            }
            keep
        });
    }

    /// Adds to `out` the metadata writes that bring the persisted batches up to date: the
    /// batches that came since the last save, and deletes of those forgotten since.
    pub fn save(&mut self, out: &mut Commit<'_>) {
        for first_row in self.forgotten.drain(..) {
            out.meta(&meta_key(first_row), None);
        }
        for b in self.batches.iter_mut().filter(|b| !b.saved) {
            let stored = StoredBatch {
                first_row: b.first_row,
                newest: b.newest,
                triggers: (0..b.times.len()).map(|i| b.trigger(i)).collect(),
            };
            let value = serde_json::to_vec(&stored).expect("triggers serialise");
            out.meta(&meta_key(b.first_row), Some(&value));
            b.saved = true;
        }
    }

    /// Restores the persisted batches' triggers at or after `watermark`.
    pub fn load(&mut self, store: &StateStore, watermark: i64) -> Result<(), StateError> {
        for (key, value) in store.meta_with_prefix(PREFIX)? {
            let stored: StoredBatch = serde_json::from_slice(&value)
                .map_err(|e| store.corrupt(String::from_utf8_lossy(&key), e))?;
            self.restored_batches.push((stored.first_row, stored.newest));
            self.restored.extend(
                (stored.first_row..)
                    .zip(stored.triggers)
                    .filter(|(_, t)| t.time >= watermark),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::arrow::record_batch::RecordBatch;

    use super::*;

    /// A batch of events at `times` (actor `a<row>`, action `x`), rows numbered from `first_row`.
    fn events(first_row: u64, times: &[i64]) -> EventBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("actor", DataType::Utf8, false),
            Field::new("action", DataType::Utf8, false),
        ]));
        let rows = first_row..first_row + times.len() as u64;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMicrosecondArray::from(times.to_vec())),
            Arc::new(StringArray::from_iter_values(
                rows.clone().map(|r| format!("a{r}")),
            )),
            Arc::new(StringArray::from_iter_values(times.iter().map(|_| "x"))),
        ];
        EventBatch {
            batch: RecordBatch::try_new(schema, columns).expect("batch"),
            positions: rows
                .map(|r| SourcePosition::File {
                    file: Arc::from("f"),
                    line: r + 1,
                })
                .collect(),
            first_row,
        }
    }

    #[test]
    fn a_row_s_trigger_is_found_in_its_batch_until_the_watermark_passes_the_batch() {
        let mut store = TriggerStore::default();
        store.push(&events(0, &[10, 30, 20]));
        store.push(&events(3, &[40, 50]));
        let t = store.get(2).expect("kept");
        assert_eq!((t.time, t.actor.as_str(), t.action.as_str()), (20, "a2", "x"));
        assert_eq!(store.get(4).map(|t| t.time), Some(50));
        assert!(store.get(5).is_none(), "no such row");
        store.prune(30);
        assert!(
            store.get(0).is_some(),
            "the first batch's newest (30) is not older than 30"
        );
        store.prune(31);
        assert!(store.get(0).is_none(), "the whole first batch is older than 31");
        assert_eq!(store.get(3).map(|t| t.time), Some(40));
    }

    #[test]
    fn persisted_batches_come_back_from_their_watermark_on_and_are_deleted_once_passed() {
        let state = StateStore::temporary().expect("state");
        let mut store = TriggerStore::default();
        store.push(&events(0, &[10, 20]));
        store.push(&events(2, &[30, 40]));
        let mut commit = state.commit(0);
        store.save(&mut commit);
        state.write(commit).expect("writes");
        assert_eq!(
            state.meta_with_prefix(PREFIX).expect("reads").len(),
            2,
            "one entry per batch"
        );

        let mut restored = TriggerStore::default();
        restored.load(&state, 20).expect("loads");
        assert!(restored.get(0).is_none(), "older than the watermark");
        assert_eq!(restored.get(1).map(|t| t.actor), Some("a1".to_string()));
        assert_eq!(restored.get(3).map(|t| t.time), Some(40));

        restored.prune(41);
        let mut commit = state.commit(0);
        restored.save(&mut commit);
        state.write(commit).expect("writes");
        assert!(
            state.meta_with_prefix(PREFIX).expect("reads").is_empty(),
            "passed batches are deleted"
        );
    }
}
